/*
 * task_events.c
 *		Module entry point: settings, shared memory and background workers.
 *
 * The write path needs none of this and works whether or not the library
 * is preloaded.  With shared_preload_libraries = 'task_events', _PG_init
 * also reserves the shared state (the registry of served databases) and
 * registers the launcher, which starts task_events.worker_count workers in
 * each database where the extension exists (launcher.c), and installs the
 * hook that keeps the registry up to date (utility_hook.c).
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "utils/guc.h"

#include "task_events.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

char	   *te_database = NULL;
char	   *te_worker_role = NULL;
int			te_worker_count = 1;
int			te_batch_size = 1000;
int			te_max_attempts = 5;
int			te_retry_delay_ms = 100;
int			te_poll_interval_ms = 1000;
int			te_handler_timeout_ms = 60 * 1000;
int			te_notify_mode = TE_NOTIFY_COMMIT;

static const struct config_enum_entry te_notify_mode_options[] = {
	{"commit", TE_NOTIFY_COMMIT, false},
	{"relay", TE_NOTIFY_RELAY, false},
	{"off", TE_NOTIFY_OFF, false},
	{NULL, 0, false}
};

TeSharedState *te_shared = NULL;

static shmem_request_hook_type te_prev_shmem_request_hook = NULL;
static shmem_startup_hook_type te_prev_shmem_startup_hook = NULL;

/*
 * Settings of the workers themselves, fixed at server start: PostgreSQL
 * allows defining them only while the library is being preloaded.
 */
static void
te_define_worker_gucs(void)
{
	DefineCustomStringVariable("task_events.database",
							   "The one database the background workers serve; empty: every database with the extension.",
							   NULL,
							   &te_database,
							   "",
							   PGC_POSTMASTER,
							   0,
							   NULL, NULL, NULL);
	DefineCustomStringVariable("task_events.worker_role",
							   "Role the background workers connect as, and so run the handlers as.",
							   "Empty means the bootstrap superuser. The role needs LOGIN, CONNECT on "
							   "the databases served, and the privileges on the bookkeeping tables.",
							   &te_worker_role,
							   "",
							   PGC_POSTMASTER,
							   0,
							   NULL, NULL, NULL);
	DefineCustomIntVariable("task_events.worker_count",
							"Number of background workers that run the event handlers, in each database served.",
							"Each worker takes whichever handler of its database is free, so handlers run in parallel up to this number.",
							&te_worker_count,
							1, 1, TE_MAX_WORKERS,
							PGC_POSTMASTER,
							0,
							NULL, NULL, NULL);
}

/*
 * Settings that apply in every session.  notify_mode defaults to relay when
 * the workers run (the library is preloaded) and to commit otherwise, so
 * that events are always published, and off the writers' commit path
 * whenever there is a worker to do it.  It is server-wide (reload): writers
 * and the relay handler must agree on who publishes, or events would be
 * published twice or not at all.
 */
static void
te_define_gucs(void)
{
	DefineCustomEnumVariable("task_events.notify_mode",
							 "Who publishes events on the task_events channel: commit, relay or off.",
							 "commit: the writing transaction, at its commit. relay: the relay handler, "
							 "in the background workers, after the commit. off: nobody.",
							 &te_notify_mode,
							 process_shared_preload_libraries_in_progress ?
							 TE_NOTIFY_RELAY : TE_NOTIFY_COMMIT,
							 te_notify_mode_options,
							 PGC_SIGHUP,
							 0,
							 NULL, NULL, NULL);
	DefineCustomIntVariable("task_events.batch_size",
							"Maximum number of events a handler receives in one batch.",
							NULL,
							&te_batch_size,
							1000, 1, 100000,
							PGC_SUSET,
							0,
							NULL, NULL, NULL);
	DefineCustomIntVariable("task_events.max_attempts",
							"Attempts at an event before it goes to task_events.dead_letters.",
							NULL,
							&te_max_attempts,
							5, 1, 1000,
							PGC_SUSET,
							0,
							NULL, NULL, NULL);
	DefineCustomIntVariable("task_events.retry_delay",
							"Delay before the first retry of a failed event; it doubles at each further attempt.",
							NULL,
							&te_retry_delay_ms,
							100, 0, 3600 * 1000,
							PGC_SUSET,
							GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomIntVariable("task_events.handler_timeout",
							"Longest time one call of a handler may take; it is canceled then, as a failed attempt.",
							"0 means no limit. statement_timeout does not apply to the background workers.",
							&te_handler_timeout_ms,
							60 * 1000, 0, INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomIntVariable("task_events.poll_interval",
							"How often an idle worker looks for events nobody woke it for.",
							"Commits that wrote events wake the workers at once; this is the fallback.",
							&te_poll_interval_ms,
							1000, 10, 3600 * 1000,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);
	MarkGUCPrefixReserved("task_events");
}

static void
te_shmem_request(void)
{
	if (te_prev_shmem_request_hook)
		te_prev_shmem_request_hook();
	te_registry_shmem_request();
}

static void
te_shmem_startup(void)
{
	if (te_prev_shmem_startup_hook)
		te_prev_shmem_startup_hook();
	te_registry_shmem_init();
}

/* The launcher: one per server, restarted a second after it dies. */
static void
te_register_launcher(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	/* Not on a standby: handlers write, and a standby is read-only. */
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 1;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "task_events");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "te_launcher_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "task_events launcher");
	snprintf(worker.bgw_type, BGW_MAXLEN, "task_events launcher");
	RegisterBackgroundWorker(&worker);
}

void
_PG_init(void)
{
	if (process_shared_preload_libraries_in_progress)
		te_define_worker_gucs();
	te_define_gucs();

	if (!process_shared_preload_libraries_in_progress)
		return;

	te_prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = te_shmem_request;
	te_prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = te_shmem_startup;

	te_register_launcher();
	te_install_utility_hook();
}
