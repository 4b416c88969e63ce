# Rules protected here: a handler whose work fails only when its transaction
# commits is counted, retried and dead-lettered, and does not stop the other
# handlers:
# (a) a local DEFERRABLE INITIALLY DEFERRED constraint the handler violates
#     on one event is checked inside the call: an ordinary failed attempt of
#     that event (handler_status.failed, last_sqlstate = the violation's), the
#     events before it in its batch kept (handled in the transaction of the
#     failed attempt), the event dead-lettered after max_attempts with the
#     violation's SQLSTATE and message, no batch lost;
# (b) a failure the worker cannot check inside the call: through
#     postgres_fdw, a remote table's deferred unique constraint, violated on
#     one event, fails the remote COMMIT sent at local pre-commit (23505).  The
#     batch is lost and counted (failed, last_sqlstate 23505, a LOG line "a
#     batch of handler ... was lost"), its events are then handled one per
#     batch, the poison event is retried with backoff and dead-lettered after
#     max_attempts, every other event is handled exactly once (locally and
#     remotely), and the built-in handlers keep up meanwhile: events created
#     during the retries are handled before the poison event is
#     dead-lettered.  A retried dead letter whose commit fails again goes back
#     with attempts + 1; once the cause is fixed, retry_dead_letters() gets
#     it handled, once;
# (c) the same when the poison event follows a gap in seq in its batch (a
#     rolled-back savepoint): it is still dead-lettered after max_attempts.
# In every case handler_status.processed counts the events handled
# successfully only, not the dead letters.
# Release 1.0 let a commit failure escape the round: every handler backed
# off, nothing was counted, and the batch was retried forever.
#
# Each handler records the events it handles in public.seen (with its
# transaction) and logs, at its poison event, what the worker's state row
# says (attempts, backoff delay, whether the retry was due).
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
my $RETRY_DELAY = 500;    # ms: the retries of (b) take a few seconds
my $CALL_LIMIT = 3 * (1 + $MAX_ATTEMPTS);

my $node = te_node(
	'commit_failure',
	conf => "task_events.max_attempts = $MAX_ATTEMPTS\n"
	  . "task_events.retry_delay = ${RETRY_DELAY}ms\n"
	  . "task_events.poll_interval = 100ms");
wait_for_workers($node, 1);

# The remote side of (b): a database of the same node, reached through a
# loopback postgres_fdw server.  Key 0 is taken: the poison event inserts it.
$node->safe_psql('postgres', 'CREATE DATABASE remote');
$node->safe_psql(
	'remote', q{
	CREATE TABLE public.r (k bigint NOT NULL,
		CONSTRAINT r_k_key UNIQUE (k) DEFERRABLE INITIALLY DEFERRED);
	INSERT INTO public.r VALUES (0);});
my ($host, $port) = ($node->host, $node->port);
$node->safe_psql(
	'postgres', qq{
	CREATE EXTENSION postgres_fdw;
	CREATE SERVER loopback FOREIGN DATA WRAPPER postgres_fdw
		OPTIONS (host '$host', port '$port', dbname 'remote');
	CREATE USER MAPPING FOR CURRENT_USER SERVER loopback;
	CREATE FOREIGN TABLE public.r_remote (k bigint NOT NULL)
		SERVER loopback OPTIONS (schema_name 'public', table_name 'r');});

# The local side of (a): a deferred foreign key.
$node->safe_psql(
	'postgres', q{
	CREATE TABLE public.parent (id int PRIMARY KEY);
	CREATE TABLE public.refs (seq bigint NOT NULL,
		parent int REFERENCES public.parent DEFERRABLE INITIALLY DEFERRED);
	CREATE TABLE public.seen (
		n bigserial PRIMARY KEY,
		handler text NOT NULL,
		seq bigint NOT NULL,
		xact xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id());});

