/*
 * append_only.c
 *		The trigger that keeps the event log append-only.
 *
 * Attached BEFORE UPDATE OR DELETE OR TRUNCATE FOR EACH STATEMENT and
 * enabled ALWAYS, so it fires for every role, the table owner and
 * superusers included, and under session_replication_role = replica.
 */
#include "postgres.h"

#include "commands/trigger.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

PG_FUNCTION_INFO_V1(refuse_modification);
Datum
refuse_modification(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	const char *operation;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "refuse_modification: not called by the trigger manager");

	if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
		operation = "UPDATE";
	else if (TRIGGER_FIRED_BY_DELETE(trigdata->tg_event))
		operation = "DELETE";
	else if (TRIGGER_FIRED_BY_TRUNCATE(trigdata->tg_event))
		operation = "TRUNCATE";
	else
		operation = "INSERT";

	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("%s on table %s.%s is not allowed", operation,
					get_namespace_name(RelationGetNamespace(trigdata->tg_relation)),
					RelationGetRelationName(trigdata->tg_relation)),
			 errdetail("The table is append-only: its rows can be added, never changed or removed.")));
	PG_RETURN_NULL();
}
