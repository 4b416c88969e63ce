# Rules protected here: the handler API (register_handler,
# unregister_handler, pause_handler, resume_handler, replay_handler,
# rebuild_analytics) keeps its promises while the background workers run
# (two of them, small batches) and a pgbench write load goes on:
# 1. register_handler(start_at => 'now'): the handler is never called with an
#    event visible in the snapshot of the registering transaction, and is
#    called exactly once with every other event (also with the event of a
#    transaction in progress at the registration that commits after it);
# 2. event_types => '{TaskCompleted}': the handler is called only with
#    TaskCompleted events, never with none, each exactly once, and its
#    position moves past the other types (events_behind = 0 at the end);
# 3. pause_handler: once the pause has committed and a batch in progress has
#    finished, the handler is called no more while its events_behind grows
#    and the workers go on with the others; handler_status shows paused;
#    resume_handler: it goes on where it stopped: every event exactly once;
# 4. replay_handler(h, from_seq): every event with seq >= from_seq that h had
#    handled when the call returned is handled exactly once more, no event
#    below from_seq is, the events committed after the call are handled
#    once; the replayed events come in one run, in seq order; per task, the
#    versions are in increasing order in the replayed run and in the normal
#    handling; the value returned is the number of events handled again;
# 5. rebuild_analytics(), called several times while the load and the
#    analytics handler run, leaves analytics_counters and completion_stats
#    exact (no event counted twice or missed at the switch); readers see the
#    old figures (corrupted on purpose) until the rebuild commits, never a
#    mix, and the exact ones after it; its value is the number of events
#    counted;
# 6. unregister_handler of a user handler with dead letters, while a batch
#    of it is in progress (the batch dead-letters an event): it waits for the
#    batch, then its handlers row, handler_state row and dead letters are
#    gone; no ERROR is logged (neither the call nor a worker fails) and the
#    workers are the same processes.
# At the end the built-in handlers' outputs are exact.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

# max_attempts = 1: a failing event is dead-lettered at its first failed
# attempt (only the 'gone' handler fails, on purpose).
my $node = te_node(
	'handler_api',
	conf => "task_events.worker_count = 2\n"
	  . "task_events.batch_size = 50\n"
	  . "task_events.poll_interval = 100ms\n"
	  . "task_events.max_attempts = 1\n"
	  . "task_events.retry_delay = 10ms\n"
	  . "max_connections = 40");
my @pids = wait_for_workers($node, 2);

sub query
{
	my ($sql) = @_;
	return $node->safe_psql('postgres', $sql);
}

# Poll until every worker has changed state after this call: each has since
# begun or ended a unit of work, so a batch it had in progress when the call
# was made has ended, and a batch it begins now locks the handler's state
# with a snapshot taken after everything committed before the call (a paused
# handler is not run).
sub workers_passed
{
	my ($what) = @_;
	my $mark = query('SELECT clock_timestamp()');
	$node->poll_query_until(
		'postgres', qq{
		SELECT count(*) = 2 FROM pg_stat_activity
		WHERE backend_type = 'task_events worker' AND state_change > '$mark'})
	  or die "timed out waiting for the workers to pass a point ($what)";
	return;
}

# The recording handlers: each inserts every event it is called with into
# public.seen, in the order of the array; n gives the order of the calls
# (a handler's batches are serial: its state row is locked for each).  The
# workers run with search_path = '': every name is qualified.
my @recorders = qw(late completed paused replayed);
my $setup = q{
CREATE TABLE public.seen (
	n bigserial PRIMARY KEY,
	handler text NOT NULL,
	seq bigint NOT NULL,
	event_type text NOT NULL,
	aggregate_id uuid NOT NULL,
	aggregate_version bigint NOT NULL);
CREATE INDEX ON public.seen (handler, seq);
CREATE TABLE public.calls (handler text NOT NULL, events int);
CREATE TABLE public.marks (name text PRIMARY KEY, snap pg_snapshot NOT NULL);
};
for my $h (@recorders)
{
	$setup .= qq{
CREATE FUNCTION public.rec_$h(events task_events.events[]) RETURNS void LANGUAGE sql AS \$\$
	INSERT INTO public.calls VALUES ('$h', pg_catalog.cardinality(events));
	INSERT INTO public.seen (handler, seq, event_type, aggregate_id, aggregate_version)
	SELECT '$h', e.seq, e.event_type, e.aggregate_id, e.aggregate_version
	FROM pg_catalog.unnest(events) WITH ORDINALITY AS e
	ORDER BY e.ordinality
\$\$;};
}
# The 'gone' handler fails on the TaskCreated of a task titled 'poison...'.
# Called with that event alone (as the last attempt before its dead letter
# is written) for a task titled 'poison block...', it first waits for the
# advisory lock 4210, which the test holds to keep the batch in progress.
$setup .= q{
CREATE FUNCTION public.gone(events task_events.events[]) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
	e task_events.events;
BEGIN
	FOREACH e IN ARRAY events LOOP
		IF e.event_type = 'TaskCreated' AND e.payload ->> 'task_title' LIKE 'poison%' THEN
			IF pg_catalog.cardinality(events) = 1 AND e.payload ->> 'task_title' LIKE 'poison block%' THEN
				PERFORM pg_catalog.pg_advisory_xact_lock_shared(4210);
			END IF;
			RAISE EXCEPTION 'poisoned event %', e.seq;
		END IF;
	END LOOP;
END $$;
};
query($setup);

