/*
 * pgq_baseline.sql: the task_events contract on PgQ (Skype's queue,
 * Debian's postgresql-15-pgq3 and pgqd), as the benchmark's PgQ variant.
 *
 * Loaded after plpgsql_baseline.sql into the same database: it reuses that
 * file's argument checks (plpgsql_impl.check_text) and ISO 8601 format
 * (plpgsql_impl.iso8601), so that the two variants validate alike.
 *
 * The write path is the PL/pgSQL baseline's: the same task row, the same
 * validations, SQLSTATEs and messages; instead of an event table, NOTIFY and
 * trigger handlers, each event goes to the PgQ queue task_events with
 * pgq.insert_event(queue, event_type, envelope), the envelope being the one
 * task_events publishes ({"event_type", "event_data": payload, "timestamp",
 * "seq"}).  PgQ's event tables are the log; "seq" comes from a sequence of
 * its own (PgQ assigns ev_id inside insert_event, after the envelope is
 * built).
 *
 * The three handlers are PgQ consumers of that queue, registered with
 * pgq.register_consumer: notification, analytics and audit, writing the rows
 * the baseline's triggers write, set-based per batch.  Each has a round
 * function (pgq.next_batch, pgq.get_batch_events, the INSERTs,
 * pgq.finish_batch) that returns the events of the batch, or NULL when
 * there was no batch; bench_pgq.run_consumer(name) calls rounds in a loop,
 * committing after each, until bench_pgq.consumer_control.stop is set.
 * Batches are made by the ticker (pgqd, started by bench.sh): the queue
 * settings below make each ticker call that finds new events a tick.
 *
 * Everything lives in schema bench_pgq (the queue in PgQ's schema pgq); the
 * pgbench scripts pgq_*.pgbench call it schema-qualified.
 */

CREATE EXTENSION pgq;

CREATE SCHEMA bench_pgq;

CREATE TYPE bench_pgq.task_status AS ENUM ('pending', 'in_progress', 'completed', 'cancelled');

CREATE TABLE bench_pgq.tasks (
	task_id uuid PRIMARY KEY,
	user_id text NOT NULL,
	title text NOT NULL,
	description text,
	status bench_pgq.task_status NOT NULL,
	version bigint NOT NULL,
	created_at timestamptz NOT NULL,
	updated_at timestamptz NOT NULL,
	completed_at timestamptz
);

/* The envelope's "seq". */
CREATE SEQUENCE bench_pgq.event_seq;

CREATE TABLE bench_pgq.notifications (
	notification_id bigserial PRIMARY KEY,
	event_id uuid UNIQUE NOT NULL,
	user_id text NOT NULL,
	message text NOT NULL,
	created_at timestamptz NOT NULL
);

CREATE TABLE bench_pgq.analytics_counters (
	metric text,
	user_id text,
	value bigint NOT NULL,
	PRIMARY KEY (metric, user_id)
);

CREATE TABLE bench_pgq.completion_stats (
	user_id text PRIMARY KEY,
	completed bigint,
	total_seconds float8,
	min_seconds float8,
	max_seconds float8
);

CREATE TABLE bench_pgq.audit_log (
	event_id uuid PRIMARY KEY,
	seq bigint,
	event_type text,
	event_data jsonb,
	occurred_at timestamptz,
	recorded_at timestamptz
);

/* Set stop to make every bench_pgq.run_consumer return after its round. */
CREATE TABLE bench_pgq.consumer_control (stop boolean NOT NULL);
INSERT INTO bench_pgq.consumer_control VALUES (false);

/* Publish one event of task t: the envelope into the queue. */
CREATE FUNCTION bench_pgq.publish(event_type text, t bench_pgq.tasks, at timestamptz, extra jsonb)
	RETURNS void
	LANGUAGE plpgsql AS $$
DECLARE
	new_event_id uuid := gen_random_uuid();
	stamp text := plpgsql_impl.iso8601(at);
	body jsonb;
BEGIN
	body := jsonb_build_object('event_id', new_event_id, 'timestamp', stamp,
							   'aggregate_id', t.task_id, 'event_version', 1) || extra;
	PERFORM pgq.insert_event('task_events', publish.event_type,
							 json_build_object('event_type', publish.event_type,
											   'event_data', body, 'timestamp', stamp,
											   'seq', nextval('bench_pgq.event_seq'))::text);
END
$$;

CREATE FUNCTION bench_pgq.create_task(user_id text, title text, description text DEFAULT NULL)
	RETURNS bench_pgq.tasks
	LANGUAGE plpgsql AS $$
DECLARE
	now timestamptz := clock_timestamp();
	t bench_pgq.tasks;
