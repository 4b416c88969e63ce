/* handler_call.h: calling a handler function as its owner, contained */
#ifndef TE_HANDLER_CALL_H
#define TE_HANDLER_CALL_H

#include "postgres.h"

extern bool te_call_handler(Oid function, Datum events, MemoryContext cxt,
							ErrorData **error);
extern void te_request_durable_commit(void);
extern bool te_take_durable_commit_request(void);

#endif
