# Rules protected here (issue 9, "A handler that misbehaves"): a handler's
# changes to its session's state do not leak into the next handler or the
# next batch.
# - In a worker (one worker, task_events.worker_count = 1: the handlers of a
#   round run one after the other in name order in the same process), a
#   handler that does set_config(..., false), SET statement_timeout, sets
#   search_path and session_replication_role, and takes a session advisory
#   lock leaves nothing behind: the next handler of the same round, and the
#   same handler at its next batch, see the worker's own values (work_mem as
#   configured, statement_timeout 0, search_path empty,
#   session_replication_role origin), no advisory lock and no prepared
#   statement.  (The dirty handler records what it sees at the end of its
#   call too, so that the changes are known to have been made.)
# - CREATE TEMP TABLE, LISTEN and PREPARE inside a handler fail with 42501,
#   counted as failed attempts and dead-lettered after max_attempts, and
#   leave no temporary table, channel or prepared statement behind.
# - Through process_pending() in a session: the caller's own settings and
#   its own session advisory lock are as before the call; the next handler
#   of the same call and the next call of the dirty handler see the
#   caller's values and no prepared statement; the restricted commands fail
#   the same way and leave nothing in the caller's session.  A session
#   advisory lock a handler takes there stays with the calling session (a
#   documented limit: PostgreSQL cannot release only the locks one call
#   took; the workers release all of theirs after each call): checked as
#   such, so that a change of behaviour is seen.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

my $node = te_node(
	'session_state',
	conf => "task_events.database = 'postgres'\n"
	  . "task_events.max_attempts = 2\n"
	  . "task_events.retry_delay = 10ms\n"
	  . "task_events.poll_interval = 100ms");
my ($worker) = wait_for_workers($node, 1);
is($node->safe_psql('postgres', 'SHOW task_events.worker_count'),
	'1', 'one worker (the default): every handler runs in the same process');
my $work_mem = $node->safe_psql('postgres', 'SHOW work_mem');

