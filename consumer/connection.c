/*
 * connection.c
 *		The connection of task_events_consume: connecting, reconnecting with
 *		backoff, waiting for a wake-up, and the program's log.
 *
 * The log is one line per change of state, never one per retry: "connected",
 * "connection lost", "could not connect" are each said once per outage, and
 * the backoff between attempts (1 s doubling, at most 30 s) is silent.
 * Nothing secret is logged: the connection string may hold a password, so
 * only the database, host and port libpq reports are.
 *
 * Waiting: the connection LISTENs on task_events_subscriptions; te_wait
 * sleeps on its socket and on a self-pipe that the SIGTERM/SIGINT handler
 * writes to, so a stop request, a notification for our subscription and the
 * fallback poll all end the wait at once.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "consume.h"

#define TE_MAX_BACKOFF 30.0

volatile sig_atomic_t te_stop_requested = 0;

static int	te_self_pipe[2] = {-1, -1};

/* Whether the last thing logged about the connection was that it is down. */
static bool te_down_logged = false;
static bool te_ever_connected = false;

void
te_log(const char *fmt,...)
{
	va_list		ap;

	fprintf(stderr, "%s: ", TE_PROGNAME);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	fflush(stderr);
}

/* libpq's error message on one line (its messages may hold newlines). */
static void
te_one_line(char *dst, size_t len, const char *msg)
{
	size_t		j = 0;

	for (size_t i = 0; msg[i] != '\0' && j + 1 < len; i++)
	{
		char		c = msg[i];

		if (c == '\n' || c == '\r' || c == '\t')
			c = ' ';

		if (c != ' ' || (j > 0 && dst[j - 1] != ' '))
			dst[j++] = c;
	}
	while (j > 0 && dst[j - 1] == ' ')
		j--;
	dst[j] = '\0';
}

/*
 * The server's notices, on one line each.  A FATAL one (the server ending
 * the connection) is said by "connection lost" instead.
 */
static void
te_notice(void *arg, const PGresult *res)
{
	const char *severity = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
	char		line[512];

	(void) arg;
	if (severity != NULL && (strcmp(severity, "FATAL") == 0 || strcmp(severity, "PANIC") == 0))
		return;
	te_one_line(line, sizeof(line), PQresultErrorMessage(res));
	te_log("server: %s", line);
}

static void
te_stop_handler(int signo)
{
	int			save_errno = errno;
	char		c = 's';

	(void) signo;
	te_stop_requested = 1;
	if (te_self_pipe[1] >= 0)
		(void) !write(te_self_pipe[1], &c, 1);
	errno = save_errno;
}

/*
 * SIGTERM and SIGINT request a stop (SA_RESTART: a write or waitpid in
 * progress carries on); SIGPIPE is ignored, so that a reader or a command
 * that goes away is an error to handle, not the end of the program.
 */
void
te_install_signal_handlers(void)
{
	struct sigaction sa;

	if (pipe2(te_self_pipe, O_CLOEXEC | O_NONBLOCK) != 0)
	{
		te_log("could not create a pipe: %s", strerror(errno));
		exit(TE_EXIT_FAILURE);
	}
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = te_stop_handler;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = SA_RESTART;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
}

/* Wait for the self-pipe and, if fd >= 0, for fd to be readable. */
static int
te_poll(int fd, double seconds)
{
	struct pollfd pfd[2];
	int			n = 0;
	int			rc;

	pfd[n].fd = te_self_pipe[0];
	pfd[n].events = POLLIN;
	n++;
	if (fd >= 0)
	{
		pfd[n].fd = fd;
		pfd[n].events = POLLIN;
		n++;
	}
	rc = poll(pfd, n, seconds <= 0 ? 0 : (int) (seconds * 1000.0 + 0.5));
	if (rc < 0 && errno != EINTR)
	{
		te_log("poll failed: %s", strerror(errno));
		exit(TE_EXIT_FAILURE);
	}
	return rc > 0 && n == 2 && (pfd[1].revents & (POLLIN | POLLERR | POLLHUP)) != 0;
}

