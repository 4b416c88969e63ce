/*
 * deliver_post.c
 *		--post URL: each event's envelope POSTed to a webhook, one request at
 *		a time in seq order (so in order per task), with libcurl.
 *
 * Headers: Content-Type: application/json; Idempotency-Key: the event_id
 * (delivery is at least once); X-Task-Events-Signature: sha256=<hex
 * HMAC-SHA256 of the body> when TASK_EVENTS_WEBHOOK_SECRET is set (OpenSSL).
 *
 * Answers: 2xx delivers the event.  408, 429, 5xx, a timeout or a
 * connection error are transient: the same event is retried in hand, with
 * backoff (0.25 s doubling to 30 s, or the Retry-After the server sent),
 * for as long as the batch's lease allows; then the loop settles the batch
 * (task_events_consume.c).  Any other answer (4xx, a redirect, which is not
 * followed) is permanent: the event goes to the dead letters at once
 * (dead_letter_event), with the status and the start of the body as the
 * error.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "consume.h"

#define TE_BODY_KEPT 200		/* bytes of an answer's body kept for errors */
#define TE_MAX_BACKOFF 30.0

static CURL *te_curl = NULL;
static const char *te_secret = NULL;
static bool te_failing = false; /* logged that the webhook fails */

/* The start of the answer's body, for error messages. */
typedef struct BodyStart
{
	char		data[TE_BODY_KEPT + 1];
	size_t		len;
} BodyStart;

static size_t
te_keep_body(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	BodyStart  *body = userdata;
	size_t		n = size * nmemb;
	size_t		room = TE_BODY_KEPT - body->len;
	size_t		take = n < room ? n : room;

	memcpy(body->data + body->len, ptr, take);
	body->len += take;
	body->data[body->len] = '\0';
	return n;
}

/*
 * Check the URL (http or https), set up the handle (kept for the program's
 * life: connections are reused) and read the secret from the environment.
 */
