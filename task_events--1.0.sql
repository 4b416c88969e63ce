/*
 * task_events--1.0.sql: the task domain, its immutable event log, the write
 * functions, the handlers, and the privileges (README, "Security").
 *
 * Every function runs with search_path = pg_catalog, pg_temp (set on the
 * function) except process_pending, which runs the handlers in the caller's
 * session; every name and operator in SQL bodies is schema-qualified.
 */

\echo Use "CREATE EXTENSION task_events" to load this file. \quit

CREATE TYPE task_events.task_status AS ENUM ('pending', 'in_progress', 'completed', 'cancelled');

/* Current state of each task: version is the aggregate_version of its latest event. */
CREATE TABLE task_events.tasks (
	task_id uuid PRIMARY KEY,
	user_id text NOT NULL,
	title text NOT NULL,
	description text,
	status task_events.task_status NOT NULL,
	version bigint NOT NULL,
	created_at timestamptz NOT NULL,
	updated_at timestamptz NOT NULL,
	completed_at timestamptz
);

CREATE SEQUENCE task_events.events_seq_seq AS bigint;

/*
 * The event log: append-only, one row per domain event.  xact_id records the
 * inserting transaction so that readers can tell which events a snapshot
 * already showed them (see README, "Commit-safe reading").
 */
CREATE TABLE task_events.events (
	seq bigint PRIMARY KEY DEFAULT pg_catalog.nextval('task_events.events_seq_seq'::pg_catalog.regclass),
	event_id uuid UNIQUE NOT NULL,
	event_type text NOT NULL,
	event_version int NOT NULL,
	aggregate_id uuid NOT NULL,
	aggregate_version bigint NOT NULL,
	occurred_at timestamptz NOT NULL,
	user_id text,
	payload jsonb NOT NULL,
	xact_id xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id(),
	UNIQUE (aggregate_id, aggregate_version)
);
ALTER SEQUENCE task_events.events_seq_seq OWNED BY task_events.events.seq;

SELECT pg_catalog.pg_extension_config_dump('task_events.tasks', '');
SELECT pg_catalog.pg_extension_config_dump('task_events.events', '');
SELECT pg_catalog.pg_extension_config_dump('task_events.events_seq_seq', '');

/* Refuses UPDATE, DELETE and TRUNCATE, for every role and replication mode. */
CREATE FUNCTION task_events.refuse_modification()
	RETURNS trigger
	AS 'MODULE_PATHNAME', 'refuse_modification'
	LANGUAGE C
	SET search_path = pg_catalog, pg_temp;

CREATE TRIGGER events_append_only
	BEFORE UPDATE OR DELETE OR TRUNCATE ON task_events.events
	FOR EACH STATEMENT EXECUTE FUNCTION task_events.refuse_modification();
ALTER TABLE task_events.events ENABLE ALWAYS TRIGGER events_append_only;

CREATE FUNCTION task_events.create_task(user_id text, title text, description text DEFAULT NULL)
	RETURNS task_events.tasks
	AS 'MODULE_PATHNAME', 'create_task'
	LANGUAGE C VOLATILE SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION task_events.update_status(task_id uuid, new_status task_events.task_status,
										  expected_version bigint DEFAULT NULL)
	RETURNS task_events.tasks
	AS 'MODULE_PATHNAME', 'update_status'
	LANGUAGE C VOLATILE SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION task_events.complete_task(task_id uuid, expected_version bigint DEFAULT NULL)
	RETURNS task_events.tasks
	AS 'MODULE_PATHNAME', 'complete_task'
	LANGUAGE C VOLATILE SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION task_events.task_history(task_id uuid)
	RETURNS SETOF task_events.events
	AS 'MODULE_PATHNAME', 'task_history'
	LANGUAGE C STABLE SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp;

/* Readers find the events of recent transactions by xact_id (commit_horizon.c). */
CREATE INDEX events_xact_id_idx ON task_events.events (xact_id);
/* event_rates scans the last minute; BRIN costs writers next to nothing. */
CREATE INDEX events_occurred_at_idx ON task_events.events USING brin (occurred_at);

/*
 * Handlers: each is a function taking task_events.events[] (a batch, in seq
 * order), run by the background workers or by process_pending().
 */
CREATE TABLE task_events.handlers (
	handler text PRIMARY KEY CHECK (handler OPERATOR(pg_catalog.~) '^[a-z][a-z0-9_]*$'),
	function regprocedure NOT NULL,
	enabled boolean NOT NULL DEFAULT true,
	description text
);

