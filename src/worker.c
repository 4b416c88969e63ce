/*
 * worker.c
 *		The background workers that run the event handlers.
 *
 * Started by the postmaster when the library is preloaded (task_events.c),
 * after recovery: a standby runs none.  Each worker connects to
 * task_events.database as task_events.worker_role and loops: one batch per
 * enabled handler, each in its own transaction, for as long as there is
 * work; then it sleeps on its latch until a committing writer sets it
 * (wakeup.c), the poll interval passes, or the earliest retry of a failing
 * handler is due.  Workers share the handlers: a handler whose state row
 * another worker holds is skipped.
 *
 * Crash safety comes from the transactions: a handler's writes and its new
 * position commit together, so a worker killed at any point resumes from
 * the last committed position and neither loses nor repeats an effect.
 *
 * Lifecycle.  No state of the database makes a worker fail in a loop:
 * - the extension not created, or dropped: every transaction first takes a
 *   share lock on the extension and checks it still exists, so a
 *   concurrent DROP EXTENSION waits for at most one batch and the worker
 *   then waits quietly until CREATE EXTENSION;
 * - the database (or role) missing, at start or after DROP DATABASE ...
 *   WITH (FORCE): connecting fails with FATAL once; the next worker of the
 *   slot sees that the attempt never completed (TeSharedState), connects
 *   to no database, logs one line saying why, and waits until it can
 *   connect (te_wait_until_connectable);
 * - any other error outside a handler (a handler's own errors are retries
 *   and dead letters, dispatch.c), e.g. a privilege the worker role lacks:
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

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_database.h"
#include "catalog/pg_extension.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lmgr.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/relcache.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "call_journal.h"
#include "dispatch.h"
#include "spi_util.h"
#include "task_events.h"

/* Longest wait before retrying after an error outside the handlers. */
#define TE_MAX_ERROR_DELAY_MS (60 * 1000)
/* Longest wait before retrying a connection that failed for no known reason. */
#define TE_MAX_CONNECT_DELAY_MS (5 * 60 * 1000)

/* Why the worker cannot connect (te_connect_problem). */
typedef enum TeConnectProblem
{
	TE_CONNECT_OK,				/* nothing known stands in the way */
	TE_CONNECT_NO_DATABASE,
	TE_CONNECT_DATABASE_INVALID,	/* a DROP DATABASE was interrupted */
	TE_CONNECT_DATABASE_CLOSED, /* datallowconn is false */
	TE_CONNECT_NO_ROLE,
	TE_CONNECT_ROLE_NOLOGIN
} TeConnectProblem;

static int	te_worker_slot = -1;

/* Leave the shared slot at exit, so that writers stop setting our latch. */
static void
te_worker_detach(int code, Datum arg)
{
	if (te_shared != NULL && te_worker_slot >= 0)
		te_shared->worker_latch[te_worker_slot] = NULL;
}

