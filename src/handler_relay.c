/*
 * handler_relay.c
 *		The built-in relay handler: publishes events on the task_events
 *		channel after their commit, when task_events.notify_mode = relay.
 *
 * NOTIFY makes every notifying commit take one cluster-wide lock and hold
 * it through the WAL flush, so writers that notify commit one at a time.
 * In relay mode the writers do not notify; this handler, run by the
 * workers like any other, queues the same envelopes, a whole batch per
 * transaction, in the order the handler receives events (seq order within
 * a window; a transaction that commits late is published when it commits).
 * The notifications and the handler's position commit together: each event
 * is published once.  In the other modes the handler only moves its
 * position, so that switching to relay later does not replay old events.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "commands/async.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/typcache.h"

#include "event_publish.h"
#include "task_events.h"

/* Column numbers in task_events.events, as created by the install script. */
#define TE_EVENTS_SEQ			1
#define TE_EVENTS_EVENT_TYPE	3
#define TE_EVENTS_OCCURRED_AT	7
#define TE_EVENTS_PAYLOAD		9

PG_FUNCTION_INFO_V1(relay_handler);
Datum
relay_handler(PG_FUNCTION_ARGS)
{
	ArrayType  *batch;
	Oid			event_type;
	int16		typlen;
	bool		typbyval;
	char		typalign;
	Datum	   *events;
	int			nevents;
	TupleDesc	desc;
	int			i;

	if (PG_ARGISNULL(0) || te_notify_mode != TE_NOTIFY_RELAY)
		PG_RETURN_VOID();

	batch = PG_GETARG_ARRAYTYPE_P(0);
	event_type = ARR_ELEMTYPE(batch);
	get_typlenbyvalalign(event_type, &typlen, &typbyval, &typalign);
	deconstruct_array(batch, event_type, typlen, typbyval, typalign,
					  &events, NULL, &nevents);
	desc = lookup_rowtype_tupdesc(event_type, -1);

	for (i = 0; i < nevents; i++)
	{
		HeapTupleHeader header = DatumGetHeapTupleHeader(events[i]);
		HeapTupleData tuple;
		Datum		type;
		Datum		payload;
		Datum		occurred_at;
		Datum		seq;
		bool		isnull;

		tuple.t_len = HeapTupleHeaderGetDatumLength(header);
		ItemPointerSetInvalid(&tuple.t_self);
		tuple.t_tableOid = InvalidOid;
		tuple.t_data = header;
		type = heap_getattr(&tuple, TE_EVENTS_EVENT_TYPE, desc, &isnull);
		payload = heap_getattr(&tuple, TE_EVENTS_PAYLOAD, desc, &isnull);
		occurred_at = heap_getattr(&tuple, TE_EVENTS_OCCURRED_AT, desc, &isnull);
		seq = heap_getattr(&tuple, TE_EVENTS_SEQ, desc, &isnull);

		Async_Notify(TE_CHANNEL,
					 te_event_envelope(TextDatumGetCString(type), DatumGetJsonbP(payload),
									   DatumGetTimestampTz(occurred_at), DatumGetInt64(seq)));
	}
	ReleaseTupleDesc(desc);
	PG_RETURN_VOID();
}