BEGIN
	PERFORM plpgsql_impl.check_text(create_task.user_id, 'user_id', 200, true);
	PERFORM plpgsql_impl.check_text(create_task.title, 'title', 500, true);
	PERFORM plpgsql_impl.check_text(create_task.description, 'description', 10000, false);

	INSERT INTO bench_pgq.tasks
		(task_id, user_id, title, description, status, version, created_at, updated_at)
	VALUES (gen_random_uuid(), create_task.user_id, create_task.title,
			create_task.description, 'pending', 1, now, now)
	RETURNING * INTO t;

	PERFORM bench_pgq.publish('TaskCreated', t, now,
		jsonb_build_object('task_title', t.title, 'user_id', t.user_id));
	RETURN t;
END
$$;

CREATE FUNCTION bench_pgq.update_status(task_id uuid, new_status bench_pgq.task_status,
										expected_version bigint DEFAULT NULL)
	RETURNS bench_pgq.tasks
	LANGUAGE plpgsql AS $$
DECLARE
	now timestamptz := clock_timestamp();
	t bench_pgq.tasks;
	old_status bench_pgq.task_status;
	v bigint;
BEGIN
	IF update_status.task_id IS NULL THEN
		RAISE EXCEPTION 'task_id must not be null' USING ERRCODE = '22004';
	END IF;
	IF new_status IS NULL THEN
		RAISE EXCEPTION 'new_status must not be null' USING ERRCODE = '22004';
	END IF;

	SELECT * INTO t FROM bench_pgq.tasks AS k
	WHERE k.task_id = update_status.task_id FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'task % does not exist', update_status.task_id USING ERRCODE = 'P0002';
	END IF;
	IF expected_version IS NOT NULL AND expected_version <> t.version THEN
		RAISE EXCEPTION 'task % is at version %, not the expected version %',
			t.task_id, t.version, expected_version
			USING ERRCODE = '40001', HINT = 'Read the task again and retry with its current version.';
	END IF;
	old_status := t.status;
	IF old_status IN ('completed', 'cancelled') OR old_status = new_status THEN
		RAISE EXCEPTION 'cannot change task % from status "%" to "%"', t.task_id, old_status, new_status
			USING ERRCODE = '55000',
			DETAIL = CASE WHEN old_status = new_status
						  THEN format('The task is already in status "%s".', old_status)
						  ELSE format('Status "%s" is final.', old_status) END;
	END IF;

	v := t.version + 1;
	PERFORM bench_pgq.publish('TaskStatusChanged', t, now,
		jsonb_build_object('old_status', old_status, 'new_status', new_status,
						   'task_title', t.title));
	IF new_status = 'completed' THEN
		v := v + 1;
		PERFORM bench_pgq.publish('TaskCompleted', t, now,
			jsonb_build_object('task_title', t.title, 'user_id', t.user_id,
							   'completed_at', plpgsql_impl.iso8601(now)));
	END IF;

	UPDATE bench_pgq.tasks AS k
	SET status = new_status, version = v, updated_at = now,
		completed_at = CASE WHEN new_status = 'completed' THEN now END
	WHERE k.task_id = t.task_id
	RETURNING * INTO t;
	RETURN t;
END
$$;

CREATE FUNCTION bench_pgq.complete_task(task_id uuid, expected_version bigint DEFAULT NULL)
	RETURNS bench_pgq.tasks
	LANGUAGE plpgsql AS $$
BEGIN
	IF complete_task.task_id IS NULL THEN
		RAISE EXCEPTION 'task_id must not be null' USING ERRCODE = '22004';
	END IF;
	RETURN bench_pgq.update_status(complete_task.task_id, 'completed', expected_version);
END
$$;

/*
 * The events of an active batch, their envelopes unpacked into the columns
 * of the baseline's event table that the handlers read.
 */
