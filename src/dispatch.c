/*
 * dispatch.c
 *		Running one batch of events through one handler: the commit-safe
 *		window (see commit_horizon.c), the call, retries with backoff, dead
 *		letters, and the handler's position.
 *
 * A handler is a row of task_events.handlers naming a function that takes
 * task_events.events[] (in seq order).  Its position and retry state are
 * its row of task_events.handler_state, locked FOR UPDATE SKIP LOCKED for
 * the whole batch: whichever worker (or process_pending() call) holds the
 * lock runs the handler, the others skip it.  The handler's writes, the new
 * position, dead letters and failure counts commit in the caller's
 * transaction, together: an event's effect is recorded exactly once.
 *
 * Each call runs in a subtransaction.  When a whole batch fails, its events
 * are retried one at a time to find the one that fails; the ones before it
 * are kept, the failing one's attempt is counted (after rolling back the
 * attempt, so the count survives) and the handler waits
 * retry_delay * 2^(attempts - 1) before trying it again.  After
 * max_attempts the event goes to task_events.dead_letters and the handler
 * moves on.
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"

#include "commit_horizon.h"
#include "dispatch.h"
#include "log_origin.h"
#include "spi_util.h"
#include "task_events.h"

/* Longest wait between two attempts at a failing event. */
#define TE_MAX_RETRY_DELAY_MS (10 * 60 * 1000)

/* A handler's row of task_events.handler_state, as locked for a batch. */
typedef struct HandlerState
{
	const char *handler;
	Oid			function;
	Datum		window_start;	/* pg_snapshot */
	Datum		window_end;		/* pg_snapshot, or 0 when no window is open */
	int64		window_seq;		/* in the open window, seqs up to this are done */
	int64		last_seq;		/* highest seq handled, for monitoring */
	int64		failing_seq;	/* 0, or the event being retried */
	int32		attempts;		/* failed attempts at failing_seq */
	TimestampTz retry_at;		/* 0, or no attempt before this time */
	const HandlerPeek *peek;	/* what te_peek_handlers found */
	bool		opened_window;	/* this batch opened the window */
	/* what this batch adds to the state */
	int64		handled;
	int64		failed;
	double		batch_ms;
	bool		called;			/* the handler function was called */
	ErrorData  *last_error;
} HandlerState;

static SPIPlanPtr te_peek_plan = NULL;
static SPIPlanPtr te_lock_plan = NULL;
static SPIPlanPtr te_create_state_plan = NULL;
static SPIPlanPtr te_window_plan = NULL;
static SPIPlanPtr te_batch_plan = NULL;
static SPIPlanPtr te_dead_letter_plan = NULL;
static SPIPlanPtr te_retry_select_plan = NULL;
static SPIPlanPtr te_retry_done_plan = NULL;
static SPIPlanPtr te_retry_failed_plan = NULL;
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

/*
 * Call the handler's function with events (a task_events.events[]) in a
 * subtransaction.  Returns true on success; on failure rolls the
 * subtransaction back and returns the error, copied into cxt.
 */
static bool
te_call_handler(Oid function, Datum events, MemoryContext cxt, ErrorData **error)
{
	ResourceOwner owner = CurrentResourceOwner;
	volatile bool ok = true;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		FmgrInfo	flinfo;
		LOCAL_FCINFO(fcinfo, 1);

		fmgr_info(function, &flinfo);
		InitFunctionCallInfoData(*fcinfo, &flinfo, 1, InvalidOid, NULL, NULL);
		fcinfo->args[0].value = events;
		fcinfo->args[0].isnull = false;
		(void) FunctionCallInvoke(fcinfo);

		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		*error = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;

		/*
		 * In a session (process_pending), a cancel or statement_timeout stops
		 * the call, as in PL/pgSQL.  A worker has no caller to stop: there
		 * it is a failed attempt like any other (e.g. a remote
		 * statement_timeout reported by dblink, or pg_cancel_backend).
		 */
		if ((*error)->sqlerrcode == ERRCODE_QUERY_CANCELED && !IsBackgroundWorker)
			ReThrowError(*error);
		ok = false;
	}
	PG_END_TRY();
	return ok;
}

