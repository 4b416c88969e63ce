-- The handler API: register_handler, unregister_handler, pause_handler,
-- resume_handler.  Every error with its SQLSTATE and nothing half-done;
-- event_types (a handler is called only with those types, and its position
-- moves past the others); start_at 'now' (no event committed before the
-- registration); pausing (no batch, lag grows) and resuming exactly where it
-- stopped; handler_status's paused, event_types and description.  Handlers
-- are run here by process_pending(), with the workers' code.
CREATE TABLE regress.api_seen (handler text, seq bigint, event_type text, n serial);
CREATE FUNCTION regress.api_record(events task_events.events[]) RETURNS void
	LANGUAGE sql AS $$
	INSERT INTO regress.api_seen SELECT 'record', e.seq, e.event_type FROM unnest(events) e
$$;
CREATE FUNCTION regress.api_completed(events task_events.events[]) RETURNS void
	LANGUAGE sql AS $$
	INSERT INTO regress.api_seen SELECT 'completed', e.seq, e.event_type FROM unnest(events) e
$$;
CREATE FUNCTION regress.api_late(events task_events.events[]) RETURNS void
	LANGUAGE sql AS $$
	INSERT INTO regress.api_seen SELECT 'late', e.seq, e.event_type FROM unnest(events) e
$$;
CREATE FUNCTION regress.not_a_handler(x int) RETURNS void LANGUAGE sql AS $$ SELECT $$;

-- Errors: nothing is registered by a failed call.
SELECT * FROM regress.error_of($$SELECT task_events.register_handler(NULL, 'regress.api_record(task_events.events[])')$$);
SELECT * FROM regress.error_of($$SELECT task_events.register_handler('x', NULL)$$);
SELECT * FROM regress.error_of($$SELECT task_events.register_handler('x', 'regress.api_record(task_events.events[])', start_at => NULL)$$);
SELECT * FROM regress.error_of($$SELECT task_events.register_handler('', 'regress.api_record(task_events.events[])')$$);
SELECT * FROM regress.error_of($$SELECT task_events.register_handler(repeat('a', 64), 'regress.api_record(task_events.events[])')$$);
SELECT * FROM regress.error_of($$SELECT task_events.register_handler('Bad Name', 'regress.api_record(task_events.events[])')$$);
SELECT * FROM regress.error_of($$SELECT task_events.register_handler('x', 'regress.not_a_handler(int)')$$);
SELECT * FROM regress.error_of($$SELECT task_events.register_handler('x', 'regress.api_record(task_events.events[])', '{TaskDeleted}')$$);
SELECT * FROM regress.error_of($$SELECT task_events.register_handler('x', 'regress.api_record(task_events.events[])', '{}')$$);
SELECT * FROM regress.error_of($$SELECT task_events.register_handler('x', 'regress.api_record(task_events.events[])', '{TaskCreated,NULL}')$$);
SELECT * FROM regress.error_of($$SELECT task_events.register_handler('x', 'regress.api_record(task_events.events[])', start_at => 'yesterday')$$);
SELECT * FROM regress.error_of($$SELECT task_events.register_handler('audit', 'regress.api_record(task_events.events[])')$$);
SELECT count(*) AS nothing_registered FROM task_events.handlers WHERE handler = 'x';
SELECT * FROM regress.error_of($$SELECT task_events.unregister_handler('nope')$$);
SELECT * FROM regress.error_of($$SELECT task_events.unregister_handler(NULL)$$);
SELECT * FROM regress.error_of($$SELECT task_events.unregister_handler('audit')$$);
SELECT * FROM regress.error_of($$SELECT task_events.pause_handler('nope')$$);
SELECT * FROM regress.error_of($$SELECT task_events.resume_handler(NULL)$$);

-- The built-in notification and analytics handlers take only the types they use.
SELECT handler, event_types FROM task_events.handler_status ORDER BY handler;

-- Events before the registrations; everything else handled first.
SELECT count(*) > 0 AS handled_before FROM (SELECT task_events.process_pending(max_events => 100000)) p;
SELECT task_id AS t1 FROM task_events.create_task('api', 'first') \gset
SELECT FROM task_events.complete_task(:'t1');

SELECT task_events.register_handler('record', 'regress.api_record(task_events.events[])',
	description => 'every event');
SELECT task_events.register_handler('completed', 'regress.api_completed(task_events.events[])',
	event_types => '{TaskCompleted}');
SELECT task_events.register_handler('late', 'regress.api_late(task_events.events[])',
	start_at => 'now');
SELECT handler, paused, event_types, description FROM task_events.handler_status
WHERE handler IN ('record', 'completed', 'late') ORDER BY handler;

SELECT task_id AS t2 FROM task_events.create_task('api', 'second') \gset
SELECT FROM task_events.update_status(:'t2', 'in_progress');
SELECT FROM task_events.complete_task(:'t2');
SELECT task_events.process_pending(h) FROM unnest('{record,completed,late}'::text[]) h;

