/*
 * worker.c
 *		The background workers that run the event handlers.
 *
 * Started by the launcher (launcher.c), task_events.worker_count of them
 * in each database where the extension exists.  Each worker connects to
 * its database as task_events.worker_role and loops: one batch per
 * enabled handler (per lane of a handler with lanes), each in its own
 * transaction, for as long as there is work; then it sleeps on its latch
 * until a committing writer sets it (wakeup.c), the poll interval passes,
 * or the earliest retry of a failing handler is due.  Workers share the handlers: a handler whose state row
 * another worker holds is skipped.
 *
 * Crash safety comes from the transactions: a handler's writes and its new
 * position commit together, so a worker killed at any point resumes from
 * the last committed position and neither loses nor repeats an effect.
 *
 * Lifecycle.  No state of the database makes a worker fail in a loop:
 * - the extension dropped: every transaction first takes a share lock on
 *   the extension and checks it still exists, so a concurrent DROP
 *   EXTENSION waits for at most one batch; the worker then exits, and the
 *   launcher forgets the database once a probe confirms;
 * - DROP DATABASE and the other statements that need the database to
 *   themselves park it (registry.c): the worker exits between two batches;
 * - a database or role that cannot be connected to: connecting fails with
 *   FATAL, and the launcher retries later (launcher.c);
 * - any other error outside a handler (a handler's own errors are retries
 *   and dead letters, dead_letters.c), e.g. a privilege the worker role lacks:
 *   logged, the transaction rolled back, and the next round delayed, 1 s
 *   doubling up to a minute, instead of exiting and restarting.
 *
 * Handlers that misbehave (handler_call.c contains what a call can do):
 * - a batch whose commit fails is rolled back and counted as a failed
 *   attempt of its handler (lost_batch.c); the round goes on with the
 *   other handlers;
 * - a call that ends the process is found in the call journal by the next
 *   worker of the slot (call_journal.c) and counted the same way.
 *
 * Settings: the database's and role's defaults (ALTER DATABASE / ROLE ...
 * SET) apply to the handlers only where the worker does not need a value
 * of its own: te_set_worker_settings overrides those.
 */
#include "postgres.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "access/xact.h"
#include "catalog/pg_extension.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lmgr.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "call_journal.h"
#include "dispatch.h"
#include "spi_util.h"
#include "task_events.h"
#include "worker_args.h"

/* Longest wait before retrying after an error outside the handlers. */
#define TE_MAX_ERROR_DELAY_MS (60 * 1000)

/* This worker's number in its database (0-based), and what the launcher said. */
static int	te_worker_slot = -1;
static WorkerArgs te_args;
static char *te_dbname = NULL;	/* the database's name, for log lines */

/* This worker's entry in the registry. */
static TeDatabase *
te_my_entry(void)
{
	return &te_shared->db[te_args.entry_index];
}

/*
 * Leave the registry at exit, so that writers stop setting our latch and the
 * launcher may start another worker in the slot.
 */
static void
te_worker_detach(int code, Datum arg)
{
	TeDatabase *entry = te_my_entry();

	LWLockAcquire(te_shared->lock, LW_EXCLUSIVE);
	if (entry->dboid == te_args.dboid && entry->worker_pid[te_worker_slot] == MyProcPid)
	{
		entry->worker_latch[te_worker_slot] = NULL;
		entry->worker_pid[te_worker_slot] = 0;
	}
	LWLockRelease(te_shared->lock);
}

/*
 * Claim this worker's slot in the registry before connecting, unless the
 * entry is no longer this database's, is parked, or the slot is taken (a
 * duplicate start).  Claimed under the lock, so that a statement parking
 * the database (registry.c) sees every worker that may connect.
 */
static bool
te_claim_slot(void)
{
	TeDatabase *entry = te_my_entry();
	bool		claimed = false;

	LWLockAcquire(te_shared->lock, LW_EXCLUSIVE);
	if (entry->dboid == te_args.dboid && entry->parked_by == 0 &&
		entry->worker_pid[te_worker_slot] == 0)
	{
		entry->worker_pid[te_worker_slot] = MyProcPid;
		claimed = true;
	}
	LWLockRelease(te_shared->lock);
	return claimed;
}

/*
 * The extension is gone from this database: have the launcher probe it
 * again (it forgets the database when the probe confirms), and say so.
 */
