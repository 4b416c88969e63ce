/* dispatch.h: running batches of events through a handler */
#ifndef TE_DISPATCH_H
#define TE_DISPATCH_H

#include "utils/timestamp.h"

/* What one call of te_run_handler_batch() did. */
typedef struct BatchOutcome
{
	int64		handled;		/* events handled or dead-lettered, committed
								 * with the position */
	int64		failed;			/* failed attempts */
	bool		more;			/* more events may be waiting right now */
	TimestampTz retry_at;		/* > 0: the handler backs off until then */
} BatchOutcome;

extern bool te_run_handler_batch(const char *handler, int max_events,
								 BatchOutcome *outcome);
extern List *te_list_handlers(void);

#endif
