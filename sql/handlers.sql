-- The built-in handlers run through process_pending(): every committed
-- event is handled exactly once by each enabled handler, in the caller's
-- transaction; events of rolled-back transactions never, events the caller
-- itself has not committed yet only after it commits; max_events caps the
-- events handled per handler; handler_status and event_rates report it.
--
-- The database is shared with the earlier files, whose events were never
-- handled: the first call handles them, and everything below is checked on
-- the tasks of users this file alone uses, against their rows of events.

-- What each handler wrote for who's events against what it should have
-- written: audit one row per event, equal to the event; notification one
-- message per TaskCreated and TaskCompleted; analytics the counters and the
-- completion stats.
CREATE FUNCTION regress.handler_outputs(who text)
RETURNS TABLE (output text, expected bigint, actual bigint)
AS $$
	SELECT 'audit_log rows', count(*),
		   (SELECT count(*) FROM task_events.audit_log a
			JOIN task_events.events e ON e.event_id = a.event_id
			WHERE e.user_id = who
			  AND a.seq = e.seq AND a.event_type = e.event_type
			  AND a.event_data = e.payload AND a.occurred_at = e.occurred_at
			  AND a.recorded_at IS NOT NULL)
	FROM task_events.events e WHERE e.user_id = who
	UNION ALL
	SELECT 'notifications', count(*),
		   (SELECT count(*) FROM task_events.notifications n
			WHERE n.user_id = who
			  AND n.created_at IS NOT NULL
			  AND n.message = (SELECT CASE e.event_type
										  WHEN 'TaskCreated' THEN 'New task created: '
										  WHEN 'TaskCompleted' THEN 'Congratulations! Task completed: '
									  END || (e.payload->>'task_title')
							   FROM task_events.events e
							   WHERE e.event_id = n.event_id AND e.user_id = who))
	FROM task_events.events e
	WHERE e.user_id = who AND e.event_type IN ('TaskCreated', 'TaskCompleted')
	UNION ALL
	SELECT 'tasks_created', count(*) FILTER (WHERE e.event_type = 'TaskCreated'),
		   COALESCE((SELECT c.value FROM task_events.analytics_counters c
					 WHERE c.metric = 'tasks_created' AND c.user_id = who), 0)
	FROM task_events.events e WHERE e.user_id = who
	UNION ALL
	SELECT 'tasks_completed', count(*) FILTER (WHERE e.event_type = 'TaskCompleted'),
		   COALESCE((SELECT c.value FROM task_events.analytics_counters c
					 WHERE c.metric = 'tasks_completed' AND c.user_id = who), 0)
	FROM task_events.events e WHERE e.user_id = who
	UNION ALL
	SELECT 'completion_stats.completed', count(*) FILTER (WHERE e.event_type = 'TaskCompleted'),
		   COALESCE((SELECT s.completed FROM task_events.completion_stats s
					 WHERE s.user_id = who), 0)
	FROM task_events.events e WHERE e.user_id = who
$$ LANGUAGE sql;

-- The monitoring counters of each handler, to compute deltas.
CREATE TABLE regress.status_before AS
SELECT handler, processed, batches FROM task_events.handler_status WITH NO DATA;
CREATE FUNCTION regress.snapshot_status() RETURNS void AS $$
	DELETE FROM regress.status_before;
	INSERT INTO regress.status_before
	SELECT handler, processed, batches FROM task_events.handler_status;
$$ LANGUAGE sql;

-- The three built-in handlers are registered and enabled.
SELECT handler, function, enabled, description IS NOT NULL AS described
FROM task_events.handlers ORDER BY handler;

-- Handle what the earlier files left; after that there is nothing new.
SELECT task_events.process_pending() > 0 AS handled_earlier_events;
SELECT task_events.process_pending() AS nothing_new;
SELECT handler, events_behind, position = (SELECT max(seq) FROM task_events.events) AS at_end
FROM task_events.handler_status ORDER BY handler;

-- Errors: unknown handler 42704, max_events NULL 22004, below 1 22023; the
-- same for retry_dead_letters' handler.
SELECT * FROM regress.error_of($$SELECT task_events.process_pending('nope')$$);
SELECT * FROM regress.error_of($$SELECT task_events.process_pending('audit', NULL)$$);
SELECT * FROM regress.error_of($$SELECT task_events.process_pending(NULL, NULL)$$);
SELECT * FROM regress.error_of($$SELECT task_events.process_pending('audit', 0)$$);
SELECT * FROM regress.error_of($$SELECT task_events.process_pending(NULL, -5)$$);
SELECT * FROM regress.error_of($$SELECT task_events.retry_dead_letters('nope')$$);

