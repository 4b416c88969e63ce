# Rules protected here: a handler that ends its own process during a call
# - (a) pg_terminate_backend(pg_backend_pid()), a FATAL error (57P01);
# - (b) a crash of C code (SIGSEGV: the postmaster crash-restarts the server);
# - (c) the kernel's OOM killer (SIGKILL: crash-restart as well);
# - (d) a crash at once, as soon as the call starts, so that the server
#   crash-restarts before the WAL writer has written what the worker
#   committed just before the call (the workers commit asynchronously);
# - (e) on an event that follows a gap in seq in its batch (a rolled-back
#   savepoint: concurrent writers and rollbacks make such gaps all the time);
# is counted (handler_status.failed counts every lost call, last_sqlstate
# 58000, last_error says the process ended, and the server log says "a batch
# of handler ... was lost" with the events it held), the events of the lost
# batch are then handled one per batch, the poison event is retried with
# backoff (retry_delay, doubling) and dead-lettered after
# task_events.max_attempts attempts (attempts = max_attempts, the dead letter
# says why), every other event (those of the poison event's batch included)
# is handled by that handler exactly once and counted in
# handler_status.processed (the dead letter is not), the other handlers
# (built-in and user) keep running with nothing lost, doubled or failed, and
# the worker does not crash-loop: the same worker goes on handling new
# events.  Release 1.0 called such a handler on the same batch forever and
# counted nothing.
#
# Each handler records the events it handles in public.seen (with its
# transaction) and misbehaves only on its own poison event, a task titled
# 'poison <handler>', while its name is in public.misbehaving.  Before it
# misbehaves it logs what the worker's state row says (attempts, the backoff
# delay, whether the retry was due): the calls that end the process leave
# nothing else behind.  In (b) and (c) the handler blocks in pg_sleep and the
# test kills the worker once what it committed before the call is flushed.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

use TaskEventsTest;

my $MAX_ATTEMPTS = 3;
my $RETRY_DELAY = 100;    # ms
my $ENDED = "the handler's process ended during the call";
# Calls at the poison event after which a case is given up (the handler is
# then cured so that the next cases can run): twice the expected number,
# one batch call and then max_attempts calls of the poison event alone.
my $CALL_LIMIT = 2 * (1 + $MAX_ATTEMPTS);

my $node = te_node(
	'ends_process',
	conf => "restart_after_crash = on\n"
	  . "task_events.max_attempts = $MAX_ATTEMPTS\n"
	  . "task_events.retry_delay = ${RETRY_DELAY}ms\n"
	  . "task_events.poll_interval = 100ms\n"
	  # The blocking handlers wait until the test kills them.
	  . "task_events.handler_timeout = 0");
wait_for_workers($node, 1);

# What each handler does to its process on its poison event.
my %MISBEHAVE = (
	h_fatal => q{
		PERFORM pg_catalog.pg_terminate_backend(pg_catalog.pg_backend_pid());
		PERFORM pg_catalog.pg_sleep(60);},
	# Blocks until the test kills the worker (or cures the handler).
	h_segv => q{
		WHILE EXISTS (SELECT FROM public.misbehaving m WHERE m.handler = 'h_segv') LOOP
			PERFORM pg_catalog.pg_sleep(0.1);
		END LOOP;},
	h_oom => q{
		WHILE EXISTS (SELECT FROM public.misbehaving m WHERE m.handler = 'h_oom') LOOP
			PERFORM pg_catalog.pg_sleep(0.1);
		END LOOP;},
	# Crashes at once, as C code dereferencing a bad pointer would.
	h_crash => q{
		RAISE LOG 'te_test: deliberate SIGSEGV to PID %', pg_catalog.pg_backend_pid();
		EXECUTE pg_catalog.format('COPY (SELECT 1) TO PROGRAM %L',
			'kill -s SEGV ' || pg_catalog.pg_backend_pid());
		PERFORM pg_catalog.pg_sleep(60);},
	h_gap => q{
		PERFORM pg_catalog.pg_terminate_backend(pg_catalog.pg_backend_pid());
		PERFORM pg_catalog.pg_sleep(60);},
);