# What a handler sees of its session, recorded by record_seen; the
# handlers are a superuser's, so that they may set anything.  Advisory
# locks are counted for key 42 only: a worker holds a transaction-level
# advisory lock of its own while it creates a handler's state row.
my $HANDLERS = q{
CREATE TABLE public.seen (
	n bigserial PRIMARY KEY,
	who text NOT NULL,
	last_seq bigint NOT NULL,
	pid int NOT NULL,
	state text NOT NULL);
CREATE FUNCTION public.session_state() RETURNS text LANGUAGE sql AS $$
	SELECT pg_catalog.concat_ws(' | ',
		'work_mem=' || pg_catalog.current_setting('work_mem'),
		'statement_timeout=' || pg_catalog.current_setting('statement_timeout'),
		'search_path=' || pg_catalog.current_setting('search_path'),
		'session_replication_role=' || pg_catalog.current_setting('session_replication_role'),
		'lock42=' || (SELECT pg_catalog.count(*) FROM pg_catalog.pg_locks
		              WHERE locktype OPERATOR(pg_catalog.=) 'advisory'
		                AND pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()
		                AND classid OPERATOR(pg_catalog.=) 0
		                AND objid OPERATOR(pg_catalog.=) 42 AND objsubid OPERATOR(pg_catalog.=) 1),
		'prepared=' || (SELECT pg_catalog.count(*) FROM pg_catalog.pg_prepared_statements),
		'temp_tables=' || (SELECT pg_catalog.count(*) FROM pg_catalog.pg_class
		                   WHERE relnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()),
		'listening=' || (SELECT pg_catalog.count(*) FROM pg_catalog.pg_listening_channels()))
$$;
CREATE FUNCTION public.record_seen(who text, events task_events.events[]) RETURNS void
LANGUAGE sql AS $$
	INSERT INTO public.seen (who, last_seq, pid, state)
	SELECT who, (SELECT pg_catalog.max(e.seq) FROM pg_catalog.unnest(events) e),
	       pg_catalog.pg_backend_pid(), public.session_state()
$$;
CREATE FUNCTION public.a_dirty(events task_events.events[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	PERFORM public.record_seen('a_dirty start', events);
	PERFORM pg_catalog.set_config('work_mem', '7MB', false);
	SET statement_timeout = '17s';
	PERFORM pg_catalog.set_config('search_path', 'public', false);
	SET session_replication_role = replica;
	PERFORM pg_catalog.pg_advisory_lock(42);
	PERFORM public.record_seen('a_dirty end', events);
END $$;
CREATE FUNCTION public.b_probe(events task_events.events[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	PERFORM public.record_seen('b_probe', events);
END $$;
-- One restricted command per event title; other events pass.
CREATE FUNCTION public.c_restricted(events task_events.events[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
	e task_events.events;
BEGIN
	FOREACH e IN ARRAY events LOOP
		CASE e.payload ->> 'task_title'
		WHEN 'temp table' THEN
			CREATE TEMP TABLE te_leak (x int);
		WHEN 'listen' THEN
			LISTEN te_leak;
		WHEN 'prepare' THEN
			PREPARE te_leak AS SELECT 1;
		ELSE
			NULL;
		END CASE;
	END LOOP;
END $$;
INSERT INTO task_events.handlers (handler, function) VALUES
	('a_dirty', 'public.a_dirty(task_events.events[])'),
	('b_probe', 'public.b_probe(task_events.events[])'),
	('c_restricted', 'public.c_restricted(task_events.events[])');
};

my $DIRTY = 'work_mem=7MB | statement_timeout=17s | search_path=public | '
  . 'session_replication_role=replica | lock42=1 | prepared=0 | temp_tables=0 | listening=0';

sub clean_state
{
	my ($work_mem, $timeout, $path, $lock42) = @_;
	return "work_mem=$work_mem | statement_timeout=$timeout | search_path=$path | "
	  . "session_replication_role=origin | lock42=$lock42 | prepared=0 | temp_tables=0 | listening=0";
}

# A session_state() without its lock42 part: the settings and the rest.
sub without_lock42
{
	my ($s) = @_;
	$s =~ s/ \| lock42=\d+//g;
	return $s;
}

# The rows of public.seen, "who: state" per line in order.
sub seen
{
	my ($db, $where) = @_;
	return $node->safe_psql($db,
		"SELECT who || ': ' || state FROM public.seen WHERE $where ORDER BY n");
}

sub new_task
{
	my ($db, $title) = @_;
	return $node->safe_psql(
		$db, qq{
		SELECT task_id FROM task_events.create_task('alice', '$title') \\gset
		SELECT seq FROM task_events.events WHERE aggregate_id = :'task_id';});
}

sub restricted_titles
{
	return join '', map { "SELECT FROM task_events.create_task('alice', '$_');\n" }
	  ('temp table', 'listen', 'prepare');
}

### In the worker.
$node->safe_psql('postgres', $HANDLERS);

my $worker_state = clean_state($work_mem, '0', '', 0);
my @seqs;
for my $batch (1, 2)
{
	my $seq = new_task('postgres', "batch $batch");
	push @seqs, $seq;
	ok( $node->poll_query_until(
			'postgres', qq{
			SELECT count(DISTINCT who) = 3 FROM public.seen WHERE last_seq = $seq}),
		"batch $batch: both handlers ran");
}
my $expected = join "\n", map {
	("a_dirty start: $worker_state", "a_dirty end: $DIRTY", "b_probe: $worker_state")
} @seqs;
is(seen('postgres', "last_seq IN ($seqs[0], $seqs[1])"),
	$expected,
	'in the worker, the dirty handler changes its session for its call only: the probe after it in the same round, and its own next batch, see the worker\'s values'
);
is( $node->safe_psql(
		'postgres', "SELECT string_agg(DISTINCT pid::text, ',') FROM public.seen"),
	$worker,
	'every call was made by the one worker');

# The restricted commands.
$node->safe_psql('postgres', restricted_titles());
ok( $node->poll_query_until(
		'postgres', q{
		SELECT events_behind = 0 AND dead_letters = 3
		FROM task_events.handler_status WHERE handler = 'c_restricted'}),
	'worker: the restricted commands are dead-lettered');
is( $node->safe_psql(
		'postgres', q{
		SELECT string_agg(e.payload ->> 'task_title' || ': ' || d.attempts || ' ' || d.sqlstate,
		                  ', ' ORDER BY d.seq)
		FROM task_events.dead_letters d JOIN task_events.events e USING (seq)
		WHERE d.handler = 'c_restricted'}),
	'temp table: 2 42501, listen: 2 42501, prepare: 2 42501',
	'worker: CREATE TEMP TABLE, LISTEN and PREPARE fail with 42501, after max_attempts = 2 attempts each'
);
is( $node->safe_psql(
		'postgres', q{
		SELECT failed >= 6 AND last_sqlstate = '42501'
		FROM task_events.handler_status WHERE handler = 'c_restricted'}),
	't',
	'worker: handler_status counts the failed attempts');
my $after = new_task('postgres', 'after the restricted commands');
ok( $node->poll_query_until(
		'postgres', qq{
		SELECT count(DISTINCT who) = 3 FROM public.seen WHERE last_seq = $after}),
	'worker: a round after the restricted commands');
is(seen('postgres', "last_seq = $after AND who <> 'a_dirty end'"),
	"a_dirty start: $worker_state\nb_probe: $worker_state",
	'worker: no temporary table, channel or prepared statement was left behind');

wait_caught_up($node);
handlers_match($node, 'worker: the built-in handlers are exact');
is($node->safe_psql('postgres', 'SELECT pid FROM pg_stat_activity WHERE backend_type = \'task_events worker\''),
	$worker, 'the worker was never restarted');

### Through process_pending(), in database pp, which no worker serves.
$node->safe_psql('postgres', 'CREATE DATABASE pp');
$node->safe_psql('pp', 'CREATE EXTENSION task_events');
$node->safe_psql('pp', $HANDLERS);
my $pp1 = new_task('pp', 'batch 1');

# One session: the caller's own settings and its own session advisory lock
# (key 7), two process_pending() calls with a new event in between, then
# the restricted commands run until dead-lettered (retry_delay 0: each
# call makes the next attempt), then what the caller's session looks like.
my $caller_path = 'pg_catalog, public';
my ($rc, $out, $err) = $node->psql(
	'pp', qq{
	SET work_mem = '3MB';
	SET statement_timeout = '55s';
	SET search_path = $caller_path;
	SET task_events.retry_delay = 0;
	SELECT pg_catalog.pg_advisory_lock(7) \\gset
	SELECT task_events.process_pending() AS done \\gset
	SELECT FROM task_events.create_task('alice', 'batch 2');
	SELECT task_events.process_pending() AS done \\gset
	@{[ restricted_titles() ]}
	DO \$\$
	BEGIN
		FOR i IN 1..20 LOOP
			PERFORM task_events.process_pending('c_restricted');
			EXIT WHEN (SELECT count(*) FROM task_events.dead_letters
			           WHERE handler = 'c_restricted') = 3;
		END LOOP;
	END \$\$;
	SELECT public.session_state() || ' | lock7='
	       || (SELECT count(*) FROM pg_catalog.pg_locks
	           WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()
	             AND classid = 0 AND objid = 7 AND objsubid = 1);
	},
	on_error_stop => 1);
is($rc, 0, 'process_pending: the session ran without error') or diag($err);
$out = (split /\n/, $out)[-1] // '';    # the last statement's row
my $caller_state = clean_state('3MB', '55s', $caller_path, 0);

is(without_lock42($out), without_lock42("$caller_state | lock7=1"),
	'process_pending: afterwards the caller\'s settings and its own advisory lock are as before, and no temporary table, channel or prepared statement of a handler is in its session'
);
like($out, qr/ \| lock42=1 \|/,
	'process_pending: the session advisory lock a handler took stays with the calling session (documented limit)');
my $pp2 = $node->safe_psql('pp',
	q{SELECT seq FROM task_events.events WHERE payload ->> 'task_title' = 'batch 2'});
my $pp_seen = seen('pp', "last_seq IN ($pp1, $pp2)");
is(without_lock42($pp_seen),
	without_lock42(join("\n",
		map { ("a_dirty start: $caller_state", "a_dirty end: $DIRTY", "b_probe: $caller_state") }
		  ($pp1, $pp2))),
	'process_pending: the dirty handler changes settings for its call only: the probe after it in the same call, and its own next call, see the caller\'s values'
);
is( $node->safe_psql(
		'pp', qq{
		SELECT string_agg(who || ' ' || substring(state FROM 'lock42=(\\d+)'), ', ' ORDER BY n)
		FROM public.seen WHERE last_seq IN ($pp1, $pp2)}),
	'a_dirty start 0, a_dirty end 1, b_probe 1, a_dirty start 1, a_dirty end 1, b_probe 1',
	'process_pending: the dirty handler\'s session advisory lock stays in the session, for the next handler and its own next call (documented limit)'
);
is( $node->safe_psql(
		'pp', q{
		SELECT string_agg(e.payload ->> 'task_title' || ': ' || d.attempts || ' ' || d.sqlstate,
		                  ', ' ORDER BY d.seq)
		FROM task_events.dead_letters d JOIN task_events.events e USING (seq)
		WHERE d.handler = 'c_restricted'}),
	'temp table: 2 42501, listen: 2 42501, prepare: 2 42501',
	'process_pending: CREATE TEMP TABLE, LISTEN and PREPARE fail with 42501, after max_attempts = 2 attempts each'
);
$node->safe_psql('pp', 'SELECT task_events.process_pending()');
handlers_match($node, 'process_pending: the built-in handlers are exact', db => 'pp');

$node->stop;
done_testing();
