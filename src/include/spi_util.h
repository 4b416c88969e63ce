/* spi_util.h: prepared SPI plans kept for the life of the backend */
#ifndef TE_SPI_UTIL_H
#define TE_SPI_UTIL_H

#include "executor/spi.h"

extern void te_prepare_kept(SPIPlanPtr *plan, const char *sql,
							int nargs, const Oid *argtypes);
extern void te_execute_kept(SPIPlanPtr plan, Datum *values, const char *nulls,
							int expected_ret);

#endif