my $HANDLER = q{
CREATE FUNCTION public.@H@(events task_events.events[]) RETURNS void
LANGUAGE plpgsql AS $f$
DECLARE
	e task_events.events;
	st record;
	poison boolean;
BEGIN
	FOREACH e IN ARRAY events LOOP
		poison := e.event_type = 'TaskCreated' AND e.payload ->> 'task_title' LIKE 'poison @H@%';
		IF poison THEN
			SELECT s.attempts,
				   pg_catalog.round(1000 * pg_catalog.date_part('epoch', s.retry_at - s.last_error_at)) AS delay_ms,
				   s.retry_at IS NOT NULL AND pg_catalog.clock_timestamp() >= s.retry_at AS due
			  INTO st FROM task_events.handler_state s WHERE s.handler = '@H@';
			RAISE LOG 'te_test call: handler=@H@ first=% last=% events=% attempts=% delay_ms=% due=% xact=%',
				(events[1]).seq, (events[pg_catalog.array_length(events, 1)]).seq,
				pg_catalog.array_length(events, 1), st.attempts, st.delay_ms, st.due,
				pg_catalog.pg_current_xact_id();
		END IF;
		@WORK@
		INSERT INTO public.seen (handler, seq) VALUES ('@H@', e.seq);
	END LOOP;
END $f$;
INSERT INTO task_events.handlers (handler, function)
VALUES ('@H@', 'public.@H@(task_events.events[])');
};
my %WORK = (
	# A row whose parent does not exist on the poison event: the deferred
	# foreign key fails at commit (or at SET CONSTRAINTS ALL IMMEDIATE).
	deferred => q{
		INSERT INTO public.refs VALUES (e.seq, CASE WHEN poison THEN 42 END);},
	# Every event's seq to the remote table; key 0 on the poison event.
	bridge => q{
		INSERT INTO public.r_remote VALUES (CASE WHEN poison THEN 0 ELSE e.seq END);},
);
for my $h (sort keys %WORK)
{
	(my $sql = $HANDLER) =~ s/\@H\@/$h/g;
	$sql =~ s/\@WORK\@/$WORK{$h}/;
	$node->safe_psql('postgres', $sql);
}

create_tasks($node, 5, 'early');
wait_caught_up($node);

# The calls at handler h's poison event logged since offset, in order.
sub poison_calls
{
	my ($h, $offset) = @_;
	my @calls;
	for (log_grep($node, $offset, qr/te_test call: handler=$h /))
	{
		/first=(\d+) last=(\d+) events=(\d+) attempts=(\S+) delay_ms=(\S+) due=(\S+) xact=(\d+)/
		  or die "unexpected log line: $_";
		push @calls,
		  {
			first => $1,
			last => $2,
			events => $3,
			attempts => $4,
			delay => $5,
			due => $6,
			xact => $7
		  };
	}
	return @calls;
}

# Poll until handler h has caught up (the poison event since offset
# dead-lettered or handled), or was called more than $CALL_LIMIT times at
# poison events since offset.  Returns whether it caught up.
sub wait_settled
{
	my ($h, $offset) = @_;
	my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
	while (time < $deadline)
	{
		return 1
		  if $node->safe_psql('postgres',
			"SELECT events_behind = 0 FROM task_events.handler_status WHERE handler = '$h'") eq 't';
		return 0 if poison_calls($h, $offset) > $CALL_LIMIT;
		usleep(100_000);
	}
	die "timed out waiting for handler $h";
}

# Create, in one transaction, two events, the poison event of handler h
# (after a rolled-back task when gap is set), and two more events: they
# share a batch.  Returns their seqs.
sub create_batch
{
	my ($h, $title, %opt) = @_;
	my $gap =
	  $opt{gap}
	  ? q{SAVEPOINT s;
		  SELECT FROM task_events.create_task('alice', 'rolled back');
		  ROLLBACK TO SAVEPOINT s;}
	  : '';
	return split /\n/, $node->safe_psql(
		'postgres', qq{
		BEGIN;
		SELECT FROM task_events.create_task('alice', '$h batch 1');
		SELECT FROM task_events.create_task('alice', '$h batch 2');
		$gap
		SELECT FROM task_events.create_task('mallory', '$title');
		SELECT FROM task_events.create_task('alice', '$h batch 3');
		SELECT FROM task_events.create_task('alice', '$h batch 4');
		SELECT seq FROM task_events.events WHERE xact_id = pg_current_xact_id() ORDER BY seq;
		COMMIT;});
}

# Handler h handled every event exactly once, but its dead letters, which
# it did not handle; and processed counts exactly those events.
sub check_exactly_once
{
	my ($case, $h) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	is( $node->safe_psql(
			'postgres', qq{
			SELECT count(*) FROM task_events.events e
			WHERE (SELECT count(*) FROM public.seen s WHERE s.handler = '$h' AND s.seq = e.seq)
				  <> CASE WHEN EXISTS (SELECT FROM task_events.dead_letters d
									   WHERE d.handler = '$h' AND d.seq = e.seq) THEN 0 ELSE 1 END}),
		0,
		"$case: $h handled every event exactly once, but its dead letters, not at all");
	is( $node->safe_psql(
			'postgres', qq{
			SELECT processed = (SELECT count(*) FROM public.seen WHERE handler = '$h')
			FROM task_events.handler_status WHERE handler = '$h'}),
		't',
		"$case: handler_status.processed counts the events $h handled, not its dead letters");
	return;
}

