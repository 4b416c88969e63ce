# Rule protected here: under a sustained write load with random rollbacks
# and savepoints, killing the workers again and again (SIGTERM, and SIGKILL,
# which crash-restarts the whole server) loses nothing and doubles nothing:
# once the load stops and the handlers catch up, what they wrote is exactly
# what the event log implies, with no dead letter and no failure but the
# batches lost with the workers killed in a handler call.
#
# TE_SOAK_SECONDS sets the length of the load (default 20 s, what
# scripts/test.sh runs); scripts/soak.sh runs it for 10 minutes at 16
# clients.  TE_SOAK_CLIENTS sets the clients (default 8).
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use TaskEventsTest;

my $seconds = $ENV{TE_SOAK_SECONDS} // 20;
my $clients = $ENV{TE_SOAK_CLIENTS} // 8;

my $node = te_node(
	'soak',
	conf => "restart_after_crash = on\n"
	  . "max_connections = " . ($clients + 20) . "\n"
	  . "task_events.worker_count = 2\n"
	  # A kill in a handler call counts an attempt: none may dead-letter.
	  . "task_events.max_attempts = 1000\n"
	  . "task_events.retry_delay = 10ms");
wait_for_workers($node, 2);

my $load = start_pgbench_loop($node, clients => $clients, seconds => 5);
my $deadline = time() + $seconds;
my ($sigterms, $sigkills) = (0, 0);
srand($ENV{TE_SOAK_SEED} // 42);

sub audit_count
{
	return $node->safe_psql('postgres', 'SELECT count(*) FROM task_events.audit_log');
}

while (time() < $deadline)
{
	# Let the workers run for a random while, then kill one of them.
	my $before = audit_count();
	$node->poll_query_until('postgres', "SELECT count(*) > $before FROM task_events.audit_log")
	  or die 'the workers made no progress';
	select(undef, undef, undef, 0.2 + rand(1.5));
	my @pids = worker_pids($node);
	next unless @pids;
	my $victim = $pids[ int(rand(@pids)) ];
	if (rand() < 0.75)
	{
		$node->safe_psql('postgres', "SELECT pg_terminate_backend($victim)");
		$sigterms++;
	}
	else
	{
		kill('KILL', $victim);
		$sigkills++;
	}
	# Both workers back (after a SIGKILL, after the crash restart).
	$node->poll_query_until(
		'postgres', qq{
		SELECT count(*) = 2 AND bool_and(pid <> $victim) FROM pg_stat_activity
		WHERE backend_type = 'task_events worker'})
	  or die "the workers did not come back after killing $victim";
}

stop_pgbench($load);
note $load->{out};
cmp_ok($sigterms + $sigkills, '>', 0,
	"the workers were killed during the load ($sigterms SIGTERM, $sigkills SIGKILL in $seconds s)");

wait_caught_up($node);
my ($events, $committed_tasks) = split /\|/,
  $node->safe_psql('postgres',
	'SELECT (SELECT count(*) FROM task_events.events), (SELECT count(*) FROM task_events.tasks)');
diag "soak: $seconds s, $clients clients, $events events, $committed_tasks tasks, "
  . "$sigterms SIGTERM, $sigkills SIGKILL";
cmp_ok($events, '>', 0, 'the load wrote events');
handlers_match_after_kills($node, 'after the soak: every handler output is exactly what the log implies');

$node->stop;
done_testing();
