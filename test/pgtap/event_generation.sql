/*
 * event_generation.sql: the events the write functions append to the log.
 *
 * Rules protected (one assertion or more each, named after the rule):
 *   - the contract's schema: task_status labels, the columns and types of
 *     tasks and events, their primary keys and unique constraints, and the
 *     signatures of create_task, update_status, complete_task, task_history;
 *   - create_task returns a pending task at version 1 and writes exactly one
 *     TaskCreated event;
 *   - every status change writes exactly one TaskStatusChanged; moving to
 *     completed (by complete_task or update_status) writes TaskStatusChanged
 *     then TaskCompleted and sets completed_at; every event adds one to the
 *     task's version (pending -> in_progress -> completed ends at 4);
 *   - aggregate_version is contiguous from 1 per task, seq order agrees with
 *     it, and tasks.version is the aggregate_version of the latest event;
 *   - task_history returns the task's events ordered by aggregate_version;
 *   - the exact key set of each payload type, event_version = 1, payload
 *     event_id / aggregate_id / user_id / task_title agree with the row and
 *     the task, the payload timestamp is ISO 8601 in UTC and equals
 *     occurred_at whatever the session's TimeZone;
 *   - event ids are UUIDv7: version nibble 7, variant 10xx, and the 48-bit
 *     unix_ts_ms field is the event's time.
 *
 * Everything runs in one transaction that is rolled back; every query is
 * restricted to the tasks this file creates, so rows other files committed
 * do not matter.
 */
BEGIN;

-- A session time zone with a non-whole-hour offset: a payload timestamp
-- rendered in local time instead of UTC cannot pass unnoticed.
SET LOCAL TimeZone = 'America/St_Johns';

SELECT plan(73);

------------------------------------------------------------------------------
-- Schema of the contract
------------------------------------------------------------------------------

SELECT has_schema('task_events', 'schema task_events exists');
SELECT has_type('task_events', 'task_status', 'type task_events.task_status exists');
SELECT enum_has_labels('task_events', 'task_status',
	ARRAY['pending', 'in_progress', 'completed', 'cancelled'],
	'task_status has the labels pending, in_progress, completed, cancelled in that order');

SELECT has_table('task_events', 'tasks', 'table task_events.tasks exists');
SELECT col_type_is('task_events', 'tasks', 'task_id', 'uuid', 'tasks.task_id is uuid');
SELECT col_type_is('task_events', 'tasks', 'user_id', 'text', 'tasks.user_id is text');
SELECT col_type_is('task_events', 'tasks', 'title', 'text', 'tasks.title is text');
SELECT col_type_is('task_events', 'tasks', 'description', 'text', 'tasks.description is text');
SELECT col_type_is('task_events', 'tasks', 'status', 'task_events', 'task_status',
	'tasks.status is task_events.task_status');
SELECT col_type_is('task_events', 'tasks', 'version', 'bigint', 'tasks.version is bigint');
SELECT col_type_is('task_events', 'tasks', 'created_at', 'timestamp with time zone',
	'tasks.created_at is timestamptz');
SELECT col_type_is('task_events', 'tasks', 'updated_at', 'timestamp with time zone',
	'tasks.updated_at is timestamptz');
SELECT col_type_is('task_events', 'tasks', 'completed_at', 'timestamp with time zone',
	'tasks.completed_at is timestamptz');
SELECT col_is_pk('task_events', 'tasks', 'task_id', 'tasks.task_id is the primary key');

SELECT has_table('task_events', 'events', 'table task_events.events exists');
SELECT col_type_is('task_events', 'events', 'seq', 'bigint', 'events.seq is bigint');
SELECT col_type_is('task_events', 'events', 'event_id', 'uuid', 'events.event_id is uuid');
SELECT col_type_is('task_events', 'events', 'event_type', 'text', 'events.event_type is text');
SELECT col_type_is('task_events', 'events', 'event_version', 'integer', 'events.event_version is integer');
SELECT col_type_is('task_events', 'events', 'aggregate_id', 'uuid', 'events.aggregate_id is uuid');
SELECT col_type_is('task_events', 'events', 'aggregate_version', 'bigint',
	'events.aggregate_version is bigint');