/* A handler's function must take task_events.events[] and return void. */
CREATE FUNCTION task_events.check_handler_function()
	RETURNS trigger
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
BEGIN
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_proc p
				   WHERE p.oid OPERATOR(pg_catalog.=) NEW.function
					 AND p.prokind OPERATOR(pg_catalog.=) 'f'
					 AND p.pronargs OPERATOR(pg_catalog.=) 1
					 AND p.proargtypes[0] OPERATOR(pg_catalog.=) 'task_events.events[]'::pg_catalog.regtype
					 AND p.prorettype OPERATOR(pg_catalog.=) 'pg_catalog.void'::pg_catalog.regtype) THEN
		RAISE EXCEPTION 'function % cannot be a task_events handler', NEW.function
			USING ERRCODE = 'invalid_function_definition',
				  DETAIL = 'A handler function takes one argument of type task_events.events[] and returns void.';
	END IF;
	RETURN NEW;
END
$$;

CREATE TRIGGER handlers_check_function
	BEFORE INSERT OR UPDATE OF function ON task_events.handlers
	FOR EACH ROW EXECUTE FUNCTION task_events.check_handler_function();

/*
 * Where each handler is in the log.  Events visible in window_start are
 * handled; when window_end is set, so are the events visible in window_end
 * (and not in window_start) up to seq window_seq.  Kept up to date by the
 * dispatcher (dispatch.c) in the same transaction as the handler's writes.
 */
CREATE TABLE task_events.handler_state (
	handler text PRIMARY KEY REFERENCES task_events.handlers ON DELETE CASCADE,
	window_start pg_snapshot NOT NULL DEFAULT '1:1:'::pg_catalog.pg_snapshot,
	window_end pg_snapshot,
	window_seq bigint NOT NULL DEFAULT 0,
	last_seq bigint NOT NULL DEFAULT 0,
	failing_seq bigint,
	attempts int NOT NULL DEFAULT 0,
	retry_at timestamptz,
	last_error text,
	last_sqlstate text,
	last_error_at timestamptz,
	processed bigint NOT NULL DEFAULT 0,
	failed bigint NOT NULL DEFAULT 0,
	batches bigint NOT NULL DEFAULT 0,
	batch_ms_total float8 NOT NULL DEFAULT 0,
	batch_ms_max float8 NOT NULL DEFAULT 0,
	updated_at timestamptz
);

/* Events a handler gave up on after task_events.max_attempts attempts. */
CREATE TABLE task_events.dead_letters (
	handler text NOT NULL REFERENCES task_events.handlers ON DELETE CASCADE,
	seq bigint NOT NULL,
	event_id uuid NOT NULL,
	attempts int NOT NULL,
	sqlstate text NOT NULL,
	message text NOT NULL,
	failed_at timestamptz NOT NULL,
	retry_requested boolean NOT NULL DEFAULT false,
	PRIMARY KEY (handler, seq)
);

/* What the built-in handlers write. */
CREATE SEQUENCE task_events.notifications_notification_id_seq AS bigint;
CREATE TABLE task_events.notifications (
	notification_id bigint PRIMARY KEY
		DEFAULT pg_catalog.nextval('task_events.notifications_notification_id_seq'::pg_catalog.regclass),
	event_id uuid UNIQUE NOT NULL,
	user_id text NOT NULL,
	message text NOT NULL,
	created_at timestamptz NOT NULL
);
ALTER SEQUENCE task_events.notifications_notification_id_seq
	OWNED BY task_events.notifications.notification_id;

CREATE TABLE task_events.analytics_counters (
	metric text,
	user_id text,
	value bigint NOT NULL,
	PRIMARY KEY (metric, user_id)
);

CREATE TABLE task_events.completion_stats (
	user_id text PRIMARY KEY,
	completed bigint,
	total_seconds float8,
	min_seconds float8,
	max_seconds float8
);

CREATE TABLE task_events.audit_log (
	event_id uuid PRIMARY KEY,
	seq bigint,
	event_type text,
	event_data jsonb,
	occurred_at timestamptz,
	recorded_at timestamptz
);
CREATE TRIGGER audit_log_append_only
	BEFORE UPDATE OR DELETE OR TRUNCATE ON task_events.audit_log
	FOR EACH STATEMENT EXECUTE FUNCTION task_events.refuse_modification();
ALTER TABLE task_events.audit_log ENABLE ALWAYS TRIGGER audit_log_append_only;

/*
 * Which cluster's transaction ids events.xact_id and the handlers' positions
 * are (src/log_origin.c): the system identifier of the cluster that wrote
 * them.  pg_dump carries the row; after a restore into another cluster,
 * writers and handlers refuse to run until adopt_restored_log() translated
 * the ids.  No key: a restore into the same cluster adds an identical row.
 */
