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
 * A description of every object of the schema (\dn+, \df+, \dt+, \dT+ and
 * pg_description show them); 1.0 had some without.  sql/security.sql
 * checks that none is missing.
 */
COMMENT ON SCHEMA task_events IS
	'task_events: tasks whose every change records a domain event, published on NOTIFY and handled by background workers';
COMMENT ON TYPE task_events.task_status IS 'The statuses of a task: pending, in_progress, completed, cancelled';
COMMENT ON FUNCTION task_events.create_task(text, text, text) IS
	'Creates a task (pending) and records TaskCreated; returns the task';
COMMENT ON FUNCTION task_events.update_status(uuid, task_events.task_status, bigint) IS
	'Moves a task to another status and records TaskStatusChanged (and TaskCompleted); optional expected_version';
COMMENT ON FUNCTION task_events.complete_task(uuid, bigint) IS
	'Completes a task: update_status(task_id, ''completed'', expected_version)';
COMMENT ON FUNCTION task_events.task_history(uuid) IS 'The events of a task, in version order';
COMMENT ON FUNCTION task_events.process_pending(text, integer) IS
	'Runs handlers in this session over the events they have not handled (without the background workers)';
COMMENT ON FUNCTION task_events.handler_backlog(text) IS
	'Events of a handler''s types not yet handled, and the oldest one''s time (for handler_status)';
COMMENT ON FUNCTION task_events.adopt_restored_log() IS
	'After a restore into another cluster: translates the transaction ids of the log and the positions, so that writers and handlers run again';
COMMENT ON FUNCTION task_events.notification_handler(task_events.events[]) IS
	'Built-in handler: a notification row for the task''s owner on TaskCreated and TaskCompleted';
COMMENT ON FUNCTION task_events.analytics_handler(task_events.events[]) IS
	'Built-in handler: per-user counters and completion times';
COMMENT ON FUNCTION task_events.audit_handler(task_events.events[]) IS
	'Built-in handler: one audit_log row per event';
COMMENT ON FUNCTION task_events.relay_handler(task_events.events[]) IS
	'Built-in handler: publishes events on NOTIFY after their commit (notify_mode relay)';
COMMENT ON FUNCTION task_events.check_handler_function() IS
	'Internal trigger: a handler''s function must take task_events.events[] and return void';
COMMENT ON FUNCTION task_events.refuse_modification() IS
	'Internal trigger: refuses UPDATE, DELETE and TRUNCATE of the append-only tables';
COMMENT ON TABLE task_events.handlers IS 'The registered handlers: name, function, event types, paused';
COMMENT ON TABLE task_events.handler_state IS
	'Each handler''s position in the log (commit-safe window) and its retry state';
COMMENT ON TABLE task_events.dead_letters IS
	'Events a handler failed max_attempts times; retry_dead_letters() offers them again';
COMMENT ON TABLE task_events.notifications IS 'Written by the notification handler: one row per notification to a user';
COMMENT ON TABLE task_events.analytics_counters IS 'Written by the analytics handler: counters per metric and user';
COMMENT ON TABLE task_events.completion_stats IS 'Written by the analytics handler: one row per completed task, with its time to complete';
COMMENT ON TABLE task_events.audit_log IS 'Written by the audit handler: one row per event, append-only';
COMMENT ON TABLE task_events.log_origin IS
	'The cluster and database the log was written in: a restore elsewhere is detected and needs adopt_restored_log()';
COMMENT ON VIEW task_events.handler_status IS
	'One row per handler: position, events behind, seconds behind, processed, failed, dead letters, retry state, workers, lanes';
COMMENT ON VIEW task_events.event_rates IS 'Events recorded per type over the last minute';
COMMENT ON SEQUENCE task_events.events_seq_seq IS 'The order of the event log (events.seq)';
COMMENT ON SEQUENCE task_events.notifications_notification_id_seq IS 'Ids of task_events.notifications';

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
 * Handler lanes (task_events.set_handler_lanes; docs/design.md, "Handler
 * lanes"; src/dispatch.c).  A handler's events are split by task into
 * lanes (_lane_of, as the subscriptions' lanes), and each lane has a
 * position of its own: one row of handler_state per lane, locked by the
 * worker running that lane, so that up to lanes workers run the handler at
 * once, each lane in seq order.  lanes is the number of lanes the row's
 * position belongs to; rows with lane >= lanes are retired (kept for their
 * counters, and reused when the lanes grow again).  A change of the number
 * of lanes waits for every lane to reach lanes_barrier, a snapshot taken by
 * set_handler_lanes: at that point every lane has handled exactly the
 * events visible in it, so the new lanes can all start there.
 */
ALTER TABLE task_events.handler_state
	ADD COLUMN lane int NOT NULL DEFAULT 0,
	ADD COLUMN lanes int NOT NULL DEFAULT 1,
	ADD COLUMN lanes_barrier pg_catalog.pg_snapshot,
	DROP CONSTRAINT handler_state_pkey,
	ADD PRIMARY KEY (handler, lane),
	ADD CONSTRAINT handler_state_lanes_check
		CHECK (lane OPERATOR(pg_catalog.>=) 0 AND lanes OPERATOR(pg_catalog.>=) 1
			   AND lanes OPERATOR(pg_catalog.<=) 64);
COMMENT ON COLUMN task_events.handler_state.lane IS
	'The lane whose position the row holds: the events whose task _lane_of puts in it';
COMMENT ON COLUMN task_events.handler_state.lanes IS
	'The number of lanes the position belongs to; a row with lane >= lanes is retired';
COMMENT ON COLUMN task_events.handler_state.lanes_barrier IS
	'Set while the number of lanes changes: each lane stops there, and the new lanes start there once all have';

/*
 * The lane of an event: by its task, so that a task's events stay in order.
 * Without SET search_path, like _unhandled_events, so that it is inlined
 * into the queries that call it once per event; every name is qualified.
 */
CREATE FUNCTION task_events._lane_of(aggregate_id uuid, lanes int)
	RETURNS int
	LANGUAGE sql IMMUTABLE PARALLEL SAFE
	AS $$
	SELECT (((pg_catalog.uuid_hash($1)::bigint OPERATOR(pg_catalog.%) $2)
			 OPERATOR(pg_catalog.+) $2) OPERATOR(pg_catalog.%) $2)::int
$$;

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
 * the types it subscribes to (the others it only moves past), over its
 * lanes (each lane's position, for the events of its lane).
 */
CREATE OR REPLACE FUNCTION task_events.handler_backlog(handler text,
	OUT events_behind bigint, OUT oldest_unhandled timestamptz)
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS $$
	SELECT pg_catalog.count(*), pg_catalog.min(w.occurred_at)
	FROM (SELECT COALESCE(s.window_start, '1:1:'::pg_catalog.pg_snapshot) AS ws,
				 s.window_end AS we, COALESCE(s.window_seq, 0) AS wseq, r.event_types AS types,
				 COALESCE(s.lane, 0) AS lane, COALESCE(s.lanes, 1) AS lanes
		  FROM (SELECT $1 AS handler) AS h
		  LEFT JOIN task_events.handlers r ON r.handler OPERATOR(pg_catalog.=) h.handler
		  LEFT JOIN task_events.handler_state s ON s.handler OPERATOR(pg_catalog.=) h.handler
			   AND s.lane OPERATOR(pg_catalog.<) s.lanes) AS p
	CROSS JOIN LATERAL task_events._unhandled_events(p.ws, p.we, p.wseq) AS w
	WHERE (p.types IS NULL OR w.event_type OPERATOR(pg_catalog.=) ANY (p.types))
	  AND (p.lanes OPERATOR(pg_catalog.=) 1
		   OR task_events._lane_of(w.aggregate_id, p.lanes) OPERATOR(pg_catalog.=) p.lane)
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
					 FROM task_events._positions() s) OPERATOR(pg_catalog.>) next_xid, false);
	IF NOT foreign_origin AND NOT in_future THEN
		RETURN 0;
	END IF;

	IF in_future THEN
		-- Per event, the positions (handlers', subscription lanes') that had
		-- not handled it.
		CREATE TEMP TABLE te_pending ON COMMIT DROP AS
		SELECT e.seq, pg_catalog.array_agg(s.name ORDER BY s.name) AS pending
		FROM task_events._positions() s
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

		-- Each lane's position, and the barrier of a change of the lanes.
		UPDATE task_events.handler_state s
		SET window_start = task_events._adopted_snapshot(task_events._position_name(s.handler, s.lane), top_xid),
			window_end = NULL,
			window_seq = 0,
			lanes_barrier = CASE WHEN s.lanes_barrier IS NOT NULL
								 THEN task_events._adopted_snapshot(task_events._position_name(s.handler, -1), top_xid) END;
		-- A lease names events of the old windows: it ends, they are offered again.
		UPDATE task_events.subscription_lanes l
		SET window_start = task_events._adopted_snapshot('subscription:' OPERATOR(pg_catalog.||) l.subscription
														 OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) l.lane, top_xid),
			window_end = NULL, window_seq = 0, window_last_seq = 0,
			batch_id = NULL, batch_first_seq = NULL, batch_last_seq = NULL, batch_size = NULL,
			batch_retries = false, leased_until = NULL;
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

