/*
 * task_domain.c
 *		The task aggregate: create_task, update_status and complete_task.
 *
 * Each call validates its arguments, locks the task's row, checks the
 * transition, appends the resulting events to the log, updates the task and
 * publishes the events, all in the caller's transaction.  Concurrent calls
 * on one task serialize on the row lock (SELECT ... FOR UPDATE), so versions
 * stay contiguous whatever the interleaving.
 *
 * Transitions: pending -> in_progress | completed | cancelled;
 * in_progress -> pending | completed | cancelled; completed and cancelled
 * are final.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_enum.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/syscache.h"

#include "domain_events.h"
#include "event_log.h"
#include "event_publish.h"
#include "spi_util.h"
#include "uuid_v7.h"
#include "validate.h"

typedef enum TaskStatus
{
	TS_PENDING,
	TS_IN_PROGRESS,
	TS_COMPLETED,
	TS_CANCELLED
} TaskStatus;

/* Labels of task_events.task_status, indexed by TaskStatus. */
static const char *const te_status_labels[] = {
	"pending", "in_progress", "completed", "cancelled"
};

static SPIPlanPtr te_insert_task_plan = NULL;
static SPIPlanPtr te_lock_task_plan = NULL;
static SPIPlanPtr te_update_task_plan = NULL;

static TaskStatus
te_status_from_label(const char *label)
{
	size_t		i;

	for (i = 0; i < lengthof(te_status_labels); i++)
		if (strcmp(label, te_status_labels[i]) == 0)
			return (TaskStatus) i;
	elog(ERROR, "unknown task status \"%s\"", label);
	pg_unreachable();
}

/* The label of a task_status enum value, from the pg_enum syscache. */
static TaskStatus
te_status_from_enum(Oid enumval)
{
	HeapTuple	tup = SearchSysCache1(ENUMOID, ObjectIdGetDatum(enumval));
	TaskStatus	status;

	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for enum value %u", enumval);
	status = te_status_from_label(NameStr(((Form_pg_enum) GETSTRUCT(tup))->enumlabel));
	ReleaseSysCache(tup);
	return status;
}

static bool
te_transition_allowed(TaskStatus from, TaskStatus to)
{
	if (from == TS_COMPLETED || from == TS_CANCELLED)
		return false;
	return from != to;
}

/*
 * Copy the single row SPI just returned into a tuple of the function's
 * result type (task_events.tasks), allocated in the caller's context so that
 * it outlives SPI_finish().
 */