# The three events created in transaction during, while handler h retried
# its poison event p, are handled by the notification handler, and before h
# dead-lettered p: the built-in handlers did not wait for h's retries.
sub check_kept_up
{
	my ($case, $h, $during, $p) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	ok( $node->poll_query_until(
			'postgres', qq{
			SELECT count(*) = 3 FROM task_events.notifications n
			JOIN task_events.events e USING (event_id) WHERE e.xact_id = '$during'}),
		"$case: the notification handler handles the events created during the retries");
	ok( $node->poll_query_until(
			'postgres', qq{
			SELECT EXISTS (SELECT FROM task_events.dead_letters WHERE handler = '$h' AND seq = $p)}),
		"$case: ... and $h dead-letters the poison event");
	is( $node->safe_psql(
			'postgres', qq{
			SELECT count(*) FROM task_events.notifications n
			JOIN task_events.events e USING (event_id)
			WHERE e.xact_id = '$during'
			  AND n.created_at < (SELECT failed_at FROM task_events.dead_letters
								  WHERE handler = '$h' AND seq = $p)}),
		3,
		"$case: ... after the notification handler had handled them (it did not wait for $h)");
	return;
}

############################################################################
# (a) a local deferred constraint
{
	my $case = '(a) local deferred constraint';
	my $offset = log_position($node);
	my ($e1, $e2, $p, $e3, $e4) = create_batch('deferred', 'poison deferred');
	ok(wait_settled('deferred', $offset), "$case: the handler catches up");
	my $fk = 'insert or update on table "refs" violates foreign key constraint "refs_parent_fkey"';
	is( $node->safe_psql(
			'postgres',
			"SELECT seq, attempts, sqlstate, message FROM task_events.dead_letters WHERE handler = 'deferred'"
		),
		"$p|$MAX_ATTEMPTS|23503|$fk",
		"$case: the dead letter is the poison event, after max_attempts attempts, with the violation");
	is( $node->safe_psql(
			'postgres',
			"SELECT failed, last_sqlstate, last_error FROM task_events.handler_status WHERE handler = 'deferred'"
		),
		"$MAX_ATTEMPTS|23503|$fk",
		"$case: handler_status counts each failed attempt at the event, with the violation");
	is(scalar(log_grep($node, $offset, qr/a batch of handler "deferred" was lost/)),
		0, "$case: no batch was lost: the violation was the call's");
	my @calls = poison_calls('deferred', $offset);
	ok(@calls && $calls[0]{first} <= $e1 && $calls[0]{last} >= $e4,
		"$case: the first call held the whole transaction's events");
	is( $node->safe_psql(
			'postgres', qq{
			SELECT string_agg(seq::text, ' ' ORDER BY seq) FROM public.seen
			WHERE handler = 'deferred' AND xact = '$calls[0]{xact}'}),
		"$e1 $e2",
		"$case: the events before the poison event were kept in the transaction of its first failed attempt"
	);
	check_exactly_once($case, 'deferred');
	is( $node->safe_psql(
			'postgres',
			"SELECT count(*) FROM public.refs WHERE parent IS NOT NULL OR seq = $p"),
		0, "$case: nothing of the poison event's attempts was kept");
	wait_caught_up($node);
	handlers_match($node, "$case: the built-in handlers' output is exact");
	is( $node->safe_psql(
			'postgres',
			"SELECT failed || '/' || dead_letters FROM task_events.handler_status WHERE handler = 'bridge'"),
		'0/0', "$case: the other user handler did not fail");
}

