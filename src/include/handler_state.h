/* handler_state.h: a handler's state while a batch of it runs */
#ifndef TE_HANDLER_STATE_H
#define TE_HANDLER_STATE_H

#include "postgres.h"

#include "utils/timestamp.h"

#include "call_journal.h"
#include "commit_horizon.h"
#include "dispatch.h"

/*
 * The row of task_events.handler_state of one lane of a handler, as locked
 * for a batch (dispatch.c), and what the batch adds to it, failures
 * included (dead_letters.c).  Saved at the end of the batch, in its
 * transaction.
 */
typedef struct HandlerState
{
	const char *handler;
	int32		lane;			/* the lane whose position this is */
	int32		lanes;			/* the lanes in effect (1: no filter) */
	Datum		lanes_barrier;	/* pg_snapshot, 0: the lanes are not changing */
	Oid			function;
	Datum		event_types;	/* text[] of the types it is called with, 0: all */
	EventWindow window;			/* window_start, window_end, window_seq */
	int64		last_seq;		/* highest seq handled, for monitoring */
	int64		failing_seq;	/* 0, or the event being retried */
	int32		attempts;		/* failed attempts at failing_seq */
	TimestampTz retry_at;		/* 0, or no attempt before this time */
	int64		isolate_through;	/* events up to this seq go one per batch */
	int64		replay_from_seq;	/* 0, or replay_handler() asked for a replay */
	int64		generation;		/* of the state row, bumped at each save */
	char	   *last_sqlstate;	/* the last failure, as saved */
	char	   *last_message;
	const HandlerPeek *peek;	/* what te_peek_handlers found */
	bool		opened_window;	/* this batch opened the window */
	/* what this batch adds to the state */
	int64		done;			/* events moved past: processed or dead-lettered */
	int64		processed;		/* events the handler handled successfully */
	int64		failed;
	double		batch_ms;
	bool		changed;		/* something to save */
	CalledRange calls;			/* the events passed to the handler (first_seq 0: none) */
	ErrorData  *last_error;
} HandlerState;

/* dispatch.c: the events of a batch, and calling the handler with them */
extern int64 te_event_seq(Datum event);
extern Datum te_single_event_array(Datum event, Oid event_type);
extern void te_batch_events(Datum batch, Oid *event_type, Datum **events, int *nevents);
extern bool te_call(HandlerState *st, Datum events, bool retries, MemoryContext cxt,
					ErrorData **error);
extern void te_mark_done(HandlerState *st, int64 seq, int64 count, bool processed);

/* handler_lanes.c: a change of the number of lanes */
extern bool te_at_barrier(const HandlerState *st);
extern bool te_try_change_lanes(HandlerState *st);

#endif
