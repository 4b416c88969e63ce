-- A handler that fails on an event: each attempt is counted in
-- handler_state although the attempt itself rolls back; the events before it
-- are handled; after task_events.max_attempts attempts the event goes to
-- task_events.dead_letters and the handler moves on; the other handlers are
-- never held up.  retry_dead_letters() queues dead letters for one more
-- attempt each: a success deletes the dead letter, a failure puts it back
-- with attempts + 1 and the new error.  The retry settings are SUSET.
--
-- Checked on the tasks of users this file alone uses; events the earlier
-- files left are handled by the first call.  Uses regress.handler_outputs
-- from handlers.sql.

-- A handler that records every event it handles and fails on any event of
-- a task whose title starts with 'poison', unless the title was cured.  It
-- records before it raises: the failed attempt's row must be rolled back.
CREATE TABLE regress.poison_seen (
	n bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	seq bigint NOT NULL,
	title text NOT NULL
);
CREATE TABLE regress.poison_error (sqlstate text, message text);
INSERT INTO regress.poison_error VALUES ('P0001', 'poisoned');
CREATE TABLE regress.cured (title text PRIMARY KEY);
CREATE FUNCTION regress.poison(events task_events.events[]) RETURNS void AS $$
DECLARE
	e task_events.events;
	err regress.poison_error;
BEGIN
	FOREACH e IN ARRAY events LOOP
		INSERT INTO regress.poison_seen (seq, title) VALUES (e.seq, e.payload->>'task_title');
		IF e.payload->>'task_title' LIKE 'poison%'
		   AND NOT EXISTS (SELECT FROM regress.cured c WHERE c.title = e.payload->>'task_title') THEN
			SELECT * INTO err FROM regress.poison_error;
			RAISE EXCEPTION USING ERRCODE = err.sqlstate,
				MESSAGE = err.message || ': ' || (e.payload->>'task_title');
		END IF;
	END LOOP;
END
$$ LANGUAGE plpgsql;

-- The built-in handlers only.
CREATE FUNCTION regress.run_builtins() RETURNS bigint AS $$
	SELECT task_events.process_pending('analytics') + task_events.process_pending('audit')
		   + task_events.process_pending('notification')
$$ LANGUAGE sql;

-- Seqs of the events of nora's tasks, by title, for readable output.
CREATE FUNCTION regress.title_of(s bigint) RETURNS text AS $$
	SELECT payload->>'task_title' FROM task_events.events WHERE seq = s
$$ LANGUAGE sql;

-- Handle what the earlier files left (the new handler starts with them).
SELECT task_events.process_pending() >= 0 AS drained;
INSERT INTO task_events.handlers (handler, function, description)
VALUES ('poison', 'regress.poison(task_events.events[])', 'fails on poison tasks');
SELECT task_events.process_pending('poison') > 0 AS poison_handled_earlier_events;
SELECT task_events.process_pending() AS nothing_new;
SELECT handler, enabled, events_behind, failed, dead_letters
FROM task_events.handler_status ORDER BY handler;

-- The retry settings: their defaults, and SET works in the session.
SHOW task_events.max_attempts;
SHOW task_events.retry_delay;
SET task_events.max_attempts = 3;
SET task_events.retry_delay = 0;
SHOW task_events.max_attempts;
SHOW task_events.retry_delay;
-- They are SUSET: an ordinary role cannot change them.
CREATE ROLE regress_handler_user;
SET ROLE regress_handler_user;
SELECT * FROM regress.error_of($$SET task_events.max_attempts = 100$$);
SELECT * FROM regress.error_of($$SET task_events.retry_delay = 0$$);
RESET ROLE;
DROP ROLE regress_handler_user;

------------------------------------------------------------------------------
-- One poison event among good ones.
------------------------------------------------------------------------------
SELECT task_id AS task FROM task_events.create_task('nora', 'ok 1') \gset
SELECT seq AS ok1 FROM task_events.events WHERE aggregate_id = :'task' \gset
SELECT task_id AS task FROM task_events.create_task('nora', 'poison 1') \gset
SELECT seq AS p1 FROM task_events.events WHERE aggregate_id = :'task' \gset
SELECT task_id AS task FROM task_events.create_task('nora', 'ok 2') \gset
SELECT seq AS ok2 FROM task_events.events WHERE aggregate_id = :'task' \gset

-- Attempt 1: the event before the poison one is handled, the poison one's
-- row is rolled back, the attempt counted; the handler stops there.
SELECT task_events.process_pending('poison') AS handled;
SELECT title, seq = :ok1 AS is_ok1 FROM regress.poison_seen WHERE title IN ('ok 1', 'poison 1', 'ok 2') ORDER BY n;
SELECT failing_seq = :p1 AS failing_is_poison, attempts, retry_at IS NOT NULL AS retry_at_set,
	   last_error, last_sqlstate, last_error_at IS NOT NULL AS last_error_at_set
