-- task_events.metrics(family): the figures of handler_status and
-- subscription_status, one row per sample, under the names of
-- contrib/prometheus/queries.yaml; the family argument (22023 when unknown)
-- computes one family only; the values equal the views' (retrying and
-- paused as 0/1) for every handler and lane, including a handler with a dead
-- letter, one retrying an event and one paused; the published estimate per
-- event type equals the exact count once the log is analyzed (a small log:
-- ANALYZE reads all of it), and the last minute is the exact count; the
-- function is for task_events_reader and pg_monitor (it reads what they
-- cannot: SECURITY DEFINER), not for others.  No workers here: handlers run
-- through process_pending() in this session.

-- An unknown family.
SELECT * FROM regress.error_of($$SELECT * FROM task_events.metrics('nope')$$);
SELECT * FROM regress.error_of($$SELECT * FROM task_events.metrics('')$$);

-- The views' values, as metrics() should give them for each handler and
-- lane: the differences, none expected.
CREATE FUNCTION regress.metrics_differences() RETURNS TABLE (metric text, labels jsonb, got float8, expected float8) AS $$
	WITH expected AS (
		SELECT 'task_events_handler_' || m.name AS metric, jsonb_build_object('handler', h.handler) AS labels,
			   m.v::float8 AS value
		FROM task_events.handler_status h,
			 LATERAL (VALUES ('events_behind', h.events_behind), ('processed_total', h.processed),
							 ('failed_total', h.failed), ('dead_letters', h.dead_letters),
							 ('retry_attempts', coalesce(h.retry_attempts, 0)),
							 ('retrying', (coalesce(h.retry_attempts, 0) > 0)::int),
							 ('paused', h.paused::int)) AS m(name, v)
		UNION ALL
		SELECT 'task_events_subscription_' || m.name,
			   jsonb_build_object('subscription', s.subscription, 'lane', s.lane::text), m.v::float8
		FROM task_events.subscription_status s,
			 LATERAL (VALUES ('events_behind', s.events_behind), ('acknowledged_total', s.acknowledged),
							 ('failed_total', s.failed), ('dead_letters', s.dead_letters),
							 ('retry_attempts', s.retry_attempts),
							 ('retrying', (s.retry_attempts > 0)::int)) AS m(name, v))
	SELECT coalesce(e.metric, g.metric), coalesce(e.labels, g.labels), g.value, e.value
	FROM expected e
	FULL JOIN (SELECT * FROM task_events.metrics()
			   WHERE metric NOT LIKE '%seconds_behind' AND metric NOT LIKE 'task_events_published%') g
		 ON g.metric = e.metric AND g.labels = e.labels
	WHERE g.value IS DISTINCT FROM e.value
	ORDER BY 1, 2
$$ LANGUAGE sql;

-- Handle what the earlier files left.
SELECT task_events.process_pending(max_events => 100000) >= 0 AS drained;
SELECT * FROM regress.metrics_differences();

-- A handler that fails on the TaskCreated of a task titled 'metrics poison...'.
CREATE FUNCTION regress.metrics_poison(events task_events.events[]) RETURNS void AS $$
DECLARE
	e task_events.events;
BEGIN
	FOREACH e IN ARRAY events LOOP
		IF e.event_type = 'TaskCreated' AND e.payload->>'task_title' LIKE 'metrics poison%' THEN
			RAISE EXCEPTION 'poisoned: %', e.payload->>'task_title';
		END IF;
	END LOOP;
END
$$ LANGUAGE plpgsql;
SELECT task_events.register_handler('metrics_poison', 'regress.metrics_poison(task_events.events[])',
									start_at => 'now');
-- A subscription of two lanes with nobody reading it: everything behind.
SELECT task_events.create_subscription('metrics_feed', start_at => 'beginning', lanes => 2);

-- A dead letter: max_attempts = 2, retried at once.
SET task_events.max_attempts = 2;
SET task_events.retry_delay = 0;
SELECT count(task_events.create_task('metrics_user', t))
FROM unnest('{metrics one,metrics poison 1,metrics two}'::text[]) t;
SELECT sum(task_events.process_pending('metrics_poison')) AS handled
FROM generate_series(1, 3);
SELECT metric, value FROM task_events.metrics('handler')
WHERE labels = '{"handler": "metrics_poison"}' ORDER BY metric;