static void
te_leave_dropped_extension(void)
{
	TeDatabase *entry = te_my_entry();

	LWLockAcquire(te_shared->lock, LW_EXCLUSIVE);
	if (entry->dboid == te_args.dboid)
		entry->confirmed = false;
	LWLockRelease(te_shared->lock);
	te_wake_launcher();
	ereport(LOG,
			(errmsg("task_events worker %d: the extension is not installed in database \"%s\"; stopping",
					te_worker_slot + 1, te_dbname)));
}

/*
 * Is the extension installed?  If so, hold a share lock on it until the end
 * of the transaction, so that DROP EXTENSION (which locks it exclusively
 * first) waits for this transaction instead of dropping the tables under
 * its queries.  The check is repeated once the lock is held: a DROP that
 * committed while this waited for the lock leaves nothing to work on.
 * Assumes a transaction is open.
 */
static bool
te_lock_extension(void)
{
	Oid			extoid = get_extension_oid("task_events", true);

	if (!OidIsValid(extoid))
		return false;
	LockDatabaseObject(ExtensionRelationId, extoid, 0, AccessShareLock);
	return get_extension_oid("task_events", true) == extoid;
}

/*
 * Start a unit of work: a transaction, SPI, a snapshot taken after the
 * extension lock.  Returns whether the extension is installed; the caller
 * does nothing but te_end_work() when it is not.
 */
static bool
te_begin_work(const char *activity)
{
	bool		installed;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	installed = te_lock_extension();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);
	return installed;
}