/* A one-element task_events.events[] holding event. */
static Datum
te_single_event_array(Datum event, Oid event_type)
{
	int16		typlen;
	bool		typbyval;
	char		typalign;

	get_typlenbyvalalign(event_type, &typlen, &typbyval, &typalign);
	return PointerGetDatum(construct_array(&event, 1, event_type,
										   typlen, typbyval, typalign));
}

static int64
te_event_seq(Datum event)
{
	bool		isnull;

	return DatumGetInt64(GetAttributeByName(DatumGetHeapTupleHeader(event),
											"seq", &isnull));
}

/*
 * Lock the handler's state row (FOR UPDATE SKIP LOCKED), creating it first
 * when the peek found none, and load it into *st.  False when the handler
 * is disabled or gone, or being run by someone else right now.
 */
static bool
te_lock_state(HandlerState *st)
{
	static const Oid argtypes[] = {TEXTOID};
	Datum		values[1];
	bool		isnull;

	values[0] = CStringGetTextDatum(st->handler);
	if (!st->peek->has_state_row)
	{
		/*
		 * Whoever creates the row holds this lock until its transaction ends,
		 * so the INSERT below never waits on another runner's uncommitted
		 * row: that runner is skipped instead, as a locked row would be.
		 */
		te_prepare_kept(&te_create_state_plan,
						"INSERT INTO task_events.handler_state (handler)"
						" SELECT $1 WHERE pg_catalog.pg_try_advisory_xact_lock("
						"   pg_catalog.hashtext('task_events.handler_state'), pg_catalog.hashtext($1))"
						" ON CONFLICT DO NOTHING RETURNING true",
						lengthof(argtypes), argtypes);
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
					"       s.window_seq, s.last_seq, s.failing_seq, s.attempts, s.retry_at"
					" FROM task_events.handlers h"
					" JOIN task_events.handler_state s ON s.handler OPERATOR(pg_catalog.=) h.handler"
					" WHERE h.handler OPERATOR(pg_catalog.=) $1 AND h.enabled"
					" FOR UPDATE OF s SKIP LOCKED",
					lengthof(argtypes), argtypes);
	te_execute_kept(te_lock_plan, values, NULL, SPI_OK_SELECT);
	if (SPI_processed == 0)
	{
		SPI_freetuptable(SPI_tuptable);
		return false;
	}

	st->function = DatumGetObjectId(te_result_datum(1, &isnull));
	st->window_start = te_result_datum(2, &isnull);
	st->window_end = te_result_datum(3, &isnull);
	st->window_seq = DatumGetInt64(te_result_datum(4, &isnull));
	st->last_seq = DatumGetInt64(te_result_datum(5, &isnull));
	st->failing_seq = DatumGetInt64(te_result_datum(6, &isnull));
	st->attempts = DatumGetInt32(te_result_datum(7, &isnull));
	st->retry_at = DatumGetTimestampTz(te_result_datum(8, &isnull));
	SPI_freetuptable(SPI_tuptable);
	return true;
}

/*
 * SQL for the lowest seq of the events visible in snapshot end and not in
 * snapshot start (NULL when there is none); start and end are SQL
 * expressions.  Run for every handler in every round, so its kept plan
 * must stay cheap once generic: the events are found through a range of
 * events_xact_id_idx (the upper bound is implied by the visibility test,
 * but gives the planner a narrow range estimate), and OFFSET 0 keeps it
 * from turning min(seq) into a walk of events_pkey from seq 1 that filters
 * every event on the way.
 */
#define TE_WINDOW_MIN_SEQ(start, end) \
	"(SELECT pg_catalog.min(w.seq)" \
	" FROM (SELECT e.seq FROM task_events.events e" \
	"       WHERE e.xact_id OPERATOR(pg_catalog.>=) pg_catalog.pg_snapshot_xmin(" start ")" \
	"         AND e.xact_id OPERATOR(pg_catalog.<) pg_catalog.pg_snapshot_xmax(" end ")" \
	"         AND NOT pg_catalog.pg_visible_in_snapshot(e.xact_id, " start ")" \
	"         AND pg_catalog.pg_visible_in_snapshot(e.xact_id, " end ")" \
	"       OFFSET 0) w)"