------------------------------------------------------------------------------
-- Each handler's output, for hana's tasks: created, started, completed,
-- completed from pending, cancelled.
------------------------------------------------------------------------------
SELECT regress.snapshot_status();
SELECT task_id AS t1 FROM task_events.create_task('hana', 'Write report') \gset
SELECT task_id AS t2 FROM task_events.create_task('hana', 'Review code', 'with notes') \gset
SELECT task_id AS t3 FROM task_events.create_task('hana', 'Plan sprint') \gset
SELECT version FROM task_events.update_status(:'t1', 'in_progress');
SELECT version FROM task_events.complete_task(:'t1');
SELECT version FROM task_events.complete_task(:'t2');
SELECT version FROM task_events.update_status(:'t3', 'cancelled');

-- Nine events, not handled yet by any handler.
SELECT count(*) AS hana_events FROM task_events.events WHERE user_id = 'hana';
SELECT handler, events_behind FROM task_events.handler_status ORDER BY handler;
SELECT * FROM regress.handler_outputs('hana');

-- One handler at a time: each handles the nine events; then the rest
-- (analytics only) through process_pending() for all handlers.
SELECT task_events.process_pending('audit') AS audit_handled;
SELECT task_events.process_pending('notification') AS notification_handled;
SELECT handler, events_behind FROM task_events.handler_status ORDER BY handler;
SELECT task_events.process_pending() AS analytics_handled;
SELECT task_events.process_pending() AS nothing_new;
SELECT * FROM regress.handler_outputs('hana');

-- Every handler is at the end of the log, counted nine more events, and
-- reports no error.
SELECT s.handler, s.events_behind, s.position = (SELECT max(seq) FROM task_events.events) AS at_end,
	   s.processed - b.processed AS processed, s.batches - b.batches AS batches,
	   s.failed, s.dead_letters, s.last_error, s.last_sqlstate, s.retry_attempts, s.retry_at,
	   s.seconds_behind, s.mean_batch_ms >= 0 AS mean_batch_ms_set,
	   s.max_batch_ms >= s.mean_batch_ms AS max_at_least_mean, s.last_batch_at IS NOT NULL AS ran
FROM task_events.handler_status s JOIN regress.status_before b USING (handler)
ORDER BY s.handler;

-- audit: one row per event, in the events' order, event_data the payload.
SELECT e.aggregate_version AS version, a.event_type, a.event_data->>'task_title' AS title,
	   a.event_data->>'new_status' AS new_status
FROM task_events.audit_log a JOIN task_events.events e USING (event_id)
WHERE e.user_id = 'hana' ORDER BY a.seq;
SELECT bool_and(a.seq = e.seq AND a.event_data = e.payload AND a.occurred_at = e.occurred_at)
	   AS audit_rows_equal_events
FROM task_events.audit_log a JOIN task_events.events e USING (event_id)
WHERE e.user_id = 'hana';

-- notification: the messages, in event order, each for its own event.
SELECT n.user_id, n.message, e.event_type
FROM task_events.notifications n JOIN task_events.events e USING (event_id)
WHERE e.user_id = 'hana' ORDER BY n.notification_id;
SELECT bool_and(seq > prev_seq) AS notification_id_follows_seq
FROM (SELECT e.seq, lag(e.seq) OVER (ORDER BY n.notification_id) AS prev_seq
	  FROM task_events.notifications n JOIN task_events.events e USING (event_id)
	  WHERE e.user_id = 'hana') AS s;

-- analytics: the counters, and the completion times of t1 and t2 (from
-- their TaskCreated to their TaskCompleted).
SELECT metric, user_id, value FROM task_events.analytics_counters
WHERE user_id = 'hana' ORDER BY metric;
SELECT s.completed,
	   abs(s.total_seconds - x.total) < 1e-6 AS total_exact,
	   abs(s.min_seconds - x.min) < 1e-6 AS min_exact,
	   abs(s.max_seconds - x.max) < 1e-6 AS max_exact,
	   s.min_seconds > 0 AS positive