/* The number of lanes set_handler_lanes() asked for (handler_state.lanes: in effect). */
ALTER TABLE task_events.handlers
	ADD COLUMN lanes int NOT NULL DEFAULT 1
		CONSTRAINT handlers_lanes_check
		CHECK (lanes OPERATOR(pg_catalog.>=) 1 AND lanes OPERATOR(pg_catalog.<=) 64);
COMMENT ON COLUMN task_events.handlers.lanes IS
	'The lanes the handler runs in (task_events.set_handler_lanes): up to this many workers run it at once';

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
	IF pg_catalog.cardinality(event_types) OPERATOR(pg_catalog.<>)
	   (SELECT pg_catalog.count(DISTINCT u.type) FROM pg_catalog.unnest(event_types) AS u(type)) THEN
		RAISE EXCEPTION 'event_types must not repeat a type'
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
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
	   ANY ('{analytics,audit,notification,relay,subscriptions}'::pg_catalog.text[]) THEN
		RAISE EXCEPTION 'built-in handler "%" cannot be unregistered', unregister_handler.handler
			USING ERRCODE = 'insufficient_privilege',
				  HINT = 'Pause it with task_events.pause_handler().';
	END IF;
	-- Its position and dead letters go with it.  Locks are taken in the
	-- order a worker's batch takes them, so that the two never wait for
	-- each other: the lock a worker holds while it creates the handler's
	-- state row (src/dispatch.c, te_lock_state: a worker that got it before
	-- this is waited for, one that asks after this sees the handler gone),
	-- then the state rows, in lane order (a batch in progress is waited
	-- for), then the handlers row its dead letters' key refers to.
	PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('task_events.handler_state'),
											 pg_catalog.hashtext(unregister_handler.handler));
	PERFORM FROM task_events.handler_state s
	WHERE s.handler OPERATOR(pg_catalog.=) unregister_handler.handler ORDER BY s.lane FOR UPDATE;
	DELETE FROM task_events.handlers h WHERE h.handler OPERATOR(pg_catalog.=) unregister_handler.handler;
END
$$;

/*
 * Split a handler's events by task into lanes, each run by its own worker
 * (docs/design.md, "Handler lanes").  Takes effect at once for a handler
 * that never ran; otherwise every lane first handles the events committed
 * before this call (the barrier), then the new lanes start from there: no
 * event is skipped or handled twice, and a task's events stay in order.
 * Locks as unregister_handler does, waiting for the batches in progress.
 */
CREATE FUNCTION task_events.set_handler_lanes(handler text, lanes int)
	RETURNS void
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
DECLARE
	in_effect int;
BEGIN
	PERFORM task_events._require_handler(set_handler_lanes.handler);
	IF set_handler_lanes.lanes IS NULL THEN
		RAISE EXCEPTION 'lanes must not be null' USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF set_handler_lanes.lanes OPERATOR(pg_catalog.<) 1 OR set_handler_lanes.lanes OPERATOR(pg_catalog.>) 64 THEN
		RAISE EXCEPTION 'lanes must be between 1 and 64, not %', set_handler_lanes.lanes
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('task_events.handler_state'),
											 pg_catalog.hashtext(set_handler_lanes.handler));
	PERFORM FROM task_events.handler_state s
	WHERE s.handler OPERATOR(pg_catalog.=) set_handler_lanes.handler ORDER BY s.lane FOR UPDATE;
	UPDATE task_events.handlers h SET lanes = set_handler_lanes.lanes
	WHERE h.handler OPERATOR(pg_catalog.=) set_handler_lanes.handler;

	SELECT pg_catalog.max(s.lanes) INTO in_effect FROM task_events.handler_state s
	WHERE s.handler OPERATOR(pg_catalog.=) set_handler_lanes.handler;
	IF in_effect IS NULL THEN
		-- It never ran: every lane starts at the beginning of the log.
		INSERT INTO task_events.handler_state (handler, lane, lanes)
		SELECT set_handler_lanes.handler, l, set_handler_lanes.lanes
		FROM pg_catalog.generate_series(0, set_handler_lanes.lanes OPERATOR(pg_catalog.-) 1) AS l;
		RETURN;
	END IF;

	-- Rows for the lanes to come, retired until the change (lane >= lanes).
	INSERT INTO task_events.handler_state (handler, lane, lanes)
	SELECT set_handler_lanes.handler, l, in_effect
	FROM pg_catalog.generate_series(0, set_handler_lanes.lanes OPERATOR(pg_catalog.-) 1) AS l
	ON CONFLICT DO NOTHING;
	-- The barrier: taken once every batch in progress has ended, so that no
	-- lane's position is past it.  Asking for the lanes in effect cancels a
	-- change: the lanes go on from where they are.
	UPDATE task_events.handler_state s
	SET lanes_barrier = CASE WHEN set_handler_lanes.lanes OPERATOR(pg_catalog.=) in_effect THEN NULL
							 ELSE task_events._window_snapshot() END
	WHERE s.handler OPERATOR(pg_catalog.=) set_handler_lanes.handler
	  AND s.lane OPERATOR(pg_catalog.<) s.lanes;
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
	task_events.resume_handler(text),
	task_events.set_handler_lanes(text, int)
	FROM PUBLIC;
COMMENT ON FUNCTION task_events.set_handler_lanes(text, int) IS
	'Splits a handler''s events by task into 1 to 64 lanes, run by as many workers at once, each task''s events in order';

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

/*
 * handler_status shows the new columns (appended: the view keeps its
 * others), one row per handler over its lanes: position is the highest seq
 * any lane handled.
 */
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
	   task_events._workers_state() AS workers,
	   h.lanes
FROM task_events.handlers h
LEFT JOIN LATERAL (
	-- Over the handler's lanes: counters of every row (retired ones
	-- included), the retry state of the lanes in effect, the last error.
	SELECT pg_catalog.max(x.last_seq) AS last_seq,
		   pg_catalog.sum(x.processed)::bigint AS processed,
		   pg_catalog.sum(x.failed)::bigint AS failed,
		   (pg_catalog.array_agg(x.last_error ORDER BY x.last_error_at DESC NULLS LAST))[1] AS last_error,
		   (pg_catalog.array_agg(x.last_sqlstate ORDER BY x.last_error_at DESC NULLS LAST))[1] AS last_sqlstate,
		   pg_catalog.max(x.last_error_at) AS last_error_at,
		   pg_catalog.max(x.attempts) FILTER (WHERE x.lane OPERATOR(pg_catalog.<) x.lanes) AS attempts,
		   pg_catalog.min(x.retry_at) FILTER (WHERE x.lane OPERATOR(pg_catalog.<) x.lanes) AS retry_at,
		   pg_catalog.sum(x.batches)::bigint AS batches,
		   pg_catalog.sum(x.batch_ms_total) AS batch_ms_total,
		   pg_catalog.max(x.batch_ms_max) AS batch_ms_max,
		   pg_catalog.max(x.updated_at) AS updated_at
	FROM task_events.handler_state x
	WHERE x.handler OPERATOR(pg_catalog.=) h.handler
	HAVING pg_catalog.count(*) OPERATOR(pg_catalog.>) 0) s ON true
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
	-- Waits for the batches in progress (of every lane); the handler's next
	-- batches wait for this.
	PERFORM FROM task_events.handler_state s
	WHERE s.handler OPERATOR(pg_catalog.=) replay_handler.handler ORDER BY s.lane FOR UPDATE;
	IF NOT FOUND THEN
		RETURN 0;				-- it never ran: nothing to handle again
	END IF;
	SELECT h.event_types INTO types FROM task_events.handlers h
	WHERE h.handler OPERATOR(pg_catalog.=) replay_handler.handler;

	-- What the replay will hand to the handler: per lane, the events of the
	-- lane handled when its replay begins, at the end of the window in
	-- progress if one is open.
	SELECT pg_catalog.count(*) INTO replayed
	FROM task_events.handler_state s
	JOIN task_events.events e
	  ON pg_catalog.pg_visible_in_snapshot(e.xact_id, COALESCE(s.window_end, s.window_start))
	WHERE s.handler OPERATOR(pg_catalog.=) replay_handler.handler
	  AND s.lane OPERATOR(pg_catalog.<) s.lanes
	  AND e.seq OPERATOR(pg_catalog.>=) replay_handler.from_seq
	  AND (types IS NULL OR e.event_type OPERATOR(pg_catalog.=) ANY (types))
	  AND (s.lanes OPERATOR(pg_catalog.=) 1
		   OR task_events._lane_of(e.aggregate_id, s.lanes) OPERATOR(pg_catalog.=) s.lane);
	UPDATE task_events.handler_state s SET replay_from_seq = replay_handler.from_seq
	WHERE s.handler OPERATOR(pg_catalog.=) replay_handler.handler
	  AND s.lane OPERATOR(pg_catalog.<) s.lanes;
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
	counted bigint;
