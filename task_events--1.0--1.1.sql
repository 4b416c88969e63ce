/*
 * task_events--1.0--1.1.sql: what version 1.1 adds to 1.0.
 *
 * 1.0 is released: its script is never edited, and everything of 1.1 is
 * here.  A fresh CREATE EXTENSION runs task_events--1.0.sql and then this
 * script.  Functions that change are replaced with CREATE OR REPLACE, which
 * keeps their privileges and the objects that depend on them.
 */

\echo Use "CREATE EXTENSION task_events" or "ALTER EXTENSION task_events UPDATE" to load this file. \quit

/*
 * Handlers that misbehave (src/lost_batch.c, src/call_journal.c).  A batch
 * can be lost whole, with the failure count that would have been saved in
 * it: its handler ended the worker's process, or its commit failed.
 * generation tells a lost batch from one that committed; the events of a
 * lost batch, up to isolate_through, are then handled one per batch.
 *
 * processed now counts the events a handler handled successfully, and no
 * longer the dead-lettered ones; the counts 1.0 saved are left as they are.
 */
ALTER TABLE task_events.handler_state
	ADD COLUMN generation bigint NOT NULL DEFAULT 0,
	ADD COLUMN isolate_through bigint NOT NULL DEFAULT 0;
COMMENT ON COLUMN task_events.handler_state.generation IS
	'Bumped at every save of the row: a batch whose generation is still current when its outcome was lost did not commit';
COMMENT ON COLUMN task_events.handler_state.isolate_through IS
	'The events up to this seq belong to a lost batch and are handled one per batch, each in its own transaction';
COMMENT ON COLUMN task_events.handler_state.processed IS
	'Events the handler handled successfully (dead-lettered events are counted in task_events.dead_letters)';

/*
 * The window queries (TE_WINDOW_EVENTS in src/include/commit_horizon.h and
 * handler_backlog below) look events up by the ids of a snapshot's
 * transactions in progress, passed as an array: their kept, generic plans
 * assume 10 ids, each matching reltuples / n_distinct(xact_id) events.
 * Transactions that write many events each make n_distinct small, and the
 * estimate a large part of the table: the plan turned into a scan of every
 * event, for every handler, at every round.  Transactions are few per event
 * in no case that matters here: tell the planner ids are nearly unique.
 */
ALTER TABLE task_events.events ALTER COLUMN xact_id SET (n_distinct = -1);

/*
 * The events a position (window_start, window_end, window_seq) has not
 * handled: the SQL twin of TE_WINDOW_EVENTS (src/include/commit_horizon.h),
 * defined once for handler_backlog and adopt_restored_log.  An event is not
 * yet handled when its transaction was in progress in window_start or is at
 * or past its xmax, which events_xact_id_idx finds by those ids and that
 * range: the cost is the backlog, not the events written since a long
 * transaction began; minus the part of the open window already handled
 * (visible in window_end, seq up to window_seq).
 *
 * The one function here without SET search_path (with process_pending):
 * the planner inlines it into its callers' queries only without one, and
 * its callers run with their own fixed search_path.  Every name in it is
 * schema-qualified, operators included, so it means the same under any
 * search_path.
 */
CREATE FUNCTION task_events._unhandled_events(window_start pg_catalog.pg_snapshot,
	window_end pg_catalog.pg_snapshot, window_seq bigint)
	RETURNS SETOF task_events.events
	LANGUAGE sql STABLE
	AS $$
	SELECT w.* FROM (
		SELECT e.* FROM task_events.events e
		WHERE e.xact_id OPERATOR(pg_catalog.=)
			  ANY (ARRAY(SELECT pg_catalog.pg_snapshot_xip($1)))
		UNION ALL
		SELECT e.* FROM task_events.events e
		WHERE e.xact_id OPERATOR(pg_catalog.>=) pg_catalog.pg_snapshot_xmax($1)) AS w
	WHERE NOT ($2 IS NOT NULL
			   AND pg_catalog.pg_visible_in_snapshot(w.xact_id, $2)
			   AND w.seq OPERATOR(pg_catalog.<=) $3)
	$$;
REVOKE ALL ON FUNCTION task_events._unhandled_events(pg_catalog.pg_snapshot, pg_catalog.pg_snapshot, bigint)
	FROM PUBLIC;
COMMENT ON FUNCTION task_events._unhandled_events(pg_catalog.pg_snapshot, pg_catalog.pg_snapshot, bigint) IS
	'Internal: the events a handler position has not handled';

/*
 * How many events a handler has not handled yet, and since when: those of
 * the types it subscribes to (the others it only moves past).
 */