FROM task_events.completion_stats s,
	 (SELECT sum(d) AS total, min(d) AS min, max(d) AS max
	  FROM (SELECT extract(epoch FROM f.occurred_at - c.occurred_at)::float8 AS d
			FROM task_events.events f
			JOIN task_events.events c ON c.aggregate_id = f.aggregate_id AND c.event_type = 'TaskCreated'
			WHERE f.user_id = 'hana' AND f.event_type = 'TaskCompleted') AS t) AS x
WHERE s.user_id = 'hana';

-- The audit log is append-only like the event log.
SELECT * FROM regress.error_of($$UPDATE task_events.audit_log SET event_type = 'x'$$);
SELECT * FROM regress.error_of($$DELETE FROM task_events.audit_log$$);
SELECT * FROM regress.error_of($$TRUNCATE task_events.audit_log$$);
SET session_replication_role = replica;
SELECT * FROM regress.error_of($$DELETE FROM task_events.audit_log WHERE false$$);
RESET session_replication_role;

------------------------------------------------------------------------------
-- Transactions
------------------------------------------------------------------------------

-- Events of a rolled-back transaction (or savepoint) are never handled.
BEGIN;
SELECT task_id AS gone FROM task_events.create_task('ivan', 'Rolled back') \gset
ROLLBACK;
BEGIN;
SELECT task_id AS kept FROM task_events.create_task('ivan', 'Kept') \gset
SAVEPOINT s;
SELECT version FROM task_events.update_status(:'kept', 'in_progress');
SELECT version FROM task_events.complete_task(:'kept');
ROLLBACK TO SAVEPOINT s;
COMMIT;
SELECT task_events.process_pending('audit') AS audit_handled;
SELECT task_events.process_pending() AS others_handled;
SELECT a.event_type, a.event_data->>'task_title' AS title
FROM task_events.audit_log a WHERE a.event_data->>'task_title' IN ('Rolled back', 'Kept')
ORDER BY a.seq;
SELECT user_id, message FROM task_events.notifications WHERE user_id = 'ivan';
SELECT * FROM regress.handler_outputs('ivan');

-- Events the calling transaction wrote itself are not handled by its own
-- process_pending() (they are not committed yet): both are handled, once,
-- by a call after the commit.
BEGIN;
SELECT task_id AS own1 FROM task_events.create_task('judy', 'Own first') \gset
SELECT task_events.process_pending() AS own_events_not_handled;
SELECT count(*) AS judy_audited FROM task_events.audit_log a
JOIN task_events.events e USING (event_id) WHERE e.user_id = 'judy';
SELECT task_id AS own2 FROM task_events.create_task('judy', 'Own second') \gset
SELECT task_events.process_pending() AS own_events_not_handled;
COMMIT;
SELECT handler, events_behind FROM task_events.handler_status ORDER BY handler;
SELECT task_events.process_pending('audit') AS audit_handled;
SELECT task_events.process_pending('notification') AS notification_handled;
SELECT task_events.process_pending('analytics') AS analytics_handled;
SELECT task_events.process_pending() AS nothing_new;
SELECT * FROM regress.handler_outputs('judy');

-- Rolling back a transaction that ran process_pending() undoes both the
-- handlers' rows and their positions: the events are handled again, once.
SELECT task_id AS undone FROM task_events.create_task('kate', 'Handled twice?') \gset
SELECT version FROM task_events.complete_task(:'undone');
BEGIN;
SELECT task_events.process_pending('audit') AS audit_handled;
SELECT task_events.process_pending('notification') AS notification_handled;
SELECT task_events.process_pending('analytics') AS analytics_handled;
SELECT * FROM regress.handler_outputs('kate');
ROLLBACK;
SELECT * FROM regress.handler_outputs('kate');
SELECT handler, events_behind FROM task_events.handler_status ORDER BY handler;
SELECT task_events.process_pending('audit') AS audit_handled;
SELECT task_events.process_pending('notification') AS notification_handled;
SELECT task_events.process_pending('analytics') AS analytics_handled;
SELECT task_events.process_pending() AS nothing_new;
SELECT * FROM regress.handler_outputs('kate');

