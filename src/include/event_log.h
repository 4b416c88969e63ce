/* event_log.h: appending to and reading the task_events.events log */
#ifndef TE_EVENT_LOG_H
#define TE_EVENT_LOG_H

#include "domain_events.h"

extern void te_append_event(TaskEvent *ev);

#endif
