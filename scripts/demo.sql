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