CREATE OR REPLACE FUNCTION task_events.handler_backlog(handler text,
	OUT events_behind bigint, OUT oldest_unhandled timestamptz)
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS $$
	SELECT pg_catalog.count(*), pg_catalog.min(w.occurred_at)
	FROM (SELECT COALESCE(s.window_start, '1:1:'::pg_catalog.pg_snapshot) AS ws,
				 s.window_end AS we, COALESCE(s.window_seq, 0) AS wseq, r.event_types AS types
		  FROM (SELECT $1 AS handler) AS h
		  LEFT JOIN task_events.handlers r ON r.handler OPERATOR(pg_catalog.=) h.handler
		  LEFT JOIN task_events.handler_state s ON s.handler OPERATOR(pg_catalog.=) h.handler) AS p
	CROSS JOIN LATERAL task_events._unhandled_events(p.ws, p.we, p.wseq) AS w
	WHERE p.types IS NULL OR w.event_type OPERATOR(pg_catalog.=) ANY (p.types)
	$$ LANGUAGE sql STABLE;

/*
 * adopt_restored_log() also adopts a log restored into a cluster with the
 * same system identifier whose transaction counter is behind the ids the
 * log holds: a clone made earlier by pg_basebackup or point-in-time
 * recovery, restored from a later dump.  Writers and workers refuse such a
 * log (55000) until it is adopted, as they refuse one from another cluster;
 * the translation is the same (1.0's comment above its definition).
 */
CREATE OR REPLACE FUNCTION task_events.adopt_restored_log()
	RETURNS bigint
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
DECLARE
	me bigint := (SELECT c.system_identifier FROM pg_catalog.pg_control_system() c);
	next_xid xid8 := pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot());
	foreign_origin boolean;
	in_future boolean;
	top_xid bigint;
	rewritten bigint := 0;
BEGIN
	LOCK TABLE task_events.log_origin, task_events.events, task_events.handler_state
		IN EXCLUSIVE MODE;
	foreign_origin := EXISTS (SELECT FROM task_events.log_origin o
							  WHERE o.system_identifier OPERATOR(pg_catalog.<>) me);
	-- An event id at or past the next one, or a position that saw it.
	in_future := COALESCE((SELECT pg_catalog.max(e.xact_id) FROM task_events.events e)
						  OPERATOR(pg_catalog.>=) next_xid, false)
		OR COALESCE((SELECT pg_catalog.max(GREATEST(pg_catalog.pg_snapshot_xmax(s.window_start),
													pg_catalog.pg_snapshot_xmax(s.window_end)))
					 FROM task_events.handler_state s) OPERATOR(pg_catalog.>) next_xid, false);
	IF NOT foreign_origin AND NOT in_future THEN
		RETURN 0;
	END IF;

	IF in_future THEN
		-- Per event, the handlers (with a position) that had not handled it.
		CREATE TEMP TABLE te_pending ON COMMIT DROP AS
		SELECT e.seq, pg_catalog.array_agg(s.handler ORDER BY s.handler) AS pending
		FROM task_events.handler_state s
		CROSS JOIN LATERAL task_events._unhandled_events(s.window_start, s.window_end, s.window_seq) e
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
 * The handler API (README, "Handlers"): functions to register, pause,
 * resume and unregister handlers, for superusers and the extension's owner
 * (EXECUTE is revoked from PUBLIC below; they run with the caller's
 * privileges on task_events.handlers).  event_types narrows the events a
 * handler is called with; its position moves past the others.
 */
ALTER TABLE task_events.handlers
	ADD COLUMN event_types text[]
		CONSTRAINT handlers_event_types_check
		CHECK (event_types OPERATOR(pg_catalog.<@)
				   '{TaskCreated,TaskStatusChanged,TaskCompleted}'::pg_catalog.text[]
			   AND pg_catalog.cardinality(event_types) OPERATOR(pg_catalog.>) 0);
COMMENT ON COLUMN task_events.handlers.event_types IS
	'The event types the handler is called with; NULL: every type';
COMMENT ON COLUMN task_events.handlers.enabled IS
	'false while the handler is paused (task_events.pause_handler)';
UPDATE task_events.handlers SET event_types = '{TaskCreated,TaskCompleted}'
WHERE handler OPERATOR(pg_catalog.=) ANY ('{notification,analytics}'::pg_catalog.text[]);