SELECT col_type_is('task_events', 'events', 'occurred_at', 'timestamp with time zone',
	'events.occurred_at is timestamptz');
SELECT col_type_is('task_events', 'events', 'user_id', 'text', 'events.user_id is text');
SELECT col_type_is('task_events', 'events', 'payload', 'jsonb', 'events.payload is jsonb');
SELECT col_is_pk('task_events', 'events', 'seq', 'events.seq is the primary key');
SELECT col_is_unique('task_events', 'events', ARRAY['event_id'], 'events.event_id is unique');
SELECT col_is_unique('task_events', 'events', ARRAY['aggregate_id', 'aggregate_version'],
	'(aggregate_id, aggregate_version) is unique in events');

SELECT function_returns('task_events', 'create_task', ARRAY['text', 'text', 'text'],
	'task_events.tasks', 'create_task(text, text, text) returns task_events.tasks');
SELECT function_returns('task_events', 'update_status', ARRAY['uuid', 'task_events.task_status', 'bigint'],
	'task_events.tasks', 'update_status(uuid, task_status, bigint) returns task_events.tasks');
SELECT function_returns('task_events', 'complete_task', ARRAY['uuid', 'bigint'],
	'task_events.tasks', 'complete_task(uuid, bigint) returns task_events.tasks');
SELECT function_returns('task_events', 'task_history', ARRAY['uuid'],
	'setof task_events.events', 'task_history(uuid) returns setof task_events.events');

------------------------------------------------------------------------------
-- Fixtures: what each call returned, and the events of this file's tasks
------------------------------------------------------------------------------

-- calls(label, step): the row each write call returned, step 1 = create_task.
CREATE TEMP TABLE calls (
	label text NOT NULL,
	step int NOT NULL,
	t task_events.tasks NOT NULL,
	PRIMARY KEY (label, step)
) ON COMMIT DROP;

-- The task_id of the task labelled lbl.
CREATE FUNCTION pg_temp.tid(lbl text) RETURNS uuid LANGUAGE sql STABLE
	AS $$ SELECT (t).task_id FROM calls WHERE label = lbl AND step = 1 $$;

-- The events of this file's tasks only, with the task's label.
CREATE TEMP VIEW my_events AS
	SELECT c.label, e.*
	FROM task_events.events e
	JOIN calls c ON c.step = 1 AND (c.t).task_id = e.aggregate_id;

-- The current rows of this file's tasks.
CREATE TEMP VIEW my_tasks AS
	SELECT c.label, k.*
	FROM task_events.tasks k
	JOIN calls c ON c.step = 1 AND (c.t).task_id = k.task_id;

------------------------------------------------------------------------------
-- Task a: pending -> in_progress -> completed
------------------------------------------------------------------------------

INSERT INTO calls SELECT 'a', 1, r
	FROM task_events.create_task('pgtap-owner-a', 'Task a: write the tests', 'described') r;

SELECT results_eq(
	$$SELECT (t).status::text, (t).version, (t).user_id, (t).title, (t).description,
	         (t).completed_at IS NULL
	  FROM calls WHERE label = 'a' AND step = 1$$,
	$$VALUES ('pending', 1::bigint, 'pgtap-owner-a', 'Task a: write the tests', 'described', true)$$,
	'create_task returns a pending task at version 1 with the given user_id, title, description and no completed_at');

SELECT results_eq(
	$$SELECT k.task_id, k.status::text, k.version FROM my_tasks k WHERE label = 'a'$$,
	$$SELECT (t).task_id, 'pending', 1::bigint FROM calls WHERE label = 'a' AND step = 1$$,
	'create_task stores the task it returns');

SELECT results_eq(
	format('SELECT event_type, aggregate_version FROM task_events.task_history(%L)', pg_temp.tid('a')),
	$$VALUES ('TaskCreated', 1::bigint)$$,
	'create_task writes exactly one event, TaskCreated at aggregate_version 1');

INSERT INTO calls SELECT 'a', 2, r
	FROM task_events.update_status(pg_temp.tid('a'), 'in_progress') r;

