/*
 * dispatch.c
 *		Running one batch of events through one handler: which handlers
 *		have work, the lock on the handler's state, its window
 *		(commit_horizon.c), the call, and the handler's new position.
 *
 * A handler is a row of task_events.handlers naming a function that takes
 * task_events.events[] (in seq order).  Its position and retry state are
 * its row of task_events.handler_state, locked FOR UPDATE SKIP LOCKED for
 * the whole batch: whichever worker (or process_pending() call) holds the
 * lock runs the handler, the others skip it.  The handler's writes, the new
 * position, dead letters and failure counts commit in the caller's
 * transaction, together: an event's effect is recorded exactly once.
 *
 * Each call runs in a subtransaction.  A batch that fails is handed to
 * dead_letters.c, which finds the failing event, counts its attempts and
 * backs off or dead-letters it; the retry of dead letters is there too.
 *
 * A batch can also be lost whole: its handler ended the worker's process,
 * or its transaction failed to commit (a deferred check of another system,
 * a serialization failure, a full NOTIFY queue).  Every call is written in
 * the worker's call journal first (call_journal.c) and the worker counts a
 * lost batch as a failed attempt (lost_batch.c); the events of a lost batch
 * are then handled one per batch, each in its own transaction
 * (isolate_through), so that the next loss names the event that causes it.
 * The state row's generation, bumped at every save, tells a lost batch from
 * one that committed.
 *
 * Lanes (set_handler_lanes(); docs/design.md, "Handler lanes").  A handler
 * may split its events by task into lanes (task_events._lane_of), each with
 * a state row of its own: a position, retry state and generation, as above,
 * for the events of its lane only.  The rows are locked one by one, so up
 * to that many workers run the handler at once; a task's events are all in
 * one lane, handled there in seq order.  Everything above holds per lane.
 * The dead letters' retries run in lane 0.  A change of the number of lanes
 * waits at a barrier (a snapshot set_handler_lanes took): each lane stops
 * its windows there, and once every lane has, the batch that finds them all
 * there moves them all to the new lanes at once (handler_lanes.c).
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/indexing.h"
#include "catalog/pg_extension.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/fmgroids.h"
#include "utils/rel.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"

#include "call_journal.h"
#include "commit_horizon.h"
#include "dead_letters.h"
#include "dispatch.h"
#include "handler_call.h"
#include "handler_state.h"
#include "log_origin.h"
#include "spi_util.h"
#include "task_events.h"

static SPIPlanPtr te_peek_plan = NULL;
static SPIPlanPtr te_lock_plan = NULL;
static SPIPlanPtr te_claim_state_plan = NULL;
static SPIPlanPtr te_create_state_plan = NULL;
static SPIPlanPtr te_batch_plan = NULL;
static SPIPlanPtr te_lane_batch_plan = NULL;
static SPIPlanPtr te_save_plan = NULL;

/* Value of column col of SPI result row 0, copied into the current context. */
static Datum
te_result_datum(int col, bool *isnull)
{
	Form_pg_attribute att = TupleDescAttr(SPI_tuptable->tupdesc, col - 1);
	Datum		value = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc,
									  col, isnull);

	return *isnull ? (Datum) 0 : datumCopy(value, att->attbyval, att->attlen);
}

/* A one-element task_events.events[] holding event. */
Datum
te_single_event_array(Datum event, Oid event_type)
{
	int16		typlen;
	bool		typbyval;
	char		typalign;

	get_typlenbyvalalign(event_type, &typlen, &typbyval, &typalign);
	return PointerGetDatum(construct_array(&event, 1, event_type,
										   typlen, typbyval, typalign));
}

/* The seq of event, a task_events.events. */
int64
te_event_seq(Datum event)
{
	bool		isnull;

	return DatumGetInt64(GetAttributeByName(DatumGetHeapTupleHeader(event),
											"seq", &isnull));
}

/*
 * Lock the state row of the handler's lane (FOR UPDATE SKIP LOCKED),
 * creating it first when the peek found none (a handler that never ran
 * has one lane), and load it into *st.  False when the handler is disabled
 * or gone, the lane retired, or being run by someone else right now.
 */
