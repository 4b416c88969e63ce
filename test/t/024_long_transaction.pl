# Rules protected here: long transactions do not make idle workers busy.
# A transaction that stays open holds every snapshot's xmin back; the events
# written and handled after it began stay behind that xmin.  While it is open:
# - an idle worker's round (its peek for work) reads a few entries of
#   task_events.events and its indexes, not the events written since the long
#   transaction began (less than 100 per round, with 20,000 of them: a window
#   found as a range from the position's xmin would read all of them, for
#   every handler, at every round);
# - one SELECT * FROM task_events.handler_status likewise (less than 100 per
#   handler);
# and once it ends, its event is handled, exactly once, by every handler,
# and idle rounds and handler_status stay as cheap without it.
# Both kinds of long transaction: (a) a prepared transaction, (b) a session
# idle in transaction; each wrote an event.  The events are written by two
# concurrent sessions, many per transaction (bulk imports), and analyzed as
# autovacuum would: the plans are those a live system gets.
# The reads are counted by the cumulative statistics (pg_stat_user_tables,
# pg_stat_user_indexes; the workers flush theirs at most once a second),
# per round of the worker: each round's peek scans task_events.handlers once.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

# Events written while a long transaction is open, per part.
my $N = 20000;
# Reads allowed per idle round, and per handler in handler_status.
my $MAX_READS = 100;

# autovacuum off: only the workers and the test read task_events.events.
my $node = te_node(
	'longtx',
	conf => "task_events.poll_interval = 100ms\n"
	  . "max_prepared_transactions = 5\n"
	  . "autovacuum = off");
wait_for_workers($node, 1);

# [task_events.handlers scans, entries read from the indexes of
# task_events.events, rows read from task_events.events], as flushed.
my $COUNTERS = q{
SELECT (SELECT seq_scan + coalesce(idx_scan, 0) FROM pg_stat_user_tables
		WHERE relid = 'task_events.handlers'::regclass)
	|| '|' || (SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes
			   WHERE relid = 'task_events.events'::regclass)
	|| '|' || (SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables
			   WHERE relid = 'task_events.events'::regclass)};

sub counters
{
	my ($node) = @_;
	return [ split /\|/, $node->safe_psql('postgres', $COUNTERS) ];
}

sub poll_rounds
{
	my ($node, $from) = @_;
	$node->poll_query_until('postgres',
		qq{SELECT (SELECT seq_scan + coalesce(idx_scan, 0) FROM pg_stat_user_tables
				   WHERE relid = 'task_events.handlers'::regclass) >= $from})
	  or die "the worker's rounds did not reach $from scans of task_events.handlers";
	return;
}

# What the idle worker reads over at least 20 rounds:
# (rounds, index entries, rows).  The baseline is taken after the worker's
# first statistics flush that follows the call (it holds every round before
# it), so that only idle rounds are counted.
sub idle_reads
{
	my ($node) = @_;
	my $c0 = counters($node);
	poll_rounds($node, $c0->[0] + 1);
	my $start = counters($node);
	poll_rounds($node, $start->[0] + 20);
	my $end = counters($node);
	return map { $end->[$_] - $start->[$_] } 0 .. 2;
}

# What one SELECT * FROM task_events.handler_status reads from
# task_events.events and its indexes: (handlers, index entries, rows), from
# the statistics of its own transaction.
sub handler_status_reads
{
	my ($node) = @_;
	my $out = $node->safe_psql(
		'postgres', q{
		BEGIN;
		CREATE TEMP TABLE status ON COMMIT DROP AS SELECT * FROM task_events.handler_status;
		SELECT (SELECT count(*) FROM status),
			   (SELECT sum(pg_stat_get_xact_tuples_returned(indexrelid)) FROM pg_index
				WHERE indrelid = 'task_events.events'::regclass),
			   pg_stat_get_xact_tuples_returned('task_events.events'::regclass)
			   + pg_stat_get_xact_tuples_fetched('task_events.events'::regclass);
		COMMIT;});
	note $node->safe_psql('postgres',
		'EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT * FROM task_events.handler_status');
	return split /\|/, $out;
}

