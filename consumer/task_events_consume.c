/*
 * task_events_consume.c
 *		The loop of task_events_consume: read a batch of the subscription,
 *		deliver it (stdout, a command, a webhook), settle it (ack_batch or
 *		nack_batch), and when nothing is ready wait for a wake-up on
 *		task_events_subscriptions, or one second (the fallback poll).
 *
 * Guarantees (README, "task_events_consume"): at least once; a batch is
 * acknowledged only when all of it was delivered, or nacked at the event that
 * failed (the events before it acknowledged), or left unacknowledged for its
 * lease to expire.  SIGTERM and SIGINT stop the loop after the batch in
 * hand.  A settlement the connection lost on the way is sent again after
 * reconnecting: a 55000 then only means it had arrived, or the lease had
 * expired and the lane was read again.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "consume.h"

#define TE_POLL_INTERVAL 1.0	/* the fallback poll: at most once a second */
#define TE_MAX_BACKOFF 30.0

/* How a batch is settled. */
typedef enum SettleKind
{
	SETTLE_ACK,					/* ack_batch */
	SETTLE_NACK,				/* nack_batch, at failed_event_id or whole */
	SETTLE_DEAD_LETTER			/* dead_letter_event at failed_event_id */
} SettleKind;

static const char *const te_settled_as[] = {"acknowledged", "nacked", "dead-lettered"};

/* A settlement not yet known to have reached the server. */
typedef struct PendingSettle
{
	bool		active;
	bool		resent;			/* sent again after a lost connection */
	SettleKind	kind;
	int64_t		batch_id;
	bool		has_event;
	char		failed_event_id[64];
	char		message[512];
} PendingSettle;

static ConsumeOptions te_opts;
static PendingSettle te_pending;
static bool te_any_failed = false;	/* for --once's exit status */
static bool te_lane_checked = false;	/* --lane checked against the lanes */

double
te_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

/*
 * Send the pending settlement.  Returns false when the connection was lost
 * (it stays pending, for after the reconnection); exits on an unknown
 * subscription (2) or a fatal error (1).
 */
static bool
te_send_pending(PGconn **conn)
{
	char		error[512];
	long		acked = 0;
	ApiResult	r;

	if (te_pending.kind == SETTLE_ACK)
		r = te_ack_batch(*conn, te_opts.subscription, te_pending.batch_id,
						 &acked, error, sizeof(error));
	else if (te_pending.kind == SETTLE_DEAD_LETTER)
		r = te_dead_letter_event(*conn, te_opts.subscription, te_pending.batch_id,
								 te_pending.failed_event_id, te_pending.message,
								 error, sizeof(error));
	else
		r = te_nack_batch(*conn, te_opts.subscription, te_pending.batch_id,
						  te_pending.has_event ? te_pending.failed_event_id : NULL,
						  te_pending.message, error, sizeof(error));
	switch (r)
	{
		case API_OK:
		case API_EMPTY:
			break;
		case API_LOST:
			te_connection_lost(conn, error);
			te_pending.resent = true;
			return false;
		case API_NOT_LEASED:
			if (te_pending.resent)
				te_log("batch %lld: no longer leased when sent again after reconnecting"
					   " (settled before the connection was lost, or its lease expired:"
					   " then it is delivered again)", (long long) te_pending.batch_id);
			else
				te_log("batch %lld was not %s: %s", (long long) te_pending.batch_id,
					   te_settled_as[te_pending.kind], error);
			break;
		case API_UNKNOWN_SUBSCRIPTION:
			te_log("%s", error);
			exit(TE_EXIT_USAGE);
		case API_FATAL:
			te_log("%s", error);
			exit(TE_EXIT_FAILURE);
		case API_ERROR:
			/* Left to its lease: the events are offered again when it ends. */
			te_log("batch %lld could not be %s, its lease will expire: %s",
				   (long long) te_pending.batch_id,
				   te_settled_as[te_pending.kind], error);
			break;
	}
	te_pending.active = false;
	return true;
}

/* Queue the settlement of a batch and send it. */
static void
te_settle(PGconn **conn, const ConsumeBatch *batch, SettleKind kind, int failed_at,
		  const char *message)
{
	memset(&te_pending, 0, sizeof(te_pending));
	te_pending.active = true;
	te_pending.kind = kind;
	te_pending.batch_id = batch->batch_id;
	if (failed_at >= 0)
	{
		te_pending.has_event = true;
		snprintf(te_pending.failed_event_id, sizeof(te_pending.failed_event_id),
				 "%s", batch->events[failed_at].event_id);
	}
	snprintf(te_pending.message, sizeof(te_pending.message), "%s", message);
	(void) te_send_pending(conn);
}