static bool
te_lock_state(HandlerState *st)
{
	static const Oid argtypes[] = {TEXTOID, INT4OID};
	Datum		values[2];
	bool		isnull;
	bool		claimed;

	values[0] = CStringGetTextDatum(st->handler);
	if (!st->peek->has_state_row)
	{
		/*
		 * Whoever creates the row holds this lock until its transaction ends,
		 * so the INSERT below never waits on another runner's uncommitted
		 * row: that runner is skipped instead, as a locked row would be.
		 * unregister_handler() takes the same lock before deleting: the
		 * INSERT, with the snapshot of a statement that starts once the lock
		 * is held, sees the handler only if it stays until this commits.
		 * (A key-share lock of the handlers row would need UPDATE on it,
		 * which the worker role must not have.)
		 */
		te_prepare_kept(&te_claim_state_plan,
						"SELECT pg_catalog.pg_try_advisory_xact_lock("
						"  pg_catalog.hashtext('task_events.handler_state'), pg_catalog.hashtext($1))",
						1, argtypes);
		te_execute_kept(te_claim_state_plan, values, NULL, SPI_OK_SELECT);
		claimed = DatumGetBool(te_result_datum(1, &isnull));
		SPI_freetuptable(SPI_tuptable);
		if (!claimed)
			return false;

		te_prepare_kept(&te_create_state_plan,
						"INSERT INTO task_events.handler_state (handler)"
						" SELECT h.handler FROM task_events.handlers h"
						" WHERE h.handler OPERATOR(pg_catalog.=) $1"
						" ON CONFLICT DO NOTHING RETURNING true",
						1, argtypes);
		te_execute_kept(te_create_state_plan, values, NULL, SPI_OK_INSERT_RETURNING);
		if (SPI_processed == 0)
		{
			SPI_freetuptable(SPI_tuptable);
			return false;
		}
		SPI_freetuptable(SPI_tuptable);
	}

	te_prepare_kept(&te_lock_plan,
					"SELECT h.function::pg_catalog.oid, s.window_start, s.window_end,"
					"       s.window_seq, s.last_seq, s.failing_seq, s.attempts, s.retry_at,"
					"       s.isolate_through, s.generation, s.last_sqlstate, s.last_error,"
					"       h.event_types, s.replay_from_seq, s.lanes, s.lanes_barrier"
					" FROM task_events.handlers h"
					" JOIN task_events.handler_state s ON s.handler OPERATOR(pg_catalog.=) h.handler"
					" WHERE h.handler OPERATOR(pg_catalog.=) $1 AND h.enabled"
					"   AND s.lane OPERATOR(pg_catalog.=) $2 AND s.lane OPERATOR(pg_catalog.<) s.lanes"
					" FOR UPDATE OF s SKIP LOCKED",
					lengthof(argtypes), argtypes);
	values[1] = Int32GetDatum(st->lane);
	te_execute_kept(te_lock_plan, values, NULL, SPI_OK_SELECT);
	if (SPI_processed == 0)
	{
		SPI_freetuptable(SPI_tuptable);
		return false;
	}

	st->function = DatumGetObjectId(te_result_datum(1, &isnull));
	st->window.start = te_result_datum(2, &isnull);
	st->window.end = te_result_datum(3, &isnull);
	st->window.seq = DatumGetInt64(te_result_datum(4, &isnull));
	st->last_seq = DatumGetInt64(te_result_datum(5, &isnull));
	st->failing_seq = DatumGetInt64(te_result_datum(6, &isnull));
	st->attempts = DatumGetInt32(te_result_datum(7, &isnull));
	st->retry_at = DatumGetTimestampTz(te_result_datum(8, &isnull));
	st->isolate_through = DatumGetInt64(te_result_datum(9, &isnull));
	st->generation = DatumGetInt64(te_result_datum(10, &isnull));
	st->last_sqlstate = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 11);
	st->last_message = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 12);
	st->event_types = te_result_datum(13, &isnull);
	st->replay_from_seq = DatumGetInt64(te_result_datum(14, &isnull));
	st->lanes = DatumGetInt32(te_result_datum(15, &isnull));
	st->lanes_barrier = te_result_datum(16, &isnull);
	SPI_freetuptable(SPI_tuptable);
	return true;
}

/*
 * Open a window if none is open: from the position up to the snapshot the
 * peek took, when nobody moved the position since (it saves a query; an
 * older end only makes the window smaller), else up to the active
 * snapshot.  While the lanes change, up to the barrier instead, and no
 * further: a window that would be empty moves the position to the barrier
 * at once.  False when that window holds no event.
 */