CREATE FUNCTION task_events.register_handler(handler text, function regprocedure,
	event_types text[] DEFAULT NULL, start_at text DEFAULT 'beginning', description text DEFAULT NULL)
	RETURNS void
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
BEGIN
	IF register_handler.handler IS NULL OR register_handler.function IS NULL
	   OR register_handler.start_at IS NULL THEN
		RAISE EXCEPTION 'handler, function and start_at must not be null'
			USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF register_handler.handler OPERATOR(pg_catalog.!~) '^[a-z][a-z0-9_]{0,62}$' THEN
		RAISE EXCEPTION 'invalid handler name "%"', register_handler.handler
			USING ERRCODE = 'invalid_parameter_value',
				  DETAIL = 'A handler name is a lower-case letter followed by up to 62 lower-case letters, digits or underscores.';
	END IF;
	IF register_handler.start_at OPERATOR(pg_catalog.<>) ALL ('{beginning,now}'::pg_catalog.text[]) THEN
		RAISE EXCEPTION 'invalid start_at "%"', register_handler.start_at
			USING ERRCODE = 'invalid_parameter_value',
				  DETAIL = 'start_at is ''beginning'' (every event of the log) or ''now'' (events committed after the registration).';
	END IF;
	PERFORM task_events._check_event_types(register_handler.event_types);

	BEGIN
		INSERT INTO task_events.handlers (handler, function, event_types, description)
		VALUES (register_handler.handler, register_handler.function,
				register_handler.event_types, register_handler.description);
	EXCEPTION WHEN unique_violation THEN
		RAISE EXCEPTION 'handler "%" already exists', register_handler.handler
			USING ERRCODE = 'duplicate_object';
	END;
	IF register_handler.start_at OPERATOR(pg_catalog.=) 'now' THEN
		INSERT INTO task_events.handler_state (handler, window_start)
		VALUES (register_handler.handler, pg_catalog.pg_current_snapshot());
	END IF;
END
$$;

/* Raise 22023 for an unknown or repeated type or an empty list, 22004 for a NULL element. */
CREATE FUNCTION task_events._check_event_types(event_types text[])
	RETURNS void
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
DECLARE
	t text;
BEGIN
	IF event_types IS NULL THEN
		RETURN;
	END IF;
	IF pg_catalog.cardinality(event_types) OPERATOR(pg_catalog.=) 0 THEN
		RAISE EXCEPTION 'event_types must not be empty'
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Pass NULL for every event type.';
	END IF;
	FOREACH t IN ARRAY event_types LOOP
		IF t IS NULL THEN
			RAISE EXCEPTION 'event_types must not contain null'
				USING ERRCODE = 'null_value_not_allowed';
		END IF;
		IF t OPERATOR(pg_catalog.<>) ALL ('{TaskCreated,TaskStatusChanged,TaskCompleted}'::pg_catalog.text[]) THEN
			RAISE EXCEPTION 'unknown event type "%"', t
				USING ERRCODE = 'invalid_parameter_value',
					  DETAIL = 'The event types are TaskCreated, TaskStatusChanged and TaskCompleted.';
		END IF;
	END LOOP;
END
$$;

/* Raise 42704 unless handler is registered; 22004 when it is NULL. */
CREATE FUNCTION task_events._require_handler(handler text)
	RETURNS void
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
BEGIN
	IF _require_handler.handler IS NULL THEN
		RAISE EXCEPTION 'handler must not be null' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF NOT EXISTS (SELECT FROM task_events.handlers h
				   WHERE h.handler OPERATOR(pg_catalog.=) _require_handler.handler) THEN
		RAISE EXCEPTION 'handler "%" does not exist', _require_handler.handler
			USING ERRCODE = 'undefined_object',
				  HINT = 'The handlers are listed in task_events.handler_status.';
	END IF;
END
$$;

CREATE FUNCTION task_events.unregister_handler(handler text)
	RETURNS void
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
BEGIN
	PERFORM task_events._require_handler(unregister_handler.handler);
	IF unregister_handler.handler OPERATOR(pg_catalog.=)
	   ANY ('{analytics,audit,notification,relay}'::pg_catalog.text[]) THEN
		RAISE EXCEPTION 'built-in handler "%" cannot be unregistered', unregister_handler.handler
			USING ERRCODE = 'insufficient_privilege',
				  HINT = 'Pause it with task_events.pause_handler().';
	END IF;
	-- Its position and dead letters go with it.  Locks are taken in the
	-- order a worker's batch takes them, so that the two never wait for
	-- each other: the lock a worker holds while it creates the handler's
	-- state row (src/dispatch.c, te_lock_state: a worker that got it before
	-- this is waited for, one that asks after this sees the handler gone),
	-- then the state row (a batch in progress is waited for), then the
	-- handlers row its dead letters' key refers to.
	PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('task_events.handler_state'),
											 pg_catalog.hashtext(unregister_handler.handler));
	PERFORM FROM task_events.handler_state s
	WHERE s.handler OPERATOR(pg_catalog.=) unregister_handler.handler FOR UPDATE;
	DELETE FROM task_events.handlers h WHERE h.handler OPERATOR(pg_catalog.=) unregister_handler.handler;