/*
 * The lowest seq of the events visible in end and not in the handler's
 * window_start, or 0 when there is none.
 */
static int64
te_window_min_seq(HandlerState *st, Datum end)
{
	static const Oid argtypes[] = {PG_SNAPSHOTOID, PG_SNAPSHOTOID};
	Datum		values[2];
	Datum		min_seq;
	bool		isnull;

	te_prepare_kept(&te_window_plan,
					"SELECT " TE_WINDOW_MIN_SEQ("$1", "$2"),
					lengthof(argtypes), argtypes);
	values[0] = st->window_start;
	values[1] = end;
	te_execute_kept(te_window_plan, values, NULL, SPI_OK_SELECT);
	min_seq = te_result_datum(1, &isnull);
	SPI_freetuptable(SPI_tuptable);
	return isnull ? 0 : DatumGetInt64(min_seq);
}

/*
 * Open a window if none is open: from the position up to the snapshot the
 * peek took, when nobody moved the position since (it saves a query; an
 * older end only makes the window smaller), else up to the active
 * snapshot.  False when that window holds no event.
 */
static bool
te_open_window(HandlerState *st)
{
	Datum		end;
	int64		min_seq;

	if (st->window_end != (Datum) 0)
		return true;
	if (datumIsEqual(st->window_start, st->peek->window_start, false, -1))
	{
		end = st->peek->window_end;
		min_seq = st->peek->min_seq;
	}
	else
	{
		end = te_window_snapshot();
		min_seq = te_window_min_seq(st, end);
	}
	if (min_seq == 0)
		return false;
	st->opened_window = true;

	st->window_end = end;
	st->window_seq = min_seq - 1;
	return true;
}

/* Close the open window: everything up to its end snapshot is handled. */
static void
te_close_window(HandlerState *st)
{
	st->window_start = st->window_end;
	st->window_end = (Datum) 0;
	st->window_seq = 0;
}

/*
 * The count events of the window up to seq are handled (or dead-lettered):
 * move the position past them, and forget the retry state of any of them.
 */
static void
te_mark_done(HandlerState *st, int64 seq, int64 count)
{
	st->window_seq = seq;
	st->last_seq = Max(st->last_seq, seq);
	st->handled += count;
	if (st->failing_seq != 0 && st->failing_seq <= seq)
	{
		st->failing_seq = 0;
		st->attempts = 0;
		st->retry_at = 0;
	}
}

static void
te_insert_dead_letter(HandlerState *st, Datum event, int64 seq, ErrorData *error)
{
	static const Oid argtypes[] = {TEXTOID, INT8OID, UUIDOID, INT4OID, TEXTOID, TEXTOID};
	Datum		values[6];
	bool		isnull;

	te_prepare_kept(&te_dead_letter_plan,
					"INSERT INTO task_events.dead_letters"
					" (handler, seq, event_id, attempts, sqlstate, message, failed_at)"
					" VALUES ($1, $2, $3, $4, $5, $6, pg_catalog.clock_timestamp())",
					lengthof(argtypes), argtypes);
	values[0] = CStringGetTextDatum(st->handler);
	values[1] = Int64GetDatum(seq);
	values[2] = GetAttributeByName(DatumGetHeapTupleHeader(event), "event_id", &isnull);
	values[3] = Int32GetDatum(st->attempts);
	values[4] = CStringGetTextDatum(unpack_sql_state(error->sqlerrcode));
	values[5] = CStringGetTextDatum(error->message ? error->message : "");
	te_execute_kept(te_dead_letter_plan, values, NULL, SPI_OK_INSERT);
}

/*
 * Count a failed attempt at event seq.  Returns true when the event was
 * dead-lettered (the handler moves on), false when it is to be retried
 * after a backoff (the handler stops here).
 */
