# Rules protected here: pg_dump / pg_restore of a database that uses
# task_events is a complete backup of it.
# - The restore (CREATE EXTENSION comes from the dump) reproduces, exactly,
#   the tasks, the event log, the handlers' outputs, their positions
#   (handler_state), the dead letters and the sequences: new events continue
#   after the highest seq.
# - After the restore into the same cluster, handling resumes exactly where
#   the source stood: the events the source had not handled yet (a disabled
#   handler's backlog) and new events are handled once, and no event handled
#   before the dump is handled again (handler_mismatches, and each handler's
#   processed count grows by exactly the events it had left).
# - A user-registered handler (row of task_events.handlers) is in the dump
#   (the built-in ones come from CREATE EXTENSION): a plain pg_restore
#   restores it, its position and its dead letters.
# - Into ANOTHER cluster: events.xact_id and the positions are transaction
#   ids of the source cluster (task_events.log_origin names it).  Until
#   task_events.adopt_restored_log() runs, the write functions and
#   process_pending refuse (55000) and a worker logs why and waits.  Adopted
#   in a cluster whose counter is behind the source's (ids rewritten) or
#   ahead of it (ids kept), handling resumes exactly: each handler handles
#   its backlog and the new events, and nothing twice.
# - Subscriptions (issue 11): their rows, lanes' positions and leases are in
#   the dump; after the restore, and after adoption in another cluster, the
#   subscription delivers the events it had not acknowledged (the batch left
#   leased again, once its lease expires) and the new ones: every event
#   acknowledged exactly once in all.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

# The workers serve postgres only: the restores below go into databases no
# worker serves, as docs/operations.md says a restore without
# --single-transaction must.
my $CONF = "task_events.database = 'postgres'\n"
  . "task_events.poll_interval = 100ms\n"
  . "task_events.max_attempts = 2\n"
  . "task_events.retry_delay = 10ms";

# The tables a backup must carry, each as sorted text (subscriptions, their
# positions and leases included).
my @TABLES = qw(tasks events audit_log notifications analytics_counters
  completion_stats handler_state dead_letters subscriptions subscription_lanes
  subscription_dead_letters);

sub table_text
{
	my ($node, $db, $table) = @_;
	return $node->safe_psql($db,
		"SELECT string_agg(t::text, E'\\n' ORDER BY t::text COLLATE \"C\") FROM task_events.$table t");
}

sub sequences_text
{
	my ($node, $db) = @_;
	return $node->safe_psql(
		$db, q{
		SELECT (SELECT last_value || '/' || is_called FROM task_events.events_seq_seq) || ' '
		    || (SELECT last_value || '/' || is_called FROM task_events.notifications_notification_id_seq)});
}