static bool
te_open_handler_window(HandlerState *st)
{
	Datum		end;
	int64		min_seq;

	if (st->window.end != (Datum) 0)
		return true;
	if (st->lanes_barrier != (Datum) 0)
	{
		if (te_at_barrier(st))
			return false;
		min_seq = te_window_min_seq(st->window.start, st->lanes_barrier);
		if (min_seq == 0)
		{
			st->window.start = st->lanes_barrier;
			st->changed = true;
			return false;
		}
		/* Not "opened" by this batch: its end is old, look again after it. */
		return te_open_window(&st->window, st->lanes_barrier, min_seq);
	}
	if (datumIsEqual(st->window.start, st->peek->window_start, false, -1))
	{
		end = st->peek->window_end;
		min_seq = st->peek->min_seq;
	}
	else
	{
		end = te_window_snapshot();
		min_seq = te_window_min_seq(st->window.start, end);
	}
	if (!te_open_window(&st->window, end, min_seq))
		return false;
	st->opened_window = true;
	return true;
}

/*
 * Begin the replay replay_handler() asked for, unless a window is open (the
 * replay then begins once it is closed): a window over the events the
 * handler has all handled, read from replay_from_seq on
 * (te_open_replay_window).  The window is not "opened" by this batch in
 * the sense of te_open_handler_window: its end is old, so the worker looks
 * again when it closes.
 */
static void
te_begin_replay(HandlerState *st)
{
	if (st->replay_from_seq == 0 || st->window.end != (Datum) 0)
		return;
	te_open_replay_window(&st->window, st->replay_from_seq);
	st->replay_from_seq = 0;
	st->changed = true;
}

/*
 * The count events of the window up to seq are done, processed or (when
 * not processed) dead-lettered: move the position past them, and forget the
 * retry state of any of them.
 */
void
te_mark_done(HandlerState *st, int64 seq, int64 count, bool processed)
{
	st->window.seq = seq;
	st->last_seq = Max(st->last_seq, seq);
	st->done += count;
	if (processed)
		st->processed += count;
	st->changed = true;
	if (st->failing_seq != 0 && st->failing_seq <= seq)
	{
		st->failing_seq = 0;
		st->attempts = 0;
		st->retry_at = 0;
	}
	if (st->isolate_through <= seq)
		st->isolate_through = 0;
}

/* The events of a batch (a task_events.events[]), and their type. */
void
te_batch_events(Datum batch, Oid *event_type, Datum **events, int *nevents)
{
	ArrayType  *array = DatumGetArrayTypeP(batch);
	int16		typlen;
	bool		typbyval;
	char		typalign;

	*event_type = ARR_ELEMTYPE(array);
	get_typlenbyvalalign(*event_type, &typlen, &typbyval, &typalign);
	deconstruct_array(array, *event_type, typlen, typbyval, typalign,
					  events, NULL, nevents);
}

/*
 * Move the position past the window's events up to seq that the handler is
 * not called with (event_types): they are neither processed nor failed.
 */
static void
te_skip_to(HandlerState *st, int64 seq)
{
	st->window.seq = Max(st->window.seq, seq);
	st->last_seq = Max(st->last_seq, seq);
	st->changed = true;
	if (st->isolate_through <= seq)
		st->isolate_through = 0;
}

/*
 * Call the handler with events (a task_events.events[], in seq order),
 * journaled first (in a worker) so that a call that ends the process is
 * counted.  Returns true on success, else the error in *error.
 */
bool
te_call(HandlerState *st, Datum events, bool retries, MemoryContext cxt, ErrorData **error)
{
	CalledRange call;
	Oid			event_type;
	Datum	   *elems;
	int			nelems;
	int64		first_seq;
	int64		last_seq;

	te_batch_events(events, &event_type, &elems, &nelems);
	first_seq = te_event_seq(elems[0]);
	last_seq = te_event_seq(elems[nelems - 1]);

	memset(&call, 0, sizeof(call));
	strlcpy(call.handler, st->handler, NAMEDATALEN);
	call.lane = st->lane;
	call.generation = st->generation;
	call.first_seq = first_seq;
	call.last_seq = last_seq;
	call.retries = retries;
	te_journal_write(&call);

	if (st->calls.first_seq == 0)
		st->calls = call;
	st->calls.first_seq = Min(st->calls.first_seq, first_seq);
	st->calls.last_seq = Max(st->calls.last_seq, last_seq);
	st->changed = true;
	return te_call_handler(st->function, events, cxt, error);
}

