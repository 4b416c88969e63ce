/*
 * relay.sql: task_events.notify_mode decides who publishes.
 *
 * Rules protected (assertions are named after them):
 *   - relay: the writing transaction publishes nothing; the relay handler
 *     publishes each committed event once, with exactly the envelope commit
 *     mode sends, in seq order, never a rolled-back event;
 *   - relay: a transaction that wrote events can be prepared; its events
 *     are published after COMMIT PREPARED and never after ROLLBACK PREPARED;
 *   - off: nobody publishes, and the relay handler still moves past the
 *     events (switching to relay later does not replay them);
 *   - commit: the writer publishes and the relay handler does not publish
 *     again.
 *
 * The mode is server-wide (reload), so this file switches it with ALTER
 * SYSTEM from a separate connection and waits until the writer sees it; it
 * runs the relay handler through the writer with process_pending('relay').
 * It puts the setting back at the end.  The harness steps (set_notify_mode,
 * sync_listener, COMMIT PREPARED and ROLLBACK PREPARED) are statements that
 * raise an error on failure, not tests: every test is about task_events.
 */
BEGIN ISOLATION LEVEL READ COMMITTED;	-- each statement must see the writer's commits

SELECT plan(17);

\ir lib/listener_harness.psql

-- Switch notify_mode server-wide (NULL: back to the default) and wait until
-- the writer's session uses it; a harness step that raises an error when it
-- does not within 10 s.
CREATE PROCEDURE pg_temp.set_notify_mode(mode text) LANGUAGE plpgsql AS $$
DECLARE
	deadline timestamptz := clock_timestamp() + interval '10 seconds';
BEGIN
	PERFORM dblink_exec('other', $q$LOAD 'task_events'$q$);	-- defines the setting there
	IF mode IS NULL THEN
		PERFORM dblink_exec('other', 'ALTER SYSTEM RESET task_events.notify_mode');
	ELSE
		PERFORM dblink_exec('other', format('ALTER SYSTEM SET task_events.notify_mode = %L', mode));
	END IF;
	PERFORM * FROM dblink('other', 'SELECT pg_reload_conf()') AS r(ok boolean);
	LOOP
		EXIT WHEN (SELECT m FROM dblink('writer', $q$SELECT current_setting('task_events.notify_mode')$q$)
				   AS r(m text)) = coalesce(mode, 'commit');
		IF clock_timestamp() >= deadline THEN
			RAISE EXCEPTION 'set_notify_mode: the writer''s session did not load notify_mode % within 10 s',
				coalesce(mode, 'commit');
		END IF;
		PERFORM pg_sleep(0.01);
	END LOOP;
END
$$;

-- Run the relay handler in the writer's session; returns the events it handled.
CREATE FUNCTION pg_temp.relay() RETURNS bigint LANGUAGE sql AS $$
	SELECT n FROM dblink('writer', $q$SELECT task_events.process_pending('relay')$q$) AS r(n bigint)
$$;

-- Load the library in the writer's session, and move the relay handler past
-- the events earlier files wrote (commit mode: it publishes nothing), so
-- that only this file's events are relayed below.
SELECT * FROM dblink('writer', $q$SELECT task_id FROM task_events.create_task('pgtap-relay', 'Load the library')$q$)
	AS r(task_id uuid) \g /dev/null
CALL pg_temp.set_notify_mode('commit');
SELECT pg_temp.relay() \g /dev/null

------------------------------------------------------------------------------
-- relay
------------------------------------------------------------------------------

CALL pg_temp.set_notify_mode('relay');

DO $$
BEGIN
	PERFORM pg_temp.w_create('single', 'pgtap-relay', 'Relayed: "quoted", back\slash');
END
$$;
CALL pg_temp.sync_listener();
SELECT is(pg_temp.n_got('{single}'), 0::bigint,
	'relay: a committed create_task publishes nothing from the writing transaction');

SELECT is(pg_temp.relay(), 1::bigint, 'relay: the relay handler handles the committed event');
CALL pg_temp.sync_listener();
SELECT is(pg_temp.got('{single}'), pg_temp.want('{single}'),
	'relay: the relay handler publishes exactly the envelope commit mode sends, once');

DO $$
BEGIN
	PERFORM dblink_exec('writer', 'BEGIN');
	PERFORM pg_temp.w_create('multi', 'pgtap-relay', 'Four events, one transaction');
	PERFORM pg_temp.w_start_and_complete('multi');
	PERFORM dblink_exec('writer', 'COMMIT');
	PERFORM dblink_exec('writer', 'BEGIN');
	PERFORM pg_temp.w_create('rolled_back', 'pgtap-relay', 'Rolled back, never relayed');
	PERFORM dblink_exec('writer', 'ROLLBACK');
