# Rules protected here: a restored log is never silently behind.
# A clone made by pg_basebackup shares the source's system identifier but its
# transaction counter stops where the backup was taken.  A dump of the source
# taken later, restored into the clone, holds transaction ids (events.xact_id,
# the handlers' positions) that the clone has not reached: events written
# there would get ids the restored positions count as handled.
# - Until task_events.adopt_restored_log() runs, create_task and
#   process_pending() refuse with 55000 "the task_events event log holds
#   transaction ids this cluster has not reached" (each in a new session: the
#   check is made once per backend), writing nothing, and a worker serving
#   the database logs that error at each round instead of handling: no
#   handler position moves, not even for the backlog the dump carries.
# - adopt_restored_log() rewrites the ids (returns > 0, then 0); after it the
#   workers handle the restored backlog and every new event exactly once, and
#   no event handled before the dump is handled again (handlers_match, audit
#   rows = events, each handler's processed grows by exactly its backlog and
#   the new events).
# - Control: the same dump restored where the counter is ahead (the source
#   cluster itself, in a new database) is accepted without adoption
#   (create_task works, adopt_restored_log() returns 0).
# - A native log is never taken for a restored one: under concurrent writes,
#   neither process_pending() nor the worker raises that error.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

# The workers serve postgres only (until the test points them at the
# restored database): no worker races pg_restore.
my $CONF = "task_events.database = 'postgres'\ntask_events.poll_interval = 100ms";
my $IN_FUTURE =
  qr/the task_events event log holds transaction ids this cluster has not reached/;

sub writes
{
	my ($node, $db, $tag) = @_;
	$node->safe_psql(
		$db, qq{
		SELECT FROM generate_series(1, 15) i, task_events.create_task('user' || i % 4, '$tag ' || i);
		SELECT FROM task_events.tasks t, task_events.complete_task(t.task_id)
		  WHERE t.title IN ('$tag 3', '$tag 5', '$tag 8');
		SELECT FROM task_events.tasks t, task_events.update_status(t.task_id, 'cancelled')
		  WHERE t.title = '$tag 7';});
	return;
}

# Burn n transaction ids (one autocommit statement each: a DO block or one
# statement would use one id).
sub burn_xids
{
	my ($node, $n) = @_;
	$node->safe_psql('postgres', "SELECT pg_current_xact_id();\n" x $n);
	return;
}

