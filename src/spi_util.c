/*
 * spi_util.c
 *		Prepared SPI plans kept for the life of the backend.
 *
 * The write path runs the same few statements on every call; planning them
 * once and keeping the plans (SPI_keepplan) saves the parse, analysis and
 * planning of each call.  The plan cache replans by itself when a table the
 * plan uses is altered, dropped or re-created.
 */
#include "postgres.h"

#include "utils/lsyscache.h"

#include "spi_util.h"

static void
te_prepare_kept_with(SPIPlanPtr *plan, const char *sql, int nargs,
					 const Oid *argtypes, int cursor_options)
{
	SPIPlanPtr	prepared;

	if (*plan != NULL)
		return;
	prepared = SPI_prepare_cursor(sql, nargs, (Oid *) argtypes, cursor_options);
	if (prepared == NULL)
		elog(ERROR, "SPI_prepare failed for \"%s\": %s",
			 sql, SPI_result_code_string(SPI_result));
	if (SPI_keepplan(prepared) != 0)
		elog(ERROR, "SPI_keepplan failed for \"%s\"", sql);
	*plan = prepared;
}

/*
 * Prepare sql into *plan and keep it, unless *plan is already set.  Assumes
 * SPI is connected.
 */
void
te_prepare_kept(SPIPlanPtr *plan, const char *sql, int nargs, const Oid *argtypes)
{
	te_prepare_kept_with(plan, sql, nargs, argtypes, 0);
}

/*
 * The same, for a statement whose best plan depends on its parameter values
 * (e.g. how far back a snapshot's xmin reaches in the log): planned again
 * with the values at every run.  The plan cache would otherwise switch to a
 * generic plan after five runs, one that can walk the whole log.
 */
void
te_prepare_kept_custom(SPIPlanPtr *plan, const char *sql, int nargs, const Oid *argtypes)
{
	te_prepare_kept_with(plan, sql, nargs, argtypes, CURSOR_OPT_CUSTOM_PLAN);
}

/*
 * Execute a kept plan as a read-write statement and check that SPI answered
 * expected_ret (SPI_OK_SELECT, SPI_OK_INSERT_RETURNING, ...).
 */
void
te_execute_kept(SPIPlanPtr plan, Datum *values, const char *nulls, int expected_ret)
{
	int			ret = SPI_execute_plan(plan, values, nulls, false, 0);

	if (ret != expected_ret)
		elog(ERROR, "SPI_execute_plan returned %s, expected %s",
			 SPI_result_code_string(ret), SPI_result_code_string(expected_ret));
}

/*
 * Run sql with the handler's batch (argument 0 of fcinfo) as $1.  Assumes
 * SPI is connected.
 */
void
te_handler_exec(FunctionCallInfo fcinfo, HandlerPlan *hp, const char *sql)
{
	Oid			function = fcinfo->flinfo->fn_oid;
	Datum		values[1];

	if (hp->function != function)
	{
		Oid		   *argtypes;
		int			nargs;

		if (hp->plan != NULL)
			SPI_freeplan(hp->plan);
		hp->plan = NULL;
		(void) get_func_signature(function, &argtypes, &nargs);
		if (nargs != 1)
			elog(ERROR, "a task_events handler takes one argument, function %u takes %d",
				 function, nargs);
		te_prepare_kept(&hp->plan, sql, 1, argtypes);
		hp->function = function;
	}
	values[0] = PG_GETARG_DATUM(0);
	if (SPI_execute_plan(hp->plan, values, NULL, false, 0) < 0)
		elog(ERROR, "could not run handler statement \"%s\"", sql);
}
