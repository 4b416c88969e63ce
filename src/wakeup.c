/*
 * wakeup.c
 *		Waking the workers when a transaction that wrote events commits.
 *
 * A background worker cannot LISTEN (notifications go to a frontend), so a
 * writer that appends an event registers, once per transaction, interest in
 * its commit; the transaction callback then sets the latches of the running
 * workers of its database.  XACT_EVENT_COMMIT fires after the commit is visible to new
 * snapshots, so a woken worker sees the events.  Commits that bypass the
 * write functions (COMMIT PREPARED, pg_restore, a direct INSERT) are found by
 * the workers' timed poll (task_events.poll_interval).
 */
#include "postgres.h"

#include "access/xact.h"
#include "miscadmin.h"

#include "task_events.h"

static bool te_callback_registered = false;
static bool te_xact_wrote_events = false;

/*
 * Set the latch of every running worker of the current database.  Read
 * without the registry's lock: a latch read just as its worker exits wakes
 * another process for nothing (a latch lives as long as the server).
 */
void
te_wake_workers(void)
{
	TeDatabase *entry = te_registry_find(MyDatabaseId);
	int			i;

	if (entry == NULL)
		return;
	for (i = 0; i < TE_MAX_WORKERS; i++)
	{
		Latch	   *latch = entry->worker_latch[i];

		if (latch != NULL)
			SetLatch(latch);
	}
}

static void
te_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
			if (te_xact_wrote_events)
				te_wake_workers();
			te_xact_wrote_events = false;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PREPARE:
			te_xact_wrote_events = false;
			break;
		default:
			break;
	}
}

/*
 * Note that the current transaction wrote events: the workers are woken
 * when it commits.  A no-op when the library was not preloaded.
 */
void
te_wake_workers_at_commit(void)
{
	if (te_shared == NULL)
		return;
	if (!te_callback_registered)
	{
		RegisterXactCallback(te_xact_callback, NULL);
		te_callback_registered = true;
	}
	te_xact_wrote_events = true;
}
