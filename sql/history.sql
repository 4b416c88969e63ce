-- task_history: the task's own events, ordered by aggregate_version, with
-- versions contiguous from 1 and seq order agreeing with version order,
-- also when the writes of several tasks interleave.
SELECT task_id AS a FROM task_events.create_task('alice', 'Task A') \gset
SELECT task_id AS b FROM task_events.create_task('bob', 'Task B') \gset
SELECT version FROM task_events.update_status(:'a', 'in_progress');
SELECT version FROM task_events.update_status(:'b', 'cancelled');
SELECT version FROM task_events.update_status(:'a', 'pending');
SELECT version FROM task_events.complete_task(:'a');

SELECT aggregate_version, event_type, user_id, aggregate_id = :'a' AS own_task
FROM task_events.task_history(:'a');
SELECT aggregate_version, event_type, user_id, aggregate_id = :'b' AS own_task
FROM task_events.task_history(:'b');

-- Rows come back in version order, versions are 1..n with no gap, and
-- seq grows with version.
SELECT bool_and(aggregate_version = ordinality) AS contiguous_in_order,
	   bool_and(seq > prev_seq OR prev_seq IS NULL) AS seq_agrees
FROM (SELECT h.aggregate_version, h.ordinality,
			 lag(h.seq) OVER (ORDER BY h.ordinality) AS prev_seq, h.seq
	  FROM task_events.task_history(:'a') WITH ORDINALITY AS h) AS s;

-- The history returns whole event rows, the same as the table holds.
SELECT count(*) AS same_rows
FROM task_events.task_history(:'a') h JOIN task_events.events e USING (seq)
WHERE (h.*)::text = (e.*)::text;
