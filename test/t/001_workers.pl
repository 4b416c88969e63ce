# Rules protected here:
# - With shared_preload_libraries = 'task_events' the background workers run:
#   task_events.worker_count of them (default 1), backend_type
#   'task_events worker', connected to task_events.database (postgres).
# - A committed create_task is handled by every built-in handler: its audit
#   row, its notification and its counter appear.
# - The GUC prefix task_events is reserved: an unknown task_events.* is an error.
# - Without the preload the write path works and events accumulate unhandled
#   (handler_status.events_behind counts them, nothing is written); after a
#   restart with the preload all of them are handled, exactly once.
# - Preloaded but the extension not created: the workers wait quietly (no
#   ERROR in the log, no restart), and handle events once it is created.
# - task_events.database names the one database the workers handle.
# Also prints (diag, not an assertion) the commit-to-audit-row latency of a
# few single create_task calls on an idle server.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use TaskEventsTest;

# Tasks in every state, some with several events in one transaction.
my $WRITES = q{
SELECT FROM generate_series(1, 10) i, task_events.create_task('alice', 'a' || i);
SELECT FROM generate_series(1, 5) i, task_events.create_task('bob', 'b' || i);
BEGIN;
SELECT FROM task_events.tasks t, task_events.update_status(t.task_id, 'in_progress')
  WHERE t.title IN ('a1', 'a2', 'a3', 'b1');
SELECT FROM task_events.tasks t, task_events.complete_task(t.task_id)
  WHERE t.title IN ('a1', 'a2', 'a4', 'b2');
COMMIT;
SELECT FROM task_events.tasks t, task_events.update_status(t.task_id, 'cancelled')
  WHERE t.title IN ('a5', 'b3');
BEGIN;
SELECT FROM task_events.create_task('carol', 'rolled back');
ROLLBACK;
};

# The handlers (built-in ones always, others if any) whose events_behind is
# not n, as "handler=events_behind,..."; empty when all are at n.
sub behind
{
	my ($node, $db, $n) = @_;
	return $node->safe_psql(
		$db, qq{
		SELECT string_agg(b.handler || '=' || coalesce(s.events_behind::text, 'missing'), ','
		                  ORDER BY b.handler)
		FROM (SELECT handler FROM task_events.handlers
		      UNION SELECT unnest('{analytics,audit,notification}'::text[])) b
		LEFT JOIN task_events.handler_status s USING (handler)
		WHERE s.events_behind IS DISTINCT FROM $n});
}

###
### Without the preload: the write path works, nothing is handled.
###
my $node = te_node('plain', preload => 0);
$node->safe_psql('postgres', $WRITES);

is(scalar(worker_pids($node)), 0, 'no task_events worker without the preload');
my $n_events = $node->safe_psql('postgres', 'SELECT count(*) FROM task_events.events');
# 15 TaskCreated, 4 started, 4 x (StatusChanged + Completed), 2 cancelled
is($n_events, 15 + 4 + 8 + 2, 'the write path works without the preload');
is(behind($node, 'postgres', $n_events), '',
	'without the preload every handler is behind by every event');
is( $node->safe_psql(
		'postgres', q{
		SELECT (SELECT count(*) FROM task_events.audit_log)
		     + (SELECT count(*) FROM task_events.notifications)
		     + (SELECT count(*) FROM task_events.analytics_counters)
		     + (SELECT count(*) FROM task_events.completion_stats)}),
	0,
	'without the preload nothing is handled');

###
### Restart with the preload: the backlog is handled exactly once.
###
$node->append_conf('postgresql.conf', $TaskEventsTest::PRELOAD);
$node->restart;
my @pids = wait_for_workers($node, 1, 'after restart with the preload');
is( $node->safe_psql(
		'postgres',
		"SELECT backend_type || '/' || datname FROM pg_stat_activity WHERE pid = $pids[0]"),
	'task_events worker/postgres',
	'one worker, backend_type "task_events worker", in database postgres');
wait_caught_up($node);
handlers_match($node, 'the backlog is handled exactly once after the restart');
is($node->safe_psql('postgres', 'SELECT count(*) FROM task_events.audit_log'),
	$n_events, 'one audit row per event of the backlog');

# The GUC prefix is reserved.
my ($ret, $out, $err) = $node->psql('postgres', 'SET task_events.nonexistent = 1');
isnt($ret, 0, 'SET task_events.nonexistent fails');
like($err, qr/invalid configuration parameter name "task_events\.nonexistent"/,
	'... because the prefix task_events is reserved');

# A single committed create_task is handled by the running worker.
my $task = $node->safe_psql('postgres',
	"SELECT task_id FROM task_events.create_task('dave', 'one task')");
ok( $node->poll_query_until(
		'postgres', qq{
		SELECT EXISTS (SELECT FROM task_events.audit_log a
		               JOIN task_events.events e USING (event_id)
		               WHERE e.aggregate_id = '$task' AND a.event_type = 'TaskCreated')
		   AND EXISTS (SELECT FROM task_events.notifications
		               WHERE user_id = 'dave' AND message = 'New task created: one task')
		   AND EXISTS (SELECT FROM task_events.analytics_counters
		               WHERE metric = 'tasks_created' AND user_id = 'dave' AND value = 1)}),
	'a committed create_task gets its audit row, notification and counter');