CREATE TABLE task_events.log_origin (
	system_identifier bigint NOT NULL,
	recorded_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
INSERT INTO task_events.log_origin (system_identifier)
SELECT c.system_identifier FROM pg_catalog.pg_control_system() c;
SELECT pg_catalog.pg_extension_config_dump('task_events.log_origin', '');

/*
 * Handlers registered by users are dumped; the built-in ones are created by
 * CREATE EXTENSION in the restored database.
 */
SELECT pg_catalog.pg_extension_config_dump('task_events.handlers',
	'WHERE handler NOT IN (''analytics'', ''audit'', ''notification'', ''relay'')');
SELECT pg_catalog.pg_extension_config_dump('task_events.handler_state', '');
SELECT pg_catalog.pg_extension_config_dump('task_events.dead_letters', '');
SELECT pg_catalog.pg_extension_config_dump('task_events.notifications', '');
SELECT pg_catalog.pg_extension_config_dump('task_events.notifications_notification_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('task_events.analytics_counters', '');
SELECT pg_catalog.pg_extension_config_dump('task_events.completion_stats', '');
SELECT pg_catalog.pg_extension_config_dump('task_events.audit_log', '');

CREATE FUNCTION task_events.notification_handler(events task_events.events[])
	RETURNS void
	AS 'MODULE_PATHNAME', 'notification_handler'
	LANGUAGE C
	SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION task_events.analytics_handler(events task_events.events[])
	RETURNS void
	AS 'MODULE_PATHNAME', 'analytics_handler'
	LANGUAGE C
	SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION task_events.audit_handler(events task_events.events[])
	RETURNS void
	AS 'MODULE_PATHNAME', 'audit_handler'
	LANGUAGE C
	SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION task_events.relay_handler(events task_events.events[])
	RETURNS void
	AS 'MODULE_PATHNAME', 'relay_handler'
	LANGUAGE C
	SET search_path = pg_catalog, pg_temp;

INSERT INTO task_events.handlers (handler, function, description) VALUES
	('analytics', 'task_events.analytics_handler(task_events.events[])',
	 'Counts tasks created and completed per user, and completion times'),
	('audit', 'task_events.audit_handler(task_events.events[])',
	 'Records every event in task_events.audit_log'),
	('notification', 'task_events.notification_handler(task_events.events[])',
	 'Writes a message to the owner when a task is created or completed'),
	('relay', 'task_events.relay_handler(task_events.events[])',
	 'Publishes events on the task_events channel when notify_mode is relay');

/*
 * Admin functions: superusers (and the owner) only, SECURITY INVOKER, so
 * that granting EXECUTE alone gives nobody the right to run handlers as
 * someone else.  process_pending keeps the caller's search_path on purpose:
 * it runs the registered handlers in the caller's session, as a worker would
 * run them in its own; its own queries (dispatch.c) qualify every name and
 * operator, and the built-in handlers set their search_path themselves.
 */
CREATE FUNCTION task_events.process_pending(handler text DEFAULT NULL, max_events int DEFAULT 1000)
	RETURNS bigint
	AS 'MODULE_PATHNAME', 'process_pending'
	LANGUAGE C VOLATILE;

CREATE FUNCTION task_events.retry_dead_letters(handler text DEFAULT NULL)
	RETURNS bigint
	AS 'MODULE_PATHNAME', 'retry_dead_letters'
	LANGUAGE C VOLATILE
	SET search_path = pg_catalog, pg_temp;

/*
 * After a restore from another cluster: make the event log and the
 * handlers' positions this cluster's, so that handling resumes exactly where
 * the source stood (README, "Operations").  Superusers only.  Returns the
 * number of events whose xact_id was rewritten (0 when nothing was to do).
 *
 * When every transaction id the log holds is below this cluster's next one
 * (its counter is ahead of the source's), the ids can stay: new events get
 * higher ids, invisible to every restored position.  Otherwise the ids are
 * replaced: the events every handler had handled get id 3, and the events
 * some handlers had not, one small id (4, 5, ...) per set of such handlers;
 * each handler's position becomes a snapshot in which exactly the ids of
 * the events it had not handled are in progress.  All those ids are far
 * below this cluster's: every later snapshot sees them, none sees the new
 * events.  Takes EXCLUSIVE locks on events and handler_state meanwhile.
 */
CREATE FUNCTION task_events.adopt_restored_log()
	RETURNS bigint
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
DECLARE
	me bigint := (SELECT c.system_identifier FROM pg_catalog.pg_control_system() c);
	next_xid xid8 := pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot());
	max_xid xid8;
	top_xid bigint;
	rewritten bigint := 0;
BEGIN
	LOCK TABLE task_events.log_origin IN EXCLUSIVE MODE;
	IF NOT EXISTS (SELECT FROM task_events.log_origin o
				   WHERE o.system_identifier OPERATOR(pg_catalog.<>) me) THEN
		RETURN 0;
	END IF;
	LOCK TABLE task_events.events, task_events.handler_state IN EXCLUSIVE MODE;

	SELECT GREATEST((SELECT pg_catalog.max(e.xact_id) FROM task_events.events e),
					(SELECT pg_catalog.max(GREATEST(pg_catalog.pg_snapshot_xmax(s.window_start),
													pg_catalog.pg_snapshot_xmax(s.window_end)))
					 FROM task_events.handler_state s))
	INTO max_xid;

	IF max_xid IS NOT NULL AND max_xid OPERATOR(pg_catalog.>=) next_xid THEN
		-- Per event, the handlers (with a position) that had not handled it.
		CREATE TEMP TABLE te_pending ON COMMIT DROP AS
		SELECT e.seq, pg_catalog.array_agg(s.handler ORDER BY s.handler) AS pending
		FROM task_events.handler_state s
		JOIN task_events.events e
		  ON e.xact_id OPERATOR(pg_catalog.>=) pg_catalog.pg_snapshot_xmin(s.window_start)
		 AND NOT pg_catalog.pg_visible_in_snapshot(e.xact_id, s.window_start)
		 AND NOT (s.window_end IS NOT NULL
				  AND pg_catalog.pg_visible_in_snapshot(e.xact_id, s.window_end)
				  AND e.seq OPERATOR(pg_catalog.<=) s.window_seq)
		GROUP BY e.seq;
		CREATE TEMP TABLE te_pattern ON COMMIT DROP AS
		SELECT p.pending,
			   (3 OPERATOR(pg_catalog.+) pg_catalog.row_number() OVER (ORDER BY p.pending)) AS xid
		FROM (SELECT DISTINCT d.pending FROM te_pending d) p;
		top_xid := COALESCE((SELECT pg_catalog.max(t.xid) FROM te_pattern t), 3);
		IF top_xid::pg_catalog.text::pg_catalog.xid8 OPERATOR(pg_catalog.>=) next_xid THEN
			RAISE EXCEPTION 'too many distinct handler positions to adopt (% ids needed, next id %)',
				top_xid, next_xid;
		END IF;

		ALTER TABLE task_events.events DISABLE TRIGGER events_append_only;
		UPDATE task_events.events e SET xact_id = '3'::pg_catalog.xid8;
		GET DIAGNOSTICS rewritten = ROW_COUNT;
		UPDATE task_events.events e SET xact_id = t.xid::pg_catalog.text::pg_catalog.xid8
		FROM te_pending p JOIN te_pattern t ON t.pending OPERATOR(pg_catalog.=) p.pending
		WHERE e.seq OPERATOR(pg_catalog.=) p.seq;
		ALTER TABLE task_events.events ENABLE ALWAYS TRIGGER events_append_only;

		UPDATE task_events.handler_state s
		SET window_start = pg_catalog.format('3:%s:%s', top_xid OPERATOR(pg_catalog.+) 1,
				COALESCE((SELECT pg_catalog.string_agg(t.xid::pg_catalog.text, ',' ORDER BY t.xid)
						  FROM te_pattern t
						  WHERE s.handler OPERATOR(pg_catalog.=) ANY (t.pending)), ''))::pg_catalog.pg_snapshot,
			window_end = NULL,
			window_seq = 0;
	END IF;

	DELETE FROM task_events.log_origin;
	INSERT INTO task_events.log_origin (system_identifier) VALUES (me);
	RETURN rewritten;
END
$$;

/*
 * How many events a handler has not handled yet, and the oldest one's time.
 * SECURITY DEFINER: handler_status calls it as the reading role, which may
 * not read handler_state.
 */
CREATE FUNCTION task_events.handler_backlog(handler text,
	OUT events_behind bigint, OUT oldest_unhandled timestamptz)
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS $$
	SELECT pg_catalog.count(*), pg_catalog.min(e.occurred_at)
	FROM (SELECT COALESCE(s.window_start, '1:1:'::pg_catalog.pg_snapshot) AS ws,
				 s.window_end AS we, COALESCE(s.window_seq, 0) AS wseq
		  FROM (SELECT $1 AS handler) AS h
		  LEFT JOIN task_events.handler_state s ON s.handler OPERATOR(pg_catalog.=) h.handler) AS p
	JOIN task_events.events e
	  ON e.xact_id OPERATOR(pg_catalog.>=) pg_catalog.pg_snapshot_xmin(p.ws)
	 AND NOT pg_catalog.pg_visible_in_snapshot(e.xact_id, p.ws)
	WHERE NOT (p.we IS NOT NULL
			   AND pg_catalog.pg_visible_in_snapshot(e.xact_id, p.we)
			   AND e.seq OPERATOR(pg_catalog.<=) p.wseq)
	$$ LANGUAGE sql STABLE;

CREATE VIEW task_events.handler_status AS
SELECT h.handler,
	   h.enabled,
	   COALESCE(s.last_seq, 0) AS position,
	   b.events_behind,
	   COALESCE(pg_catalog.date_part('epoch', pg_catalog.now() OPERATOR(pg_catalog.-) b.oldest_unhandled), 0)
		   AS seconds_behind,
	   COALESCE(s.processed, 0) AS processed,
	   COALESCE(s.failed, 0) AS failed,
	   (SELECT pg_catalog.count(*) FROM task_events.dead_letters d
		WHERE d.handler OPERATOR(pg_catalog.=) h.handler) AS dead_letters,
	   s.last_error,
	   s.last_sqlstate,
	   s.last_error_at,
	   s.attempts AS retry_attempts,
	   s.retry_at,
	   COALESCE(s.batches, 0) AS batches,
	   CASE WHEN s.batches OPERATOR(pg_catalog.>) 0
			THEN s.batch_ms_total OPERATOR(pg_catalog./) s.batches END AS mean_batch_ms,
	   s.batch_ms_max AS max_batch_ms,
	   s.updated_at AS last_batch_at
FROM task_events.handlers h
LEFT JOIN task_events.handler_state s ON s.handler OPERATOR(pg_catalog.=) h.handler
CROSS JOIN LATERAL task_events.handler_backlog(h.handler) b;

/* Events published per type over the last minute. */
CREATE VIEW task_events.event_rates AS
SELECT e.event_type,
	   pg_catalog.count(*) AS last_minute,
	   pg_catalog.round(pg_catalog.count(*) OPERATOR(pg_catalog./) 60.0, 2) AS per_second
FROM task_events.events e
WHERE e.occurred_at OPERATOR(pg_catalog.>)
	  (pg_catalog.now() OPERATOR(pg_catalog.-) '1 minute'::pg_catalog.interval)
GROUP BY e.event_type;

COMMENT ON TABLE task_events.tasks IS 'Current state of each task; written only by the task_events functions';
COMMENT ON TABLE task_events.events IS 'Append-only log of domain events, one row per event';

/*
 * Privileges (README, "Security").  Two group roles, created here unless
 * they exist: roles are cluster-wide, shared by every database that has the
 * extension, and DROP EXTENSION leaves them.  PUBLIC gets nothing; writes go
 * only through the SECURITY DEFINER write functions.
 */
DO $$
DECLARE
	r text;
BEGIN
	FOREACH r IN ARRAY '{task_events_writer,task_events_reader}'::pg_catalog.text[] LOOP
		IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) r) THEN
			BEGIN
				EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
			EXCEPTION WHEN duplicate_object OR unique_violation THEN
				NULL;			/* created meanwhile, for another database */
			END;
		END IF;
	END LOOP;
END
$$;

REVOKE ALL ON SCHEMA task_events FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA task_events FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA task_events FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA task_events FROM PUBLIC;

GRANT USAGE ON SCHEMA task_events TO task_events_writer, task_events_reader;

/* Writers: the write functions, the tasks they return, and a task's history. */
GRANT EXECUTE ON FUNCTION
	task_events.create_task(text, text, text),
	task_events.update_status(uuid, task_events.task_status, bigint),
	task_events.complete_task(uuid, bigint),
	task_events.task_history(uuid)
	TO task_events_writer;
GRANT SELECT ON task_events.tasks TO task_events_writer;

/* Readers: tasks, events, the handlers' outputs and the monitoring views. */
GRANT SELECT ON
	task_events.tasks,
	task_events.events,
	task_events.notifications,
	task_events.analytics_counters,
	task_events.completion_stats,
	task_events.audit_log,
	task_events.dead_letters,
	task_events.handler_status,
	task_events.event_rates
	TO task_events_reader;
GRANT EXECUTE ON FUNCTION
	task_events.task_history(uuid),
	task_events.handler_backlog(text)
	TO task_events_reader;
