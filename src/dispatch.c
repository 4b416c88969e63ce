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

#include "call_journal.h"
#include "commit_horizon.h"
#include "dispatch.h"
#include "handler_call.h"
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
	int64		isolate_through;	/* events up to this seq go one per batch */
	int64		generation;		/* of the state row, bumped at each save */
	char	   *last_sqlstate;	/* the last failure, as saved */
	char	   *last_message;
	const HandlerPeek *peek;	/* what te_peek_handlers found */
	bool		opened_window;	/* this batch opened the window */
	/* what this batch adds to the state */
	int64		done;			/* events moved past: processed or dead-lettered */
	int64		processed;		/* events the handler handled successfully */
	int64		failed;
	double		batch_ms;
	bool		changed;		/* something to save */
	CalledRange calls;			/* the events passed to the handler (first_seq 0: none) */
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
					"       s.window_seq, s.last_seq, s.failing_seq, s.attempts, s.retry_at,"
					"       s.isolate_through, s.generation, s.last_sqlstate, s.last_error"
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
	st->isolate_through = DatumGetInt64(te_result_datum(9, &isnull));
	st->generation = DatumGetInt64(te_result_datum(10, &isnull));
	st->last_sqlstate = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 11);
	st->last_message = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 12);
	SPI_freetuptable(SPI_tuptable);
	return true;
}

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
 * The count events of the window up to seq are done, processed or (when
 * not processed) dead-lettered: move the position past them, and forget the
 * retry state of any of them.
 */
static void
te_mark_done(HandlerState *st, int64 seq, int64 count, bool processed)
{
	st->window_seq = seq;
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
static void
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
 * Call the handler with events (a task_events.events[], in seq order),
 * journaled first (in a worker) so that a call that ends the process is
 * counted.  Returns true on success, else the error in *error.
 */
static bool
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

static void
te_insert_dead_letter(HandlerState *st, Datum event, int64 seq,
					  const char *sqlstate, const char *message)
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
	values[4] = CStringGetTextDatum(sqlstate);
	values[5] = CStringGetTextDatum(message);
	te_execute_kept(te_dead_letter_plan, values, NULL, SPI_OK_INSERT);
}

/*
 * When no attempt before now + the backoff after attempts failed attempts
 * at an event: retry_delay * 2^(attempts - 1), at most 10 minutes.
 */
TimestampTz
te_backoff_until(int attempts)
{
	int64		delay_ms = (int64) te_retry_delay_ms << Min(Max(attempts, 1) - 1, 30);

	delay_ms = Min(delay_ms, TE_MAX_RETRY_DELAY_MS);
	return GetCurrentTimestamp() + delay_ms * 1000;
}

/*
 * Count a failed attempt at event seq.  Returns true when the event was
 * dead-lettered (the handler moves on), false when it is to be retried
 * after a backoff (the handler stops here).
 */
static bool
te_record_failure(HandlerState *st, Datum event, int64 seq, ErrorData *error)
{
	st->failed++;
	st->last_error = error;
	st->attempts = (st->failing_seq == seq) ? st->attempts + 1 : 1;
	st->failing_seq = seq;

	if (st->attempts >= te_max_attempts)
	{
		te_insert_dead_letter(st, event, seq, unpack_sql_state(error->sqlerrcode),
							  error->message ? error->message : "");
		te_mark_done(st, seq, 1, false);
		return true;
	}
	st->retry_at = te_backoff_until(st->attempts);
	return false;
}


/*
 * Whether event is the one whose lost batches (lost_batch.c) used up its
 * attempts: it goes to the dead letters with the last error, uncalled.
 * Only a batch of one event is checked: such an event is always isolated.
 */
static bool
te_dead_letter_if_exhausted(HandlerState *st, Datum batch)
{
	Oid			event_type;
	Datum	   *events;
	int			nevents;
	int64		seq;

	if (st->failing_seq == 0 || st->attempts < te_max_attempts)
		return false;
	te_batch_events(batch, &event_type, &events, &nevents);
	if (nevents != 1 || (seq = te_event_seq(events[0])) != st->failing_seq)
		return false;
	te_insert_dead_letter(st, events[0], seq,
						  st->last_sqlstate ? st->last_sqlstate : "XX000",
						  st->last_message ? st->last_message : "");
	te_mark_done(st, seq, 1, false);
	return true;
}

/*
 * After a batch failed as a whole, run its events one at a time: keep the
 * ones that succeed, stop at the first that fails (unless it goes to the
 * dead letters).  Returns true when every event was handled.
 */
static bool
te_run_one_by_one(HandlerState *st, Datum batch, MemoryContext cxt)
{
	Oid			event_type;
	Datum	   *events;
	int			nevents;
	int			i;

	te_batch_events(batch, &event_type, &events, &nevents);

	for (i = 0; i < nevents; i++)
	{
		int64		seq = te_event_seq(events[i]);
		ErrorData  *error = NULL;

		if (te_call(st, te_single_event_array(events[i], event_type), false, cxt, &error))
			te_mark_done(st, seq, 1, true);
		else if (!te_record_failure(st, events[i], seq, error))
			return false;
	}
	return true;
}

