/* commit_horizon.h: which events a reader has already been shown */
#ifndef TE_COMMIT_HORIZON_H
#define TE_COMMIT_HORIZON_H

#include "postgres.h"

extern Datum te_window_snapshot(void);

#endif
