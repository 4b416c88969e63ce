/*
 * subscription_api.c
 *		task_events_consume's calls of the subscriptions SQL API: read_batch,
 *		ack_batch, nack_batch, and subscription_status for the lane's failed
 *		attempts and the lag.  Every value is a query parameter.
 *
 * The envelope of each event is built by the server, with the same JSON as
 * the NOTIFY payload (src/event_publish.c): event_data is the stored
 * payload's text, timestamp the payload's timestamp.
 *
 * Errors are classified for the loop: a lost connection (reconnect), an
 * unknown subscription (exit 2), a batch no longer leased (55000), errors
 * that retrying cannot mend (privileges, a missing API: exit 1), and the
 * rest (retry later).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "consume.h"

/*
 * The batch's columns, each event as its NOTIFY envelope; FROM follows.
 * read_batch returns the events in seq order (README): no ORDER BY.
 */
#define TE_READ_COLUMNS \
"SELECT r.batch_id, r.lane, r.seq, r.event_id, r.aggregate_id," \
"       pg_catalog.format('{\"event_type\": %s, \"event_data\": %s, \"timestamp\": %s, \"seq\": %s}'," \
"                         pg_catalog.to_json(r.event_type), r.payload," \
"                         pg_catalog.to_json(r.payload OPERATOR(pg_catalog.->>) 'timestamp'), r.seq)"

static const char te_read_sql[] =
TE_READ_COLUMNS
"  FROM task_events.read_batch($1, $2::pg_catalog.int4,"
"                              pg_catalog.make_interval(secs => $3::pg_catalog.float8)) r";

/* --lane: the same, from that lane only. */
static const char te_read_lane_sql[] =
TE_READ_COLUMNS
"  FROM task_events.read_lane($1, $4::pg_catalog.int4, $2::pg_catalog.int4,"
"                             pg_catalog.make_interval(secs => $3::pg_catalog.float8)) r";

/* Classify a failed result; copies its primary message into error. */
static ApiResult
te_classify(PGconn *conn, PGresult *res, char *error, int errlen)
{
	const char *state = res != NULL ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
	const char *msg = res != NULL ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;

	snprintf(error, errlen, "%s", msg != NULL ? msg : PQerrorMessage(conn));
	/* No SQLSTATE: libpq's own error, the connection is gone. */
	if (PQstatus(conn) == CONNECTION_BAD || state == NULL ||
		strncmp(state, "08", 2) == 0 || strcmp(state, "57P01") == 0 ||
		strcmp(state, "57P02") == 0 || strcmp(state, "57P03") == 0)
		return API_LOST;
	/* An unknown subscription, or a name that cannot be one. */
	if (strcmp(state, "42704") == 0 || strcmp(state, "22023") == 0 ||
		strcmp(state, "22004") == 0)
		return API_UNKNOWN_SUBSCRIPTION;
	if (strcmp(state, "55000") == 0)
		return API_NOT_LEASED;
	/* No privilege, or no such API: the extension is missing or older. */
	if (strcmp(state, "42501") == 0 || strcmp(state, "42883") == 0 ||
		strcmp(state, "3F000") == 0 || strcmp(state, "42P01") == 0)
		return API_FATAL;
	return API_ERROR;
}

/*
 * read_batch (read_lane with --lane) into batch (API_OK), or API_EMPTY when
 * nothing is ready.
 */