create_tasks($node, 30, 'before');
wait_caught_up($node);

my $load = start_pgbench_loop($node, clients => 2, seconds => 5);
my $start = query('SELECT max(seq) FROM task_events.events');
$node->poll_query_until('postgres',
	"SELECT max(seq) >= $start + 200 FROM task_events.events")
  or die 'the load writes no events';

### Registered under load.
query(q{
	SELECT task_events.register_handler('completed', 'public.rec_completed(task_events.events[])',
		event_types => '{TaskCompleted}');
	SELECT task_events.register_handler('paused', 'public.rec_paused(task_events.events[])');
	SELECT task_events.register_handler('replayed', 'public.rec_replayed(task_events.events[])');
	SELECT task_events.register_handler('gone', 'public.gone(task_events.events[])');
});

### Rule 1: start_at => 'now'.  A transaction in progress at the
# registration writes an event and commits after it.  The registering
# transaction is REPEATABLE READ: its snapshot, saved in public.marks, is the
# one register_handler runs with.
my $inflight = $node->background_psql('postgres');
$inflight->query_safe('BEGIN');
my $inflight_task = $inflight->query_safe(
	"SELECT task_id FROM task_events.create_task('inflight', 'in flight')");
query(q{
	BEGIN ISOLATION LEVEL REPEATABLE READ;
	INSERT INTO public.marks VALUES ('late', pg_current_snapshot());
	SELECT task_events.register_handler('late', 'public.rec_late(task_events.events[])',
		start_at => 'now');
	COMMIT;
});
$inflight->query_safe('COMMIT');
$inflight->quit;
is( query(qq{
		SELECT bool_and(e.xact_id = ANY (ARRAY(SELECT pg_snapshot_xip(m.snap))))
		FROM task_events.events e, public.marks m
		WHERE m.name = 'late' AND e.aggregate_id = '$inflight_task'}),
	't',
	'rule 1: the in-flight transaction was in progress in the registration\'s snapshot');

### Rule 6, first part: 'gone' dead-letters a poison event.
create_tasks($node, 1, 'poison', 'mallory');
ok( $node->poll_query_until(
		'postgres',
		q{SELECT dead_letters = 1 FROM task_events.handler_status WHERE handler = 'gone'}),
	'rule 6: the gone handler has a dead letter');

### Rule 3: pause under load, then resume.
$node->poll_query_until('postgres',
	q{SELECT count(*) >= 200 FROM public.seen WHERE handler = 'paused'})
  or die 'the paused handler does not run';
query(q{SELECT task_events.pause_handler('paused')});
workers_passed('after the pause');
my ($paused_seen, $paused_processed, $paused_behind, $pause_seq) = split /\|/, query(q{
	SELECT (SELECT count(*) FROM public.seen WHERE handler = 'paused'),
	       processed, events_behind, (SELECT max(seq) FROM task_events.events)
	FROM task_events.handler_status WHERE handler = 'paused'});
ok( $node->poll_query_until(
		'postgres', qq{
		SELECT (SELECT events_behind >= $paused_behind + 100
		        FROM task_events.handler_status WHERE handler = 'paused')
		   AND (SELECT last_seq >= $pause_seq + 100
		        FROM task_events.handler_state WHERE handler = 'audit')}),
	'rule 3: while paused, the handler falls behind and the workers go on with the others');
is( query(q{
		SELECT (SELECT count(*) FROM public.seen WHERE handler = 'paused')
		       || '|' || processed || '|' || paused || '|' || enabled
		FROM task_events.handler_status WHERE handler = 'paused'}),
	"$paused_seen|$paused_processed|true|false",
	'rule 3: a paused handler is called no more; handler_status shows it paused');
