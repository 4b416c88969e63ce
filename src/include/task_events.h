/* task_events.h: settings and shared state of the task_events module */
#ifndef TE_TASK_EVENTS_H
#define TE_TASK_EVENTS_H

#include "storage/latch.h"

/* The version of the extension's SQL objects this library works with. */
#define TE_SCHEMA_VERSION "1.1"

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
extern char *te_worker_role;
extern int	te_worker_count;
extern int	te_batch_size;
extern int	te_max_attempts;
extern int	te_retry_delay_ms;
extern int	te_poll_interval_ms;
extern int	te_handler_timeout_ms;

/*
 * Shared memory: the latches of the running workers, so that a committing
 * writer can wake them, and each worker slot's connection bookkeeping.
 * NULL in a backend of a server that was started without
 * shared_preload_libraries = 'task_events' (no workers then).
 *
 * connect_pending is set by a worker just before it connects to
 * task_events.database and cleared once connected: a worker that finds it
 * set at start knows that its predecessor in the slot died while
 * connecting (FATAL: the database or role is missing, ...), and waits for
 * the cause to go away instead of failing again every second
 * (worker.c).  Each slot is written only by its own worker; the
 * postmaster restarts a slot's worker only after the previous one exited,
 * so no lock is needed.  A crash-restart of the server zeroes it all.
 */
typedef struct TeSharedState
{
	Latch	   *worker_latch[TE_MAX_WORKERS];	/* NULL while a slot's worker is down */
	bool		connect_pending[TE_MAX_WORKERS];	/* a connection attempt began */
	int			connect_failures[TE_MAX_WORKERS];	/* attempts that failed in a row */
} TeSharedState;

extern TeSharedState *te_shared;

/* wakeup.c */
extern void te_wake_workers_at_commit(void);
extern void te_wake_workers(void);

/* worker.c */
extern PGDLLEXPORT void te_worker_main(Datum main_arg);

#endif
