/*
 * progress.c
 *		The --progress status line: every 5 seconds on stderr, the events
 *		delivered per second since the last line, the lane and batch last
 *		served, how many events of the subscription are not yet acknowledged
 *		(subscription_status), and the failed attempts so far.
 */
#include <stdio.h>

#include "consume.h"

#define TE_PROGRESS_EVERY 5.0

static long te_delivered = 0;
static long te_delivered_reported = 0;
static long te_failures = 0;
static int	te_last_lane = -1;
static long long te_last_batch = 0;
static double te_last_report = 0;
static bool te_lag_readable = true;

/* Count a settled batch: delivered events, and whether an attempt failed. */
void
te_progress_batch(const ConsumeBatch *batch, long delivered, bool failed)
{
	te_delivered += delivered;
	if (failed)
		te_failures++;
	te_last_lane = batch->lane;
	te_last_batch = (long long) batch->batch_id;
}

/* Print the status line if it is due; conn may be NULL (disconnected). */
void
te_progress_report(PGconn *conn, const ConsumeOptions *opts)
{
	double		now = te_now();
	long		behind = -1;
	char		lag[48] = "lag unknown";
	char		where[64] = "no batch yet";

	if (!opts->progress)
		return;
	if (te_last_report == 0)
	{
		te_last_report = now;
		return;
	}
	if (now - te_last_report < TE_PROGRESS_EVERY)
		return;
	if (conn != NULL && te_lag_readable)
	{
		ApiResult	r = te_events_behind(conn, opts->subscription, &behind);

		if (r == API_OK)
			snprintf(lag, sizeof(lag), "%ld events behind", behind);
		/* subscription_status refused (README): do not ask every time. */
		te_lag_readable = r != API_FATAL;
	}
	if (te_last_lane >= 0)
		snprintf(where, sizeof(where), "lane %d, batch %lld", te_last_lane, te_last_batch);
	te_log("%.1f events/s, %s, %s, %ld failed attempts",
		   (double) (te_delivered - te_delivered_reported) / (now - te_last_report),
		   where, lag, te_failures);
	te_delivered_reported = te_delivered;
	te_last_report = now;
}
