# Rules protected here: the workers come back by themselves, and nothing is
# lost or handled twice, whatever kills them under a write load:
# (a) SIGTERM (pg_terminate_backend): the postmaster restarts the worker;
# (b) SIGKILL: the postmaster crash-restarts the server and the worker with it;
# (c) an immediate shutdown followed by a start.
# After each, the new worker makes progress; after the load, every handler
# catches up and the handlers' output is exactly what the event log implies
# (no missing and no doubled row; no dead letter: a replayed batch would hit
# the UNIQUE event_id of audit_log / notifications).  A worker killed in a
# handler call counts a failed attempt of that call (a lost batch); the
# immediate shutdown counts none.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

my $node = te_node(
	'crash',
	conf => "restart_after_crash = on\n"
	  . "max_connections = 40\n"
	  # A kill in a handler call counts an attempt: none may dead-letter.
	  . "task_events.max_attempts = 1000\n"
	  . "task_events.retry_delay = 10ms");
my ($pid) = wait_for_workers($node, 1);

my $load = start_pgbench_loop($node, clients => 3, seconds => 2);

# Poll until the handlers have handled more than $n audit rows (the load
# runs and the worker works).
sub progress_past
{
	my ($n, $what) = @_;
	ok( $node->poll_query_until(
			'postgres',
			"SELECT count(*) > $n FROM task_events.audit_log"),
		"the worker makes progress $what");
}

sub audit_count
{
	return $node->safe_psql('postgres', 'SELECT count(*) FROM task_events.audit_log');
}

# A new worker, not $old, is running; returns its pid.
sub new_worker
{
	my ($old, $what) = @_;
	ok( $node->poll_query_until(
			'postgres', qq{
			SELECT count(*) = 1 AND bool_and(pid <> $old) FROM pg_stat_activity
			WHERE backend_type = 'task_events worker'}),
		"a new worker runs $what");
	my ($new) = worker_pids($node);
	return $new;
}

progress_past(200, 'under the load');

# Each kind of kill three times: the more often, the likelier one lands in
# the middle of a batch (or between a batch's commit and its WAL flush: the
# workers commit asynchronously).
for my $round (1 .. 3)
{
	# (a) SIGTERM
	my $before = audit_count();
	$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)");
	$pid = new_worker($pid, "after SIGTERM ($round)");
	progress_past($before + 200, "after SIGTERM ($round)");

	# (b) SIGKILL: the postmaster treats it as a crash and reinitializes.
	my $log_offset = log_position($node);
	$before = audit_count();
	is(kill('KILL', $pid), 1, "SIGKILL sent to worker $pid ($round)");
	$pid = new_worker($pid, "after SIGKILL ($round)");
	my $log = log_since($node, $log_offset);
	like(
		$log,
		qr/background worker "task_events worker" \(PID \d+\) was terminated by signal 9/,
		"the postmaster saw the SIGKILL ($round)");
	like($log, qr/all server processes terminated; reinitializing/,
		"... and crash-restarted the server ($round)");
	progress_past($before + 200, "after the crash restart ($round)");

	# (c) immediate shutdown, then start
	$before = audit_count();
	$node->stop('immediate');
	$node->start;
	$pid = new_worker($pid, "after an immediate stop and a start ($round)");
	progress_past($before + 200, "after the immediate stop and start ($round)");
}

stop_pgbench($load);
note $load->{out};

wait_caught_up($node);
my ($events, $tasks) = split /\|/,
  $node->safe_psql('postgres',
	'SELECT (SELECT count(*) FROM task_events.events), (SELECT count(*) FROM task_events.tasks)');
note "events $events, tasks $tasks";
handlers_match_after_kills($node,
	'after SIGTERM, SIGKILL and immediate stop: nothing lost, nothing doubled');

$node->stop;
done_testing();
