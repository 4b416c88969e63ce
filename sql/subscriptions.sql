-- Subscriptions (issue 11): create_subscription, drop_subscription,
-- read_batch, ack_batch, nack_batch, subscription_status, and
-- retry_dead_letters for subscriptions.  Every error with its SQLSTATE
-- (22004, 22023, 42704, 42710, 55000) and a failed call changes nothing;
-- start_at 'now' (nothing committed before is delivered) and 'beginning';
-- event_types; lanes (a task's events always in one lane, in version order;
-- every event delivered exactly once across the lanes when every batch is
-- acknowledged; a leased lane is not offered: the next read gets another
-- lane or nothing; an empty result means nothing is ready in any free lane);
-- ack_batch returns the count and moves the position, a second ack is
-- 55000; an expired lease offers the same events again under a new
-- batch_id and the old one is 55000; nack_batch with and without
-- failed_event_id, the backoff, the dead letters after max_attempts and
-- their retry; a rolled-back transaction's events are never delivered; the
-- task_events_consumer role reads, acknowledges and nacks, and nothing more.
-- No workers here: everything runs in this session.  Late commits need a
-- second session: test/isolation/specs/subscription_late_commit.spec.

-- What each read_batch of these tests returned, in the order it returned it.
CREATE TABLE regress.sub_got (
	n serial PRIMARY KEY, subscription text, batch_id bigint, lane int, seq bigint,
	event_id uuid, event_type text, aggregate_id uuid, aggregate_version bigint);
-- Reads a batch, records it, shows it by task title.
CREATE FUNCTION regress.sub_read(sub text, max_events int DEFAULT 1000,
	lease interval DEFAULT '30 seconds')
RETURNS TABLE (lane int, title text, event_type text, version bigint) AS $$
	WITH b AS (
		INSERT INTO regress.sub_got (subscription, batch_id, lane, seq, event_id, event_type,
									 aggregate_id, aggregate_version)
		SELECT sub, r.batch_id, r.lane, r.seq, r.event_id, r.event_type, r.aggregate_id, r.aggregate_version
		FROM task_events.read_batch(sub, max_events, lease) r
		RETURNING *)
	SELECT b.lane, t.title, b.event_type, b.aggregate_version
	FROM b LEFT JOIN task_events.tasks t ON t.task_id = b.aggregate_id
	ORDER BY b.seq
$$ LANGUAGE sql;
-- The batch_id of the last batch read for sub.
CREATE FUNCTION regress.sub_batch(sub text) RETURNS bigint AS $$
	SELECT batch_id FROM regress.sub_got WHERE subscription = sub ORDER BY n DESC LIMIT 1
$$ LANGUAGE sql;
-- The event_id of the event of a task (by title) at a version.
CREATE FUNCTION regress.sub_event(task_title text, version bigint) RETURNS uuid AS $$
	SELECT e.event_id FROM task_events.events e JOIN task_events.tasks t ON t.task_id = e.aggregate_id
	WHERE t.title = $1 AND e.aggregate_version = $2
$$ LANGUAGE sql;
-- A task whose events go to lane lane of lanes lanes (tasks of other lanes
-- are rolled back with their subtransaction).
CREATE FUNCTION regress.task_in_lane(owner text, title text, lane int, lanes int) RETURNS uuid AS $$
DECLARE
	t uuid;
BEGIN
	LOOP
		BEGIN
			SELECT task_id INTO t FROM task_events.create_task(owner, title);
			IF task_events._lane_of(t, lanes) = lane THEN
				RETURN t;
			END IF;
			RAISE EXCEPTION 'another lane';
		EXCEPTION WHEN raise_exception THEN
			NULL;
		END;
	END LOOP;
END
$$ LANGUAGE plpgsql;
-- error_of with batch ids masked.
CREATE FUNCTION regress.sub_error(stmt text, OUT sqlstate text, OUT message text, OUT detail text)
AS $$
	SELECT e.sqlstate, regexp_replace(e.message, 'batch [0-9]+', 'batch <id>'), e.detail
	FROM regress.error_of(stmt) e
$$ LANGUAGE sql;
-- Returns once no lane of sub holds an unexpired lease (a poll, not a guess
-- at a duration).
CREATE PROCEDURE regress.sub_wait_for_expiry(sub text) AS $$
BEGIN
	WHILE EXISTS (SELECT FROM task_events.subscription_lanes
				  WHERE subscription = sub AND leased_until > clock_timestamp()) LOOP
		PERFORM pg_sleep(0.01);
	END LOOP;
END
$$ LANGUAGE plpgsql;
-- Every row of the subscription tables and the wake-up handler's, as one
-- value: a failed call must leave it as it was.
CREATE FUNCTION regress.sub_tables() RETURNS text AS $$
	SELECT concat_ws(' | ',
		(SELECT string_agg(to_jsonb(s)::text, ',' ORDER BY s.subscription) FROM task_events.subscriptions s),
		(SELECT string_agg(to_jsonb(l)::text, ',' ORDER BY l.subscription, l.lane)
		 FROM task_events.subscription_lanes l),
		(SELECT string_agg(to_jsonb(d)::text, ',' ORDER BY d.subscription, d.seq)
		 FROM task_events.subscription_dead_letters d),
		(SELECT string_agg(h.handler, ',') FROM task_events.handlers h WHERE h.handler = 'subscriptions'))
