/*
 * handler_notification.c
 *		The built-in notification handler: a message to the task's owner
 *		when a task is created and when it is completed.
 *
 *   TaskCreated   -> "New task created: <title>"
 *   TaskCompleted -> "Congratulations! Task completed: <title>"
 *
 * Rows go to task_events.notifications, one INSERT per batch, in seq order
 * so that notification_id follows the order of the events.
 */
#include "postgres.h"

#include "fmgr.h"

#include "spi_util.h"

static HandlerPlan te_notification_plan;

PG_FUNCTION_INFO_V1(notification_handler);
Datum
notification_handler(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0))
		PG_RETURN_VOID();

	SPI_connect();
	te_handler_exec(fcinfo, &te_notification_plan,
					"INSERT INTO task_events.notifications (event_id, user_id, message, created_at)"
					" SELECT e.event_id, e.user_id,"
					"        CASE WHEN e.event_type OPERATOR(pg_catalog.=) 'TaskCreated' THEN 'New task created: '"
					"          ELSE 'Congratulations! Task completed: ' END"
					"        OPERATOR(pg_catalog.||) (e.payload OPERATOR(pg_catalog.->>) 'task_title'),"
					"        pg_catalog.clock_timestamp()"
					" FROM pg_catalog.unnest($1) AS e"
					" WHERE e.event_type OPERATOR(pg_catalog.=) ANY ('{TaskCreated,TaskCompleted}'::pg_catalog.text[])"
					" ORDER BY e.seq");
	SPI_finish();
	PG_RETURN_VOID();
}
