# Rules protected here (README, "Security"):
# - Nothing the callers put on their search_path runs inside task_events.
#   Functions and operators planted in schema public before CREATE EXTENSION,
#   in a database whose search_path (ALTER DATABASE, and the session's own)
#   is "public, pg_catalog", are never called: not by CREATE EXTENSION, the
#   write functions, task_history, process_pending and the built-in
#   handlers, retry_dead_letters, handler_status, handler_backlog and
#   event_rates, nor by the background worker serving that database.
# - Under that search_path every result is still right: versions, history,
#   errors, what each built-in handler wrote, the monitoring views.
# Each planted object records its call in public.hijacked (and in a sequence,
# which a rollback does not undo) and then returns the right answer, so a
# hijack shows only there.  The test first checks that every planted object
# is indeed what an unqualified name resolves to under that search_path.
# The worker sets its own search_path: the test passes whatever it sets, as
# long as nothing planted runs.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

my $DB = 'planted';
my $HOSTILE_PATH = 'public, pg_catalog';

# Planted functions: [signature, result type, the right answer, a call].
my @FUNCTIONS = (
	[ 'now()', 'timestamptz', 'pg_catalog.now()', 'now()' ],
	[ 'clock_timestamp()', 'timestamptz', 'pg_catalog.clock_timestamp()', 'clock_timestamp()' ],
	[
		'statement_timestamp()', 'timestamptz',
		'pg_catalog.statement_timestamp()', 'statement_timestamp()'
	],
	[
		'transaction_timestamp()', 'timestamptz',
		'pg_catalog.transaction_timestamp()', 'transaction_timestamp()'
	],
	[ 'nextval(regclass)', 'bigint', 'pg_catalog.nextval($1)', q{nextval('public.sanity')} ],
	[ 'pg_current_xact_id()', 'xid8', 'pg_catalog.pg_current_xact_id()', 'pg_current_xact_id()' ],
	[
		'jsonb_build_object(text, text)', 'jsonb',
		'pg_catalog.jsonb_build_object($1, $2)', q{jsonb_build_object('a'::text, 'b'::text)}
	],
	[
		'jsonb_build_object(VARIADIC text[])', 'jsonb',
		'pg_catalog.jsonb_object($1)', q{jsonb_build_object(VARIADIC '{a,b}'::text[])}
	],
	[ 'to_jsonb(text)', 'jsonb', 'pg_catalog.to_jsonb($1)', q{to_jsonb('a'::text)} ],
	[
		'date_part(text, interval)', 'double precision',
		'pg_catalog.date_part($1, $2)', q{date_part('epoch'::text, '1 s'::interval)}
	],
	[
		'date_part(text, timestamptz)', 'double precision',
		'pg_catalog.date_part($1, $2)', q{date_part('epoch'::text, pg_catalog.now())}
	],
	[ 'hashtext(text)', 'integer', 'pg_catalog.hashtext($1)', q{hashtext('a'::text)} ],
	[
		'pg_try_advisory_xact_lock(integer, integer)', 'boolean',
		'pg_catalog.pg_try_advisory_xact_lock($1, $2)', 'pg_try_advisory_xact_lock(1, 2)'
	],
	[
		'pg_snapshot_xmin(pg_snapshot)', 'xid8',
		'pg_catalog.pg_snapshot_xmin($1)', 'pg_snapshot_xmin(pg_catalog.pg_current_snapshot())'
	],
	[
		'pg_visible_in_snapshot(xid8, pg_snapshot)', 'boolean',
		'pg_catalog.pg_visible_in_snapshot($1, $2)',
		q{pg_visible_in_snapshot('1'::xid8, pg_catalog.pg_current_snapshot())}
	],
	[ 'gen_random_uuid()', 'uuid', 'pg_catalog.gen_random_uuid()', 'gen_random_uuid()' ],
	[
		'round(numeric, integer)', 'numeric',
		'pg_catalog.round($1, $2)', 'round(1.234::numeric, 2)'
	],
	[ 'length(text)', 'integer', 'pg_catalog.length($1)', q{length('a'::text)} ],
	[ 'lower(text)', 'text', 'pg_catalog.lower($1)', q{lower('a'::text)} ],
	[ 'btrim(text)', 'text', 'pg_catalog.btrim($1)', q{btrim('a'::text)} ],
	[ 'textcat(text, text)', 'text', 'pg_catalog.textcat($1, $2)', q{textcat('a'::text, 'b'::text)} ],
);

