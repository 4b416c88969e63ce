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

/*
 * Prepare sql into *plan and keep it, unless *plan is already set.  Assumes
 * SPI is connected.
 *
 * The plan is generic from the first run: every kept statement is written
 * so that its generic plan is the right one (look-ups by key, inserts, index
 * ranges; see te_window_min_seq), and planning again at each run would cost
 * more than the statement itself on the workers' hot path.  Left to itself,
 * the plan cache keeps planning such a statement whenever the generic plan's
 * estimate looks worse than the custom ones'.
 */
void
te_prepare_kept(SPIPlanPtr *plan, const char *sql, int nargs, const Oid *argtypes)
{
	SPIPlanPtr	prepared;

	if (*plan != NULL)
		return;
	prepared = SPI_prepare_cursor(sql, nargs, (Oid *) argtypes, CURSOR_OPT_GENERIC_PLAN);
	if (prepared == NULL)
		elog(ERROR, "SPI_prepare failed for \"%s\": %s",
			 sql, SPI_result_code_string(SPI_result));
	if (SPI_keepplan(prepared) != 0)
		elog(ERROR, "SPI_keepplan failed for \"%s\"", sql);
	*plan = prepared;
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
