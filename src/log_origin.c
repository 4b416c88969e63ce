/*
 * log_origin.c
 *		Whose transaction ids the event log holds.
 *
 * events.xact_id and the handlers' positions (pg_snapshot) are transaction
 * ids of the cluster that wrote them.  task_events.log_origin names that
 * cluster by its system identifier; pg_dump carries the row.  After a
 * restore into another cluster the ids mean nothing there (new events could
 * look already handled), so writers and handlers refuse to run until
 * task_events.adopt_restored_log() has translated them (install script).
 *
 * A restore into a cluster with the same identifier can be just as wrong:
 * a clone made earlier by pg_basebackup or point-in-time recovery shares
 * the identifier but its transaction counter is behind the source's.  Ids
 * the restored log holds (a position's xmax, an event's xact_id) then lie in
 * this cluster's future, and events written now would get ids that the
 * restored positions count as handled.  That is refused the same way, and
 * adopt_restored_log() translates those ids too.
 */
#include "postgres.h"

#include "access/xlog.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/lsyscache.h"

#include "log_origin.h"
#include "spi_util.h"

/* Raise 55000: the log holds transaction ids this cluster has not reached. */
void
te_report_log_in_future(void)
{
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("the task_events event log holds transaction ids this cluster has not reached"),
			 errdetail("It was restored from a backup taken later than this cluster's state, for example into a clone made earlier by pg_basebackup or point-in-time recovery."),
			 errhint("Run SELECT task_events.adopt_restored_log(); as a superuser once the restore is complete.")));
}

/*
 * Raise 55000 unless every row of task_events.log_origin names this
 * cluster and no id of the log lies in its future.  Checked once per
 * backend and per log_origin table (a dropped and re-created extension is
 * checked again); the workers also check the future at every round
 * (dispatch.c).  Assumes SPI is connected.
 */
void
te_require_native_log(void)
{
	static SPIPlanPtr plan = NULL;
	static Oid	checked_relid = InvalidOid;
	static const Oid argtypes[] = {INT8OID};
	Oid			relid = get_relname_relid("log_origin",
										  get_namespace_oid("task_events", false));
	Datum		values[1];
	bool		isnull;
	bool		native;
	bool		in_future;

	if (OidIsValid(relid) && relid == checked_relid)
		return;

	te_prepare_kept(&plan,
					"SELECT NOT EXISTS (SELECT FROM task_events.log_origin o"
					"                   WHERE o.system_identifier OPERATOR(pg_catalog.<>) $1),"
					"       EXISTS (SELECT FROM task_events.handler_state s"
					"               WHERE GREATEST(pg_catalog.pg_snapshot_xmax(s.window_start),"
					"                              pg_catalog.pg_snapshot_xmax(s.window_end))"
					"                     OPERATOR(pg_catalog.>) pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot()))"
					"       OR (SELECT pg_catalog.max(e.xact_id) FROM task_events.events e"
					"          WHERE e.xact_id OPERATOR(pg_catalog.<>) COALESCE(pg_catalog.pg_current_xact_id_if_assigned(), '0'::pg_catalog.xid8))"
					"          OPERATOR(pg_catalog.>=) pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())",
					lengthof(argtypes), argtypes);
	values[0] = Int64GetDatum((int64) GetSystemIdentifier());
	te_execute_kept(plan, values, NULL, SPI_OK_SELECT);
	native = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	in_future = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull)) &&
		!isnull;
	SPI_freetuptable(SPI_tuptable);

	if (!native)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("the task_events event log was restored from another cluster"),
				 errdetail("Its transaction ids and the handlers' positions belong to the cluster it was dumped from."),
				 errhint("Run SELECT task_events.adopt_restored_log(); as a superuser once the restore is complete.")));
	if (in_future)
		te_report_log_in_future();
	checked_relid = relid;
}