query(q{SELECT task_events.resume_handler('paused')});
my $resume_seq = query('SELECT max(seq) FROM task_events.events');
ok( $node->poll_query_until(
		'postgres', qq{
		SELECT EXISTS (SELECT FROM public.seen WHERE handler = 'paused' AND seq > $resume_seq)
		   AND NOT paused
		FROM task_events.handler_status WHERE handler = 'paused'}),
	'rule 3: resumed, the handler catches up with the events written meanwhile');

### Rule 4: replay under load.  The call, what the handler had handled when
# it returned (no batch of it can commit while the call's transaction holds
# its state row) and a snapshot taken after it, in one transaction.
$node->poll_query_until('postgres',
	q{SELECT count(*) >= 400 FROM public.seen WHERE handler = 'replayed'})
  or die 'the replayed handler does not run';
my $from_seq = query(q{
	SELECT seq FROM public.seen WHERE handler = 'replayed' ORDER BY seq DESC OFFSET 200 LIMIT 1});
query(qq{
	BEGIN;
	CREATE TABLE public.replay_call AS
		SELECT task_events.replay_handler('replayed', $from_seq) AS returned;
	CREATE TABLE public.replay_before AS SELECT seq FROM public.seen WHERE handler = 'replayed';
	INSERT INTO public.marks VALUES ('replay', pg_current_snapshot());
	COMMIT;
});
ok( $node->poll_query_until(
		'postgres', q{
		SELECT EXISTS (SELECT FROM public.seen s JOIN task_events.events e USING (seq), public.marks m
		               WHERE s.handler = 'replayed' AND m.name = 'replay'
		                 AND NOT pg_visible_in_snapshot(e.xact_id, m.snap))}),
	'rule 4: under load, the replayed handler goes on with the events committed after the call');

### Rule 5: rebuild_analytics while the analytics handler runs: between two
# rebuilds the handler has counted more events.
my $rebuilt = 0;
for my $i (1 .. 3)
{
	my $target = query('SELECT max(seq) + 50 FROM task_events.events');
	$node->poll_query_until(
		'postgres',
		"SELECT position >= $target FROM task_events.handler_status WHERE handler = 'analytics'")
	  or die 'the analytics handler does not run';
	my $n = query('SELECT task_events.rebuild_analytics()');
	cmp_ok($n, '>', $rebuilt,
		"rule 5: rebuild $i under load counts the events the handler counted since the last one ($n)");
	$rebuilt = $n;
}

# Readers see the old figures until the rebuild commits.  The analytics
# handler paused, its figures are saved, then corrupted for user_3.
query(q{SELECT task_events.pause_handler('analytics')});
workers_passed('after pausing analytics');
query(q{
	CREATE TABLE public.counters_before AS SELECT * FROM task_events.analytics_counters;
	CREATE TABLE public.stats_before AS SELECT * FROM task_events.completion_stats;
	UPDATE task_events.analytics_counters SET value = value + 1000 WHERE user_id = 'user_3';
	UPDATE task_events.completion_stats SET completed = completed + 1000 WHERE user_id = 'user_3';
});
# Differences between the figures read and the saved ones (plus $bump for
# user_3's counts), as lines.
my $DIFF_SQL = q{
	SELECT format('counter %s/%s: %s, expected %s', metric, user_id, c.value,
		b.value + CASE WHEN user_id = 'user_3' THEN %BUMP% ELSE 0 END)
	FROM task_events.analytics_counters c FULL JOIN public.counters_before b USING (metric, user_id)
	WHERE c.value IS DISTINCT FROM b.value + CASE WHEN user_id = 'user_3' THEN %BUMP% ELSE 0 END
	UNION ALL
	SELECT format('completion_stats %s: %s, expected %s', user_id, s, b)
	FROM task_events.completion_stats s FULL JOIN public.stats_before b USING (user_id)
	WHERE s.completed IS DISTINCT FROM b.completed + CASE WHEN user_id = 'user_3' THEN %BUMP% ELSE 0 END
	   OR s.total_seconds IS NULL OR b.total_seconds IS NULL
	   OR abs(s.total_seconds - b.total_seconds) > 1e-6 + 1e-9 * abs(b.total_seconds)
	   OR abs(s.min_seconds - b.min_seconds) > 1e-6
	   OR abs(s.max_seconds - b.max_seconds) > 1e-6
};
sub figures_differ
{
	my ($bump) = @_;
	(my $sql = $DIFF_SQL) =~ s/%BUMP%/$bump/g;
	my ($rc, $out, $err) = $node->psql('postgres', "SET lock_timeout = '60s';\n$sql");
	return $rc == 0 ? $out : "error: $err";
}
is(figures_differ(1000), '', 'rule 5: the corruption is what readers see');
my $counted_before = query('SELECT sum(value) FROM public.counters_before');
my $rebuild = $node->background_psql('postgres');
$rebuild->query_safe('BEGIN');
is($rebuild->query_safe('SELECT task_events.rebuild_analytics()'),
	$counted_before,
	'rule 5: rebuild_analytics returns the number of events the handler had counted');