/*
 * Whether a batch that failed as a whole is at its last attempt (the lane's
 * attempts + 1 = max_attempts, when nack_batch would dead-letter every
 * event of it).  When the attempts cannot be read (subscription_status
 * refused, as it is to task_events_consumer: README), every failed batch
 * counts as at its last attempt: splitting it at once costs command runs,
 * never a dead letter too many.  *lost: the connection went.
 */
static bool
te_last_attempt(PGconn **conn, const ConsumeBatch *batch, int max_attempts,
				bool *lost)
{
	static bool te_attempts_unreadable_logged = false;
	int			attempts = 0;
	char		error[512];
	ApiResult	r;

	*lost = false;
	r = te_lane_attempts(*conn, te_opts.subscription, batch->lane, &attempts,
						 error, sizeof(error));
	if (r == API_OK)
		return attempts + 1 >= max_attempts;
	if (r == API_LOST)
	{
		te_connection_lost(conn, error);
		*lost = true;
		return false;
	}
	if (!te_attempts_unreadable_logged)
		te_log("cannot read the lane's failed attempts (%s): every batch that fails is split at once",
			   error);
	te_attempts_unreadable_logged = true;
	return true;
}

/*
 * A failed attempt of a batch: decide how to settle it.
 * - --exec, the whole batch failed: at its last attempt the batch is
 *   bisected to find the event that fails, which is nacked alone;
 * - a transient failure (--post, the lease running out): the events
 *   delivered are acknowledged by a nack at the first one not delivered,
 *   which counts no attempt against it (nack_batch counts attempt 1 of a new
 *   batch starting there; unless max_attempts is 1); when none was
 *   delivered, the batch is left to its lease, so that an unreachable
 *   webhook never dead-letters events;
 * - a permanent failure (--post, a 4xx answer): the events before it are
 *   acknowledged and the event is dead-lettered at once (dead_letter_event);
 * - otherwise: nack at the failed event (or the whole batch).
 */
static void
te_settle_failure(PGconn **conn, const ConsumeBatch *batch, DeliveryResult *result)
{
	int			max_attempts = 0;
	char		error[512];
	bool		whole_exec = te_opts.mode == MODE_EXEC && result->failed_at < 0 && batch->n > 1;
	bool		lost = false;
	ApiResult	r = API_OK;

	if (whole_exec || (result->transient && result->failed_at > 0))
	{
		r = te_max_attempts(*conn, &max_attempts, error, sizeof(error));
		if (r == API_LOST)
			te_connection_lost(conn, error);
		else if (r != API_OK)
			te_log("could not read task_events.max_attempts: %s", error);
	}
	if (r == API_OK && whole_exec && te_last_attempt(conn, batch, max_attempts, &lost))
	{
		te_log("batch %lld (lane %d, %d events) failed (%s): splitting it to find the event that fails",
			   (long long) batch->batch_id, batch->lane, batch->n, result->error);
		te_find_failing_event(&te_opts, batch, result);
		if (result->outcome == DELIVERED)
		{
			te_settle(conn, batch, SETTLE_ACK, -1, "");
			te_progress_batch(batch, batch->n, false);
			return;
		}
		if (result->outcome == LEFT)
		{
			te_log("batch %lld left unacknowledged: %s", (long long) batch->batch_id, result->error);
			return;
		}
	}
	if (r == API_LOST || lost)
	{
		te_log("batch %lld left unacknowledged, to its lease", (long long) batch->batch_id);
		return;
	}

	te_any_failed = true;
	te_progress_batch(batch, result->delivered, true);
	if (result->transient)
	{
		if (result->failed_at > 0 && r == API_OK && max_attempts > 1)
		{
			char		message[600];

			snprintf(message, sizeof(message),
					 "delivered %d of %d events before the lease ran out: %s",
					 result->failed_at, batch->n, result->error);
			te_log("batch %lld: %s", (long long) batch->batch_id, message);
			te_settle(conn, batch, SETTLE_NACK, result->failed_at, message);
		}
		else
			te_log("batch %lld left unacknowledged, to its lease: %s",
				   (long long) batch->batch_id, result->error);
		return;
	}
	if (result->failed_at >= 0)
		te_log("batch %lld: event %s (seq %lld) failed: %s", (long long) batch->batch_id,
			   batch->events[result->failed_at].event_id,
			   (long long) batch->events[result->failed_at].seq, result->error);
	else
		te_log("batch %lld (lane %d, %d events) failed: %s", (long long) batch->batch_id,
			   batch->lane, batch->n, result->error);
	te_settle(conn, batch, result->permanent ? SETTLE_DEAD_LETTER : SETTLE_NACK,
			  result->failed_at, result->error);
}