------------------------------------------------------------------------------
-- max_events caps the events handled per handler and call; batches of
-- task_events.batch_size.
------------------------------------------------------------------------------
SELECT count(task_events.create_task('liam', 'Batch ' || i)) AS created FROM generate_series(1, 5) AS i;
SELECT task_events.process_pending('audit', 2) AS audit_handled;
SELECT handler, events_behind FROM task_events.handler_status WHERE handler = 'audit';
SELECT task_events.process_pending('audit', 2) AS audit_handled;
SELECT task_events.process_pending('audit', 2) AS audit_handled;
SELECT task_events.process_pending('audit', 2) AS audit_handled;
-- Handled in seq order, each once.
SELECT a.event_data->>'task_title' AS title
FROM task_events.audit_log a JOIN task_events.events e USING (event_id)
WHERE e.user_id = 'liam' ORDER BY a.recorded_at, a.seq;

-- With process_pending() for every handler, max_events applies to each.
SELECT handler, events_behind FROM task_events.handler_status ORDER BY handler;
SELECT task_events.process_pending(NULL, 3) AS handled;
SELECT handler, events_behind FROM task_events.handler_status ORDER BY handler;
SELECT task_events.process_pending() AS rest;
SELECT handler, events_behind FROM task_events.handler_status ORDER BY handler;

-- A call that stopped at max_events just as it reached the last event it
-- could see leaves nothing behind: the next call handles every newer event
-- (and events_behind drops to 0).
SELECT count(task_events.create_task('liam', 'Exact ' || i)) AS created FROM generate_series(1, 2) AS i;
SELECT task_events.process_pending('audit', 2) AS audit_handled;
SELECT handler, events_behind FROM task_events.handler_status WHERE handler = 'audit';
SELECT task_id AS after_exact FROM task_events.create_task('liam', 'After exact') \gset
SELECT task_events.process_pending('audit') AS audit_handled;
SELECT handler, events_behind FROM task_events.handler_status WHERE handler = 'audit';
SELECT task_events.process_pending('audit') AS nothing_new;
SELECT count(*) AS after_exact_audited FROM task_events.audit_log a
JOIN task_events.events e USING (event_id) WHERE e.aggregate_id = :'after_exact';
SELECT task_events.process_pending('notification') + task_events.process_pending('analytics') AS others_handled;

-- Batches of batch_size events: five events in batches of two are three
-- batches, and max_events still caps the call.
SELECT regress.snapshot_status();
SET task_events.batch_size = 2;
SELECT count(task_events.create_task('liam', 'Small batch ' || i)) AS created FROM generate_series(1, 5) AS i;
SELECT task_events.process_pending('audit') AS audit_handled;
SELECT task_events.process_pending('notification', 3) AS notification_handled;
SELECT s.handler, s.processed - b.processed AS processed, s.batches - b.batches AS batches,
	   s.events_behind
FROM task_events.handler_status s JOIN regress.status_before b USING (handler)
WHERE s.handler IN ('audit', 'notification') ORDER BY s.handler;
RESET task_events.batch_size;
SELECT task_events.process_pending() AS rest;
SELECT * FROM regress.handler_outputs('liam');

------------------------------------------------------------------------------
-- A disabled handler is skipped, and resumes where it stopped when enabled.
------------------------------------------------------------------------------
UPDATE task_events.handlers SET enabled = false WHERE handler = 'notification';
SELECT task_id AS m FROM task_events.create_task('mia', 'While disabled') \gset
SELECT task_events.process_pending('notification') AS disabled_handled;
SELECT task_events.process_pending() AS others_handled;
SELECT handler, enabled, events_behind FROM task_events.handler_status ORDER BY handler;
SELECT * FROM regress.handler_outputs('mia');
UPDATE task_events.handlers SET enabled = true WHERE handler = 'notification';
SELECT task_events.process_pending() AS notification_handled;
SELECT * FROM regress.handler_outputs('mia');
SELECT handler, enabled, events_behind FROM task_events.handler_status ORDER BY handler;

------------------------------------------------------------------------------
-- event_rates: the events of each type that occurred in the last minute.
------------------------------------------------------------------------------
BEGIN;
SELECT r.event_type,
	   r.last_minute = (SELECT count(*) FROM task_events.events e
						WHERE e.event_type = r.event_type
						  AND e.occurred_at > now() - interval '1 minute') AS last_minute_exact,
	   r.last_minute >= (SELECT count(*) FROM task_events.events e
						 WHERE e.event_type = r.event_type AND e.user_id = 'hana') AS counts_this_file,
	   r.per_second = round(r.last_minute / 60.0, 2) AS per_second_exact
FROM task_events.event_rates r ORDER BY r.event_type;
COMMIT;