my $HANDLER = q{
CREATE FUNCTION public.@H@(events task_events.events[]) RETURNS void
LANGUAGE plpgsql AS $f$
DECLARE
	e task_events.events;
	st record;
BEGIN
	FOREACH e IN ARRAY events LOOP
		IF e.event_type = 'TaskCreated' AND e.payload ->> 'task_title' = 'poison @H@'
		   AND EXISTS (SELECT FROM public.misbehaving m WHERE m.handler = '@H@') THEN
			SELECT s.attempts, s.generation,
				   pg_catalog.round(1000 * pg_catalog.date_part('epoch', s.retry_at - s.last_error_at)) AS delay_ms,
				   s.retry_at IS NOT NULL AND pg_catalog.clock_timestamp() >= s.retry_at AS due
			  INTO st FROM task_events.handler_state s WHERE s.handler = '@H@';
			RAISE LOG 'te_test call: handler=@H@ first=% last=% events=% attempts=% delay_ms=% due=% generation=%',
				(events[1]).seq, (events[pg_catalog.array_length(events, 1)]).seq,
				pg_catalog.array_length(events, 1), st.attempts, st.delay_ms, st.due, st.generation;
			@MISBEHAVE@
		END IF;
		INSERT INTO public.seen (handler, seq) VALUES ('@H@', e.seq);
	END LOOP;
END $f$;
INSERT INTO task_events.handlers (handler, function)
VALUES ('@H@', 'public.@H@(task_events.events[])');
};

$node->safe_psql(
	'postgres', q{
CREATE TABLE public.misbehaving (handler text PRIMARY KEY);
CREATE TABLE public.flushes (n bigserial PRIMARY KEY);
CREATE TABLE public.seen (
	n bigserial PRIMARY KEY,
	handler text NOT NULL,
	seq bigint NOT NULL,
	xact xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id());
});
for my $h (sort keys %MISBEHAVE)
{
	(my $sql = $HANDLER) =~ s/\@H\@/$h/g;
	$sql =~ s/\@MISBEHAVE\@/$MISBEHAVE{$h}/;
	$node->safe_psql('postgres', $sql);
}

create_tasks($node, 5, 'early');
wait_caught_up($node);

# A query that may fail while the server restarts after a crash: its output,
# or undef.
sub try_query
{
	my ($sql) = @_;
	my ($rc, $out) = $node->psql('postgres', $sql);
	return $rc == 0 ? $out : undef;
}

# The calls at handler h's poison event logged since offset, in order.
sub poison_calls
{
	my ($h, $offset) = @_;
	my @calls;
	for (log_grep($node, $offset, qr/te_test call: handler=$h /))
	{
		/first=(\d+) last=(\d+) events=(\d+) attempts=(\S+) delay_ms=(\S+) due=(\S+)/
		  or die "unexpected log line: $_";
		push @calls,
		  {
			first => $1,
			last => $2,
			events => $3,
			attempts => $4,
			delay => $5,
			due => $6
		  };
	}
	return @calls;
}