# Planted operators: [operator, left type, right type, result type, sample
# left, sample right].
my @OPERATORS = (
	[
		'=', 'uuid', 'uuid', 'bool',
		q{'00000000-0000-0000-0000-000000000000'},
		q{'00000000-0000-0000-0000-000000000000'}
	],
	[ '=',   'text',        'text',        'bool',        q{'a'},          q{'a'} ],
	[ '<>',  'text',        'text',        'bool',        q{'a'},          q{'b'} ],
	[ '=',   'int8',        'int8',        'bool',        '1',             '1' ],
	[ '=',   'int8',        'int4',        'bool',        '1',             '1' ],
	[ '=',   'int4',        'int4',        'bool',        '1',             '1' ],
	[ '=',   'xid8',        'xid8',        'bool',        q{'1'},          q{'1'} ],
	[ '||',  'text',        'text',        'text',        q{'a'},          q{'b'} ],
	[ '->>', 'jsonb',       'text',        'text',        q{'{"a": "b"}'}, q{'a'} ],
	[ '->',  'jsonb',       'text',        'jsonb',       q{'{"a": "b"}'}, q{'a'} ],
	[ '+',   'int8',        'int8',        'int8',        '1',             '1' ],
	[ '+',   'int8',        'int4',        'int8',        '1',             '1' ],
	[ '+',   'float8',      'float8',      'float8',      '1',             '1' ],
	[ '-',   'timestamptz', 'timestamptz', 'interval',    q{'2020-01-01'}, q{'2020-01-01'} ],
	[ '-',   'timestamptz', 'interval',    'timestamptz', q{'2020-01-01'}, q{'1 minute'} ],
	[ '>',   'timestamptz', 'timestamptz', 'bool',        q{'2020-01-01'}, q{'2020-01-01'} ],
	[ '>',   'int8',        'int8',        'bool',        '1',             '1' ],
	[ '>',   'int8',        'int4',        'bool',        '1',             '1' ],
	[ '<=',  'int8',        'int8',        'bool',        '1',             '1' ],
	[ '>=',  'xid8',        'xid8',        'bool',        q{'1'},          q{'1'} ],
	[ '~',   'text',        'text',        'bool',        q{'a'},          q{'a'} ],
	[ '/',   'numeric',     'numeric',     'numeric',     '1',             '1' ],
	[ '/',   'float8',      'float8',      'float8',      '1',             '1' ],
);