/*
 * The query of te_fetch_batch; lane_filter narrows it to the events of lane
 * $7 of $6 lanes.  Two plans: only a handler with lanes calls _lane_of, so
 * that a worker role without EXECUTE on it runs the others.
 */
#define TE_BATCH_SQL(lane_filter) \
	"SELECT pg_catalog.array_agg(b.e ORDER BY (b.e).seq) FILTER (WHERE b.called)," \
	"       pg_catalog.count(*) FILTER (WHERE b.called)," \
	"       pg_catalog.count(*), pg_catalog.max((b.e).seq)" \
	" FROM (SELECT e, ($5 IS NULL OR e.event_type OPERATOR(pg_catalog.=) ANY ($5)) AS called" \
	"       FROM task_events.events e" \
	"       WHERE e.seq OPERATOR(pg_catalog.>) $3" \
	"         AND " TE_IN_WINDOW("e.xact_id", "$1", "$2") \
	lane_filter \
	"       ORDER BY e.seq LIMIT $4) b"

/*
 * Fetch the next max_events events of the lane in the open window, after
 * window_seq, in seq order (TE_IN_WINDOW: what the walk costs; a lane walks
 * over the other lanes' events too).  Returns how many there were and sets
 * *max_seq to the last one's seq; *batch gets those the handler is called
 * with (event_types) as one task_events.events[], (Datum) 0 when none, and
 * *nbatch their number.
 */
static int64
te_fetch_batch(HandlerState *st, int max_events, Datum *batch, int64 *nbatch, int64 *max_seq)
{
	static const Oid argtypes[] = {PG_SNAPSHOTOID, PG_SNAPSHOTOID, INT8OID, INT4OID, TEXTARRAYOID,
	INT4OID, INT4OID};
	Datum		values[7];
	char		nulls[7] = {' ', ' ', ' ', ' ', ' ', ' ', ' '};
	bool		isnull;
	int64		count;
	SPIPlanPtr	plan;

	if (st->lanes == 1)
	{
		te_prepare_kept(&te_batch_plan, TE_BATCH_SQL(""), 5, argtypes);
		plan = te_batch_plan;
	}
	else
	{
		te_prepare_kept(&te_lane_batch_plan,
						TE_BATCH_SQL("     AND task_events._lane_of(e.aggregate_id, $6) OPERATOR(pg_catalog.=) $7"),
						lengthof(argtypes), argtypes);
		plan = te_lane_batch_plan;
	}
	values[5] = Int32GetDatum(st->lanes);
	values[6] = Int32GetDatum(st->lane);
	values[0] = st->window.start;
	values[1] = st->window.end;
	values[2] = Int64GetDatum(st->window.seq);
	values[3] = Int32GetDatum(max_events);
	values[4] = st->event_types;
	nulls[4] = st->event_types ? ' ' : 'n';
	te_execute_kept(plan, values, nulls, SPI_OK_SELECT);
	*batch = te_result_datum(1, &isnull);
	*nbatch = DatumGetInt64(te_result_datum(2, &isnull));
	count = DatumGetInt64(te_result_datum(3, &isnull));
	*max_seq = count > 0 ? DatumGetInt64(te_result_datum(4, &isnull)) : 0;
	SPI_freetuptable(SPI_tuptable);
	return count;
}

