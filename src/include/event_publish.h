/* event_publish.h: the JSON envelope of an event and its NOTIFY */
#ifndef TE_EVENT_PUBLISH_H
#define TE_EVENT_PUBLISH_H

#include "domain_events.h"

/* The NOTIFY channel every event is published on. */
#define TE_CHANNEL "task_events"

extern char *te_event_envelope(const char *event_type, Jsonb *payload,
							   TimestampTz occurred_at, int64 seq);
extern void te_publish_event(const TaskEvent *ev);

#endif
