/*
 * handler_analytics.c
 *		The built-in analytics handler: per-user counters of tasks created
 *		and completed, and completion-time statistics.
 *
 * task_events.analytics_counters gets tasks_created (TaskCreated) and
 * tasks_completed (TaskCompleted) per user; task_events.completion_stats
 * gets, per user, the count, total, min and max of the seconds from the
 * task's TaskCreated to its TaskCompleted.  Each batch is aggregated first,
 * so a batch costs one upsert per table, not one per event.
 */
#include "postgres.h"

#include "fmgr.h"

#include "spi_util.h"

static HandlerPlan te_counters_plan;
static HandlerPlan te_completion_plan;

PG_FUNCTION_INFO_V1(analytics_handler);
Datum
analytics_handler(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0))
		PG_RETURN_VOID();

	SPI_connect();
	te_handler_exec(fcinfo, &te_counters_plan,
					"INSERT INTO task_events.analytics_counters AS c (metric, user_id, value)"
					" SELECT CASE WHEN e.event_type OPERATOR(pg_catalog.=) 'TaskCreated' THEN 'tasks_created'"
					"        ELSE 'tasks_completed' END, e.user_id, pg_catalog.count(*)"
					" FROM pg_catalog.unnest($1) AS e"
					" WHERE e.event_type OPERATOR(pg_catalog.=) ANY ('{TaskCreated,TaskCompleted}'::pg_catalog.text[])"
					" GROUP BY 1, 2 ORDER BY 1, 2"
					" ON CONFLICT (metric, user_id)"
					" DO UPDATE SET value = c.value OPERATOR(pg_catalog.+) EXCLUDED.value");
	te_handler_exec(fcinfo, &te_completion_plan,
					"INSERT INTO task_events.completion_stats AS s"
					" (user_id, completed, total_seconds, min_seconds, max_seconds)"
					" SELECT d.user_id, pg_catalog.count(*), pg_catalog.sum(d.seconds),"
					"        pg_catalog.min(d.seconds), pg_catalog.max(d.seconds)"
					" FROM (SELECT e.user_id,"
					"              pg_catalog.date_part('epoch', e.occurred_at OPERATOR(pg_catalog.-) c.occurred_at)"
					"                AS seconds"
					"       FROM pg_catalog.unnest($1) AS e"
					"       JOIN task_events.events c"
					"         ON c.aggregate_id OPERATOR(pg_catalog.=) e.aggregate_id"
					"        AND c.aggregate_version OPERATOR(pg_catalog.=) 1"
					"       WHERE e.event_type OPERATOR(pg_catalog.=) 'TaskCompleted') AS d"
					" GROUP BY d.user_id ORDER BY d.user_id"
					" ON CONFLICT (user_id) DO UPDATE SET"
					"  completed = s.completed OPERATOR(pg_catalog.+) EXCLUDED.completed,"
					"  total_seconds = s.total_seconds OPERATOR(pg_catalog.+) EXCLUDED.total_seconds,"
					"  min_seconds = LEAST(s.min_seconds, EXCLUDED.min_seconds),"
					"  max_seconds = GREATEST(s.max_seconds, EXCLUDED.max_seconds)");
	SPI_finish();
	PG_RETURN_VOID();
}