static bool
te_record_failure(HandlerState *st, Datum event, int64 seq, ErrorData *error)
{
	int64		delay_ms;

	st->failed++;
	st->last_error = error;
	st->attempts = (st->failing_seq == seq) ? st->attempts + 1 : 1;
	st->failing_seq = seq;

	if (st->attempts >= te_max_attempts)
	{
		te_insert_dead_letter(st, event, seq, error);
		te_mark_done(st, seq, 1);
		return true;
	}

	delay_ms = (int64) te_retry_delay_ms << Min(st->attempts - 1, 30);
	delay_ms = Min(delay_ms, TE_MAX_RETRY_DELAY_MS);
	st->retry_at = GetCurrentTimestamp() + delay_ms * 1000;
	return false;
}

/*
 * After a batch failed as a whole, run its events one at a time: keep the
 * ones that succeed, stop at the first that fails (unless it goes to the
 * dead letters).  Returns true when every event was handled.
 */
static bool
te_run_one_by_one(HandlerState *st, Datum batch, MemoryContext cxt)
{
	ArrayType  *array = DatumGetArrayTypeP(batch);
	Oid			event_type = ARR_ELEMTYPE(array);
	int16		typlen;
	bool		typbyval;
	char		typalign;
	Datum	   *events;
	int			nevents;
	int			i;

	get_typlenbyvalalign(event_type, &typlen, &typbyval, &typalign);
	deconstruct_array(array, event_type, typlen, typbyval, typalign,
					  &events, NULL, &nevents);

	for (i = 0; i < nevents; i++)
	{
		int64		seq = te_event_seq(events[i]);
		ErrorData  *error = NULL;

		if (te_call_handler(st->function, te_single_event_array(events[i], event_type),
							cxt, &error))
			te_mark_done(st, seq, 1);
		else if (!te_record_failure(st, events[i], seq, error))
			return false;
	}
	return true;
}

/*
 * Retry the handler's dead letters that retry_dead_letters() queued: each
 * once, in seq order; a success removes the dead letter, a failure puts it
 * back with the new error.
 */
static void
te_retry_dead_letters(HandlerState *st, int max_events, MemoryContext cxt)
{
	static const Oid select_types[] = {TEXTOID, INT4OID};
	static const Oid key_types[] = {TEXTOID, INT8OID, TEXTOID, TEXTOID};
	Datum		values[4];
	SPITupleTable *queued;
	uint64		nqueued;
	uint64		i;

	te_prepare_kept(&te_retry_select_plan,
					"SELECT d.seq, e FROM task_events.dead_letters d"
					" JOIN task_events.events e ON e.seq OPERATOR(pg_catalog.=) d.seq"
					" WHERE d.handler OPERATOR(pg_catalog.=) $1 AND d.retry_requested"
					" ORDER BY d.seq LIMIT $2",
					lengthof(select_types), select_types);
	values[0] = CStringGetTextDatum(st->handler);
	values[1] = Int32GetDatum(max_events);
	te_execute_kept(te_retry_select_plan, values, NULL, SPI_OK_SELECT);
	if (SPI_processed == 0)
	{
		SPI_freetuptable(SPI_tuptable);
		return;
	}
	queued = SPI_tuptable;
	nqueued = SPI_processed;

	te_prepare_kept(&te_retry_done_plan,
					"DELETE FROM task_events.dead_letters"
					" WHERE handler OPERATOR(pg_catalog.=) $1 AND seq OPERATOR(pg_catalog.=) $2",
					2, key_types);
	te_prepare_kept(&te_retry_failed_plan,
					"UPDATE task_events.dead_letters"
					" SET attempts = attempts OPERATOR(pg_catalog.+) 1, sqlstate = $3, message = $4,"
					"     failed_at = pg_catalog.clock_timestamp(), retry_requested = false"
					" WHERE handler OPERATOR(pg_catalog.=) $1 AND seq OPERATOR(pg_catalog.=) $2",
					lengthof(key_types), key_types);

	for (i = 0; i < nqueued; i++)
	{
		bool		isnull;
		int64		seq = DatumGetInt64(SPI_getbinval(queued->vals[i], queued->tupdesc, 1, &isnull));
		Datum		event = SPI_getbinval(queued->vals[i], queued->tupdesc, 2, &isnull);
		Oid			event_type = SPI_gettypeid(queued->tupdesc, 2);
		ErrorData  *error = NULL;

		values[1] = Int64GetDatum(seq);
		st->called = true;
		if (te_call_handler(st->function, te_single_event_array(event, event_type),
							cxt, &error))
		{
			te_execute_kept(te_retry_done_plan, values, NULL, SPI_OK_DELETE);
			st->handled++;
		}
		else
		{
			values[2] = CStringGetTextDatum(unpack_sql_state(error->sqlerrcode));
			values[3] = CStringGetTextDatum(error->message ? error->message : "");
			te_execute_kept(te_retry_failed_plan, values, NULL, SPI_OK_UPDATE);
			st->failed++;
			st->last_error = error;
		}
	}
	SPI_freetuptable(queued);
}

