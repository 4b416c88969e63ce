# Rules protected here:
# - With shared_preload_libraries = 'task_events' one launcher runs
#   (backend_type 'task_events launcher', connected to no database), and in
#   each database that has the extension task_events.worker_count workers
#   (default 1), backend_type 'task_events worker', connected to it.
# - A committed create_task is handled by every built-in handler: its audit
#   row, its notification and its counter appear.
# - The GUC prefix task_events is reserved: an unknown task_events.* is an error.
# - Without the preload the write path works and events accumulate unhandled
#   (handler_status.events_behind counts them, nothing is written, no
#   task_events process runs); after a restart with the preload all of them
#   are handled, exactly once.
# - Preloaded but the extension created nowhere: only the launcher runs, no
#   worker starts, no error in the log; once the extension is created, its
#   database gets its workers (two here), which handle the events exactly.
# - task_events.database restricts service to the one database it names:
#   that database is served once it has the extension; another database that
#   has the extension gets no worker, its events stay behind, the launcher
#   logs why, and its handler_status.workers says so.
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
# not n (without n: the number of events of its types), as
# "handler=events_behind,..."; empty when all are as expected.
sub behind
{
	my ($node, $db, $n) = @_;
	# Without n: every event of the handler's types.
	my $expected = $n // q{(SELECT count(*) FROM task_events.events e
	                         WHERE h.event_types IS NULL OR e.event_type = ANY (h.event_types))};
	return $node->safe_psql(
		$db, qq{
		SELECT string_agg(b.handler || '=' || coalesce(s.events_behind::text, 'missing'), ','
		                  ORDER BY b.handler)
		FROM (SELECT handler FROM task_events.handlers
		      UNION SELECT unnest('{analytics,audit,notification}'::text[])) b
		LEFT JOIN task_events.handlers h USING (handler)
		LEFT JOIN task_events.handler_status s USING (handler)
		WHERE s.events_behind IS DISTINCT FROM $expected});
}

###
### Without the preload: the write path works, nothing is handled.
###
my $node = te_node('plain', preload => 0);
$node->safe_psql('postgres', $WRITES);

is(te_processes($node), '', 'no task_events process (launcher or worker) without the preload');
my $n_events = $node->safe_psql('postgres', 'SELECT count(*) FROM task_events.events');
# 15 TaskCreated, 4 started, 4 x (StatusChanged + Completed), 2 cancelled
is($n_events, 15 + 4 + 8 + 2, 'the write path works without the preload');
is(behind($node, 'postgres'), '',
	'without the preload every handler is behind by every event of its types');
is( $node->safe_psql(
		'postgres', q{
		SELECT (SELECT count(*) FROM task_events.audit_log)
		     + (SELECT count(*) FROM task_events.notifications)
		     + (SELECT count(*) FROM task_events.analytics_counters)
		     + (SELECT count(*) FROM task_events.completion_stats)}),
	0,
	'without the preload nothing is handled');
is( $node->safe_psql('postgres', 'SELECT DISTINCT workers FROM task_events.handler_status'),
	'unserved: the library is not preloaded (shared_preload_libraries)',
	'without the preload handler_status.workers says the library is not preloaded');

###
### Restart with the preload: the backlog is handled exactly once.
###
$node->append_conf('postgresql.conf', $TaskEventsTest::PRELOAD);
$node->restart;
my @pids = wait_for_workers_in($node, 1, 'postgres');
is(te_processes($node), "task_events launcher/(none)\ntask_events worker/postgres",
	'one launcher, in no database, and one worker, in database postgres');
is( $node->safe_psql(
		'postgres',
		"SELECT application_name FROM pg_stat_activity WHERE backend_type = 'task_events launcher'"),
	'task_events launcher',
	'the launcher says what it is in application_name');
is($node->safe_psql('postgres', 'SELECT DISTINCT workers FROM task_events.handler_status'),
	'running', 'handler_status.workers says the workers are running');
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
### Preloaded, two workers, but the extension created nowhere: only the
### launcher runs; once the extension is created, two workers handle events.
###
my $quiet = te_node(
	'no_extension',
	extension => 0,
	conf => "task_events.worker_count = 2\ntask_events.poll_interval = 100ms");
ok(log_appears($quiet, qr/LOG:  task_events launcher started/, 0), 'the launcher logs that it started');
my $launcher = launcher_loops_quietly($quiet, 700, 'no extension');
is(te_processes($quiet), 'task_events launcher/(none)',
	'no extension anywhere: the launcher runs, in no database, and no worker');
