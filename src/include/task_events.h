/* task_events.h: settings and shared state of the task_events module */
#ifndef TE_TASK_EVENTS_H
#define TE_TASK_EVENTS_H

#include "storage/latch.h"
#include "storage/lwlock.h"

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

/* Databases the launcher can track at once (registry.c). */
#define TE_MAX_DATABASES 256

/* Why a database with the extension has no worker (TeDatabase.unserved). */
typedef enum TeUnserved
{
	TE_SERVED,					/* workers run, or are being started */
	TE_UNSERVED_NO_SLOT,		/* max_worker_processes exhausted */
	TE_UNSERVED_EXCLUDED,		/* task_events.database names another one */
	TE_UNSERVED_NO_CONNECTIONS, /* datallowconn is false, or an interrupted DROP */
	TE_UNSERVED_ROLE			/* task_events.worker_role cannot log in */
} TeUnserved;

/*
 * One database in the registry (registry.c): a database in which the
 * extension exists (confirmed) or may exist (a probe is to look).  An entry
 * is added by the launcher's scan at start and by CREATE EXTENSION or
 * CREATE DATABASE in a backend; only the launcher frees one.  Protected by
 * TeSharedState.lock, except that writers read dboid, unserved and the
 * latches without it (a stale value costs a spurious wake-up or one
 * notification published by both the writer and the relay).
 */
typedef struct TeDatabase
{
	Oid			dboid;			/* InvalidOid: the entry is free */
	bool		confirmed;		/* the extension was seen in it */
	uint64		registrations;	/* bumped by each registration */
	bool		probe_done;		/* a probe reported ... */
	bool		probe_found;	/* ... whether the extension exists ... */
	uint64		probe_registrations;	/* ... as of this registration */
	TeUnserved	unserved;
	int			parked_by;		/* backend running DROP DATABASE & co, or 0 */
	int			worker_pid[TE_MAX_WORKERS]; /* claimed before connecting */
	bool		worker_connected[TE_MAX_WORKERS];
	Latch	   *worker_latch[TE_MAX_WORKERS];	/* set while running handlers */
} TeDatabase;

/*
 * Shared memory: the launcher's latch, so that a backend can wake it when
 * the registry changes, and the registry.  NULL in a backend of a server
 * that was started without shared_preload_libraries = 'task_events' (no
 * workers then).  A crash-restart of the server zeroes it; the launcher
 * then fills it again.
 */
typedef struct TeSharedState
{
	LWLock	   *lock;
	Latch	   *launcher_latch;
	TeDatabase	db[TE_MAX_DATABASES];
} TeSharedState;

extern TeSharedState *te_shared;

/* registry.c */
extern void te_registry_shmem_request(void);
extern void te_registry_shmem_init(void);
extern TeDatabase *te_registry_find(Oid dboid);
extern void te_registry_add(Oid dboid, bool confirmed);
extern void te_register_database_at_commit(Oid dboid, bool confirmed);
extern void te_park_database(Oid dboid);
extern bool te_database_unserved(void);
extern const char *te_database_service(void);
extern void te_wake_launcher(void);

/* wakeup.c */
extern void te_wake_workers_at_commit(void);
extern void te_wake_workers(void);

/* launcher.c */
extern PGDLLEXPORT void te_launcher_main(Datum main_arg);
extern PGDLLEXPORT void te_probe_main(Datum main_arg);

/* utility_hook.c */
extern void te_install_utility_hook(void);

/* worker.c */
extern PGDLLEXPORT void te_worker_main(Datum main_arg);

#endif
