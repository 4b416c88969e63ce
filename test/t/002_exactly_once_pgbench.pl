# Rules protected here: under a concurrent write load (pgbench, several
# clients; tasks created and moved in multi-call transactions; some
# transactions and some savepoints rolled back; transactions committing out
# of seq order), every committed event is handled exactly once by every
# built-in handler, in per-task version order, and nothing of a rolled-back
# transaction or savepoint is ever handled:
# - audit_log = events (event_id set, seq, event_type, event_data = payload,
#   occurred_at), recorded in version order per task;
# - notifications = one per TaskCreated / TaskCompleted, right message and
#   user_id, notification_id increasing with the version per task;
# - analytics_counters = the per-user counts of the log;
# - completion_stats = per-user count, sum, min and max of the seconds from
#   TaskCreated to TaskCompleted;
# - no failure and no dead letter for the built-in handlers.
# Two workers share the handlers and batches are small (batch_size = 50), so
# windows span several batches.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

my $node = te_node(
	'pgbench',
	conf => "task_events.worker_count = 2\n"
	  . "task_events.batch_size = 50\n"
	  . "max_connections = 40\n"
	  . "track_commit_timestamp = on");
wait_for_workers($node, 2);

my $load = start_pgbench($node, clients => 4, seconds => 15);
# While the load runs, the handlers make progress (they do not wait for the
# writers to stop).
ok( $node->poll_query_until(
		'postgres',
		"SELECT count(*) >= 500 FROM task_events.audit_log"),
	'the handlers work while the load runs');
my $rc = stop_pgbench($load);
is($rc, 0, 'pgbench ran without error');
like($load->{out}, qr/number of failed transactions: 0\b/,
	'no pgbench transaction failed')
  if $load->{out} =~ /number of failed transactions/;

wait_caught_up($node);

my ($events, $tasks, $attempts, $savepoint_attempts, $rolled_back_events) =
  split /\|/, $node->safe_psql(
	'postgres', q{
	SELECT (SELECT count(*) FROM task_events.events),
	       (SELECT count(*) FROM task_events.tasks),
	       (SELECT last_value FROM public.attempts),
	       (SELECT count(*) FROM task_events.events
	        WHERE payload ->> 'task_title' LIKE 'savepoint rolled back%'),
	       (SELECT last_value FROM task_events.events_seq_seq)
	         - (SELECT count(*) FROM task_events.events)});
note "events $events, tasks $tasks, tasks attempted $attempts";
cmp_ok($events, '>', 1000, 'the load wrote a fair number of events');
cmp_ok($attempts, '>', $tasks,
	'some tasks were attempted in rolled-back transactions or savepoints');
cmp_ok($rolled_back_events, '>', 0,
	'some events were written and rolled back (gaps in seq)');
is($savepoint_attempts, 0, 'no event of a rolled-back savepoint is in the log');
cmp_ok(
	$node->safe_psql(
		'postgres',
		"SELECT count(*) FROM task_events.tasks WHERE status = 'completed'"),
	'>', 0,
	'some tasks were completed');

# What makes the test meaningful: commits out of seq order, and tasks moved
# by a later transaction than the one that created them.
cmp_ok(
	$node->safe_psql(
		'postgres', q{
		SELECT count(*) FROM (
			SELECT pg_xact_commit_timestamp(xid(xact_id)) AS committed,
			       max(pg_xact_commit_timestamp(xid(xact_id)))
			         OVER (ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before
			FROM task_events.events) e
		WHERE committed < before}),
	'>', 0,
	'some transactions committed after a transaction with a higher seq');
cmp_ok(
	$node->safe_psql(
		'postgres', q{
		SELECT count(*) FROM task_events.events d JOIN task_events.events c
		  ON c.aggregate_id = d.aggregate_id AND c.aggregate_version = 1
		WHERE d.event_type = 'TaskCompleted' AND d.xact_id <> c.xact_id}),
	'>', 0,
	'some tasks were completed by a later transaction');

handlers_match($node, 'handler outputs are exactly what the event log implies');
is( $node->safe_psql(
		'postgres', q{
		SELECT count(*) FROM task_events.audit_log
		WHERE event_data ->> 'task_title' LIKE 'savepoint rolled back%'}),
	0,
	'nothing of a rolled-back savepoint was handled');

$node->stop;
done_testing();
