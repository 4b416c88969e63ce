# Rules protected here (issue 9, "A handler that misbehaves": it never
# returns): task_events.handler_timeout (reload; default one minute; 0 = no
# limit) bounds one handler call, in a worker and in process_pending().
# - The default is 1min; a new value applies after a reload.
# - A call over the limit is canceled, whatever it waits on (pg_sleep, a row
#   lock held by another session): a failed attempt with SQLSTATE 57014 and
#   a message naming task_events.handler_timeout, shown in handler_status;
#   the event is retried with backoff and dead-lettered after
#   task_events.max_attempts; the events after it wait, the events before
#   it in the batch are kept.
# - Meanwhile, with one worker, the other handlers keep up: events written
#   while the calls are being canceled are handled by analytics, audit and
#   notification (exact comparison at the end).
# - The session holding the lock is not disturbed, and once it lets go the
#   handler handles the next event of that kind.
# - process_pending(): a call over the limit is canceled and counted like
#   in a worker; process_pending itself returns normally.
# - handler_timeout = 0: a handler that takes a while (pg_sleep(2)) is not
#   canceled.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

# max_attempts is high at first, so that the canceled events stay in
# retry while the other handlers are watched, and lowered later.
my $node = te_node(
	'handler_timeout',
	conf => "task_events.database = 'postgres'\n"
	  . "task_events.max_attempts = 1000\n"
	  . "task_events.retry_delay = 200ms\n"
	  . "task_events.poll_interval = 100ms");
wait_for_workers($node, 1);
is($node->safe_psql('postgres', 'SHOW task_events.worker_count'), '1', 'one worker');
is($node->safe_psql('postgres', 'SHOW task_events.handler_timeout'),
	'1min', 'handler_timeout is one minute by default');

# A reload setting: once a new session sees the new value, the postmaster
# has reloaded and signalled the worker, which rereads the file before its
# next batch.
sub reload_setting
{
	my ($name, $value, $shown) = @_;
	$node->safe_psql('postgres',
		"ALTER SYSTEM SET task_events.$name = $value; SELECT pg_reload_conf();");
	$node->poll_query_until('postgres', "SHOW task_events.$name", $shown)
	  or die "task_events.$name was not reloaded";
	return;
}
reload_setting('handler_timeout', q{'300ms'}, '300ms');
my $CANCELED = 'handler call canceled after task_events.handler_timeout (300 ms)';