is(figures_differ(1000), '',
	'rule 5: until the rebuild commits, readers see the old figures, all of them');
$rebuild->query_safe('COMMIT');
$rebuild->quit;
is(figures_differ(0), '',
	'rule 5: once it commits, readers see the figures the handler had counted, all of them');
query(q{SELECT task_events.resume_handler('analytics')});

### Rule 6: unregister 'gone' while a batch of it is in progress, in which
# it dead-letters a poison event.  The test holds the advisory lock the
# handler waits for in that batch until the unregister call waits too.
my $holder = $node->background_psql('postgres');
$holder->query_safe('SELECT pg_advisory_lock(4210)');
create_tasks($node, 1, 'poison block', 'mallory');
$node->poll_query_until(
	'postgres', q{
	SELECT count(*) = 1 FROM pg_stat_activity
	WHERE backend_type = 'task_events worker' AND wait_event = 'advisory'})
  or die 'the gone handler did not get to the poison block event';
my $log_pos = log_position($node);
my $unregister = $node->background_psql('postgres', on_error_stop => 0);
$unregister->query_until(qr/unregistering/,
	"\\echo unregistering\nSELECT task_events.unregister_handler('gone');\n");
$node->poll_query_until(
	'postgres', q{
	SELECT count(*) = 1 FROM pg_stat_activity
	WHERE query LIKE 'SELECT task_events.unregister_handler%' AND wait_event_type = 'Lock'})
  or die 'unregister_handler does not wait for the batch in progress';
$holder->query_safe('SELECT pg_advisory_unlock(4210)');
$holder->quit;
my (undef, $failed) = $unregister->query(q{SELECT 'done'});
is($failed ? $unregister->{stderr} : '', '',
	'rule 6: unregister_handler, called while a batch of the handler is in progress, succeeds');
$unregister->quit;
if (query(q{SELECT count(*) FROM task_events.handlers WHERE handler = 'gone'}) ne '0')
{
	note 'unregistering again, for the rest of the test';
	query(q{SELECT task_events.unregister_handler('gone')});
}
is( query(q{
		SELECT (SELECT count(*) FROM task_events.handlers WHERE handler = 'gone')
		    || '|' || (SELECT count(*) FROM task_events.handler_state WHERE handler = 'gone')
		    || '|' || (SELECT count(*) FROM task_events.dead_letters WHERE handler = 'gone')}),
	'0|0|0',
	'rule 6: the handler, its handler_state row and its dead letters are gone');
is(join(',', worker_loops_quietly($node, 2, 200, 'after unregister')),
	join(',', @pids), 'rule 6: the same workers go on');
my @errors = log_grep($node, $log_pos, qr/ERROR:/);
is(scalar(@errors), 0, 'rule 6: no ERROR in the log (neither the call nor a worker failed)');
diag(join("\n", @errors)) if @errors;

is(stop_pgbench($load), 0, 'the load ran');
wait_caught_up($node);

### The outputs, at rest.
# How many times each handler was called with each event (0: never).
query(q{
	CREATE TABLE public.times AS
	SELECT h.handler, e.seq, e.event_type, e.xact_id, count(s.n) AS times
	FROM task_events.events e
	CROSS JOIN unnest('{late,completed,paused,replayed}'::text[]) AS h(handler)
	LEFT JOIN public.seen s ON s.handler = h.handler AND s.seq = e.seq
	GROUP BY 1, 2, 3, 4;
});

# Rule 1.
my ($visible, $invisible) = split /\|/, query(q{
	SELECT count(*) FILTER (WHERE pg_visible_in_snapshot(t.xact_id, m.snap)),
	       count(*) FILTER (WHERE NOT pg_visible_in_snapshot(t.xact_id, m.snap))
	FROM public.times t, public.marks m WHERE t.handler = 'late' AND m.name = 'late'});
ok($visible > 0 && $invisible > 0,
	"rule 1: events on both sides of the registration ($visible before, $invisible after)");