BEGIN
	PERFORM FROM task_events.handler_state s
	WHERE s.handler OPERATOR(pg_catalog.=) 'analytics' ORDER BY s.lane FOR UPDATE;

	-- The events its lanes' positions (each for the events of its lane) say are handled.
	CREATE TEMP TABLE te_counted ON COMMIT DROP AS
	SELECT e.user_id, e.event_type, e.aggregate_id, e.occurred_at
	FROM task_events.events e
	WHERE e.event_type OPERATOR(pg_catalog.=) ANY ('{TaskCreated,TaskCompleted}'::pg_catalog.text[])
	  AND EXISTS (SELECT FROM task_events.handler_state st
				  WHERE st.handler OPERATOR(pg_catalog.=) 'analytics'
					AND st.lane OPERATOR(pg_catalog.<) st.lanes
					AND (st.lanes OPERATOR(pg_catalog.=) 1
						 OR task_events._lane_of(e.aggregate_id, st.lanes) OPERATOR(pg_catalog.=) st.lane)
					AND (pg_catalog.pg_visible_in_snapshot(e.xact_id, st.window_start)
						 OR (st.window_end IS NOT NULL
							 AND pg_catalog.pg_visible_in_snapshot(e.xact_id, st.window_end)
							 AND e.seq OPERATOR(pg_catalog.<=) st.window_seq)))
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

/*
 * Subscriptions: durable consumers outside the database (README,
 * "Subscriptions").  A subscription has lanes; each lane has a position
 * like a handler's (a pair of snapshots and the seq acknowledged in the open
 * window: src/commit_horizon.c tells why), holds the events whose task hashes
 * to it, and leases one batch at a time to whichever consumer asks.
 */
CREATE TABLE task_events.subscriptions (
	subscription text PRIMARY KEY,
	event_types text[]
		CONSTRAINT subscriptions_event_types_check
		CHECK (event_types OPERATOR(pg_catalog.<@)
				   '{TaskCreated,TaskStatusChanged,TaskCompleted}'::pg_catalog.text[]
			   AND pg_catalog.cardinality(event_types) OPERATOR(pg_catalog.>) 0),
	lanes int NOT NULL CHECK (lanes OPERATOR(pg_catalog.>=) 1 AND lanes OPERATOR(pg_catalog.<=) 64),
	created_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE task_events.subscriptions IS
	'Durable consumers outside the database (task_events.create_subscription)';

CREATE TABLE task_events.subscription_lanes (
	subscription text NOT NULL REFERENCES task_events.subscriptions ON DELETE CASCADE,
	lane int NOT NULL,
	window_start pg_catalog.pg_snapshot NOT NULL,
	window_end pg_catalog.pg_snapshot,
	window_seq bigint NOT NULL DEFAULT 0,
	window_last_seq bigint NOT NULL DEFAULT 0,
	last_seq bigint NOT NULL DEFAULT 0,
	batch_id bigint UNIQUE,
	batch_first_seq bigint,
	batch_last_seq bigint,
	batch_size int,
	batch_retries boolean NOT NULL DEFAULT false,
	leased_until timestamptz,
	served_at timestamptz,
	attempts int NOT NULL DEFAULT 0,
	retry_at timestamptz,
	acknowledged bigint NOT NULL DEFAULT 0,
	failed bigint NOT NULL DEFAULT 0,
	last_error text,
	last_error_at timestamptz,
	PRIMARY KEY (subscription, lane)
);
COMMENT ON TABLE task_events.subscription_lanes IS
	'Where each lane of a subscription is in the log, and the batch it has leased';
COMMENT ON COLUMN task_events.subscription_lanes.window_seq IS
	'In the open window (events visible in window_end, not in window_start), the events up to this seq are acknowledged';
COMMENT ON COLUMN task_events.subscription_lanes.window_last_seq IS
	'The highest seq of the open window: reading stops there';
COMMENT ON COLUMN task_events.subscription_lanes.attempts IS
	'Failed attempts at the batch starting at the lane''s position (nack_batch)';

CREATE TABLE task_events.subscription_dead_letters (
	subscription text NOT NULL REFERENCES task_events.subscriptions ON DELETE CASCADE,
	seq bigint NOT NULL,
	lane int NOT NULL,
	event_id uuid NOT NULL,
	attempts int NOT NULL,
	message text,
	failed_at timestamptz NOT NULL,
	retry_requested boolean NOT NULL DEFAULT false,
	PRIMARY KEY (subscription, seq)
);
COMMENT ON TABLE task_events.subscription_dead_letters IS
	'Events a subscription''s consumers failed max_attempts times (nack_batch); retry_dead_letters() offers them again';

CREATE SEQUENCE task_events.subscription_batch_seq AS bigint;

SELECT pg_catalog.pg_extension_config_dump('task_events.subscriptions', '');
SELECT pg_catalog.pg_extension_config_dump('task_events.subscription_lanes', '');
SELECT pg_catalog.pg_extension_config_dump('task_events.subscription_dead_letters', '');
SELECT pg_catalog.pg_extension_config_dump('task_events.subscription_batch_seq', '');
COMMENT ON SEQUENCE task_events.subscription_batch_seq IS 'Ids of the batches read_batch leases';

/*
 * The current snapshot with the caller's own transaction listed as in
 * progress (src/commit_horizon.c, te_window_snapshot): a window's end that
 * events the caller writes after reading are never counted in.
 */
CREATE FUNCTION task_events._window_snapshot() RETURNS pg_catalog.pg_snapshot
	LANGUAGE C VOLATILE
	SET search_path = pg_catalog, pg_temp
	AS 'MODULE_PATHNAME', 'te_window_snapshot_sql';
COMMENT ON FUNCTION task_events._window_snapshot() IS
	'Internal: the current snapshot, the caller''s own transaction in progress';

/* Raise 22004 for a NULL subscription name, 22023 for an invalid one. */
CREATE FUNCTION task_events._check_subscription_name(subscription text)
	RETURNS void
	LANGUAGE plpgsql IMMUTABLE
	SET search_path = pg_catalog, pg_temp
	AS $$
BEGIN
	IF subscription IS NULL THEN
		RAISE EXCEPTION 'subscription must not be null'
			USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF subscription OPERATOR(pg_catalog.!~) '^[a-z][a-z0-9_]{0,62}$' THEN
		RAISE EXCEPTION 'invalid subscription name "%"', subscription
			USING ERRCODE = 'invalid_parameter_value',
				  DETAIL = 'A subscription name is a lower-case letter followed by up to 62 lower-case letters, digits or underscores.';
	END IF;
END
$$;

/* The subscription's row, locked FOR KEY SHARE; 42704 when there is none. */
CREATE FUNCTION task_events._require_subscription(subscription text)
	RETURNS task_events.subscriptions
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
DECLARE
	s task_events.subscriptions;
BEGIN
	PERFORM task_events._check_subscription_name(subscription);
	SELECT * INTO s FROM task_events.subscriptions x
	WHERE x.subscription OPERATOR(pg_catalog.=) _require_subscription.subscription
	FOR KEY SHARE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'subscription "%" does not exist', subscription
			USING ERRCODE = 'undefined_object';
	END IF;
	RETURN s;
END
$$;

CREATE FUNCTION task_events.create_subscription(subscription text, event_types text[] DEFAULT NULL,
	start_at text DEFAULT 'now', lanes int DEFAULT 1)
	RETURNS void
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
DECLARE
	start pg_catalog.pg_snapshot;
BEGIN
	PERFORM task_events._check_subscription_name(create_subscription.subscription);
	IF create_subscription.start_at IS NULL OR create_subscription.lanes IS NULL THEN
		RAISE EXCEPTION 'start_at and lanes must not be null'
			USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF create_subscription.start_at OPERATOR(pg_catalog.<>) ALL ('{beginning,now}'::pg_catalog.text[]) THEN
		RAISE EXCEPTION 'invalid start_at "%"', create_subscription.start_at
			USING ERRCODE = 'invalid_parameter_value',
				  DETAIL = 'start_at is ''now'' (events committed after the subscription was created) or ''beginning'' (every event of the log).';
	END IF;
	IF create_subscription.lanes OPERATOR(pg_catalog.<) 1 OR create_subscription.lanes OPERATOR(pg_catalog.>) 64 THEN
		RAISE EXCEPTION 'lanes must be between 1 and 64, not %', create_subscription.lanes
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	PERFORM task_events._check_event_types(create_subscription.event_types);

	BEGIN
		INSERT INTO task_events.subscriptions (subscription, event_types, lanes)
		VALUES (create_subscription.subscription, create_subscription.event_types, create_subscription.lanes);
	EXCEPTION WHEN unique_violation THEN
		RAISE EXCEPTION 'subscription "%" already exists', create_subscription.subscription
			USING ERRCODE = 'duplicate_object';
	END;
	start := CASE create_subscription.start_at WHEN 'now' THEN task_events._window_snapshot()
			 ELSE '1:1:'::pg_catalog.pg_snapshot END;
	INSERT INTO task_events.subscription_lanes (subscription, lane, window_start)
	SELECT create_subscription.subscription, l, start
	FROM pg_catalog.generate_series(0, create_subscription.lanes OPERATOR(pg_catalog.-) 1) l;
	PERFORM task_events._subscriptions_wakeup_handler();
END
$$;

CREATE FUNCTION task_events.drop_subscription(subscription text)
	RETURNS void
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
BEGIN
	PERFORM task_events._require_subscription(drop_subscription.subscription);
	-- A consumer's batch in progress (its read_batch, ack or nack) is waited for.
	PERFORM FROM task_events.subscription_lanes l
	WHERE l.subscription OPERATOR(pg_catalog.=) drop_subscription.subscription FOR UPDATE;
	DELETE FROM task_events.subscriptions s
	WHERE s.subscription OPERATOR(pg_catalog.=) drop_subscription.subscription;
	PERFORM task_events._subscriptions_wakeup_handler();
END
$$;

/*
 * Waking consumers.  The built-in handler "subscriptions", run by the
 * workers like any handler, publishes on the channel
 * task_events_subscriptions one notification per subscription that a batch
 * has events for, its name as payload: in every notify_mode, a few
 * milliseconds after the commit.  It exists while a subscription does.
 */
CREATE FUNCTION task_events.subscriptions_handler(events task_events.events[])
	RETURNS void
	LANGUAGE sql
	SET search_path = pg_catalog, pg_temp
	AS $$
	SELECT pg_catalog.pg_notify('task_events_subscriptions', s.subscription)
	FROM task_events.subscriptions s
	WHERE s.event_types IS NULL
	   OR s.event_types OPERATOR(pg_catalog.&&)
		  (SELECT pg_catalog.array_agg(DISTINCT e.event_type) FROM pg_catalog.unnest(events) e)
	ORDER BY s.subscription
$$;
COMMENT ON FUNCTION task_events.subscriptions_handler(task_events.events[]) IS
	'The built-in handler that wakes subscriptions'' consumers (channel task_events_subscriptions)';

/* Register the wake-up handler when the first subscription exists, drop it with the last. */
CREATE FUNCTION task_events._subscriptions_wakeup_handler()
	RETURNS void
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
BEGIN
	IF EXISTS (SELECT FROM task_events.subscriptions) THEN
		IF NOT EXISTS (SELECT FROM task_events.handlers h
					   WHERE h.handler OPERATOR(pg_catalog.=) 'subscriptions') THEN
			INSERT INTO task_events.handlers (handler, function, description)
			VALUES ('subscriptions', 'task_events.subscriptions_handler(task_events.events[])'::pg_catalog.regprocedure,
					'Wakes the consumers of subscriptions (channel task_events_subscriptions)');
			INSERT INTO task_events.handler_state (handler, window_start)
			VALUES ('subscriptions', task_events._window_snapshot());
		END IF;
	ELSE
		PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('task_events.handler_state'),
												 pg_catalog.hashtext('subscriptions'));
		PERFORM FROM task_events.handler_state s
		WHERE s.handler OPERATOR(pg_catalog.=) 'subscriptions' FOR UPDATE;
		DELETE FROM task_events.handlers h WHERE h.handler OPERATOR(pg_catalog.=) 'subscriptions';
	END IF;