/*
 * Fetch up to max_events events of the open window, after window_seq, as
 * one task_events.events[] in seq order.  Returns the number fetched and
 * sets *max_seq to the last one's seq.
 */
static int64
te_fetch_batch(HandlerState *st, int max_events, Datum *batch, int64 *max_seq)
{
	static const Oid argtypes[] = {PG_SNAPSHOTOID, PG_SNAPSHOTOID, INT8OID, INT4OID};
	Datum		values[4];
	bool		isnull;
	int64		count;

	te_prepare_kept(&te_batch_plan,
					"SELECT pg_catalog.array_agg(b.e ORDER BY (b.e).seq), pg_catalog.count(*),"
					"       pg_catalog.max((b.e).seq)"
					" FROM (SELECT e FROM task_events.events e"
					"       WHERE e.seq OPERATOR(pg_catalog.>) $3"
					"         AND NOT pg_catalog.pg_visible_in_snapshot(e.xact_id, $1)"
					"         AND pg_catalog.pg_visible_in_snapshot(e.xact_id, $2)"
					"       ORDER BY e.seq LIMIT $4) b",
					lengthof(argtypes), argtypes);
	values[0] = st->window_start;
	values[1] = st->window_end;
	values[2] = Int64GetDatum(st->window_seq);
	values[3] = Int32GetDatum(max_events);
	te_execute_kept(te_batch_plan, values, NULL, SPI_OK_SELECT);
	*batch = te_result_datum(1, &isnull);
	count = DatumGetInt64(te_result_datum(2, &isnull));
	*max_seq = count > 0 ? DatumGetInt64(te_result_datum(3, &isnull)) : 0;
	SPI_freetuptable(SPI_tuptable);
	return count;
}

/* Write the handler's new position, retry state and counters. */
static void
te_save_state(HandlerState *st)
{
	static const Oid argtypes[] = {
		TEXTOID, PG_SNAPSHOTOID, PG_SNAPSHOTOID, INT8OID, INT8OID, INT8OID, INT4OID,
		TIMESTAMPTZOID, TEXTOID, TEXTOID, INT8OID, INT8OID, INT4OID, FLOAT8OID
	};
	Datum		values[14];
	char		nulls[14];

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
					" updated_at = pg_catalog.clock_timestamp()"
					" WHERE handler OPERATOR(pg_catalog.=) $1",
					lengthof(argtypes), argtypes);

	memset(nulls, ' ', sizeof(nulls));
	values[0] = CStringGetTextDatum(st->handler);
	values[1] = st->window_start;
	values[2] = st->window_end;
	nulls[2] = st->window_end ? ' ' : 'n';
	values[3] = Int64GetDatum(st->window_seq);
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
	values[10] = Int64GetDatum(st->handled);
	values[11] = Int64GetDatum(st->failed);
	values[12] = Int32GetDatum(st->called ? 1 : 0);
	values[13] = Float8GetDatum(st->batch_ms);
	te_execute_kept(te_save_plan, values, nulls, SPI_OK_UPDATE);
}