# a_lock waits for a row lock on 'locked' events, a_sleep sleeps an hour on
# 'sleep' events (and 2 s on 'nap' ones); both record what they handled.
# Their names sort before the built-in handlers, which the worker runs after
# them in each round.
my $HANDLERS = q{
CREATE TABLE public.lockme (id int PRIMARY KEY);
INSERT INTO public.lockme VALUES (1);
CREATE TABLE public.done (handler text NOT NULL, seq bigint NOT NULL, title text NOT NULL);
CREATE FUNCTION public.a_lock(events task_events.events[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
	e task_events.events;
BEGIN
	FOREACH e IN ARRAY events LOOP
		IF e.payload ->> 'task_title' LIKE 'locked%' THEN
			PERFORM FROM public.lockme WHERE id OPERATOR(pg_catalog.=) 1 FOR UPDATE;
		END IF;
		INSERT INTO public.done VALUES ('a_lock', e.seq, e.payload ->> 'task_title');
	END LOOP;
END $$;
CREATE FUNCTION public.a_sleep(events task_events.events[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
	e task_events.events;
BEGIN
	FOREACH e IN ARRAY events LOOP
		IF e.payload ->> 'task_title' LIKE 'sleep%' THEN
			PERFORM pg_catalog.pg_sleep(3600);
		ELSIF e.payload ->> 'task_title' LIKE 'nap%' THEN
			PERFORM pg_catalog.pg_sleep(2);
		END IF;
		INSERT INTO public.done VALUES ('a_sleep', e.seq, e.payload ->> 'task_title');
	END LOOP;
END $$;
-- process_pending then a condition, in one poll.
CREATE FUNCTION public.step(handler text, cond text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
	ok boolean;
BEGIN
	PERFORM task_events.process_pending(handler);
	EXECUTE cond INTO ok;
	RETURN ok;
END $$;
};

sub status
{
	my ($db, $handler, $columns) = @_;
	return $node->safe_psql($db,
		"SELECT $columns FROM task_events.handler_status WHERE handler = '$handler'");
}

sub dead_letter
{
	my ($db, $handler, $title) = @_;
	return $node->safe_psql(
		$db, qq{
		SELECT d.attempts || '|' || d.sqlstate || '|' || d.message
		FROM task_events.dead_letters d JOIN task_events.events e USING (seq)
		WHERE d.handler = '$handler' AND e.payload ->> 'task_title' = '$title'});
}

sub done_titles
{
	my ($db, $handler) = @_;
	return $node->safe_psql($db,
		"SELECT string_agg(title, ',' ORDER BY seq) FROM public.done WHERE handler = '$handler'");
}

$node->safe_psql('postgres', $HANDLERS);

# The test's open transaction holds the row lock a_lock will wait for.
my $holder = $node->background_psql('postgres');
$holder->query_safe('BEGIN');
$holder->query_safe('SELECT FROM public.lockme WHERE id = 1 FOR UPDATE');

$node->safe_psql(
	'postgres', q{
	INSERT INTO task_events.handlers (handler, function) VALUES
		('a_lock', 'public.a_lock(task_events.events[])'),
		('a_sleep', 'public.a_sleep(task_events.events[])');
});
create_tasks($node, 2, 'before');
create_tasks($node, 1, 'sleep');
create_tasks($node, 1, 'locked');
create_tasks($node, 2, 'after');

ok( $node->poll_query_until(
		'postgres', q{
		SELECT count(*) = 2 FROM task_events.handler_status
		WHERE handler IN ('a_lock', 'a_sleep') AND retry_attempts >= 1 AND last_sqlstate = '57014'}),
	'both calls are canceled: a failed attempt with 57014 each');

### While they are being retried, the built-in handlers keep up.
create_tasks($node, 5, 'meanwhile');
ok( $node->poll_query_until(
		'postgres', q{
		SELECT bool_and(events_behind = 0)
		   AND (SELECT count(*) FROM task_events.audit_log
		        WHERE event_data ->> 'task_title' LIKE 'meanwhile %') = 5
		FROM task_events.handler_status
		WHERE handler IN ('analytics', 'audit', 'notification')}),
	'the built-in handlers handle the events written meanwhile');
ok( $node->poll_query_until(
		'postgres', q{
		SELECT count(*) = 2 FROM task_events.handler_status
		WHERE handler IN ('a_lock', 'a_sleep') AND retry_attempts >= 2}),
	'the canceled events are retried');
for my $h ('a_lock', 'a_sleep')
{
	is(status('postgres', $h, q{dead_letters || '|' || (events_behind > 0) || '|' || last_sqlstate
			|| '|' || last_error || '|' || (failed >= 2) || '|' || (retry_at > last_error_at)}),
		"0|true|57014|$CANCELED|true|true",
		"$h: still retrying, behind, the failures counted with 57014 and the handler_timeout message, the next attempt after a backoff"
	);
	is(done_titles('postgres', $h), 'before 1,before 2' . ($h eq 'a_lock' ? ',sleep 1' : ''),
		"$h: the events before the canceled one are handled, the ones after it wait");
}

### Dead-lettered after max_attempts.
reload_setting('max_attempts', 3, '3');
ok( $node->poll_query_until(
		'postgres', q{
		SELECT count(*) = 2 FROM task_events.handler_status
		WHERE handler IN ('a_lock', 'a_sleep') AND dead_letters = 1 AND events_behind = 0}),
	'max_attempts lowered to 3: both canceled events are dead-lettered and the handlers go on');
like(dead_letter('postgres', 'a_lock', 'locked 1'),
	qr/^\d+\|57014\|\Q$CANCELED\E$/, 'a_lock: the dead letter has 57014 and the handler_timeout message');
like(dead_letter('postgres', 'a_sleep', 'sleep 1'),
	qr/^\d+\|57014\|\Q$CANCELED\E$/, 'a_sleep: the dead letter has 57014 and the handler_timeout message');
is(done_titles('postgres', 'a_sleep'),
	'before 1,before 2,locked 1,after 1,after 2,meanwhile 1,meanwhile 2,meanwhile 3,meanwhile 4,meanwhile 5',
	'a_sleep: every other event handled, in order');

# A new sleeping event: exactly max_attempts attempts.
create_tasks($node, 1, 'sleep again');
ok( $node->poll_query_until(
		'postgres', q{
		SELECT dead_letters = 2 AND events_behind = 0
		FROM task_events.handler_status WHERE handler = 'a_sleep'}),
	'a new sleeping event is dead-lettered too');
is(dead_letter('postgres', 'a_sleep', 'sleep again 1'),
	"3|57014|$CANCELED", 'after max_attempts = 3 canceled calls');

# The lock holder was not disturbed; once it lets go, a_lock locks the row.
is($holder->query_safe('SELECT count(*) FROM public.lockme'),
	1, 'the session holding the lock is still in its transaction');
$holder->query_safe('COMMIT');
$holder->quit;
create_tasks($node, 1, 'locked again');
ok( $node->poll_query_until(
		'postgres',
		q{SELECT EXISTS (SELECT FROM public.done WHERE handler = 'a_lock' AND title = 'locked again 1')}),
	'with the lock free, a_lock handles a locking event');
is(status('postgres', 'a_lock', 'dead_letters'), 1, 'a_lock: no new dead letter');

wait_caught_up($node);
handlers_match($node, 'the built-in handlers are exact');

### process_pending, in database pp, which no worker serves.
$node->safe_psql('postgres', 'CREATE DATABASE pp');
$node->safe_psql('pp', 'CREATE EXTENSION task_events');
$node->safe_psql('pp', $HANDLERS);
$node->safe_psql('pp',
	q{INSERT INTO task_events.handlers (handler, function)
	  VALUES ('a_sleep', 'public.a_sleep(task_events.events[])')});
create_titled_tasks('pp', 'before 1', 'sleep 1', 'after 1');
my ($rc, $out, $err) =
  $node->psql('pp', q{SELECT task_events.process_pending('a_sleep')}, on_error_stop => 1);
is($rc . '|' . $out, '0|1',
	'process_pending returns normally, having handled the event before the sleeping one')
  or diag($err);
is(status('pp', 'a_sleep', q{failed || '|' || last_sqlstate || '|' || last_error}),
	"1|57014|$CANCELED", 'process_pending: the canceled call is counted with 57014');
ok( $node->poll_query_until(
		'pp', q{SELECT public.step('a_sleep', $$
		SELECT dead_letters = 1 AND events_behind = 0
		FROM task_events.handler_status WHERE handler = 'a_sleep'$$)}),
	'process_pending: the sleeping event is dead-lettered');
is(dead_letter('pp', 'a_sleep', 'sleep 1'), "3|57014|$CANCELED",
	'process_pending: after max_attempts = 3 canceled calls');
is(done_titles('pp', 'a_sleep'), 'before 1,after 1',
	'process_pending: the other events are handled');

### handler_timeout = 0: no limit.
reload_setting('handler_timeout', 0, '0');
my $failed = status('postgres', 'a_sleep', 'failed');
create_tasks($node, 1, 'nap');
ok( $node->poll_query_until(
		'postgres',
		q{SELECT EXISTS (SELECT FROM public.done WHERE handler = 'a_sleep' AND title = 'nap 1')}),
	'handler_timeout = 0: a call taking two seconds completes');
is(status('postgres', 'a_sleep', q{failed || '|' || dead_letters}),
	"$failed|2", 'handler_timeout = 0: no new failed attempt');

wait_caught_up($node);
handlers_match($node, 'in the end the built-in handlers are exact');

$node->stop;
done_testing();

sub create_titled_tasks
{
	my ($db, @titles) = @_;
	$node->safe_psql($db,
		join "\n", map { "SELECT FROM task_events.create_task('alice', '$_');" } @titles);
	return;
}
