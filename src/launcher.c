/*
 * launcher.c
 *		The launcher: starts the workers of every database where the
 *		extension exists, and the probes that find those databases.
 *
 * One launcher per server, started by the postmaster after recovery (a
 * standby runs none), connected to no database: it reads the shared
 * catalogs (pg_database, pg_authid) only.  It works from the registry
 * (registry.c) and starts dynamic background workers:
 * - a probe (te_probe_main) for each unconfirmed entry: it connects to the
 *   database, says whether the extension exists, and exits.  At start the
 *   launcher registers every database that allows connections to be probed
 *   (also those task_events.database leaves out: one that has the
 *   extension is logged as not served); after that, databases join the
 *   registry when the extension is created in them, so a database without
 *   the extension costs no connection;
 * - task_events.worker_count workers (worker.c) for each confirmed entry:
 *   first one per database, then the others, so that a short budget serves
 *   as many databases as it can.  No worker starts while a probe is
 *   pending, so that the databases found first do not take the slots of
 *   the others.
 * It wakes when the registry changes (a backend sets its latch), when one
 * of its workers starts or stops (bgw_notify_pid), and every poll interval
 * to see pg_database and pg_authid change.
 *
 * What the launcher knows about a worker lives in shared memory (the pid a
 * worker claims before connecting), not only in its handles: a launcher
 * restarted after an error starts no duplicates, and a duplicate started
 * anyway finds its slot claimed and exits.
 *
 * Why a database is not served is written in its entry (handler_status
 * shows it) and logged once per change: no background worker slot left,
 * excluded by task_events.database, connections not allowed, or a
 * worker_role that cannot log in.
 */
#include "postgres.h"

#include <signal.h>

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_database.h"
#include "commands/extension.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "task_events.h"
#include "worker_args.h"

/* Longest wait before retrying a worker that could not connect. */
#define TE_MAX_CONNECT_DELAY_MS (5 * 60 * 1000)
/* Probes running at once: they are short, but take worker slots. */
#define TE_MAX_PROBES 2

/* A database as pg_database describes it. */
typedef struct DatabaseRow
{
	Oid			oid;
	char		name[NAMEDATALEN];
	bool		connectable;	/* datallowconn and not half-dropped */
} DatabaseRow;

/* The launcher's own bookkeeping of a registry entry. */
typedef struct LauncherSlot
{
	BackgroundWorkerHandle *probe;
	BackgroundWorkerHandle *worker[TE_MAX_WORKERS];
	TimestampTz start_after[TE_MAX_WORKERS];	/* 0: at once */
	int			failures[TE_MAX_WORKERS];	/* starts in a row that never connected */
	TimestampTz probe_after;
	int			probe_failures;
	TeUnserved	logged;			/* the reason last logged for this entry */
} LauncherSlot;

static LauncherSlot te_slots[TE_MAX_DATABASES];

/* The databases of pg_database, read at each pass (te_read_databases). */
static DatabaseRow *te_dbs = NULL;
static int	te_ndbs = 0;

static const DatabaseRow *
te_database_row(Oid oid)
{
	int			i;

	for (i = 0; i < te_ndbs; i++)
		if (te_dbs[i].oid == oid)
			return &te_dbs[i];
	return NULL;
}

/* Read pg_database into te_dbs, as the autovacuum launcher does. */
static void
te_read_databases(void)
{
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tuple;
	int			allocated = 16;
	MemoryContext old;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	old = MemoryContextSwitchTo(TopMemoryContext);
	if (te_dbs != NULL)
		pfree(te_dbs);
	te_dbs = palloc(allocated * sizeof(DatabaseRow));
	te_ndbs = 0;
	MemoryContextSwitchTo(old);

	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while (HeapTupleIsValid(tuple = heap_getnext(scan, ForwardScanDirection)))
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tuple);

		if (te_ndbs == allocated)
		{
			allocated *= 2;
			te_dbs = repalloc(te_dbs, allocated * sizeof(DatabaseRow));
		}
		te_dbs[te_ndbs].oid = db->oid;
		strlcpy(te_dbs[te_ndbs].name, NameStr(db->datname), NAMEDATALEN);
		te_dbs[te_ndbs].connectable = db->datallowconn && !database_is_invalid_form(db);
		te_ndbs++;
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();
}