END
$$;

CREATE FUNCTION task_events.pause_handler(handler text)
	RETURNS void
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
BEGIN
	PERFORM task_events._require_handler(pause_handler.handler);
	UPDATE task_events.handlers h SET enabled = false
	WHERE h.handler OPERATOR(pg_catalog.=) pause_handler.handler;
END
$$;

CREATE FUNCTION task_events.resume_handler(handler text)
	RETURNS void
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
BEGIN
	PERFORM task_events._require_handler(resume_handler.handler);
	UPDATE task_events.handlers h SET enabled = true
	WHERE h.handler OPERATOR(pg_catalog.=) resume_handler.handler;
END
$$;

REVOKE ALL ON FUNCTION
	task_events.register_handler(text, regprocedure, text[], text, text),
	task_events._check_event_types(text[]),
	task_events._require_handler(text),
	task_events.unregister_handler(text),
	task_events.pause_handler(text),
	task_events.resume_handler(text)
	FROM PUBLIC;

COMMENT ON FUNCTION task_events.register_handler(text, regprocedure, text[], text, text) IS
	'Registers a handler: a function taking task_events.events[], called with the events of event_types (NULL: all) from the beginning of the log or from now';
COMMENT ON FUNCTION task_events.unregister_handler(text) IS
	'Removes a handler with its position and dead letters (not the built-in ones)';
COMMENT ON FUNCTION task_events.pause_handler(text) IS
	'Stops new batches of a handler; its position is kept';
COMMENT ON FUNCTION task_events.resume_handler(text) IS
	'Resumes a paused handler where it stopped';
COMMENT ON FUNCTION task_events._check_event_types(text[]) IS
	'Internal: validates a list of event types';
COMMENT ON FUNCTION task_events._require_handler(text) IS
	'Internal: raises 42704 for an unknown handler';

/*
 * Whether background workers serve this database (src/registry.c):
 * 'running', 'starting', or 'unserved: <why>'.
 */
CREATE FUNCTION task_events._workers_state() RETURNS text
	LANGUAGE C STABLE PARALLEL RESTRICTED
	SET search_path = pg_catalog, pg_temp
	AS 'MODULE_PATHNAME', 'te_workers_state';
REVOKE ALL ON FUNCTION task_events._workers_state() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION task_events._workers_state() TO task_events_reader;
COMMENT ON FUNCTION task_events._workers_state() IS
	'Internal: whether background workers serve this database (handler_status.workers)';

/* handler_status shows the new columns (appended: the view keeps its others). */
CREATE OR REPLACE VIEW task_events.handler_status AS
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
	   s.updated_at AS last_batch_at,
	   NOT h.enabled AS paused,
	   h.event_types,
	   h.description,
	   task_events._workers_state() AS workers
FROM task_events.handlers h
LEFT JOIN task_events.handler_state s ON s.handler OPERATOR(pg_catalog.=) h.handler
CROSS JOIN LATERAL task_events.handler_backlog(h.handler) b;

/*
 * Replaying a handler (replay_handler): handler_state.replay_from_seq asks
 * the dispatcher to handle again, from that seq on, every event the
 * handler's position says it has handled.  The replay begins at the next
 * batch in which no window is open (src/dispatch.c, te_begin_replay): a
 * window from nothing up to the position, read from replay_from_seq.
 */
ALTER TABLE task_events.handler_state ADD COLUMN replay_from_seq bigint;
COMMENT ON COLUMN task_events.handler_state.replay_from_seq IS
	'Set by task_events.replay_handler(): the events handled so far from this seq on are handled again, once';

CREATE FUNCTION task_events.replay_handler(handler text, from_seq bigint DEFAULT 1)
	RETURNS bigint
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
DECLARE
	st task_events.handler_state;
	types text[];
	replayed bigint;
