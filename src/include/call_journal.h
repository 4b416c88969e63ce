/* call_journal.h: the handler call a worker is in, kept across its death */
#ifndef TE_CALL_JOURNAL_H
#define TE_CALL_JOURNAL_H

#include "postgres.h"

/*
 * Handler calls whose outcome may be lost with their process or their
 * transaction's commit: the events first_seq..last_seq of the window of the
 * handler's lane (or of its dead letters, when retries), called while the
 * lane's state row had this generation.
 */
typedef struct CalledRange
{
	char		handler[NAMEDATALEN];
	int32		lane;
	int64		generation;
	int64		first_seq;
	int64		last_seq;
	bool		retries;		/* dead letters retried, not window events */
} CalledRange;

extern bool te_journal_open(int slot, CalledRange *range);
extern void te_journal_write(const CalledRange *range);
extern void te_journal_clear(void);
extern void te_journal_on_quit(SIGNAL_ARGS);

#endif