/*
 * The OID of task_events.worker_role (InvalidOid: the bootstrap
 * superuser), or why it cannot be used: a role that does not exist or
 * cannot log in.  Logged once per change.
 */
static bool
te_worker_role_usable(Oid *roleoid)
{
	static int	logged = 0;		/* 0 usable, 1 missing, 2 no login */
	int			problem = 0;
	HeapTuple	tuple;

	*roleoid = InvalidOid;
	if (te_worker_role == NULL || te_worker_role[0] == '\0')
		return true;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	tuple = SearchSysCache1(AUTHNAME, CStringGetDatum(te_worker_role));
	if (!HeapTupleIsValid(tuple))
		problem = 1;
	else
	{
		Form_pg_authid role = (Form_pg_authid) GETSTRUCT(tuple);

		if (!role->rolcanlogin)
			problem = 2;
		*roleoid = role->oid;
		ReleaseSysCache(tuple);
	}
	CommitTransactionCommand();

	if (problem != logged)
	{
		if (problem == 1)
			ereport(LOG,
					(errmsg("task_events launcher: role \"%s\" does not exist; no database is served until it is created",
							te_worker_role),
					 errhint("Create the role, or set task_events.worker_role to an existing role (empty for the bootstrap superuser) and restart the server.")));
		else if (problem == 2)
			ereport(LOG,
					(errmsg("task_events launcher: role \"%s\" is not permitted to log in; no database is served until it is",
							te_worker_role),
					 errhint("ALTER ROLE ... LOGIN, or set task_events.worker_role to another role and restart the server.")));
		else
			ereport(LOG,
					(errmsg("task_events launcher: role \"%s\" can log in now", te_worker_role)));
		logged = problem;
	}
	return problem == 0;
}

/* Is the database left out by task_events.database? */
static bool
te_excluded(const char *name)
{
	return te_database != NULL && te_database[0] != '\0' && strcmp(name, te_database) != 0;
}

/* Register every connectable database that may be served, to be probed. */
static void
te_register_existing_databases(void)
{
	int			i;
	bool		named_exists = false;

	te_read_databases();
	for (i = 0; i < te_ndbs; i++)
	{
		named_exists |= !te_excluded(te_dbs[i].name);
		if (te_dbs[i].connectable)
			te_registry_add(te_dbs[i].oid, false);
	}
	if (!named_exists && te_database[0] != '\0')
		ereport(LOG,
				(errmsg("task_events launcher: database \"%s\" (task_events.database) does not exist; it is served once it is created with the extension",
						te_database)));
}

/* Is the process pid gone? */
static bool
te_process_gone(int pid)
{
	return pid != 0 && kill(pid, 0) != 0 && errno == ESRCH;
}

/* Start a dynamic worker running function for the entry; NULL if no slot. */
static BackgroundWorkerHandle *
te_start(const char *function, const char *type, int entry_index, int worker_index,
		 Oid roleoid, const char *dbname)
{
	BackgroundWorker worker;
	BackgroundWorkerHandle *handle;
	WorkerArgs	args;
	MemoryContext old;
	bool		started;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "task_events");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "%s", function);
	snprintf(worker.bgw_type, BGW_MAXLEN, "%s", type);
	snprintf(worker.bgw_name, BGW_MAXLEN, "%s %d for database %s", type, worker_index + 1, dbname);
	worker.bgw_main_arg = Int32GetDatum(worker_index);
	worker.bgw_notify_pid = MyProcPid;
	args.dboid = te_shared->db[entry_index].dboid;
	args.roleoid = roleoid;
	args.entry_index = entry_index;
	memcpy(worker.bgw_extra, &args, sizeof(args));

	old = MemoryContextSwitchTo(TopMemoryContext);
	started = RegisterDynamicBackgroundWorker(&worker, &handle);
	MemoryContextSwitchTo(old);
	return started ? handle : NULL;
}

/* Has the process behind handle ended?  Frees the handle then. */
static bool
te_stopped(BackgroundWorkerHandle **handle)
{
	pid_t		pid;

	if (*handle == NULL)
		return true;
	if (GetBackgroundWorkerPid(*handle, &pid) != BGWH_STOPPED)
		return false;
	pfree(*handle);
	*handle = NULL;
	return true;
}