bool
te_post_init(const ConsumeOptions *opts, char *error, int errlen)
{
	CURLU	   *u;
	char	   *scheme = NULL;
	bool		ok;

	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
	{
		snprintf(error, errlen, "could not initialize libcurl");
		return false;
	}
	u = curl_url();
	ok = u != NULL &&
		curl_url_set(u, CURLUPART_URL, opts->url, 0) == CURLUE_OK &&
		curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK &&
		(strcmp(scheme, "http") == 0 || strcmp(scheme, "https") == 0);
	curl_free(scheme);
	curl_url_cleanup(u);
	if (!ok)
	{
		snprintf(error, errlen, "--post needs an http or https URL, not \"%s\"", opts->url);
		return false;
	}
	te_curl = curl_easy_init();
	if (te_curl == NULL)
	{
		snprintf(error, errlen, "could not initialize libcurl");
		return false;
	}
	curl_easy_setopt(te_curl, CURLOPT_URL, opts->url);
	curl_easy_setopt(te_curl, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(te_curl, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(te_curl, CURLOPT_USERAGENT, TE_PROGNAME);
	curl_easy_setopt(te_curl, CURLOPT_WRITEFUNCTION, te_keep_body);
	te_secret = getenv("TASK_EVENTS_WEBHOOK_SECRET");
	if (te_secret != NULL && te_secret[0] == '\0')
		te_secret = NULL;
	return true;
}

void
te_post_cleanup(void)
{
	if (te_curl != NULL)
		curl_easy_cleanup(te_curl);
	te_curl = NULL;
	curl_global_cleanup();
}

/* "sha256=" and the hex HMAC-SHA256 of body under the secret, into out. */
static void
te_signature(const char *body, char *out, size_t outlen)
{
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;
	size_t		pos;

	HMAC(EVP_sha256(), te_secret, (int) strlen(te_secret),
		 (const unsigned char *) body, strlen(body), md, &mdlen);
	pos = (size_t) snprintf(out, outlen, "X-Task-Events-Signature: sha256=");
	for (unsigned int i = 0; i < mdlen && pos + 2 < outlen; i++)
		pos += (size_t) snprintf(out + pos, outlen - pos, "%02x", md[i]);
}

/* Text on one line: control characters become spaces. */
static void
te_flatten(char *s)
{
	for (; *s != '\0'; s++)
		if ((unsigned char) *s < 0x20)
			*s = ' ';
}

typedef enum PostAnswer
{
	POST_DELIVERED,
	POST_TRANSIENT,
	POST_PERMANENT
} PostAnswer;

/*
 * POST one event, within timeout seconds.  On failure, error says why;
 * *retry_after is the server's Retry-After (seconds, 0 when none).
 */
static PostAnswer
te_post_event(const ConsumeEvent *ev, double timeout, double *retry_after,
			  char *error, size_t errlen)
{
	char		idem[96];
	char		sig[128];
	char		curl_error[CURL_ERROR_SIZE];
	struct curl_slist *headers = NULL;
	BodyStart	body;
	CURLcode	rc;
	long		status = 0;
	curl_off_t	after = 0;

	body.len = 0;
	body.data[0] = '\0';
	curl_error[0] = '\0';
	*retry_after = 0;
	snprintf(idem, sizeof(idem), "Idempotency-Key: %s", ev->event_id);
	headers = curl_slist_append(headers, "Content-Type: application/json");
	headers = curl_slist_append(headers, idem);
	if (te_secret != NULL)
	{
		te_signature(ev->envelope, sig, sizeof(sig));
		headers = curl_slist_append(headers, sig);
	}
	/* No "Expect: 100-continue" round trip. */
	headers = curl_slist_append(headers, "Expect:");

	curl_easy_setopt(te_curl, CURLOPT_HTTPHEADER, headers);
	curl_easy_setopt(te_curl, CURLOPT_POSTFIELDS, ev->envelope);
	curl_easy_setopt(te_curl, CURLOPT_POSTFIELDSIZE, (long) strlen(ev->envelope));
	curl_easy_setopt(te_curl, CURLOPT_WRITEDATA, &body);
	curl_easy_setopt(te_curl, CURLOPT_ERRORBUFFER, curl_error);
	curl_easy_setopt(te_curl, CURLOPT_TIMEOUT_MS, (long) (timeout * 1000.0));
	rc = curl_easy_perform(te_curl);
	curl_easy_setopt(te_curl, CURLOPT_ERRORBUFFER, NULL);
	curl_easy_setopt(te_curl, CURLOPT_HTTPHEADER, NULL);
	curl_slist_free_all(headers);

	if (rc != CURLE_OK)
	{
		snprintf(error, errlen, "POST failed: %s",
				 curl_error[0] != '\0' ? curl_error : curl_easy_strerror(rc));
		return POST_TRANSIENT;
	}
	curl_easy_getinfo(te_curl, CURLINFO_RESPONSE_CODE, &status);
	if (status >= 200 && status < 300)
		return POST_DELIVERED;
	te_flatten(body.data);
	snprintf(error, errlen, "HTTP %ld: %s", status, body.data);
	if (status == 408 || status == 429 || status >= 500)
	{
		if (curl_easy_getinfo(te_curl, CURLINFO_RETRY_AFTER, &after) == CURLE_OK && after > 0)
			*retry_after = (double) after;
		return POST_TRANSIENT;
	}
	return POST_PERMANENT;
}

/* Deliver the batch's events in order; see the file header for answers. */
void
te_deliver_post(const ConsumeOptions *opts, const ConsumeBatch *batch,
				DeliveryResult *result)
{
	memset(result, 0, sizeof(*result));
	for (int i = 0; i < batch->n; i++)
	{
		double		backoff = 0.25;

		for (;;)
		{
			double		left = batch->deadline - te_now();
			double		retry_after;
			double		wait;
			PostAnswer	answer;

			if (left < 0.05)
			{
				/* The lease ends: the loop settles what was delivered. */
				result->outcome = FAILED;
				result->transient = true;
				result->failed_at = i;
				if (result->error[0] == '\0')
					snprintf(result->error, sizeof(result->error),
							 "the lease ran out after %d of %d events", i, batch->n);
				return;
			}
			answer = te_post_event(&batch->events[i],
								   opts->timeout < left ? opts->timeout : left,
								   &retry_after, result->error, sizeof(result->error));
			if (answer == POST_DELIVERED)
			{
				if (te_failing)
					te_log("the webhook accepts events again");
				te_failing = false;
				result->error[0] = '\0';
				result->delivered = i + 1;
				break;
			}
			result->failed_at = i;
			if (answer == POST_PERMANENT)
			{
				result->outcome = FAILED;
				result->transient = false;
				result->permanent = true;
				return;
			}
			if (!te_failing)
				te_log("event %s: %s; retrying with backoff", batch->events[i].event_id,
					   result->error);
			te_failing = true;
			if (te_stop_requested)
			{
				result->outcome = LEFT;
				return;
			}
			wait = retry_after > 0 ? retry_after : backoff;
			backoff = backoff * 2 > TE_MAX_BACKOFF ? TE_MAX_BACKOFF : backoff * 2;
			if (te_now() + wait >= batch->deadline)
			{
				result->outcome = FAILED;
				result->transient = true;
				return;
			}
			te_sleep(wait);
		}
	}
	result->outcome = DELIVERED;
	result->delivered = batch->n;
}
