/*
 * worker.c
 *		The background workers that run the event handlers.
 *
 * Started by the postmaster when the library is preloaded (task_events.c),
 * after recovery: a standby runs none.  Each worker connects to
 * task_events.database and loops: one batch per enabled handler, each in its
 * own transaction, for as long as there is work; then it sleeps on its latch
 * until a committing writer sets it (wakeup.c), the poll interval passes, or
 * the earliest retry of a failing handler is due.  Workers share the
 * handlers: a handler whose state row another worker holds is skipped.
 *
 * Crash safety comes from the transactions: a handler's writes and its new
 * position commit together, so a worker killed at any point resumes from
 * the last committed position and neither loses nor repeats an effect.
 */
#include "postgres.h"

#include "access/xact.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "dispatch.h"
#include "task_events.h"

static int	te_worker_slot = -1;

/* Leave the shared slot at exit, so that writers stop setting our latch. */
static void
te_worker_detach(int code, Datum arg)
{
	if (te_shared != NULL && te_worker_slot >= 0)
		te_shared->worker_latch[te_worker_slot] = NULL;
}

static void
te_begin_work(const char *activity)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);
}

static void
te_end_work(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * Reread the configuration if a reload was signalled.  Checked before each
 * handler's batch, so that a new retry_delay or batch_size applies from the
 * next batch on, not from the next round.
 */
static void
te_reload_config_if_pending(void)
{
	if (ConfigReloadPending)
	{
		ConfigReloadPending = false;
		ProcessConfigFile(PGC_SIGHUP);
	}
}

/*
 * The enabled handlers, copied into cxt; NIL when the extension is not
 * installed in this database (the worker then waits for it quietly).
 */
static List *
te_handlers_to_run(MemoryContext cxt)
{
	List	   *names = NIL;

	te_begin_work("listing task_events handlers");
	if (OidIsValid(get_extension_oid("task_events", true)))
	{
		List	   *found = te_list_handlers();
		MemoryContext old = MemoryContextSwitchTo(cxt);
		ListCell   *lc;

		foreach(lc, found)
			names = lappend(names, pstrdup(lfirst(lc)));
		MemoryContextSwitchTo(old);
	}
	te_end_work();
	return names;
}

/*
 * One round: one batch of each handler.  Returns true when some handler may
 * have more work right away; sets *next_retry to the earliest time a
 * backing-off handler wants to run (0 if none).
 */
static bool
te_run_round(MemoryContext cxt, TimestampTz *next_retry)
{
	List	   *handlers = te_handlers_to_run(cxt);
	ListCell   *lc;
	bool		more = false;

	*next_retry = 0;
	foreach(lc, handlers)
	{
		const char *handler = lfirst(lc);
		char		activity[NAMEDATALEN + 32];
		BatchOutcome outcome;

		CHECK_FOR_INTERRUPTS();
		te_reload_config_if_pending();
		snprintf(activity, sizeof(activity), "handling events: %s", handler);
		te_begin_work(activity);
		(void) te_run_handler_batch(handler, te_batch_size, &outcome);
		te_end_work();

		more |= outcome.more;
		if (outcome.retry_at != 0 &&
			(*next_retry == 0 || outcome.retry_at < *next_retry))
			*next_retry = outcome.retry_at;
	}
	return more;
}

/* How long to sleep: the poll interval, or less when a retry is due sooner. */
static long
te_sleep_ms(TimestampTz next_retry)
{
	long		ms = te_poll_interval_ms;

	if (next_retry != 0)
	{
		long		until_retry = TimestampDifferenceMilliseconds(GetCurrentTimestamp(),
																  next_retry);

		ms = Min(ms, until_retry + 1);
	}
	return ms;
}

void
te_worker_main(Datum main_arg)
{
	MemoryContext round_cxt;

	te_worker_slot = DatumGetInt32(main_arg);

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(te_database, NULL, 0);

	/*
	 * Handlers' effects are rebuilt from the log after a crash, so their
	 * commits need not wait for the WAL flush: a lost commit loses the
	 * effects and the position together, and the events are handled again.
	 */
	SetConfigOption("synchronous_commit", "off", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("application_name", "task_events worker", PGC_SUSET, PGC_S_OVERRIDE);

	if (te_shared != NULL)
	{
		te_shared->worker_latch[te_worker_slot] = MyLatch;
		on_shmem_exit(te_worker_detach, (Datum) 0);
	}
	ereport(LOG,
			(errmsg("task_events worker %d started in database \"%s\"",
					te_worker_slot + 1, te_database)));

	round_cxt = AllocSetContextCreate(TopMemoryContext, "task_events round",
									  ALLOCSET_DEFAULT_SIZES);
	for (;;)
	{
		TimestampTz next_retry;
		bool		more;

		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		te_reload_config_if_pending();

		more = te_run_round(round_cxt, &next_retry);
		MemoryContextReset(round_cxt);
		if (more)
			continue;

		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 te_sleep_ms(next_retry), PG_WAIT_EXTENSION);
	}
}
