/* uuid_v7.h: time-ordered (version 7) UUIDs for task and event ids */
#ifndef TE_UUID_V7_H
#define TE_UUID_V7_H

#include "utils/timestamp.h"
#include "utils/uuid.h"

extern void te_uuid_v7(TimestampTz at, pg_uuid_t *out);

#endif