END
$$;
SELECT is(pg_temp.relay(), 4::bigint, 'relay: the relay handler handles the four committed events');
SELECT is(pg_temp.relay(), 0::bigint, 'relay: a second run finds nothing left');
CALL pg_temp.sync_listener();
SELECT is(pg_temp.got('{multi,single}'), pg_temp.want('{multi,single}'),
	'relay: every committed event is published once, in seq order, each exactly its envelope');
SELECT is(pg_temp.n_got('{rolled_back}'), 0::bigint, 'relay: a rolled-back event is never published');

------------------------------------------------------------------------------
-- relay with two-phase commit
------------------------------------------------------------------------------

DO $$
BEGIN
	PERFORM dblink_exec('writer', 'BEGIN');
	PERFORM pg_temp.w_create('prepared_committed', 'pgtap-relay', 'Prepared, then committed');
	PERFORM dblink_exec('writer', $q$PREPARE TRANSACTION 'te_relay_commit'$q$);
	PERFORM dblink_exec('writer', 'BEGIN');
	PERFORM pg_temp.w_create('prepared_rolled_back', 'pgtap-relay', 'Prepared, then rolled back');
	PERFORM dblink_exec('writer', $q$PREPARE TRANSACTION 'te_relay_rollback'$q$);
END
$$;
SELECT is_empty($$SELECT label, step, error FROM call_errors WHERE label LIKE 'prepared%'$$,
	'relay: a transaction that wrote events can be prepared');
SELECT is(pg_temp.relay(), 0::bigint, 'relay: prepared events are not handled before COMMIT PREPARED');
SELECT dblink_exec('other', $q$COMMIT PREPARED 'te_relay_commit'$q$) \g /dev/null
SELECT dblink_exec('other', $q$ROLLBACK PREPARED 'te_relay_rollback'$q$) \g /dev/null
SELECT is(pg_temp.relay(), 1::bigint, 'relay: the committed prepared event is handled');
CALL pg_temp.sync_listener();
SELECT ok(pg_temp.got('{prepared_committed}') = pg_temp.want('{prepared_committed}')
		  AND pg_temp.n_got('{prepared_rolled_back}') = 0,
	'relay: COMMIT PREPARED events are published exactly, ROLLBACK PREPARED ones never');

------------------------------------------------------------------------------
-- relay with a hand-built batch: a NULL column is an error, not a crash
------------------------------------------------------------------------------

SELECT throws_ok($$SELECT * FROM dblink('writer', $q$SELECT task_events.relay_handler(ARRAY[ROW(1,
		gen_random_uuid(), NULL, 1, gen_random_uuid(), 1, now(), 'u', '{}', '1')::task_events.events])$q$)
		AS r(x text)$$,
	'22004', NULL, 'relay: a hand-built event with a NULL event_type is refused with 22004');
SELECT throws_ok($$SELECT * FROM dblink('writer', $q$SELECT task_events.relay_handler(ARRAY[ROW(1,
		gen_random_uuid(), 'TaskCreated', 1, gen_random_uuid(), 1, now(), 'u', NULL, '1')::task_events.events])$q$)
		AS r(x text)$$,
	'22004', NULL, 'relay: a hand-built event with a NULL payload is refused with 22004');
SELECT is(pg_temp.relay(), 0::bigint, 'relay: the writer''s backend survived the hand-built batches');

------------------------------------------------------------------------------
-- off, then commit
------------------------------------------------------------------------------

CALL pg_temp.set_notify_mode('off');
DO $$
BEGIN
	PERFORM pg_temp.w_create('off', 'pgtap-relay', 'Never published');
END
$$;
SELECT is(pg_temp.relay(), 1::bigint, 'off: the relay handler moves past the event');

CALL pg_temp.set_notify_mode(NULL);	-- the default, commit
DO $$
BEGIN
	PERFORM pg_temp.w_create('commit', 'pgtap-relay', 'Published by the writer');
END
$$;
SELECT is(pg_temp.relay(), 1::bigint, 'commit: the relay handler moves past the event');
CALL pg_temp.sync_listener();
SELECT ok(pg_temp.n_got('{off}') = 0 AND pg_temp.got('{commit}') = pg_temp.want('{commit}'),
	'off publishes nothing, not even later; commit publishes once, from the writer only');

DO $$
BEGIN
	PERFORM dblink_disconnect('listener');
	PERFORM dblink_disconnect('writer');
	PERFORM dblink_disconnect('other');
END
$$;

SELECT * FROM finish();
ROLLBACK;