/* Write the lane's new position, retry state and counters. */
static void
te_save_state(HandlerState *st)
{
	static const Oid argtypes[] = {
		TEXTOID, PG_SNAPSHOTOID, PG_SNAPSHOTOID, INT8OID, INT8OID, INT8OID, INT4OID,
		TIMESTAMPTZOID, TEXTOID, TEXTOID, INT8OID, INT8OID, INT4OID, FLOAT8OID, INT8OID, INT8OID,
		INT4OID
	};
	Datum		values[17];
	char		nulls[17];

	te_prepare_kept(&te_save_plan,
					"UPDATE task_events.handler_state SET"
					" window_start = $2, window_end = $3, window_seq = $4, last_seq = $5,"
					" failing_seq = $6, attempts = $7, retry_at = $8,"
					" last_error = COALESCE($9, last_error),"
					" last_sqlstate = COALESCE($10, last_sqlstate),"
					" last_error_at = CASE WHEN $9 IS NULL THEN last_error_at"
					"                 ELSE pg_catalog.clock_timestamp() END,"
					" processed = processed OPERATOR(pg_catalog.+) $11,"
					" failed = failed OPERATOR(pg_catalog.+) $12,"
					" batches = batches OPERATOR(pg_catalog.+) $13,"
					" batch_ms_total = batch_ms_total OPERATOR(pg_catalog.+) $14,"
					" batch_ms_max = GREATEST(batch_ms_max, $14),"
					" isolate_through = $15, replay_from_seq = $16,"
					" generation = generation OPERATOR(pg_catalog.+) 1,"
					" updated_at = pg_catalog.clock_timestamp()"
					" WHERE handler OPERATOR(pg_catalog.=) $1 AND lane OPERATOR(pg_catalog.=) $17",
					lengthof(argtypes), argtypes);

	memset(nulls, ' ', sizeof(nulls));
	values[0] = CStringGetTextDatum(st->handler);
	values[1] = st->window.start;
	values[2] = st->window.end;
	nulls[2] = st->window.end ? ' ' : 'n';
	values[3] = Int64GetDatum(st->window.seq);
	values[4] = Int64GetDatum(st->last_seq);
	values[5] = Int64GetDatum(st->failing_seq);
	nulls[5] = st->failing_seq ? ' ' : 'n';
	values[6] = Int32GetDatum(st->attempts);
	values[7] = TimestampTzGetDatum(st->retry_at);
	nulls[7] = st->retry_at ? ' ' : 'n';
	if (st->last_error)
	{
		values[8] = CStringGetTextDatum(st->last_error->message ? st->last_error->message : "");
		values[9] = CStringGetTextDatum(unpack_sql_state(st->last_error->sqlerrcode));
	}
	else
		nulls[8] = nulls[9] = 'n';
	values[10] = Int64GetDatum(st->processed);
	values[11] = Int64GetDatum(st->failed);
	values[12] = Int32GetDatum(st->calls.first_seq != 0 ? 1 : 0);
	values[13] = Float8GetDatum(st->batch_ms);
	values[14] = Int64GetDatum(st->isolate_through);
	values[15] = Int64GetDatum(st->replay_from_seq);
	nulls[15] = st->replay_from_seq ? ' ' : 'n';
	values[16] = Int32GetDatum(st->lane);
	te_execute_kept(te_save_plan, values, nulls, SPI_OK_UPDATE);
}

/*
 * Raise 55000 unless the extension's objects in this database are those of
 * the library's version: between installing a new library and ALTER
 * EXTENSION ... UPDATE, the handlers wait (the write path needs nothing new
 * and goes on).
 */
static void
te_require_schema_version(void)
{
	Oid			extoid = get_extension_oid("task_events", true);
	char	   *version = NULL;
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;

	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_extension_oid, BTEqualStrategyNumber, F_OIDEQ,
				ObjectIdGetDatum(extoid));
	scan = systable_beginscan(rel, ExtensionOidIndexId, true, NULL, 1, &key);
	tuple = systable_getnext(scan);
	if (HeapTupleIsValid(tuple))
	{
		bool		isnull;
		Datum		value = heap_getattr(tuple, Anum_pg_extension_extversion,
										 RelationGetDescr(rel), &isnull);

		if (!isnull)
			version = text_to_cstring(DatumGetTextPP(value));
	}
	systable_endscan(scan);
	table_close(rel, AccessShareLock);

	if (version == NULL || strcmp(version, TE_SCHEMA_VERSION) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("task_events %s is installed in this database, but its handlers need version %s",
						version ? version : "(none)", TE_SCHEMA_VERSION),
				 errhint("Run ALTER EXTENSION task_events UPDATE;")));
}

/*
 * Which lanes of the enabled handlers (or only the one named, when only is
 * not NULL) have work, in name and lane order, as a list of HandlerPeek
 * allocated in cxt.  One read-only query for all of them, so that an idle
 * round takes no lock, writes nothing and costs one statement.  Assumes SPI is connected and an
 * active snapshot; the peeks stay valid in later transactions (a window
 * may end at an older snapshot than the runner's).
 */
