/*
 * utility_hook.c
 *		Keeping the registry of served databases (registry.c) in step with
 *		the statements that change it.
 *
 * Installed in every backend when the library is preloaded:
 * - CREATE EXTENSION task_events, ALTER EXTENSION task_events UPDATE:
 *   the database is registered at commit, and the launcher starts its
 *   workers within moments;
 * - DROP EXTENSION task_events: the database's workers are woken at commit,
 *   find the extension gone and leave (worker.c);
 * - DROP DATABASE, ALTER DATABASE RENAME TO / SET TABLESPACE, and CREATE
 *   DATABASE from a template: PostgreSQL refuses them while another
 *   session is connected to the database, so its workers are asked to
 *   leave first (te_park_database) and kept away until the statement's
 *   transaction ends.  A copy of a template that has the extension is
 *   registered at commit, to be probed.
 */
#include "postgres.h"

#include "commands/dbcommands.h"
#include "commands/defrem.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "tcop/utility.h"

#include "task_events.h"

static ProcessUtility_hook_type te_prev_utility_hook = NULL;

/* Is name the task_events extension? */
static bool
te_is_our_extension(const char *name)
{
	return strcmp(name, "task_events") == 0;
}

/* Does DROP ... name the task_events extension? */
static bool
te_drops_our_extension(DropStmt *stmt)
{
	ListCell   *lc;

	if (stmt->removeType != OBJECT_EXTENSION)
		return false;
	foreach(lc, stmt->objects)
		if (te_is_our_extension(strVal(lfirst(lc))))
			return true;
	return false;
}

/* The value of option name in a list of DefElem, or NULL. */
static const char *
te_option(List *options, const char *name)
{
	ListCell   *lc;

	foreach(lc, options)
	{
		DefElem    *opt = lfirst_node(DefElem, lc);

		if (strcmp(opt->defname, name) == 0 && opt->arg != NULL)
			return defGetString(opt);
	}
	return NULL;
}

/*
 * The database a statement needs to itself (no other session connected),
 * or InvalidOid.
 */
static Oid
te_database_needed_alone(Node *parsetree)
{
	const char *name = NULL;

	switch (nodeTag(parsetree))
	{
		case T_DropdbStmt:
			name = ((DropdbStmt *) parsetree)->dbname;
			break;
		case T_RenameStmt:
			if (((RenameStmt *) parsetree)->renameType == OBJECT_DATABASE)
				name = ((RenameStmt *) parsetree)->subname;
			break;
		case T_AlterDatabaseStmt:
			if (te_option(((AlterDatabaseStmt *) parsetree)->options, "tablespace") != NULL)
				name = ((AlterDatabaseStmt *) parsetree)->dbname;
			break;
		case T_CreatedbStmt:
			name = te_option(((CreatedbStmt *) parsetree)->options, "template");
			if (name == NULL)
				name = "template1";
			break;
		default:
			break;
	}
	return name != NULL ? get_database_oid(name, true) : InvalidOid;
}

static void
te_process_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
				   ProcessUtilityContext context, ParamListInfo params,
				   QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *parsetree = pstmt->utilityStmt;
	Oid			alone = te_database_needed_alone(parsetree);
	bool		template_served = false;

	if (OidIsValid(alone))
	{
		template_served = te_registry_find(alone) != NULL;
		te_park_database(alone);
	}

	if (te_prev_utility_hook)
		te_prev_utility_hook(pstmt, queryString, readOnlyTree, context,
							 params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
								params, queryEnv, dest, qc);

	switch (nodeTag(parsetree))
	{
		case T_CreateExtensionStmt:
			if (te_is_our_extension(((CreateExtensionStmt *) parsetree)->extname))
				te_register_database_at_commit(MyDatabaseId, true);
			break;
		case T_AlterExtensionStmt:
			if (te_is_our_extension(((AlterExtensionStmt *) parsetree)->extname))
				te_register_database_at_commit(MyDatabaseId, true);
			break;
		case T_DropStmt:
			if (te_drops_our_extension((DropStmt *) parsetree))
				te_wake_workers_at_commit();
			break;
		case T_CreatedbStmt:
			if (template_served)
				te_register_database_at_commit(get_database_oid(((CreatedbStmt *) parsetree)->dbname, false),
											   false);
			break;
		default:
			break;
	}
}

void
te_install_utility_hook(void)
{
	te_prev_utility_hook = ProcessUtility_hook;
	ProcessUtility_hook = te_process_utility;
}
