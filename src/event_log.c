/*
 * event_log.c
 *		Appending events to task_events.events, and reading a task's history.
 *
 * The log is append-only (a trigger refuses UPDATE, DELETE and TRUNCATE);
 * seq comes from task_events.events_seq_seq and xact_id defaults to the
 * inserting transaction.  Both are assigned by the INSERT.
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "funcapi.h"
#include "utils/builtins.h"

#include "event_log.h"
#include "log_origin.h"
#include "spi_util.h"
#include "task_events.h"
#include "validate.h"

static SPIPlanPtr te_insert_event_plan = NULL;
static SPIPlanPtr te_history_plan = NULL;

/*
 * Insert ev into the log and set ev->seq.  Assumes SPI is connected and the
 * task's row is locked by the caller, so that aggregate_version and seq grow
 * together.
 */
void
te_append_event(TaskEvent *ev)
{
	static const Oid argtypes[] = {
		UUIDOID, TEXTOID, INT4OID, UUIDOID, INT8OID, TIMESTAMPTZOID, TEXTOID, JSONBOID
	};
	Datum		values[8];
	bool		isnull;

	te_require_native_log();
	te_prepare_kept(&te_insert_event_plan,
					"INSERT INTO task_events.events"
					" (event_id, event_type, event_version, aggregate_id,"
					"  aggregate_version, occurred_at, user_id, payload)"
					" VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
					" RETURNING seq",
					lengthof(argtypes), argtypes);

	values[0] = UUIDPGetDatum(&ev->event_id);
	values[1] = CStringGetTextDatum(ev->event_type);
	values[2] = Int32GetDatum(TE_EVENT_SCHEMA_VERSION);
	values[3] = UUIDPGetDatum(&ev->aggregate_id);
	values[4] = Int64GetDatum(ev->aggregate_version);
	values[5] = TimestampTzGetDatum(ev->occurred_at);
	values[6] = CStringGetTextDatum(ev->user_id);
	values[7] = JsonbPGetDatum(ev->payload);

	te_execute_kept(te_insert_event_plan, values, NULL, SPI_OK_INSERT_RETURNING);
	ev->seq = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
										  SPI_tuptable->tupdesc, 1, &isnull));
	te_wake_workers_at_commit();
}

/*
 * task_history(task_id uuid) RETURNS SETOF task_events.events
 *
 * The task's events in aggregate_version order; P0002 when it has none,
 * since every task has at least its TaskCreated event.
 */
PG_FUNCTION_INFO_V1(task_history);
Datum
task_history(PG_FUNCTION_ARGS)
{
	static const Oid argtypes[] = {UUIDOID};
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Datum		values[1];
	uint64		i;

	te_require_not_null(fcinfo, 0, "task_id");
	InitMaterializedSRF(fcinfo, 0);

	SPI_connect();
	te_prepare_kept(&te_history_plan,
					"SELECT * FROM task_events.events"
					" WHERE aggregate_id OPERATOR(pg_catalog.=) $1 ORDER BY aggregate_version",
					lengthof(argtypes), argtypes);
	values[0] = PG_GETARG_DATUM(0);
	if (SPI_execute_plan(te_history_plan, values, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read the history of a task");

	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("task %s does not exist",
						te_uuid_string(PG_GETARG_UUID_P(0)))));

	for (i = 0; i < SPI_processed; i++)
		tuplestore_puttuple(rsinfo->setResult, SPI_tuptable->vals[i]);
	SPI_finish();

	return (Datum) 0;
}
