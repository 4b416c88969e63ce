/*
 * commit_horizon.c
 *		The snapshot that bounds a window of events a handler reads.
 *
 * Events are not handled in seq order across transactions but in
 * visibility order: a handler's position is a pair of snapshots, and a
 * window holds the events whose inserting transaction (events.xact_id) is
 * visible in the window's end snapshot and was not visible in its start
 * snapshot.  Because a transaction that commits late is invisible to the
 * start snapshot, its events fall into a later window however low their seq:
 * nothing is skipped, and nothing is read twice.  Within a window events go
 * in seq order; two events of one task are written under the task's row
 * lock, so the later one's transaction commits after the earlier one's and
 * is never visible in a snapshot that misses it: per-task order holds.
 *
 * The end snapshot must show nothing the reading queries cannot see, so it
 * is built from the active snapshot, the one those queries run with.  The
 * reader's own transaction is listed as in progress: events it writes later
 * would otherwise count as seen without having been read.
 */
#include "postgres.h"

#include "access/transam.h"
#include "access/xact.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/snapmgr.h"

#include "commit_horizon.h"

/* The 64-bit form of xid, an xid no older than 2^31 transactions before next. */
static uint64
te_widen_xid(TransactionId xid, FullTransactionId next)
{
	uint32		epoch = EpochFromFullTransactionId(next);

	if (!TransactionIdIsNormal(xid))
		return (uint64) xid;
	if (xid > XidFromFullTransactionId(next))
		epoch--;
	return U64FromFullTransactionId(FullTransactionIdFromEpochAndXid(epoch, xid));
}

static int
te_cmp_uint64(const void *a, const void *b)
{
	uint64		x = *(const uint64 *) a;
	uint64		y = *(const uint64 *) b;

	return (x > y) - (x < y);
}

/*
 * The active snapshot as a pg_snapshot datum, with the current top-level
 * transaction (if it has an xid) counted as in progress.  Assumes an active
 * snapshot is set.
 */
Datum
te_window_snapshot(void)
{
	Snapshot	snap = GetActiveSnapshot();
	FullTransactionId next = ReadNextFullTransactionId();
	TransactionId own = GetTopTransactionIdIfAny();
	uint64		xmin = te_widen_xid(snap->xmin, next);
	uint64		xmax = te_widen_xid(snap->xmax, next);
	uint64	   *xip = palloc(sizeof(uint64) * (snap->xcnt + 1));
	int			nxip = 0;
	StringInfoData buf;
	int			i;

	for (i = 0; i < (int) snap->xcnt; i++)
		xip[nxip++] = te_widen_xid(snap->xip[i], next);
	if (TransactionIdIsValid(own))
	{
		uint64		own64 = te_widen_xid(own, next);

		if (own64 < xmax)
		{
			xip[nxip++] = own64;
			xmin = Min(xmin, own64);
		}
	}
	qsort(xip, nxip, sizeof(uint64), te_cmp_uint64);

	initStringInfo(&buf);
	appendStringInfo(&buf, UINT64_FORMAT ":" UINT64_FORMAT ":", xmin, xmax);
	for (i = 0; i < nxip; i++)
		appendStringInfo(&buf, "%s" UINT64_FORMAT, i > 0 ? "," : "", xip[i]);
	return DirectFunctionCall1(pg_snapshot_in, CStringGetDatum(buf.data));
}
