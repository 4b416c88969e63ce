/*
 * options.c
 *		The command line of task_events_consume, and its --help.
 *
 * A bad option ends the program with one line on stderr and exit status 2,
 * before anything connects.
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "consume.h"

static const char te_help[] =
"task_events_consume delivers a task_events subscription to stdout, a command\n"
"or a webhook: it reads batches (task_events.read_batch), delivers them and\n"
"acknowledges them, waiting on the channel " TE_WAKEUP_CHANNEL " in between.\n"
"\n"
"Usage:\n"
"  task_events_consume [-d CONNINFO] -s SUBSCRIPTION [--lane N] [--batch N]\n"
"                      [--lease SECONDS] [--jsonl | --exec COMMAND | --post URL]\n"
"                      [--timeout SECONDS] [--progress] [--once]\n"
"\n"
"Options:\n"
"  -d, --dbname=CONNINFO     database to connect to (a name or a libpq connection\n"
"                            string; PG* variables, service file and .pgpass apply)\n"
"  -s, --subscription=NAME   the subscription (task_events.create_subscription)\n"
"      --lane=N              read lane N only (default: whichever lane is free)\n"
"      --batch=N             events per batch, 1 to 100000 (default 100)\n"
"      --lease=SECONDS       how long a batch stays leased (default 30)\n"
"      --jsonl               write each event as a JSON line on stdout (default)\n"
"      --exec=COMMAND        run COMMAND (/bin/sh -c) once per batch, the events as\n"
"                            JSON lines on its stdin; exit status 0 acknowledges\n"
"      --post=URL            POST each event to URL (http or https)\n"
"      --timeout=SECONDS     time limit of one HTTP request (default 10)\n"
"      --progress            a status line on stderr every 5 seconds (the default\n"
"                            when stderr is a terminal)\n"
"      --once                deliver what is ready, then exit\n"
"  -?, --help                show this help, then exit\n"
"\n"
"Each event is the envelope of the NOTIFY payload, one line:\n"
"  {\"event_type\": ..., \"event_data\": {...}, \"timestamp\": ..., \"seq\": ...}\n"
"event_data.event_id identifies an event: delivery is at least once.\n"
"\n"
"--exec: the command's environment has TASK_EVENTS_SUBSCRIPTION,\n"
"TASK_EVENTS_BATCH_ID and TASK_EVENTS_LANE. Another exit status is a failed\n"
"attempt of the batch; at the last attempt (task_events.max_attempts) the batch\n"
"is split to find the failing event, which alone goes to the dead letters.\n"
"\n"
"--post: Content-Type: application/json, Idempotency-Key: <event_id>, and\n"
"X-Task-Events-Signature: sha256=<hex HMAC-SHA256 of the body> when the\n"
"environment variable TASK_EVENTS_WEBHOOK_SECRET is set. 2xx delivers; 408,\n"
"429 (Retry-After), 5xx, timeouts and connection errors are retried with\n"
"backoff; any other answer is a failed attempt of that event.\n"
"\n"
"SIGTERM and SIGINT stop the program after the batch in hand.\n"
"Exit status: 0 stopped or done, 1 error (with --once: a batch failed),\n"
"2 bad options or unknown subscription.\n";

/* One line on stderr, exit status 2. */
static void
te_usage_error(const char *fmt, const char *arg)
{
	fprintf(stderr, "%s: ", TE_PROGNAME);
	fprintf(stderr, fmt, arg);
	fprintf(stderr, " (see %s --help)\n", TE_PROGNAME);
	exit(TE_EXIT_USAGE);
}

/* A whole decimal integer in [min, max], or a usage error naming the option. */
static int
te_int_option(const char *name, const char *arg, int min, int max)
{
	char	   *end;
	long		v;

	errno = 0;
	v = strtol(arg, &end, 10);
	if (errno != 0 || end == arg || *end != '\0' || v < min || v > max)
	{
		char		fmt[128];

		snprintf(fmt, sizeof(fmt), "%s must be an integer from %d to %d, not \"%%s\"",
				 name, min, max);
		te_usage_error(fmt, arg);
	}
	return (int) v;
}

/* A number of seconds in (0, max], or a usage error naming the option. */
static double
te_seconds_option(const char *name, const char *arg, double max)
{
	char	   *end;
	double		v;

	errno = 0;
	v = strtod(arg, &end);
	if (errno != 0 || end == arg || *end != '\0' || !isfinite(v) ||
		v < 0.001 || v > max)
	{
		char		fmt[128];

		snprintf(fmt, sizeof(fmt), "%s must be a number of seconds from 0.001 to %g, not \"%%s\"",
				 name, max);
		te_usage_error(fmt, arg);
	}
	return v;
}

