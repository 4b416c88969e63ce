/*
 * dead_letters.c
 *		A handler's failing events: attempts counted, retries after a
 *		backoff, dead letters once the attempts are used up, and the retry
 *		of dead letters that retry_dead_letters() queued.
 *
 * Each call runs in a subtransaction (handler_call.c).  When a whole batch
 * fails, its events are retried one at a time to find the one that fails;
 * the ones before it are kept, the failing one's attempt is counted (after
 * rolling back the attempt, so the count survives) and the handler waits
 * retry_delay * 2^(attempts - 1) before trying it again.  After
 * max_attempts the event goes to task_events.dead_letters and the handler
 * moves on.  A lost batch counts its attempt in lost_batch.c; its event,
 * once isolated and out of attempts, is dead-lettered here without another
 * call.
 *
 * Everything here is written in the batch's transaction, into the
 * handler's state (HandlerState, saved by dispatch.c) and the dead letters
 * table: a failure is recorded together with the position it leaves.
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "dead_letters.h"
#include "handler_state.h"
#include "spi_util.h"
#include "task_events.h"

/* Longest wait between two attempts at a failing event. */
#define TE_MAX_RETRY_DELAY_MS (10 * 60 * 1000)

static SPIPlanPtr te_dead_letter_plan = NULL;
static SPIPlanPtr te_retry_select_plan = NULL;
static SPIPlanPtr te_retry_done_plan = NULL;
static SPIPlanPtr te_retry_failed_plan = NULL;

/* Put event seq into the handler's dead letters, with its attempts and error. */
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
bool
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
bool
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
bool
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
