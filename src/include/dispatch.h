/* dispatch.h: running batches of events through a handler */
#ifndef TE_DISPATCH_H
#define TE_DISPATCH_H

#include "nodes/pg_list.h"
#include "call_journal.h"
#include "utils/timestamp.h"

/*
 * What a look at a handler found, before locking it: whether it has work
 * (and the window it would open), or is backing off after a failure.
 */
typedef struct HandlerPeek
{
	char	   *handler;
	int32		lane;			/* one of the lanes in effect (handler_state.lane) */
	bool		lanes_changing; /* set_handler_lanes() set a barrier */
	bool		has_work;		/* new events, an open window or retries */
	bool		backing_off;	/* a failed event is retried at retry_at */
	TimestampTz retry_at;
	bool		has_state_row;	/* false for a handler that never ran */
	bool		retries_queued; /* dead letters queued for a retry */
	Datum		window_start;	/* pg_snapshot: the handler's position */
	Datum		window_end;		/* pg_snapshot the peek looked up to */
	int64		min_seq;		/* first event after the position, or 0 */
} HandlerPeek;

/* What one call of te_run_handler_batch() did. */
typedef struct BatchOutcome
{
	int64		done;			/* events processed or dead-lettered, committed
								 * with the position */
	int64		failed;			/* failed attempts */
	bool		more;			/* more events may be waiting right now */
	TimestampTz retry_at;		/* > 0: the handler backs off until then */
	CalledRange calls;			/* what the handler was called with, to count
								 * if the commit fails (first_seq 0: nothing) */
	bool		durable;		/* the batch must commit durably */
} BatchOutcome;

extern List *te_peek_handlers(const char *only, MemoryContext cxt);
extern bool te_run_handler_batch(const HandlerPeek *peek, int max_events,
								 BatchOutcome *outcome);

/* lost_batch.c */
extern bool te_record_lost_batch(const CalledRange *calls, int sqlerrcode,
								 const char *message);

#endif