############################################################################
# (b) a remote deferred constraint, through postgres_fdw
my ($p_bridge, $failed_b);
{
	my $case = '(b) remote commit failure';
	my $offset = log_position($node);
	my $other = $node->safe_psql('postgres',
		"SELECT failed || '/' || dead_letters FROM task_events.handler_status WHERE handler = 'deferred'");
	my ($e1, $e2, $p, $e3, $e4) = create_batch('bridge', 'poison bridge');
	$p_bridge = $p;

	# Events created while the lost batch is being retried.
	ok( $node->poll_query_until(
			'postgres', q{SELECT failed >= 1 FROM task_events.handler_status WHERE handler = 'bridge'}),
		"$case: the lost batch is counted");
	my $during = $node->safe_psql(
		'postgres', q{
		BEGIN;
		SELECT FROM task_events.create_task('carol', 'during 1');
		SELECT FROM task_events.create_task('carol', 'during 2');
		SELECT FROM task_events.create_task('carol', 'during 3');
		SELECT pg_current_xact_id();
		COMMIT;});
	check_kept_up($case, 'bridge', $during, $p);

	ok(wait_settled('bridge', $offset), "$case: the handler catches up");
	my $dup = 'duplicate key value violates unique constraint "r_k_key"';
	is( $node->safe_psql(
			'postgres',
			"SELECT seq, attempts, sqlstate, message, retry_requested FROM task_events.dead_letters WHERE handler = 'bridge'"
		),
		"$p|$MAX_ATTEMPTS|23505|$dup|f",
		"$case: the dead letter is the poison event, after max_attempts attempts, with the remote error");
	is( $node->safe_psql(
			'postgres',
			"SELECT failed, last_sqlstate, last_error FROM task_events.handler_status WHERE handler = 'bridge'"
		),
		(1 + $MAX_ATTEMPTS) . "|23505|$dup",
		"$case: handler_status counts the lost batch and each lost attempt at the poison event");

	my @calls = poison_calls('bridge', $offset);
	is(scalar(@calls), 1 + $MAX_ATTEMPTS,
		"$case: bridge was called at the poison event once in its batch, then max_attempts times alone");
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
	ok(@got == @want && !@off, "$case: the backoff before each retry was @want ms (@got)");

	my @lost = log_grep($node, $offset, qr/a batch of handler "bridge" was lost/);
	is( scalar(grep { /was lost: its transaction failed to commit$/ } @lost),
		1 + $MAX_ATTEMPTS,
		"$case: the server log says each time that a batch of bridge was lost as its commit failed");
	my @held = map { /The batch held the events with seq (\d+) to (\d+)/ ? "$1-$2" : () }
	  split /\n/, log_since($node, $offset);
	is( join(' ', @held),
		join(' ', ($calls[0] ? "$calls[0]{first}-$calls[0]{last}" : '?'), ("$p-$p") x $MAX_ATTEMPTS),
		"$case: ... and which events the lost batch held");

	is( $node->safe_psql(
			'postgres', qq{
			SELECT count(DISTINCT s.xact) || '/' || count(*)
			FROM public.seen s
			WHERE s.handler = 'bridge' AND s.xact IN (SELECT xact FROM public.seen
													  WHERE handler = 'bridge' AND seq IN ($e1, $e2, $e3, $e4))}),
		'4/4',
		"$case: the other events of the lost batch were handled one per batch");
	check_exactly_once($case, 'bridge');
	my $seen = $node->safe_psql('postgres', "SELECT count(*) FROM public.seen WHERE handler = 'bridge'");
	is( $node->safe_psql(
			'remote',
			q{SELECT count(*) - 1 || '/' || count(DISTINCT k) - 1 || '/' || count(*) FILTER (WHERE k = 0)
			  FROM public.r}),
		"$seen/$seen/1",
		"$case: the remote table holds each event handled, once, and nothing of the poison event");
	is( $node->safe_psql(
			'postgres',
			q{SELECT processed FROM task_events.handler_status WHERE handler = 'bridge'}),
		$node->safe_psql('postgres', 'SELECT count(*) - 1 FROM task_events.events'),
		"$case: processed counts every event but the dead letter");

	wait_caught_up($node);
	handlers_match($node, "$case: the built-in handlers' output is exact");
	is( $node->safe_psql(
			'postgres',
			"SELECT failed || '/' || dead_letters FROM task_events.handler_status WHERE handler = 'deferred'"),
		$other, "$case: the other user handler's counts did not change");
	$failed_b = 1 + $MAX_ATTEMPTS;
}

