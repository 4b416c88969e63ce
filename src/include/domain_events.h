/* domain_events.h: the domain events of a task and their payloads */
#ifndef TE_DOMAIN_EVENTS_H
#define TE_DOMAIN_EVENTS_H

#include "utils/jsonb.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

/* Version of the payload schema written into every event. */
#define TE_EVENT_SCHEMA_VERSION 1

/* One domain event, as appended to task_events.events and published. */
typedef struct TaskEvent
{
	const char *event_type;		/* "TaskCreated", "TaskStatusChanged", ... */
	pg_uuid_t	event_id;
	pg_uuid_t	aggregate_id;	/* the task */
	int64		aggregate_version;
	TimestampTz occurred_at;
	const char *user_id;		/* the task's owner */
	Jsonb	   *payload;
	int64		seq;			/* set by te_append_event() */
} TaskEvent;

/* What the event builders need to know about the task. */
typedef struct TaskFacts
{
	pg_uuid_t	task_id;
	const char *user_id;
	const char *title;
} TaskFacts;

extern void te_task_created(TaskEvent *ev, const TaskFacts *task,
							int64 version, TimestampTz at);
extern void te_task_status_changed(TaskEvent *ev, const TaskFacts *task,
								   int64 version, TimestampTz at,
								   const char *old_status, const char *new_status);
extern void te_task_completed(TaskEvent *ev, const TaskFacts *task,
							  int64 version, TimestampTz at);
extern char *te_iso8601(TimestampTz at);
extern char *te_uuid_string(const pg_uuid_t *uuid);

#endif