BEGIN
	PERFORM task_events._require_handler(replay_handler.handler);
	IF replay_handler.from_seq IS NULL THEN
		RAISE EXCEPTION 'from_seq must not be null' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF replay_handler.from_seq OPERATOR(pg_catalog.<) 1 THEN
		RAISE EXCEPTION 'from_seq must be at least 1, not %', replay_handler.from_seq
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	-- Waits for a batch in progress; the handler's next batch waits for this.
	SELECT * INTO st FROM task_events.handler_state s
	WHERE s.handler OPERATOR(pg_catalog.=) replay_handler.handler FOR UPDATE;
	IF NOT FOUND THEN
		RETURN 0;				-- it never ran: nothing to handle again
	END IF;
	SELECT h.event_types INTO types FROM task_events.handlers h
	WHERE h.handler OPERATOR(pg_catalog.=) replay_handler.handler;

	-- What the replay will hand to the handler: the events handled when it
	-- begins, at the end of the window in progress if one is open.
	SELECT pg_catalog.count(*) INTO replayed
	FROM task_events.events e
	WHERE e.seq OPERATOR(pg_catalog.>=) replay_handler.from_seq
	  AND pg_catalog.pg_visible_in_snapshot(e.xact_id, COALESCE(st.window_end, st.window_start))
	  AND (types IS NULL OR e.event_type OPERATOR(pg_catalog.=) ANY (types));
	UPDATE task_events.handler_state s SET replay_from_seq = replay_handler.from_seq
	WHERE s.handler OPERATOR(pg_catalog.=) replay_handler.handler;
	RETURN replayed;
END
$$;

/*
 * Recompute analytics_counters and completion_stats from the event log:
 * from exactly the events the analytics handler has counted, its position
 * locked meanwhile (its batches wait), so that no event is counted twice
 * or missed at the switch.  DELETE and INSERT, not TRUNCATE: readers see
 * the old figures until this commits.  The handler's dead letters were
 * never counted and are not counted here.
 */
CREATE FUNCTION task_events.rebuild_analytics()
	RETURNS bigint
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
DECLARE
	st task_events.handler_state;
	counted bigint;
BEGIN
	SELECT * INTO st FROM task_events.handler_state s
	WHERE s.handler OPERATOR(pg_catalog.=) 'analytics' FOR UPDATE;

	CREATE TEMP TABLE te_counted ON COMMIT DROP AS
	SELECT e.user_id, e.event_type, e.aggregate_id, e.occurred_at
	FROM task_events.events e
	WHERE st.handler IS NOT NULL
	  AND e.event_type OPERATOR(pg_catalog.=) ANY ('{TaskCreated,TaskCompleted}'::pg_catalog.text[])
	  AND (pg_catalog.pg_visible_in_snapshot(e.xact_id, st.window_start)
		   OR (st.window_end IS NOT NULL
			   AND pg_catalog.pg_visible_in_snapshot(e.xact_id, st.window_end)
			   AND e.seq OPERATOR(pg_catalog.<=) st.window_seq))
	  AND NOT EXISTS (SELECT FROM task_events.dead_letters d
					  WHERE d.handler OPERATOR(pg_catalog.=) 'analytics'
						AND d.seq OPERATOR(pg_catalog.=) e.seq);

	DELETE FROM task_events.analytics_counters;
	INSERT INTO task_events.analytics_counters (metric, user_id, value)
	SELECT CASE WHEN c.event_type OPERATOR(pg_catalog.=) 'TaskCreated' THEN 'tasks_created'
				ELSE 'tasks_completed' END, c.user_id, pg_catalog.count(*)
	FROM te_counted c GROUP BY 1, 2;

	DELETE FROM task_events.completion_stats;
	INSERT INTO task_events.completion_stats (user_id, completed, total_seconds, min_seconds, max_seconds)
	SELECT d.user_id, pg_catalog.count(*), pg_catalog.sum(d.seconds),
		   pg_catalog.min(d.seconds), pg_catalog.max(d.seconds)
	FROM (SELECT c.user_id,
				 pg_catalog.date_part('epoch', c.occurred_at OPERATOR(pg_catalog.-) f.occurred_at) AS seconds
		  FROM te_counted c
		  JOIN task_events.events f
			ON f.aggregate_id OPERATOR(pg_catalog.=) c.aggregate_id
		   AND f.aggregate_version OPERATOR(pg_catalog.=) 1
		  WHERE c.event_type OPERATOR(pg_catalog.=) 'TaskCompleted') AS d
	GROUP BY d.user_id;

	SELECT pg_catalog.count(*) INTO counted FROM te_counted;
	DROP TABLE te_counted;
	RETURN counted;
END
$$;

REVOKE ALL ON FUNCTION
	task_events.replay_handler(text, bigint),
	task_events.rebuild_analytics()
	FROM PUBLIC;
COMMENT ON FUNCTION task_events.replay_handler(text, bigint) IS
	'Has a handler handle again, once, every event from from_seq on that it had handled; returns how many';
COMMENT ON FUNCTION task_events.rebuild_analytics() IS
	'Recomputes analytics_counters and completion_stats from the events the analytics handler has counted; returns how many';
