/*
 * handler_call.c
 *		Calling a handler function: untrusted code, run so that it cannot
 *		escape its owner's privileges, outlive its time limit, or leave
 *		anything behind in the session that runs the next handler.
 *
 * A handler is user code, and the process that calls it (a worker, or the
 * session of a superuser calling process_pending()) usually has more
 * privileges than the role that owns the function, who can replace its body
 * at any time.  So each call runs as PostgreSQL runs a maintenance operation
 * on another role's table (VACUUM, ANALYZE, REFRESH MATERIALIZED VIEW):
 * - as the function's owner, in a security-restricted operation: no SET ROLE
 *   or SET SESSION AUTHORIZATION, no temporary table, no LISTEN, no PREPARE,
 *   no WITH HOLD cursor, nothing that would outlive the call or let it act
 *   as another role;
 * - in its own GUC nesting level, undone when the call ends, so that SET,
 *   set_config(..., false) and SET LOCAL last only for the call;
 * - in a subtransaction, so that a failure undoes exactly the call's writes;
 * - within task_events.handler_timeout (statement_timeout is a setting of
 *   client sessions: background workers never arm it).
 * A security-restricted operation may not queue deferred triggers (they
 * would fire after it, as someone else).  In a worker, which owns its whole
 * transaction, every constraint is made immediate before the call, so that
 * deferrable constraints are checked at the end of each of the handler's
 * statements, as the owner, and a violation is the call's failure; a
 * handler that defers them itself fails.  process_pending() leaves the
 * caller's transaction as it is: there a handler that queues a deferred
 * trigger fails (42501).  After each call a worker also releases the
 * session-level advisory locks the call left.  In process_pending() those
 * stay with the calling session until it releases them or ends: PostgreSQL
 * offers no way to release only the ones a call took.
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_proc.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "storage/lock.h"
#include "utils/acl.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/regproc.h"
#include "utils/resowner.h"
#include "utils/syscache.h"
#include "utils/timeout.h"

#include "handler_call.h"
#include "task_events.h"

static TimeoutId te_timeout_id = MAX_TIMEOUTS;
static volatile sig_atomic_t te_timed_out = false;
static bool te_durable_commit = false;

/* Timeout handler: cancel the call, as statement_timeout cancels a query. */
static void
te_handler_timeout_fired(void)
{
	te_timed_out = true;
	QueryCancelPending = true;
	InterruptPending = true;
	SetLatch(MyLatch);
}

static void
te_arm_timeout(void)
{
	if (te_timeout_id == MAX_TIMEOUTS)
		te_timeout_id = RegisterTimeout(USER_TIMEOUT, te_handler_timeout_fired);
	te_timed_out = false;
	if (te_handler_timeout_ms > 0)
		enable_timeout_after(te_timeout_id, te_handler_timeout_ms);
}

/*
 * Disarm the timeout.  When it fired after the call had returned, the
 * cancel it requested is ours to withdraw: nobody else asked for it.
 */
static void
te_disarm_timeout(void)
{
	if (te_timeout_id != MAX_TIMEOUTS)
		disable_timeout(te_timeout_id, false);
	if (te_timed_out)
		QueryCancelPending = false;
}

/*
 * The owner of a handler's function, or an error (a failed attempt) when it
 * is gone or its owner may no longer execute it.
 */
static Oid
te_function_owner(Oid function)
{
	HeapTuple	tuple = SearchSysCache1(PROCOID, ObjectIdGetDatum(function));
	Oid			owner;

	if (!HeapTupleIsValid(tuple))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("handler function %u does not exist", function),
				 errhint("Register the handler again with an existing function.")));
	owner = ((Form_pg_proc) GETSTRUCT(tuple))->proowner;
	ReleaseSysCache(tuple);
	if (pg_proc_aclcheck(function, owner, ACL_EXECUTE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("the owner of handler function %s may not execute it",
						format_procedure_qualified(function))));
	return owner;
}

/*
 * Make every constraint of the worker's transaction immediate (see above).
 * Assumes SPI is connected; nothing else of the transaction is deferred.
 */
static void
te_constraints_immediate(void)
{
	if (SPI_execute("SET CONSTRAINTS ALL IMMEDIATE", false, 0) != SPI_OK_UTILITY)
		elog(ERROR, "could not make the constraints of a handler call immediate");
}

/*
 * The call itself, run as the owner of function in the current
 * subtransaction.  Assumes the caller restores the user id and the GUC
 * nesting level on error (aborting the subtransaction does both).
 */
static void
te_invoke_as_owner(Oid function, Datum events)
{
	Oid			owner = te_function_owner(function);
	Oid			save_userid;
	int			save_sec_context;
	int			save_nestlevel;
	FmgrInfo	flinfo;

	LOCAL_FCINFO(fcinfo, 1);

	GetUserIdAndSecContext(&save_userid, &save_sec_context);
	SetUserIdAndSecContext(owner, save_sec_context | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	save_nestlevel = NewGUCNestLevel();

	fmgr_info(function, &flinfo);
	InitFunctionCallInfoData(*fcinfo, &flinfo, 1, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = events;
	fcinfo->args[0].isnull = false;
	(void) FunctionCallInvoke(fcinfo);

	AtEOXact_GUC(false, save_nestlevel);
	SetUserIdAndSecContext(save_userid, save_sec_context);
}

/*
 * Call the handler's function with events (a task_events.events[]) in a
 * subtransaction.  Returns true on success; on failure rolls the
 * subtransaction back and returns the error, copied into cxt.  Assumes SPI
 * is connected (te_constraints_immediate uses it).
 */
bool
te_call_handler(Oid function, Datum events, MemoryContext cxt, ErrorData **error)
{
	ResourceOwner owner = CurrentResourceOwner;
	volatile bool ok = true;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		if (IsBackgroundWorker)
			te_constraints_immediate();
		te_arm_timeout();
		te_invoke_as_owner(function, events);
		te_disarm_timeout();

		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		bool		timed_out;

		te_disarm_timeout();
		timed_out = te_timed_out;
		MemoryContextSwitchTo(cxt);
		*error = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;

		if (timed_out && (*error)->sqlerrcode == ERRCODE_QUERY_CANCELED)
		{
			(*error)->message = psprintf("handler call canceled after task_events.handler_timeout (%d ms)",
										 te_handler_timeout_ms);
			(*error)->detail = NULL;
		}
		/*
		 * In a session (process_pending), a cancel or statement_timeout stops
		 * the call, as in PL/pgSQL.  A worker has no caller to stop: there
		 * it is a failed attempt like any other (e.g. a remote
		 * statement_timeout reported by dblink, or pg_cancel_backend).
		 */
		else if ((*error)->sqlerrcode == ERRCODE_QUERY_CANCELED && !IsBackgroundWorker)
			ReThrowError(*error);
		ok = false;
	}
	PG_END_TRY();

	if (IsBackgroundWorker)
		LockReleaseSession(USER_LOCKMETHOD);
	return ok;
}

/*
 * Ask that the transaction of the current batch commit durably (waiting for
 * its WAL flush) even though the workers commit asynchronously: for handlers
 * whose effects leave the database at commit, such as the relay handler's
 * notifications, which must not be heard unless the position that records
 * them survives a crash.
 */
void
te_request_durable_commit(void)
{
	te_durable_commit = true;
}

/* Whether te_request_durable_commit() was called since the last call; resets it. */
bool
te_take_durable_commit_request(void)
{
	bool		requested = te_durable_commit;

	te_durable_commit = false;
	return requested;
}
