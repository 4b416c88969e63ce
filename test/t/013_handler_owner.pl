# Rules protected here (issue 9, "Privileges"): a handler never runs with more
# privileges than the owner of its function, whoever calls it: the
# background workers (which connect as the bootstrap superuser) and
# task_events.process_pending() called by a superuser.
# - A role that owns a registered handler function and replaces its body
#   (CREATE OR REPLACE) gains nothing: ALTER ROLE ... SUPERUSER, writing a
#   superuser's table, COPY ... TO PROGRAM, reading task_events.handler_state,
#   a deferred trigger that would fire at the caller's commit, all fail with
#   42501; the attempt is counted in handler_status (failed, last_sqlstate)
#   and the event is dead-lettered after task_events.max_attempts; the role
#   stays a non-superuser and the superuser's table is unchanged.
# - The handler's writes are made as its owner: current_user inside the call
#   and a column DEFAULT current_user say the owner (session_user stays the
#   session's: the worker's role, or the caller's).
# - SET ROLE and SET SESSION AUTHORIZATION inside a handler fail (42501) even
#   when a superuser owns the function.
# - When the owner may no longer execute the function (REVOKE EXECUTE), a call
#   is a failed attempt (42501); granting it back and retrying the dead letter
#   handles the event.
# - The built-in handlers are not disturbed (exact comparison).
# The same scenario runs twice: in database postgres, served by the worker,
# and in database pp, which no worker serves (task_events.database names
# postgres), through process_pending.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

my $MAX_ATTEMPTS = 2;
my $node = te_node(
	'handler_owner',
	conf => "task_events.database = 'postgres'\n"
	  . "task_events.max_attempts = $MAX_ATTEMPTS\n"
	  . "task_events.retry_delay = 10ms\n"
	  . "task_events.poll_interval = 100ms");
wait_for_workers($node, 1);

my $superuser =
  $node->safe_psql('postgres', 'SELECT rolname FROM pg_roles WHERE oid = 10');
$node->safe_psql('postgres', 'CREATE ROLE mallory LOGIN');

# $cond (a query returning one boolean) becomes true: in postgres, where the
# worker runs the handlers, by polling; in pp by polling too, each poll
# first running the handler through process_pending, called by the
# superuser (a call makes at most one attempt at a failing event).
sub settle
{
	my ($db, $handler, $cond) = @_;
	return $node->poll_query_until($db, $cond) if $db eq 'postgres';
	return $node->poll_query_until($db,
		"SELECT public.step('$handler', \$cond\$$cond\$cond\$)");
}

