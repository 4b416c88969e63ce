/*
 * consume.h
 *		Shared types of task_events_consume, the program that delivers a
 *		subscription (README, "Subscriptions") to stdout, a command or a
 *		webhook.
 *
 * The files, one responsibility each:
 *	task_events_consume.c	the loop: read a batch, deliver it, settle it
 *							(ack or nack), wait; stopping; exit statuses
 *	options.c				command line, --help
 *	connection.c			connecting, reconnecting with backoff, waiting for
 *							a wake-up (LISTEN) or the fallback poll; the log
 *	subscription_api.c		the SQL API calls: read_batch (with each event's
 *							envelope), ack_batch, nack_batch,
 *							dead_letter_event, the lane's
 *							attempts, the lag
 *	deliver_jsonl.c, deliver_exec.c, deliver_post.c	the three modes
 *	progress.c				the --progress status line
 *
 * Plain C and libpq (no PostgreSQL frontend library): nothing else is
 * needed by a program this small.
 */
#ifndef TE_CONSUME_H
#define TE_CONSUME_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

#include <libpq-fe.h>

#define TE_PROGNAME "task_events_consume"

/* Exit statuses (documented in --help and the README). */
#define TE_EXIT_OK 0			/* done (--once), or stopped by SIGTERM/SIGINT */
#define TE_EXIT_FAILURE 1		/* a fatal error; with --once, a batch failed */
#define TE_EXIT_USAGE 2			/* bad options, unknown subscription */

/* The channel the wake-up handler notifies, payload = subscription name. */
#define TE_WAKEUP_CHANNEL "task_events_subscriptions"

typedef enum ConsumeMode
{
	MODE_JSONL,
	MODE_EXEC,
	MODE_POST
} ConsumeMode;

typedef struct ConsumeOptions
{
	const char *conninfo;		/* -d; NULL: libpq's defaults (PG* variables) */
	const char *subscription;	/* -s */
	int			lane;			/* --lane; -1: any free lane */
	int			batch;			/* --batch: max_events of read_batch */
	double		lease;			/* --lease, in seconds */
	double		timeout;		/* --timeout: one HTTP request, in seconds */
	ConsumeMode mode;
	const char *command;		/* --exec */
	const char *url;			/* --post */
	bool		progress;		/* --progress, or stderr is a terminal */
	bool		once;			/* --once */
} ConsumeOptions;

/* One event of a batch: its envelope (the NOTIFY payload) and its identity. */
typedef struct ConsumeEvent
{
	int64_t		seq;
	const char *event_id;		/* uuid, text */
	const char *envelope;		/* JSON, one line */
	const char *aggregate_id;	/* the task */
} ConsumeEvent;

/* A batch leased by read_batch; its strings point into res. */
typedef struct ConsumeBatch
{
	int64_t		batch_id;
	int			lane;
	int			n;
	ConsumeEvent *events;
	double		deadline;		/* monotonic time by which it must be settled */
	PGresult   *res;
} ConsumeBatch;

/* What delivering a batch came to. */
typedef enum DeliveryOutcome
{
	DELIVERED,					/* every event delivered: acknowledge */
	FAILED,						/* an attempt failed: nack (failed_at) */
	LEFT,						/* leave it unacknowledged, to its lease */
	FATAL						/* cannot go on (stdout closed): exit 1 */
} DeliveryOutcome;

typedef struct DeliveryResult
{
	DeliveryOutcome outcome;
	int			failed_at;		/* FAILED: index of the failed event, -1: all */
	bool		transient;		/* FAILED: worth retrying as is (--post) */
	bool		permanent;		/* FAILED: retrying cannot mend it (--post,
								 * a 4xx answer): dead-letter it at once */
	int			delivered;		/* events delivered (before failed_at) */
	char		error[512];		/* FAILED, LEFT, FATAL: why, one line */
} DeliveryResult;

/* Set by SIGTERM and SIGINT: stop after the batch in hand. */
extern volatile sig_atomic_t te_stop_requested;

/* task_events_consume.c */
extern double te_now(void);

/* options.c */
extern void te_parse_options(int argc, char **argv, ConsumeOptions *opts);

/* connection.c */
typedef enum WaitResult
{
	WAIT_WOKEN,					/* a notification for our subscription */
	WAIT_TIMEOUT,				/* the fallback poll is due */
	WAIT_STOP,					/* SIGTERM or SIGINT */
	WAIT_LOST					/* the connection is gone */
} WaitResult;

extern void te_log(const char *fmt,...) __attribute__((format(printf, 1, 2)));
extern void te_install_signal_handlers(void);
extern void te_sleep(double seconds);
extern PGconn *te_connect(const ConsumeOptions *opts, bool once);
extern void te_connection_lost(PGconn **conn, const char *error);
extern WaitResult te_wait(PGconn *conn, const char *subscription, double seconds);

/* subscription_api.c */
typedef enum ApiResult
{
	API_OK,
	API_EMPTY,					/* read_batch: nothing ready */
	API_NOT_LEASED,				/* ack/nack: 55000, the batch is not leased */
	API_UNKNOWN_SUBSCRIPTION,	/* 42704, or an invalid name (22023, 22004) */
	API_FATAL,					/* an error that retrying will not mend */
	API_ERROR,					/* another error: retry later */
	API_LOST					/* the connection is gone */
} ApiResult;

extern ApiResult te_read_batch(PGconn *conn, const ConsumeOptions *opts,
							   ConsumeBatch *batch, char *error, int errlen);
extern void te_free_batch(ConsumeBatch *batch);
extern ApiResult te_ack_batch(PGconn *conn, const char *subscription,
							  int64_t batch_id, long *acked,
							  char *error, int errlen);
extern ApiResult te_nack_batch(PGconn *conn, const char *subscription,
							   int64_t batch_id, const char *failed_event_id,
							   const char *message, char *error, int errlen);
extern ApiResult te_dead_letter_event(PGconn *conn, const char *subscription,
									  int64_t batch_id, const char *event_id,
									  const char *message, char *error, int errlen);
extern ApiResult te_max_attempts(PGconn *conn, int *max_attempts,
								 char *error, int errlen);
extern ApiResult te_lane_attempts(PGconn *conn, const char *subscription,
								  int lane, int *attempts,
								  char *error, int errlen);
extern ApiResult te_subscription_lanes(PGconn *conn, const char *subscription,
									   int *lanes, char *error, int errlen);
extern ApiResult te_events_behind(PGconn *conn, const char *subscription,
								  long *behind);

/* deliver_jsonl.c, deliver_exec.c, deliver_post.c */
extern void te_deliver_jsonl(const ConsumeOptions *opts, const ConsumeBatch *batch,
							 DeliveryResult *result);
extern void te_deliver_exec(const ConsumeOptions *opts, const ConsumeBatch *batch,
							DeliveryResult *result);
extern void te_find_failing_event(const ConsumeOptions *opts,
								  const ConsumeBatch *batch,
								  DeliveryResult *result);
extern bool te_post_init(const ConsumeOptions *opts, char *error, int errlen);
extern void te_deliver_post(const ConsumeOptions *opts, const ConsumeBatch *batch,
							DeliveryResult *result);
extern void te_post_cleanup(void);

/* progress.c */
extern void te_progress_batch(const ConsumeBatch *batch, long delivered,
							  bool failed);
extern void te_progress_report(PGconn *conn, const ConsumeOptions *opts);

#endif							/* TE_CONSUME_H */