FROM task_events.handler_state WHERE handler = 'poison';
SELECT s.handler, s.events_behind, s.failed, s.dead_letters, s.last_error, s.last_sqlstate,
	   s.retry_attempts, s.retry_at IS NOT NULL AS retry_at_set
FROM task_events.handler_status s WHERE s.handler = 'poison';

-- The other handlers are not held up.
SELECT task_events.process_pending('audit') AS audit_handled;
SELECT task_events.process_pending('notification') AS notification_handled;
SELECT task_events.process_pending('analytics') AS analytics_handled;
SELECT handler, events_behind, failed FROM task_events.handler_status ORDER BY handler;
SELECT * FROM regress.handler_outputs('nora');

-- Attempt 2 fails too.
SELECT task_events.process_pending('poison') AS handled;
SELECT failing_seq = :p1 AS failing_is_poison, attempts, last_error
FROM task_events.handler_state WHERE handler = 'poison';

-- Attempt 3 = max_attempts: the event goes to the dead letters with the
-- last error, and the handler moves on to 'ok 2'.
SELECT task_events.process_pending('poison') IS NOT NULL AS ran;
SELECT handler, seq = :p1 AS is_poison, event_id = (SELECT event_id FROM task_events.events WHERE seq = :p1) AS event_id_matches,
	   attempts, sqlstate, message, failed_at IS NOT NULL AS failed_at_set, retry_requested
FROM task_events.dead_letters;
SELECT title FROM regress.poison_seen WHERE title IN ('ok 1', 'poison 1', 'ok 2') ORDER BY n;
SELECT failing_seq, attempts, retry_at FROM task_events.handler_state WHERE handler = 'poison';
SELECT s.handler, s.events_behind, s.failed, s.dead_letters, s.last_error, s.last_sqlstate,
	   s.retry_attempts, s.retry_at, s.position = :ok2 AS position_at_ok2
FROM task_events.handler_status s WHERE s.handler = 'poison';
SELECT task_events.process_pending() AS nothing_new;

-- The handler carries on with later events.
SELECT task_id AS ok3 FROM task_events.create_task('nora', 'ok 3') \gset
SELECT task_events.process_pending('poison') AS handled;
SELECT regress.run_builtins() AS builtins_handled;
SELECT title FROM regress.poison_seen WHERE title LIKE 'ok _' OR title LIKE 'poison%' ORDER BY n;

------------------------------------------------------------------------------
-- The backoff: task_events.retry_delay before the first retry, doubling at
-- each further attempt; no attempt before retry_at.  (Rolled back.)
------------------------------------------------------------------------------
BEGIN;
SELECT task_id AS p2 FROM task_events.create_task('nora', 'poison backoff') \gset
COMMIT;
SELECT regress.run_builtins() AS builtins_handled;
BEGIN;
SET LOCAL task_events.retry_delay = '1min';
SELECT task_events.process_pending('poison') AS handled;
SELECT attempts, retry_at - clock_timestamp() BETWEEN interval '50 s' AND interval '60 s' AS one_minute
FROM task_events.handler_state WHERE handler = 'poison';
-- Not due: no attempt.
SELECT task_events.process_pending('poison') AS handled;
SELECT attempts FROM task_events.handler_state WHERE handler = 'poison';
ROLLBACK;
BEGIN;
SET LOCAL task_events.retry_delay = 0;
SELECT task_events.process_pending('poison') AS handled;
SELECT attempts FROM task_events.handler_state WHERE handler = 'poison';
SET LOCAL task_events.retry_delay = '1min';
SELECT task_events.process_pending('poison') AS handled;
SELECT attempts, retry_at - clock_timestamp() BETWEEN interval '110 s' AND interval '120 s' AS two_minutes
FROM task_events.handler_state WHERE handler = 'poison';
ROLLBACK;
-- Rolled back, attempts included; dead-letter it for the next part.
SET task_events.max_attempts = 1;
SELECT task_events.process_pending('poison') IS NOT NULL AS ran;
SET task_events.max_attempts = 3;
SELECT regress.title_of(seq), attempts, message FROM task_events.dead_letters ORDER BY seq;

------------------------------------------------------------------------------
-- retry_dead_letters()
------------------------------------------------------------------------------
-- Queues each dead letter once; the count is returned.
SELECT task_events.retry_dead_letters('poison') AS queued;
SELECT task_events.retry_dead_letters('poison') AS queued_again;
SELECT task_events.retry_dead_letters('audit') AS queued_for_audit;
SELECT regress.title_of(seq), retry_requested FROM task_events.dead_letters ORDER BY seq;