SELECT results_eq(
	$$SELECT (t).status::text, (t).version, (t).completed_at IS NULL FROM calls WHERE label = 'a' AND step = 2$$,
	$$VALUES ('in_progress', 2::bigint, true)$$,
	'update_status to in_progress returns the task in_progress at version 2 without completed_at');

SELECT results_eq(
	format($$SELECT event_type, aggregate_version, payload->>'old_status', payload->>'new_status'
	         FROM task_events.task_history(%L)$$, pg_temp.tid('a')),
	$$VALUES ('TaskCreated', 1::bigint, NULL, NULL),
	         ('TaskStatusChanged', 2::bigint, 'pending', 'in_progress')$$,
	'a status change writes exactly one TaskStatusChanged (pending -> in_progress) at the next version');

INSERT INTO calls SELECT 'a', 3, r
	FROM task_events.complete_task(pg_temp.tid('a')) r;

SELECT results_eq(
	$$SELECT (t).status::text, (t).version, (t).completed_at IS NOT NULL FROM calls WHERE label = 'a' AND step = 3$$,
	$$VALUES ('completed', 4::bigint, true)$$,
	'complete_task after in_progress returns the task completed at version 4 with completed_at set');

SELECT results_eq(
	format($$SELECT event_type, aggregate_version, payload->>'old_status', payload->>'new_status'
	         FROM task_events.task_history(%L)$$, pg_temp.tid('a')),
	$$VALUES ('TaskCreated', 1::bigint, NULL, NULL),
	         ('TaskStatusChanged', 2::bigint, 'pending', 'in_progress'),
	         ('TaskStatusChanged', 3::bigint, 'in_progress', 'completed'),
	         ('TaskCompleted', 4::bigint, NULL, NULL)$$,
	'pending -> in_progress -> completed writes TaskCreated, TaskStatusChanged, TaskStatusChanged, TaskCompleted at versions 1..4');

SELECT results_eq(
	$$SELECT status::text, version, completed_at IS NOT NULL FROM my_tasks WHERE label = 'a'$$,
	$$VALUES ('completed', 4::bigint, true)$$,
	'the stored task a is completed at version 4 with completed_at set');

------------------------------------------------------------------------------
-- Task b: default description, completed straight from pending
------------------------------------------------------------------------------

INSERT INTO calls SELECT 'b', 1, r
	FROM task_events.create_task('pgtap-owner-b', 'Task b: complete at once') r;

SELECT is((SELECT (t).description FROM calls WHERE label = 'b' AND step = 1), NULL,
	'create_task without a description stores description NULL');

INSERT INTO calls SELECT 'b', 2, r
	FROM task_events.complete_task(pg_temp.tid('b')) r;

SELECT results_eq(
	$$SELECT (t).status::text, (t).version, (t).completed_at IS NOT NULL FROM calls WHERE label = 'b' AND step = 2$$,
	$$VALUES ('completed', 3::bigint, true)$$,
	'complete_task on a pending task returns it completed at version 3 with completed_at set');

SELECT results_eq(
	format($$SELECT event_type, aggregate_version, payload->>'old_status', payload->>'new_status'
	         FROM task_events.task_history(%L)$$, pg_temp.tid('b')),
	$$VALUES ('TaskCreated', 1::bigint, NULL, NULL),
	         ('TaskStatusChanged', 2::bigint, 'pending', 'completed'),
	         ('TaskCompleted', 3::bigint, NULL, NULL)$$,
	'complete_task writes TaskStatusChanged (pending -> completed) then TaskCompleted');

------------------------------------------------------------------------------
-- Task c: pending -> in_progress -> cancelled
------------------------------------------------------------------------------

INSERT INTO calls SELECT 'c', 1, r FROM task_events.create_task('pgtap-owner-c', 'Task c: cancel me') r;
INSERT INTO calls SELECT 'c', 2, r FROM task_events.update_status(pg_temp.tid('c'), 'in_progress') r;
INSERT INTO calls SELECT 'c', 3, r FROM task_events.update_status(pg_temp.tid('c'), 'cancelled') r;

