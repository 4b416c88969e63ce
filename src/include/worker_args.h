/* worker_args.h: what the launcher tells the workers and probes it starts */
#ifndef TE_WORKER_ARGS_H
#define TE_WORKER_ARGS_H

/*
 * Passed in bgw_extra (bgw_main_arg holds the worker's number in its
 * database, 0-based).
 */
typedef struct WorkerArgs
{
	Oid			dboid;			/* the database to serve */
	Oid			roleoid;		/* task_events.worker_role, or InvalidOid */
	int			entry_index;	/* its entry in the registry */
} WorkerArgs;

#endif