List *
te_peek_handlers(const char *only, MemoryContext cxt)
{
	static const Oid argtypes[] = {PG_SNAPSHOTOID, TEXTOID};
	Datum		values[2];
	char		nulls[2] = {' ', ' '};
	Datum		now_snapshot = te_window_snapshot();
	TimestampTz now = GetCurrentTimestamp();
	List	   *peeks = NIL;
	uint64		i;

	te_require_native_log();
	/* Before the peek: its query names columns an older schema lacks. */
	te_require_schema_version();

	/*
	 * Per handler: its position, whether a window is open, its backoff, the
	 * first event after its position visible now (TE_WINDOW_MIN_SEQ; not
	 * while a window is open, when it would count the
	 * rest of the window at every batch), whether dead letters wait for a
	 * retry, and whether its position or the log lies in this cluster's
	 * future (log_origin.c).  The future is judged against the snapshot the
	 * statement runs with (pg_current_snapshot()), not $1: a read-write SPI
	 * statement takes a newer one, and what committed in between is not
	 * from the future.
	 */
	te_prepare_kept(&te_peek_plan,
					"SELECT h.handler, p.ws, s.window_end IS NOT NULL OR s.replay_from_seq IS NOT NULL, s.retry_at,"
					"       CASE WHEN s.window_end IS NULL THEN " TE_WINDOW_MIN_SEQ("p.ws", "$1") " END,"
					"       COALESCE(s.lane, 0) OPERATOR(pg_catalog.=) 0"
					"       AND EXISTS (SELECT FROM task_events.dead_letters d"
					"                   WHERE d.handler OPERATOR(pg_catalog.=) h.handler AND d.retry_requested),"
					"       s.handler IS NOT NULL,"
					"       GREATEST(pg_catalog.pg_snapshot_xmax(p.ws), pg_catalog.pg_snapshot_xmax(s.window_end))"
					"         OPERATOR(pg_catalog.>) pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())"
					"       OR (SELECT pg_catalog.max(e.xact_id) FROM task_events.events e"
					"          WHERE e.xact_id OPERATOR(pg_catalog.<>) COALESCE(pg_catalog.pg_current_xact_id_if_assigned(), '0'::pg_catalog.xid8))"
					"         OPERATOR(pg_catalog.>=) pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot()),"
					"       COALESCE(s.lane, 0), s.lanes_barrier IS NOT NULL"
					" FROM task_events.handlers h"
					" LEFT JOIN task_events.handler_state s ON s.handler OPERATOR(pg_catalog.=) h.handler"
					"      AND s.lane OPERATOR(pg_catalog.<) s.lanes"
					" CROSS JOIN LATERAL (SELECT COALESCE(s.window_start, '1:1:'::pg_catalog.pg_snapshot) AS ws) p"
					" WHERE h.enabled AND ($2 IS NULL OR h.handler OPERATOR(pg_catalog.=) $2)"
					" ORDER BY h.handler, s.lane",
					lengthof(argtypes), argtypes);
	values[0] = now_snapshot;
	values[1] = only ? CStringGetTextDatum(only) : (Datum) 0;
	nulls[1] = only ? ' ' : 'n';
	te_execute_kept(te_peek_plan, values, nulls, SPI_OK_SELECT);

	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	row = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		MemoryContext old = MemoryContextSwitchTo(cxt);
		HandlerPeek *peek = palloc0(sizeof(HandlerPeek));
		bool		isnull;
		bool		window_open;
		Datum		value;

		peek->handler = SPI_getvalue(row, desc, 1);
		peek->window_start = datumCopy(SPI_getbinval(row, desc, 2, &isnull), false, -1);
		peek->window_end = datumCopy(now_snapshot, false, -1);
		window_open = DatumGetBool(SPI_getbinval(row, desc, 3, &isnull));
		value = SPI_getbinval(row, desc, 4, &isnull);
		peek->retry_at = isnull ? 0 : DatumGetTimestampTz(value);
		value = SPI_getbinval(row, desc, 5, &isnull);
		peek->min_seq = isnull ? 0 : DatumGetInt64(value);
		peek->retries_queued = DatumGetBool(SPI_getbinval(row, desc, 6, &isnull));
		peek->has_state_row = DatumGetBool(SPI_getbinval(row, desc, 7, &isnull));
		value = SPI_getbinval(row, desc, 8, &isnull);
		if (!isnull && DatumGetBool(value))
			te_report_log_in_future();
		peek->lane = DatumGetInt32(SPI_getbinval(row, desc, 9, &isnull));
		peek->lanes_changing = DatumGetBool(SPI_getbinval(row, desc, 10, &isnull));
		peek->backing_off = peek->retry_at > now;
		peek->has_work = !peek->backing_off &&
			(window_open || peek->min_seq != 0 || peek->retries_queued || peek->lanes_changing);
		peeks = lappend(peeks, peek);
		MemoryContextSwitchTo(old);
	}
	SPI_freetuptable(SPI_tuptable);
	return peeks;
}