is(scalar(log_grep($quiet, 0, qr/LOG:  task_events worker/)), 0, 'no extension anywhere: no worker ever started');
my @bad = log_grep($quiet, 0, qr/\b(ERROR|FATAL|PANIC):|exited with exit code/);
is_deeply(\@bad, [], 'no error in the log while the extension is missing');

# Once the extension exists, its database gets two workers.
my $offset = log_position($quiet);
$quiet->safe_psql('postgres', 'CREATE EXTENSION task_events');
ok(workers_in_are($quiet, 2, 'postgres'),
	'worker_count = 2: two workers start in postgres once the extension is created there');
my @qpids = workers($quiet, 'postgres');
is_deeply(
	[ sort map { s/.*LOG:  //r } log_grep($quiet, $offset, qr/LOG:  task_events worker \d+ started/) ],
	[
		'task_events worker 1 started in database "postgres" as role "postgres"',
		'task_events worker 2 started in database "postgres" as role "postgres"'
	],
	'worker_count = 2: workers 1 and 2 log that they started in postgres, once each');
$quiet->safe_psql('postgres', $WRITES);
wait_caught_up($quiet);
handlers_match($quiet, 'two workers: handlers exact once the extension exists');
is($quiet->safe_psql('postgres', 'SELECT count(*) FROM task_events.audit_log'),
	$n_events, 'two workers: one audit row per event');
is_deeply([ workers($quiet) ], \@qpids, 'the two workers did not restart while handling events');
is($quiet->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'task_events launcher'"),
	$launcher, 'the launcher was not restarted');
@bad = log_grep($quiet, 0, qr/\b(ERROR|FATAL|PANIC):|exited with exit code/);
is_deeply(\@bad, [], 'no error in the log after the extension was created');

###
### task_events.database = 'app': only app is served, once it has the
### extension; postgres, which has it, is not, and says so.
###
$quiet->safe_psql('postgres', 'CREATE DATABASE app');
$quiet->append_conf('postgresql.conf',
	"task_events.database = 'app'\ntask_events.worker_count = 1");
# The log from the start on (the shutdown's lines are the old server's).
$quiet->stop;
$offset = log_position($quiet);
$quiet->start;
launcher_loops_quietly($quiet, 700, 'task_events.database = app');
is(te_processes($quiet), 'task_events launcher/(none)',
	'task_events.database = app, app without the extension: no worker anywhere, postgres included');
my $EXCLUDED =
  qr/LOG:  task_events launcher: database "postgres" has the extension but is not served: task_events.database is "app"/;
is(scalar(log_grep($quiet, $offset, $EXCLUDED)), 1,
	'the launcher logs once that postgres has the extension but is not served');
is($quiet->safe_psql('postgres', 'SELECT DISTINCT workers FROM task_events.handler_status'),
	'unserved: task_events.database is "app"',
	'postgres: handler_status.workers says task_events.database leaves it unserved');

$quiet->safe_psql('app', 'CREATE EXTENSION task_events');
ok(workers_in_are($quiet, 1, 'app'),
	'task_events.database = app: one worker, in database app, once it has the extension');
$quiet->safe_psql('app', $WRITES);
create_tasks($quiet, 3, 'not handled here');
wait_caught_up($quiet, 'app');
handlers_match($quiet, 'database app: handlers exact', db => 'app');
is($quiet->safe_psql('app', 'SELECT count(*) FROM task_events.audit_log'),
	$n_events, 'database app: one audit row per event');
is($quiet->safe_psql('app', 'SELECT DISTINCT workers FROM task_events.handler_status'),
	'running', 'database app: handler_status.workers says running');
launcher_loops_quietly($quiet, 500, 'app served');
is(te_processes($quiet), "task_events launcher/(none)\ntask_events worker/app",
	'database postgres gets no worker, even once app is served');
is(behind($quiet, 'postgres', 3), '',
	'database postgres: new events are not handled');
is(scalar(log_grep($quiet, $offset, qr/LOG:  task_events worker \d+ started in database "postgres"/)),
	0, 'no worker started in postgres since the restart');
is_deeply([ log_grep($quiet, $offset, qr/\b(ERROR|FATAL|PANIC):|exited with exit code/) ],
	[], 'task_events.database = app: no error in the log');
$quiet->stop;

done_testing();
