/*
 * domain_events.c
 *		The domain events of a task (TaskCreated, TaskStatusChanged,
 *		TaskCompleted) and the keys of their jsonb payloads.
 *
 * Every payload carries event_id, timestamp, aggregate_id and event_version;
 * the other keys are those of the event type.  Timestamps are ISO 8601 in
 * UTC, whatever the session's TimeZone, so that payloads do not depend on
 * the writer's settings.
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/json.h"

#include "domain_events.h"
#include "uuid_v7.h"

/* Format a timestamp as ISO 8601 in UTC, e.g. 2026-11-26T17:02:30.5+00:00. */
char *
te_iso8601(TimestampTz at)
{
	char		buf[MAXDATELEN + 1];
	int			utc = 0;

	JsonEncodeDateTime(buf, TimestampTzGetDatum(at), TIMESTAMPTZOID, &utc);
	return pstrdup(buf);
}

char *
te_uuid_string(const pg_uuid_t *uuid)
{
	return DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(uuid)));
}

/* Payload under construction: a jsonb object being pushed key by key. */
typedef struct PayloadBuilder
{
	JsonbParseState *state;
} PayloadBuilder;

static void
te_payload_key(PayloadBuilder *pb, const char *key)
{
	JsonbValue	k;

	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	pushJsonbValue(&pb->state, WJB_KEY, &k);
}

static void
te_payload_string(PayloadBuilder *pb, const char *key, const char *value)
{
	JsonbValue	v;

	te_payload_key(pb, key);
	v.type = jbvString;
	v.val.string.val = (char *) value;
	v.val.string.len = strlen(value);
	pushJsonbValue(&pb->state, WJB_VALUE, &v);
}

static void
te_payload_int(PayloadBuilder *pb, const char *key, int64 value)
{
	JsonbValue	v;

	te_payload_key(pb, key);
	v.type = jbvNumeric;
	v.val.numeric = int64_to_numeric(value);
	pushJsonbValue(&pb->state, WJB_VALUE, &v);
}

/*
 * Fill the fields every event shares, mint its id and open its payload with
 * the common keys.  The caller adds the type's own keys, then closes it with
 * te_finish_payload().
 */
static void
te_begin_event(TaskEvent *ev, PayloadBuilder *pb, const char *event_type,
			   const TaskFacts *task, int64 version, TimestampTz at)
{
	ev->event_type = event_type;
	te_uuid_v7(at, &ev->event_id);
	ev->aggregate_id = task->task_id;
	ev->aggregate_version = version;
	ev->occurred_at = at;
	ev->user_id = task->user_id;
	ev->seq = 0;

	pb->state = NULL;
	pushJsonbValue(&pb->state, WJB_BEGIN_OBJECT, NULL);
	te_payload_string(pb, "event_id", te_uuid_string(&ev->event_id));
	te_payload_string(pb, "timestamp", te_iso8601(at));
	te_payload_string(pb, "aggregate_id", te_uuid_string(&task->task_id));
	te_payload_int(pb, "event_version", TE_EVENT_SCHEMA_VERSION);
}

static void
te_finish_payload(TaskEvent *ev, PayloadBuilder *pb)
{
	JsonbValue *object = pushJsonbValue(&pb->state, WJB_END_OBJECT, NULL);

	ev->payload = JsonbValueToJsonb(object);
}

/* TaskCreated {event_id, timestamp, aggregate_id, task_title, user_id} */
void
te_task_created(TaskEvent *ev, const TaskFacts *task, int64 version, TimestampTz at)
{
	PayloadBuilder pb;

	te_begin_event(ev, &pb, "TaskCreated", task, version, at);
	te_payload_string(&pb, "task_title", task->title);
	te_payload_string(&pb, "user_id", task->user_id);
	te_finish_payload(ev, &pb);
}

/* TaskStatusChanged {event_id, timestamp, aggregate_id, old_status, new_status, task_title} */
void
te_task_status_changed(TaskEvent *ev, const TaskFacts *task, int64 version,
					   TimestampTz at, const char *old_status, const char *new_status)
{
	PayloadBuilder pb;

	te_begin_event(ev, &pb, "TaskStatusChanged", task, version, at);
	te_payload_string(&pb, "old_status", old_status);
	te_payload_string(&pb, "new_status", new_status);
	te_payload_string(&pb, "task_title", task->title);
	te_finish_payload(ev, &pb);
}

/* TaskCompleted {event_id, timestamp, aggregate_id, task_title, user_id, completed_at} */
void
te_task_completed(TaskEvent *ev, const TaskFacts *task, int64 version, TimestampTz at)
{
	PayloadBuilder pb;

	te_begin_event(ev, &pb, "TaskCompleted", task, version, at);
	te_payload_string(&pb, "task_title", task->title);
	te_payload_string(&pb, "user_id", task->user_id);
	te_payload_string(&pb, "completed_at", te_iso8601(at));
	te_finish_payload(ev, &pb);
}