END
$$;

/* Backoff before the next attempt after n failed ones (as dead_letters.c). */
CREATE FUNCTION task_events._retry_time(attempts int)
	RETURNS timestamptz
	LANGUAGE sql VOLATILE
	SET search_path = pg_catalog, pg_temp
	AS $$
	SELECT pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+)
		   LEAST(COALESCE(pg_catalog.current_setting('task_events.retry_delay', true), '100ms')::pg_catalog.interval
				 OPERATOR(pg_catalog.*) pg_catalog.power(2, LEAST(GREATEST($1, 1) OPERATOR(pg_catalog.-) 1, 30)),
				 '10 minutes'::pg_catalog.interval)
$$;

/*
 * read_batch: the next events of one free lane, leased to the caller.  A
 * lane is free when it has no lease (or an expired one) and no retry is
 * pending; the free lanes are tried one at a time, and the first that has
 * events is leased.  A lane found empty on the way stays locked until the
 * caller's transaction ends (its window was moved on): another consumer
 * skips it meanwhile.  Its dead letters queued by retry_dead_letters() go first, as a
 * batch of their own.  Otherwise the lane reads its open window from its
 * position, in seq order along events_pkey, up to the window's last seq; an
 * exhausted window is closed and the next one opened at the current
 * snapshot (_window_snapshot), so a transaction that commits late falls into
 * a later window, never skipped.
 */
CREATE FUNCTION task_events._read_batch(subscription text, only_lane int, max_events int,
	lease interval)
	RETURNS TABLE (batch_id bigint, lane int, seq bigint, event_id uuid, event_type text,
				   event_version int, aggregate_id uuid, aggregate_version bigint,
				   occurred_at timestamptz, user_id text, payload jsonb)
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	-- The walk along events_pkey from the lane's position must not depend on
	-- statistics: a custom plan (it knows the window covers most of the log),
	-- or a generic one on a never-analyzed log, read the whole window and
	-- sorted it for each batch.  Generic plans, and no other way to scan
	-- (which makes the other ways' cost huge: no JIT, then).
	SET plan_cache_mode = force_generic_plan
	SET enable_seqscan = off
	SET enable_bitmapscan = off
	SET enable_sort = off
	SET jit = off
	AS $$
DECLARE
	sub task_events.subscriptions;
	l task_events.subscription_lanes;
	bounds record;
	attempt int;
	retries boolean;
	tried int[] := '{}';
BEGIN
	IF max_events IS NULL OR lease IS NULL THEN
		RAISE EXCEPTION 'max_events and lease must not be null'
			USING ERRCODE = 'null_value_not_allowed';
	END IF;
	IF max_events OPERATOR(pg_catalog.<) 1 OR max_events OPERATOR(pg_catalog.>) 100000 THEN
		RAISE EXCEPTION 'max_events must be between 1 and 100000, not %', max_events
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF lease OPERATOR(pg_catalog.<=) '0'::pg_catalog.interval THEN
		RAISE EXCEPTION 'lease must be positive, not %', lease
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	sub := task_events._require_subscription(_read_batch.subscription);
	IF only_lane IS NOT NULL AND (only_lane OPERATOR(pg_catalog.<) 0 OR only_lane OPERATOR(pg_catalog.>=) sub.lanes) THEN
		RAISE EXCEPTION 'subscription "%" has no lane %', sub.subscription, only_lane
			USING ERRCODE = 'invalid_parameter_value',
				  DETAIL = pg_catalog.format('Its lanes are 0 to %s.', sub.lanes OPERATOR(pg_catalog.-) 1);
	END IF;

	-- The free lanes, one at a time (each is locked when taken): those with
	-- an open window (events left) first, then the least recently served.
	LOOP
		SELECT * INTO l FROM task_events.subscription_lanes x
		WHERE x.subscription OPERATOR(pg_catalog.=) sub.subscription
		  AND x.lane OPERATOR(pg_catalog.<>) ALL (tried)
		  AND (only_lane IS NULL OR x.lane OPERATOR(pg_catalog.=) only_lane)
		  AND (x.leased_until IS NULL OR x.leased_until OPERATOR(pg_catalog.<=) pg_catalog.clock_timestamp())
		  AND (x.retry_at IS NULL OR x.retry_at OPERATOR(pg_catalog.<=) pg_catalog.clock_timestamp())
		ORDER BY x.window_end IS NULL, x.served_at NULLS FIRST, x.lane
		LIMIT 1
		FOR UPDATE SKIP LOCKED;
		EXIT WHEN NOT FOUND;
		tried := tried OPERATOR(pg_catalog.||) l.lane;

		-- Attempt 0 serves the dead letters queued for another attempt, as a
		-- batch of their own; 1 and 2 the open window, then a new one.  Each
		-- is one statement: its events (CTE b, straight from the index walk:
		-- no array, no row built twice; the branch of the other kind is cut
		-- off by its constant condition), the lease written with their
		-- bounds (CTE u, only when there are any), and the rows returned in
		-- the order b was written (a CTE is read back in that order: no
		-- sort; the batch id comes from u in a subquery, not a join).
		FOR attempt IN 0..2 LOOP
			retries := attempt OPERATOR(pg_catalog.=) 0;
			IF NOT retries AND l.window_end IS NULL THEN
				l.window_end := task_events._window_snapshot();
				SELECT pg_catalog.min(w.seq) AS first, pg_catalog.max(w.seq) AS last INTO bounds
				FROM task_events._unhandled_events(l.window_start, NULL, 0) w
				WHERE pg_catalog.pg_visible_in_snapshot(w.xact_id, l.window_end);
				l.window_seq := COALESCE(bounds.first OPERATOR(pg_catalog.-) 1, 0);
				l.window_last_seq := COALESCE(bounds.last, 0);
			END IF;
			RETURN QUERY
			WITH b AS (
				(SELECT e.* FROM task_events.subscription_dead_letters d
				 JOIN task_events.events e ON e.seq OPERATOR(pg_catalog.=) d.seq
				 WHERE retries
				   AND d.subscription OPERATOR(pg_catalog.=) sub.subscription
				   AND d.lane OPERATOR(pg_catalog.=) l.lane AND d.retry_requested
				 ORDER BY d.seq LIMIT max_events)
				UNION ALL
				(SELECT e.* FROM task_events.events e
				 WHERE NOT retries
				   AND e.seq OPERATOR(pg_catalog.>) l.window_seq
				   AND e.seq OPERATOR(pg_catalog.<=) l.window_last_seq
				   AND NOT pg_catalog.pg_visible_in_snapshot(e.xact_id, l.window_start)
				   AND pg_catalog.pg_visible_in_snapshot(e.xact_id, l.window_end)
				   AND (sub.event_types IS NULL OR e.event_type OPERATOR(pg_catalog.=) ANY (sub.event_types))
				   AND task_events._lane_of(e.aggregate_id, sub.lanes) OPERATOR(pg_catalog.=) l.lane
				 ORDER BY e.seq LIMIT max_events)),
			u AS (
				UPDATE task_events.subscription_lanes x
				SET window_start = l.window_start, window_end = l.window_end,
					window_seq = l.window_seq, window_last_seq = l.window_last_seq,
					batch_id = pg_catalog.nextval('task_events.subscription_batch_seq'),
					batch_retries = retries,
					batch_first_seq = (SELECT pg_catalog.min(b.seq) FROM b),
					batch_last_seq = (SELECT pg_catalog.max(b.seq) FROM b),
					batch_size = (SELECT pg_catalog.count(*) FROM b),
					leased_until = pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) lease,
					served_at = pg_catalog.clock_timestamp()
				WHERE x.subscription OPERATOR(pg_catalog.=) l.subscription
				  AND x.lane OPERATOR(pg_catalog.=) l.lane AND EXISTS (SELECT FROM b)
				RETURNING x.batch_id)
			SELECT (SELECT u.batch_id FROM u), l.lane, b.seq, b.event_id, b.event_type, b.event_version, b.aggregate_id,
				   b.aggregate_version, b.occurred_at, b.user_id, b.payload
			FROM b;
			IF FOUND THEN
				RETURN;
			END IF;
			IF NOT retries THEN
				-- The window holds nothing more for this lane: close it.
				l.window_start := l.window_end;
				l.window_end := NULL;
				l.window_seq := 0;
				l.window_last_seq := 0;
			END IF;
		END LOOP;

		UPDATE task_events.subscription_lanes x
		SET window_start = l.window_start, window_end = l.window_end,
			window_seq = l.window_seq, window_last_seq = l.window_last_seq
		WHERE x.subscription OPERATOR(pg_catalog.=) l.subscription AND x.lane OPERATOR(pg_catalog.=) l.lane;
	END LOOP;