/* Sleep for seconds, or until a stop is requested. */
void
te_sleep(double seconds)
{
	double		until = te_now() + seconds;

	while (!te_stop_requested && te_now() < until)
		(void) te_poll(-1, until - te_now());
}

/*
 * Connect and LISTEN, retrying with backoff (1 s doubling to 30 s) until it
 * works; returns NULL only when a stop was requested meanwhile.  With once,
 * a first connection that fails ends the program (exit 1): a one-shot run
 * does not wait for a server.
 */
PGconn *
te_connect(const ConsumeOptions *opts, bool once)
{
	const char *keys[] = {"dbname", "fallback_application_name", NULL};
	const char *values[] = {opts->conninfo, TE_PROGNAME, NULL};
	double		backoff = 1.0;

	while (!te_stop_requested)
	{
		PGconn	   *conn = PQconnectdbParams(keys, values, 1);
		char		error[512];

		if (PQstatus(conn) == CONNECTION_OK)
		{
			PGresult   *res;

			PQsetNoticeReceiver(conn, te_notice, NULL);

			/*
			 * Delivery is at least once whatever the commits do: a lease or
			 * an acknowledgement lost in a server crash only means the batch
			 * is read and delivered again.  So they need not wait for the
			 * WAL flush (two per batch otherwise).
			 */
			res = PQexec(conn, "LISTEN " TE_WAKEUP_CHANNEL "; SET synchronous_commit = off");

			if (PQresultStatus(res) == PGRES_COMMAND_OK)
			{
				PQclear(res);
				/* The first connection goes without saying. */
				if (te_ever_connected)
					te_log("connected to database \"%s\" on %s:%s",
						   PQdb(conn), PQhost(conn), PQport(conn));
				te_ever_connected = true;
				te_down_logged = false;
				return conn;
			}
			PQclear(res);
		}
		te_one_line(error, sizeof(error), PQerrorMessage(conn));
		PQfinish(conn);
		if (once)
		{
			te_log("could not connect: %s", error);
			exit(TE_EXIT_FAILURE);
		}
		if (!te_down_logged)
		{
			te_log("could not connect: %s; retrying, every %.0f s at most",
				   error, TE_MAX_BACKOFF);
			te_down_logged = true;
		}
		te_sleep(backoff);
		backoff = backoff * 2 > TE_MAX_BACKOFF ? TE_MAX_BACKOFF : backoff * 2;
	}
	return NULL;
}

/* The connection is gone: log it (once per outage) and close it. */
void
te_connection_lost(PGconn **conn, const char *error)
{
	char		line[512];

	if (!te_down_logged)
	{
		const char *msg = error != NULL ? error : PQerrorMessage(*conn);
		size_t		first = strcspn(msg, "\n");

		/* The first line: libpq adds its own account of a closed socket. */
		te_one_line(line, first + 1 < sizeof(line) ? first + 1 : sizeof(line), msg);
		te_log("connection lost: %s; reconnecting", line);
		te_down_logged = true;
	}
	PQfinish(*conn);
	*conn = NULL;
}

/*
 * Wait up to seconds for a notification on the wake-up channel whose
 * payload is our subscription, a stop request, or a lost connection.
 */
WaitResult
te_wait(PGconn *conn, const char *subscription, double seconds)
{
	double		until = te_now() + seconds;

	for (;;)
	{
		PGnotify   *n;
		bool		woken = false;

		if (te_stop_requested)
			return WAIT_STOP;
		while ((n = PQnotifies(conn)) != NULL)
		{
			if (strcmp(n->relname, TE_WAKEUP_CHANNEL) == 0 &&
				strcmp(n->extra, subscription) == 0)
				woken = true;
			PQfreemem(n);
		}
		if (woken)
			return WAIT_WOKEN;
		if (te_now() >= until)
			return WAIT_TIMEOUT;
		if (te_poll(PQsocket(conn), until - te_now()) &&
			PQconsumeInput(conn) == 0)
			return WAIT_LOST;
	}
}
