/*
 * lost_batch.c
 *		Counting a batch whose outcome was lost: its handler ended the
 *		worker's process, or its transaction failed to commit.
 *
 * Either way nothing of the batch survives, not even the failure count
 * dispatch.c would have saved with it, so the failure is recorded here, in
 * a transaction of its own, from what the worker knew before the loss (the
 * call journal after a process death, the batch's outcome after a failed
 * commit):
 * - one window event: a failed attempt at it, with the usual backoff; once
 *   its attempts reach max_attempts, the next batch dead-letters it without
 *   calling the handler again (dead_letters.c, te_dead_letter_if_exhausted);
 * - several: the handler cannot say which event it was, so a failed attempt
 *   is counted for the handler and its events are isolated, handled one per
 *   batch (isolate_through) until past the last one, so that a repeated loss
 *   names its event;
 * - dead letters being retried: each goes back to the dead letters with this
 *   error, as a retry that fails does.
 * Nothing is recorded when the state row's generation moved on: the batch
 * committed after all (the process ended after its commit), or another
 * worker ran the handler since.  A generation behind the call's means that
 * the batches before it were lost too (asynchronous commits, undone by the
 * crash): the call did not commit either, and is counted.  A handler's first batch also creates its
 * state row, which is lost with it: the row is created again here.  All of
 * this is per lane: the call names its lane, whose state row is counted.
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"

#include "dead_letters.h"
#include "dispatch.h"
#include "spi_util.h"
#include "task_events.h"

static SPIPlanPtr te_lost_lock_plan = NULL;
static SPIPlanPtr te_lost_create_plan = NULL;
static SPIPlanPtr te_lost_save_plan = NULL;
static SPIPlanPtr te_lost_retries_plan = NULL;

/*
 * Record the loss of the calls in *calls with the error sqlerrcode/message.
 * Returns false when there was nothing to record (see above).  Assumes a
 * transaction, SPI and an active snapshot; waits for the state row's lock.
 */
bool
te_record_lost_batch(const CalledRange *calls, int sqlerrcode, const char *message)
{
	static const Oid lock_types[] = {TEXTOID, INT8OID, INT4OID};
	static const Oid save_types[] = {TEXTOID, INT8OID, INT4OID, TIMESTAMPTZOID, INT8OID, TEXTOID, TEXTOID,
	INT4OID};
	static const Oid retry_types[] = {TEXTOID, INT8OID, INT8OID, TEXTOID, TEXTOID};
	const char *sqlstate = unpack_sql_state(sqlerrcode);
	Datum		values[8];
	char		nulls[8];
	bool		isnull;
	int64		failing_seq;
	int32		attempts;
	int64		isolate_through;
	int			backoff_attempts = 1;

	te_prepare_kept(&te_lost_lock_plan,
					"SELECT COALESCE(s.failing_seq, 0), s.attempts, s.isolate_through"
					" FROM task_events.handler_state s"
					" WHERE s.handler OPERATOR(pg_catalog.=) $1"
					"   AND s.generation OPERATOR(pg_catalog.<=) $2"
					"   AND s.lane OPERATOR(pg_catalog.=) $3"
					" FOR UPDATE",
					lengthof(lock_types), lock_types);
	values[0] = CStringGetTextDatum(calls->handler);
	values[1] = Int64GetDatum(calls->generation);
	values[2] = Int32GetDatum(calls->lane);
	if (calls->generation == 0 && calls->lane == 0)
	{
		te_prepare_kept(&te_lost_create_plan,
						"INSERT INTO task_events.handler_state (handler)"
						" SELECT h.handler FROM task_events.handlers h"
						" WHERE h.handler OPERATOR(pg_catalog.=) $1"
						" ON CONFLICT DO NOTHING",
						1, lock_types);
		te_execute_kept(te_lost_create_plan, values, NULL, SPI_OK_INSERT);
	}
	te_execute_kept(te_lost_lock_plan, values, NULL, SPI_OK_SELECT);
	if (SPI_processed == 0)
	{
		SPI_freetuptable(SPI_tuptable);
		return false;
	}
	failing_seq = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	attempts = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	isolate_through = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3, &isnull));
	SPI_freetuptable(SPI_tuptable);

	memset(nulls, ' ', sizeof(nulls));
	if (calls->retries)
	{
		te_prepare_kept(&te_lost_retries_plan,
						"UPDATE task_events.dead_letters"
						" SET attempts = attempts OPERATOR(pg_catalog.+) 1, sqlstate = $4, message = $5,"
						"     failed_at = pg_catalog.clock_timestamp(), retry_requested = false"
						" WHERE handler OPERATOR(pg_catalog.=) $1 AND retry_requested"
						"   AND seq OPERATOR(pg_catalog.>=) $2 AND seq OPERATOR(pg_catalog.<=) $3",
						lengthof(retry_types), retry_types);
		values[1] = Int64GetDatum(calls->first_seq);
		values[2] = Int64GetDatum(calls->last_seq);
		values[3] = CStringGetTextDatum(sqlstate);
		values[4] = CStringGetTextDatum(message);
		te_execute_kept(te_lost_retries_plan, values, NULL, SPI_OK_UPDATE);
	}
	else if (calls->first_seq == calls->last_seq)
	{
		attempts = (failing_seq == calls->first_seq) ? attempts + 1 : 1;
		failing_seq = calls->first_seq;
		isolate_through = Max(isolate_through, failing_seq);
		backoff_attempts = attempts;
	}
	else
		isolate_through = Max(isolate_through, calls->last_seq);

	te_prepare_kept(&te_lost_save_plan,
					"UPDATE task_events.handler_state SET"
					" failing_seq = $2, attempts = $3, retry_at = COALESCE($4, retry_at),"
					" isolate_through = $5,"
					" last_sqlstate = $6, last_error = $7, last_error_at = pg_catalog.clock_timestamp(),"
					" failed = failed OPERATOR(pg_catalog.+) 1,"
					" generation = generation OPERATOR(pg_catalog.+) 1"
					" WHERE handler OPERATOR(pg_catalog.=) $1 AND lane OPERATOR(pg_catalog.=) $8",
					lengthof(save_types), save_types);
	values[7] = Int32GetDatum(calls->lane);
	values[1] = Int64GetDatum(failing_seq);
	nulls[1] = failing_seq != 0 ? ' ' : 'n';	/* no NULLIF: its = follows search_path */
	values[2] = Int32GetDatum(attempts);
	/*
	 * Queued retries are taken off the queue: nothing to wait for.  An event
	 * out of attempts is dead-lettered by the next batch: no wait either.
	 */
	values[3] = TimestampTzGetDatum(failing_seq != 0 && attempts >= te_max_attempts ?
									GetCurrentTimestamp() : te_backoff_until(backoff_attempts));
	nulls[3] = calls->retries ? 'n' : ' ';
	values[4] = Int64GetDatum(isolate_through);
	values[5] = CStringGetTextDatum(sqlstate);
	values[6] = CStringGetTextDatum(message);
	te_execute_kept(te_lost_save_plan, values, nulls, SPI_OK_UPDATE);
	return true;
}