$$ LANGUAGE sql;

-- The consumers' group role: cannot log in, no special attribute.
SELECT rolname, rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls
FROM pg_roles WHERE rolname = 'task_events_consumer';

------------------------------------------------------------------------------
-- create_subscription and drop_subscription: errors, nothing half-done.
------------------------------------------------------------------------------
SELECT regress.sub_tables() = '' AS no_subscription_no_wakeup_handler;
SELECT * FROM regress.error_of($$SELECT task_events.create_subscription(NULL)$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_subscription('x', start_at => NULL)$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_subscription('x', lanes => NULL)$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_subscription('')$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_subscription('Bad Name')$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_subscription('1x')$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_subscription(repeat('a', 64))$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_subscription('x', start_at => 'yesterday')$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_subscription('x', lanes => 0)$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_subscription('x', lanes => 65)$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_subscription('x', '{}')$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_subscription('x', '{TaskDeleted}')$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_subscription('x', '{TaskCreated,NULL}')$$);
SELECT regress.sub_tables() = '' AS nothing_created;
-- The longest name and the extreme lane counts are accepted.
SELECT task_events.create_subscription(repeat('a', 63), lanes => 64);
SELECT task_events.create_subscription('one_lane', lanes => 1);
SELECT subscription = repeat('a', 63) AS longest_name, lanes, count(l.lane) AS lane_rows
FROM task_events.subscriptions s JOIN task_events.subscription_lanes l USING (subscription)
GROUP BY subscription, lanes ORDER BY lanes;
-- An existing name: 42710, the subscription as it was.
SELECT regress.sub_tables() AS tables_before \gset
SELECT * FROM regress.error_of($$SELECT task_events.create_subscription('one_lane', '{TaskCreated}', 'beginning', 3)$$);
SELECT regress.sub_tables() = :'tables_before' AS unchanged;
-- The wake-up handler exists while a subscription does, and is built in.
SELECT handler, enabled FROM task_events.handler_status WHERE handler = 'subscriptions';
SELECT * FROM regress.error_of($$SELECT task_events.unregister_handler('subscriptions')$$);
-- drop_subscription: 22004, 22023, 42704, nothing dropped.
SELECT * FROM regress.error_of($$SELECT task_events.drop_subscription(NULL)$$);
SELECT * FROM regress.error_of($$SELECT task_events.drop_subscription('Bad Name')$$);
SELECT * FROM regress.error_of($$SELECT task_events.drop_subscription('nope')$$);
SELECT regress.sub_tables() = :'tables_before' AS unchanged;
SELECT task_events.drop_subscription(repeat('a', 63));
SELECT task_events.drop_subscription('one_lane');
SELECT regress.sub_tables() = '' AS all_dropped_with_the_wakeup_handler;

------------------------------------------------------------------------------
-- start_at and event_types.
------------------------------------------------------------------------------
SELECT FROM task_events.create_task('sub_start', 'before');
SELECT task_events.create_subscription('from_now');
SELECT task_events.create_subscription('from_beginning', start_at => 'beginning');
SELECT task_events.create_subscription('completions', event_types => '{TaskCompleted}');
SELECT subscription, event_types, lanes FROM task_events.subscriptions ORDER BY subscription;
SELECT task_id AS t_after FROM task_events.create_task('sub_start', 'after') \gset
SELECT FROM task_events.update_status(:'t_after', 'in_progress');
SELECT FROM task_events.complete_task(:'t_after');
-- events_behind counts only what each will be offered.
SELECT subscription, lane, position, events_behind, seconds_behind > 0 AS seconds_behind,
	   batch_id, batch_size, leased_until, acknowledged, failed, dead_letters, retry_attempts, retry_at, last_error
FROM task_events.subscription_status WHERE subscription <> 'from_beginning' ORDER BY subscription, lane;
SELECT events_behind = (SELECT count(*) FROM task_events.events) AS behind_by_every_event_of_the_log
FROM task_events.subscription_status WHERE subscription = 'from_beginning';
-- 'now': only the events committed after the creation.
SELECT * FROM regress.sub_read('from_now');
-- 'beginning': every event of the log, in seq order, 'before' included.
SELECT count(*) = (SELECT count(*) FROM task_events.events) AS every_event_of_the_log,
	   count(*) FILTER (WHERE title IN ('before', 'after')) AS of_before_and_after
FROM regress.sub_read('from_beginning', 100000);
SELECT array_agg(seq ORDER BY n) = array_agg(seq ORDER BY seq) AS in_seq_order
FROM regress.sub_got WHERE subscription = 'from_beginning';
-- event_types: the TaskCompleted event only.
SELECT * FROM regress.sub_read('completions');

