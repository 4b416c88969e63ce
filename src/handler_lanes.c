/*
 * handler_lanes.c
 *		A change of the number of lanes of a handler (set_handler_lanes()):
 *		the barrier each lane stops at, and the move of every lane to the
 *		new number once all are there.
 *
 * Each lane of a handler has a position of its own (its row of
 * task_events.handler_state, run by dispatch.c like a handler's), over the
 * events whose task _lane_of puts in it.  Lanes at different positions
 * cannot be split or merged, so set_handler_lanes() takes a snapshot, the
 * barrier, once no lane is past it, and each lane's windows end there
 * (dispatch.c, te_open_handler_window).  A lane at the barrier has handled
 * exactly the events of its lane visible in it: once every lane is there,
 * all of them can start again at the barrier, in the new number of lanes.
 * An event visible in the barrier was handled by exactly one old lane; one
 * that is not will be handled by exactly one new lane.
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"

#include "handler_state.h"
#include "spi_util.h"

static SPIPlanPtr te_lanes_ready_plan = NULL;
static SPIPlanPtr te_lanes_lock_plan = NULL;
static SPIPlanPtr te_change_lanes_plan = NULL;

/* Whether the pg_snapshots a and b are the same (their text forms). */
static bool
te_snapshot_equal(Datum a, Datum b)
{
	return strcmp(DatumGetCString(DirectFunctionCall1(pg_snapshot_out, a)),
				  DatumGetCString(DirectFunctionCall1(pg_snapshot_out, b))) == 0;
}

/*
 * Whether the lane has handled every event before the barrier of a change
 * of the lanes, and nothing after: no window open, its position at the
 * barrier.
 */
bool
te_at_barrier(const HandlerState *st)
{
	return st->lanes_barrier != (Datum) 0 && st->window.end == (Datum) 0 &&
		te_snapshot_equal(st->window.start, st->lanes_barrier);
}

/*
 * Whether every lane in effect of handler is at the barrier (the snapshot
 * barrier) with no retry or replay pending, and the rows of the number of
 * lanes asked for (*wanted) exist; *rows gets the handler's rows.  Read
 * with the snapshot of a new statement.
 */
static bool
te_lanes_ready(const char *handler, Datum barrier, int64 *rows, int32 *wanted)
{
	static const Oid argtypes[] = {TEXTOID, PG_SNAPSHOTOID};
	Datum		values[2];
	bool		isnull;
	int64		not_ready;

	te_prepare_kept(&te_lanes_ready_plan,
					"SELECT pg_catalog.count(*),"
					"       pg_catalog.count(*) FILTER (WHERE s.lane OPERATOR(pg_catalog.<) s.lanes AND NOT"
					"         COALESCE(s.window_end IS NULL AND s.failing_seq IS NULL"
					"                  AND s.replay_from_seq IS NULL"
					"                  AND s.window_start::pg_catalog.text OPERATOR(pg_catalog.=) $2::pg_catalog.text"
					"                  AND s.lanes_barrier::pg_catalog.text OPERATOR(pg_catalog.=) $2::pg_catalog.text,"
					"                  false)),"
					"       (SELECT h.lanes FROM task_events.handlers h WHERE h.handler OPERATOR(pg_catalog.=) $1)"
					" FROM task_events.handler_state s WHERE s.handler OPERATOR(pg_catalog.=) $1",
					lengthof(argtypes), argtypes);
	values[0] = CStringGetTextDatum(handler);
	values[1] = barrier;
	te_execute_kept(te_lanes_ready_plan, values, NULL, SPI_OK_SELECT);
	*rows = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	not_ready = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	*wanted = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3, &isnull));
	SPI_freetuptable(SPI_tuptable);
	return !isnull && not_ready == 0 && *rows >= *wanted;
}

/* Lock every row of handler that nobody else holds; returns how many. */
static int64
te_lock_lanes(const char *handler)
{
	static const Oid argtypes[] = {TEXTOID};
	Datum		values[1];
	bool		isnull;
	int64		locked;

	te_prepare_kept(&te_lanes_lock_plan,
					"SELECT pg_catalog.count(*) FROM (SELECT FROM task_events.handler_state s"
					"  WHERE s.handler OPERATOR(pg_catalog.=) $1 FOR UPDATE SKIP LOCKED) l",
					lengthof(argtypes), argtypes);
	values[0] = CStringGetTextDatum(handler);
	te_execute_kept(te_lanes_lock_plan, values, NULL, SPI_OK_SELECT);
	locked = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_freetuptable(SPI_tuptable);
	return locked;
}

/*
 * Move every lane of the handler to the number of lanes set_handler_lanes()
 * asked for, once every lane in effect is at the barrier with no retry or
 * replay pending: each has then handled exactly the events of its lane
 * visible in the barrier, so the new lanes all start there, and no event is
 * skipped or handled twice.  The lanes are first looked at without locks,
 * so that a lane waiting at the barrier does not keep the others from their
 * batches; then every row of the handler is locked at once (SKIP LOCKED: a
 * lane's batch or set_handler_lanes() holds the others, and a later batch
 * of a lane at the barrier tries again, the peek finding work for each lane
 * while the lanes change) and looked at again with a newer snapshot, which
 * sees whatever set_handler_lanes() committed before the locks (a later one
 * waits for them).  Returns whether the lanes changed.  Assumes st's row is
 * locked and saved, in the batch's transaction.
 */
bool
te_try_change_lanes(HandlerState *st)
{
	static const Oid change_types[] = {TEXTOID, INT4OID, PG_SNAPSHOTOID};
	Datum		values[3];
	int64		rows;
	int32		wanted;

	if (!te_lanes_ready(st->handler, st->lanes_barrier, &rows, &wanted) ||
		te_lock_lanes(st->handler) != rows ||
		!te_lanes_ready(st->handler, st->lanes_barrier, &rows, &wanted))
		return false;
	/* Rows committed meanwhile were not locked: a later batch tries again. */
	if (te_lock_lanes(st->handler) != rows)
		return false;

	te_prepare_kept(&te_change_lanes_plan,
					"UPDATE task_events.handler_state SET"
					" lanes = $2, lanes_barrier = NULL,"
					" window_start = $3, window_end = NULL, window_seq = 0,"
					" failing_seq = NULL, attempts = 0, retry_at = NULL, isolate_through = 0,"
					" replay_from_seq = NULL,"
					" generation = generation OPERATOR(pg_catalog.+) 1,"
					" updated_at = pg_catalog.clock_timestamp()"
					" WHERE handler OPERATOR(pg_catalog.=) $1",
					lengthof(change_types), change_types);
	values[0] = CStringGetTextDatum(st->handler);
	values[1] = Int32GetDatum(wanted);
	values[2] = st->lanes_barrier;
	te_execute_kept(te_change_lanes_plan, values, NULL, SPI_OK_UPDATE);
	ereport(LOG,
			(errmsg("task_events: handler \"%s\" now runs in %d lanes", st->handler, wanted),
			 errdetail("Its %d lanes all reached the barrier set_handler_lanes() set.", st->lanes)));
	return true;
}