############################################################################
# (b) retry_dead_letters: while the cause is there, and once it is fixed
{
	my $case = '(b) retried dead letter';
	my $p = $p_bridge;
	my $offset = log_position($node);
	my $processed = $node->safe_psql('postgres',
		q{SELECT processed FROM task_events.handler_status WHERE handler = 'bridge'});

	is($node->safe_psql('postgres', q{SELECT task_events.retry_dead_letters('bridge')}),
		1, "$case: retry_dead_letters queues the dead letter");
	ok( $node->poll_query_until(
			'postgres', qq{
			SELECT attempts = $MAX_ATTEMPTS + 1 AND NOT retry_requested AND sqlstate = '23505'
			FROM task_events.dead_letters WHERE handler = 'bridge' AND seq = $p}),
		"$case: a retry whose commit fails goes back to the dead letters with attempts + 1");
	is( $node->safe_psql(
			'postgres',
			q{SELECT failed || '/' || processed FROM task_events.handler_status WHERE handler = 'bridge'}),
		($failed_b + 1) . "/$processed",
		"$case: ... counted as one more failed attempt, nothing processed");
	like(
		join("\n", log_grep($node, $offset, qr/The batch held the events with seq/)),
		qr/seq $p to $p \(dead letters retried\)/,
		"$case: ... and the log says the lost batch was a retry of dead letters");

	# Fix the cause: key 0 is free again.
	$node->safe_psql('remote', 'DELETE FROM public.r WHERE k = 0');
	is($node->safe_psql('postgres', q{SELECT task_events.retry_dead_letters('bridge')}),
		1, "$case: retry_dead_letters queues it again");
	ok( $node->poll_query_until(
			'postgres',
			q{SELECT count(*) = 0 FROM task_events.dead_letters WHERE handler = 'bridge'}),
		"$case: once the cause is fixed the retried dead letter is handled");
	is( $node->safe_psql(
			'postgres',
			q{SELECT processed FROM task_events.handler_status WHERE handler = 'bridge'}),
		$processed + 1,
		"$case: processed grows by exactly 1");
	# One more event through the handler: a second (wrong) handling of the
	# retried event would have happened by the time it is handled.
	my $task = $node->safe_psql('postgres',
		q{SELECT task_id FROM task_events.create_task('alice', 'after the retry')});
	ok( $node->poll_query_until(
			'postgres', qq{
			SELECT EXISTS (SELECT FROM public.seen s JOIN task_events.events e USING (seq)
						   WHERE s.handler = 'bridge' AND e.aggregate_id = '$task')}),
		"$case: the handler goes on with new events");
	is( $node->safe_psql(
			'postgres', qq{
			SELECT (SELECT count(*) FROM public.seen WHERE handler = 'bridge' AND seq = $p)
				   || '/' || processed
			FROM task_events.handler_status WHERE handler = 'bridge'}),
		'1/' . ($processed + 2),
		"$case: the retried event was handled once; processed counts it once");
	is($node->safe_psql('remote', 'SELECT count(*) FROM public.r WHERE k = 0'),
		1, "$case: its remote row is there, once");
	check_exactly_once($case, 'bridge');
}

############################################################################
# (c) the poison event after a gap in seq (a rolled-back savepoint): key 0
# is taken again (by the retried event), the new poison event inserts it.
{
	my $case = '(c) commit failure after a gap in seq';
	my $offset = log_position($node);
	my $failed = $node->safe_psql('postgres',
		q{SELECT failed FROM task_events.handler_status WHERE handler = 'bridge'});
	my ($e1, $e2, $p, $e3, $e4) = create_batch('bridge', 'poison bridge again', gap => 1);
	my $dead = wait_settled('bridge', $offset);
	ok($dead, "$case: the handler catches up");
	is( $node->safe_psql(
			'postgres',
			"SELECT seq, attempts, sqlstate FROM task_events.dead_letters WHERE handler = 'bridge'"),
		"$p|$MAX_ATTEMPTS|23505",
		"$case: the dead letter is the poison event, after max_attempts attempts");
	is( $node->safe_psql(
			'postgres',
			q{SELECT failed FROM task_events.handler_status WHERE handler = 'bridge'}),
		$failed + 1 + $MAX_ATTEMPTS,
		"$case: handler_status counts the lost batch and each lost attempt at the poison event");
	my @held = map { /The batch held the events with seq (\d+) to (\d+)/ ? "$1-$2" : () }
	  split /\n/, log_since($node, $offset);
	is( join(' ', @held[ 1 .. $#held ]),
		join(' ', ("$p-$p") x $MAX_ATTEMPTS),
		"$case: the lost batches after the first held the poison event alone");
	if (!$dead)
	{
		# Free key 0, so that the handler gets past the event.
		$node->safe_psql('remote', 'DELETE FROM public.r WHERE k = 0');
		$node->poll_query_until(
			'postgres', q{
			SELECT dead_letters = 0 AND events_behind = 0
			FROM task_events.handler_status WHERE handler = 'bridge'})
		  or die 'bridge did not get past the poison event';
	}
	check_exactly_once($case, 'bridge');
}

wait_caught_up($node);
handlers_match($node, 'in the end the built-in handlers are exact');
is( $node->safe_psql(
		'postgres',
		q{SELECT string_agg(handler, ', ' ORDER BY handler) FROM task_events.handler_status
		  WHERE failed <> 0 AND handler NOT IN ('bridge', 'deferred')}),
	'',
	'no other handler ever failed');

$node->stop;
done_testing();
