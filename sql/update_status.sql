-- update_status and complete_task: one TaskStatusChanged per change; moving
-- to completed adds TaskCompleted and sets completed_at; every event bumps
-- the version by one.
SELECT task_id AS id FROM task_events.create_task('alice', 'Lifecycle') \gset

SELECT status, version, completed_at IS NULL AS not_completed
FROM task_events.update_status(:'id', 'in_progress');
SELECT status, version, completed_at = updated_at AS completed_at_set
FROM task_events.complete_task(:'id');

-- pending -> in_progress -> completed ends at version 4, with contiguous
-- versions and seq order agreeing with version order.
SELECT aggregate_version, event_type, payload->>'old_status' AS old_status,
	   payload->>'new_status' AS new_status,
	   seq > lag(seq) OVER (ORDER BY aggregate_version) AS seq_after_previous
FROM task_events.events WHERE aggregate_id = :'id' ORDER BY aggregate_version;

-- The TaskCompleted payload, and completed_at agreeing with the task row.
SELECT key FROM task_events.events, jsonb_object_keys(payload) AS key
WHERE aggregate_id = :'id' AND event_type = 'TaskCompleted' ORDER BY key;
SELECT e.payload->>'task_title' AS task_title, e.payload->>'user_id' AS user_id,
	   (e.payload->>'completed_at')::timestamptz = t.completed_at AS completed_at_matches,
	   e.user_id
FROM task_events.events e JOIN task_events.tasks t ON t.task_id = e.aggregate_id
WHERE e.aggregate_id = :'id' AND e.event_type = 'TaskCompleted';
SELECT key FROM task_events.events, jsonb_object_keys(payload) AS key
WHERE aggregate_id = :'id' AND aggregate_version = 2 ORDER BY key;

-- The task's version is the aggregate_version of its latest event.
SELECT t.version = max(e.aggregate_version) AS version_is_latest_event
FROM task_events.tasks t JOIN task_events.events e ON e.aggregate_id = t.task_id
WHERE t.task_id = :'id' GROUP BY t.version;

-- A matching expected_version is accepted.
SELECT task_id AS id2 FROM task_events.create_task('bob', 'Versioned') \gset
SELECT status, version FROM task_events.update_status(:'id2', 'in_progress', 1);
SELECT status, version FROM task_events.update_status(:'id2', 'pending', 2);
SELECT status, version, completed_at IS NULL AS not_completed
FROM task_events.update_status(:'id2', 'cancelled', 3);

-- Every pair of statuses: the listed transitions succeed, all others
-- (including to the same status) fail with 55000.
CREATE FUNCTION pg_temp.task_in(s task_events.task_status) RETURNS uuid AS $$
DECLARE
	id uuid := (task_events.create_task('matrix', 'Transition matrix')).task_id;
BEGIN
	IF s = 'pending' THEN
		RETURN id;
	END IF;
	PERFORM task_events.update_status(id, s);
	RETURN id;
END
$$ LANGUAGE plpgsql;
SELECT f AS from_status, t AS to_status,
	   (regress.error_of(format('SELECT task_events.update_status(%L, %L)',
								pg_temp.task_in(f), t))).sqlstate AS outcome
FROM unnest(enum_range(NULL::task_events.task_status)) AS f,
	 unnest(enum_range(NULL::task_events.task_status)) AS t
ORDER BY f, t;

-- update_status(..., 'completed') is the same as complete_task.
SELECT task_id AS id3 FROM task_events.create_task('carol', 'Direct') \gset
SELECT status, version, completed_at IS NOT NULL AS completed
FROM task_events.update_status(:'id3', 'completed');
SELECT string_agg(event_type, ', ' ORDER BY aggregate_version)
FROM task_events.events WHERE aggregate_id = :'id3';
