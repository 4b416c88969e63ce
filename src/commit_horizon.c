/*
 * commit_horizon.c
 *		Which events a reader's window holds: the snapshot that bounds it,
 *		where it begins, and how a window opens and closes.
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
 *
 * The SQL that tells which events a window holds is in commit_horizon.h
 * (TE_WINDOW_EVENTS, TE_IN_WINDOW), with what it costs.  A reader saves
 * its EventWindow in a state row of its own (dispatch.c, for the handlers);
 * the functions here only find where a window begins and move it.
 */
#include "postgres.h"

#include "access/transam.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/snapmgr.h"

#include "commit_horizon.h"
#include "spi_util.h"

static SPIPlanPtr te_window_plan = NULL;

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

/*
 * The lowest seq of the events visible in end and not in start, or 0 when
 * there is none.  Assumes SPI is connected and an active snapshot.
 */
int64
te_window_min_seq(Datum start, Datum end)
{
	static const Oid argtypes[] = {PG_SNAPSHOTOID, PG_SNAPSHOTOID};
	Datum		values[2];
	Datum		value;
	bool		isnull;
	int64		min_seq;

	te_prepare_kept(&te_window_plan,
					"SELECT " TE_WINDOW_MIN_SEQ("$1", "$2"),
					lengthof(argtypes), argtypes);
	values[0] = start;
	values[1] = end;
	te_execute_kept(te_window_plan, values, NULL, SPI_OK_SELECT);
	value = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	min_seq = isnull ? 0 : DatumGetInt64(value);
	SPI_freetuptable(SPI_tuptable);
	return min_seq;
}

/*
 * Open a window on *window, which has none open: from its start up to
 * snapshot end, whose first event is min_seq (te_window_min_seq).  False,
 * and nothing opened, when min_seq is 0: that window holds no event.
 */
bool
te_open_window(EventWindow *window, Datum end, int64 min_seq)
{
	if (min_seq == 0)
		return false;
	window->end = end;
	window->seq = min_seq - 1;
	return true;
}

/*
 * Open a window on *window, which has none open, over the events it has
 * already read, to read them again from from_seq on: from no snapshot at
 * all up to its start.  Once closed, the position is where it was.
 */
void
te_open_replay_window(EventWindow *window, int64 from_seq)
{
	window->end = window->start;
	window->start = DirectFunctionCall1(pg_snapshot_in, CStringGetDatum("1:1:"));
	window->seq = from_seq - 1;
}

/* Close the open window: everything up to its end snapshot is read. */
void
te_close_window(EventWindow *window)
{
	window->start = window->end;
	window->end = (Datum) 0;
	window->seq = 0;
}

PG_FUNCTION_INFO_V1(te_window_snapshot_sql);

/*
 * task_events._window_snapshot(): te_window_snapshot for the subscriptions'
 * SQL (task_events--1.0--1.1.sql, read_batch).
 */
Datum
te_window_snapshot_sql(PG_FUNCTION_ARGS)
{
	return te_window_snapshot();
}