/* task_events.worker_role as BackgroundWorkerInitializeConnection takes it. */
static const char *
te_role_name(void)
{
	return (te_worker_role != NULL && te_worker_role[0] != '\0') ? te_worker_role : NULL;
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
 * read-only transaction for all of them.  NIL when the extension is not
 * installed in this database (the worker then waits for it quietly).
 */
static List *
te_peek(MemoryContext cxt)
{
	List	   *peeks = NIL;

	if (te_begin_work("looking for task_events events"))
		peeks = te_peek_handlers(NULL, cxt);
	te_end_work();
	return peeks;
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
 * to run (0 if none).
 */
static bool
te_run_round(TimestampTz *next_retry)
{
	static MemoryContext round_cxt = NULL;
	List	   *peeks;
	ListCell   *lc;
	bool		more = false;

	if (round_cxt == NULL)
		round_cxt = AllocSetContextCreate(TopMemoryContext, "task_events round",
										  ALLOCSET_DEFAULT_SIZES);
	MemoryContextReset(round_cxt);
	peeks = te_peek(round_cxt);

	*next_retry = 0;
	foreach(lc, peeks)
	{
		const HandlerPeek *peek = lfirst(lc);
		char		activity[NAMEDATALEN + 32];
		BatchOutcome outcome;

		memset(&outcome, 0, sizeof(outcome));
		if (peek->has_work)
		{
			CHECK_FOR_INTERRUPTS();
			te_reload_config_if_pending();
			snprintf(activity, sizeof(activity), "handling events: %s", peek->handler);
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
te_try_round(TimestampTz *next_retry, bool *more)
{
	volatile bool ok = true;

	PG_TRY();
	{
		*more = te_run_round(next_retry);
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

/* Sleep on the latch for up to ms, or until woken; reload the config if asked. */
static void
te_wait(long ms)
{
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					 ms, PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
	CHECK_FOR_INTERRUPTS();
	te_reload_config_if_pending();
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
 * Copy of the row of the shared catalog relid whose name column (attnum,
 * of type name) is name, or NULL.  Reads like InitPostgres does before the
 * shared catalogs' indexes are known to the relation cache (a process
 * connected to no database cannot load them itself): through the index
 * named indexid when it can, by a heap scan otherwise.  Assumes a
 * transaction is open.
 */
static HeapTuple
te_shared_catalog_row(Oid relid, Oid indexid, AttrNumber attnum, const char *name)
{
	Relation	rel = table_open(relid, AccessShareLock);
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;

	ScanKeyInit(&key, attnum, BTEqualStrategyNumber, F_NAMEEQ,
				CStringGetDatum(name));
	scan = systable_beginscan(rel, indexid, criticalSharedRelcachesBuilt, NULL, 1, &key);
	tuple = systable_getnext(scan);
	if (HeapTupleIsValid(tuple))
		tuple = heap_copytuple(tuple);
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return tuple;
}

/*
 * What stands in the way of connecting to task_events.database as
 * task_events.worker_role, as far as pg_database and pg_authid tell (a
 * missing CONNECT privilege does not show here: it is retried like any
 * unknown cause).  Runs in a worker connected to no database; opens and
 * closes its own transaction.
 */
static TeConnectProblem
te_connect_problem(void)
{
	TeConnectProblem problem = TE_CONNECT_OK;
	const char *role = te_role_name();
	HeapTuple	tuple;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	tuple = te_shared_catalog_row(DatabaseRelationId, DatabaseNameIndexId,
								  Anum_pg_database_datname, te_database);
	if (!HeapTupleIsValid(tuple))
		problem = TE_CONNECT_NO_DATABASE;
	else
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tuple);

		if (database_is_invalid_form(db))
			problem = TE_CONNECT_DATABASE_INVALID;
		else if (!db->datallowconn)
			problem = TE_CONNECT_DATABASE_CLOSED;
	}
	if (problem == TE_CONNECT_OK && role != NULL)
	{
		tuple = te_shared_catalog_row(AuthIdRelationId, AuthIdRolnameIndexId,
									  Anum_pg_authid_rolname, role);
		if (!HeapTupleIsValid(tuple))
			problem = TE_CONNECT_NO_ROLE;
		else if (!((Form_pg_authid) GETSTRUCT(tuple))->rolcanlogin)
			problem = TE_CONNECT_ROLE_NOLOGIN;
	}
	CommitTransactionCommand();
	return problem;
}

/* Log, once, why the worker cannot connect and what it does about it. */
static void
te_report_connect_problem(TeConnectProblem problem)
{
	const char *role = te_role_name();

	switch (problem)
	{
		case TE_CONNECT_OK:
			break;
		case TE_CONNECT_NO_DATABASE:
			ereport(LOG,
					(errmsg("task_events worker %d: database \"%s\" does not exist; waiting for it to be created",
							te_worker_slot + 1, te_database),
					 errhint("Create the database, or set task_events.database to the database the workers should serve and restart the server.")));
			break;
		case TE_CONNECT_DATABASE_INVALID:
			ereport(LOG,
					(errmsg("task_events worker %d: database \"%s\" is invalid (an interrupted DROP DATABASE); waiting for it to be dropped and created again",
							te_worker_slot + 1, te_database),
					 errhint("Finish dropping it with DROP DATABASE, or set task_events.database to another database and restart the server.")));
			break;
		case TE_CONNECT_DATABASE_CLOSED:
			ereport(LOG,
					(errmsg("task_events worker %d: database \"%s\" does not allow connections; waiting until it does",
							te_worker_slot + 1, te_database),
					 errhint("ALTER DATABASE ... ALLOW_CONNECTIONS true, or set task_events.database to another database and restart the server.")));
			break;
		case TE_CONNECT_NO_ROLE:
			ereport(LOG,
					(errmsg("task_events worker %d: role \"%s\" does not exist; waiting for it to be created",
							te_worker_slot + 1, role),
					 errhint("Create the role, or set task_events.worker_role to an existing role (empty for the bootstrap superuser) and restart the server.")));
			break;
		case TE_CONNECT_ROLE_NOLOGIN:
			ereport(LOG,
					(errmsg("task_events worker %d: role \"%s\" is not permitted to log in; waiting until it is",
							te_worker_slot + 1, role),
					 errhint("ALTER ROLE ... LOGIN, or set task_events.worker_role to another role and restart the server.")));
			break;
	}
}

/*
 * The previous worker of this slot died while connecting.  Connect to no
 * database (as the bootstrap superuser, to read the shared catalogs), find
 * out why from pg_database and pg_authid, say so once, and check again
 * every poll interval; once nothing stands in the way, exit with code 1 so
 * that the postmaster starts a worker that connects.  When the catalogs
 * show no reason (a transient failure, or one they cannot show) retry after
 * a delay that doubles with each failure in a row, 1 s up to 5 minutes,
 * logging each retry.  Never returns.
 */
static void
te_wait_until_connectable(void)
{
	int			failures = ++te_shared->connect_failures[te_worker_slot];
	TeConnectProblem reported = TE_CONNECT_OK;
	char	   *waiting;

	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	SetConfigOption("application_name", "task_events worker", PGC_SUSET, PGC_S_OVERRIDE);
	waiting = psprintf("waiting until database \"%s\" can be connected to", te_database);

	for (;;)
	{
		TeConnectProblem problem;

		pgstat_report_activity(STATE_RUNNING, waiting);
		problem = te_connect_problem();
		pgstat_report_activity(STATE_IDLE, waiting);

		if (problem == TE_CONNECT_OK)
		{
			if (reported != TE_CONNECT_OK)
			{
				ereport(LOG,
						(errmsg("task_events worker %d: database \"%s\" can be connected to now; restarting to connect",
								te_worker_slot + 1, te_database)));
				te_shared->connect_failures[te_worker_slot] = 0;
			}
			else
			{
				long		delay_ms = Min(1000L << Min(failures - 1, 16),
										   (long) TE_MAX_CONNECT_DELAY_MS);

				ereport(LOG,
						(errmsg("task_events worker %d could not connect to database \"%s\"; retrying in %ld s",
								te_worker_slot + 1, te_database, delay_ms / 1000),
						 errhint("The reason is in the server log above.")));
				te_wait_full(delay_ms);
			}
			te_shared->connect_pending[te_worker_slot] = false;
			proc_exit(1);
		}
		if (problem != reported)
		{
			te_report_connect_problem(problem);
			reported = problem;
		}
		te_wait(te_poll_interval_ms);
	}
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

void
te_worker_main(Datum main_arg)
{
	int			error_streak = 0;
	char	   *role;

	te_worker_slot = DatumGetInt32(main_arg);

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	pqsignal(SIGQUIT, te_journal_on_quit);
	BackgroundWorkerUnblockSignals();

	/*
	 * Connecting raises FATAL when the database or the role is missing.  The
	 * flag survives the exit; the next worker of the slot finds it set and
	 * waits instead of failing again (te_wait_until_connectable).
	 */
	if (te_shared->connect_pending[te_worker_slot])
		te_wait_until_connectable();
	te_shared->connect_pending[te_worker_slot] = true;
	BackgroundWorkerInitializeConnection(te_database, te_role_name(), 0);
	te_shared->connect_pending[te_worker_slot] = false;
	te_shared->connect_failures[te_worker_slot] = 0;

	te_set_worker_settings();

	te_shared->worker_latch[te_worker_slot] = MyLatch;
	on_shmem_exit(te_worker_detach, (Datum) 0);

	StartTransactionCommand();
	role = MemoryContextStrdup(TopMemoryContext, GetUserNameFromId(GetUserId(), false));
	CommitTransactionCommand();
	ereport(LOG,
			(errmsg("task_events worker %d started in database \"%s\" as role \"%s\"",
					te_worker_slot + 1, te_database, role)));
	te_count_call_that_ended_process();

	for (;;)
	{
		TimestampTz next_retry = 0;
		bool		more = false;
		bool		ok;

		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		te_reload_config_if_pending();

		ok = te_try_round(&next_retry, &more);
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
