-- The task_events demo: a few tasks through their lifecycle, the events
-- they recorded, and (in the listening client's output) what was published.
\pset footer off

\echo '== Create two tasks'
SELECT task_id AS docs FROM task_events.create_task('alice', 'Write the docs', 'README and SQL reference') \gset
SELECT task_id AS bench FROM task_events.create_task('bob', 'Run the benchmark') \gset
SELECT task_id, user_id, title, status, version FROM task_events.tasks ORDER BY created_at;

\echo '== Start and complete the first, cancel the second (with an expected version)'
SELECT status, version, completed_at IS NOT NULL AS completed
FROM task_events.update_status(:'docs', 'in_progress');
SELECT status, version, completed_at IS NOT NULL AS completed
FROM task_events.complete_task(:'docs');
SELECT status, version FROM task_events.update_status(:'bench', 'cancelled', expected_version => 1);

\echo '== A rolled-back change records and publishes nothing'
BEGIN;
SELECT task_id AS ghost FROM task_events.create_task('carol', 'Never happened') \gset
ROLLBACK;
SELECT count(*) AS ghost_tasks FROM task_events.tasks WHERE user_id = 'carol';

\echo '== Bad input is refused with a clear error (the demo goes on)'
\set ON_ERROR_STOP 0
SELECT task_events.complete_task(:'docs');
SELECT task_events.create_task('alice', '   ');
\set ON_ERROR_STOP 1

\echo '== The history of the first task, from the append-only event log'
SELECT seq, event_type, aggregate_version, payload
FROM task_events.task_history(:'docs');

\echo '== The event log cannot be rewritten'
\set ON_ERROR_STOP 0
DELETE FROM task_events.events;
\set ON_ERROR_STOP 1

\echo '== The background workers ran the handlers: wait until they caught up'
DO $$
BEGIN
	FOR i IN 1..200 LOOP
		EXIT WHEN (SELECT sum(events_behind) FROM task_events.handler_status) = 0;
		PERFORM pg_sleep(0.05);
	END LOOP;
END
$$;
SELECT handler, position, events_behind, processed, failed, dead_letters
FROM task_events.handler_status;

\echo '== notification: a message per created and completed task'
SELECT notification_id, user_id, message FROM task_events.notifications ORDER BY notification_id;

\echo '== analytics: counters and completion times per user'
SELECT metric, user_id, value FROM task_events.analytics_counters ORDER BY metric, user_id;
SELECT user_id, completed, round(total_seconds::numeric, 3) AS total_seconds
FROM task_events.completion_stats;

\echo '== audit: every event, with how long after it the row was written'
SELECT seq, event_type, round(extract(epoch FROM recorded_at - occurred_at)::numeric * 1000, 1) AS lag_ms
FROM task_events.audit_log ORDER BY seq;