/*
 * Retry the handler's dead letters that retry_dead_letters() queued: each
 * once, in seq order; a success removes the dead letter, a failure puts it
 * back with the new error.  Returns whether there were any.
 */
static bool
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
		return false;
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
		if (te_call(st, te_single_event_array(event, event_type), true, cxt, &error))
		{
			te_execute_kept(te_retry_done_plan, values, NULL, SPI_OK_DELETE);
			st->done++;
			st->processed++;
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
	return true;
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
		TIMESTAMPTZOID, TEXTOID, TEXTOID, INT8OID, INT8OID, INT4OID, FLOAT8OID, INT8OID
	};
	Datum		values[15];
	char		nulls[15];

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
					" isolate_through = $15,"
					" generation = generation OPERATOR(pg_catalog.+) 1,"
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
	values[10] = Int64GetDatum(st->processed);
	values[11] = Int64GetDatum(st->failed);
	values[12] = Int32GetDatum(st->calls.first_seq != 0 ? 1 : 0);
	values[13] = Float8GetDatum(st->batch_ms);
	values[14] = Int64GetDatum(st->isolate_through);
	te_execute_kept(te_save_plan, values, nulls, SPI_OK_UPDATE);
}

/*
 * Raise 55000 unless the extension's objects in this database are those of
 * the library's version: between installing a new library and ALTER
 * EXTENSION ... UPDATE, the handlers wait (the write path needs nothing new
 * and goes on).
 */
static void
te_require_schema_version(const char *version)
{
	if (version == NULL || strcmp(version, TE_SCHEMA_VERSION) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("task_events %s is installed in this database, but its handlers need version %s",
						version ? version : "(none)", TE_SCHEMA_VERSION),
				 errhint("Run ALTER EXTENSION task_events UPDATE;")));
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
	 * rest of the window at every batch), whether dead letters wait for a
	 * retry, and whether its position or the log lies in this cluster's
	 * future (log_origin.c).  The future is judged against the snapshot the
	 * statement runs with (pg_current_snapshot()), not $1: a read-write SPI
	 * statement takes a newer one, and what committed in between is not
	 * from the future.
	 */
	te_prepare_kept(&te_peek_plan,
					"SELECT h.handler, p.ws, s.window_end IS NOT NULL, s.retry_at,"
					"       CASE WHEN s.window_end IS NULL THEN " TE_WINDOW_MIN_SEQ("p.ws", "$1") " END,"
					"       EXISTS (SELECT FROM task_events.dead_letters d"
					"               WHERE d.handler OPERATOR(pg_catalog.=) h.handler AND d.retry_requested),"
					"       s.handler IS NOT NULL,"
					"       GREATEST(pg_catalog.pg_snapshot_xmax(p.ws), pg_catalog.pg_snapshot_xmax(s.window_end))"
					"         OPERATOR(pg_catalog.>) pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())"
					"       OR (SELECT pg_catalog.max(e.xact_id) FROM task_events.events e"
					"          WHERE e.xact_id OPERATOR(pg_catalog.<>) COALESCE(pg_catalog.pg_current_xact_id_if_assigned(), '0'::pg_catalog.xid8))"
					"         OPERATOR(pg_catalog.>=) pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot()),"
					"       (SELECT x.extversion FROM pg_catalog.pg_extension x"
					"        WHERE x.extname OPERATOR(pg_catalog.=) 'task_events')"
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
		value = SPI_getbinval(row, desc, 8, &isnull);
		if (!isnull && DatumGetBool(value))
			te_report_log_in_future();
		te_require_schema_version(SPI_getvalue(row, desc, 9));
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
 * row; then either retry the dead letters queued for it, or handle up to
 * max_events events of its window in seq order (one, while the events of a
 * lost batch are isolated); and save its position.  All in the caller's
 * transaction; assumes SPI is connected and an active snapshot.  Returns
 * false when the handler could not be run (someone else runs it, or it was
 * disabled or deleted since the peek); *outcome says what happened.
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
	int			budget = 0;
	bool		retried = false;
	bool		window_done = false;
	bool		stopped = false;

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

	if (!retried && te_open_window(&st))
	{
		budget = (st.isolate_through > st.window_seq) ? 1 : max_events;
		count = te_fetch_batch(&st, budget, &batch, &max_seq);
		if (count > 0 && !te_dead_letter_if_exhausted(&st, batch))
		{
			ErrorData  *error = NULL;

			if (te_call(&st, batch, false, cxt, &error))
				te_mark_done(&st, max_seq, count, true);
			else
				stopped = !te_run_one_by_one(&st, batch, cxt);
		}
		window_done = !stopped && count < budget;
		if (window_done)
		{
			te_close_window(&st);
			st.changed = true;
		}
	}

	st.batch_ms = (double) (GetCurrentTimestamp() - started) / 1000.0;
	if (st.changed)
		te_save_state(&st);

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
		 (window_done && !st.opened_window));
	return true;
}