CREATE FUNCTION bench_pgq.batch_events(batch_id bigint)
	RETURNS TABLE (seq bigint, event_id uuid, event_type text, aggregate_id uuid, user_id text,
				   occurred_at timestamptz, payload jsonb)
	LANGUAGE sql AS $$
	SELECT (env ->> 'seq')::bigint, (env #>> '{event_data,event_id}')::uuid, e.ev_type,
		   (env #>> '{event_data,aggregate_id}')::uuid, env #>> '{event_data,user_id}',
		   (env ->> 'timestamp')::timestamptz, env -> 'event_data'
	FROM pgq.get_batch_events(batch_id) AS e, LATERAL (SELECT e.ev_data::jsonb AS env) AS j
$$;

/* Consumer audit: one audit_log row per event. */
CREATE FUNCTION bench_pgq.audit_round() RETURNS int
	LANGUAGE plpgsql AS $$
DECLARE
	batch bigint := pgq.next_batch('task_events', 'audit');
	n int;
BEGIN
	IF batch IS NULL THEN
		RETURN NULL;
	END IF;
	WITH e AS MATERIALIZED (SELECT * FROM bench_pgq.batch_events(batch)),
	a AS (INSERT INTO bench_pgq.audit_log (event_id, seq, event_type, event_data, occurred_at, recorded_at)
		  SELECT e.event_id, e.seq, e.event_type, e.payload, e.occurred_at, clock_timestamp()
		  FROM e ORDER BY e.seq)
	SELECT count(*) INTO n FROM e;
	PERFORM pgq.finish_batch(batch);
	RETURN n;
END
$$;

/* Consumer notification: a notification for TaskCreated and TaskCompleted. */
CREATE FUNCTION bench_pgq.notification_round() RETURNS int
	LANGUAGE plpgsql AS $$
DECLARE
	batch bigint := pgq.next_batch('task_events', 'notification');
	n int;
BEGIN
	IF batch IS NULL THEN
		RETURN NULL;
	END IF;
	WITH e AS MATERIALIZED (SELECT * FROM bench_pgq.batch_events(batch)),
	ins AS (INSERT INTO bench_pgq.notifications (event_id, user_id, message, created_at)
			SELECT e.event_id, e.user_id,
				   CASE WHEN e.event_type = 'TaskCreated' THEN 'New task created: '
						ELSE 'Congratulations! Task completed: ' END || (e.payload ->> 'task_title'),
				   clock_timestamp()
			FROM e WHERE e.event_type IN ('TaskCreated', 'TaskCompleted') ORDER BY e.seq)
	SELECT count(*) INTO n FROM e;
	PERFORM pgq.finish_batch(batch);
	RETURN n;
END
$$;

/*
 * Consumer analytics: the counters, and the completion statistics (seconds
 * from the task's creation, its TaskCreated, to its TaskCompleted), each
 * aggregated per batch first: one upsert per key.
 */
CREATE FUNCTION bench_pgq.analytics_round() RETURNS int
	LANGUAGE plpgsql AS $$
DECLARE
	batch bigint := pgq.next_batch('task_events', 'analytics');
	n int;
BEGIN
	IF batch IS NULL THEN
		RETURN NULL;
	END IF;
	WITH e AS MATERIALIZED (SELECT * FROM bench_pgq.batch_events(batch)),
	counters AS (
		INSERT INTO bench_pgq.analytics_counters AS c (metric, user_id, value)
		SELECT CASE WHEN e.event_type = 'TaskCreated' THEN 'tasks_created' ELSE 'tasks_completed' END,
			   e.user_id, count(*)
		FROM e WHERE e.event_type IN ('TaskCreated', 'TaskCompleted')
		GROUP BY 1, 2 ORDER BY 1, 2
		ON CONFLICT (metric, user_id) DO UPDATE SET value = c.value + EXCLUDED.value),
	stats AS (
		INSERT INTO bench_pgq.completion_stats AS s (user_id, completed, total_seconds, min_seconds, max_seconds)
		SELECT d.user_id, count(*), sum(d.seconds), min(d.seconds), max(d.seconds)
		FROM (SELECT e.user_id, date_part('epoch', e.occurred_at - t.created_at) AS seconds
			  FROM e JOIN bench_pgq.tasks AS t ON t.task_id = e.aggregate_id
			  WHERE e.event_type = 'TaskCompleted') AS d
		GROUP BY d.user_id ORDER BY d.user_id
		ON CONFLICT (user_id) DO UPDATE SET
			completed = s.completed + EXCLUDED.completed,
			total_seconds = s.total_seconds + EXCLUDED.total_seconds,
			min_seconds = LEAST(s.min_seconds, EXCLUDED.min_seconds),
			max_seconds = GREATEST(s.max_seconds, EXCLUDED.max_seconds))
	SELECT count(*) INTO n FROM e;
	PERFORM pgq.finish_batch(batch);
	RETURN n;
END
$$;

/*
 * The consumer loop: a round, COMMIT, and a short sleep when there was no
 * batch, until bench_pgq.consumer_control.stop.  Run with CALL outside a
 * transaction block (bench.sh runs one psql per consumer).
 */
CREATE PROCEDURE bench_pgq.run_consumer(consumer text, idle_sleep float8 DEFAULT 0.01)
	LANGUAGE plpgsql AS $$
DECLARE
	n int;
BEGIN
	IF consumer NOT IN ('audit', 'notification', 'analytics') THEN
		RAISE EXCEPTION 'unknown consumer "%"', consumer USING ERRCODE = '22023';
	END IF;
	LOOP
		EXIT WHEN (SELECT c.stop FROM bench_pgq.consumer_control AS c);
		IF consumer = 'audit' THEN
			n := bench_pgq.audit_round();
		ELSIF consumer = 'notification' THEN
			n := bench_pgq.notification_round();
		ELSE
			n := bench_pgq.analytics_round();
		END IF;
		COMMIT;
		IF n IS NULL THEN
			PERFORM pg_sleep(idle_sleep);
		END IF;
	END LOOP;
END
$$;

/*
 * An empty queue with the three consumers: the queue dropped (with its
 * event tables and subscriptions) and created again.  Call with pgqd and the
 * consumers stopped.
 *
 * ticker_max_lag below the ticker period (bench.sh runs pgqd with
 * ticker_period = 0.1 s): every ticker call that finds new events ticks, so
 * a batch holds the events of one ticker period.  ticker_max_count (500 by
 * default) only makes a tick earlier, so under load it changes nothing here.
 */
CREATE FUNCTION bench_pgq.reset_queue(ticker_max_lag interval DEFAULT '50 ms') RETURNS void
	LANGUAGE plpgsql AS $$
BEGIN
	IF EXISTS (SELECT FROM pgq.queue WHERE queue_name = 'task_events') THEN
		PERFORM pgq.drop_queue('task_events', true);
	END IF;
	PERFORM pgq.create_queue('task_events');
	PERFORM pgq.set_queue_config('task_events', 'ticker_max_lag', ticker_max_lag::text);
	PERFORM pgq.register_consumer('task_events', c)
	FROM unnest(ARRAY['notification', 'analytics', 'audit']) AS c;
	TRUNCATE bench_pgq.tasks, bench_pgq.notifications, bench_pgq.analytics_counters,
		bench_pgq.completion_stats, bench_pgq.audit_log RESTART IDENTITY;
	ALTER SEQUENCE bench_pgq.event_seq RESTART;
	UPDATE bench_pgq.consumer_control SET stop = false;
END
$$;

/*
 * The events the consumers have not handled yet, summed over consumers
 * (like task_events.handler_status.events_behind over handlers): the
 * queue's event id sequence against the sequence value of each consumer's
 * last tick, as pgq.get_consumer_info counts pending events, but also
 * counting events not in a tick yet.  Approximate: ids are taken at insert,
 * not at commit.
 */
CREATE FUNCTION bench_pgq.events_behind() RETURNS bigint
	LANGUAGE sql STABLE AS $$
	SELECT coalesce(sum(pgq.seq_getval(q.queue_event_seq) - t.tick_event_seq), 0)::bigint
	FROM pgq.queue AS q
	JOIN pgq.subscription AS s ON s.sub_queue = q.queue_id
	JOIN pgq.tick AS t ON t.tick_queue = s.sub_queue AND t.tick_id = s.sub_last_tick
	WHERE q.queue_name = 'task_events'
$$;

/*
 * True when every consumer has finished a batch up to a tick taken after
 * at: it has handled every event committed before at.
 */
CREATE FUNCTION bench_pgq.caught_up(at timestamptz) RETURNS boolean
	LANGUAGE sql STABLE AS $$
	SELECT coalesce(bool_and(coalesce(t.tick_time > at, false)), false)
	FROM pgq.queue AS q
	JOIN pgq.subscription AS s ON s.sub_queue = q.queue_id
	LEFT JOIN pgq.tick AS t ON t.tick_queue = s.sub_queue AND t.tick_id = s.sub_last_tick
	WHERE q.queue_name = 'task_events'
$$;

/*
 * Milliseconds from the commit of each event's writer to its audit row,
 * for the events still in the queue's tables (ev_txid is the writer's
 * transaction; track_commit_timestamp must be on): the measure of the
 * extension's latency run, audit_log.recorded_at -
 * pg_xact_commit_timestamp(events.xact_id).
 */
CREATE FUNCTION bench_pgq.commit_to_audit_ms() RETURNS SETOF float8
	LANGUAGE plpgsql STABLE AS $$
BEGIN
	RETURN QUERY EXECUTE format(
		'SELECT 1000 * date_part(''epoch'', a.recorded_at - pg_xact_commit_timestamp(xid(e.ev_txid::text::xid8)))
		 FROM %s AS e JOIN bench_pgq.audit_log AS a
		   ON a.event_id = (e.ev_data::jsonb #>> ''{event_data,event_id}'')::uuid',
		(SELECT q.queue_data_pfx FROM pgq.queue AS q WHERE q.queue_name = 'task_events'));
END
$$;

/* True when the queue has a tick taken after at (a batch can hold everything before at). */
CREATE FUNCTION bench_pgq.ticked_after(at timestamptz) RETURNS boolean
	LANGUAGE sql STABLE AS $$
	SELECT EXISTS (SELECT FROM pgq.queue AS q JOIN pgq.tick AS t ON t.tick_queue = q.queue_id
				   WHERE q.queue_name = 'task_events' AND t.tick_time > at)
$$;

SELECT bench_pgq.reset_queue();