/* Delay before another try after failures in a row: 1 s doubling, to 5 min. */
static long
te_connect_delay_ms(int failures)
{
	return Min(1000L << Min(failures - 1, 16), (long) TE_MAX_CONNECT_DELAY_MS);
}

/*
 * Take note of the probes and workers of entry i that ended: a probe's
 * answer, a worker that never connected (retried with a growing delay,
 * logged each time), a worker that ended after connecting (restarted after a
 * second, as the postmaster would).  Returns true when the entry was freed
 * (the extension is gone, or the database).
 */
static bool
te_reap(int i, const DatabaseRow *row)
{
	TeDatabase *entry = &te_shared->db[i];
	LauncherSlot *slot = &te_slots[i];
	int			w;
	bool		busy = false;

	if (slot->probe != NULL && te_stopped(&slot->probe))
	{
		if (entry->probe_done && entry->probe_found)
		{
			entry->confirmed = true;
			slot->probe_failures = 0;
		}
		else if (entry->probe_done)
			slot->probe_failures = 0;
		else
			slot->probe_after = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
															te_connect_delay_ms(++slot->probe_failures));
	}
	for (w = 0; w < TE_MAX_WORKERS; w++)
	{
		if (slot->worker[w] != NULL && te_stopped(&slot->worker[w]))
		{
			if (entry->worker_connected[w])
			{
				slot->failures[w] = 0;
				slot->start_after[w] = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), 1000);
			}
			else
			{
				long		delay_ms = te_connect_delay_ms(++slot->failures[w]);

				slot->start_after[w] = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), delay_ms);
				ereport(LOG,
						(errmsg("task_events launcher: worker %d could not connect to database \"%s\"; retrying in %ld s",
								w + 1, row != NULL ? row->name : "?", delay_ms / 1000),
						 errhint("The reason is in the server log above.")));
			}
		}
		if (te_process_gone(entry->worker_pid[w]))
			entry->worker_pid[w] = 0;
		busy |= slot->worker[w] != NULL || entry->worker_pid[w] != 0;
	}
	busy |= slot->probe != NULL;

	/*
	 * Free the entry when its database is gone, or a probe found no
	 * extension and nobody registered it since the probe looked.
	 */
	if (!busy &&
		(row == NULL ||
		 (!entry->confirmed && entry->probe_done && !entry->probe_found &&
		  entry->probe_registrations == entry->registrations)))
	{
		memset(entry, 0, sizeof(TeDatabase));
		memset(slot, 0, sizeof(LauncherSlot));
		return true;
	}
	return false;
}

/* Number of workers of entry i running or being started. */
static int
te_workers_of(int i)
{
	int			n = 0;
	int			w;

	for (w = 0; w < TE_MAX_WORKERS; w++)
		n += te_slots[i].worker[w] != NULL || te_shared->db[i].worker_pid[w] != 0;
	return n;
}

/*
 * Why entry i cannot be served whatever the budget, or TE_SERVED.  Logged
 * once per change for databases known to have the extension.
 */
static TeUnserved
te_standing_reason(int i, const DatabaseRow *row, bool role_usable)
{
	TeDatabase *entry = &te_shared->db[i];
	TeUnserved	reason = TE_SERVED;

	if (te_excluded(row->name))
		reason = TE_UNSERVED_EXCLUDED;
	/* Workers connected before stay: PostgreSQL does not disconnect them. */
	else if (te_workers_of(i) > 0)
		reason = TE_SERVED;
	else if (!row->connectable)
		reason = TE_UNSERVED_NO_CONNECTIONS;
	else if (!role_usable)
		reason = TE_UNSERVED_ROLE;

	if (entry->confirmed && reason != te_slots[i].logged &&
		reason != TE_UNSERVED_ROLE)
	{
		if (reason == TE_UNSERVED_EXCLUDED)
			ereport(LOG,
					(errmsg("task_events launcher: database \"%s\" has the extension but is not served: task_events.database is \"%s\"",
							row->name, te_database),
					 errdetail("Its events are published at commit and handled only by task_events.process_pending().")));
		else if (reason == TE_UNSERVED_NO_CONNECTIONS)
			ereport(LOG,
					(errmsg("task_events launcher: database \"%s\" does not allow connections; it is not served until it does",
							row->name)));
		te_slots[i].logged = reason;
	}
	return reason;
}

