/*
 * publishing.sql: every event is published with NOTIFY on channel
 * task_events when, and only when, its transaction commits.
 *
 * Rules protected (assertions are named after them):
 *   - a committed write publishes exactly one notification per event, on
 *     channel task_events, whose payload is exactly
 *       {"event_type": <json string>, "event_data": <payload::text>,
 *        "timestamp": <payload timestamp as a json string>, "seq": <seq>}
 *     built from the event's row;
 *   - nothing is published before the writing transaction commits;
 *   - notifications of one transaction arrive in seq order, also when the
 *     transaction writes several tasks;
 *   - a rolled-back transaction, or a part rolled back to a savepoint, is
 *     never published (while the committed rest is);
 *   - any valid input (500-character titles of 4-byte characters, quotes,
 *     backslashes, newlines, control characters; 200-character user_ids of
 *     control characters) succeeds and yields valid JSON under the 8000-byte
 *     NOTIFY limit that round-trips the title and user_id.
 *
 * How: dblink.  A "listener" connection LISTENs; a "writer" connection makes
 * the write calls, which commit (or roll back) on their own, independently
 * of this file's transaction.  To know that the listener has received
 * everything committed so far, sync_listener() commits a marker NOTIFY on
 * a second channel from a third connection and polls until the marker
 * arrives: the server delivers notifications in commit order, so every
 * earlier commit's notifications have arrived by then, which makes the
 * counts below exact.  No sleeps as synchronisation, only that poll.  The
 * harness steps (sync_listener, the writer's COMMIT) are statements that
 * raise an error on failure, not tests: every test is about task_events.
 *
 * Committed rows stay in the database (the log is append-only); every
 * query is restricted to the tasks this file created.
 */
BEGIN ISOLATION LEVEL READ COMMITTED;	-- each statement must see the writer's commits

SELECT plan(24);

\ir lib/listener_harness.psql

------------------------------------------------------------------------------
-- One committed create_task
------------------------------------------------------------------------------

DO $$
BEGIN
	PERFORM pg_temp.w_create('single', 'pgtap-publisher', 'Publish me: "quoted", back\slash');
END
$$;

CALL pg_temp.sync_listener();

SELECT is(pg_temp.n_got('{single}'), 1::bigint,
	'a committed create_task publishes exactly one notification');

SELECT is(pg_temp.got('{single}'), pg_temp.want('{single}'),
	'the TaskCreated notification is exactly {"event_type", "event_data" = payload, "timestamp", "seq"} built from its events row');

------------------------------------------------------------------------------
-- create, update_status, complete_task in one transaction
------------------------------------------------------------------------------

DO $$
BEGIN
	PERFORM dblink_exec('writer', 'BEGIN');
	PERFORM pg_temp.w_create('multi', 'pgtap-publisher', 'Four events, one transaction');
	PERFORM pg_temp.w_start_and_complete('multi');
END
$$;

CALL pg_temp.sync_listener();

SELECT is(pg_temp.n_got('{multi}'), 0::bigint,
	'nothing is published while the writing transaction is still open');

SELECT dblink_exec('writer', 'COMMIT') \g /dev/null
CALL pg_temp.sync_listener();

SELECT is(pg_temp.n_got('{multi}'), 4::bigint,
	'create + update_status + complete_task committed together publish exactly 4 notifications');

SELECT is(
	ARRAY(SELECT pg_temp.try_json(extra)->>'event_type' FROM received_mine WHERE label = 'multi' ORDER BY ord),
	ARRAY['TaskCreated', 'TaskStatusChanged', 'TaskStatusChanged', 'TaskCompleted'],
	'the transaction''s notifications arrive as TaskCreated, TaskStatusChanged, TaskStatusChanged, TaskCompleted');

SELECT is(
	ARRAY(SELECT (pg_temp.try_json(extra)->>'seq')::bigint FROM received_mine WHERE label = 'multi' ORDER BY ord),
	ARRAY(SELECT seq FROM expected_mine WHERE label = 'multi' ORDER BY seq),
	'notifications of one transaction arrive in seq order');

SELECT is(pg_temp.got('{multi}'), pg_temp.want('{multi}'),
	'each of the transaction''s notifications is exactly the envelope of its event, in seq order');

------------------------------------------------------------------------------
-- Two tasks interleaved in one transaction
------------------------------------------------------------------------------