/* Deliver a batch in the chosen mode, then settle it. */
static void
te_deliver(PGconn **conn, const ConsumeBatch *batch)
{
	DeliveryResult result;

	switch (te_opts.mode)
	{
		case MODE_JSONL:
			te_deliver_jsonl(&te_opts, batch, &result);
			break;
		case MODE_EXEC:
			te_deliver_exec(&te_opts, batch, &result);
			break;
		case MODE_POST:
			te_deliver_post(&te_opts, batch, &result);
			break;
	}
	switch (result.outcome)
	{
		case DELIVERED:
			te_settle(conn, batch, SETTLE_ACK, -1, "");
			te_progress_batch(batch, batch->n, false);
			break;
		case FAILED:
			te_settle_failure(conn, batch, &result);
			break;
		case LEFT:
			te_any_failed = true;
			te_log("batch %lld left unacknowledged, to its lease: %s",
				   (long long) batch->batch_id, result.error);
			break;
		case FATAL:
			te_log("%s; batch %lld left unacknowledged, to its lease",
				   result.error, (long long) batch->batch_id);
			exit(TE_EXIT_FAILURE);
	}
}

/*
 * With --lane: the lane must exist (exit 2 otherwise).  Sets te_lane_checked
 * once that is known, or cannot be.
 */
static void
te_check_lane(PGconn *conn)
{
	int			lanes = 0;
	char		error[512];
	ApiResult	r = te_subscription_lanes(conn, te_opts.subscription, &lanes,
										  error, sizeof(error));

	if (r == API_UNKNOWN_SUBSCRIPTION)
	{
		te_log("%s", error);
		exit(TE_EXIT_USAGE);
	}
	if (r == API_LOST)
		return;					/* checked after reconnecting */
	if (r != API_OK)
	{
		/* subscription_status refused (README): read_batch checks the rest. */
		te_log("cannot check --lane %d against the subscription's lanes: %s",
			   te_opts.lane, error);
		te_lane_checked = true;
		return;
	}
	if (te_opts.lane >= lanes)
	{
		te_log("--lane %d does not exist: subscription \"%s\" has lanes 0 to %d",
			   te_opts.lane, te_opts.subscription, lanes - 1);
		exit(TE_EXIT_USAGE);
	}
	te_lane_checked = true;
}

int
main(int argc, char **argv)
{
	PGconn	   *conn;
	double		backoff = 1.0;
	bool		error_logged = false;

	te_parse_options(argc, argv, &te_opts);
	if (te_opts.mode == MODE_POST)
	{
		char		error[512];

		if (!te_post_init(&te_opts, error, sizeof(error)))
		{
			te_log("%s", error);
			return TE_EXIT_USAGE;
		}
	}
	te_install_signal_handlers();

	conn = te_connect(&te_opts, te_opts.once);
	while (!te_stop_requested)
	{
		ConsumeBatch batch;
		char		error[512];
		ApiResult	r;

		if (conn == NULL && (conn = te_connect(&te_opts, false)) == NULL)
			break;
		if (te_pending.active && !te_send_pending(&conn))
			continue;
		if (te_opts.lane >= 0 && !te_lane_checked)
		{
			te_check_lane(conn);
			if (!te_lane_checked)
			{
				te_connection_lost(&conn, NULL);
				continue;
			}
		}
		te_progress_report(conn, &te_opts);

		r = te_read_batch(conn, &te_opts, &batch, error, sizeof(error));
		if (r == API_OK)
		{
			error_logged = false;
			backoff = 1.0;
			te_deliver(&conn, &batch);
			te_free_batch(&batch);
			continue;
		}
		switch (r)
		{
			case API_EMPTY:
				error_logged = false;
				backoff = 1.0;
				if (te_opts.once)
					goto done;
				if (te_wait(conn, te_opts.subscription, TE_POLL_INTERVAL) == WAIT_LOST)
					te_connection_lost(&conn, NULL);
				break;
			case API_LOST:
				te_connection_lost(&conn, error);
				break;
			case API_UNKNOWN_SUBSCRIPTION:
				te_log("%s", error);
				return TE_EXIT_USAGE;
			case API_FATAL:
				te_log("%s", error);
				return TE_EXIT_FAILURE;
			default:
				if (!error_logged)
					te_log("read_batch failed: %s; retrying, every %.0f s at most",
						   error, TE_MAX_BACKOFF);
				error_logged = true;
				te_sleep(backoff);
				backoff = backoff * 2 > TE_MAX_BACKOFF ? TE_MAX_BACKOFF : backoff * 2;
				break;
		}
	}
	if (te_stop_requested)
		te_log("stopped by a signal");
done:
	if (conn != NULL)
		PQfinish(conn);
	if (te_opts.mode == MODE_POST)
		te_post_cleanup();
	if (te_opts.once && te_any_failed && !te_stop_requested)
		return TE_EXIT_FAILURE;
	return TE_EXIT_OK;
}