ApiResult
te_read_batch(PGconn *conn, const ConsumeOptions *opts, ConsumeBatch *batch,
			  char *error, int errlen)
{
	char		max_events[16];
	char		lease[32];
	char		lane[16];
	const char *params[4];
	PGresult   *res;
	ApiResult	r;
	int			n;
	double		started = te_now();

	memset(batch, 0, sizeof(*batch));
	snprintf(max_events, sizeof(max_events), "%d", opts->batch);
	snprintf(lease, sizeof(lease), "%.3f", opts->lease);
	snprintf(lane, sizeof(lane), "%d", opts->lane);
	params[0] = opts->subscription;
	params[1] = max_events;
	params[2] = lease;
	params[3] = lane;

	if (opts->lane >= 0)
		res = PQexecParams(conn, te_read_lane_sql, 4, NULL, params, NULL, NULL, 0);
	else
		res = PQexecParams(conn, te_read_sql, 3, NULL, params, NULL, NULL, 0);
	if (PQresultStatus(res) != PGRES_TUPLES_OK)
	{
		r = te_classify(conn, res, error, errlen);
		PQclear(res);
		return r;
	}
	n = PQntuples(res);
	if (n == 0)
	{
		PQclear(res);
		return API_EMPTY;
	}

	batch->res = res;
	batch->n = n;
	batch->batch_id = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
	batch->lane = atoi(PQgetvalue(res, 0, 1));
	/* Settle before the lease ends: a tenth of it, at most 2 s, is kept. */
	batch->deadline = started + opts->lease -
		(opts->lease / 10 < 2.0 ? opts->lease / 10 : 2.0);
	batch->events = calloc(n, sizeof(ConsumeEvent));
	if (batch->events == NULL)
	{
		te_log("out of memory");
		exit(TE_EXIT_FAILURE);
	}
	for (int i = 0; i < n; i++)
	{
		batch->events[i].seq = strtoll(PQgetvalue(res, i, 2), NULL, 10);
		batch->events[i].event_id = PQgetvalue(res, i, 3);
		batch->events[i].aggregate_id = PQgetvalue(res, i, 4);
		batch->events[i].envelope = PQgetvalue(res, i, 5);
	}
	return API_OK;
}

void
te_free_batch(ConsumeBatch *batch)
{
	free(batch->events);
	PQclear(batch->res);
	memset(batch, 0, sizeof(*batch));
}

/* Run a query with text parameters; on success *out is its result. */
static ApiResult
te_query(PGconn *conn, const char *sql, int nparams, const char *const *params,
		 PGresult **out, char *error, int errlen)
{
	PGresult   *res = PQexecParams(conn, sql, nparams, NULL, params, NULL, NULL, 0);
	ApiResult	r;

	if (PQresultStatus(res) == PGRES_TUPLES_OK)
	{
		*out = res;
		return API_OK;
	}
	r = te_classify(conn, res, error, errlen);
	PQclear(res);
	return r;
}

ApiResult
te_ack_batch(PGconn *conn, const char *subscription, int64_t batch_id,
			 long *acked, char *error, int errlen)
{
	char		id[32];
	const char *params[2] = {subscription, id};
	PGresult   *res;
	ApiResult	r;

	snprintf(id, sizeof(id), "%lld", (long long) batch_id);
	r = te_query(conn, "SELECT task_events.ack_batch($1, $2::pg_catalog.int8)",
				 2, params, &res, error, errlen);
	if (r == API_OK)
	{
		*acked = atol(PQgetvalue(res, 0, 0));
		PQclear(res);
	}
	return r;
}

/*
 * A call of nack_batch or dead_letter_event (sql), which both take the
 * subscription, the batch, an event of it (NULL: none) and a message.
 */
static ApiResult
te_settle_failed(PGconn *conn, const char *sql, const char *subscription,
				 int64_t batch_id, const char *event_id, const char *message,
				 char *error, int errlen)
{
	char		id[32];
	const char *params[4] = {subscription, id, event_id, message};
	PGresult   *res;
	ApiResult	r;

	snprintf(id, sizeof(id), "%lld", (long long) batch_id);
	r = te_query(conn, sql, 4, params, &res, error, errlen);
	if (r == API_OK)
		PQclear(res);
	return r;
}

/* nack_batch; failed_event_id NULL: the whole batch failed. */
ApiResult
te_nack_batch(PGconn *conn, const char *subscription, int64_t batch_id,
			  const char *failed_event_id, const char *message,
			  char *error, int errlen)
{
	return te_settle_failed(conn,
							"SELECT task_events.nack_batch($1, $2::pg_catalog.int8, $3::pg_catalog.uuid, $4)",
							subscription, batch_id, failed_event_id, message, error, errlen);
}