DO $$
BEGIN
	PERFORM dblink_exec('writer', 'BEGIN');
	PERFORM pg_temp.w_create('inter1', 'pgtap-publisher', 'Interleaved 1');
	PERFORM pg_temp.w_create('inter2', 'pgtap-publisher-2', 'Interleaved 2');
	PERFORM pg_temp.w_exec('inter1', 'update_status',
		format('SELECT task_events.update_status(%L, %L)::text', pg_temp.tid('inter1'), 'in_progress'));
	PERFORM pg_temp.w_exec('inter2', 'complete_task',
		format('SELECT task_events.complete_task(%L)::text', pg_temp.tid('inter2')));
	PERFORM pg_temp.w_exec('inter1', 'complete_task',
		format('SELECT task_events.complete_task(%L)::text', pg_temp.tid('inter1')));
	PERFORM dblink_exec('writer', 'COMMIT');
END
$$;

CALL pg_temp.sync_listener();

SELECT is(pg_temp.n_got('{inter1,inter2}'), 7::bigint,
	'a transaction writing two tasks publishes exactly one notification per event (4 + 3)');

SELECT is(pg_temp.got('{inter1,inter2}'), pg_temp.want('{inter1,inter2}'),
	'a transaction writing two tasks publishes their events in seq order across both tasks, each exactly its envelope');

------------------------------------------------------------------------------
-- Rolled back: never published
------------------------------------------------------------------------------

DO $$
BEGIN
	PERFORM dblink_exec('writer', 'BEGIN');
	PERFORM pg_temp.w_create('rolled_back', 'pgtap-publisher', 'Rolled back, never published');
	PERFORM dblink_exec('writer', 'ROLLBACK');
	PERFORM pg_temp.w_create('after_rollback', 'pgtap-publisher', 'Committed after a rollback');
END
$$;

CALL pg_temp.sync_listener();

SELECT isnt(pg_temp.tid('rolled_back'), NULL,
	'create_task inside the rolled-back transaction succeeded before the rollback');

SELECT is(pg_temp.n_got('{rolled_back}'), 0::bigint,
	'a rolled-back create_task is never published');

SELECT is(pg_temp.got('{after_rollback}'), pg_temp.want('{after_rollback}'),
	'the create_task committed after a rollback is published exactly once, with its exact envelope');

DO $$
BEGIN
	PERFORM dblink_exec('writer', 'BEGIN');
	PERFORM pg_temp.w_create('savepoint_kept_1', 'pgtap-publisher', 'Before the savepoint');
	PERFORM dblink_exec('writer', 'SAVEPOINT s');
	PERFORM pg_temp.w_create('savepoint_rolled_back', 'pgtap-publisher', 'Rolled back to a savepoint');
	PERFORM pg_temp.w_start_and_complete('savepoint_rolled_back');
	PERFORM dblink_exec('writer', 'ROLLBACK TO SAVEPOINT s');
	PERFORM pg_temp.w_create('savepoint_kept_2', 'pgtap-publisher', 'After the savepoint');
	PERFORM dblink_exec('writer', 'COMMIT');
END
$$;

CALL pg_temp.sync_listener();

SELECT is(pg_temp.n_got('{savepoint_rolled_back}'), 0::bigint,
	'events rolled back to a savepoint are never published');

SELECT is(pg_temp.got('{savepoint_kept_1,savepoint_kept_2}'), pg_temp.want('{savepoint_kept_1,savepoint_kept_2}'),
	'the committed rest of a transaction with a rolled-back savepoint is published, in seq order, exactly');

------------------------------------------------------------------------------
-- Hostile but valid input: valid JSON under the NOTIFY limit
------------------------------------------------------------------------------