SELECT results_eq(
	$$SELECT (t).status::text, (t).version, (t).completed_at IS NULL FROM calls WHERE label = 'c' AND step = 3$$,
	$$VALUES ('cancelled', 3::bigint, true)$$,
	'cancelling an in_progress task returns it cancelled at version 3 without completed_at');

SELECT results_eq(
	format($$SELECT event_type, aggregate_version, payload->>'old_status', payload->>'new_status'
	         FROM task_events.task_history(%L)$$, pg_temp.tid('c')),
	$$VALUES ('TaskCreated', 1::bigint, NULL, NULL),
	         ('TaskStatusChanged', 2::bigint, 'pending', 'in_progress'),
	         ('TaskStatusChanged', 3::bigint, 'in_progress', 'cancelled')$$,
	'cancelling writes exactly one TaskStatusChanged (in_progress -> cancelled) and no TaskCompleted');

------------------------------------------------------------------------------
-- Task d: update_status(..., 'completed', expected_version) = complete_task
------------------------------------------------------------------------------

INSERT INTO calls SELECT 'd', 1, r FROM task_events.create_task('pgtap-owner-d', 'Task d: complete by update_status') r;
INSERT INTO calls SELECT 'd', 2, r FROM task_events.update_status(pg_temp.tid('d'), 'completed', 1) r;

SELECT results_eq(
	$$SELECT (t).status::text, (t).version, (t).completed_at IS NOT NULL FROM calls WHERE label = 'd' AND step = 2$$,
	$$VALUES ('completed', 3::bigint, true)$$,
	'update_status to completed with the current expected_version returns the task completed at version 3 with completed_at set');

SELECT results_eq(
	format($$SELECT event_type, aggregate_version, payload->>'old_status', payload->>'new_status'
	         FROM task_events.task_history(%L)$$, pg_temp.tid('d')),
	$$VALUES ('TaskCreated', 1::bigint, NULL, NULL),
	         ('TaskStatusChanged', 2::bigint, 'pending', 'completed'),
	         ('TaskCompleted', 3::bigint, NULL, NULL)$$,
	'update_status to completed writes TaskStatusChanged then TaskCompleted, like complete_task');

------------------------------------------------------------------------------
-- Task e: in_progress -> pending, and a stale expected_version
------------------------------------------------------------------------------

INSERT INTO calls SELECT 'e', 1, r FROM task_events.create_task('pgtap-owner-e', 'Task e: back to pending') r;
INSERT INTO calls SELECT 'e', 2, r FROM task_events.update_status(pg_temp.tid('e'), 'in_progress', 1) r;
INSERT INTO calls SELECT 'e', 3, r FROM task_events.update_status(pg_temp.tid('e'), 'pending', 2) r;

SELECT results_eq(
	format($$SELECT event_type, aggregate_version, payload->>'old_status', payload->>'new_status'
	         FROM task_events.task_history(%L)$$, pg_temp.tid('e')),
	$$VALUES ('TaskCreated', 1::bigint, NULL, NULL),
	         ('TaskStatusChanged', 2::bigint, 'pending', 'in_progress'),
	         ('TaskStatusChanged', 3::bigint, 'in_progress', 'pending')$$,
	'in_progress -> pending writes exactly one TaskStatusChanged at the next version');

SELECT throws_ok(
	format($$SELECT task_events.update_status(%L, 'in_progress', 2)$$, pg_temp.tid('e')),
	'40001', NULL,
	'update_status with a stale expected_version fails with serialization_failure');

SELECT results_eq(
	$$SELECT status::text, version, (SELECT count(*) FROM my_events WHERE label = 'e')
	  FROM my_tasks WHERE label = 'e'$$,
	$$VALUES ('pending', 3::bigint, 3::bigint)$$,
	'a call refused for a stale expected_version changes neither the task nor its events');

------------------------------------------------------------------------------
-- Rules over every event of this file's tasks
------------------------------------------------------------------------------

SELECT is((SELECT count(*) FROM my_events), 16::bigint,
	'this file''s five tasks have 4 + 3 + 3 + 3 + 3 = 16 events');