sub rolsuper
{
	return $node->safe_psql('postgres',
		q{SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'});
}

# A statement as mallory (connected as her: no SET ROLE).
sub as_mallory
{
	my ($db, $sql) = @_;
	return $node->safe_psql($db, $sql, extra_params => [ '-U', 'mallory' ]);
}

sub scenario
{
	my ($db, $how) = @_;
	my $file = $node->basedir . "/mallory_was_here_$db";

	$node->safe_psql(
		$db, q{
		GRANT USAGE ON SCHEMA task_events TO mallory;
		GRANT CREATE ON SCHEMA public TO mallory;
		CREATE TABLE public.protected (x text);
		INSERT INTO public.protected VALUES ('only the superuser writes here');
	});
	# process_pending, then a condition: one poll of settle().
	$node->safe_psql(
		$db, q{
		CREATE FUNCTION public.step(handler text, cond text) RETURNS boolean
		LANGUAGE plpgsql AS $$
		DECLARE
			ok boolean;
		BEGIN
			PERFORM task_events.process_pending(handler);
			EXECUTE cond INTO ok;
			RETURN ok;
		END $$;
	}) unless $db eq 'postgres';

	# Mallory's objects.  The workers run with an empty search_path: every
	# name is qualified.
	as_mallory(
		$db, q{
		CREATE TABLE public.mallory_log (
			n bigserial PRIMARY KEY,
			seq bigint NOT NULL,
			title text,
			cur text,
			sess text,
			recorded_by text DEFAULT current_user,
			note text);
		CREATE FUNCTION public.mallory_handler(events task_events.events[]) RETURNS void
		LANGUAGE plpgsql AS $$
		DECLARE
			e task_events.events;
		BEGIN
			FOREACH e IN ARRAY events LOOP
				INSERT INTO public.mallory_log (seq, title, cur, sess)
				VALUES (e.seq, e.payload ->> 'task_title', current_user, session_user);
			END LOOP;
		END $$;
		-- A deferred trigger fires at commit, as whoever commits.
		CREATE TABLE public.mallory_deferred (seq bigint);
		CREATE FUNCTION public.mallory_at_commit() RETURNS trigger
		LANGUAGE plpgsql AS $$
		BEGIN
			ALTER ROLE mallory SUPERUSER;
			RETURN NULL;
		END $$;
		CREATE CONSTRAINT TRIGGER mallory_at_commit AFTER INSERT ON public.mallory_deferred
			DEFERRABLE INITIALLY DEFERRED
			FOR EACH ROW EXECUTE FUNCTION public.mallory_at_commit();
	});
	$node->safe_psql($db,
		q{INSERT INTO task_events.handlers (handler, function)
		  VALUES ('mallory', 'public.mallory_handler(task_events.events[])')});

	### The benign body: writes as mallory.
	create_tasks_in($node, $db, 3, 'benign');
	ok( settle(
			$db, 'mallory', q{
			SELECT events_behind = 0 AND processed = 3
			FROM task_events.handler_status WHERE handler = 'mallory'}),
		"$how: the benign handler handles its events");
	is( $node->safe_psql(
			$db, q{
			SELECT string_agg(DISTINCT cur || '/' || recorded_by || '/' || sess, ',')
			FROM public.mallory_log}),
		"mallory/mallory/$superuser",
		"$how: inside the handler current_user is its owner, and its rows are written as her (session_user stays $superuser)"
	);

	### The escalating body.
	as_mallory(
		$db, qq{
		CREATE OR REPLACE FUNCTION public.mallory_handler(events task_events.events[]) RETURNS void
		LANGUAGE plpgsql AS \$\$
		DECLARE
			e task_events.events;
		BEGIN
			FOREACH e IN ARRAY events LOOP
				CASE e.payload ->> 'task_title'
				WHEN 'escalate superuser' THEN
					ALTER ROLE mallory SUPERUSER;
				WHEN 'escalate protected' THEN
					INSERT INTO public.protected VALUES ('written by mallory');
				WHEN 'escalate program' THEN
					COPY (SELECT 1) TO PROGRAM 'touch $file';
				WHEN 'escalate handler_state' THEN
					INSERT INTO public.mallory_log (seq, title, note)
					SELECT e.seq, 'stolen', pg_catalog.string_agg(s.handler, ',')
					FROM task_events.handler_state s;
				WHEN 'escalate deferred' THEN
					INSERT INTO public.mallory_deferred VALUES (e.seq);
				ELSE
					INSERT INTO public.mallory_log (seq, title, cur, sess)
					VALUES (e.seq, e.payload ->> 'task_title', current_user, session_user);
				END CASE;
			END LOOP;
		END \$\$;
	});
	my @variants = qw(superuser protected program handler_state deferred);
	$node->safe_psql($db,
		join('', map { "SELECT FROM task_events.create_task('alice', 'escalate $_');\n" } @variants)
		  . "SELECT FROM task_events.create_task('alice', 'benign after');");
	ok( settle(
			$db, 'mallory', q{
			SELECT events_behind = 0 AND dead_letters = 5
			FROM task_events.handler_status WHERE handler = 'mallory'}),
		"$how: the escalating events are dead-lettered and the handler goes on");
	is( $node->safe_psql(
			$db, q{
			SELECT string_agg(e.payload ->> 'task_title' || ': ' || d.attempts || ' ' || d.sqlstate,
			                  ', ' ORDER BY d.seq)
			FROM task_events.dead_letters d JOIN task_events.events e USING (seq)
			WHERE d.handler = 'mallory'}),
		join(', ', map { "escalate $_: $MAX_ATTEMPTS 42501" } @variants),
		"$how: each escalation failed with 42501 and was dead-lettered after max_attempts = $MAX_ATTEMPTS"
	);
	is( $node->safe_psql(
			$db, q{
			SELECT failed >= 5 * pg_catalog.current_setting('task_events.max_attempts')::int
			       AND last_sqlstate = '42501'
			FROM task_events.handler_status WHERE handler = 'mallory'}),
		't',
		"$how: handler_status counts the failed attempts, with last_sqlstate 42501");
	is(rolsuper(), 'f', "$how: mallory is still not a superuser");
	is($node->safe_psql($db, 'SELECT string_agg(x, \',\') FROM public.protected'),
		'only the superuser writes here', "$how: the superuser's table is unchanged");
	ok(!-e $file, "$how: COPY TO PROGRAM ran nothing");
	is( $node->safe_psql(
			$db, q{
			SELECT count(*) FILTER (WHERE title = 'stolen') || '/'
			    || count(*) FILTER (WHERE title = 'benign after' AND recorded_by = 'mallory')
			FROM public.mallory_log}),
		'0/1',
		"$how: nothing was read from handler_state; the next event was handled, as mallory");

	### SET ROLE / SET SESSION AUTHORIZATION in a superuser's handler.
	$node->safe_psql(
		$db, q{
		CREATE FUNCTION public.role_switcher(events task_events.events[]) RETURNS void
		LANGUAGE plpgsql AS $$
		DECLARE
			e task_events.events;
		BEGIN
			FOREACH e IN ARRAY events LOOP
				IF e.payload ->> 'task_title' = 'switch role' THEN
					SET ROLE mallory;
				ELSIF e.payload ->> 'task_title' = 'switch session authorization' THEN
					SET SESSION AUTHORIZATION mallory;
				END IF;
			END LOOP;
		END $$;
		INSERT INTO task_events.handlers (handler, function)
		VALUES ('role_switcher', 'public.role_switcher(task_events.events[])');
		SELECT FROM task_events.create_task('alice', 'switch role');
		SELECT FROM task_events.create_task('alice', 'switch session authorization');
	});
	ok( settle(
			$db, 'role_switcher', q{
			SELECT events_behind = 0 AND dead_letters = 2
			FROM task_events.handler_status WHERE handler = 'role_switcher'}),
		"$how: a superuser's handler that switches roles is dead-lettered");
	is( $node->safe_psql(
			$db, q{
			SELECT string_agg(e.payload ->> 'task_title' || ': ' || d.sqlstate || ' '
			                  || (d.message LIKE 'cannot set parameter %'), ', ' ORDER BY d.seq)
			FROM task_events.dead_letters d JOIN task_events.events e USING (seq)
			WHERE d.handler = 'role_switcher'}),
		'switch role: 42501 true, switch session authorization: 42501 true',
		"$how: SET ROLE and SET SESSION AUTHORIZATION fail with 42501 even for a superuser's handler"
	);

	### REVOKE EXECUTE from the owner.
	as_mallory(
		$db, q{
		REVOKE EXECUTE ON FUNCTION public.mallory_handler(task_events.events[]) FROM PUBLIC, mallory;
	});
	my $revoked_seq = $node->safe_psql(
		$db, q{
		SELECT task_id FROM task_events.create_task('alice', 'after revoke') \gset
		SELECT seq FROM task_events.events WHERE aggregate_id = :'task_id';});
	die 'no event for the task "after revoke"' unless $revoked_seq =~ /^\d+$/;
	ok( settle(
			$db, 'mallory', qq{
			SELECT EXISTS (SELECT FROM task_events.dead_letters
			               WHERE handler = 'mallory' AND seq = $revoked_seq)}),
		"$how: once its owner may not execute it, the handler's event is dead-lettered");
	is( $node->safe_psql(
			$db, qq{
			SELECT attempts || ' ' || sqlstate || ' '
			       || (message LIKE 'the owner of handler function %mallory_handler(task_events.events[]) may not execute it')
			FROM task_events.dead_letters
			WHERE handler = 'mallory' AND seq = $revoked_seq}),
		"$MAX_ATTEMPTS 42501 true",
		"$how: the call failed with 42501, for max_attempts attempts");
	is( $node->safe_psql(
			$db, q{SELECT last_sqlstate FROM task_events.handler_status WHERE handler = 'mallory'}),
		'42501', "$how: handler_status shows the 42501");
	as_mallory($db,
		'GRANT EXECUTE ON FUNCTION public.mallory_handler(task_events.events[]) TO mallory');
	$node->safe_psql($db, q{SELECT task_events.retry_dead_letters('mallory')});
	ok( settle(
			$db, 'mallory', qq{
			SELECT NOT EXISTS (SELECT FROM task_events.dead_letters
			                   WHERE handler = 'mallory' AND seq = $revoked_seq)
			   AND EXISTS (SELECT FROM public.mallory_log
			               WHERE seq = $revoked_seq AND recorded_by = 'mallory')}),
		"$how: EXECUTE granted back, the retried event is handled, as mallory");

	is(rolsuper(), 'f', "$how: in the end mallory is still not a superuser");
	if ($db eq 'postgres')
	{
		wait_caught_up($node, $db);
	}
	else
	{
		$node->safe_psql($db, 'SELECT task_events.process_pending()');
	}
	handlers_match($node, "$how: the built-in handlers are exact", db => $db);
	return;
}

scenario('postgres', 'worker');

# A database no worker serves: the handlers run only through process_pending.
$node->safe_psql('postgres', 'CREATE DATABASE pp');
$node->safe_psql('pp', 'CREATE EXTENSION task_events');
scenario('pp', 'process_pending');

$node->stop;
done_testing();
