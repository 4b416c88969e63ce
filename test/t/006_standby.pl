# Rules protected here: a streaming standby with the library preloaded runs
# no task_events worker (handlers write; a standby is read-only) and gets the
# handlers' output by replication from the primary, whose workers handle the
# events; once promoted, it starts its worker and handles new events, going
# on exactly from where the primary's handlers were.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

my $WRITES = q{
SELECT FROM generate_series(1, 20) i, task_events.create_task('user' || i % 3, 'task ' || i);
SELECT FROM task_events.tasks t, task_events.complete_task(t.task_id)
  WHERE t.status = 'pending' AND t.title LIKE '%5';
};

my $primary = te_node('primary', init => { allows_streaming => 1 });
wait_for_workers($primary, 1, 'on the primary');
$primary->safe_psql('postgres', $WRITES);
$primary->backup('backup');

my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'backup', has_streaming => 1);
# The backup carries the primary's postgresql.conf; say it anyway.
$standby->append_conf('postgresql.conf', $TaskEventsTest::PRELOAD);
$standby->start;

# Events written on the primary now, handled there, replicate.
$primary->safe_psql('postgres', $WRITES);
wait_caught_up($primary);
handlers_match($primary, 'primary: handlers exact');
$primary->wait_for_catchup($standby);

is($standby->safe_psql('postgres', 'SELECT pg_is_in_recovery()'), 't', 'the standby is in recovery');
is($standby->safe_psql('postgres', 'SHOW shared_preload_libraries'),
	'task_events', 'the standby preloads task_events');
is(scalar(worker_pids($standby)), 0, 'no task_events worker on the standby');
is( $standby->safe_psql('postgres', 'SELECT count(*) FROM task_events.audit_log'),
	$primary->safe_psql('postgres', 'SELECT count(*) FROM task_events.events'),
	'the standby has the audit rows of every event, by replication');
handlers_match($standby, 'standby: the replicated handler outputs are exact');
is( $standby->safe_psql('postgres',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'task_events launcher'}),
	0, 'no task_events launcher on the standby');
my @lines = grep { !/LOG:  statement:/ && /task_events (worker|launcher)|\b(ERROR|FATAL|PANIC):/ }
  split /\n/, log_since($standby, 0);
is_deeply(\@lines, [], 'the standby log shows no launcher or worker start and no error');

# Failover: the primary goes away, the standby is promoted.
$primary->stop;
$standby->promote;
is($standby->safe_psql('postgres', 'SELECT pg_is_in_recovery()'), 'f', 'the standby is promoted');
my @pids = wait_for_workers($standby, 1, 'after promotion');
is(scalar(@pids), 1, 'the promoted standby starts its worker');

$standby->safe_psql('postgres', $WRITES);
wait_caught_up($standby);
handlers_match($standby, 'promoted: new events handled, nothing lost or doubled');
is( $standby->safe_psql(
		'postgres',
		q{SELECT count(*) FROM task_events.audit_log a JOIN task_events.events e USING (event_id)}),
	$standby->safe_psql('postgres', 'SELECT count(*) FROM task_events.events'),
	'promoted: one audit row per event, old and new');

$standby->stop;
done_testing();