------------------------------------------------------------------------------
-- Acknowledging: the count, the position, 55000 for a batch not leased.
------------------------------------------------------------------------------
SELECT regress.sub_batch('from_now') AS b_now \gset
SELECT subscription, position, events_behind, batch_id = :b_now AS leased, batch_size, leased_until > now() AS lease_running
FROM task_events.subscription_status WHERE subscription = 'from_now';
-- While the only lane is leased, nothing is offered.
SELECT * FROM regress.sub_read('from_now');
SELECT task_events.ack_batch('from_now', :b_now) AS acknowledged;
SELECT subscription, position = (SELECT max(seq) FROM regress.sub_got WHERE batch_id = :b_now) AS position_is_the_batchs_last,
	   events_behind, batch_id, batch_size, leased_until, acknowledged
FROM task_events.subscription_status WHERE subscription = 'from_now';
SELECT regress.sub_tables() AS tables_before \gset
-- Twice: 55000, nothing changes.
SELECT * FROM regress.sub_error($$SELECT task_events.ack_batch('from_now', $$ || :b_now || ')');
SELECT * FROM regress.sub_error($$SELECT task_events.nack_batch('from_now', $$ || :b_now || ')');
-- Unknown batch, another subscription's batch, and the argument errors.
SELECT regress.sub_batch('completions') AS b_completions \gset
SELECT * FROM regress.sub_error($$SELECT task_events.ack_batch('from_now', 999999)$$);
SELECT * FROM regress.sub_error($$SELECT task_events.ack_batch('from_now', $$ || :b_completions || ')');
SELECT * FROM regress.sub_error($$SELECT task_events.nack_batch('from_now', $$ || :b_completions || ')');
SELECT * FROM regress.sub_error($$SELECT task_events.ack_batch(NULL, 1)$$);
SELECT * FROM regress.sub_error($$SELECT task_events.ack_batch('from_now', NULL)$$);
SELECT * FROM regress.sub_error($$SELECT task_events.ack_batch('nope', 1)$$);
SELECT * FROM regress.sub_error($$SELECT task_events.ack_batch('Bad Name', 1)$$);
SELECT * FROM regress.sub_error($$SELECT task_events.nack_batch(NULL, 1)$$);
SELECT * FROM regress.sub_error($$SELECT task_events.nack_batch('from_now', NULL)$$);
SELECT * FROM regress.sub_error($$SELECT task_events.nack_batch('nope', 1)$$);
-- failed_event_id not in the batch: an event of the subscription not in it,
-- an event of another batch, an unknown id.
SELECT * FROM regress.sub_error(format($$SELECT task_events.nack_batch('completions', %s, %L)$$,
	:b_completions, regress.sub_event('after', 1)));
SELECT * FROM regress.sub_error(format($$SELECT task_events.nack_batch('completions', %s, %L)$$,
	:b_completions, regress.sub_event('before', 1)));
SELECT * FROM regress.sub_error(format($$SELECT task_events.nack_batch('completions', %s, %L)$$,
	:b_completions, '00000000-0000-0000-0000-000000000000'));
-- read_batch's arguments.
SELECT * FROM regress.sub_error($$SELECT * FROM task_events.read_batch(NULL)$$);
SELECT * FROM regress.sub_error($$SELECT * FROM task_events.read_batch('Bad Name')$$);
SELECT * FROM regress.sub_error($$SELECT * FROM task_events.read_batch('nope')$$);
SELECT * FROM regress.sub_error($$SELECT * FROM task_events.read_batch('from_now', NULL)$$);
SELECT * FROM regress.sub_error($$SELECT * FROM task_events.read_batch('from_now', 0)$$);
SELECT * FROM regress.sub_error($$SELECT * FROM task_events.read_batch('from_now', 100001)$$);
SELECT * FROM regress.sub_error($$SELECT * FROM task_events.read_batch('from_now', lease => NULL)$$);
SELECT * FROM regress.sub_error($$SELECT * FROM task_events.read_batch('from_now', lease => '0')$$);
SELECT * FROM regress.sub_error($$SELECT * FROM task_events.read_batch('from_now', lease => '-1 second')$$);
SELECT regress.sub_tables() = :'tables_before' AS nothing_changed;
-- The batch whose nack failed is still leased: it can be acknowledged.
SELECT task_events.ack_batch('completions', :b_completions) AS acknowledged;
SELECT task_events.ack_batch('from_beginning', regress.sub_batch('from_beginning'))
	= (SELECT count(*) FROM regress.sub_got WHERE subscription = 'from_beginning') AS acknowledged_all;
-- Nothing more to read.
SELECT * FROM regress.sub_read('from_now');
SELECT * FROM regress.sub_read('from_beginning');
SELECT * FROM regress.sub_read('completions');
SELECT subscription, events_behind, batch_id,
	   acknowledged = (SELECT count(*) FROM regress.sub_got g WHERE g.subscription = s.subscription)
	   AS acknowledged_every_event_read
FROM task_events.subscription_status s ORDER BY subscription;
SELECT task_events.drop_subscription(s) FROM unnest('{from_now,from_beginning,completions}'::text[]) s;

------------------------------------------------------------------------------
-- An expired lease: the same events again under a new batch_id; the old
-- batch_id is 55000 once the lane was read again, and changes nothing.
------------------------------------------------------------------------------
SELECT task_events.create_subscription('leases');
SELECT FROM task_events.create_task('sub_lease', 'leased');
SELECT * FROM regress.sub_read('leases', lease => '1 millisecond');
SELECT regress.sub_batch('leases') AS b_first \gset
CALL regress.sub_wait_for_expiry('leases');
SELECT leased_until < clock_timestamp() AS expired FROM task_events.subscription_status WHERE subscription = 'leases';
SELECT * FROM regress.sub_read('leases');
SELECT regress.sub_batch('leases') AS b_second \gset
SELECT :b_second <> :b_first AS new_batch_id,
	   (SELECT array_agg(seq ORDER BY seq) FROM regress.sub_got WHERE batch_id = :b_first)
	 = (SELECT array_agg(seq ORDER BY seq) FROM regress.sub_got WHERE batch_id = :b_second) AS same_events;
SELECT regress.sub_tables() AS tables_before \gset
SELECT * FROM regress.sub_error($$SELECT task_events.ack_batch('leases', $$ || :b_first || ')');
SELECT * FROM regress.sub_error($$SELECT task_events.nack_batch('leases', $$ || :b_first || ')');
SELECT regress.sub_tables() = :'tables_before' AS nothing_changed;
SELECT task_events.ack_batch('leases', :b_second) AS acknowledged;
-- An expired lease that nobody read again can still be acknowledged.
SELECT FROM task_events.create_task('sub_lease', 'leased again');
SELECT * FROM regress.sub_read('leases', lease => '1 millisecond');
CALL regress.sub_wait_for_expiry('leases');
SELECT task_events.ack_batch('leases', regress.sub_batch('leases')) AS acknowledged;
SELECT * FROM regress.sub_read('leases');
SELECT events_behind, batch_id, acknowledged FROM task_events.subscription_status WHERE subscription = 'leases';
SELECT task_events.drop_subscription('leases');

------------------------------------------------------------------------------
-- Lanes.  Two tasks in each of lanes 0, 1 and 2 of 4, lane 3 empty; four
-- events each, interleaved in the log; batches of 2 events.
------------------------------------------------------------------------------
SELECT task_events.create_subscription('laned', lanes => 4);
CREATE TEMP TABLE lane_tasks AS
SELECT l AS lane, k, regress.task_in_lane('sub_lanes', format('lane %s task %s', l, k), l, 4) AS task_id
FROM generate_series(0, 2) l, generate_series(1, 2) k;
SELECT FROM lane_tasks, LATERAL task_events.update_status(task_id, 'in_progress') ORDER BY k, lane;
SELECT FROM lane_tasks, LATERAL task_events.complete_task(task_id) ORDER BY k DESC, lane DESC;
SELECT lane, events_behind FROM task_events.subscription_status WHERE subscription = 'laned' ORDER BY lane;
-- Three lanes leased one after the other, then none free with events.
SELECT * FROM regress.sub_read('laned', 2);
SELECT * FROM regress.sub_read('laned', 2);
SELECT * FROM regress.sub_read('laned', 2);
SELECT * FROM regress.sub_read('laned', 2);
SELECT lane, batch_size, leased_until IS NOT NULL AS leased FROM task_events.subscription_status
WHERE subscription = 'laned' ORDER BY lane;
-- Acknowledge them, then read and acknowledge until nothing is ready.
SELECT task_events.ack_batch('laned', batch_id) AS acknowledged
FROM (SELECT DISTINCT batch_id FROM regress.sub_got WHERE subscription = 'laned') b ORDER BY batch_id;
CREATE FUNCTION regress.sub_drain(sub text, max_events int) RETURNS int AS $$
DECLARE
	batches int := 0;
BEGIN
	LOOP
		PERFORM FROM regress.sub_read(sub, max_events);
		EXIT WHEN NOT FOUND OR batches >= 100;
		PERFORM task_events.ack_batch(sub, regress.sub_batch(sub));
		batches := batches + 1;
	END LOOP;
	RETURN batches;
END
$$ LANGUAGE plpgsql;
SELECT regress.sub_drain('laned', 2) AS more_batches;
-- Every event of the tasks exactly once; each task in one lane, its own
-- (_lane_of), its events in version order; each batch in seq order.
SELECT (SELECT count(*) FROM task_events.events e JOIN lane_tasks t ON t.task_id = e.aggregate_id) AS events,
	   count(*) AS delivered, count(DISTINCT g.seq) AS distinct_delivered
FROM regress.sub_got g WHERE g.subscription = 'laned';
SELECT t.lane AS task_lane, t.k, array_agg(DISTINCT g.lane) AS delivered_in_lanes,
	   bool_and(g.lane = task_events._lane_of(g.aggregate_id, 4)) AS its_lane,
	   array_agg(g.aggregate_version ORDER BY g.n) AS versions_in_delivery_order
FROM lane_tasks t JOIN regress.sub_got g ON g.aggregate_id = t.task_id AND g.subscription = 'laned'
GROUP BY t.lane, t.k ORDER BY t.lane, t.k;
SELECT bool_and(in_order) AS batches_in_seq_order FROM (
	SELECT array_agg(seq ORDER BY n) = array_agg(seq ORDER BY seq) AS in_order
	FROM regress.sub_got WHERE subscription = 'laned' GROUP BY batch_id) b;
SELECT lane, events_behind, batch_id, acknowledged FROM task_events.subscription_status
WHERE subscription = 'laned' ORDER BY lane;
-- A new event in one lane only (the others empty, one of them never
-- served): the next read finds it.
SELECT FROM regress.task_in_lane('sub_lanes', 'lane 2 later', 2, 4);
SELECT * FROM regress.sub_read('laned');
SELECT task_events.drop_subscription('laned');

------------------------------------------------------------------------------
-- nack_batch: without failed_event_id an attempt of the whole batch; with
-- it, the events before it acknowledged and an attempt of the batch now
-- starting at it; an acknowledgement ends the retries; the backoff.
------------------------------------------------------------------------------
SET task_events.retry_delay = 0;
SET task_events.max_attempts = 3;
SELECT task_events.create_subscription('nacked');
SELECT task_id AS t_n1 FROM task_events.create_task('sub_nack', 'nack 1') \gset
SELECT FROM task_events.create_task('sub_nack', 'nack 2');
SELECT FROM task_events.update_status(:'t_n1', 'in_progress');
SELECT * FROM regress.sub_read('nacked');
SELECT regress.sub_batch('nacked') AS b1 \gset
SELECT task_events.nack_batch('nacked', :b1, error => 'whole batch failed');
SELECT position, events_behind, batch_id, acknowledged, failed, retry_attempts,
	   retry_at <= clock_timestamp() AS retry_due, last_error, last_error_at IS NOT NULL AS error_time
FROM task_events.subscription_status WHERE subscription = 'nacked';
SELECT * FROM regress.sub_error($$SELECT task_events.ack_batch('nacked', $$ || :b1 || ')');
-- retry_delay 0: offered again at once, under a new batch id.
SELECT * FROM regress.sub_read('nacked');
SELECT regress.sub_batch('nacked') AS b2 \gset
SELECT :b2 <> :b1 AS new_batch_id;
SELECT task_events.nack_batch('nacked', :b2, regress.sub_event('nack 1', 2), 'status change failed');
SELECT position = (SELECT seq FROM task_events.events WHERE event_id = regress.sub_event('nack 1', 2)) - 1
		AS position_before_the_failed_event,
	   events_behind, batch_id, acknowledged, failed, retry_attempts, last_error
FROM task_events.subscription_status WHERE subscription = 'nacked';
-- The failed event first in the batch: one more attempt of that batch.
SELECT * FROM regress.sub_read('nacked');
SELECT task_events.nack_batch('nacked', regress.sub_batch('nacked'), regress.sub_event('nack 1', 2), 'again');
SELECT events_behind, acknowledged, failed, retry_attempts, last_error
FROM task_events.subscription_status WHERE subscription = 'nacked';
SELECT * FROM regress.sub_read('nacked');
SELECT task_events.ack_batch('nacked', regress.sub_batch('nacked')) AS acknowledged;
SELECT events_behind, acknowledged, failed, retry_attempts, retry_at, dead_letters
FROM task_events.subscription_status WHERE subscription = 'nacked';
-- The backoff: retry_delay before the first retry, doubling at each
-- further attempt; the lane is not offered before retry_at.
SELECT FROM task_events.create_task('sub_nack', 'nack 3');
SELECT * FROM regress.sub_read('nacked');
SELECT task_events.nack_batch('nacked', regress.sub_batch('nacked'));
SET task_events.retry_delay = '1min';
SELECT * FROM regress.sub_read('nacked');
SELECT task_events.nack_batch('nacked', regress.sub_batch('nacked'));
SELECT retry_attempts,
	   retry_at BETWEEN clock_timestamp() + interval '1 minute 50 seconds'
				AND clock_timestamp() + interval '2 minutes' AS retry_in_2_minutes
FROM task_events.subscription_status WHERE subscription = 'nacked';
SELECT * FROM regress.sub_read('nacked');
SELECT task_events.drop_subscription('nacked');
SET task_events.retry_delay = 0;

------------------------------------------------------------------------------
-- Dead letters: after max_attempts (3) failed attempts the failed event (or
-- the whole batch) goes to subscription_dead_letters and the lane moves
-- past it; retry_dead_letters() offers them again as a batch of their own.
------------------------------------------------------------------------------
SELECT task_events.create_subscription('dead');
SELECT task_events.create_subscription('other_dead');
SELECT task_id AS t_d1 FROM task_events.create_task('sub_dead', 'dead 1') \gset
SELECT FROM task_events.update_status(:'t_d1', 'in_progress');
SELECT FROM task_events.create_task('sub_dead', 'dead 2');
SELECT FROM task_events.create_task('sub_dead', 'dead 3');
-- 'dead 1' version 2 fails three times.
SELECT * FROM regress.sub_read('dead');
SELECT task_events.nack_batch('dead', regress.sub_batch('dead'), regress.sub_event('dead 1', 2), 'attempt 1');
SELECT * FROM regress.sub_read('dead');
SELECT task_events.nack_batch('dead', regress.sub_batch('dead'), regress.sub_event('dead 1', 2), 'attempt 2');
SELECT events_behind, acknowledged, failed, dead_letters, retry_attempts FROM task_events.subscription_status
WHERE subscription = 'dead';
SELECT * FROM regress.sub_read('dead');
SELECT task_events.nack_batch('dead', regress.sub_batch('dead'), regress.sub_event('dead 1', 2), 'attempt 3');
SELECT events_behind, acknowledged, failed, dead_letters, retry_attempts, retry_at, last_error
FROM task_events.subscription_status WHERE subscription = 'dead';
SELECT t.title, e.aggregate_version, d.lane, d.attempts, d.message, d.retry_requested
FROM task_events.subscription_dead_letters d JOIN task_events.events e USING (seq)
JOIN task_events.tasks t ON t.task_id = e.aggregate_id
WHERE d.subscription = 'dead' ORDER BY d.seq;
-- The lane moved past it; a batch failing as a whole three times goes to
-- the dead letters whole.
SELECT * FROM regress.sub_read('dead', 1);
SELECT task_events.ack_batch('dead', regress.sub_batch('dead')) AS acknowledged;
SELECT * FROM regress.sub_read('dead');
SELECT task_events.nack_batch('dead', regress.sub_batch('dead'), error => 'batch attempt 1');
SELECT * FROM regress.sub_read('dead');
SELECT task_events.nack_batch('dead', regress.sub_batch('dead'), error => 'batch attempt 2');
SELECT * FROM regress.sub_read('dead');
SELECT task_events.nack_batch('dead', regress.sub_batch('dead'), error => 'batch attempt 3');
SELECT * FROM regress.sub_read('dead');
SELECT events_behind, acknowledged, failed, dead_letters, retry_attempts, last_error
FROM task_events.subscription_status WHERE subscription = 'dead';
-- other_dead: its whole batch at once (max_attempts 1).
SET task_events.max_attempts = 1;
SELECT * FROM regress.sub_read('other_dead');
SELECT task_events.nack_batch('other_dead', regress.sub_batch('other_dead'));
SET task_events.max_attempts = 3;
-- retry_dead_letters('dead') queues this subscription's dead letters only
-- (not the handlers' nor another subscription's).
SELECT count(*) FILTER (WHERE retry_requested) AS handler_dead_letters_queued FROM task_events.dead_letters \gset
SELECT task_events.retry_dead_letters('dead') AS queued;
SELECT subscription, count(*) FILTER (WHERE retry_requested) AS queued, count(*) AS dead_letters
FROM task_events.subscription_dead_letters GROUP BY subscription ORDER BY subscription;
SELECT count(*) FILTER (WHERE retry_requested) = :handler_dead_letters_queued AS handlers_untouched
FROM task_events.dead_letters;
-- Offered again as one batch; 'dead 3' fails again: 'dead 1' version 2
-- before it is done, 'dead 3' goes back with one more attempt and is not
-- offered again until queued again.
SELECT * FROM regress.sub_read('dead');
SELECT task_events.nack_batch('dead', regress.sub_batch('dead'), regress.sub_event('dead 3', 1), 'still failing');
SELECT t.title, e.aggregate_version, d.attempts, d.message, d.retry_requested
FROM task_events.subscription_dead_letters d JOIN task_events.events e USING (seq)
JOIN task_events.tasks t ON t.task_id = e.aggregate_id
WHERE d.subscription = 'dead' ORDER BY d.seq;
SELECT events_behind, acknowledged, failed, dead_letters, retry_attempts, last_error
FROM task_events.subscription_status WHERE subscription = 'dead';
SELECT * FROM regress.sub_read('dead');
-- Queued again and acknowledged: the dead letters are gone.
SELECT task_events.retry_dead_letters('dead') AS queued;
SELECT * FROM regress.sub_read('dead');
SELECT task_events.ack_batch('dead', regress.sub_batch('dead')) AS acknowledged;
SELECT * FROM regress.sub_read('dead');
SELECT events_behind, acknowledged, dead_letters FROM task_events.subscription_status WHERE subscription = 'dead';
SELECT subscription, count(*) AS dead_letters FROM task_events.subscription_dead_letters
GROUP BY subscription ORDER BY subscription;

------------------------------------------------------------------------------
-- dead_letter_event: an event retrying cannot mend (a webhook's 4xx) goes to
-- the dead letters at its first attempt, the events before it are
-- acknowledged, the ones after it are offered again; the event must be in
-- the batch, and not null.
------------------------------------------------------------------------------
SELECT task_events.create_subscription('rejected');
SELECT FROM task_events.create_task('sub_reject', 'reject 1');
SELECT FROM task_events.create_task('sub_reject', 'reject 2');
SELECT FROM task_events.create_task('sub_reject', 'reject 3');
SELECT * FROM regress.sub_read('rejected');
SELECT * FROM regress.sub_error(format($$SELECT task_events.dead_letter_event('rejected', %s, NULL)$$,
	regress.sub_batch('rejected')));
SELECT * FROM regress.sub_error(format($$SELECT task_events.dead_letter_event('rejected', %s, %L)$$,
	regress.sub_batch('rejected'), regress.sub_event('dead 1', 1)));
SELECT * FROM regress.sub_error(format($$SELECT task_events.dead_letter_event('rejected', %s, %L)$$,
	regress.sub_batch('rejected') + 1000, regress.sub_event('reject 2', 1)));
SELECT task_events.dead_letter_event('rejected', regress.sub_batch('rejected'),
	regress.sub_event('reject 2', 1), 'HTTP 400: bad request');
SELECT t.title, d.attempts, d.message, d.retry_requested
FROM task_events.subscription_dead_letters d JOIN task_events.events e USING (seq)
JOIN task_events.tasks t ON t.task_id = e.aggregate_id
WHERE d.subscription = 'rejected' ORDER BY d.seq;
SELECT events_behind, acknowledged, failed, dead_letters, retry_attempts, last_error
FROM task_events.subscription_status WHERE subscription = 'rejected';
SELECT * FROM regress.sub_read('rejected');
SELECT task_events.ack_batch('rejected', regress.sub_batch('rejected')) AS acknowledged;
-- A retried dead letter rejected again stays a dead letter, one more attempt.
SELECT task_events.retry_dead_letters('rejected') AS queued;
SELECT * FROM regress.sub_read('rejected');
SELECT task_events.dead_letter_event('rejected', regress.sub_batch('rejected'),
	regress.sub_event('reject 2', 1), 'HTTP 400: still bad');
SELECT t.title, d.attempts, d.message, d.retry_requested
FROM task_events.subscription_dead_letters d JOIN task_events.events e USING (seq)
JOIN task_events.tasks t ON t.task_id = e.aggregate_id
WHERE d.subscription = 'rejected' ORDER BY d.seq;
SELECT * FROM regress.sub_read('rejected');
SELECT task_events.drop_subscription('rejected');

------------------------------------------------------------------------------
-- A rolled-back transaction's events are never delivered.
------------------------------------------------------------------------------
BEGIN;
SELECT FROM task_events.create_task('sub_rollback', 'rolled back');
ROLLBACK;
BEGIN;
SELECT FROM task_events.create_task('sub_rollback', 'committed');
SAVEPOINT s;
SELECT FROM task_events.create_task('sub_rollback', 'rolled back to a savepoint');
ROLLBACK TO SAVEPOINT s;
COMMIT;
SELECT * FROM regress.sub_read('dead');
SELECT task_events.ack_batch('dead', regress.sub_batch('dead')) AS acknowledged;

------------------------------------------------------------------------------
-- task_events_consumer: reads, acknowledges, nacks and dead-letters batches, reads
-- subscription_status; cannot create nor drop subscriptions, nor read or
-- write the tables.
------------------------------------------------------------------------------
CREATE ROLE regress_consumer LOGIN IN ROLE task_events_consumer;
GRANT USAGE ON SCHEMA regress TO regress_consumer;
GRANT ALL ON regress.sub_got, regress.sub_got_n_seq TO regress_consumer;
-- A read as a consumer sees it: the title from the event's payload.
CREATE FUNCTION regress.sub_read_as_consumer(sub text, max_events int)
RETURNS TABLE (lane int, title text, event_type text) AS $$
	WITH r AS (SELECT * FROM task_events.read_batch(sub, max_events)),
		 i AS (INSERT INTO regress.sub_got (subscription, batch_id, lane, seq, event_id, event_type,
											aggregate_id, aggregate_version)
			   SELECT sub, r.batch_id, r.lane, r.seq, r.event_id, r.event_type, r.aggregate_id,
					  r.aggregate_version
			   FROM r)
	SELECT r.lane, r.payload->>'task_title', r.event_type FROM r ORDER BY r.seq
$$ LANGUAGE sql;
SELECT FROM task_events.create_task('sub_consumer', 'consumed 1');
SELECT FROM task_events.create_task('sub_consumer', 'consumed 2');
SET ROLE regress_consumer;
SELECT lane, title, event_type FROM regress.sub_read_as_consumer('dead', 1);
SELECT task_events.nack_batch('dead', regress.sub_batch('dead'), error => 'by the consumer');
SELECT lane, title, event_type FROM regress.sub_read_as_consumer('dead', 1);
SELECT task_events.ack_batch('dead', regress.sub_batch('dead')) AS acknowledged;
SELECT lane, title, event_type FROM regress.sub_read_as_consumer('dead', 1);
SELECT task_events.dead_letter_event('dead', regress.sub_batch('dead'),
	(SELECT event_id FROM regress.sub_got ORDER BY n DESC LIMIT 1), 'rejected by the consumer');
SELECT subscription, lane, events_behind, acknowledged, failed, dead_letters, last_error
FROM task_events.subscription_status ORDER BY subscription;
SELECT * FROM regress.error_of($$SELECT task_events.create_subscription('by_consumer')$$);
SELECT * FROM regress.error_of($$SELECT task_events.drop_subscription('dead')$$);
SELECT * FROM regress.error_of($$SELECT task_events.retry_dead_letters('dead')$$);
SELECT r AS relation, (regress.error_of('SELECT count(*) FROM ' || r)).sqlstate
FROM unnest('{task_events.subscriptions,task_events.subscription_lanes,task_events.subscription_dead_letters,task_events.events,task_events.tasks,task_events.handler_status}'::text[]) r;
SELECT * FROM regress.error_of($$UPDATE task_events.subscription_lanes SET leased_until = NULL$$);
RESET ROLE;
RESET task_events.max_attempts;
RESET task_events.retry_delay;

------------------------------------------------------------------------------
-- drop_subscription removes the lanes and dead letters; the last one takes
-- the wake-up handler with it.
------------------------------------------------------------------------------
SELECT task_events.drop_subscription('dead');
SELECT count(*) AS other_dead_letters FROM task_events.subscription_dead_letters;
SELECT task_events.drop_subscription('other_dead');
SELECT regress.sub_tables() = '' AS nothing_left,
	   (SELECT count(*) FROM task_events.handler_state WHERE handler = 'subscriptions') AS wakeup_state_rows;

REVOKE ALL ON SCHEMA regress FROM regress_consumer;
REVOKE ALL ON regress.sub_got, regress.sub_got_n_seq FROM regress_consumer;
DROP ROLE regress_consumer;

------------------------------------------------------------------------------
-- read_lane: one lane only; the others are left to other readers.
------------------------------------------------------------------------------
SELECT task_events.create_subscription('by_lane', lanes => 4);
SELECT count(*) AS tasks FROM generate_series(1, 12) i, task_events.create_task('lane' || i, 'by lane ' || i);
-- At least one task in lane 2 and one in lane 0, whatever the hash of the
-- random ids above.
SELECT FROM regress.task_in_lane('lane2', 'surely in lane 2', 2, 4);
SELECT FROM regress.task_in_lane('lane0', 'surely in lane 0', 0, 4);
CREATE TEMP TABLE by_lane AS SELECT * FROM task_events.read_lane('by_lane', 2);
SELECT count(*) > 0 AS read_some, bool_and(lane = 2) AS all_of_lane_2,
	   (SELECT count(DISTINCT batch_id) FROM by_lane) AS batches
FROM by_lane;
-- Lane 2 is leased: read_lane finds nothing, read_batch takes another lane.
SELECT count(*) AS while_leased FROM task_events.read_lane('by_lane', 2);
SELECT bool_and(lane <> 2) AS another_lane FROM task_events.read_batch('by_lane');
SELECT task_events.ack_batch('by_lane', (SELECT min(batch_id) FROM by_lane)) = (SELECT count(*) FROM by_lane)
	AS acked_all;
SELECT events_behind AS lane_2_behind FROM task_events.subscription_status
WHERE subscription = 'by_lane' AND lane = 2;
SELECT * FROM regress.error_of($$SELECT * FROM task_events.read_lane('by_lane', 4)$$);
SELECT * FROM regress.error_of($$SELECT * FROM task_events.read_lane('by_lane', -1)$$);
SELECT * FROM regress.error_of($$SELECT * FROM task_events.read_lane('by_lane', NULL)$$);
SELECT * FROM regress.error_of($$SELECT * FROM task_events.read_lane('no_such', 0)$$);
SELECT task_events.drop_subscription('by_lane');
DROP TABLE by_lane;

DROP FUNCTION regress.sub_read(text, int, interval), regress.sub_batch(text), regress.sub_event(text, bigint),
	regress.task_in_lane(text, text, int, int), regress.sub_error(text), regress.sub_tables(),
	regress.sub_drain(text, int), regress.sub_read_as_consumer(text, int);
DROP PROCEDURE regress.sub_wait_for_expiry(text);
DROP TABLE regress.sub_got;