END
$$;

CREATE FUNCTION task_events.read_batch(subscription text, max_events int DEFAULT 1000,
	lease interval DEFAULT '30 seconds')
	RETURNS TABLE (batch_id bigint, lane int, seq bigint, event_id uuid, event_type text,
				   event_version int, aggregate_id uuid, aggregate_version bigint,
				   occurred_at timestamptz, user_id text, payload jsonb)
	LANGUAGE sql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS $$
	SELECT * FROM task_events._read_batch($1, NULL, $2, $3)
$$;

/*
 * read_lane: read_batch for one lane only, for a consumer that owns a lane
 * (task_events_consume --lane).  22023 for a lane the subscription does not
 * have, 22004 for a NULL one.
 */
CREATE FUNCTION task_events.read_lane(subscription text, from_lane int, max_events int DEFAULT 1000,
	lease interval DEFAULT '30 seconds')
	RETURNS TABLE (batch_id bigint, lane int, seq bigint, event_id uuid, event_type text,
				   event_version int, aggregate_id uuid, aggregate_version bigint,
				   occurred_at timestamptz, user_id text, payload jsonb)
	LANGUAGE plpgsql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS $$
BEGIN
	IF read_lane.from_lane IS NULL THEN
		RAISE EXCEPTION 'from_lane must not be null'
			USING ERRCODE = 'null_value_not_allowed';
	END IF;
	RETURN QUERY SELECT * FROM task_events._read_batch(read_lane.subscription, read_lane.from_lane,
													   read_lane.max_events, read_lane.lease);
END
$$;

/* The lane holding batch batch_id of the subscription, locked; 55000 when none. */
CREATE FUNCTION task_events._leased_lane(subscription text, batch_id bigint)
	RETURNS task_events.subscription_lanes
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
DECLARE
	l task_events.subscription_lanes;
BEGIN
	PERFORM task_events._require_subscription(_leased_lane.subscription);
	IF _leased_lane.batch_id IS NULL THEN
		RAISE EXCEPTION 'batch_id must not be null'
			USING ERRCODE = 'null_value_not_allowed';
	END IF;
	SELECT * INTO l FROM task_events.subscription_lanes x
	WHERE x.subscription OPERATOR(pg_catalog.=) _leased_lane.subscription
	  AND x.batch_id OPERATOR(pg_catalog.=) _leased_lane.batch_id
	FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'batch % of subscription "%" is not leased', _leased_lane.batch_id, _leased_lane.subscription
			USING ERRCODE = 'object_not_in_prerequisite_state',
				  DETAIL = 'It was acknowledged or nacked already, or its lease expired and the lane was read again, or it never existed.';
	END IF;
	RETURN l;
END
$$;

/* The seqs of the events lane l has leased, in order. */
CREATE FUNCTION task_events._batch_seqs(l task_events.subscription_lanes)
	RETURNS SETOF bigint
	LANGUAGE sql STABLE
	SET search_path = pg_catalog, pg_temp
	AS $$
	SELECT d.seq FROM task_events.subscription_dead_letters d
	WHERE l.batch_retries
	  AND d.subscription OPERATOR(pg_catalog.=) l.subscription AND d.lane OPERATOR(pg_catalog.=) l.lane
	  AND d.retry_requested
	  AND d.seq OPERATOR(pg_catalog.>=) l.batch_first_seq AND d.seq OPERATOR(pg_catalog.<=) l.batch_last_seq
	UNION ALL
	SELECT e.seq FROM task_events.events e, task_events.subscriptions s
	WHERE NOT l.batch_retries
	  AND s.subscription OPERATOR(pg_catalog.=) l.subscription
	  AND e.seq OPERATOR(pg_catalog.>=) l.batch_first_seq AND e.seq OPERATOR(pg_catalog.<=) l.batch_last_seq
	  AND NOT pg_catalog.pg_visible_in_snapshot(e.xact_id, l.window_start)
	  AND pg_catalog.pg_visible_in_snapshot(e.xact_id, l.window_end)
	  AND (s.event_types IS NULL OR e.event_type OPERATOR(pg_catalog.=) ANY (s.event_types))
	  AND task_events._lane_of(e.aggregate_id, s.lanes) OPERATOR(pg_catalog.=) l.lane
	ORDER BY 1
$$;

/*
 * Acknowledge the events of lane l's batch up to seq upto (NULL: none),
 * acked of them, and end the lease.  The lane's position moves past them;
 * retried dead letters are deleted instead.
 */
CREATE FUNCTION task_events._acknowledge(l task_events.subscription_lanes, upto bigint, acked bigint)
	RETURNS void
	LANGUAGE sql
	SET search_path = pg_catalog, pg_temp
	AS $$
	DELETE FROM task_events.subscription_dead_letters d
	WHERE l.batch_retries AND upto IS NOT NULL
	  AND d.subscription OPERATOR(pg_catalog.=) l.subscription AND d.lane OPERATOR(pg_catalog.=) l.lane
	  AND d.retry_requested
	  AND d.seq OPERATOR(pg_catalog.>=) l.batch_first_seq AND d.seq OPERATOR(pg_catalog.<=) upto;
	UPDATE task_events.subscription_lanes x
	SET window_seq = CASE WHEN upto IS NOT NULL AND NOT l.batch_retries THEN upto ELSE x.window_seq END,
		last_seq = CASE WHEN upto IS NOT NULL AND NOT l.batch_retries THEN GREATEST(x.last_seq, upto)
					ELSE x.last_seq END,
		acknowledged = x.acknowledged OPERATOR(pg_catalog.+) acked,
		batch_id = NULL, batch_first_seq = NULL, batch_last_seq = NULL, batch_size = NULL,
		batch_retries = false, leased_until = NULL
	WHERE x.subscription OPERATOR(pg_catalog.=) l.subscription AND x.lane OPERATOR(pg_catalog.=) l.lane;
$$;

/*
 * ack_batch: the batch's events are done.  Called in the transaction of the
 * consumer's own writes in this database, exactly once; outside, at least
 * once (event_id is the idempotency key).  55000 when the batch is not
 * leased.
 */
CREATE FUNCTION task_events.ack_batch(subscription text, batch_id bigint)
	RETURNS bigint
	LANGUAGE plpgsql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS $$
DECLARE
	l task_events.subscription_lanes;
	acked bigint;
