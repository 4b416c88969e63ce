/* commit_horizon.h: which events a reader has already been shown */
#ifndef TE_COMMIT_HORIZON_H
#define TE_COMMIT_HORIZON_H

#include "postgres.h"

extern Datum te_window_snapshot(void);

/*
 * The events of a window: those whose transaction is visible in snapshot
 * end and was not in snapshot start (start and end are SQL expressions of
 * type pg_snapshot), as an SQL FROM item "w" with column seq.  The one
 * definition of "in this window" (commit_horizon.c says why it is
 * right); task_events.handler_backlog() in the install script is its SQL
 * twin.
 *
 * Not visible in start means: in start's list of transactions in progress,
 * or at or past its xmax.  The two branches are found through
 * events_xact_id_idx by those ids and by that range, so the cost is the
 * events of the window plus those of the few transactions start saw in
 * progress: it does not grow while a long transaction (an idle writer, a
 * prepared transaction) holds the xmin back and events pile up behind it,
 * as a range from start's xmin would.  OFFSET 0 keeps the planner from
 * turning min(seq) over it into a walk of events_pkey from seq 1.
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

#endif