/* Start the probe of entry i if it needs one and may have one. */
static void
te_maybe_probe(int i, const DatabaseRow *row, int *probes)
{
	TeDatabase *entry = &te_shared->db[i];
	LauncherSlot *slot = &te_slots[i];

	if (slot->probe != NULL)
	{
		(*probes)++;
		return;
	}
	if (entry->probe_done && !entry->probe_found &&
		entry->probe_registrations == entry->registrations)
		return;					/* answered; te_reap frees it once idle */
	if (*probes >= TE_MAX_PROBES || GetCurrentTimestamp() < slot->probe_after)
		return;
	entry->probe_done = false;
	slot->probe = te_start("te_probe_main", "task_events probe", i, 0, InvalidOid, row->name);
	if (slot->probe != NULL)
		(*probes)++;
}

/*
 * Start worker w of entry i unless it runs, is due later, or was claimed.
 * Returns false when no background worker slot was left.
 */
static bool
te_maybe_start_worker(int i, int w, Oid roleoid, const DatabaseRow *row)
{
	TeDatabase *entry = &te_shared->db[i];
	LauncherSlot *slot = &te_slots[i];

	if (slot->worker[w] != NULL || entry->worker_pid[w] != 0 ||
		GetCurrentTimestamp() < slot->start_after[w])
		return true;
	entry->worker_connected[w] = false;
	slot->worker[w] = te_start("te_worker_main", "task_events worker", i, w, roleoid, row->name);
	return slot->worker[w] != NULL;
}

/*
 * Log the databases left without a worker for want of slots, when that
 * list changes.
 */
static void
te_log_budget(const char *unserved)
{
	static char *logged = NULL;

	if ((logged == NULL ? "" : logged)[0] == '\0' && unserved[0] == '\0')
		return;
	if (logged != NULL && strcmp(logged, unserved) == 0)
		return;
	if (unserved[0] != '\0')
		ereport(LOG,
				(errmsg("task_events launcher: not enough background worker slots (max_worker_processes = %d); databases left unserved: %s",
						max_worker_processes, unserved),
				 errdetail("Each database with the extension needs task_events.worker_count = %d worker processes, and the launcher one; parallel query and replication take theirs from the same pool.",
						   te_worker_count),
				 errhint("Raise max_worker_processes. Until then, events in these databases are published at commit and handled only by task_events.process_pending().")));
	else
		ereport(LOG,
				(errmsg("task_events launcher: every database with task_events is served")));
	if (logged != NULL)
		pfree(logged);
	logged = MemoryContextStrdup(TopMemoryContext, unserved);
}

/* One pass over the registry: reap, probe, start; then log the budget. */
static void
te_launch(void)
{
	Oid			roleoid;
	bool		role_usable = te_worker_role_usable(&roleoid);
	int			probes = 0;
	int			i;
	int			w;
	StringInfoData unserved;
	TeUnserved	reason[TE_MAX_DATABASES];

	te_read_databases();
	initStringInfo(&unserved);

	LWLockAcquire(te_shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < TE_MAX_DATABASES; i++)
	{
		TeDatabase *entry = &te_shared->db[i];
		const DatabaseRow *row;

		reason[i] = TE_SERVED;
		if (!OidIsValid(entry->dboid))
			continue;
		row = te_database_row(entry->dboid);
		if (te_reap(i, row) || row == NULL)
			continue;
		if (te_process_gone(entry->parked_by))
			entry->parked_by = 0;
		if (entry->parked_by != 0)
		{
			/* Mid-DROP the database shows as invalid: not a reason to log. */
			reason[i] = entry->unserved;
			continue;
		}
		reason[i] = te_standing_reason(i, row, role_usable);
		/* Excluded ones too: one that has the extension is logged. */
		if ((reason[i] == TE_SERVED || reason[i] == TE_UNSERVED_EXCLUDED) &&
			!entry->confirmed)
			te_maybe_probe(i, row, &probes);
	}

	/*
	 * One worker per database first, then the others (see the top).  None
	 * while the role is unusable: roleoid would be the bootstrap superuser.
	 */
	for (w = 0; probes == 0 && role_usable && w < te_worker_count; w++)
	{
		for (i = 0; i < TE_MAX_DATABASES; i++)
		{
			TeDatabase *entry = &te_shared->db[i];
			const DatabaseRow *row = te_database_row(entry->dboid);

			if (!OidIsValid(entry->dboid) || row == NULL || !entry->confirmed ||
				entry->parked_by != 0 || reason[i] != TE_SERVED)
				continue;
			if (!te_maybe_start_worker(i, w, roleoid, row) && te_workers_of(i) == 0)
				reason[i] = TE_UNSERVED_NO_SLOT;
		}
	}

	for (i = 0; i < TE_MAX_DATABASES; i++)
	{
		TeDatabase *entry = &te_shared->db[i];

		if (!OidIsValid(entry->dboid))
			continue;
		/* No start was tried while probing: the budget is as it was. */
		if (probes > 0 && entry->confirmed && reason[i] == TE_SERVED)
			reason[i] = entry->unserved;
		entry->unserved = reason[i];
		if (reason[i] == TE_UNSERVED_NO_SLOT)
			appendStringInfo(&unserved, "%s\"%s\"", unserved.len > 0 ? ", " : "",
							 te_database_row(entry->dboid)->name);
	}
	LWLockRelease(te_shared->lock);

	te_log_budget(unserved.data);
	pfree(unserved.data);
}