-- record saw every event, completed only the TaskCompleted ones (and is not
-- behind for the others), late only the events after its registration.
SELECT s.handler, s.event_type, e.aggregate_id = :'t1'::uuid AS first_task
FROM regress.api_seen s JOIN task_events.events e USING (seq)
WHERE e.user_id = 'api' ORDER BY s.handler, s.seq;
SELECT handler, events_behind, processed FROM task_events.handler_status
WHERE handler IN ('record', 'completed', 'late') ORDER BY handler;

-- Paused: no batch, the lag grows; resumed: exactly the events it missed.
SELECT task_events.pause_handler('record');
SELECT FROM task_events.create_task('api', 'while paused');
SELECT task_events.process_pending('record') AS while_paused;
SELECT handler, paused, events_behind FROM task_events.handler_status WHERE handler = 'record';
SELECT task_events.resume_handler('record');
SELECT task_events.process_pending('record') AS after_resume;
SELECT count(*) AS recorded, count(DISTINCT seq) AS distinct_events
FROM regress.api_seen WHERE handler = 'record';
SELECT handler, paused, events_behind FROM task_events.handler_status WHERE handler = 'record';

-- A built-in handler can be paused and resumed.
SELECT task_events.pause_handler('audit');
SELECT paused FROM task_events.handler_status WHERE handler = 'audit';
SELECT task_events.resume_handler('audit');

-- Replaying from a seq: every event the handler had handled from there on
-- is handled once more, in seq order; the earlier ones are not; new events
-- are handled once.  The count returned is what the replay hands over.
SELECT min(seq) AS replay_from FROM regress.api_seen WHERE handler = 'record' AND seq >= (
	SELECT seq FROM task_events.events WHERE aggregate_id = :'t2'::uuid AND aggregate_version = 1) \gset
SELECT count(*) AS before_replay FROM regress.api_seen WHERE handler = 'record' \gset
SELECT task_events.replay_handler('record', :replay_from) =
	(SELECT count(*) FROM regress.api_seen WHERE handler = 'record' AND seq >= :replay_from) AS count_is_what_it_handled;
SELECT FROM task_events.create_task('api', 'during replay');
SELECT handler, events_behind > 0 AS behind_while_replay_pending FROM task_events.handler_status WHERE handler = 'record';
SELECT task_events.process_pending('record', 100000) > 0 AS replayed;
SELECT bool_and(times = CASE WHEN seq >= :replay_from AND seq < (SELECT max(seq) FROM task_events.events) THEN 2 ELSE 1 END)
	AS each_replayed_once_more_others_once
FROM (SELECT seq, count(*) AS times FROM regress.api_seen WHERE handler = 'record' GROUP BY seq) t;
SELECT (SELECT array_agg(seq ORDER BY n) FROM (SELECT seq, n, row_number() OVER (ORDER BY n) AS k
		FROM regress.api_seen WHERE handler = 'record') x WHERE k > :before_replay) =
	(SELECT array_agg(seq ORDER BY seq) FROM (
		SELECT seq FROM regress.api_seen WHERE handler = 'record' AND seq >= :replay_from
		GROUP BY seq HAVING count(*) = 2
		UNION ALL SELECT max(seq) FROM task_events.events) y) AS replayed_in_seq_order_then_the_new_one;
SELECT handler, events_behind FROM task_events.handler_status WHERE handler = 'record';
SELECT * FROM regress.error_of($$SELECT task_events.replay_handler('record', 0)$$);
SELECT * FROM regress.error_of($$SELECT task_events.replay_handler('record', NULL)$$);
SELECT * FROM regress.error_of($$SELECT task_events.replay_handler('nope')$$);

-- rebuild_analytics: the figures recomputed from the events the analytics
-- handler counted, whatever they were before.
SELECT task_events.process_pending('analytics', 100000) >= 0 AS caught_up;
UPDATE task_events.analytics_counters SET value = value + 1000 WHERE user_id = 'api';
DELETE FROM task_events.completion_stats WHERE user_id = 'api';
SELECT task_events.rebuild_analytics() =
	(SELECT count(*) FROM task_events.events WHERE event_type IN ('TaskCreated', 'TaskCompleted'))
	AS rebuilt_every_counted_event;
SELECT * FROM regress.handler_outputs('api') WHERE output IN ('tasks_created', 'tasks_completed', 'completion_stats.completed');

-- Unregistering removes the handler with its position.
SELECT task_events.unregister_handler('late');
SELECT count(*) AS late_rows FROM task_events.handlers h
FULL JOIN task_events.handler_state s USING (handler) WHERE handler = 'late';
SELECT task_events.unregister_handler('record');
SELECT task_events.unregister_handler('completed');

-- The API is not for PUBLIC.
SELECT p.oid::regprocedure AS function, has_function_privilege('public', p.oid, 'EXECUTE') AS public_may
FROM pg_proc p WHERE p.pronamespace = 'task_events'::regnamespace
  AND p.proname IN ('register_handler', 'unregister_handler', 'pause_handler', 'resume_handler',
					'_check_event_types', '_require_handler')
ORDER BY 1::text;
