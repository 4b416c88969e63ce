/* commit_horizon.h: which events a reader's window holds */
#ifndef TE_COMMIT_HORIZON_H
#define TE_COMMIT_HORIZON_H

#include "postgres.h"

/*
 * Where a reader is in the event log, as its state row saves it
 * (window_start, window_end, window_seq): it has read every event visible
 * in start and, while a window is open, the window's events up to seq.
 */
typedef struct EventWindow
{
	Datum		start;			/* pg_snapshot */
	Datum		end;			/* pg_snapshot, or 0 when no window is open */
	int64		seq;			/* in the open window, seqs up to this are done */
} EventWindow;

extern Datum te_window_snapshot(void);
extern int64 te_window_min_seq(Datum start, Datum end);
extern bool te_open_window(EventWindow *window, Datum end, int64 min_seq);
extern void te_open_replay_window(EventWindow *window, int64 from_seq);
extern void te_close_window(EventWindow *window);

/*
 * The events of a window are those whose transaction is visible in its end
 * snapshot and was not in its start snapshot (commit_horizon.c says why
 * that is right): the one definition of "in this window", written in SQL
 * in two forms, for the two ways the window is read.  start and end are
 * SQL expressions of type pg_snapshot.  The install script writes the same
 * test out for the events a position has not handled yet
 * (task_events.handler_backlog(), task_events.adopt_restored_log()).
 *
 * TE_WINDOW_EVENTS, the window as an SQL FROM item "w" with column seq:
 * for finding where a window begins (TE_WINDOW_MIN_SEQ).  Not visible in
 * start means: in start's list of transactions in progress, or at or past
 * its xmax.  The two branches are found through events_xact_id_idx by
 * those ids and by that range, so the cost is the events of the window plus
 * those of the few transactions start saw in progress: it does not grow
 * while a long transaction (an idle writer, a prepared transaction) holds
 * the xmin back and events pile up behind it, as a range from start's xmin
 * would.  OFFSET 0 keeps the planner from turning min(seq) over it into a
 * walk of events_pkey from seq 1.
 */
#define TE_WINDOW_EVENTS(start, end) \
	"(SELECT e.seq FROM task_events.events e" \
	"  WHERE e.xact_id OPERATOR(pg_catalog.=) ANY (ARRAY(" \
	"          SELECT pg_catalog.pg_snapshot_xip(" start ")))" \
	"    AND pg_catalog.pg_visible_in_snapshot(e.xact_id, " end ")" \
	" UNION ALL" \
	" SELECT e.seq FROM task_events.events e" \
	"  WHERE e.xact_id OPERATOR(pg_catalog.>=) pg_catalog.pg_snapshot_xmax(" start ")" \
	"    AND e.xact_id OPERATOR(pg_catalog.<) pg_catalog.pg_snapshot_xmax(" end ")" \
	"    AND pg_catalog.pg_visible_in_snapshot(e.xact_id, " end ")" \
	" OFFSET 0) w"

/* The lowest seq of a window, NULL when it holds no event. */
#define TE_WINDOW_MIN_SEQ(start, end) \
	"(SELECT pg_catalog.min(w.seq) FROM " TE_WINDOW_EVENTS(start, end) ")"

/*
 * TE_IN_WINDOW, whether an event whose transaction is xact_id (an SQL
 * expression of type xid8) is in the window: for reading an open window in
 * seq order from a seq in it, along events_pkey.  Such a read walks every
 * event from that seq on until it has found the ones it wants, those of
 * earlier windows and of transactions still in progress included: when a
 * transaction that wrote an event commits long after, the window its event
 * opens walks over every event written meanwhile, once, in its first batch.
 */
#define TE_IN_WINDOW(xact_id, start, end) \
	"NOT pg_catalog.pg_visible_in_snapshot(" xact_id ", " start ")" \
	" AND pg_catalog.pg_visible_in_snapshot(" xact_id ", " end ")"

#endif