/*
 * Which enabled handlers (or only the one named, when only is not NULL)
 * have work, in name order, as a list of HandlerPeek allocated in cxt.  One
 * read-only query for all of them, so that an idle round takes no lock,
 * writes nothing and costs one statement.  Assumes SPI is connected and an
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

	/*
	 * Per handler: its position, whether a window is open, its backoff, the
	 * first event after its position visible now (TE_WINDOW_MIN_SEQ; not
	 * while a window is open, when it would count the
	 * rest of the window at every batch), and whether dead letters wait for
	 * a retry.
	 */
	te_prepare_kept(&te_peek_plan,
					"SELECT h.handler, p.ws, s.window_end IS NOT NULL, s.retry_at,"
					"       CASE WHEN s.window_end IS NULL THEN " TE_WINDOW_MIN_SEQ("p.ws", "$1") " END,"
					"       EXISTS (SELECT FROM task_events.dead_letters d"
					"               WHERE d.handler OPERATOR(pg_catalog.=) h.handler AND d.retry_requested),"
					"       s.handler IS NOT NULL"
					" FROM task_events.handlers h"
					" LEFT JOIN task_events.handler_state s ON s.handler OPERATOR(pg_catalog.=) h.handler"
					" CROSS JOIN LATERAL (SELECT COALESCE(s.window_start, '1:1:'::pg_catalog.pg_snapshot) AS ws) p"
					" WHERE h.enabled AND ($2 IS NULL OR h.handler OPERATOR(pg_catalog.=) $2)"
					" ORDER BY h.handler",
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
		peek->backing_off = peek->retry_at > now;
		peek->has_work = !peek->backing_off &&
			(window_open || peek->min_seq != 0 || peek->retries_queued);
		peeks = lappend(peeks, peek);
		MemoryContextSwitchTo(old);
	}
	SPI_freetuptable(SPI_tuptable);
	return peeks;
}

/*
 * Run one batch of the handler that peek found with work: lock its state
 * row, retry the dead letters queued for it, then handle up to max_events
 * events of its window in seq order, and save its position.  All in the
 * caller's transaction; assumes SPI is connected and an active snapshot.
 * Returns false when the handler could not be run (someone else runs it, or
 * it was disabled or deleted since the peek); *outcome says what happened.
 */
bool
te_run_handler_batch(const HandlerPeek *peek, int max_events, BatchOutcome *outcome)
{
	MemoryContext cxt = CurrentMemoryContext;
	HandlerState st;
	TimestampTz started;
	Datum		batch;
	int64		max_seq;
	int64		count = 0;
	int			budget;
	bool		window_done = false;
	bool		stopped = false;

	memset(outcome, 0, sizeof(*outcome));
	if (peek->backing_off)
	{
		outcome->retry_at = peek->retry_at;
		return true;
	}
	if (!peek->has_work)
		return true;

	memset(&st, 0, sizeof(st));
	st.handler = peek->handler;
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
		te_retry_dead_letters(&st, max_events, cxt);
	budget = max_events - (int) st.handled;

	if (budget > 0 && te_open_window(&st))
	{
		count = te_fetch_batch(&st, budget, &batch, &max_seq);
		if (count > 0)
		{
			ErrorData  *error = NULL;

			st.called = true;
			if (te_call_handler(st.function, batch, cxt, &error))
				te_mark_done(&st, max_seq, count);
			else
				stopped = !te_run_one_by_one(&st, batch, cxt);
		}
		window_done = !stopped && count < budget;
		if (window_done)
			te_close_window(&st);
	}

	st.batch_ms = (double) (GetCurrentTimestamp() - started) / 1000.0;
	if (st.called || window_done)
		te_save_state(&st);

	outcome->handled = st.handled;
	outcome->failed = st.failed;
	outcome->retry_at = stopped ? st.retry_at : 0;

	/*
	 * Run again at once while the window is not done.  After a window this
	 * batch opened closes, events committed since its end snapshot have set
	 * the worker's latch (wakeup.c; the peek's snapshot is taken after the
	 * round reset the latch), so there is no need to look again.  A window
	 * opened in an earlier round ends at an older snapshot: look again.
	 */
	outcome->more = !stopped &&
		((st.called && !window_done) || (window_done && !st.opened_window) ||
		 st.handled >= max_events);
	return true;
}