/*
 * Run one batch of the handler's lane that peek found with work: lock its
 * state row; then either retry the dead letters queued for it, or handle
 * up to max_events events of its window in seq order (one, while the
 * events of a lost batch are isolated); and save its position; at the
 * barrier of a change of the lanes, try the change.  All in the caller's
 * transaction; assumes SPI is connected and an active snapshot.  Returns
 * false when the lane could not be run (someone else runs it, or it was
 * disabled, deleted or retired since the peek); *outcome says what happened.
 */
bool
te_run_handler_batch(const HandlerPeek *peek, int max_events, BatchOutcome *outcome)
{
	MemoryContext cxt = CurrentMemoryContext;
	HandlerState st;
	TimestampTz started;
	Datum		batch;
	int64		nbatch;
	int64		max_seq;
	int64		count = 0;
	int			budget = 0;
	bool		retried = false;
	bool		window_done = false;
	bool		stopped = false;
	bool		lanes_changed = false;

	memset(outcome, 0, sizeof(*outcome));
	(void) te_take_durable_commit_request();
	if (peek->backing_off)
	{
		outcome->retry_at = peek->retry_at;
		return true;
	}
	if (!peek->has_work)
		return true;

	memset(&st, 0, sizeof(st));
	st.handler = peek->handler;
	st.lane = peek->lane;
	st.peek = peek;
	if (!te_lock_state(&st))
		return false;
	if (st.retry_at != 0 && st.retry_at > GetCurrentTimestamp())
	{
		outcome->retry_at = st.retry_at;
		return true;
	}

	started = GetCurrentTimestamp();
	if (peek->retries_queued)
		retried = te_retry_dead_letters(&st, max_events, cxt);

	if (!retried)
		te_begin_replay(&st);
	if (!retried && te_open_handler_window(&st))
	{
		budget = (st.isolate_through > st.window.seq) ? 1 : max_events;
		count = te_fetch_batch(&st, budget, &batch, &nbatch, &max_seq);
		if (nbatch > 0 && !te_dead_letter_if_exhausted(&st, batch))
		{
			ErrorData  *error = NULL;

			if (te_call(&st, batch, false, cxt, &error))
				te_mark_done(&st, max_seq, nbatch, true);
			else
				stopped = !te_run_one_by_one(&st, batch, cxt);
		}
		if (count > 0 && !stopped)
			te_skip_to(&st, max_seq);
		window_done = !stopped && count < budget;
		if (window_done)
		{
			te_close_window(&st.window);
			st.changed = true;
		}
	}

	st.batch_ms = (double) (GetCurrentTimestamp() - started) / 1000.0;
	if (st.changed)
		te_save_state(&st);
	if (!stopped && te_at_barrier(&st))
		lanes_changed = te_try_change_lanes(&st);

	outcome->done = st.done;
	outcome->failed = st.failed;
	outcome->retry_at = stopped ? st.retry_at : 0;
	outcome->calls = st.calls;
	outcome->durable = te_take_durable_commit_request();

	/*
	 * Run again at once while the window is not done, or retries may remain.
	 * After a window this batch opened closes, events committed since its
	 * end snapshot have set the worker's latch (wakeup.c; the peek's
	 * snapshot is taken after the round reset the latch), so there is no
	 * need to look again.  A window opened in an earlier round ends at an
	 * older snapshot: look again.
	 */
	outcome->more = !stopped &&
		(retried || (count > 0 && !window_done) ||
		 (window_done && !st.opened_window) || lanes_changed);
	return true;
}
