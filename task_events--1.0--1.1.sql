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
 * How many events a handler has not handled yet: the SQL twin of
 * TE_WINDOW_EVENTS (src/include/commit_horizon.h).  An event is not yet
 * handled when its transaction was in progress in the position's
 * window_start or is at or past its xmax, which events_xact_id_idx finds by
 * those ids and that range: the cost is the backlog, not the events written
 * since a long transaction began.
 */
CREATE OR REPLACE FUNCTION task_events.handler_backlog(handler text,
	OUT events_behind bigint, OUT oldest_unhandled timestamptz)
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS $$
	SELECT pg_catalog.count(*), pg_catalog.min(w.occurred_at)
	FROM (SELECT COALESCE(s.window_start, '1:1:'::pg_catalog.pg_snapshot) AS ws,
				 s.window_end AS we, COALESCE(s.window_seq, 0) AS wseq
		  FROM (SELECT $1 AS handler) AS h
		  LEFT JOIN task_events.handler_state s ON s.handler OPERATOR(pg_catalog.=) h.handler) AS p
	CROSS JOIN LATERAL (
		SELECT e.seq, e.xact_id, e.occurred_at FROM task_events.events e
		WHERE e.xact_id OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT pg_catalog.pg_snapshot_xip(p.ws)))
		UNION ALL
		SELECT e.seq, e.xact_id, e.occurred_at FROM task_events.events e
		WHERE e.xact_id OPERATOR(pg_catalog.>=) pg_catalog.pg_snapshot_xmax(p.ws)) AS w
	WHERE NOT (p.we IS NOT NULL
			   AND pg_catalog.pg_visible_in_snapshot(w.xact_id, p.we)
			   AND w.seq OPERATOR(pg_catalog.<=) p.wseq)
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
