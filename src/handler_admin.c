/*
 * handler_admin.c
 *		SQL functions to drive the handlers by hand: process_pending() runs
 *		them in the caller's session, retry_dead_letters() queues dead
 *		letters for another attempt.
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "dispatch.h"
#include "spi_util.h"
#include "task_events.h"
#include "validate.h"

static SPIPlanPtr te_handler_exists_plan = NULL;
static SPIPlanPtr te_queue_retry_plan = NULL;

/* Raise 42704 unless handler is registered.  Assumes SPI is connected. */
static void
te_require_handler(const char *handler)
{
	static const Oid argtypes[] = {TEXTOID};
	Datum		values[1];

	te_prepare_kept(&te_handler_exists_plan,
					"SELECT FROM task_events.handlers WHERE handler OPERATOR(pg_catalog.=) $1",
					lengthof(argtypes), argtypes);
	values[0] = CStringGetTextDatum(handler);
	te_execute_kept(te_handler_exists_plan, values, NULL, SPI_OK_SELECT);
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("handler \"%s\" does not exist", handler),
				 errhint("The handlers are listed in task_events.handlers.")));
}

/* The peek of lane in peeks, or NULL (the lane was retired meanwhile). */
static const HandlerPeek *
te_find_lane(List *peeks, int32 lane)
{
	ListCell   *lc;

	foreach(lc, peeks)
	{
		const HandlerPeek *peek = lfirst(lc);

		if (peek->lane == lane)
			return peek;
	}
	return NULL;
}

/*
 * Run a lane of handler until it has no more work or max_events were
 * handled; returns the number handled.  Each batch gets a fresh snapshot
 * (under READ COMMITTED) and its own memory context.
 */
static int64
te_drain_handler(const char *handler, int32 lane, int64 max_events)
{
	MemoryContext batch_cxt = AllocSetContextCreate(CurrentMemoryContext,
													"task_events process_pending",
													ALLOCSET_DEFAULT_SIZES);
	int64		handled = 0;

	while (handled < max_events)
	{
		MemoryContext old = MemoryContextSwitchTo(batch_cxt);
		const HandlerPeek *peek;
		BatchOutcome outcome;
		bool		ran = false;

		PushActiveSnapshot(GetTransactionSnapshot());
		peek = te_find_lane(te_peek_handlers(handler, batch_cxt), lane);
		if (peek != NULL)
			ran = te_run_handler_batch(peek,
									   (int) Min(te_batch_size, max_events - handled),
									   &outcome);
		PopActiveSnapshot();
		MemoryContextSwitchTo(old);
		MemoryContextReset(batch_cxt);

		if (!ran)
			break;
		handled += outcome.done;
		if (!outcome.more)
			break;
	}
	MemoryContextDelete(batch_cxt);
	return handled;
}

/*
 * process_pending(handler text DEFAULT NULL, max_events int DEFAULT 1000)
 *		RETURNS bigint
 *
 * Runs the named handler (or every enabled one) in the caller's
 * transaction, with the code the workers run, until it has nothing left or
 * max_events events were handled per handler lane, one lane after the
 * other.  Returns the number of events handled.  A lane a worker is
 * running right now is skipped.
 */
PG_FUNCTION_INFO_V1(process_pending);
Datum
process_pending(PG_FUNCTION_ARGS)
{
	char	   *only = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));
	int32		max_events;
	List	   *handlers;
	ListCell   *lc;
	int64		handled = 0;

	te_require_not_null(fcinfo, 1, "max_events");
	max_events = PG_GETARG_INT32(1);
	if (max_events < 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_events must be at least 1, not %d", max_events)));

	SPI_connect();
	if (only != NULL)
		te_require_handler(only);
	handlers = te_peek_handlers(only, CurrentMemoryContext);
	foreach(lc, handlers)
	{
		const HandlerPeek *peek = lfirst(lc);

		handled += te_drain_handler(peek->handler, peek->lane, max_events);
	}
	SPI_finish();
	PG_RETURN_INT64(handled);
}

/*
 * retry_dead_letters(handler text DEFAULT NULL) RETURNS bigint
 *
 * Queues the dead letters of handler (or of all handlers) for one more
 * attempt each and wakes the workers at commit.  Returns how many were
 * queued.  A retried event that fails again goes back to the dead letters
 * with its new error.
 */
PG_FUNCTION_INFO_V1(retry_dead_letters);
Datum
retry_dead_letters(PG_FUNCTION_ARGS)
{
	static const Oid argtypes[] = {TEXTOID};
	Datum		values[1];
	char		nulls[1] = {' '};
	int64		queued;

	SPI_connect();
	if (PG_ARGISNULL(0))
		nulls[0] = 'n';
	else
	{
		te_require_handler(text_to_cstring(PG_GETARG_TEXT_PP(0)));
		values[0] = PG_GETARG_DATUM(0);
	}
	te_prepare_kept(&te_queue_retry_plan,
					"UPDATE task_events.dead_letters SET retry_requested = true"
					" WHERE ($1 IS NULL OR handler OPERATOR(pg_catalog.=) $1)"
					"   AND NOT retry_requested",
					lengthof(argtypes), argtypes);
	te_execute_kept(te_queue_retry_plan, values, nulls, SPI_OK_UPDATE);
	queued = (int64) SPI_processed;
	SPI_finish();

	if (queued > 0)
		te_wake_workers_at_commit();
	PG_RETURN_INT64(queued);
}