wait_caught_up($node);
handlers_match($node, 'handlers exact after a single create_task');

# Measure (not assert) the commit-to-audit-row latency on this idle server:
# the commit happens between t0 (COMMIT sent) and t1 (COMMIT answered).
my $session = $node->background_psql('postgres');
$session->set_query_timer_restart;
my (@upper, @lower);
for my $i (1 .. 5)
{
	$session->query_safe('BEGIN');
	my $id = $session->query_safe(
		"SELECT task_id FROM task_events.create_task('latency', 'latency $i')");
	my $t0 = time;
	$session->query_safe('COMMIT');
	my $t1 = time;
	my $q = qq{SELECT extract(epoch FROM a.recorded_at) FROM task_events.audit_log a
		JOIN task_events.events e USING (event_id) WHERE e.aggregate_id = '$id'};
	$node->poll_query_until('postgres', "SELECT EXISTS ($q)")
	  or die "no audit row for latency task $i";
	my $recorded = $node->safe_psql('postgres', $q);
	push @upper, ($recorded - $t0) * 1000;
	push @lower, ($recorded - $t1) * 1000;
}
$session->quit;
my @s = sort { $a <=> $b } @upper;
diag(
	sprintf(
		'commit-to-audit-row latency, idle server, %d single create_task calls: '
		  . 'median %.2f ms (min %.2f, max %.2f) after COMMIT was sent; '
		  . 'median %.2f ms after it was answered',
		scalar(@s), $s[$#s / 2], $s[0], $s[-1], (sort { $a <=> $b } @lower)[$#lower / 2]));

$node->stop;

###
### Preloaded, two workers, but no extension yet: they wait quietly.
###
my $quiet = te_node(
	'no_extension',
	extension => 0,
	conf => "task_events.worker_count = 2\ntask_events.poll_interval = 100ms");
ok( $quiet->poll_query_until(
		'postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'task_events%'", 2),
	'worker_count = 2: two workers run');
my @qpids = worker_pids($quiet);
is( $quiet->safe_psql(
		'postgres', q{
		SELECT count(DISTINCT pid) FROM pg_stat_activity
		WHERE backend_type = 'task_events worker' AND datname = 'postgres'}),
	2,
	'worker_count = 2: two workers in database postgres');

# Let the workers go round their loop for a while (at the 100 ms poll
# interval, several times): each round ends with a state change.
my $mark = $quiet->safe_psql('postgres', 'SELECT now()');
ok( $quiet->poll_query_until(
		'postgres', qq{
		SELECT count(*) = 2 FROM pg_stat_activity
		WHERE backend_type = 'task_events worker'
		  AND state_change > '$mark'::timestamptz + interval '700 ms'}),
	'the workers keep looping without the extension');
is_deeply([ worker_pids($quiet) ], \@qpids,
	'the workers did not exit while the extension was missing');
my $log = log_since($quiet, 0);
my @bad = grep { /\b(ERROR|FATAL|PANIC):|exited with exit code/ } split /\n/, $log;
is_deeply(\@bad, [], 'no error in the log while the extension is missing');

# Once the extension exists, events are handled.
$quiet->safe_psql('postgres', 'CREATE EXTENSION task_events');
$quiet->safe_psql('postgres', $WRITES);
wait_caught_up($quiet);
handlers_match($quiet, 'two workers: handlers exact once the extension exists');
is($quiet->safe_psql('postgres', 'SELECT count(*) FROM task_events.audit_log'),
	$n_events, 'two workers: one audit row per event');
is_deeply([ worker_pids($quiet) ], \@qpids, 'the two workers did not restart while handling events');
@bad = grep { /\b(ERROR|FATAL|PANIC):|exited with exit code/ }
  split /\n/, log_since($quiet, 0);
is_deeply(\@bad, [], 'no error in the log after the extension was created');

# task_events.database: the workers run in the database it names, only there.
$quiet->safe_psql('postgres', 'CREATE DATABASE app');
$quiet->append_conf('postgresql.conf',
	"task_events.database = 'app'\ntask_events.worker_count = 1");
$quiet->restart;
ok( $quiet->poll_query_until(
		'postgres', q{
		SELECT count(*) = 1 AND bool_and(datname = 'app') FROM pg_stat_activity
		WHERE backend_type = 'task_events worker'}),
	'task_events.database = app: one worker, in database app');
$quiet->safe_psql('app', 'CREATE EXTENSION task_events');
$quiet->safe_psql('app', $WRITES);
create_tasks($quiet, 3, 'not handled here');
wait_caught_up($quiet, 'app');
handlers_match($quiet, 'database app: handlers exact', db => 'app');
is($quiet->safe_psql('app', 'SELECT count(*) FROM task_events.audit_log'),
	$n_events, 'database app: one audit row per event');
is(behind($quiet, 'postgres', 3), '',
	'database postgres: new events are no longer handled');
$quiet->stop;

done_testing();
