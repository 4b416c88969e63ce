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
 * A restore into the same cluster (same identifier) needs nothing.
 */
#include "postgres.h"

#include "access/xlog.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/lsyscache.h"

#include "log_origin.h"
#include "spi_util.h"

/*
 * Raise 55000 unless every row of task_events.log_origin names this
 * cluster.  Checked once per backend and per log_origin table (a dropped
 * and re-created extension is checked again).  Assumes SPI is connected.
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

	if (OidIsValid(relid) && relid == checked_relid)
		return;

	te_prepare_kept(&plan,
					"SELECT NOT EXISTS (SELECT FROM task_events.log_origin o"
					" WHERE o.system_identifier OPERATOR(pg_catalog.<>) $1)",
					lengthof(argtypes), argtypes);
	values[0] = Int64GetDatum((int64) GetSystemIdentifier());
	te_execute_kept(plan, values, NULL, SPI_OK_SELECT);
	native = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_freetuptable(SPI_tuptable);

	if (!native)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("the task_events event log was restored from another cluster"),
				 errdetail("Its transaction ids and the handlers' positions belong to the cluster it was dumped from."),
				 errhint("Run SELECT task_events.adopt_restored_log(); as a superuser once the restore is complete.")));
	checked_relid = relid;
}