# Kill the worker blocked in a handler's call with signal sig, once what it
# committed before the call is on disk: the workers commit asynchronously,
# and a synchronous commit of the test flushes the WAL written before it.
# (Case (d) is the crash that comes before that.)  Returns whether a worker
# was blocked.
sub kill_blocked_worker
{
	my ($sig) = @_;
	my $pid = try_query(
		q{SELECT pid FROM pg_stat_activity
		  WHERE backend_type = 'task_events worker' AND wait_event = 'PgSleep'});
	return 0 unless defined $pid && $pid ne '';
	# The marker tells scripts/sanitize.sh that this crash is no finding.
	$node->safe_psql('postgres',
		"DO \$\$ BEGIN RAISE LOG 'te_test: deliberate SIG$sig to PID $pid'; END \$\$;"
		  . 'SET synchronous_commit = on; INSERT INTO public.flushes DEFAULT VALUES');
	kill($sig, $pid) or die "could not send SIG$sig to $pid";
	$node->poll_query_until('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE pid = $pid", '0')
	  or die "worker $pid is still there after SIG$sig";
	return 1;
}

# Poll until handler h has dead-lettered its poison event and caught up, or
# was called more than $CALL_LIMIT times at it; with sig, kill the worker
# each time it blocks in h.  Returns (whether it was dead-lettered, kills).
sub drive_case
{
	my ($h, $offset, $sig) = @_;
	my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
	my $kills = 0;
	while (time < $deadline)
	{
		my $done = try_query(
			qq{SELECT dead_letters = 1 AND events_behind = 0
			   FROM task_events.handler_status WHERE handler = '$h'});
		return (1, $kills) if defined $done && $done eq 't';
		return (0, $kills) if poison_calls($h, $offset) > $CALL_LIMIT;
		$kills += kill_blocked_worker($sig) if $sig;
		usleep(100_000);
	}
	die "timed out waiting for handler $h";
}

# One case: handler h misbehaves on its poison event, created in one
# transaction between two events before it and two after it (so that they
# share a batch), with a rolled-back task before it when gap is set.
sub run_case
{
	my ($case, $h, %opt) = @_;
	my $offset = log_position($node);
	$node->safe_psql('postgres', "INSERT INTO public.misbehaving VALUES ('$h')");
	my $gap =
	  $opt{gap}
	  ? q{SAVEPOINT s;
		  SELECT FROM task_events.create_task('alice', 'rolled back');
		  ROLLBACK TO SAVEPOINT s;}
	  : '';
	# The handler is disabled while they are written (case (d) crashes the
	# server as soon as it sees them).
	$node->safe_psql('postgres',
		"UPDATE task_events.handlers SET enabled = false WHERE handler = '$h'");
	my ($e1, $e2, $p, $e3, $e4) = split /\n/, $node->safe_psql(
		'postgres', qq{
		BEGIN;
		SELECT FROM task_events.create_task('alice', '$h batch 1');
		SELECT FROM task_events.create_task('alice', '$h batch 2');
		$gap
		SELECT FROM task_events.create_task('mallory', 'poison $h');
		SELECT FROM task_events.create_task('alice', '$h batch 3');
		SELECT FROM task_events.create_task('alice', '$h batch 4');
		SELECT seq FROM task_events.events WHERE xact_id = pg_current_xact_id() ORDER BY seq;
		COMMIT;});
	$node->psql('postgres',
		"UPDATE task_events.handlers SET enabled = true WHERE handler = '$h'");

	my ($dead, $kills) = drive_case($h, $offset, $opt{signal});
	ok($dead, "$case: the poison event is dead-lettered and $h catches up");
	if (!$dead)
	{
		# Cure the handler, so that the next cases can run.
		$node->poll_query_until('postgres',
			"WITH d AS (DELETE FROM public.misbehaving WHERE handler = '$h') SELECT true")
		  or die "could not cure $h";
	}
	wait_caught_up($node);

	is( $node->safe_psql(
			'postgres',
			"SELECT seq, attempts, sqlstate, message FROM task_events.dead_letters WHERE handler = '$h'"
		),
		"$p|$MAX_ATTEMPTS|58000|$ENDED",
		"$case: the dead letter is the poison event, after max_attempts attempts, saying the process ended"
	);
	is( $node->safe_psql(
			'postgres',
			"SELECT failed, last_sqlstate, last_error FROM task_events.handler_status WHERE handler = '$h'"
		),
		(1 + $MAX_ATTEMPTS) . "|58000|$ENDED",
		"$case: handler_status counts the lost batch and each lost call at the poison event");

	my @calls = poison_calls($h, $offset);
	is(scalar(@calls), 1 + $MAX_ATTEMPTS,
		"$case: $h was called at the poison event once in its batch, then max_attempts times alone");
	ok(@calls && $calls[0]{first} <= $e1 && $calls[0]{last} >= $e4,
		"$case: the first call held the whole transaction's events");
	is( join(' ', map { "$_->{first}-$_->{last}" } @calls[ 1 .. $#calls ]),
		join(' ', ("$p-$p") x $MAX_ATTEMPTS),
		"$case: then the poison event was called alone");
	is( join(' ', map { "$_->{attempts}/$_->{due}" } @calls[ 1 .. $#calls ]),
		join(' ', map { "$_/t" } 0 .. $MAX_ATTEMPTS - 1),
		"$case: each retry saw the attempts counted so far, and came once its backoff was over");
	my @want = map { $RETRY_DELAY * 2**($_ > 0 ? $_ - 1 : 0) } 0 .. $MAX_ATTEMPTS - 1;
	my @got = map { $_->{delay} } @calls[ 1 .. $#calls ];
	my @off = grep { ($got[$_] // '') !~ /^\d+$/ || $got[$_] <= $want[$_] / 2 || $got[$_] > $want[$_] + 1 }
	  0 .. $#want;
	ok(@got == @want && !@off,
		"$case: the backoff before each retry was @want ms (@got)");

	my @lost = log_grep($node, $offset, qr/a batch of handler "$h" was lost/);
	is( scalar(grep { /was lost: its process ended during a handler call$/ } @lost),
		1 + $MAX_ATTEMPTS,
		"$case: the server log says each time that a batch of $h was lost as its process ended");
	my @held = map { /The batch held the events with seq (\d+) to (\d+)/ ? "$1-$2" : () }
	  split /\n/, log_since($node, $offset);
	is( join(' ', @held),
		join(' ', ($calls[0] ? "$calls[0]{first}-$calls[0]{last}" : '?'), ("$p-$p") x $MAX_ATTEMPTS),
		"$case: ... and which events the lost batch held");
	if ($opt{signal})
	{
		is($kills, 1 + $MAX_ATTEMPTS, "$case: the worker was killed at each call, no more");
		my $num = $opt{signal} eq 'SEGV' ? 11 : 9;
		is( scalar(log_grep($node, $offset, qr/"task_events worker" \(PID \d+\) was terminated by signal $num/)),
			$kills, "$case: the postmaster saw each kill");
	}

	is( $node->safe_psql(
			'postgres', qq{
			SELECT count(*) FROM task_events.events e
			WHERE e.seq <> $p
			  AND (SELECT count(*) FROM public.seen s WHERE s.handler = '$h' AND s.seq = e.seq) <> 1}),
		0,
		"$case: $h handled every other event exactly once");
	is( $node->safe_psql(
			'postgres',
			"SELECT count(*) FROM public.seen WHERE handler = '$h' AND (seq = $p OR seq NOT IN (SELECT seq FROM task_events.events))"
		),
		0,
		"$case: the poison event left nothing behind");
	is( $node->safe_psql(
			'postgres', qq{
			SELECT count(DISTINCT s.xact) || '/' || count(*)
			FROM public.seen s
			WHERE s.handler = '$h' AND s.xact IN (SELECT xact FROM public.seen
												  WHERE handler = '$h' AND seq IN ($e1, $e2, $e3, $e4))}),
		'4/4',
		"$case: the other events of the lost batch were handled one per batch");
	is( $node->safe_psql(
			'postgres', qq{
			SELECT processed = (SELECT count(*) FROM public.seen WHERE handler = '$h')
			   AND processed = (SELECT count(*) FROM task_events.events) - 1
			FROM task_events.handler_status WHERE handler = '$h'}),
		't',
		"$case: handler_status.processed counts the events $h handled, not the dead letter");

	is( $node->safe_psql(
			'postgres', qq{
			SELECT string_agg(handler || ' ' || failed || '/' || dead_letters, ', ' ORDER BY handler)
			FROM task_events.handler_status
			WHERE handler <> '$h' AND (failed <> 0 OR dead_letters <> 0)
			  AND NOT handler IN (SELECT handler FROM public.done_cases)}),
		'',
		"$case: no other handler failed");
	is( $node->safe_psql(
			'postgres', qq{
			SELECT count(*) FROM task_events.handlers h CROSS JOIN task_events.events e
			WHERE h.handler LIKE 'h\\_%' AND h.handler <> '$h'
			  AND NOT EXISTS (SELECT FROM task_events.dead_letters d
							  WHERE d.handler = h.handler AND d.seq = e.seq)
			  AND (SELECT count(*) FROM public.seen s
				   WHERE s.handler = h.handler AND s.seq = e.seq) <> 1}),
		0,
		"$case: the other user handlers handled every event exactly once (but their own dead letters)");
	handlers_match($node, "$case: the built-in handlers' output is exact");

	# The worker goes on: a new event is handled by the same worker, which
	# then keeps looping.
	my ($pid) = worker_pids($node);
	my $task = $node->safe_psql('postgres',
		"SELECT task_id FROM task_events.create_task('alice', '$h after')");
	ok( $node->poll_query_until(
			'postgres', qq{
			SELECT EXISTS (SELECT FROM public.seen s JOIN task_events.events e USING (seq)
						   WHERE s.handler = '$h' AND e.aggregate_id = '$task')}),
		"$case: $h handles new events afterwards");
	is(join(',', worker_loops_quietly($node, 1, 500, $case)),
		$pid, "$case: the worker that handled it keeps running (no crash loop)");

	$node->safe_psql('postgres',
		"DELETE FROM public.misbehaving WHERE handler = '$h'; INSERT INTO public.done_cases VALUES ('$h')");
	return;
}

$node->safe_psql('postgres', 'CREATE TABLE public.done_cases (handler text PRIMARY KEY)');

run_case('(a) pg_terminate_backend', 'h_fatal');
run_case('(b) SIGSEGV', 'h_segv', signal => 'SEGV');
run_case('(c) SIGKILL', 'h_oom', signal => 'KILL');
run_case('(d) crash at once', 'h_crash');
run_case('(e) after a gap in seq', 'h_gap', gap => 1);

wait_caught_up($node);
handlers_match($node, 'in the end the built-in handlers are exact');

$node->stop;
done_testing();