static void
te_set_mode(ConsumeOptions *opts, ConsumeMode mode, bool *mode_set)
{
	if (*mode_set && opts->mode != mode)
		te_usage_error("%s", "--jsonl, --exec and --post exclude each other");
	opts->mode = mode;
	*mode_set = true;
}

/*
 * Parse argv into opts (defaults first); exits 0 after --help, 2 on any
 * error.  Checks the connection string's syntax too.
 */
void
te_parse_options(int argc, char **argv, ConsumeOptions *opts)
{
	enum
	{
		OPT_LANE = 256, OPT_BATCH, OPT_LEASE, OPT_JSONL, OPT_EXEC, OPT_POST,
		OPT_TIMEOUT, OPT_PROGRESS, OPT_ONCE
	};
	static const struct option longopts[] = {
		{"dbname", required_argument, NULL, 'd'},
		{"subscription", required_argument, NULL, 's'},
		{"lane", required_argument, NULL, OPT_LANE},
		{"batch", required_argument, NULL, OPT_BATCH},
		{"lease", required_argument, NULL, OPT_LEASE},
		{"jsonl", no_argument, NULL, OPT_JSONL},
		{"exec", required_argument, NULL, OPT_EXEC},
		{"post", required_argument, NULL, OPT_POST},
		{"timeout", required_argument, NULL, OPT_TIMEOUT},
		{"progress", no_argument, NULL, OPT_PROGRESS},
		{"once", no_argument, NULL, OPT_ONCE},
		{"help", no_argument, NULL, '?'},
		{NULL, 0, NULL, 0}
	};
	bool		mode_set = false;
	bool		progress_set = false;
	int			c;

	memset(opts, 0, sizeof(*opts));
	opts->lane = -1;
	opts->batch = 100;
	opts->lease = 30;
	opts->timeout = 10;
	opts->mode = MODE_JSONL;

	/* --help anywhere wins, as in PostgreSQL's programs. */
	for (int i = 1; i < argc; i++)
	{
		if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-?") == 0)
		{
			fputs(te_help, stdout);
			exit(TE_EXIT_OK);
		}
	}

	opterr = 0;
	while ((c = getopt_long(argc, argv, ":d:s:", longopts, NULL)) != -1)
	{
		switch (c)
		{
			case 'd':
				opts->conninfo = optarg;
				break;
			case 's':
				opts->subscription = optarg;
				break;
			case OPT_LANE:
				opts->lane = te_int_option("--lane", optarg, 0, 63);
				break;
			case OPT_BATCH:
				opts->batch = te_int_option("--batch", optarg, 1, 100000);
				break;
			case OPT_LEASE:
				opts->lease = te_seconds_option("--lease", optarg, 86400);
				break;
			case OPT_TIMEOUT:
				opts->timeout = te_seconds_option("--timeout", optarg, 3600);
				break;
			case OPT_JSONL:
				te_set_mode(opts, MODE_JSONL, &mode_set);
				break;
			case OPT_EXEC:
				te_set_mode(opts, MODE_EXEC, &mode_set);
				opts->command = optarg;
				break;
			case OPT_POST:
				te_set_mode(opts, MODE_POST, &mode_set);
				opts->url = optarg;
				break;
			case OPT_PROGRESS:
				opts->progress = true;
				progress_set = true;
				break;
			case OPT_ONCE:
				opts->once = true;
				break;
			case ':':
				te_usage_error("option %s needs a value", argv[optind - 1]);
				break;
			default:
				te_usage_error("unknown option \"%s\"", argv[optind - 1]);
				break;
		}
	}
	if (optind < argc)
		te_usage_error("unexpected argument \"%s\"", argv[optind]);
	if (opts->subscription == NULL || opts->subscription[0] == '\0')
		te_usage_error("%s", "-s SUBSCRIPTION is required");
	if (opts->mode == MODE_EXEC && opts->command[0] == '\0')
		te_usage_error("%s", "--exec needs a command");
	if (opts->mode == MODE_POST && opts->url[0] == '\0')
		te_usage_error("%s", "--post needs a URL");
	if (opts->conninfo != NULL)
	{
		char	   *err = NULL;
		PQconninfoOption *parsed = PQconninfoParse(opts->conninfo, &err);

		/* A plain database name is not a connection string: fine. */
		if (parsed == NULL && strchr(opts->conninfo, '=') != NULL)
		{
			char	   *nl;

			if (err != NULL && (nl = strchr(err, '\n')) != NULL)
				*nl = '\0';
			te_usage_error("invalid connection string: %s",
						   err != NULL ? err : "out of memory");
		}
		PQfreemem(err);
		PQconninfoFree(parsed);
	}
	if (!progress_set)
		opts->progress = isatty(STDERR_FILENO);
}