-- Retrying: the next poison event waits (10 minutes, the longest backoff)
-- and the two events after it wait behind it.
SET task_events.retry_delay = '1h';
SELECT count(task_events.create_task('metrics_user', t))
FROM unnest('{metrics poison 2,metrics three,metrics four}'::text[]) t;
SELECT task_events.process_pending('metrics_poison') AS handled;
SELECT metric, value FROM task_events.metrics('handler')
WHERE labels = '{"handler": "metrics_poison"}' AND metric NOT LIKE '%seconds_behind' ORDER BY metric;
SELECT value > 0 AS waiting_for_seconds FROM task_events.metrics('handler')
WHERE labels = '{"handler": "metrics_poison"}' AND metric = 'task_events_handler_seconds_behind';

-- Paused: 1 for that handler only.
SELECT task_events.pause_handler('audit');
SELECT labels ->> 'handler' AS handler, value FROM task_events.metrics('handler')
WHERE metric = 'task_events_handler_paused' AND value <> 0;
SELECT * FROM regress.metrics_differences();

-- The subscription's lanes: every event of the log is behind, in one lane or the other.
SELECT (SELECT sum(value) FROM task_events.metrics('subscription')
		WHERE metric = 'task_events_subscription_events_behind' AND labels ->> 'subscription' = 'metrics_feed')
	   = (SELECT count(*) FROM task_events.events) AS every_event_behind,
	   (SELECT count(*) FROM task_events.metrics('subscription')
		WHERE metric = 'task_events_subscription_seconds_behind' AND labels ->> 'subscription' = 'metrics_feed'
		  AND value > 0) AS lanes_waiting;

-- Published: the estimate equals the exact count once analyzed; the last
-- minute is exact (one statement, one now()).
ANALYZE task_events.events;
SELECT e.event_type, m.value = e.n AS estimate_exact
FROM (SELECT event_type, count(*) AS n FROM task_events.events GROUP BY 1) e
LEFT JOIN task_events.metrics('published') m
	   ON m.metric = 'task_events_published_estimate' AND m.labels ->> 'event_type' = e.event_type
ORDER BY 1;
SELECT t.event_type,
	   m.value = (SELECT count(*) FROM task_events.events e
				  WHERE e.event_type = t.event_type AND e.occurred_at > now() - interval '1 minute') AS last_minute_exact
FROM unnest('{TaskCompleted,TaskCreated,TaskStatusChanged}'::text[]) t(event_type)
LEFT JOIN task_events.metrics('published') m
	   ON m.metric = 'task_events_published_last_minute' AND m.labels ->> 'event_type' = t.event_type
ORDER BY 1;

-- The families and their metric names (every one has samples by now).
SELECT f.family, m.metric
FROM unnest('{handler,subscription,published}'::text[]) AS f(family)
CROSS JOIN LATERAL task_events.metrics(f.family) AS m
GROUP BY 1, 2 ORDER BY 1, 2;
-- NULL (the default) is every family.
SELECT (SELECT count(*) FROM task_events.metrics()) =
	   (SELECT count(*) FROM unnest('{handler,subscription,published}'::text[]) f,
			   task_events.metrics(f)) AS all_families;

-- Who may call it: a member of pg_monitor (that cannot read the log
-- itself) and a reader; not others.
CREATE ROLE regress_monitor IN ROLE pg_monitor;
CREATE ROLE regress_metrics_reader IN ROLE task_events_reader;
CREATE ROLE regress_metrics_nobody;
SELECT count(*) AS all_samples FROM task_events.metrics() \gset
SET ROLE regress_monitor;
SELECT count(*) = :all_samples AS monitor_sees_all FROM task_events.metrics();
SELECT * FROM regress.error_of($$SELECT count(*) FROM task_events.events$$);
RESET ROLE;
SET ROLE regress_metrics_reader;
SELECT count(*) > 0 AS reader_sees FROM task_events.metrics();
RESET ROLE;
SET ROLE regress_metrics_nobody;
SELECT * FROM regress.error_of($$SELECT * FROM task_events.metrics()$$);
RESET ROLE;

-- Clean up.
SELECT task_events.resume_handler('audit');
SELECT task_events.unregister_handler('metrics_poison');
SELECT task_events.drop_subscription('metrics_feed');
RESET task_events.max_attempts;
RESET task_events.retry_delay;
DROP FUNCTION regress.metrics_poison(task_events.events[]), regress.metrics_differences();
DROP ROLE regress_monitor, regress_metrics_reader, regress_metrics_nobody;
