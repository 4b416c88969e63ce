/*
 * task_events.c
 *		Module entry point of the task_events extension.
 *
 * The write path (task_domain.c and the files it calls) needs nothing from
 * _PG_init; background workers, GUCs and shared memory register here.
 */
#include "postgres.h"

#include "fmgr.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

void
_PG_init(void)
{
}
