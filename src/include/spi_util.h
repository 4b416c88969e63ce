/* spi_util.h: prepared SPI plans kept for the life of the backend */
#ifndef TE_SPI_UTIL_H
#define TE_SPI_UTIL_H

#include "executor/spi.h"
#include "fmgr.h"

extern void te_prepare_kept(SPIPlanPtr *plan, const char *sql,
							int nargs, const Oid *argtypes);
extern void te_execute_kept(SPIPlanPtr plan, Datum *values, const char *nulls,
							int expected_ret);

/*
 * A kept plan of a built-in handler: a statement over the handler's batch
 * ($1, of the handler function's argument type), replanned when the
 * function is re-created (its argument type's OID changes with it).
 */
typedef struct HandlerPlan
{
	Oid			function;
	SPIPlanPtr	plan;
} HandlerPlan;

extern void te_handler_exec(FunctionCallInfo fcinfo, HandlerPlan *hp, const char *sql);

#endif
