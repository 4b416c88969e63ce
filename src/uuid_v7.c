/*
 * uuid_v7.c
 *		Time-ordered UUIDs (RFC 9562 version 7) for task and event ids.
 *
 * libuuid 2.38 (Debian 12) has no v7 generator, so we lay out the v7 fields
 * ourselves and take the random bits from libuuid's uuid_generate_random(),
 * which reads the kernel's CSPRNG.  Time-ordered ids keep the unique indexes
 * on task_id and event_id append-mostly.
 */
#include "postgres.h"

#include <uuid/uuid.h>

#include "uuid_v7.h"

/* Unix milliseconds and 12-bit sub-millisecond counter of the last id made. */
static int64 te_last_unix_ms = 0;
static int	te_last_rand_a = 0;

/*
 * Fill *out with a v7 UUID for time "at".  Within one backend the ids are
 * strictly increasing even when the clock stands still or steps back: rand_a
 * carries the sub-millisecond fraction and is bumped past the previous id.
 */
void
te_uuid_v7(TimestampTz at, pg_uuid_t *out)
{
	uuid_t		random_bytes;
	int64		unix_us;
	int64		unix_ms;
	int			rand_a;

	unix_us = at + (int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY;
	unix_ms = unix_us / 1000;
	rand_a = (int) ((unix_us % 1000) * 4096 / 1000);

	if (unix_ms < te_last_unix_ms ||
		(unix_ms == te_last_unix_ms && rand_a <= te_last_rand_a))
	{
		unix_ms = te_last_unix_ms;
		rand_a = te_last_rand_a + 1;
		if (rand_a > 0xFFF)
		{
			unix_ms++;
			rand_a = 0;
		}
	}
	te_last_unix_ms = unix_ms;
	te_last_rand_a = rand_a;

	uuid_generate_random(random_bytes);
	memcpy(out->data, random_bytes, UUID_LEN);

	out->data[0] = (unsigned char) (unix_ms >> 40);
	out->data[1] = (unsigned char) (unix_ms >> 32);
	out->data[2] = (unsigned char) (unix_ms >> 24);
	out->data[3] = (unsigned char) (unix_ms >> 16);
	out->data[4] = (unsigned char) (unix_ms >> 8);
	out->data[5] = (unsigned char) unix_ms;
	out->data[6] = (unsigned char) (0x70 | (rand_a >> 8));
	out->data[7] = (unsigned char) (rand_a & 0xFF);
	out->data[8] = (unsigned char) (0x80 | (out->data[8] & 0x3F));
}
