-- Handler lanes: set_handler_lanes(handler, lanes).  Every error with its
-- SQLSTATE and nothing changed; a handler in 4 lanes handles each event
-- exactly once, each in the lane of its task (_lane_of), each task's events
-- in seq order; a change from 4 to 2 lanes while events wait (a barrier)
-- skips and repeats nothing; handler_backlog, handler_status and
-- replay_handler over the lanes.  Handlers are run here by
-- process_pending(), with the workers' code, one lane after the other.
CREATE TABLE regress.lanes_seen (seq bigint, task uuid, n serial);
CREATE FUNCTION regress.lanes_record(events task_events.events[]) RETURNS void
	LANGUAGE sql AS $$
	INSERT INTO regress.lanes_seen (seq, task) SELECT e.seq, e.aggregate_id FROM unnest(events) e
$$;
-- Each event once, and each task's events in seq order.
CREATE FUNCTION regress.lanes_exact(OUT seen bigint, OUT distinct_seen bigint,
	OUT events bigint, OUT in_task_order boolean)
	LANGUAGE sql AS $$
	SELECT (SELECT count(*) FROM regress.lanes_seen),
		   (SELECT count(DISTINCT seq) FROM regress.lanes_seen),
		   (SELECT count(*) FROM task_events.events),
		   (SELECT bool_and(ordered) FROM (
				SELECT array_agg(seq ORDER BY n) = array_agg(seq ORDER BY seq) AS ordered
				FROM regress.lanes_seen GROUP BY task) t)
$$;
CREATE FUNCTION regress.lanes_tasks(k int) RETURNS void
	LANGUAGE plpgsql AS $$
DECLARE
	t uuid;
BEGIN
	FOR i IN 1..k LOOP
		SELECT task_id INTO t FROM task_events.create_task('lanes', 'task ' || i);
		PERFORM task_events.update_status(t, 'in_progress');
		PERFORM task_events.complete_task(t);
	END LOOP;
END
$$;
SELECT task_events.register_handler('laned', 'regress.lanes_record(task_events.events[])');

-- Errors: nothing changes.
SELECT * FROM regress.error_of($$SELECT task_events.set_handler_lanes('nope', 2)$$);
SELECT * FROM regress.error_of($$SELECT task_events.set_handler_lanes(NULL, 2)$$);
SELECT * FROM regress.error_of($$SELECT task_events.set_handler_lanes('laned', NULL)$$);
SELECT * FROM regress.error_of($$SELECT task_events.set_handler_lanes('laned', 0)$$);
SELECT * FROM regress.error_of($$SELECT task_events.set_handler_lanes('laned', 65)$$);
SELECT lanes FROM task_events.handler_status WHERE handler = 'laned';
SELECT count(*) AS state_rows FROM task_events.handler_state WHERE handler = 'laned';

-- A handler that never ran: its 4 lanes start at the beginning of the log.
SELECT task_events.set_handler_lanes('laned', 4);
SELECT lane, lanes, lanes_barrier IS NULL AS no_barrier
FROM task_events.handler_state WHERE handler = 'laned' ORDER BY lane;
SELECT lanes FROM task_events.handler_status WHERE handler = 'laned';

SELECT regress.lanes_tasks(40);
SELECT (SELECT events_behind FROM task_events.handler_status WHERE handler = 'laned') =
	(SELECT count(*) FROM task_events.events) AS behind_every_event;
SELECT task_events.process_pending('laned', 100000) = (SELECT count(*) FROM task_events.events)
	AS handled_every_event;
SELECT * FROM regress.lanes_exact();
-- Each lane handled the events of its tasks, and every lane had some.
SELECT s.lane, s.processed = (SELECT count(*) FROM task_events.events e
							  WHERE task_events._lane_of(e.aggregate_id, 4) = s.lane) AS its_tasks,
	   s.processed > 0 AS some
FROM task_events.handler_state s WHERE s.handler = 'laned' ORDER BY s.lane;
SELECT events_behind, processed = (SELECT count(*) FROM task_events.events) AS processed_all
FROM task_events.handler_status WHERE handler = 'laned';

-- From 4 lanes to 2 while events wait: each lane first handles the events
-- before the barrier, then the 2 new lanes go on from it.
SELECT regress.lanes_tasks(10);
SELECT task_events.process_pending('laned', 1) > 0 AS some_handled;
SELECT task_events.set_handler_lanes('laned', 2);
SELECT regress.lanes_tasks(10);
SELECT lane, lanes, lanes_barrier IS NOT NULL AS barrier
FROM task_events.handler_state WHERE handler = 'laned' ORDER BY lane;
SELECT lanes FROM task_events.handler_status WHERE handler = 'laned';
SELECT (SELECT events_behind FROM task_events.handler_status WHERE handler = 'laned') =
	(SELECT count(*) FROM task_events.events) - (SELECT count(*) FROM regress.lanes_seen) AS behind_the_rest;
SELECT task_events.process_pending('laned', 100000) > 0 AS up_to_the_barrier;
SELECT lane, lanes, lanes_barrier IS NULL AS no_barrier
FROM task_events.handler_state WHERE handler = 'laned' ORDER BY lane;
SELECT task_events.process_pending('laned', 100000) > 0 AS after_the_barrier;
SELECT task_events.process_pending('laned', 100000) AS nothing_left;
SELECT * FROM regress.lanes_exact();
SELECT events_behind, lanes, processed = (SELECT count(*) FROM task_events.events) AS processed_all
FROM task_events.handler_status WHERE handler = 'laned';

-- Asking for the lanes in effect while a change waits cancels it.
SELECT task_events.set_handler_lanes('laned', 3);
SELECT count(*) FILTER (WHERE lanes_barrier IS NOT NULL) AS barriers
FROM task_events.handler_state WHERE handler = 'laned';
SELECT task_events.set_handler_lanes('laned', 2);
SELECT count(*) FILTER (WHERE lanes_barrier IS NOT NULL) AS barriers, max(lanes) AS lanes
FROM task_events.handler_state WHERE handler = 'laned';

-- A replay goes through the lanes too: every event once more.
SELECT task_events.replay_handler('laned') = (SELECT count(*) FROM task_events.events) AS replays_every_event;
SELECT task_events.process_pending('laned', 100000) = (SELECT count(*) FROM task_events.events) AS replayed;
SELECT bool_and(times = 2) AS each_twice FROM (SELECT count(*) AS times FROM regress.lanes_seen GROUP BY seq) t;

SELECT task_events.unregister_handler('laned');
SELECT count(*) AS state_rows FROM task_events.handler_state WHERE handler = 'laned';

-- The API is not for PUBLIC.
SELECT has_function_privilege('public', 'task_events.set_handler_lanes(text, int)', 'EXECUTE') AS public_may;