/* The earliest time a delayed start or probe is due, or 0. */
static TimestampTz
te_next_due(void)
{
	TimestampTz next = 0;
	int			i;
	int			w;

	for (i = 0; i < TE_MAX_DATABASES; i++)
	{
		TimestampTz due[TE_MAX_WORKERS + 1];

		if (!OidIsValid(te_shared->db[i].dboid))
			continue;
		for (w = 0; w < TE_MAX_WORKERS; w++)
			due[w] = te_slots[i].worker[w] == NULL ? te_slots[i].start_after[w] : 0;
		due[TE_MAX_WORKERS] = te_slots[i].probe == NULL ? te_slots[i].probe_after : 0;
		for (w = 0; w <= TE_MAX_WORKERS; w++)
			if (due[w] != 0 && (next == 0 || due[w] < next))
				next = due[w];
	}
	return next;
}

static void
te_launcher_detach(int code, Datum arg)
{
	te_shared->launcher_latch = NULL;
}

void
te_launcher_main(Datum main_arg)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	SetConfigOption("application_name", "task_events launcher", PGC_SUSET, PGC_S_OVERRIDE);

	te_shared->launcher_latch = MyLatch;
	on_shmem_exit(te_launcher_detach, (Datum) 0);
	ereport(LOG, (errmsg("task_events launcher started")));

	te_register_existing_databases();
	for (;;)
	{
		long		ms = te_poll_interval_ms;
		TimestampTz next;

		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		pgstat_report_activity(STATE_RUNNING, "starting task_events workers");
		te_launch();
		pgstat_report_activity(STATE_IDLE, NULL);

		next = te_next_due();
		if (next != 0)
			ms = Min(ms, TimestampDifferenceMilliseconds(GetCurrentTimestamp(), next) + 1);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 ms, PG_WAIT_EXTENSION);
	}
}

/*
 * A probe: connect to the database of the entry, look whether the extension
 * exists, report it in the entry with the registration count read before
 * looking (a registration after that makes the launcher probe again), exit.
 */
void
te_probe_main(Datum main_arg)
{
	WorkerArgs	args;
	TeDatabase *entry;
	uint64		registrations = 0;
	bool		found;

	memcpy(&args, MyBgworkerEntry->bgw_extra, sizeof(args));
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	entry = &te_shared->db[args.entry_index];

	LWLockAcquire(te_shared->lock, LW_SHARED);
	if (entry->dboid == args.dboid)
		registrations = entry->registrations;
	LWLockRelease(te_shared->lock);

	BackgroundWorkerInitializeConnectionByOid(args.dboid, InvalidOid, 0);
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	found = OidIsValid(get_extension_oid("task_events", true));
	CommitTransactionCommand();

	LWLockAcquire(te_shared->lock, LW_EXCLUSIVE);
	if (entry->dboid == args.dboid)
	{
		entry->probe_found = found;
		entry->probe_registrations = registrations;
		entry->probe_done = true;
	}
	LWLockRelease(te_shared->lock);
	proc_exit(0);
}
