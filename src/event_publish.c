/*
 * event_publish.c
 *		Publishing events on the task_events NOTIFY channel.
 *
 * The envelope is {"event_type": ..., "event_data": <payload>, "timestamp":
 * <ISO 8601>, "seq": <seq>}.  In notify_mode commit, NOTIFY queues it in
 * the writing transaction, so listeners see it at commit and never for a
 * rolled-back transaction; within a transaction, notifications arrive in the
 * order queued (seq order).  In relay mode the relay handler
 * (handler_relay.c) queues the same envelopes in its own transactions.
 *
 * Size: NOTIFY refuses payloads of 8000 bytes or more.  The largest payload
 * the argument limits allow is a 500-character title plus a 200-character
 * user_id made of control characters, each escaped as \u00XX (6 bytes):
 * 4,569 bytes for that TaskCompleted envelope (test/pgtap/publishing.sql
 * sends it), so every valid call fits.
 */
#include "postgres.h"

#include "commands/async.h"
#include "lib/stringinfo.h"
#include "utils/json.h"

#include "event_publish.h"
#include "task_events.h"

/* Build the envelope of one event, in the current memory context. */
char *
te_event_envelope(const char *event_type, Jsonb *payload,
				  TimestampTz occurred_at, int64 seq)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"event_type\": ");
	escape_json(&buf, event_type);
	appendStringInfoString(&buf, ", \"event_data\": ");
	(void) JsonbToCString(&buf, &payload->root, VARSIZE(payload));
	appendStringInfoString(&buf, ", \"timestamp\": ");
	escape_json(&buf, te_iso8601(occurred_at));
	appendStringInfo(&buf, ", \"seq\": " INT64_FORMAT "}", seq);
	return buf.data;
}

/*
 * Queue the NOTIFY of one appended event (ev->seq must be set), unless
 * task_events.notify_mode leaves publishing to the relay handler, or off.
 * In relay mode, a database that no worker can serve (registry.c) publishes
 * at commit instead: it would publish nothing otherwise.
 */
void
te_publish_event(const TaskEvent *ev)
{
	if (te_notify_mode == TE_NOTIFY_OFF ||
		(te_notify_mode == TE_NOTIFY_RELAY && !te_database_unserved()))
		return;
	Async_Notify(TE_CHANNEL,
				 te_event_envelope(ev->event_type, ev->payload,
								   ev->occurred_at, ev->seq));
}