/* The settings the worker's own queries and transactions rely on. */
static void
te_set_worker_settings(void)
{
	static const char *const settings[][2] = {
		/*
		 * Handlers' effects are rebuilt from the log after a crash, so their
		 * commits need not wait for the WAL flush: a lost commit loses the
		 * effects and the position together, and the events are handled
		 * again.  A batch whose effects leave the database at commit asks
		 * for a durable commit (te_commit_batch).
		 */
		{"synchronous_commit", "off"},
		/*
		 * Every name in the worker's queries is schema-qualified, and a
		 * handler must qualify its own: nothing is looked up in a schema
		 * someone else could create objects in.  pg_catalog is still
		 * searched implicitly.
		 */
		{"search_path", ""},
		/* Positions are read with a fresh snapshot per statement. */
		{"default_transaction_isolation", "read committed"},
		{"default_transaction_read_only", "off"},
		{"default_transaction_deferrable", "off"},
		/* Triggers and foreign keys of the handlers' tables fire. */
		{"session_replication_role", "origin"},
		/* handler_timeout bounds the handlers; the worker's own work is short. */
		{"statement_timeout", "0"},
		{"lock_timeout", "0"},
		{"idle_in_transaction_session_timeout", "0"},
		{"application_name", "task_events worker"},
	};
	size_t		i;

	for (i = 0; i < lengthof(settings); i++)
		SetConfigOption(settings[i][0], settings[i][1], PGC_SUSET, PGC_S_OVERRIDE);
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
 * Reread the configuration if a reload was signalled.  Also checked before
 * each handler's batch, so that a new retry_delay or batch_size applies
 * from the next batch on, not from the next round.
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
 * Which handlers have work, copied into cxt (te_peek_handlers): one
 * read-only transaction for all of them.  False when the extension is not
 * installed in this database.
 */
static bool
te_peek(MemoryContext cxt, List **peeks)
{
	bool		installed;

	*peeks = NIL;
	if ((installed = te_begin_work("looking for task_events events")))
		*peeks = te_peek_handlers(NULL, cxt);
	te_end_work();
	return installed;
}

/*
 * Have the current transaction wait for its WAL flush at commit, although
 * the worker commits asynchronously (te_set_worker_settings).
 */
static void
te_commit_durably(void)
{
	(void) set_config_option("synchronous_commit", "on", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
}

/*
 * Record the loss of the calls in *calls (lost_batch.c) in a transaction of
 * its own, and say so in the log.
 */
static void
te_count_lost_batch(const CalledRange *calls, int sqlerrcode, const char *message,
					const char *how)
{
	bool		recorded = false;

	if (te_begin_work("counting a lost batch"))
		recorded = te_record_lost_batch(calls, sqlerrcode, message);
	/* A count lost in a crash would not be made again. */
	te_commit_durably();
	te_end_work();
	if (recorded)
		ereport(LOG,
				(errmsg("task_events worker %d: a batch of handler \"%s\" was lost: %s",
						te_worker_slot + 1, calls->handler, how),
				 errdetail("The batch held the events with seq " INT64_FORMAT " to " INT64_FORMAT "%s; it is counted as a failed attempt: %s",
						   calls->first_seq, calls->last_seq,
						   calls->retries ? " (dead letters retried)" : "", message),
				 errhint("task_events.handler_status shows the handler's failures; the events are retried one per batch.")));
}

/*
 * Commit a handler's batch, durably when it asked for that.  A commit that
 * fails after the handler was called (a check only made at commit: a
 * remote server's deferred constraint through postgres_fdw, a
 * serialization failure, a full NOTIFY queue) loses the batch: it is
 * rolled back and counted as a failed attempt of the handler, and the round
 * goes on.  Any other commit failure is the round's (te_try_round).
 */
static void
te_commit_batch(const BatchOutcome *outcome, MemoryContext cxt)
{
	SPI_finish();
	PopActiveSnapshot();
	if (outcome->durable)
		te_commit_durably();
	PG_TRY();
	{
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *error;

		if (outcome->calls.first_seq == 0)
			PG_RE_THROW();
		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(cxt);
		error = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		RESUME_INTERRUPTS();
		te_count_lost_batch(&outcome->calls, error->sqlerrcode, error->message,
							"its transaction failed to commit");
	}
	PG_END_TRY();
	te_journal_clear();
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * One round: one batch of each handler that has work, each in its own
 * transaction.  Returns true when some handler may have more work right
 * away; sets *next_retry to the earliest time a backing-off handler wants
 * to run (0 if none), and *installed to whether the extension exists.
 */
static bool
te_run_round(TimestampTz *next_retry, bool *installed)
{
	static MemoryContext round_cxt = NULL;
	List	   *peeks;
	ListCell   *lc;
	bool		more = false;

	if (round_cxt == NULL)
		round_cxt = AllocSetContextCreate(TopMemoryContext, "task_events round",
										  ALLOCSET_DEFAULT_SIZES);
	MemoryContextReset(round_cxt);
	*installed = te_peek(round_cxt, &peeks);

	*next_retry = 0;
	foreach(lc, peeks)
	{
		const HandlerPeek *peek = lfirst(lc);
		char		activity[NAMEDATALEN + 48];
		BatchOutcome outcome;

		memset(&outcome, 0, sizeof(outcome));
		if (peek->has_work)
		{
			CHECK_FOR_INTERRUPTS();
			te_reload_config_if_pending();
			if (peek->lane == 0)
				snprintf(activity, sizeof(activity), "handling events: %s", peek->handler);
			else
				snprintf(activity, sizeof(activity), "handling events: %s lane %d",
						 peek->handler, peek->lane);
			/* Dropped since the peek: the next round sees that. */
			if (te_begin_work(activity))
				(void) te_run_handler_batch(peek, te_batch_size, &outcome);
			te_commit_batch(&outcome, round_cxt);
		}
		else if (peek->backing_off)
			outcome.retry_at = peek->retry_at;

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

/* In PG_CATCH: log the error and roll the transaction back. */
static void
te_log_error_and_abort(void)
{
	HOLD_INTERRUPTS();
	EmitErrorReport();
	AbortCurrentTransaction();
	MemoryContextSwitchTo(TopMemoryContext);
	FlushErrorState();
	RESUME_INTERRUPTS();
}

/*
 * Run a round, as te_run_round does, but survive an error raised outside
 * the handlers (a handler's own errors never get here, dispatch.c catches
 * them): the error is logged, the transaction rolled back, and false is
 * returned.  A worker that exited instead would be restarted every second
 * and fail the same way each time.
 */
static bool
te_try_round(TimestampTz *next_retry, bool *more, bool *installed)
{
	volatile bool ok = true;

	PG_TRY();
	{
		*more = te_run_round(next_retry, installed);
	}
	PG_CATCH();
	{
		te_log_error_and_abort();
		te_journal_clear();
		pgstat_report_activity(STATE_IDLE, NULL);
		ok = false;
	}
	PG_END_TRY();
	return ok;
}

/*
 * Exit if a statement that needs the database to itself parked it
 * (registry.c).  Called between batches only: a batch in progress ends
 * first.
 */
static void
te_exit_if_parked(void)
{
	if (te_my_entry()->parked_by != 0)
		proc_exit(0);
}

/*
 * Sleep on the latch for up to ms, or until woken; reload the config if
 * asked, leave if parked.
 */
static void
te_wait(long ms)
{
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					 ms, PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
	CHECK_FOR_INTERRUPTS();
	te_reload_config_if_pending();
	te_exit_if_parked();
}

/*
 * Sleep ms in full: a writer setting the latch does not cut it short (it
 * would, at the commit rate, when an error is being retried).
 */
static void
te_wait_full(long ms)
{
	TimestampTz until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), ms);
	TimestampTz now;

	while ((now = GetCurrentTimestamp()) < until)
		te_wait(TimestampDifferenceMilliseconds(now, until) + 1);
}

/*
 * If the previous worker of this slot died in a handler call (the call
 * journal says which), count that call as a failed attempt.  An error here
 * is logged and the call forgotten: a worker that failed at every start
 * would never run again.
 */
static void
te_count_call_that_ended_process(void)
{
	CalledRange calls;

	if (!te_journal_open(te_worker_slot, &calls))
	{
		te_journal_clear();
		return;
	}
	PG_TRY();
	{
		te_count_lost_batch(&calls, ERRCODE_SYSTEM_ERROR,
							"the handler's process ended during the call",
							"its process ended during a handler call");
	}
	PG_CATCH();
	{
		te_log_error_and_abort();
	}
	PG_END_TRY();
	te_journal_clear();
}

/*
 * Keep the memory a batch frees for the next batch.  By default glibc gives
 * large blocks (a batch's events[] array and its copies, hundreds of kB) back
 * to the kernel when they are freed, and the next batch faults every page
 * of them in again: 21,000 page faults per second of worker CPU time while
 * draining a backlog (BENCHMARKS.md, "Drain").  The memory kept is bounded
 * by the thresholds; a worker's size stays flat.
 */
static void
te_keep_freed_memory(void)
{
#ifdef __GLIBC__
	mallopt(M_MMAP_THRESHOLD, 8 * 1024 * 1024);
	mallopt(M_TRIM_THRESHOLD, 16 * 1024 * 1024);
#endif
}

void
te_worker_main(Datum main_arg)
{
	int			error_streak = 0;
	char	   *role;

	te_worker_slot = DatumGetInt32(main_arg);
	memcpy(&te_args, MyBgworkerEntry->bgw_extra, sizeof(te_args));
	te_keep_freed_memory();

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	pqsignal(SIGQUIT, te_journal_on_quit);
	BackgroundWorkerUnblockSignals();

	if (!te_claim_slot())
		proc_exit(0);
	on_shmem_exit(te_worker_detach, (Datum) 0);

	/*
	 * FATAL when the database was dropped, or the role lost LOGIN or CONNECT
	 * meanwhile: the launcher sees the worker end without having connected,
	 * logs it and tries again later.
	 */
	BackgroundWorkerInitializeConnectionByOid(te_args.dboid, te_args.roleoid, 0);
	te_set_worker_settings();

	LWLockAcquire(te_shared->lock, LW_EXCLUSIVE);
	te_my_entry()->worker_connected[te_worker_slot] = true;
	te_my_entry()->worker_latch[te_worker_slot] = MyLatch;
	LWLockRelease(te_shared->lock);

	StartTransactionCommand();
	role = MemoryContextStrdup(TopMemoryContext, GetUserNameFromId(GetUserId(), false));
	te_dbname = MemoryContextStrdup(TopMemoryContext, get_database_name(MyDatabaseId));
	CommitTransactionCommand();
	ereport(LOG,
			(errmsg("task_events worker %d started in database \"%s\" as role \"%s\"",
					te_worker_slot + 1, te_dbname, role)));
	te_count_call_that_ended_process();

	for (;;)
	{
		TimestampTz next_retry = 0;
		bool		more = false;
		bool		installed = true;
		bool		ok;

		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		te_reload_config_if_pending();
		te_exit_if_parked();

		ok = te_try_round(&next_retry, &more, &installed);
		if (!installed)
		{
			te_leave_dropped_extension();
			proc_exit(0);
		}
		if (!ok)
		{
			/* 1 s, doubling while the error repeats, up to a minute. */
			error_streak++;
			te_wait_full(Min(1000L << Min(error_streak - 1, 16), (long) TE_MAX_ERROR_DELAY_MS));
			continue;
		}
		error_streak = 0;
		if (more)
			continue;

		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 te_sleep_ms(next_retry), PG_WAIT_EXTENSION);
	}
}
