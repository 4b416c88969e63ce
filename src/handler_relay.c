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
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/typcache.h"

#include "event_publish.h"
#include "handler_call.h"
#include "task_events.h"

/*
 * Column number of "name" in the events row type, found by name so that a
 * column added by a later version cannot shift what is read.
 */
static AttrNumber
te_attnum(TupleDesc desc, const char *name)
{
	int			attnum = SPI_fnumber(desc, name);

	if (attnum <= 0)
		elog(ERROR, "task_events.events has no column \"%s\"", name);
	return (AttrNumber) attnum;	/* at most MaxTupleAttributeNumber */
}

/*
 * The value of a column that an envelope needs.  Rows read from the table
 * are never NULL there, but the function can be called with a hand-built
 * array.
 */
static Datum
te_required_attr(HeapTuple tuple, AttrNumber attnum, TupleDesc desc)
{
	bool		isnull;
	Datum		value = heap_getattr(tuple, attnum, desc, &isnull);

	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("event column \"%s\" must not be null",
						NameStr(TupleDescAttr(desc, attnum - 1)->attname))));
	return value;
}

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
	AttrNumber	seq_att;
	AttrNumber	type_att;
	AttrNumber	occurred_att;
	AttrNumber	payload_att;
	int			i;

	if (PG_ARGISNULL(0) || te_notify_mode != TE_NOTIFY_RELAY)
		PG_RETURN_VOID();
	/* Heard only once the position that records it survives a crash. */
	te_request_durable_commit();

	batch = PG_GETARG_ARRAYTYPE_P(0);
	event_type = ARR_ELEMTYPE(batch);
	get_typlenbyvalalign(event_type, &typlen, &typbyval, &typalign);
	deconstruct_array(batch, event_type, typlen, typbyval, typalign,
					  &events, NULL, &nevents);
	desc = lookup_rowtype_tupdesc(event_type, -1);
	seq_att = te_attnum(desc, "seq");
	type_att = te_attnum(desc, "event_type");
	occurred_att = te_attnum(desc, "occurred_at");
	payload_att = te_attnum(desc, "payload");

	for (i = 0; i < nevents; i++)
	{
		HeapTupleHeader header = DatumGetHeapTupleHeader(events[i]);
		HeapTupleData tuple;
		Datum		type;
		Datum		payload;
		Datum		occurred_at;
		Datum		seq;

		tuple.t_len = HeapTupleHeaderGetDatumLength(header);
		ItemPointerSetInvalid(&tuple.t_self);
		tuple.t_tableOid = InvalidOid;
		tuple.t_data = header;
		type = te_required_attr(&tuple, type_att, desc);
		payload = te_required_attr(&tuple, payload_att, desc);
		occurred_at = te_required_attr(&tuple, occurred_att, desc);
		seq = te_required_attr(&tuple, seq_att, desc);

		Async_Notify(TE_CHANNEL,
					 te_event_envelope(TextDatumGetCString(type), DatumGetJsonbP(payload),
									   DatumGetTimestampTz(occurred_at), DatumGetInt64(seq)));
	}
	ReleaseTupleDesc(desc);
	PG_RETURN_VOID();
}