sub next_xid
{
	my ($node, $db) = @_;
	return $node->safe_psql($db // 'postgres', 'SELECT pg_snapshot_xmax(pg_current_snapshot())');
}

# Each handler's processed count, as handler => count.
sub processed
{
	my ($node, $db) = @_;
	return {
		map { split /\|/ } split /\n/,
		$node->safe_psql($db, 'SELECT handler, processed FROM task_events.handler_state')
	};
}

my $STATE = q{SELECT string_agg(s::text, E'\n' ORDER BY handler) FROM task_events.handler_state s};
my $OUTPUTS = q{SELECT (SELECT count(*) FROM task_events.audit_log) || '/'
	|| (SELECT count(*) FROM task_events.notifications) || '/'
	|| (SELECT coalesce(sum(value), 0) FROM task_events.analytics_counters)};

###
### The source A, and a clone of it taken now.
###
my $a = te_node('source', conf => $CONF, init => { allows_streaming => 1 });
wait_for_workers($a, 1);
writes($a, 'postgres', 'before clone');
wait_caught_up($a);
$a->backup('clone');

###
### A goes on: a native log under concurrent writes is never refused.
###
# Writers commit many short transactions (pgbench, create_task only) while
# a session calls process_pending() over and over: the check compares the
# log with the snapshot it runs in, whatever commits meanwhile.
my @a_workers = worker_pids($a);
my $offset = log_position($a);
my $script = $a->basedir . '/create_task.sql';
PostgreSQL::Test::Utils::append_to_file($script,
	"SELECT task_events.create_task('load' || :client_id, 'load');\n");
my ($pgb_out, $pgb_err) = ('', '');
my $pgb = IPC::Run::start(
	[
		'pgbench', '-n', '-h', $a->host, '-p', $a->port, '-c', 4, '-j', 2,
		'-T', 6, '-f', $script, 'postgres'
	],
	'>', \$pgb_out, '2>', \$pgb_err);
$a->poll_query_until('postgres',
	q{SELECT count(*) > 100 FROM task_events.events WHERE payload ->> 'task_title' = 'load'})
  or die 'the pgbench load wrote nothing';
my ($rc, $out, $err);
my ($calls, @refused) = (0);
while ($pgb->pumpable)
{
	($rc, $out, $err) =
	  $a->psql('postgres', "SELECT task_events.process_pending();\n" x 50, on_error_stop => 0);
	$calls += 50;
	push @refused, grep { /ERROR/ } split /\n/, $err;
	$pgb->pump_nb;
}
$pgb->finish;
note "pgbench: $pgb_out$pgb_err";
is($pgb->result(0), 0, 'the pgbench load ran');
is(scalar(@refused), 0,
	"native log under concurrent writes: process_pending() is never refused ($calls calls)")
  or diag($refused[0]);
my $worker_re = join '|', @a_workers;
my @worker_refused = log_grep($a, $offset, qr/\[(?:$worker_re)\].*ERROR:  $IN_FUTURE/);
is(scalar(@worker_refused), 0,
	'native log under concurrent writes: the worker never says the log is in the future')
  or diag($worker_refused[0]);

# Far past the clone's counter: transaction ids, handled events, and a
# backlog (analytics disabled) the dump will carry.
burn_xids($a, 3000);
writes($a, 'postgres', 'after clone');
wait_caught_up($a);
$a->safe_psql('postgres', q{UPDATE task_events.handlers SET enabled = false WHERE handler = 'analytics'});
writes($a, 'postgres', 'backlog');
wait_caught_up($a);
my %behind = map { split /\|/ } split /\n/,
  $a->safe_psql('postgres', 'SELECT handler, events_behind FROM task_events.handler_status');
ok($behind{analytics} > 0 && !grep({ $_ ne 'analytics' && $behind{$_} != 0 } keys %behind),
	"source: analytics is $behind{analytics} events behind, the others caught up");

my $dump = $a->basedir . '/source.dump';
$a->command_ok([ 'pg_dump', '-Fc', '-f', $dump, '-d', $a->connstr('postgres') ], 'pg_dump -Fc of the source');
my $src_processed = processed($a, 'postgres');
my $src_max_seq = $a->safe_psql('postgres', 'SELECT max(seq) FROM task_events.events');
my $src_xmin = $a->safe_psql('postgres',
	q{SELECT min(xact_id) FROM task_events.events WHERE payload ->> 'task_title' LIKE 'after clone%'});

###
### The clone B: same system identifier, counter behind the dump's ids.
### The dump goes into a new database while B's worker serves postgres
### (as in 010_backup_restore.pl: no worker races pg_restore).
###
my $b = PostgreSQL::Test::Cluster->new('clone');
$b->init_from_backup($a, 'clone');
$b->start;
wait_for_workers($b, 1);
my $sysid = 'SELECT system_identifier FROM pg_control_system()';
is($b->safe_psql('postgres', $sysid), $a->safe_psql('postgres', $sysid),
	'the clone has the source\'s system identifier');
$b->safe_psql('postgres', 'CREATE DATABASE restored');
$b->command_ok([ 'pg_restore', '--exit-on-error', '-d', $b->connstr('restored'), $dump ],
	'pg_restore into the clone');
my $b_xid = next_xid($b, 'restored');
note "clone's next transaction id $b_xid; the source's events after the clone from $src_xmin";
cmp_ok($b_xid, '<', $src_xmin, 'the clone\'s transaction counter is behind the restored ids');

my $n_events = $b->safe_psql('restored', 'SELECT count(*) FROM task_events.events');
for my $call ([ 'create_task', q{SELECT task_events.create_task('u', 'refused')} ],
	[ 'process_pending', 'SELECT task_events.process_pending()' ])
{
	# A new session each: the check is made once per backend.
	my ($rc, $out, $err) = $b->psql('restored', "\\set VERBOSITY verbose\n$call->[1]");
	like($err, qr/ERROR:  55000: $IN_FUTURE/,
		"clone, before adoption: $call->[0] is refused with 55000");
}
is($b->safe_psql('restored', 'SELECT count(*) FROM task_events.events'),
	$n_events, 'clone, before adoption: nothing was written');

# A worker pointed at the restored database: it logs the error at each
# round (twice at least, a second apart) and handles nothing, the restored
# backlog included.
my $state_before = $b->safe_psql('restored', $STATE);
my $outputs_before = $b->safe_psql('restored', $OUTPUTS);
$offset = log_position($b);
$b->append_conf('postgresql.conf', "task_events.database = 'restored'");
$b->restart;
$offset = $b->wait_for_log(qr/ERROR:  $IN_FUTURE/, $offset);
ok(log_appears($b, qr/ERROR:  $IN_FUTURE/, $offset),
	'clone, before adoption: the worker logs that the log holds ids from the future, round after round');
is($b->safe_psql('restored', $STATE), $state_before,
	'clone, before adoption: no handler position moved');
is($b->safe_psql('restored', $OUTPUTS), $outputs_before,
	'clone, before adoption: the handlers wrote nothing');

cmp_ok($b->safe_psql('restored', 'SELECT task_events.adopt_restored_log()'),
	'>', 0, 'clone: adopt_restored_log() rewrites the restored transaction ids');
is($b->safe_psql('restored', 'SELECT task_events.adopt_restored_log()'),
	0, 'clone: a second adopt_restored_log() has nothing to do');
writes($b, 'restored', 'new');
wait_caught_up($b, 'restored');
handlers_match($b, 'clone, adopted: the worker handled the backlog and the new events, nothing twice',
	db => 'restored');
is( $b->safe_psql(
		'restored', q{SELECT (SELECT count(*) FROM task_events.audit_log)
		 - (SELECT count(*) FROM task_events.events)}),
	0, 'clone, adopted: one audit row per event');
# The new events each handler subscribes to (its event_types).
my %n_new = split /[|\n]/, $b->safe_psql(
	'restored', qq{
	SELECT h.handler, count(e.seq) FROM task_events.handlers h
	LEFT JOIN task_events.events e ON e.seq > $src_max_seq
	 AND (h.event_types IS NULL OR e.event_type = ANY (h.event_types))
	GROUP BY h.handler});
my $now = processed($b, 'restored');
is_deeply(
	{ map { $_ => $now->{$_} - $src_processed->{$_} } keys %$now },
	{ map { $_ => ($n_new{$_} // 0) + ($behind{$_} // 0) } keys %$now },
	"clone, adopted: each handler handled exactly its backlog and the new events of its types");

###
### Control: where the counter is ahead of the dump's ids (the source
### itself, a new database), the same dump is accepted as it is.
###
$a->safe_psql('postgres', 'CREATE DATABASE ahead');
$a->command_ok([ 'pg_restore', '--exit-on-error', '-d', $a->connstr('ahead'), $dump ],
	'pg_restore into the source cluster');
($rc, $out, $err) = $a->psql('ahead', q{SELECT task_events.create_task('u', 'accepted')});
is($err, '', 'counter ahead: create_task is accepted without adoption');
is($a->safe_psql('ahead', 'SELECT task_events.adopt_restored_log()'),
	0, 'counter ahead: adopt_restored_log() has nothing to do');
writes($a, 'ahead', 'new');
$a->safe_psql('ahead', 'SELECT task_events.process_pending()');
handlers_match($a, 'counter ahead: the backlog and the new events handled, nothing twice', db => 'ahead');

$b->stop;
$a->stop;
done_testing();