# Write $N events (TaskCreated) the way two clients importing tasks in bulk
# at the same time do: two sessions, two transactions each, their inserts
# interleaved in chunks of 500 (so that the rows are not in xact_id order on
# disk, as with any concurrent writers).  Then ANALYZE task_events.events,
# as autovacuum would after so many inserts (it is off here), so that the
# workers and handler_status run with the plans a live system gets; and
# wait until every handler has handled the events.
sub write_many
{
	my ($node, $tag) = @_;
	my @writers = map { $node->background_psql('postgres') } 1 .. 2;
	for my $x (1 .. 2)
	{
		$_->query_safe('BEGIN') for @writers;
		for my $chunk (1 .. $N / 2000)
		{
			for my $w (0 .. 1)
			{
				$writers[$w]->query_safe(
					"SELECT count(*) FROM generate_series(1, 500) g,
					 task_events.create_task('user' || g % 8, '$tag $x.$w.$chunk ' || g)");
			}
		}
		$_->query_safe('COMMIT') for @writers;
	}
	$_->quit for @writers;
	$node->safe_psql('postgres', 'ANALYZE task_events.events');
	note 'task_events.events.xact_id: n_distinct|correlation = '
	  . $node->safe_psql('postgres',
		q{SELECT n_distinct || '|' || correlation FROM pg_stats
		  WHERE schemaname = 'task_events' AND tablename = 'events' AND attname = 'xact_id'});
	wait_caught_up($node);
	return;
}

# The long transaction's event, audited exactly once.
sub audited
{
	my ($node, $title) = @_;
	return $node->safe_psql('postgres',
		"SELECT count(*) FROM task_events.audit_log WHERE event_data ->> 'task_title' = '$title'");
}

sub check_idle_costs
{
	my ($node, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;

	my ($rounds, $entries, $rows) = idle_reads($node);
	note "$what: $rounds idle rounds read $entries index entries and $rows rows of task_events.events";
	cmp_ok($entries / $rounds, '<', $MAX_READS,
		"$what: an idle round reads few index entries of task_events.events ($entries in $rounds rounds)");
	cmp_ok($rows / $rounds, '<', $MAX_READS,
		"$what: an idle round reads few rows of task_events.events ($rows in $rounds rounds)");

	my ($handlers, $s_entries, $s_rows) = handler_status_reads($node);
	note "$what: handler_status ($handlers handlers) read $s_entries index entries and $s_rows rows";
	cmp_ok($s_entries / $handlers, '<', $MAX_READS,
		"$what: handler_status reads few index entries of task_events.events ($s_entries for $handlers handlers)");
	cmp_ok($s_rows / $handlers, '<', $MAX_READS,
		"$what: handler_status reads few rows of task_events.events ($s_rows for $handlers handlers)");
	return;
}

my $XMIN = 'SELECT pg_snapshot_xmin(pg_current_snapshot())';

###
### (a) A prepared transaction that wrote an event.
###
$node->safe_psql(
	'postgres', q{
	BEGIN;
	SELECT task_events.create_task('held', 'prepared');
	PREPARE TRANSACTION 'held';});
my $held_xid = $node->safe_psql('postgres', q{SELECT transaction FROM pg_prepared_xacts WHERE gid = 'held'});
write_many($node, 'behind prepared');
is($node->safe_psql('postgres', $XMIN), $held_xid,
	"prepared: the prepared transaction holds the xmin back behind $N events");
check_idle_costs($node, 'prepared');
is(audited($node, 'prepared'), 0, 'prepared: its event is not handled while it is open');

$node->safe_psql('postgres', q{COMMIT PREPARED 'held'});
$node->poll_query_until('postgres',
	q{SELECT count(*) > 0 FROM task_events.audit_log WHERE event_data ->> 'task_title' = 'prepared'})
  or die 'the prepared transaction\'s event was not handled';
wait_caught_up($node);
is(audited($node, 'prepared'), 1, 'prepared, committed: its event is handled once');
handlers_match($node, 'prepared, committed: every event handled exactly once');
# And with no long transaction at all, an idle round is as cheap.
check_idle_costs($node, 'no long transaction');

###
### (b) A session idle in transaction that wrote an event.
###
my $idle = $node->background_psql('postgres');
$idle->query_safe('BEGIN');
$idle->query_safe(q{SELECT task_events.create_task('held', 'idle in transaction')});
my $idle_xid = $idle->query_safe('SELECT pg_current_xact_id()');
write_many($node, 'behind idle');
is($node->safe_psql('postgres', $XMIN), $idle_xid,
	"idle in transaction: the open transaction holds the xmin back behind $N events");
check_idle_costs($node, 'idle in transaction');
is(audited($node, 'idle in transaction'), 0, 'idle in transaction: its event is not handled while it is open');

$idle->query_safe('COMMIT');
$idle->quit;
$node->poll_query_until('postgres',
	q{SELECT count(*) > 0 FROM task_events.audit_log WHERE event_data ->> 'task_title' = 'idle in transaction'})
  or die 'the idle transaction\'s event was not handled';
wait_caught_up($node);
is(audited($node, 'idle in transaction'), 1, 'idle in transaction, committed: its event is handled once');
handlers_match($node, 'idle in transaction, committed: every event handled exactly once');
no_handler_failures($node);

$node->stop;
done_testing();
