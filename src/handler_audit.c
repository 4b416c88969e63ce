/*
 * handler_audit.c
 *		The built-in audit handler: one task_events.audit_log row per event,
 *		every event, its event_data equal to the event's payload.
 *
 * recorded_at is the wall-clock time the row was written
 * (clock_timestamp()), so recorded_at - occurred_at is the handling lag.
 * One INSERT per batch.
 */
#include "postgres.h"

#include "fmgr.h"

#include "spi_util.h"

static HandlerPlan te_audit_plan;

PG_FUNCTION_INFO_V1(audit_handler);
Datum
audit_handler(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0))
		PG_RETURN_VOID();

	SPI_connect();
	te_handler_exec(fcinfo, &te_audit_plan,
					"INSERT INTO task_events.audit_log"
					" (event_id, seq, event_type, event_data, occurred_at, recorded_at)"
					" SELECT e.event_id, e.seq, e.event_type, e.payload, e.occurred_at,"
					"        pg_catalog.clock_timestamp()"
					" FROM pg_catalog.unnest($1) AS e ORDER BY e.seq");
	SPI_finish();
	PG_RETURN_VOID();
}
