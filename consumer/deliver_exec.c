/*
 * deliver_exec.c
 *		--exec COMMAND: the command, run with /bin/sh -c once per batch,
 *		reads the batch's events as JSON lines on its stdin; exit status 0
 *		delivers the batch, any other status (or a signal) is a failed
 *		attempt.
 *
 * The command inherits stdout and stderr, and has TASK_EVENTS_SUBSCRIPTION,
 * TASK_EVENTS_BATCH_ID and TASK_EVENTS_LANE in its environment.  A command
 * that exits without reading all of stdin is judged by its exit status
 * alone.  The loop calls te_find_failing_event at a batch's last attempt:
 * the batch is bisected, each part run as a batch of its own, to find the
 * first event the command fails on; the events before it are delivered.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "consume.h"

/* Write all of buf to fd; false when the reader has gone (EPIPE) or on error. */
static bool
te_write_all(int fd, const char *buf, size_t len)
{
	while (len > 0)
	{
		ssize_t		w = write(fd, buf, len);

		if (w < 0)
		{
			if (errno == EINTR)
				continue;
			return false;
		}
		buf += w;
		len -= (size_t) w;
	}
	return true;
}

/*
 * Run the command on events [first, first + count) of the batch; returns
 * true when it exited with status 0, else false with the reason in error.
 */
static bool
te_run_command(const ConsumeOptions *opts, const ConsumeBatch *batch,
			   int first, int count, char *error, size_t errlen)
{
	int			fds[2];
	pid_t		pid;
	int			status;
	bool		writing = true;

	if (pipe(fds) != 0)
	{
		snprintf(error, errlen, "could not create a pipe: %s", strerror(errno));
		return false;
	}
	fflush(stdout);
	fflush(stderr);
	pid = fork();
	if (pid < 0)
	{
		snprintf(error, errlen, "could not fork: %s", strerror(errno));
		close(fds[0]);
		close(fds[1]);
		return false;
	}
	if (pid == 0)
	{
		char		value[32];

		signal(SIGPIPE, SIG_DFL);
		if (dup2(fds[0], STDIN_FILENO) < 0)
			_exit(127);
		close(fds[0]);
		close(fds[1]);
		setenv("TASK_EVENTS_SUBSCRIPTION", opts->subscription, 1);
		snprintf(value, sizeof(value), "%lld", (long long) batch->batch_id);
		setenv("TASK_EVENTS_BATCH_ID", value, 1);
		snprintf(value, sizeof(value), "%d", batch->lane);
		setenv("TASK_EVENTS_LANE", value, 1);
		execl("/bin/sh", "sh", "-c", opts->command, (char *) NULL);
		_exit(127);
	}
	close(fds[0]);
	for (int i = first; i < first + count && writing; i++)
	{
		const char *line = batch->events[i].envelope;

		writing = te_write_all(fds[1], line, strlen(line)) &&
			te_write_all(fds[1], "\n", 1);
	}
	close(fds[1]);
	while (waitpid(pid, &status, 0) < 0)
	{
		if (errno != EINTR)
		{
			snprintf(error, errlen, "waitpid failed: %s", strerror(errno));
			return false;
		}
	}
	if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
		return true;
	if (WIFEXITED(status))
		snprintf(error, errlen, "command exited with status %d", WEXITSTATUS(status));
	else if (WIFSIGNALED(status))
		snprintf(error, errlen, "command was terminated by signal %d", WTERMSIG(status));
	else
		snprintf(error, errlen, "command ended with wait status %d", status);
	return false;
}

void
te_deliver_exec(const ConsumeOptions *opts, const ConsumeBatch *batch,
				DeliveryResult *result)
{
	memset(result, 0, sizeof(*result));
	if (te_run_command(opts, batch, 0, batch->n, result->error, sizeof(result->error)))
	{
		result->outcome = DELIVERED;
		result->delivered = batch->n;
		return;
	}
	/* A command that fails while we stop may have had our signal too. */
	result->outcome = te_stop_requested ? LEFT : FAILED;
	result->failed_at = -1;
}

/*
 * The batch failed as a whole at its last attempt: bisect it, running the
 * command on parts, to find the first event it fails on.  Invariant: the
 * events before lo are delivered, and [lo, hi) failed as a whole.  Ends
 * with FAILED at that event (delivered = the events before it), or
 * DELIVERED when every part went through this time.
 */
void
te_find_failing_event(const ConsumeOptions *opts, const ConsumeBatch *batch,
					  DeliveryResult *result)
{
	int			lo = 0;
	int			hi = batch->n;
	char		error[sizeof(result->error)];

	memset(error, 0, sizeof(error));
	while (hi - lo > 1)
	{
		int			mid = lo + (hi - lo) / 2;

		if (te_stop_requested)
		{
			result->outcome = LEFT;
			snprintf(result->error, sizeof(result->error), "stopped while splitting the batch");
			return;
		}
		if (!te_run_command(opts, batch, lo, mid - lo, result->error, sizeof(result->error)))
		{
			hi = mid;
			continue;
		}
		lo = mid;
		if (!te_run_command(opts, batch, lo, hi - lo, result->error, sizeof(result->error)))
			continue;
		/* [0, hi) is delivered: the rest of the batch, if any, as a whole. */
		lo = hi;
		hi = batch->n;
		if (lo == hi ||
			te_run_command(opts, batch, lo, hi - lo, result->error, sizeof(result->error)))
		{
			result->outcome = DELIVERED;
			result->delivered = batch->n;
			return;
		}
	}
	result->outcome = FAILED;
	result->failed_at = lo;
	result->delivered = lo;
}