# Compare everything a backup carries between two databases.
sub same_as_source
{
	my ($src, $dst, $db, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	for my $table (@TABLES)
	{
		is(table_text($dst, $db, $table), table_text($src, 'postgres', $table),
			"$what: task_events.$table is the source's");
	}
	is(sequences_text($dst, $db), sequences_text($src, 'postgres'),
		"$what: the sequences are the source's");
	return;
}

# The events each handler is called with (its event_types) among those
# after seq $from{handler} (default: after $default), as handler => count:
# what its processed count grows by when it handles them.
sub called_after
{
	my ($node, $db, $default, %from) = @_;
	my $case = join ' ', map { "WHEN '$_' THEN $from{$_}" } keys %from;
	$case = $case ? "CASE h.handler $case ELSE $default END" : $default;
	return {
		map { split /\|/ } split /\n/,
		$node->safe_psql($db, qq{
			SELECT h.handler, count(e.seq) FROM task_events.handler_state h0
			JOIN task_events.handlers h USING (handler)
			LEFT JOIN task_events.events e ON e.seq > $case
			 AND (h.event_types IS NULL OR e.event_type = ANY (h.event_types))
			GROUP BY h.handler})
	};
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

# Burn n transaction ids (one autocommit statement each).
sub burn_xids
{
	my ($node, $n) = @_;
	$node->safe_psql('postgres', "SELECT pg_current_xact_id();\n" x $n);
	return;
}

sub next_xid
{
	my ($node) = @_;
	return $node->safe_psql('postgres', 'SELECT pg_snapshot_xmax(pg_current_snapshot())');
}

# Read and acknowledge every batch of the subscription backup_sub in
# database db, once the lease the source left has expired; returns
# "acknowledged in all, events behind in all" from subscription_status.
sub drain_subscription
{
	my ($node, $db) = @_;
	$node->poll_query_until($db,
		q{SELECT count(*) = 0 FROM task_events.subscription_lanes WHERE leased_until > clock_timestamp()})
	  or die 'the lease did not expire';
	while (1)
	{
		my $batch = $node->safe_psql($db,
			q{SELECT batch_id FROM task_events.read_batch('backup_sub', 7) LIMIT 1});
		last if $batch eq '';
		$node->safe_psql($db, "SELECT task_events.ack_batch('backup_sub', $batch)");
	}
	return $node->safe_psql($db,
		q{SELECT sum(acknowledged) || ' ' || sum(events_behind) FROM task_events.subscription_status});
}

# pg_restore file into the new database db of node, re-registering the
# handler poison between the sections; dies on any error.
my $REGISTER_POISON = q{INSERT INTO task_events.handlers (handler, function)
	VALUES ('poison', 'public.poison(task_events.events[])')};

sub restore
{
	my ($node, $db, $file) = @_;
	$node->safe_psql('postgres', "CREATE DATABASE $db");
	$node->command_ok([ 'pg_restore', '--exit-on-error', '-d', $node->connstr($db), $file ],
		"pg_restore into $db");
	return;
}

###
### The source: handled events, a dead letter, and a backlog.
###
my $src = te_node('source', conf => $CONF);
wait_for_workers($src, 1);
# The source has used many more transaction ids than a new cluster.
burn_xids($src, 5000);

$src->safe_psql(
	'postgres', qq{
CREATE FUNCTION public.poison(events task_events.events[]) RETURNS void
LANGUAGE plpgsql AS \$\$
BEGIN
	IF EXISTS (SELECT FROM pg_catalog.unnest(events) e
			   WHERE e.event_type = 'TaskCreated' AND e.payload ->> 'task_title' LIKE 'poison%') THEN
		RAISE EXCEPTION 'poisoned batch';
	END IF;
END \$\$;
$REGISTER_POISON;
});
writes($src, 'postgres', 'handled');
$src->safe_psql('postgres', q{SELECT task_events.create_task('mallory', 'poison pill')});
$src->poll_query_until('postgres',
	q{SELECT dead_letters = 1 AND events_behind = 0 FROM task_events.handler_status WHERE handler = 'poison'})
  or die 'no dead letter';
wait_caught_up($src);

# A subscription with a batch acknowledged and one left leased (its lease
# expires soon after the dump): positions and leases are dumped.
$src->safe_psql(
	'postgres', q{
SELECT task_events.create_subscription('backup_sub', start_at => 'beginning', lanes => 2);
SELECT task_events.ack_batch('backup_sub', (SELECT batch_id FROM task_events.read_batch('backup_sub', 5) LIMIT 1));
SELECT FROM task_events.read_batch('backup_sub', 5, '2 seconds');
});
wait_caught_up($src);

# A backlog: analytics disabled, events written.
$src->safe_psql('postgres', q{UPDATE task_events.handlers SET enabled = false WHERE handler = 'analytics'});
my $before_backlog = $src->safe_psql('postgres', 'SELECT max(seq) FROM task_events.events');
writes($src, 'postgres', 'backlog');
wait_caught_up($src);
my %behind = map { split /\|/ } split /\n/,
  $src->safe_psql('postgres', 'SELECT handler, events_behind FROM task_events.handler_status');
ok($behind{analytics} > 0 && !grep({ $_ ne 'analytics' && $behind{$_} != 0 } keys %behind),
	"source: analytics is $behind{analytics} events behind, the others caught up");
is($src->safe_psql('postgres', 'SELECT count(*) FROM task_events.dead_letters'), 1, 'source: one dead letter');

my $dump = $src->basedir . '/source.dump';
$src->command_ok([ 'pg_dump', '-Fc', '-f', $dump, '-d', $src->connstr('postgres') ], 'pg_dump -Fc');
my $src_max_seq = $src->safe_psql('postgres', 'SELECT max(seq) FROM task_events.events');
my $src_last_value = $src->safe_psql('postgres', 'SELECT last_value FROM task_events.events_seq_seq');
my $src_processed = processed($src, 'postgres');
my $n_src_events = $src->safe_psql('postgres', 'SELECT count(*) FROM task_events.events');

###
### A plain pg_restore keeps the user's handlers.
###
$src->safe_psql('postgres', 'CREATE DATABASE plain');
my $plain_rc = system_log('pg_restore', '--exit-on-error', '-d', $src->connstr('plain'), $dump);
is($plain_rc, 0, 'a plain pg_restore succeeds');
# The built-in handlers come from CREATE EXTENSION, enabled (documented):
# the source's disabled analytics is enabled again.
my $user_handlers = q{SELECT string_agg(h::text, ',' ORDER BY handler) FROM task_events.handlers h
	WHERE handler NOT IN ('analytics', 'audit', 'notification', 'relay')};
is($src->safe_psql('plain', $user_handlers), $src->safe_psql('postgres', $user_handlers),
	'a plain pg_restore restores the handlers the user registered');
is(table_text($src, 'plain', 'handler_state'), table_text($src, 'postgres', 'handler_state'),
	'a plain pg_restore restores every handler position');
is(table_text($src, 'plain', 'dead_letters'), table_text($src, 'postgres', 'dead_letters'),
	'a plain pg_restore restores the dead letters');

###
### Restore into another database of the same cluster.
###
restore($src, 'restored', $dump);
same_as_source($src, $src, 'restored', 'same cluster');

writes($src, 'restored', 'new');
$src->safe_psql('restored', 'SELECT task_events.process_pending()');
handlers_match($src, 'same cluster: the backlog and new events handled, nothing handled twice',
	db => 'restored');
is( $src->safe_psql('restored', "SELECT min(seq) FROM task_events.events WHERE seq > $src_max_seq"),
	$src_last_value + 1,
	'same cluster: new events continue the source\'s sequence');
my $now = processed($src, 'restored');
is_deeply(
	{ map { $_ => $now->{$_} - $src_processed->{$_} } keys %$now },
	called_after($src, 'restored', $src_max_seq, analytics => $before_backlog),
	'same cluster: each handler handled exactly its backlog and the new events');
is($src->safe_psql('restored', q{SELECT count(*) FROM task_events.dead_letters WHERE handler = 'poison'}),
	1, 'same cluster: the dead letter is still there, not retried');
is(drain_subscription($src, 'restored'),
	$src->safe_psql('restored', 'SELECT count(*) FROM task_events.events') . ' 0',
	'same cluster: the subscription delivers the rest, the leased batch again, each event acknowledged once');

###
### Into another cluster whose transaction counter is behind the source's:
### the ids in the log mean nothing there until the log is adopted.
###
my $dst = te_node('target', conf => $CONF);
my ($src_xid, $dst_xid) = (next_xid($src), next_xid($dst));
note "next transaction id: source $src_xid, target $dst_xid";
cmp_ok($dst_xid, '<', $src_xid, 'the target cluster\'s transaction counter is behind the source\'s');

restore($dst, 'behind', $dump);
same_as_source($src, $dst, 'behind', 'cluster behind');
for my $call ([ 'create_task', q{SELECT task_events.create_task('u', 'refused')} ],
	[ 'process_pending', 'SELECT task_events.process_pending()' ])
{
	my ($rc, $out, $err) = $dst->psql('behind', $call->[1]);
	like($err, qr/ERROR:  the task_events event log was restored from another cluster/,
		"cluster behind: $call->[0] is refused until the log is adopted");
}
cmp_ok($dst->safe_psql('behind', 'SELECT task_events.adopt_restored_log()'),
	'>', 0, 'cluster behind: adopt_restored_log rewrites the events\' transaction ids');
is($dst->safe_psql('behind', 'SELECT task_events.adopt_restored_log()'),
	0, 'cluster behind: a second adopt_restored_log has nothing to do');
writes($dst, 'behind', 'new');
$dst->safe_psql('behind', 'SELECT task_events.process_pending()');
handlers_match($dst, 'cluster behind, adopted: the backlog and new events handled, nothing handled twice',
	db => 'behind');
$now = processed($dst, 'behind');
is_deeply(
	{ map { $_ => $now->{$_} - $src_processed->{$_} } keys %$now },
	called_after($dst, 'behind', $src_max_seq, analytics => $before_backlog),
	'cluster behind, adopted: each handler handled exactly its backlog and the new events');
is($dst->safe_psql('behind', q{SELECT count(*) FROM task_events.dead_letters WHERE handler = 'poison'}),
	1, 'cluster behind, adopted: the dead letter is still there, not retried');
is( $dst->safe_psql(
		'behind', q{SELECT count(*) FROM task_events.events e
		WHERE NOT EXISTS (SELECT FROM task_events.audit_log a WHERE a.event_id = e.event_id)}),
	0, 'cluster behind, adopted: every event is audited');
is(drain_subscription($dst, 'behind'),
	$dst->safe_psql('behind', 'SELECT count(*) FROM task_events.events') . ' 0',
	'cluster behind, adopted: the subscription delivers the rest, each event acknowledged once');

###
### Into another cluster whose transaction counter is ahead of the source's,
### served by a worker: it waits (logging why) until the log is adopted,
### which keeps the ids.
###
burn_xids($dst, $src_xid - next_xid($dst) + 100);
cmp_ok(next_xid($dst), '>', $src_xid, 'the target cluster\'s counter is now ahead of the source\'s');
restore($dst, 'ahead', $dump);
same_as_source($src, $dst, 'ahead', 'cluster ahead');
my $offset = log_position($dst);
$dst->append_conf('postgresql.conf', "task_events.database = 'ahead'");
$dst->restart;
ok( $dst->wait_for_log(qr/ERROR:  the task_events event log was restored from another cluster/, $offset),
	'cluster ahead: the worker says the log must be adopted first');
is($dst->safe_psql('ahead', 'SELECT task_events.adopt_restored_log()'),
	0, 'cluster ahead: adopt_restored_log keeps the ids (none rewritten)');
writes($dst, 'ahead', 'new');
wait_caught_up($dst, 'ahead');
handlers_match($dst, 'cluster ahead: the worker handled the backlog and new events, nothing twice',
	db => 'ahead');
$now = processed($dst, 'ahead');
is_deeply(
	{ map { $_ => $now->{$_} - $src_processed->{$_} } keys %$now },
	called_after($dst, 'ahead', $src_max_seq, analytics => $before_backlog),
	'cluster ahead: each handler handled exactly its backlog and the new events');
is(drain_subscription($dst, 'ahead'),
	$dst->safe_psql('ahead', 'SELECT count(*) FROM task_events.events') . ' 0',
	'cluster ahead: the subscription delivers the rest, each event acknowledged once');

$dst->stop;
$src->stop;
done_testing();