BEGIN
	-- The usual batch (not retried dead letters), in one statement.
	WITH leased AS (
		SELECT x.lane, x.batch_size FROM task_events.subscription_lanes x
		WHERE x.subscription OPERATOR(pg_catalog.=) ack_batch.subscription
		  AND x.batch_id OPERATOR(pg_catalog.=) ack_batch.batch_id AND NOT x.batch_retries
		FOR UPDATE)
	UPDATE task_events.subscription_lanes x
	SET window_seq = x.batch_last_seq, last_seq = GREATEST(x.last_seq, x.batch_last_seq),
		acknowledged = x.acknowledged OPERATOR(pg_catalog.+) x.batch_size,
		batch_id = NULL, batch_first_seq = NULL, batch_last_seq = NULL, batch_size = NULL,
		leased_until = NULL, attempts = 0, retry_at = NULL
	FROM leased
	WHERE x.subscription OPERATOR(pg_catalog.=) ack_batch.subscription
	  AND x.lane OPERATOR(pg_catalog.=) leased.lane
	RETURNING leased.batch_size INTO acked;
	IF FOUND THEN
		RETURN acked;
	END IF;

	-- Retried dead letters, or the errors.
	l := task_events._leased_lane(ack_batch.subscription, ack_batch.batch_id);
	PERFORM task_events._acknowledge(l, l.batch_last_seq, l.batch_size);
	RETURN l.batch_size;
END
$$;

/*
 * A failed batch (nack_batch, dead_letter_event).  With failed_event_id, the
 * events before it are acknowledged and the attempt is that event's; without,
 * the whole batch's.  The lane is offered again after the backoff
 * (retry_delay, doubling); after max_attempts, or at once with
 * dead_letter_now, the event (or the whole batch) goes to
 * subscription_dead_letters and the lane moves past it.  A failed retry of
 * dead letters puts them back, counting the attempt.
 */
CREATE FUNCTION task_events._nack(subscription text, batch_id bigint,
	failed_event_id uuid, error text, dead_letter_now boolean)
	RETURNS void
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
DECLARE
	l task_events.subscription_lanes := task_events._leased_lane(_nack.subscription, _nack.batch_id);
	failed_seq bigint;
	before bigint;
	max_attempts int := COALESCE(pg_catalog.current_setting('task_events.max_attempts', true), '5')::int;
	new_attempts int;
BEGIN
	IF failed_event_id IS NOT NULL THEN
		SELECT e.seq INTO failed_seq FROM task_events.events e
		WHERE e.event_id OPERATOR(pg_catalog.=) _nack.failed_event_id
		  AND e.seq OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT task_events._batch_seqs(l)));
		IF failed_seq IS NULL THEN
			RAISE EXCEPTION 'event % is not in batch % of subscription "%"',
				failed_event_id, _nack.batch_id, _nack.subscription
				USING ERRCODE = 'invalid_parameter_value';
		END IF;
	END IF;

	IF l.batch_retries THEN
		-- Retried dead letters: those before the failed one are done, the
		-- failed one (or all) go back, one more attempt counted.
		IF failed_seq IS NOT NULL THEN
			SELECT pg_catalog.count(*) INTO before FROM task_events._batch_seqs(l) s
			WHERE s OPERATOR(pg_catalog.<) failed_seq;
			PERFORM task_events._acknowledge(l, failed_seq OPERATOR(pg_catalog.-) 1, before);
		ELSE
			PERFORM task_events._acknowledge(l, NULL, 0);
		END IF;
		UPDATE task_events.subscription_dead_letters d
		SET retry_requested = false, attempts = d.attempts OPERATOR(pg_catalog.+) 1,
			message = _nack.error, failed_at = pg_catalog.clock_timestamp()
		WHERE d.subscription OPERATOR(pg_catalog.=) l.subscription AND d.lane OPERATOR(pg_catalog.=) l.lane
		  AND d.retry_requested
		  AND d.seq OPERATOR(pg_catalog.>=) COALESCE(failed_seq, l.batch_first_seq)
		  AND d.seq OPERATOR(pg_catalog.<=) CASE WHEN failed_seq IS NULL THEN l.batch_last_seq ELSE failed_seq END;
		UPDATE task_events.subscription_lanes x
		SET failed = x.failed OPERATOR(pg_catalog.+) 1, last_error = _nack.error,
			last_error_at = pg_catalog.clock_timestamp()
		WHERE x.subscription OPERATOR(pg_catalog.=) l.subscription AND x.lane OPERATOR(pg_catalog.=) l.lane;
		RETURN;
	END IF;

	-- The events before the failed one are done: the lane's next batch
	-- starts at the failed event, and the attempts count starts there.
	IF failed_seq IS NOT NULL AND failed_seq OPERATOR(pg_catalog.>) l.batch_first_seq THEN
		SELECT pg_catalog.count(*) INTO before FROM task_events._batch_seqs(l) s
		WHERE s OPERATOR(pg_catalog.<) failed_seq;
		PERFORM task_events._acknowledge(l, failed_seq OPERATOR(pg_catalog.-) 1, before);
		new_attempts := 1;
	ELSE
		PERFORM task_events._acknowledge(l, NULL, 0);
		new_attempts := l.attempts OPERATOR(pg_catalog.+) 1;
	END IF;

	IF dead_letter_now OR new_attempts OPERATOR(pg_catalog.>=) max_attempts THEN
		-- Out of attempts, or given up: dead letters, and the lane moves past them.
		INSERT INTO task_events.subscription_dead_letters
			(subscription, seq, lane, event_id, attempts, message, failed_at)
		SELECT l.subscription, e.seq, l.lane, e.event_id, new_attempts, _nack.error, pg_catalog.clock_timestamp()
		FROM task_events.events e
		WHERE e.seq OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT task_events._batch_seqs(l)))
		  AND e.seq OPERATOR(pg_catalog.>=) COALESCE(failed_seq, l.batch_first_seq)
		  AND e.seq OPERATOR(pg_catalog.<=) COALESCE(failed_seq, l.batch_last_seq)
		ON CONFLICT DO NOTHING;
		UPDATE task_events.subscription_lanes x
		SET window_seq = COALESCE(failed_seq, l.batch_last_seq),
			last_seq = GREATEST(x.last_seq, COALESCE(failed_seq, l.batch_last_seq)),
			attempts = 0, retry_at = NULL
		WHERE x.subscription OPERATOR(pg_catalog.=) l.subscription AND x.lane OPERATOR(pg_catalog.=) l.lane;
	ELSE
		UPDATE task_events.subscription_lanes x
		SET attempts = new_attempts, retry_at = task_events._retry_time(new_attempts)
		WHERE x.subscription OPERATOR(pg_catalog.=) l.subscription AND x.lane OPERATOR(pg_catalog.=) l.lane;
	END IF;
	UPDATE task_events.subscription_lanes x
	SET failed = x.failed OPERATOR(pg_catalog.+) 1, last_error = _nack.error,
		last_error_at = pg_catalog.clock_timestamp()
	WHERE x.subscription OPERATOR(pg_catalog.=) l.subscription AND x.lane OPERATOR(pg_catalog.=) l.lane;
END
$$;

/*
 * nack_batch: the consumer failed and the event (or the batch) is worth
 * retrying.  dead_letter_event: the consumer knows that retrying is useless
 * (a webhook's 4xx answer): the events before it are acknowledged and the
 * event goes to the dead letters at once.
 */
CREATE FUNCTION task_events.nack_batch(subscription text, batch_id bigint,
	failed_event_id uuid DEFAULT NULL, error text DEFAULT NULL)
	RETURNS void
	LANGUAGE sql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS $$ SELECT task_events._nack($1, $2, $3, $4, false) $$;

CREATE FUNCTION task_events.dead_letter_event(subscription text, batch_id bigint,
	event_id uuid, error text DEFAULT NULL)
	RETURNS void
	LANGUAGE plpgsql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS $$
BEGIN
	IF dead_letter_event.event_id IS NULL THEN
		RAISE EXCEPTION 'event_id must not be null'
			USING ERRCODE = 'null_value_not_allowed';
	END IF;
	PERFORM task_events._nack(dead_letter_event.subscription, dead_letter_event.batch_id,
		dead_letter_event.event_id, dead_letter_event.error, true);
END
$$;

/*
 * Monitoring: one row per subscription lane.  events_behind counts the
 * events of the lane (its tasks, the subscription's types) not yet
 * acknowledged, the leased batch included.
 */
/*
 * How many events of a lane are not acknowledged yet, and since when: the
 * twin of handler_backlog (SECURITY DEFINER, for the same reason: the view's
 * readers may not read the log).
 */
CREATE FUNCTION task_events.subscription_backlog(subscription text, lane int,
	OUT events_behind bigint, OUT oldest_unhandled timestamptz)
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS $$
	SELECT pg_catalog.count(*), pg_catalog.min(w.occurred_at)
	FROM task_events.subscription_lanes l
	JOIN task_events.subscriptions s ON s.subscription OPERATOR(pg_catalog.=) l.subscription
	CROSS JOIN LATERAL task_events._unhandled_events(l.window_start, l.window_end, l.window_seq) w
	WHERE l.subscription OPERATOR(pg_catalog.=) $1 AND l.lane OPERATOR(pg_catalog.=) $2
	  AND (s.event_types IS NULL OR w.event_type OPERATOR(pg_catalog.=) ANY (s.event_types))
	  AND task_events._lane_of(w.aggregate_id, s.lanes) OPERATOR(pg_catalog.=) l.lane
	$$ LANGUAGE sql STABLE;
