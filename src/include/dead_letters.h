/* dead_letters.h: a handler's failing events, dead letters and their retry */
#ifndef TE_DEAD_LETTERS_H
#define TE_DEAD_LETTERS_H

#include "handler_state.h"

extern TimestampTz te_backoff_until(int attempts);
extern bool te_dead_letter_if_exhausted(HandlerState *st, Datum batch);
extern bool te_run_one_by_one(HandlerState *st, Datum batch, MemoryContext cxt);
extern bool te_retry_dead_letters(HandlerState *st, int max_events, MemoryContext cxt);

#endif