/* dead_letter_event: the event goes to the dead letters at once. */
ApiResult
te_dead_letter_event(PGconn *conn, const char *subscription, int64_t batch_id,
					 const char *event_id, const char *message,
					 char *error, int errlen)
{
	return te_settle_failed(conn,
							"SELECT task_events.dead_letter_event($1, $2::pg_catalog.int8, $3::pg_catalog.uuid, $4)",
							subscription, batch_id, event_id, message, error, errlen);
}

/*
 * task_events.max_attempts as nack_batch will read it (same session, same
 * default).
 */
ApiResult
te_max_attempts(PGconn *conn, int *max_attempts, char *error, int errlen)
{
	PGresult   *res;
	ApiResult	r;

	r = te_query(conn,
				 "SELECT COALESCE(pg_catalog.current_setting('task_events.max_attempts', true), '5')::pg_catalog.int4",
				 0, NULL, &res, error, errlen);
	if (r != API_OK)
		return r;
	*max_attempts = atoi(PQgetvalue(res, 0, 0));
	PQclear(res);
	return API_OK;
}

/*
 * The failed attempts already counted for the batch the lane has leased
 * (subscription_status.retry_attempts).
 */
ApiResult
te_lane_attempts(PGconn *conn, const char *subscription, int lane,
				 int *attempts, char *error, int errlen)
{
	char		lane_text[16];
	const char *params[2] = {subscription, lane_text};
	PGresult   *res;
	ApiResult	r;

	snprintf(lane_text, sizeof(lane_text), "%d", lane);
	r = te_query(conn,
				 "SELECT s.retry_attempts FROM task_events.subscription_status s"
				 " WHERE s.subscription OPERATOR(pg_catalog.=) $1"
				 "   AND s.lane OPERATOR(pg_catalog.=) $2::pg_catalog.int4",
				 2, params, &res, error, errlen);
	if (r != API_OK)
		return r;
	if (PQntuples(res) == 0)
	{
		PQclear(res);
		snprintf(error, errlen, "subscription \"%s\" does not exist", subscription);
		return API_UNKNOWN_SUBSCRIPTION;
	}
	*attempts = atoi(PQgetvalue(res, 0, 0));
	PQclear(res);
	return API_OK;
}

/* The number of lanes of the subscription; API_UNKNOWN_SUBSCRIPTION if none. */
ApiResult
te_subscription_lanes(PGconn *conn, const char *subscription, int *lanes,
					  char *error, int errlen)
{
	const char *params[1] = {subscription};
	PGresult   *res;
	ApiResult	r;

	r = te_query(conn,
				 "SELECT pg_catalog.count(*) FROM task_events.subscription_status s"
				 " WHERE s.subscription OPERATOR(pg_catalog.=) $1",
				 1, params, &res, error, errlen);
	if (r != API_OK)
		return r;
	*lanes = atoi(PQgetvalue(res, 0, 0));
	PQclear(res);
	if (*lanes == 0)
	{
		snprintf(error, errlen, "subscription \"%s\" does not exist", subscription);
		return API_UNKNOWN_SUBSCRIPTION;
	}
	return API_OK;
}

/* Events of the subscription not yet acknowledged, every lane. */
ApiResult
te_events_behind(PGconn *conn, const char *subscription, long *behind)
{
	const char *params[1] = {subscription};
	PGresult   *res;
	char		error[256];
	ApiResult	r;

	r = te_query(conn,
				 "SELECT COALESCE(pg_catalog.sum(s.events_behind), 0)"
				 "  FROM task_events.subscription_status s"
				 " WHERE s.subscription OPERATOR(pg_catalog.=) $1",
				 1, params, &res, error, sizeof(error));
	if (r != API_OK)
		return r;
	*behind = atol(PQgetvalue(res, 0, 0));
	PQclear(res);
	return API_OK;
}
