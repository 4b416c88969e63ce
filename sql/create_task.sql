-- create_task: a pending task at version 1 and exactly one TaskCreated event.
SELECT user_id, title, description, status, version,
	   created_at = updated_at AS created_is_updated, completed_at IS NULL AS not_completed
FROM task_events.create_task('alice', 'Write the docs', 'All of them');
SELECT task_id AS id FROM task_events.tasks WHERE title = 'Write the docs' \gset

-- The task row is stored as returned.
SELECT user_id, title, description, status, version FROM task_events.tasks WHERE task_id = :'id';

-- One TaskCreated event at version 1, owned by the task's user.
SELECT event_type, event_version, aggregate_version, user_id,
	   occurred_at = (SELECT created_at FROM task_events.tasks WHERE task_id = :'id') AS at_creation
FROM task_events.events WHERE aggregate_id = :'id';

-- Its payload: the TaskCreated keys plus event_version, values from the row.
SELECT key FROM task_events.events, jsonb_object_keys(payload) AS key
WHERE aggregate_id = :'id' ORDER BY key;
SELECT payload->>'task_title' AS task_title, payload->>'user_id' AS user_id,
	   payload->'event_version' AS event_version,
	   (payload->>'event_id')::uuid = event_id AS event_id_matches,
	   (payload->>'aggregate_id')::uuid = aggregate_id AS aggregate_id_matches,
	   (payload->>'timestamp')::timestamptz = occurred_at AS timestamp_matches,
	   payload->>'timestamp' LIKE '%+00:00' AS timestamp_in_utc
FROM task_events.events WHERE aggregate_id = :'id';

-- Description is optional; limits count characters, not bytes: 200 four-byte
-- characters of user_id, 500 of title and 10000 of description are accepted.
SELECT description IS NULL AS no_description, version
FROM task_events.create_task('bob', 'No description');
SELECT length(user_id), octet_length(user_id), length(title), length(description)
FROM task_events.create_task(repeat(U&'\+01F600', 200), repeat(U&'\+01F600', 500),
							 repeat(U&'\+01F600', 10000));

-- Task and event ids are time-ordered UUIDs (version 7, RFC 9562 variant).
SELECT substr(task_id::text, 15, 1) AS task_id_version,
	   substr(task_id::text, 20, 1) IN ('8', '9', 'a', 'b') AS task_id_variant
FROM task_events.tasks WHERE task_id = :'id';
SELECT bool_and(substr(event_id::text, 15, 1) = '7') AS all_event_ids_v7
FROM task_events.events;
-- Ids made one after another in a backend sort in creation order.
SELECT count(*) AS created, bool_and(task_id > prev) AS task_ids_increase
FROM (SELECT t.task_id, lag(t.task_id) OVER (ORDER BY i) AS prev
	  FROM generate_series(1, 50) AS i,
		   LATERAL task_events.create_task('carol', 'Task ' || i) AS t) AS s;