COMMENT ON FUNCTION task_events.subscription_backlog(text, int) IS
	'Events of a subscription lane not yet acknowledged, and the oldest one''s time';

CREATE VIEW task_events.subscription_status AS
SELECT l.subscription,
	   l.lane,
	   l.last_seq AS position,
	   b.events_behind,
	   COALESCE(pg_catalog.date_part('epoch', pg_catalog.now() OPERATOR(pg_catalog.-) b.oldest_unhandled), 0)
		   AS seconds_behind,
	   l.batch_id,
	   l.batch_size,
	   l.leased_until,
	   l.acknowledged,
	   l.failed,
	   (SELECT pg_catalog.count(*) FROM task_events.subscription_dead_letters d
		WHERE d.subscription OPERATOR(pg_catalog.=) l.subscription
		  AND d.lane OPERATOR(pg_catalog.=) l.lane) AS dead_letters,
	   l.attempts AS retry_attempts,
	   l.retry_at,
	   l.last_error,
	   l.last_error_at
FROM task_events.subscription_lanes l
CROSS JOIN LATERAL task_events.subscription_backlog(l.subscription, l.lane) AS b;
COMMENT ON VIEW task_events.subscription_status IS
	'Per subscription lane: position, lag, the leased batch, acknowledged, failed and dead-lettered counts, the last error';

/*
 * retry_dead_letters() works for subscriptions too: the 1.0 function (C,
 * handlers' dead letters) keeps its code under an internal name.
 */
ALTER FUNCTION task_events.retry_dead_letters(text) RENAME TO _retry_handler_dead_letters;
COMMENT ON FUNCTION task_events._retry_handler_dead_letters(text) IS
	'Internal: queues handlers'' dead letters for one more attempt (retry_dead_letters)';
CREATE FUNCTION task_events.retry_dead_letters(handler text DEFAULT NULL)
	RETURNS bigint
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	AS $$
DECLARE
	queued bigint := 0;
BEGIN
	IF handler IS NULL OR NOT EXISTS (SELECT FROM task_events.subscriptions s
									  WHERE s.subscription OPERATOR(pg_catalog.=) retry_dead_letters.handler) THEN
		queued := task_events._retry_handler_dead_letters(handler);
	END IF;
	IF handler IS NULL OR EXISTS (SELECT FROM task_events.subscriptions s
								  WHERE s.subscription OPERATOR(pg_catalog.=) retry_dead_letters.handler) THEN
		UPDATE task_events.subscription_dead_letters d SET retry_requested = true
		WHERE (handler IS NULL OR d.subscription OPERATOR(pg_catalog.=) retry_dead_letters.handler)
		  AND NOT d.retry_requested;
		queued := queued OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM task_events.subscription_dead_letters d
				  WHERE (handler IS NULL OR d.subscription OPERATOR(pg_catalog.=) retry_dead_letters.handler)
					AND d.retry_requested);
	END IF;
	RETURN queued;
END
$$;
COMMENT ON FUNCTION task_events.retry_dead_letters(text) IS
	'Queues the dead letters of a handler or a subscription (NULL: all) for one more attempt; returns how many';

/*
 * The name of a handler lane's position for adopt_restored_log: the
 * handler's for lane 0, '<handler>:<lane>' for the others, and
 * '<handler>:barrier' (lane -1) for the barrier of a change of its lanes.
 */
CREATE FUNCTION task_events._position_name(handler text, lane int)
	RETURNS text
	LANGUAGE sql IMMUTABLE
	SET search_path = pg_catalog, pg_temp
	AS $$
	SELECT CASE WHEN $2 OPERATOR(pg_catalog.=) 0 THEN $1
				WHEN $2 OPERATOR(pg_catalog.<) 0 THEN $1 OPERATOR(pg_catalog.||) ':barrier'
				ELSE $1 OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) $2 END
$$;
REVOKE ALL ON FUNCTION task_events._position_name(text, int) FROM PUBLIC;
COMMENT ON FUNCTION task_events._position_name(text, int) IS
	'Internal: the name of a handler lane''s position (adopt_restored_log)';

/*
 * Every position in the log, named: the handlers' lanes' and barriers'
 * (_position_name) and the subscription lanes' ('subscription:<name>:<lane>'),
 * for adopt_restored_log.
 */
CREATE FUNCTION task_events._positions(OUT name text, OUT window_start pg_catalog.pg_snapshot,
	OUT window_end pg_catalog.pg_snapshot, OUT window_seq bigint)
	RETURNS SETOF record
	LANGUAGE sql STABLE
	SET search_path = pg_catalog, pg_temp
	AS $$
	SELECT task_events._position_name(s.handler, s.lane), s.window_start, s.window_end, s.window_seq
	FROM task_events.handler_state s
	WHERE s.lane OPERATOR(pg_catalog.<) s.lanes
	UNION ALL
	SELECT task_events._position_name(s.handler, -1), s.lanes_barrier, NULL, 0
	FROM task_events.handler_state s
	WHERE s.lane OPERATOR(pg_catalog.=) 0 AND s.lanes_barrier IS NOT NULL
	UNION ALL
	SELECT 'subscription:' OPERATOR(pg_catalog.||) l.subscription OPERATOR(pg_catalog.||) ':'
		   OPERATOR(pg_catalog.||) l.lane, l.window_start, l.window_end, l.window_seq
	FROM task_events.subscription_lanes l
$$;
COMMENT ON FUNCTION task_events._positions() IS
	'Internal: every handler''s and subscription lane''s position (adopt_restored_log)';

/*
 * The start snapshot of position name once adopt_restored_log has rewritten
 * the event ids (te_pattern: one id per set of positions that had not
 * handled an event): every id whose set names it is in progress.
 */
CREATE FUNCTION task_events._adopted_snapshot(name text, top_xid bigint)
	RETURNS pg_catalog.pg_snapshot
	LANGUAGE plpgsql STABLE
	SET search_path = pg_catalog, pg_temp
	AS $$
BEGIN
	-- plpgsql: te_pattern exists only while adopt_restored_log runs.
	RETURN pg_catalog.format('3:%s:%s', top_xid OPERATOR(pg_catalog.+) 1,
			COALESCE((SELECT pg_catalog.string_agg(t.xid::pg_catalog.text, ',' ORDER BY t.xid)
					  FROM pg_temp.te_pattern t
					  WHERE _adopted_snapshot.name OPERATOR(pg_catalog.=) ANY (t.pending)), ''))::pg_catalog.pg_snapshot;
END
$$;
COMMENT ON FUNCTION task_events._adopted_snapshot(text, bigint) IS
	'Internal: a position''s start snapshot after adopt_restored_log rewrote the ids';

REVOKE ALL ON FUNCTION task_events._positions(), task_events._adopted_snapshot(text, bigint) FROM PUBLIC;

/*
 * Privileges.  task_events_consumer reads, acknowledges and nacks batches
 * and watches subscription_status; creating and dropping subscriptions is
 * for superusers and the extension's owner.
 */
DO $$
BEGIN
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'task_events_consumer') THEN
		BEGIN
			CREATE ROLE task_events_consumer NOLOGIN;
		EXCEPTION WHEN duplicate_object OR unique_violation THEN
			NULL;			/* created meanwhile, for another database */
		END;
	END IF;
END
$$;
REVOKE ALL ON TABLE task_events.subscriptions, task_events.subscription_lanes,
	task_events.subscription_dead_letters, task_events.subscription_status FROM PUBLIC;
REVOKE ALL ON SEQUENCE task_events.subscription_batch_seq FROM PUBLIC;
REVOKE ALL ON FUNCTION
	task_events._window_snapshot(),
	task_events._check_subscription_name(text),
	task_events._require_subscription(text),
	task_events.create_subscription(text, text[], text, int),
	task_events.drop_subscription(text),
	task_events.subscriptions_handler(task_events.events[]),
	task_events._subscriptions_wakeup_handler(),
	task_events._lane_of(uuid, int),
	task_events._retry_time(int),
	task_events._read_batch(text, int, int, interval),
	task_events.read_batch(text, int, interval),
	task_events.read_lane(text, int, int, interval),
	task_events._leased_lane(text, bigint),
	task_events._batch_seqs(task_events.subscription_lanes),
	task_events._acknowledge(task_events.subscription_lanes, bigint, bigint),
	task_events.ack_batch(text, bigint),
	task_events._nack(text, bigint, uuid, text, boolean),
	task_events.nack_batch(text, bigint, uuid, text),
	task_events.dead_letter_event(text, bigint, uuid, text),
	task_events.retry_dead_letters(text)
	FROM PUBLIC;
GRANT USAGE ON SCHEMA task_events TO task_events_consumer;
GRANT EXECUTE ON FUNCTION
	task_events.read_batch(text, int, interval),
	task_events.read_lane(text, int, int, interval),
	task_events.ack_batch(text, bigint),
	task_events.nack_batch(text, bigint, uuid, text),
	task_events.dead_letter_event(text, bigint, uuid, text)
	TO task_events_consumer;
GRANT SELECT ON task_events.subscription_status TO task_events_consumer, task_events_reader;
REVOKE ALL ON FUNCTION task_events.subscription_backlog(text, int) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION task_events.subscription_backlog(text, int)
	TO task_events_consumer, task_events_reader;