SELECT is_empty(
	$$SELECT label FROM my_events GROUP BY label
	  HAVING min(aggregate_version) <> 1 OR max(aggregate_version) <> count(*)
	      OR count(DISTINCT aggregate_version) <> count(*)$$,
	'aggregate_version is contiguous from 1 for every task');

SELECT is_empty(
	$$SELECT label, seq, aggregate_version FROM (
	      SELECT label, seq, aggregate_version,
	             row_number() OVER (PARTITION BY label ORDER BY seq) AS nth
	      FROM my_events) s
	  WHERE aggregate_version <> nth$$,
	'seq order agrees with aggregate_version order for every task');

SELECT is_empty(
	$$SELECT k.label, k.version, max(e.aggregate_version)
	  FROM my_tasks k JOIN my_events e ON e.aggregate_id = k.task_id
	  GROUP BY k.label, k.version
	  HAVING k.version <> max(e.aggregate_version)$$,
	'tasks.version equals the aggregate_version of the task''s latest event');

SELECT is_empty(
	$$SELECT c.label, c.step, (c.t).version, k.version
	  FROM calls c JOIN my_tasks k ON k.task_id = (c.t).task_id
	  WHERE c.step = (SELECT max(step) FROM calls c2 WHERE c2.label = c.label)
	    AND ((c.t).version, (c.t).status, (c.t).updated_at, (c.t).completed_at)
	        IS DISTINCT FROM (k.version, k.status, k.updated_at, k.completed_at)$$,
	'each task''s stored row matches the row its last write call returned');

SELECT results_eq(
	format('SELECT * FROM task_events.task_history(%L)', pg_temp.tid('a')),
	format('SELECT * FROM task_events.events WHERE aggregate_id = %L ORDER BY aggregate_version',
	       pg_temp.tid('a')),
	'task_history returns every event row of the task, ordered by aggregate_version');

SELECT results_eq(
	format('SELECT aggregate_version FROM task_events.task_history(%L)', pg_temp.tid('c')),
	$$VALUES (1::bigint), (2::bigint), (3::bigint)$$,
	'task_history returns only the given task''s events, in aggregate_version order');

SELECT is_empty(
	$$SELECT label, step FROM calls
	  WHERE ((t).status = 'completed') <> ((t).completed_at IS NOT NULL)$$,
	'completed_at is set exactly when a write call leaves the task completed');

-- Payload key sets, one row per distinct key list: exactly one row means
-- every event of the type has exactly these keys.
SELECT set_eq(
	$$SELECT DISTINCT array_to_string(ARRAY(SELECT jsonb_object_keys(payload) ORDER BY 1), ',')
	  FROM my_events WHERE event_type = 'TaskCreated'$$,
	ARRAY['aggregate_id,event_id,event_version,task_title,timestamp,user_id'],
	'every TaskCreated payload has exactly the keys event_id, timestamp, aggregate_id, task_title, user_id, event_version');

SELECT set_eq(
	$$SELECT DISTINCT array_to_string(ARRAY(SELECT jsonb_object_keys(payload) ORDER BY 1), ',')
	  FROM my_events WHERE event_type = 'TaskStatusChanged'$$,
	ARRAY['aggregate_id,event_id,event_version,new_status,old_status,task_title,timestamp'],
	'every TaskStatusChanged payload has exactly the keys event_id, timestamp, aggregate_id, old_status, new_status, task_title, event_version');

SELECT set_eq(
	$$SELECT DISTINCT array_to_string(ARRAY(SELECT jsonb_object_keys(payload) ORDER BY 1), ',')
	  FROM my_events WHERE event_type = 'TaskCompleted'$$,
	ARRAY['aggregate_id,completed_at,event_id,event_version,task_title,timestamp,user_id'],
	'every TaskCompleted payload has exactly the keys event_id, timestamp, aggregate_id, task_title, user_id, completed_at, event_version');

SELECT is_empty(
	$$SELECT seq FROM my_events
	  WHERE event_version IS DISTINCT FROM 1 OR payload->'event_version' IS DISTINCT FROM '1'::jsonb$$,
	'every event has event_version 1, in its column and as the number 1 in its payload');

