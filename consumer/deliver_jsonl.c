/*
 * deliver_jsonl.c
 *		--jsonl, the default mode: each event's envelope as one line on
 *		stdout.
 *
 * The batch is acknowledged only after all of it is written and flushed to
 * the reader (fflush); a reader that has gone away (EPIPE) or a full disk
 * ends the program, the batch left to its lease.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "consume.h"

void
te_deliver_jsonl(const ConsumeOptions *opts, const ConsumeBatch *batch,
				 DeliveryResult *result)
{
	(void) opts;
	memset(result, 0, sizeof(*result));
	for (int i = 0; i < batch->n; i++)
	{
		if (fputs(batch->events[i].envelope, stdout) == EOF ||
			putc('\n', stdout) == EOF)
			break;
	}
	if (fflush(stdout) != 0 || ferror(stdout))
	{
		result->outcome = FATAL;
		snprintf(result->error, sizeof(result->error),
				 "could not write to stdout: %s", strerror(errno));
		return;
	}
	result->outcome = DELIVERED;
	result->delivered = batch->n;
}