COMMENT ON FUNCTION task_events.create_subscription(text, text[], text, int) IS
	'Creates a subscription: a durable consumer position per lane, from now or from the beginning of the log';
COMMENT ON FUNCTION task_events.drop_subscription(text) IS
	'Drops a subscription with its positions and dead letters';
COMMENT ON FUNCTION task_events.read_batch(text, int, interval) IS
	'Leases the next events of a free lane of the subscription; empty when nothing is ready';
COMMENT ON FUNCTION task_events.read_lane(text, int, int, interval) IS
	'Leases the next events of one lane of the subscription; empty when nothing is ready or it is leased';
COMMENT ON FUNCTION task_events._read_batch(text, int, int, interval) IS
	'Internal: read_batch and read_lane';
COMMENT ON FUNCTION task_events.ack_batch(text, bigint) IS
	'Acknowledges a leased batch: the lane moves past it; returns how many events';
COMMENT ON FUNCTION task_events.nack_batch(text, bigint, uuid, text) IS
	'Reports a failed batch (or the event that failed in it): retried after a backoff, dead-lettered after max_attempts';
COMMENT ON FUNCTION task_events.dead_letter_event(text, bigint, uuid, text) IS
	'Reports an event of a batch that retrying cannot mend: the events before it are acknowledged, it goes to the dead letters at once';
COMMENT ON FUNCTION task_events._nack(text, bigint, uuid, text, boolean) IS 'Internal: nack_batch and dead_letter_event';
COMMENT ON FUNCTION task_events._check_subscription_name(text) IS 'Internal: validates a subscription name';
COMMENT ON FUNCTION task_events._require_subscription(text) IS 'Internal: the subscription''s row, or 42704';
COMMENT ON FUNCTION task_events._subscriptions_wakeup_handler() IS 'Internal: registers or removes the subscriptions handler';
COMMENT ON FUNCTION task_events._lane_of(uuid, int) IS 'Internal: the lane of a task''s events';
COMMENT ON FUNCTION task_events._retry_time(int) IS 'Internal: when the next attempt is due after n failures';
COMMENT ON FUNCTION task_events._leased_lane(text, bigint) IS 'Internal: the lane holding a leased batch, or 55000';
COMMENT ON FUNCTION task_events._batch_seqs(task_events.subscription_lanes) IS 'Internal: the seqs of a lane''s leased batch';
COMMENT ON FUNCTION task_events._acknowledge(task_events.subscription_lanes, bigint, bigint) IS 'Internal: moves a lane past acknowledged events';

/*
 * Metrics for Prometheus (docs/operations.md, "Prometheus"): one row per
 * sample, named as the series contrib/prometheus/queries.yaml exposes
 * through postgres_exporter, labels as a jsonb object of strings.  Three
 * families, each computed only when asked for (family NULL: all):
 * - handler: handler_status's lag, counts, retry state and pause, per handler;
 * - subscription: subscription_status's, per subscription lane;
 * - published: the events per type.  Counting the log is a scan of all of it
 *   at every scrape, too slow on a big log: the total is the planner's
 *   estimate (rows per page at the last ANALYZE times the pages now, times
 *   the type's share of the last ANALYZE's sample: exact after an ANALYZE of
 *   a small log, on a big one off by the sampling error and the drift since
 *   the last ANALYZE), and the last minute is counted exactly
 *   (event_rates: the BRIN index on occurred_at reads only the last pages).
 * SECURITY DEFINER: its callers (pg_monitor, the exporter's role) may read
 * neither the log nor the statistics.
 */
CREATE FUNCTION task_events.metrics(family text DEFAULT NULL,
	OUT metric text, OUT labels jsonb, OUT value double precision)
	RETURNS SETOF record
	LANGUAGE plpgsql STABLE
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS $$
BEGIN
	IF metrics.family OPERATOR(pg_catalog.<>) ALL ('{handler,subscription,published}'::pg_catalog.text[]) THEN
		RAISE EXCEPTION 'unknown metric family "%"', metrics.family
			USING ERRCODE = 'invalid_parameter_value',
				  DETAIL = 'The families are handler, subscription and published; NULL gives them all.';
	END IF;

	IF metrics.family IS NULL OR metrics.family OPERATOR(pg_catalog.=) 'handler' THEN
		RETURN QUERY
		SELECT 'task_events_handler_' OPERATOR(pg_catalog.||) m.name,
			   pg_catalog.jsonb_build_object('handler', h.handler), m.v
		FROM task_events.handler_status h
		CROSS JOIN LATERAL (VALUES
			(1, 'events_behind', h.events_behind::pg_catalog.float8),
			(2, 'seconds_behind', h.seconds_behind),
			(3, 'processed_total', h.processed::pg_catalog.float8),
			(4, 'failed_total', h.failed::pg_catalog.float8),
			(5, 'dead_letters', h.dead_letters::pg_catalog.float8),
			(6, 'retry_attempts', COALESCE(h.retry_attempts, 0)::pg_catalog.float8),
			(7, 'retrying', CASE WHEN h.retry_attempts OPERATOR(pg_catalog.>) 0 THEN 1 ELSE 0 END::pg_catalog.float8),
			(8, 'paused', CASE WHEN h.paused THEN 1 ELSE 0 END::pg_catalog.float8)) AS m(n, name, v)
		ORDER BY h.handler, m.n;
	END IF;

	IF metrics.family IS NULL OR metrics.family OPERATOR(pg_catalog.=) 'subscription' THEN
		RETURN QUERY
		SELECT 'task_events_subscription_' OPERATOR(pg_catalog.||) m.name,
			   pg_catalog.jsonb_build_object('subscription', s.subscription, 'lane', s.lane::pg_catalog.text), m.v
		FROM task_events.subscription_status s
		CROSS JOIN LATERAL (VALUES
			(1, 'events_behind', s.events_behind::pg_catalog.float8),
			(2, 'seconds_behind', s.seconds_behind),
			(3, 'acknowledged_total', s.acknowledged::pg_catalog.float8),
			(4, 'failed_total', s.failed::pg_catalog.float8),
			(5, 'dead_letters', s.dead_letters::pg_catalog.float8),
			(6, 'retry_attempts', s.retry_attempts::pg_catalog.float8),
			(7, 'retrying', CASE WHEN s.retry_attempts OPERATOR(pg_catalog.>) 0 THEN 1 ELSE 0 END::pg_catalog.float8))
			AS m(n, name, v)
		ORDER BY s.subscription, s.lane, m.n;
	END IF;

	IF metrics.family IS NULL OR metrics.family OPERATOR(pg_catalog.=) 'published' THEN
		-- The estimate: only once the log was analyzed, for the types in its sample.
		RETURN QUERY
		SELECT 'task_events_published_estimate',
			   pg_catalog.jsonb_build_object('event_type', t.event_type),
			   pg_catalog.round(t.freq::pg_catalog.float8 OPERATOR(pg_catalog.*) CASE
					WHEN c.relpages OPERATOR(pg_catalog.>) 0
					THEN c.reltuples::pg_catalog.float8 OPERATOR(pg_catalog./) c.relpages::pg_catalog.float8
						 OPERATOR(pg_catalog.*) (pg_catalog.pg_relation_size(c.oid)
							 OPERATOR(pg_catalog./) pg_catalog.current_setting('block_size')::pg_catalog.int8)::pg_catalog.float8
					ELSE c.reltuples::pg_catalog.float8 END)
		FROM pg_catalog.pg_class c
		JOIN pg_catalog.pg_stats st ON st.schemaname OPERATOR(pg_catalog.=) 'task_events'
			 AND st.tablename OPERATOR(pg_catalog.=) 'events' AND st.attname OPERATOR(pg_catalog.=) 'event_type'
			 AND NOT st.inherited
		CROSS JOIN LATERAL ROWS FROM (pg_catalog.unnest(st.most_common_vals::pg_catalog.text::pg_catalog.text[]),
									  pg_catalog.unnest(st.most_common_freqs)) AS t(event_type, freq)
		WHERE c.oid OPERATOR(pg_catalog.=) 'task_events.events'::pg_catalog.regclass
		  AND c.reltuples OPERATOR(pg_catalog.>=) 0
		ORDER BY t.event_type;
		RETURN QUERY
		SELECT 'task_events_published_last_minute',
			   pg_catalog.jsonb_build_object('event_type', t.event_type),
			   COALESCE(r.last_minute, 0)::pg_catalog.float8
		FROM pg_catalog.unnest('{TaskCreated,TaskStatusChanged,TaskCompleted}'::pg_catalog.text[]) AS t(event_type)
		LEFT JOIN task_events.event_rates r ON r.event_type OPERATOR(pg_catalog.=) t.event_type
		ORDER BY t.event_type;
	END IF;
END
$$;
REVOKE ALL ON FUNCTION task_events.metrics(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION task_events.metrics(text) TO task_events_reader, pg_monitor;
GRANT USAGE ON SCHEMA task_events TO pg_monitor;
COMMENT ON FUNCTION task_events.metrics(text) IS
	'Metrics for Prometheus, one row per sample (metric, labels, value): handlers, subscription lanes, events published per type';