static Datum
te_result_row(FunctionCallInfo fcinfo, MemoryContext caller_cxt)
{
	TupleDesc	result_desc;
	HeapTuple	row = SPI_tuptable->vals[0];
	TupleDesc	row_desc = SPI_tuptable->tupdesc;
	Datum	   *values;
	bool	   *nulls;
	MemoryContext old;
	HeapTuple	result;

	if (get_call_result_type(fcinfo, NULL, &result_desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	if (result_desc->natts != row_desc->natts)
		elog(ERROR, "task_events.tasks has %d columns, the function's result %d",
			 row_desc->natts, result_desc->natts);

	values = palloc(sizeof(Datum) * row_desc->natts);
	nulls = palloc(sizeof(bool) * row_desc->natts);
	heap_deform_tuple(row, row_desc, values, nulls);

	old = MemoryContextSwitchTo(caller_cxt);
	result = heap_form_tuple(BlessTupleDesc(result_desc), values, nulls);
	MemoryContextSwitchTo(old);
	return HeapTupleGetDatum(result);
}

/*
 * create_task(user_id text, title text, description text DEFAULT NULL)
 *		RETURNS task_events.tasks
 *
 * A pending task at version 1 and its TaskCreated event.
 */
PG_FUNCTION_INFO_V1(create_task);
Datum
create_task(PG_FUNCTION_ARGS)
{
	static const Oid argtypes[] = {UUIDOID, TEXTOID, TEXTOID, TEXTOID, TIMESTAMPTZOID};
	MemoryContext caller_cxt = CurrentMemoryContext;
	TaskFacts	task;
	char	   *description;
	TimestampTz now = GetCurrentTimestamp();
	TaskEvent	created;
	Datum		values[5];
	char		nulls[5] = {' ', ' ', ' ', ' ', ' '};
	Datum		result;

	task.user_id = te_required_text_arg(fcinfo, 0, "user_id", TE_MAX_USER_ID_CHARS);
	task.title = te_required_text_arg(fcinfo, 1, "title", TE_MAX_TITLE_CHARS);
	description = te_optional_text_arg(fcinfo, 2, "description", TE_MAX_DESCRIPTION_CHARS);
	te_uuid_v7(now, &task.task_id);

	SPI_connect();
	te_prepare_kept(&te_insert_task_plan,
					"INSERT INTO task_events.tasks"
					" (task_id, user_id, title, description, status, version,"
					"  created_at, updated_at)"
					" VALUES ($1, $2, $3, $4, 'pending', 1, $5, $5)"
					" RETURNING *",
					lengthof(argtypes), argtypes);
	values[0] = UUIDPGetDatum(&task.task_id);
	values[1] = CStringGetTextDatum(task.user_id);
	values[2] = CStringGetTextDatum(task.title);
	values[3] = description ? CStringGetTextDatum(description) : (Datum) 0;
	nulls[3] = description ? ' ' : 'n';
	values[4] = TimestampTzGetDatum(now);
	te_execute_kept(te_insert_task_plan, values, nulls, SPI_OK_INSERT_RETURNING);
	result = te_result_row(fcinfo, caller_cxt);

	te_task_created(&created, &task, 1, now);
	te_append_event(&created);
	te_publish_event(&created);

	SPI_finish();
	PG_RETURN_DATUM(result);
}

/*
 * Move a task to new_status: the row-locked core of update_status and
 * complete_task.  Returns the updated row as a task_events.tasks datum.
 */
static Datum
te_change_status(FunctionCallInfo fcinfo, pg_uuid_t *task_id, TaskStatus new_status,
				 bool check_version, int64 expected_version)
{
	static const Oid lock_types[] = {UUIDOID};
	static const Oid update_types[] = {UUIDOID, TEXTOID, INT8OID, TIMESTAMPTZOID, TIMESTAMPTZOID};
	MemoryContext caller_cxt = CurrentMemoryContext;
	TimestampTz now = GetCurrentTimestamp();
	TaskFacts	task;
	TaskStatus	old_status;
	int64		version;
	HeapTuple	row;
	TupleDesc	desc;
	bool		isnull;
	TaskEvent	events[2];
	int			nevents = 0;
	int			i;
	Datum		values[5];
	char		nulls[5] = {' ', ' ', ' ', ' ', ' '};
	Datum		result;

	SPI_connect();
	te_prepare_kept(&te_lock_task_plan,
					"SELECT status::pg_catalog.text, version, user_id, title"
					" FROM task_events.tasks WHERE task_id OPERATOR(pg_catalog.=) $1 FOR UPDATE",
					lengthof(lock_types), lock_types);
	values[0] = UUIDPGetDatum(task_id);
	te_execute_kept(te_lock_task_plan, values, NULL, SPI_OK_SELECT);
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("task %s does not exist", te_uuid_string(task_id))));

	row = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	old_status = te_status_from_label(SPI_getvalue(row, desc, 1));
	version = DatumGetInt64(SPI_getbinval(row, desc, 2, &isnull));
	task.task_id = *task_id;
	task.user_id = SPI_getvalue(row, desc, 3);
	task.title = SPI_getvalue(row, desc, 4);

	if (check_version && expected_version != version)
		ereport(ERROR,
				(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
				 errmsg("task %s is at version " INT64_FORMAT ", not the expected version " INT64_FORMAT,
						te_uuid_string(task_id), version, expected_version),
				 errhint("Read the task again and retry with its current version.")));

	if (!te_transition_allowed(old_status, new_status))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cannot change task %s from status \"%s\" to \"%s\"",
						te_uuid_string(task_id), te_status_labels[old_status],
						te_status_labels[new_status]),
				 old_status == new_status ?
				 errdetail("The task is already in status \"%s\".", te_status_labels[old_status]) :
				 errdetail("Status \"%s\" is final.", te_status_labels[old_status])));

	/* Reachable only by writing the table directly, but never wrap. */
	if (version > PG_INT64_MAX - 2)
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("task %s is at the highest version, " INT64_FORMAT,
						te_uuid_string(task_id), version)));

	te_task_status_changed(&events[nevents++], &task, ++version, now,
						   te_status_labels[old_status], te_status_labels[new_status]);
	if (new_status == TS_COMPLETED)
		te_task_completed(&events[nevents++], &task, ++version, now);
	for (i = 0; i < nevents; i++)
		te_append_event(&events[i]);

	te_prepare_kept(&te_update_task_plan,
					"UPDATE task_events.tasks"
					" SET status = $2::task_events.task_status, version = $3,"
					"     updated_at = $4, completed_at = $5"
					" WHERE task_id OPERATOR(pg_catalog.=) $1 RETURNING *",
					lengthof(update_types), update_types);
	values[0] = UUIDPGetDatum(task_id);
	values[1] = CStringGetTextDatum(te_status_labels[new_status]);
	values[2] = Int64GetDatum(version);
	values[3] = TimestampTzGetDatum(now);
	values[4] = TimestampTzGetDatum(now);
	nulls[4] = (new_status == TS_COMPLETED) ? ' ' : 'n';
	te_execute_kept(te_update_task_plan, values, nulls, SPI_OK_UPDATE_RETURNING);
	result = te_result_row(fcinfo, caller_cxt);

	for (i = 0; i < nevents; i++)
		te_publish_event(&events[i]);

	SPI_finish();
	return result;
}

/*
 * update_status(task_id uuid, new_status task_events.task_status,
 *				 expected_version bigint DEFAULT NULL) RETURNS task_events.tasks
 */
PG_FUNCTION_INFO_V1(update_status);
Datum
update_status(PG_FUNCTION_ARGS)
{
	te_require_not_null(fcinfo, 0, "task_id");
	te_require_not_null(fcinfo, 1, "new_status");

	PG_RETURN_DATUM(te_change_status(fcinfo, PG_GETARG_UUID_P(0),
									 te_status_from_enum(PG_GETARG_OID(1)),
									 !PG_ARGISNULL(2),
									 PG_ARGISNULL(2) ? 0 : PG_GETARG_INT64(2)));
}

/*
 * complete_task(task_id uuid, expected_version bigint DEFAULT NULL)
 *		RETURNS task_events.tasks
 */
PG_FUNCTION_INFO_V1(complete_task);
Datum
complete_task(PG_FUNCTION_ARGS)
{
	te_require_not_null(fcinfo, 0, "task_id");

	PG_RETURN_DATUM(te_change_status(fcinfo, PG_GETARG_UUID_P(0), TS_COMPLETED,
									 !PG_ARGISNULL(1),
									 PG_ARGISNULL(1) ? 0 : PG_GETARG_INT64(1)));
}