DO $$
DECLARE
	-- quotes, backslashes, line breaks, C0 controls, DEL, U+2028, 4-byte
	-- characters, and text that looks like JSON escapes.
	pool text := '"' || '\' || E'\n' || E'\r' || E'\t' || chr(1) || chr(8) || chr(12)
		|| chr(27) || chr(31) || chr(127) || chr(8232) || chr(128512) || '''' || '/'
		|| '{' || '}' || ':' || ',';
	mixed text := (SELECT string_agg(substr(pool, g % length(pool) + 1, 1), '')
				   FROM generate_series(0, 499) g);
	controls text := (SELECT string_agg(chr(1 + g % 31), '') FROM generate_series(0, 199) g);
BEGIN
	-- 500 four-byte characters; user_id of 200 chr(1).
	PERFORM pg_temp.w_create('hostile_4byte', repeat(chr(1), 200), repeat(chr(128512), 500));
	-- 500 characters mixing everything JSON must escape.
	PERFORM pg_temp.w_create('hostile_mixed', controls, mixed);
	-- The largest escaped size: every character becomes \u00XX.
	PERFORM pg_temp.w_create('hostile_largest', repeat(chr(31), 200), repeat(chr(1), 500));
	-- Text that looks like escapes and closing JSON.
	PERFORM pg_temp.w_create('hostile_lookalike', '"}, "seq": 0, \u0000',
		repeat('\u0000', 75) || '"}, "event_type": "x", \"');
	PERFORM pg_temp.w_start_and_complete('hostile_4byte');
	PERFORM pg_temp.w_start_and_complete('hostile_mixed');
	PERFORM pg_temp.w_start_and_complete('hostile_largest');
	PERFORM pg_temp.w_start_and_complete('hostile_lookalike');
END
$$;

CALL pg_temp.sync_listener();

SELECT results_eq(
	$$SELECT m.label, char_length(t.title), char_length(t.user_id)
	  FROM mine m JOIN task_events.tasks t USING (task_id)
	  WHERE m.label IN ('hostile_4byte', 'hostile_mixed', 'hostile_largest') ORDER BY m.label$$,
	$$VALUES ('hostile_4byte', 500, 200), ('hostile_largest', 500, 200), ('hostile_mixed', 500, 200)$$,
	'hostile titles of 500 characters and user_ids of 200, the maximum allowed, are stored whole');

SELECT is_empty(
	$$SELECT label, step, error FROM call_errors WHERE label LIKE 'hostile%'$$,
	'create_task, update_status and complete_task succeed for hostile titles and user_ids');

SELECT is(pg_temp.n_got('{hostile_4byte,hostile_mixed,hostile_largest,hostile_lookalike}'), 16::bigint,
	'every event of the hostile tasks is published: 4 tasks x 4 events');

SELECT is_empty(
	$$SELECT label, ord, left(extra, 200) FROM received_mine
	  WHERE label LIKE 'hostile%' AND pg_temp.try_json(extra) IS NULL$$,
	'every notification for hostile input is valid JSON');

SELECT is_empty(
	$$SELECT r.label, r.ord FROM received_mine r JOIN mine m USING (label)
	  WHERE r.label LIKE 'hostile%'
	    AND (pg_temp.try_json(r.extra)->'event_data'->>'task_title') IS DISTINCT FROM m.title$$,
	'event_data.task_title of every hostile notification parses back to the exact title');

SELECT is_empty(
	$$SELECT r.label, r.ord FROM received_mine r JOIN mine m USING (label)
	  WHERE r.label LIKE 'hostile%'
	    AND pg_temp.try_json(r.extra)->>'event_type' IN ('TaskCreated', 'TaskCompleted')
	    AND (pg_temp.try_json(r.extra)->'event_data'->>'user_id') IS DISTINCT FROM m.user_id$$,
	'event_data.user_id of every hostile TaskCreated and TaskCompleted parses back to the exact user_id');

SELECT is_empty(
	$$SELECT label, ord, octet_length(extra) FROM received_mine
	  WHERE label LIKE 'hostile%' AND octet_length(extra) >= 8000$$,
	'every notification for hostile input is under the 8000-byte NOTIFY limit');

SELECT is(pg_temp.got('{hostile_4byte,hostile_mixed,hostile_largest,hostile_lookalike}'),
		  pg_temp.want('{hostile_4byte,hostile_mixed,hostile_largest,hostile_lookalike}'),
	'every hostile notification is exactly the envelope built from its events row');

------------------------------------------------------------------------------
-- Over everything this file committed
------------------------------------------------------------------------------

SELECT is(ARRAY(SELECT DISTINCT channel FROM received_mine), ARRAY['task_events'],
	'events are published on channel task_events');

SELECT is_empty(
	$$SELECT label, step, error FROM call_errors$$,
	'every write call made through the writer succeeded');

DO $$
BEGIN
	PERFORM dblink_disconnect('listener');
	PERFORM dblink_disconnect('writer');
	PERFORM dblink_disconnect('other');
END
$$;

SELECT * FROM finish();
ROLLBACK;
