/* task_events.h: settings and shared state of the task_events module */
#ifndef TE_TASK_EVENTS_H
#define TE_TASK_EVENTS_H

#include "storage/latch.h"

/* Upper bound of task_events.worker_count. */
#define TE_MAX_WORKERS 16

/* Who publishes events on the NOTIFY channel (task_events.notify_mode). */
typedef enum TeNotifyMode
{
	TE_NOTIFY_COMMIT,			/* the writing transaction, at its commit */
	TE_NOTIFY_RELAY,			/* the relay handler, after the commit */
	TE_NOTIFY_OFF				/* nobody */
} TeNotifyMode;

/* GUCs (task_events.c). */
extern int	te_notify_mode;
extern char *te_database;
extern int	te_worker_count;
extern int	te_batch_size;
extern int	te_max_attempts;
extern int	te_retry_delay_ms;
extern int	te_poll_interval_ms;

/*
 * Shared memory: the latches of the running workers, so that a committing
 * writer can wake them.  NULL in a backend of a server that was started
 * without shared_preload_libraries = 'task_events' (no workers then).
 */
typedef struct TeSharedState
{
	Latch	   *worker_latch[TE_MAX_WORKERS];	/* NULL while a slot's worker is down */
} TeSharedState;

extern TeSharedState *te_shared;

/* wakeup.c */
extern void te_wake_workers_at_commit(void);
extern void te_wake_workers(void);

/* worker.c */
extern PGDLLEXPORT void te_worker_main(Datum main_arg);

#endif