SELECT is_empty(
	$$SELECT seq FROM my_events WHERE payload->>'event_id' IS DISTINCT FROM event_id::text$$,
	'payload event_id equals events.event_id');

SELECT is_empty(
	$$SELECT seq FROM my_events WHERE payload->>'aggregate_id' IS DISTINCT FROM aggregate_id::text$$,
	'payload aggregate_id equals events.aggregate_id');

SELECT is_empty(
	$$SELECT e.seq FROM my_events e JOIN my_tasks k ON k.task_id = e.aggregate_id
	  WHERE e.user_id IS DISTINCT FROM k.user_id$$,
	'events.user_id is the task''s owner');

SELECT is_empty(
	$$SELECT e.seq FROM my_events e JOIN my_tasks k ON k.task_id = e.aggregate_id
	  WHERE e.event_type IN ('TaskCreated', 'TaskCompleted')
	    AND e.payload->>'user_id' IS DISTINCT FROM k.user_id$$,
	'TaskCreated and TaskCompleted payload user_id is the task''s owner');

SELECT is_empty(
	$$SELECT e.seq FROM my_events e JOIN my_tasks k ON k.task_id = e.aggregate_id
	  WHERE e.payload->>'task_title' IS DISTINCT FROM k.title$$,
	'every payload task_title is the task''s title');

SELECT is_empty(
	$$SELECT seq, payload->>'timestamp', occurred_at FROM my_events
	  WHERE (payload->>'timestamp')::timestamptz IS DISTINCT FROM occurred_at$$,
	'payload timestamp equals occurred_at');

SELECT is_empty(
	$$SELECT seq, payload->>'timestamp' FROM my_events
	  WHERE payload->>'timestamp' !~ '^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(\+00:00|Z)$'$$,
	'payload timestamp is ISO 8601 in UTC even when the session TimeZone is not UTC');

SELECT is_empty(
	$$SELECT e.seq, e.payload->>'completed_at', k.completed_at
	  FROM my_events e JOIN my_tasks k ON k.task_id = e.aggregate_id
	  WHERE e.event_type = 'TaskCompleted'
	    AND ((e.payload->>'completed_at')::timestamptz IS DISTINCT FROM k.completed_at
	         OR e.payload->>'completed_at' !~ '^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(\+00:00|Z)$')$$,
	'TaskCompleted payload completed_at is the task''s completed_at, ISO 8601 in UTC');

SELECT is_empty(
	$$SELECT e.seq FROM my_events e
	  WHERE e.event_type = 'TaskCompleted'
	    AND NOT EXISTS (SELECT 1 FROM my_events p
	                    WHERE p.aggregate_id = e.aggregate_id
	                      AND p.aggregate_version = e.aggregate_version - 1
	                      AND p.event_type = 'TaskStatusChanged'
	                      AND p.payload->>'new_status' = 'completed'
	                      AND p.seq < e.seq)$$,
	'every TaskCompleted directly follows a TaskStatusChanged to completed');

-- UUIDv7 (RFC 9562): byte 6 high nibble = 7, byte 8 top bits = 10.
SELECT is_empty(
	$$SELECT seq, event_id FROM my_events
	  WHERE get_byte(uuid_send(event_id), 6) >> 4 <> 7$$,
	'every event_id has UUID version 7');

SELECT is_empty(
	$$SELECT seq, event_id FROM my_events
	  WHERE get_byte(uuid_send(event_id), 8) >> 6 <> 2$$,
	'every event_id has the RFC 9562 variant (10xx)');

-- The first 48 bits are unix milliseconds; allow a second for the
-- generator's monotonic bump when the clock stands still or steps back.
SELECT is_empty(
	$$SELECT seq, event_id, occurred_at FROM my_events
	  WHERE abs(('x' || substr(replace(event_id::text, '-', ''), 1, 12))::bit(48)::bigint
	            - floor(extract(epoch FROM occurred_at) * 1000)::bigint) > 1000$$,
	'every event_id carries the event''s time as unix milliseconds in its first 48 bits');

SELECT * FROM finish();
ROLLBACK;
