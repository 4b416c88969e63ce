/*
 * registry.c
 *		The databases the workers serve, in shared memory.
 *
 * Each database in which the extension exists has an entry (TeDatabase):
 * the launcher (launcher.c) starts its workers from it, the workers put
 * their latches in it so that writers of that database can wake them
 * (wakeup.c), and writers read from it whether anyone serves their database
 * (te_database_unserved).  Entries come from three places:
 * - the launcher's scan of pg_database at start: one entry, unconfirmed,
 *   per database a probe is to look into;
 * - CREATE EXTENSION (and ALTER EXTENSION UPDATE) in a backend, at commit:
 *   a confirmed entry (utility_hook.c);
 * - CREATE DATABASE from a template that has an entry, at commit: an
 *   unconfirmed entry for the copy.
 * Only the launcher frees an entry, when a probe finds no extension in the
 * database (DROP EXTENSION) or the database is gone.
 *
 * Statements that need a database to themselves (DROP DATABASE, ALTER
 * DATABASE RENAME or SET TABLESPACE, CREATE DATABASE from it as template)
 * park its entry for the rest of their transaction: its workers leave
 * between two batches and none is started, so that PostgreSQL does not
 * refuse the statement because of them.
 */
#include "postgres.h"

#include "access/xact.h"
#include "commands/dbcommands.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/pg_list.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "task_events.h"

/* Registrations and parks of the current transaction, applied at its end. */
static List *te_pending_registrations = NIL;	/* of Oid, confirmed */
static List *te_pending_probes = NIL;	/* of Oid, unconfirmed */
static List *te_parked = NIL;	/* of Oid */
static bool te_callback_registered = false;

void
te_registry_shmem_request(void)
{
	RequestAddinShmemSpace(MAXALIGN(sizeof(TeSharedState)));
	RequestNamedLWLockTranche("task_events", 1);
}