is( query(q{
		SELECT count(*) FILTER (WHERE pg_visible_in_snapshot(t.xact_id, m.snap) AND t.times > 0)
		    || '|' || count(*) FILTER (WHERE NOT pg_visible_in_snapshot(t.xact_id, m.snap) AND t.times <> 1)
		FROM public.times t, public.marks m WHERE t.handler = 'late' AND m.name = 'late'}),
	'0|0',
	'rule 1: start_at now: no event committed before the registration, every later one exactly once');

# Rule 2.
is( query(q{
		SELECT count(*) FILTER (WHERE event_type <> 'TaskCompleted' AND times > 0)
		    || '|' || count(*) FILTER (WHERE event_type = 'TaskCompleted' AND times <> 1)
		    || '|' || (count(*) FILTER (WHERE event_type <> 'TaskCompleted') > 0)
		FROM public.times WHERE handler = 'completed'}),
	'0|0|true',
	'rule 2: event_types: only TaskCompleted events, each exactly once, though other types were written');
is( query(q{
		SELECT (SELECT count(*) FROM public.calls WHERE handler = 'completed' AND NOT events > 0)
		    || '|' || events_behind
		FROM task_events.handler_status WHERE handler = 'completed'}),
	'0|0',
	'rule 2: never called without an event, and not behind at the end');

# Rule 3.
is(query(q{SELECT count(*) FROM public.times WHERE handler = 'paused' AND times <> 1}),
	0, 'rule 3: paused and resumed, the handler got every event exactly once');

# Rule 4.
my ($returned, $twice) = split /\|/, query(q{
	SELECT (SELECT returned FROM public.replay_call),
	       (SELECT count(*) FROM public.times WHERE handler = 'replayed' AND times = 2)});
cmp_ok($twice, '>=', 200, "rule 4: the replay handed $twice events again (several batches)");
is($returned, $twice, 'rule 4: replay_handler returned the number of events handled again');
is( query(qq{
		SELECT count(*) FILTER (WHERE times NOT IN (1, 2))
		    || '|' || count(*) FILTER (WHERE times = 2 AND seq < $from_seq)
		    || '|' || count(*) FILTER (WHERE seq >= $from_seq AND times <> 2
		                                AND seq IN (SELECT seq FROM public.replay_before))
		    || '|' || count(*) FILTER (WHERE times <> 1 AND NOT pg_visible_in_snapshot(
		                                xact_id, (SELECT snap FROM public.marks WHERE name = 'replay')))
		FROM public.times WHERE handler = 'replayed'}),
	'0|0|0|0',
	'rule 4: every event handled before the call from from_seq on once more, none below it again, the later ones once'
);
is( query(q{
		WITH r AS (
			SELECT seq, n, aggregate_id, aggregate_version,
			       row_number() OVER (PARTITION BY seq ORDER BY n) AS k,
			       row_number() OVER (ORDER BY n) AS pos
			FROM public.seen WHERE handler = 'replayed'),
		again AS (SELECT *, lag(seq) OVER (ORDER BY n) AS prev_seq FROM r WHERE k = 2)
		SELECT (SELECT count(*) = max(pos) - min(pos) + 1 FROM again)
		    || '|' || (SELECT count(*) FROM again WHERE seq <= prev_seq)}),
	'true|0',
	'rule 4: the events handled again come in one run, in seq order');

# Per task, versions in increasing order: for every recording handler in
# what it handled the first time, and for the replayed one also in what it
# handled again.
is( query(q{
		SELECT string_agg(format('%s (%s): task %s version %s after version %s',
		                         handler, k, aggregate_id, aggregate_version, prev), '; ')
		FROM (SELECT *, lag(aggregate_version) OVER (PARTITION BY handler, k, aggregate_id ORDER BY n) AS prev
		      FROM (SELECT *, row_number() OVER (PARTITION BY handler, seq ORDER BY n) AS k
		            FROM public.seen) s) o
		WHERE aggregate_version <= prev}),
	'',
	'rules 1-4: per task, the versions were handled in increasing order (the replay included)');

# Rule 5 and the built-in handlers.
handlers_match($node, 'rule 5: the built-in handlers are exact after the rebuilds under load');
is( query('SELECT task_events.rebuild_analytics()'),
	query(q{SELECT count(*) FROM task_events.events WHERE event_type IN ('TaskCreated', 'TaskCompleted')}),
	'rule 5: at rest, rebuild_analytics counts every TaskCreated and TaskCompleted event');
handlers_match($node, 'rule 5: and the figures it leaves are exact');

is(join(',', worker_pids($node)), join(',', @pids), 'the workers were never restarted');

$node->stop;
done_testing();