-- A retry that fails again puts the dead letter back, attempts + 1, with
-- the new error.
UPDATE regress.poison_error SET sqlstate = '22012', message = 'still poisoned';
SELECT task_events.process_pending('poison') AS handled;
SELECT regress.title_of(seq), attempts, sqlstate, message, retry_requested
FROM task_events.dead_letters ORDER BY seq;
SELECT failed, dead_letters, last_error, last_sqlstate, events_behind
FROM task_events.handler_status WHERE handler = 'poison';
-- Not queued: no retry.
SELECT task_events.process_pending('poison') AS handled;
SELECT regress.title_of(seq), attempts FROM task_events.dead_letters ORDER BY seq;

-- A retry that succeeds deletes the dead letter; the event is handled once.
INSERT INTO regress.cured VALUES ('poison 1');
SELECT task_events.retry_dead_letters() AS queued;
SELECT task_events.process_pending('poison') AS handled;
SELECT regress.title_of(seq), attempts, message FROM task_events.dead_letters ORDER BY seq;
SELECT title, count(*) FROM regress.poison_seen WHERE title LIKE 'poison%' GROUP BY title ORDER BY title;
SELECT task_events.process_pending() AS nothing_new;

------------------------------------------------------------------------------
-- Retried dead letters count against max_events like any other event.
------------------------------------------------------------------------------
SET task_events.max_attempts = 1;
SELECT count(task_events.create_task('nora', 'poison ' || i)) AS created
FROM generate_series(2, 3) AS i;
SELECT task_events.process_pending('poison') IS NOT NULL AS ran;
SELECT regress.run_builtins() AS builtins_handled;
SELECT regress.title_of(seq), attempts FROM task_events.dead_letters ORDER BY seq;
INSERT INTO regress.cured VALUES ('poison 2'), ('poison 3'), ('poison backoff');
SELECT count(task_events.create_task('nora', 'ok ' || i)) AS created
FROM generate_series(4, 5) AS i;
SELECT regress.run_builtins() AS builtins_handled;
SELECT task_events.retry_dead_letters('poison') AS queued;
SELECT task_events.process_pending('poison', 2) AS handled;
SELECT task_events.process_pending('poison') IS NOT NULL AS ran;
SELECT task_events.process_pending() AS nothing_new;
-- In the end every event of nora's was handled exactly once.
SELECT count(*) AS dead_letters FROM task_events.dead_letters;
SELECT e.payload->>'task_title' AS title, count(s.n) AS times_handled
FROM task_events.events e LEFT JOIN regress.poison_seen s ON s.seq = e.seq
WHERE e.user_id = 'nora' GROUP BY e.seq, e.payload->>'task_title' ORDER BY e.seq;
SELECT * FROM regress.handler_outputs('nora');

-- Final state; removing the handler removes its state and dead letters.
RESET task_events.max_attempts;
RESET task_events.retry_delay;
SELECT handler, enabled, events_behind, dead_letters, retry_attempts
FROM task_events.handler_status ORDER BY handler;
DELETE FROM task_events.handlers WHERE handler = 'poison';
SELECT (SELECT count(*) FROM task_events.handler_state WHERE handler = 'poison') AS state_rows,
	   (SELECT count(*) FROM task_events.dead_letters WHERE handler = 'poison') AS dead_letters;

------------------------------------------------------------------------------
-- A cancel (here statement_timeout) during a handler cancels the statement
-- like anywhere else in PostgreSQL: process_pending() fails with 57014 and
-- rolls back; the cancel is not taken for a failure of the handler (no
-- attempt counted, no dead letter) and not swallowed (the call does not go
-- on and handle the event).
------------------------------------------------------------------------------
CREATE FUNCTION regress.slow(events task_events.events[]) RETURNS void AS $$
	SELECT pg_sleep(2) FROM unnest(events) AS e
	WHERE e.payload->>'task_title' = 'slow'
	  AND NOT EXISTS (SELECT FROM regress.cured c WHERE c.title = 'slow')
$$ LANGUAGE sql;
INSERT INTO task_events.handlers (handler, function)
VALUES ('slow', 'regress.slow(task_events.events[])');
SELECT task_events.process_pending('slow') >= 0 AS drained;
SELECT task_id AS slow FROM task_events.create_task('olga', 'slow') \gset
SET task_events.retry_delay = 0;
SET statement_timeout = '100ms';
\set VERBOSITY terse
SELECT task_events.process_pending('slow');
\set VERBOSITY default
RESET statement_timeout;
SELECT handler, events_behind, failed, dead_letters, retry_attempts, last_sqlstate
FROM task_events.handler_status WHERE handler = 'slow';
INSERT INTO regress.cured VALUES ('slow');
SELECT task_events.process_pending('slow') AS handled;
SELECT handler, events_behind, failed, dead_letters, retry_attempts
FROM task_events.handler_status WHERE handler = 'slow';
RESET task_events.retry_delay;
DELETE FROM task_events.handlers WHERE handler = 'slow';