void
te_registry_shmem_init(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	te_shared = ShmemInitStruct("task_events", sizeof(TeSharedState), &found);
	if (!found)
	{
		memset(te_shared, 0, sizeof(TeSharedState));
		te_shared->lock = &(GetNamedLWLockTranche("task_events"))->lock;
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * The entry of database dboid, or NULL.  The caller decides about locking.
 * Writers look up their own database at each event: the last entry found
 * is tried first.
 */
TeDatabase *
te_registry_find(Oid dboid)
{
	static int	last_found = 0;
	int			i;

	if (te_shared == NULL)
		return NULL;
	if (te_shared->db[last_found].dboid == dboid)
		return &te_shared->db[last_found];
	for (i = 0; i < TE_MAX_DATABASES; i++)
		if (te_shared->db[i].dboid == dboid)
		{
			last_found = i;
			return &te_shared->db[i];
		}
	return NULL;
}

void
te_wake_launcher(void)
{
	Latch	   *latch = te_shared != NULL ? te_shared->launcher_latch : NULL;

	if (latch != NULL)
		SetLatch(latch);
}

/*
 * Note that the extension exists (confirmed) or may exist in dboid, and
 * wake the launcher.  A registration bumps the entry's count, which tells
 * the launcher that a probe's "not there" may be out of date.
 */
void
te_registry_add(Oid dboid, bool confirmed)
{
	TeDatabase *entry;

	if (te_shared == NULL)
		return;
	LWLockAcquire(te_shared->lock, LW_EXCLUSIVE);
	entry = te_registry_find(dboid);
	if (entry == NULL && (entry = te_registry_find(InvalidOid)) != NULL)
	{
		memset(entry, 0, sizeof(TeDatabase));
		entry->dboid = dboid;
	}
	if (entry != NULL)
	{
		entry->registrations++;
		entry->confirmed |= confirmed;
	}
	LWLockRelease(te_shared->lock);
	if (entry == NULL)
		ereport(WARNING,
				(errmsg("task_events cannot serve more than %d databases; database %u is not served",
						TE_MAX_DATABASES, dboid),
				 errhint("Drop the extension in databases that do not use it.")));
	te_wake_launcher();
}

/* Park or unpark dboid for this backend, and wake whoever must act. */
static void
te_set_parked(Oid dboid, bool parked)
{
	TeDatabase *entry;
	int			i;

	LWLockAcquire(te_shared->lock, LW_EXCLUSIVE);
	entry = te_registry_find(dboid);
	if (entry != NULL)
	{
		if (parked)
			entry->parked_by = MyProcPid;
		else if (entry->parked_by == MyProcPid)
			entry->parked_by = 0;
		for (i = 0; i < TE_MAX_WORKERS; i++)
			if (entry->worker_latch[i] != NULL)
				SetLatch(entry->worker_latch[i]);
	}
	LWLockRelease(te_shared->lock);
	te_wake_launcher();
}

static void
te_registry_xact_callback(XactEvent event, void *arg)
{
	ListCell   *lc;

	if (event != XACT_EVENT_COMMIT && event != XACT_EVENT_ABORT &&
		event != XACT_EVENT_PREPARE)
		return;
	foreach(lc, te_parked)
		te_set_parked(lfirst_oid(lc), false);
	if (event == XACT_EVENT_COMMIT)
	{
		foreach(lc, te_pending_registrations)
			te_registry_add(lfirst_oid(lc), true);
		foreach(lc, te_pending_probes)
			te_registry_add(lfirst_oid(lc), false);
	}
	list_free(te_parked);
	list_free(te_pending_registrations);
	list_free(te_pending_probes);
	te_parked = te_pending_registrations = te_pending_probes = NIL;
}

/* Append dboid to *list (kept across the transaction's memory contexts). */
static void
te_remember(List **list, Oid dboid)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	*list = lappend_oid(*list, dboid);
	MemoryContextSwitchTo(old);
	if (!te_callback_registered)
	{
		RegisterXactCallback(te_registry_xact_callback, NULL);
		te_callback_registered = true;
	}
}

/*
 * Register dboid when the current transaction commits: confirmed (the
 * extension was created or updated in it) or to be probed (a database
 * copied from a template that has the extension).
 */
void
te_register_database_at_commit(Oid dboid, bool confirmed)
{
	if (te_shared == NULL)
		return;
	te_remember(confirmed ? &te_pending_registrations : &te_pending_probes, dboid);
}

/*
 * Ask the workers of dboid to leave, and the launcher to start none, until
 * the current transaction ends.  The workers leave between two batches,
 * within the poll interval; the statement that asked waits for them the
 * way PostgreSQL waits for other sessions to leave (up to 5 seconds).
 */
void
te_park_database(Oid dboid)
{
	if (te_shared == NULL || te_registry_find(dboid) == NULL)
		return;
	te_remember(&te_parked, dboid);
	te_set_parked(dboid, true);
}

/*
 * Is the current database one that no worker can serve (the launcher said
 * why, or it is not in the registry)?  Writers then publish at commit even
 * in notify_mode relay (event_publish.c).  False when the library is not
 * preloaded: there is no launcher to say, and relay then means that the
 * user runs the relay handler with process_pending().
 */
bool
te_database_unserved(void)
{
	TeDatabase *entry;

	if (te_shared == NULL)
		return false;
	entry = te_registry_find(MyDatabaseId);
	return entry == NULL || entry->unserved != TE_SERVED;
}

/* What handler_status says about the workers of the current database. */
const char *
te_database_service(void)
{
	TeDatabase *entry;
	const char *service = "unknown";
	bool		excluded;
	int			i;

	if (te_shared == NULL)
		return "unserved: the library is not preloaded (shared_preload_libraries)";
	excluded = te_database[0] != '\0' &&
		strcmp(te_database, get_database_name(MyDatabaseId)) != 0;
	LWLockAcquire(te_shared->lock, LW_SHARED);
	entry = te_registry_find(MyDatabaseId);
	if (entry == NULL && excluded)
		service = psprintf("unserved: task_events.database is \"%s\"", te_database);
	else if (entry == NULL)
		service = psprintf("unserved: more than %d databases have the extension (see the server log)",
						   TE_MAX_DATABASES);
	else
	{
		switch (entry->unserved)
		{
			case TE_SERVED:
				service = "starting";
				for (i = 0; i < TE_MAX_WORKERS; i++)
					if (entry->worker_latch[i] != NULL)
						service = "running";
				break;
			case TE_UNSERVED_NO_SLOT:
				service = "unserved: no background worker slot left (max_worker_processes)";
				break;
			case TE_UNSERVED_EXCLUDED:
				service = psprintf("unserved: task_events.database is \"%s\"", te_database);
				break;
			case TE_UNSERVED_NO_CONNECTIONS:
				service = "unserved: the database does not allow connections";
				break;
			case TE_UNSERVED_ROLE:
				service = psprintf("unserved: role \"%s\" cannot log in (task_events.worker_role)",
								   te_worker_role);
				break;
		}
	}
	LWLockRelease(te_shared->lock);
	return service;
}

PG_FUNCTION_INFO_V1(te_workers_state);

/* task_events._workers_state(): handler_status.workers. */
Datum
te_workers_state(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(te_database_service()));
}