# The recorder, then one plpgsql function per planted function and per
# operator (plpgsql: never inlined, so a call always records).
my $plant = q{
CREATE TABLE public.hijacked (
	n bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	what pg_catalog.text NOT NULL,
	by_backend pg_catalog.text NOT NULL
);
CREATE SEQUENCE public.hijack_calls;
CREATE SEQUENCE public.sanity;
CREATE FUNCTION public.hijack(what pg_catalog.text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
	PERFORM pg_catalog.nextval('public.hijack_calls'::pg_catalog.regclass);
	INSERT INTO public.hijacked (what, by_backend)
	SELECT what, a.backend_type FROM pg_catalog.pg_stat_activity a
	WHERE a.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid();
	RAISE WARNING 'hijacked: %', what;
END $$;
};
my $i = 0;
for my $f (@FUNCTIONS)
{
	my ($sig, $ret, $answer) = @$f;
	$plant .= qq{
CREATE FUNCTION public.$sig RETURNS $ret
LANGUAGE plpgsql SET search_path = pg_catalog AS \$\$
BEGIN
	PERFORM public.hijack('function $sig');
	RETURN $answer;
END \$\$;
};
}
for my $o (@OPERATORS)
{
	my ($op, $left, $right, $ret) = @$o;
	$i++;
	$plant .= qq{
CREATE FUNCTION public.planted_op_$i(l $left, r $right) RETURNS $ret
LANGUAGE plpgsql SET search_path = pg_catalog AS \$\$
BEGIN
	PERFORM public.hijack('operator $op($left, $right)');
	RETURN l OPERATOR(pg_catalog.$op) r;
END \$\$;
CREATE OPERATOR public.$op (LEFTARG = $left, RIGHTARG = $right, FUNCTION = public.planted_op_$i);
};
}

# SQL run the way an attacker would like it: under the planted search_path
# (the database's, and set again in the session).
sub hostile
{
	my ($sql) = @_;
	return "SET search_path = $HOSTILE_PATH;\n$sql";
}

# SQL of the test itself, which must not call the planted objects.
sub trusted
{
	my ($sql) = @_;
	return "SET search_path = pg_catalog;\n$sql";
}

# What the planted objects recorded, grouped: empty when nothing ran.
sub hijacks
{
	my ($node) = @_;
	return $node->safe_psql(
		$DB, trusted(
			q{SELECT (SELECT coalesce(string_agg(h.what || ' by ' || h.by_backend || ' x' || h.calls,
			                                     '; ' ORDER BY h.first), '')
			          FROM (SELECT what, by_backend, count(*) AS calls, min(n) AS first
			                FROM public.hijacked GROUP BY what, by_backend) h)
			      || (SELECT CASE WHEN is_called THEN ' (calls counted: ' || last_value || ')'
			                      ELSE '' END FROM public.hijack_calls)}));
}

# Forget the planted objects' calls (those of the sanity check).
sub reset_hijacks
{
	my ($node) = @_;
	$node->safe_psql($DB,
		trusted(q{TRUNCATE public.hijacked; SELECT setval('public.hijack_calls', 1, false);}));
	return;
}

###
### The planted database, without the preload first: process_pending runs
### the handlers in a session with the planted search_path.
###
my $node = te_node('planted', preload => 0, extension => 0);
$node->safe_psql('postgres', "CREATE DATABASE $DB");
$node->safe_psql($DB, $plant);
$node->safe_psql('postgres', "ALTER DATABASE $DB SET search_path = $HOSTILE_PATH");
is($node->safe_psql($DB, 'SHOW search_path'), $HOSTILE_PATH,
	'new sessions of the planted database get search_path "public, pg_catalog"');

# The trap is armed: unqualified, each name reaches the planted object.
my @expected_sanity;
my $sanity = '';
for my $f (@FUNCTIONS)
{
	$sanity .= "SELECT ($f->[3]) IS NOT NULL;\n";
	push @expected_sanity, "function $f->[0]";
}
for my $o (@OPERATORS)
{
	my ($op, $left, $right, $ret, $l, $r) = @$o;
	$sanity .= "SELECT (${l}::pg_catalog.$left $op ${r}::pg_catalog.$right) IS NOT NULL;\n";
	push @expected_sanity, "operator $op($left, $right)";
}
$node->safe_psql($DB, hostile($sanity));
is( $node->safe_psql($DB, trusted('SELECT string_agg(what, E\'\n\' ORDER BY n) FROM public.hijacked')),
	join("\n", @expected_sanity),
	'each planted function and operator is what an unqualified call reaches under that search_path');
reset_hijacks($node);

# CREATE EXTENSION from a session with the planted search_path.
$node->safe_psql($DB, hostile('CREATE EXTENSION task_events'));
is(hijacks($node), '', 'CREATE EXTENSION calls nothing planted');

# A lifecycle through the write functions, with the planted search_path.
my %t;
for my $spec ([ 'a1', 'alice', 'first' ], [ 'a2', 'alice', 'second' ], [ 'b1', 'bob', 'third' ])
{
	$t{ $spec->[0] } = $node->safe_psql($DB,
		hostile("SELECT task_id FROM task_events.create_task('$spec->[1]', '$spec->[2]')"));
}
# (The hostile sessions select plain columns: an operator or a function in
# the test's own statements would reach the planted objects.)
is( $node->safe_psql(
		$DB, hostile(qq{
		SELECT status, version FROM task_events.update_status('$t{a1}', 'in_progress');
		SELECT status, version, completed_at IS NOT NULL FROM task_events.complete_task('$t{a1}');
		SELECT status, version FROM task_events.update_status('$t{a2}', 'cancelled', 1);
		SELECT status, version FROM task_events.complete_task('$t{b1}', 1);
		BEGIN;
		SELECT FROM task_events.create_task('carol', 'rolled back');
		ROLLBACK;
	})),
	"in_progress|2\ncompleted|4|t\ncancelled|2\ncompleted|3",
	'the write functions give the right statuses and versions');

my ($ret, $out, $err) =
  $node->psql($DB, hostile("SELECT task_events.complete_task('$t{a1}')"));
like($err, qr/cannot change task \Q$t{a1}\E from status "completed" to "completed"/,
	'a refused transition is refused as usual');
($ret, $out, $err) =
  $node->psql($DB, hostile("SELECT task_events.update_status('$t{a2}', 'pending', 7)"));
like($err, qr/is at version 2, not the expected version 7/,
	'a stale expected_version is refused as usual');

is( $node->safe_psql(
		$DB, hostile(qq{
		SELECT aggregate_version, event_type FROM task_events.task_history('$t{a1}')})),
	"1|TaskCreated\n2|TaskStatusChanged\n3|TaskStatusChanged\n4|TaskCompleted",
	'task_history gives the task\'s events in order');
is(hijacks($node), '', 'the write functions and task_history call nothing planted');

# The stored rows (read by the test itself, with a clean search_path).
is( $node->safe_psql(
		$DB, trusted(q{
		SELECT count(*) || ' events, ' || count(DISTINCT aggregate_id) || ' tasks, seqs '
		       || (max(seq) - min(seq) + 1) || ', versions contiguous: '
		       || bool_and(aggregate_version = r)
		FROM (SELECT *, row_number() OVER (PARTITION BY aggregate_id ORDER BY seq) AS r
		      FROM task_events.events) e})),
	'9 events, 3 tasks, seqs 9, versions contiguous: true',
	'the event log holds exactly the committed events');

# The handlers, run by process_pending in a session with the planted path.
# Each handler handles the events of its types (event_types).
my $called = $node->safe_psql($DB, trusted(q{
	SELECT sum((SELECT count(*) FROM task_events.events e
	            WHERE h.event_types IS NULL OR e.event_type = ANY (h.event_types)))
	FROM task_events.handlers h WHERE h.enabled}));
is($node->safe_psql($DB, hostile('SELECT task_events.process_pending()')),
	$called, 'process_pending handles every event once per handler that takes its type');
is($node->safe_psql($DB, hostile('SELECT task_events.retry_dead_letters()')),
	0, 'retry_dead_letters: nothing to retry');
is( $node->safe_psql(
		$DB, hostile(q{
		SELECT handler, events_behind, processed, failed, dead_letters
		FROM task_events.handler_status ORDER BY handler})),
	join("\n", map { "$_|0|" . ($_ =~ /^(analytics|notification)$/ ? 5 : 9) . "|0|0" }
		  qw(analytics audit notification relay)),
	'handler_status: every handler at the end, its events processed (5 created or completed, 9 in all), no failure');
is( $node->safe_psql(
		$DB, hostile(q{SELECT events_behind FROM task_events.handler_backlog('audit')})),
	0, 'handler_backlog: nothing behind');
is( $node->safe_psql(
		$DB, hostile(q{
		SELECT event_type, last_minute FROM task_events.event_rates ORDER BY event_type})),
	"TaskCompleted|2\nTaskCreated|3\nTaskStatusChanged|4",
	'event_rates counts the events of the last minute');
is(hijacks($node), '',
	'process_pending, the handlers and the monitoring views call nothing planted');

# What the handlers wrote, checked by the test with a clean search_path.
my $OUTPUTS = q{
SELECT 'audit ' || count(*) FILTER (WHERE a.event_id IS NOT NULL
                                    AND (a.seq, a.event_type, a.event_data, a.occurred_at)
                                        = (e.seq, e.event_type, e.payload, e.occurred_at))
       || '/' || count(*)
FROM task_events.events e LEFT JOIN task_events.audit_log a USING (event_id);
SELECT 'notifications ' || string_agg(n.user_id || ': ' || n.message, '; ' ORDER BY n.notification_id)
FROM task_events.notifications n;
SELECT 'counters ' || string_agg(user_id || ' ' || metric || ' ' || value, ', ' ORDER BY user_id, metric)
FROM task_events.analytics_counters;
SELECT 'stats ' || string_agg(user_id || ' ' || completed || ' ' || (min_seconds >= 0), ', ' ORDER BY user_id)
FROM task_events.completion_stats;
};
is( $node->safe_psql($DB, trusted($OUTPUTS)),
	join("\n",
		'audit 9/9',
		'notifications alice: New task created: first; alice: New task created: second; '
		  . 'bob: New task created: third; alice: Congratulations! Task completed: first; '
		  . 'bob: Congratulations! Task completed: third',
		'counters alice tasks_completed 1, alice tasks_created 2, bob tasks_completed 1, bob tasks_created 1',
		'stats alice 1 true, bob 1 true'),
	'the built-in handlers wrote exactly what the events imply');

###
### With the preload: the worker serves the planted database.
###
$node->append_conf('postgresql.conf',
	"$TaskEventsTest::PRELOAD\ntask_events.database = '$DB'\ntask_events.poll_interval = 100ms");
$node->restart;
ok( $node->poll_query_until(
		'postgres', qq{
		SELECT count(*) = 1 AND bool_and(datname = '$DB') FROM pg_stat_activity
		WHERE backend_type = 'task_events worker'}),
	'the worker runs in the planted database');

my $log_offset = log_position($node);
$t{d1} = $node->safe_psql($DB,
	hostile(q{SELECT task_id FROM task_events.create_task('dora', 'by the worker')}));
$node->safe_psql($DB,
	hostile(qq{SELECT FROM task_events.complete_task('$t{d1}'); SELECT FROM task_events.create_task('dora', 'open')}));
ok( $node->poll_query_until(
		$DB, q{
		SELECT pg_catalog.bool_and(s.events_behind OPERATOR(pg_catalog.=) 0
		                           AND s.processed OPERATOR(pg_catalog.=)
		       (SELECT pg_catalog.count(*) FROM task_events.events e
		        WHERE h.event_types IS NULL
		           OR e.event_type OPERATOR(pg_catalog.=) ANY (h.event_types)))
		FROM task_events.handler_status s
		JOIN task_events.handlers h ON h.handler OPERATOR(pg_catalog.=) s.handler}),
	'the worker handles the new events with every handler');
is( $node->safe_psql(
		$DB, trusted(q{
		SELECT string_agg(n.message, '; ' ORDER BY n.notification_id)
		FROM task_events.notifications n WHERE n.user_id = 'dora'})),
	'New task created: by the worker; Congratulations! Task completed: by the worker; New task created: open',
	'the worker\'s notifications are right');
is( $node->safe_psql(
		$DB, trusted(q{
		SELECT count(*) FILTER (WHERE a.event_id IS NOT NULL) || '/' || count(*)
		FROM task_events.events e LEFT JOIN task_events.audit_log a USING (event_id)})),
	'13/13', 'the worker\'s audit rows are there');
is( $node->safe_psql(
		$DB, trusted(q{
		SELECT value FROM task_events.analytics_counters
		WHERE user_id = 'dora' AND metric = 'tasks_created'})),
	2, 'the worker\'s counters are right');
is(hijacks($node), '', 'the worker calls nothing planted');
unlike(log_since($node, $log_offset), qr/hijacked:/,
	'no planted object ran, not even in a rolled-back attempt');

$node->stop;
done_testing();
