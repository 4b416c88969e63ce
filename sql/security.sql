-- Privileges (README, "Security").  The extension creates the NOLOGIN group
-- roles task_events_writer and task_events_reader.  PUBLIC can use nothing
-- in the schema.  Writers call create_task, update_status, complete_task and
-- task_history and read tasks, but never write a table directly: every
-- write goes through the SECURITY DEFINER write functions.  Readers read
-- tasks, events, the handlers' outputs and the monitoring views, and write
-- nothing.  process_pending and retry_dead_letters are for superusers and
-- the owner.  Every function but process_pending and the inlined
-- _unhandled_events runs with search_path = pg_catalog, pg_temp, pg_temp
-- last.  The append-only tables (events, audit_log) refuse UPDATE, DELETE,
-- TRUNCATE and MERGE to every role: the group roles, a table owner that is
-- not a superuser, and a superuser under session_replication_role = replica.

-- The group roles: they cannot log in and have no special attribute.
SELECT rolname, rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls
FROM pg_roles WHERE rolname IN ('task_events_writer', 'task_events_reader')
ORDER BY rolname;

CREATE ROLE regress_writer LOGIN IN ROLE task_events_writer;
CREATE ROLE regress_reader LOGIN IN ROLE task_events_reader;
CREATE ROLE regress_nobody LOGIN;

------------------------------------------------------------------------------
-- The model, as the catalogs state it.
------------------------------------------------------------------------------
-- EXECUTE on every function of the schema.  regress_nobody stands for
-- PUBLIC: its column must be all false.
SELECT p.oid::regprocedure AS function,
	   has_function_privilege('regress_writer', p.oid, 'EXECUTE') AS writer,
	   has_function_privilege('regress_reader', p.oid, 'EXECUTE') AS reader,
	   has_function_privilege('regress_nobody', p.oid, 'EXECUTE') AS nobody
FROM pg_proc p WHERE p.pronamespace = 'task_events'::regnamespace
ORDER BY p.proname;

-- Privileges on every table, view and sequence of the schema ('-': none).
CREATE FUNCTION regress.privileges_of(who name, rel regclass) RETURNS text AS $$
	SELECT COALESCE(string_agg(u.p, ',' ORDER BY u.o), '-')
	FROM pg_class c,
		 unnest(CASE WHEN c.relkind = 'S' THEN '{USAGE,SELECT,UPDATE}'::text[]
					 ELSE '{SELECT,INSERT,UPDATE,DELETE,TRUNCATE,REFERENCES,TRIGGER}'::text[]
				END) WITH ORDINALITY AS u(p, o)
	WHERE c.oid = rel
	  AND CASE WHEN c.relkind = 'S' THEN has_sequence_privilege(who, rel, u.p)
			   ELSE has_table_privilege(who, rel, u.p) END
$$ LANGUAGE sql;
SELECT c.relname, c.relkind,
	   regress.privileges_of('regress_writer', c.oid) AS writer,
	   regress.privileges_of('regress_reader', c.oid) AS reader,
	   regress.privileges_of('regress_nobody', c.oid) AS nobody
FROM pg_class c
WHERE c.relnamespace = 'task_events'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
ORDER BY c.relname;
SELECT has_schema_privilege('regress_writer', 'task_events', 'USAGE') AS writer_usage,
	   has_schema_privilege('regress_reader', 'task_events', 'USAGE') AS reader_usage,
	   has_schema_privilege('regress_nobody', 'task_events', 'USAGE') AS nobody_usage,
	   has_schema_privilege('regress_writer', 'task_events', 'CREATE') OR
	   has_schema_privilege('regress_reader', 'task_events', 'CREATE') OR
	   has_schema_privilege('regress_nobody', 'task_events', 'CREATE') AS anyone_create;

-- What PUBLIC itself may do ('public' as a role name), and what
-- regress_nobody may execute.  The README documents nothing for PUBLIC:
-- expected, no row.
SELECT 'public executes' AS what, p.oid::regprocedure::text AS object
FROM pg_proc p
WHERE p.pronamespace = 'task_events'::regnamespace
  AND has_function_privilege('public', p.oid, 'EXECUTE')
UNION ALL
SELECT 'regress_nobody executes', p.oid::regprocedure::text
FROM pg_proc p
WHERE p.pronamespace = 'task_events'::regnamespace
  AND has_function_privilege('regress_nobody', p.oid, 'EXECUTE')
UNION ALL
SELECT 'public uses or writes', c.oid::regclass::text
FROM pg_class c
WHERE c.relnamespace = 'task_events'::regnamespace
  AND CASE WHEN c.relkind = 'S'
		   THEN has_sequence_privilege('public', c.oid, 'USAGE, SELECT, UPDATE')
		   ELSE has_table_privilege('public', c.oid,
									'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER') END
UNION ALL
SELECT 'public uses the schema', 'task_events'
WHERE has_schema_privilege('public', 'task_events', 'USAGE, CREATE')
ORDER BY 1, 2;

-- Nothing in the schema is granted to PUBLIC (grantee 0), and no function
-- keeps the default ACL (NULL: EXECUTE for PUBLIC).  Expected: no row.
SELECT 'schema' AS kind, n.nspname::text AS object
FROM pg_namespace n
WHERE n.nspname = 'task_events'
  AND (n.nspacl IS NULL OR EXISTS (SELECT FROM aclexplode(n.nspacl) a WHERE a.grantee = 0))
UNION ALL
SELECT 'relation', c.oid::regclass::text
FROM pg_class c
WHERE c.relnamespace = 'task_events'::regnamespace
  AND EXISTS (SELECT FROM aclexplode(c.relacl) a WHERE a.grantee = 0)
UNION ALL
SELECT 'function', p.oid::regprocedure::text
FROM pg_proc p
WHERE p.pronamespace = 'task_events'::regnamespace
  AND (p.proacl IS NULL OR EXISTS (SELECT FROM aclexplode(p.proacl) a WHERE a.grantee = 0))
ORDER BY 1, 2;

-- Which functions are SECURITY DEFINER (those that roles without table
-- privileges call) and the settings they run with.  Every function has
-- search_path = pg_catalog, pg_temp, except _unhandled_events (below) and
-- process_pending: it runs the
-- registered handlers in the caller's session.
SELECT p.proname, p.prosecdef AS security_definer, p.proconfig
FROM pg_proc p WHERE p.pronamespace = 'task_events'::regnamespace
ORDER BY p.proname;
-- The rule itself.  Expected: process_pending, and _unhandled_events, which
-- the planner inlines into its callers only without a SET clause (every name
-- in it is schema-qualified).
SELECT p.proname AS without_fixed_search_path
FROM pg_proc p WHERE p.pronamespace = 'task_events'::regnamespace
  AND NOT COALESCE(p.proconfig @> '{"search_path=pg_catalog, pg_temp"}', false)
ORDER BY p.proname;

------------------------------------------------------------------------------
-- The model, as the roles meet it.
------------------------------------------------------------------------------
-- Every direct write the current role could try on the schema's tables and
-- sequences: each must fail with 42501.
CREATE FUNCTION regress.direct_writes()
RETURNS TABLE (relation text, statement text, sqlstate text) AS $$
	SELECT c.oid::regclass::text, s.verb,
		   (regress.error_of(format(s.sql, c.oid::regclass, a.attname))).sqlstate
	FROM pg_class c
	JOIN (VALUES ('r', 1, 'INSERT', 'INSERT INTO %1$s DEFAULT VALUES'),
				 ('r', 2, 'UPDATE', 'UPDATE %1$s SET %2$I = %2$I'),
				 ('r', 3, 'DELETE', 'DELETE FROM %1$s'),
				 ('r', 4, 'TRUNCATE', 'TRUNCATE %1$s'),
				 ('r', 5, 'MERGE', 'MERGE INTO %1$s t USING (SELECT) s ON true'
								   ' WHEN MATCHED THEN DELETE WHEN NOT MATCHED THEN INSERT DEFAULT VALUES'),
				 ('r', 6, 'INSERT ON CONFLICT', 'INSERT INTO %1$s SELECT * FROM %1$s'
												' ON CONFLICT DO NOTHING'),
				 ('S', 1, 'nextval', 'SELECT pg_catalog.nextval(%1$L)'),
				 ('S', 2, 'setval', 'SELECT pg_catalog.setval(%1$L, 1)'))
		AS s(relkind, n, verb, sql) ON s.relkind = c.relkind
	JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = 1
	WHERE c.relnamespace = 'task_events'::regnamespace
	ORDER BY c.relname, s.n
$$ LANGUAGE sql;

-- Reading every table, view and sequence of the schema: 'no error' or the
-- SQLSTATE.
CREATE FUNCTION regress.reads() RETURNS TABLE (relation text, sqlstate text) AS $$
	SELECT c.relname::text,
		   (regress.error_of(format('SELECT count(*) FROM %s', c.oid::regclass))).sqlstate
	FROM pg_class c
	WHERE c.relnamespace = 'task_events'::regnamespace AND c.relkind IN ('r', 'v', 'S')
	ORDER BY c.relname
$$ LANGUAGE sql;

-- The admin and handler functions, called by the current role.
CREATE FUNCTION regress.admin_calls() RETURNS TABLE (call text, sqlstate text) AS $$
	SELECT s, (regress.error_of('SELECT ' || s)).sqlstate
	FROM unnest(ARRAY[
		'task_events.process_pending()',
		'task_events.retry_dead_letters()',
		'task_events.audit_handler(ARRAY[]::task_events.events[])',
		'task_events.notification_handler(ARRAY[]::task_events.events[])',
		'task_events.analytics_handler(ARRAY[]::task_events.events[])',
		'task_events.relay_handler(ARRAY[]::task_events.events[])']) WITH ORDINALITY AS u(s, n)
	ORDER BY n
$$ LANGUAGE sql;

-- The writer: the write functions and task_history work and write as
-- usual; the task can be read back.
SET ROLE regress_writer;
SELECT task_id AS wtask FROM task_events.create_task('wendy', 'written by a writer') \gset
SELECT status, version FROM task_events.update_status(:'wtask', 'in_progress');
SELECT status, version, completed_at IS NOT NULL AS completed
FROM task_events.complete_task(:'wtask', 2);
SELECT aggregate_version, event_type, user_id FROM task_events.task_history(:'wtask');
SELECT user_id, title, status, version FROM task_events.tasks WHERE task_id = :'wtask';
-- The domain's own errors reach the writer unchanged.
SELECT * FROM regress.error_of($$SELECT task_events.complete_task('$$ || :'wtask' || $$')$$);
-- No direct write anywhere.
SELECT count(*) AS attempts, count(*) FILTER (WHERE sqlstate = '42501') AS refused
FROM regress.direct_writes();
SELECT * FROM regress.direct_writes() WHERE sqlstate <> '42501';
-- Reads: tasks only.
SELECT * FROM regress.reads();
-- Admin and handler functions: refused.
SELECT * FROM regress.admin_calls();
SELECT * FROM regress.error_of($$SELECT * FROM task_events.handler_backlog('audit')$$);
-- session_replication_role is for superusers.
SELECT * FROM regress.error_of($$SET session_replication_role = replica$$);
RESET ROLE;

-- What the writer's calls wrote, as the superuser sees it.
SELECT event_type, aggregate_version, user_id
FROM task_events.events WHERE aggregate_id = :'wtask' ORDER BY aggregate_version;

-- The reader: reads tasks, events, outputs and monitoring; writes nothing.
SELECT task_events.process_pending() > 0 AS handled_the_writers_events;
SET ROLE regress_reader;
SELECT * FROM regress.reads();
SELECT aggregate_version, event_type FROM task_events.task_history(:'wtask');
SELECT message FROM task_events.notifications
WHERE event_id IN (SELECT event_id FROM task_events.events WHERE aggregate_id = :'wtask')
ORDER BY notification_id;
SELECT event_type FROM task_events.audit_log
WHERE event_id IN (SELECT event_id FROM task_events.events WHERE aggregate_id = :'wtask')
ORDER BY seq;
SELECT metric, value FROM task_events.analytics_counters WHERE user_id = 'wendy' ORDER BY metric;
SELECT completed FROM task_events.completion_stats WHERE user_id = 'wendy';
SELECT handler, events_behind FROM task_events.handler_status
WHERE handler IN ('analytics', 'audit', 'notification') ORDER BY handler;
SELECT events_behind FROM task_events.handler_backlog('audit');
SELECT count(*) > 0 AS has_rates FROM task_events.event_rates;
SELECT * FROM regress.error_of($$SELECT task_events.create_task('rita', 'by a reader')$$);
SELECT * FROM regress.error_of($$SELECT task_events.update_status('$$ || :'wtask' || $$', 'pending')$$);
SELECT * FROM regress.error_of($$SELECT task_events.complete_task('$$ || :'wtask' || $$')$$);
SELECT count(*) AS attempts, count(*) FILTER (WHERE sqlstate = '42501') AS refused
FROM regress.direct_writes();
SELECT * FROM regress.direct_writes() WHERE sqlstate <> '42501';
SELECT * FROM regress.admin_calls();
RESET ROLE;

-- Nobody: not even the schema.
SET ROLE regress_nobody;
SELECT * FROM regress.error_of($$SELECT * FROM task_events.tasks$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_task('nick', 'by nobody')$$);
SELECT * FROM regress.error_of($$SELECT * FROM task_events.task_history('$$ || :'wtask' || $$')$$);
SELECT * FROM regress.error_of($$SELECT * FROM task_events.handler_status$$);
SELECT relation, sqlstate FROM regress.reads() WHERE sqlstate <> '42501';
SELECT count(*) AS attempts, count(*) FILTER (WHERE sqlstate = '42501') AS refused
FROM regress.direct_writes();
SELECT * FROM regress.admin_calls();
RESET ROLE;

------------------------------------------------------------------------------
-- pg_temp comes last in the functions' search_path: a temporary type that
-- shadows pg_catalog.text (created by the caller, in a fresh session so that
-- no plan is cached yet) does not reach the write functions' queries.
------------------------------------------------------------------------------
SELECT current_user AS superuser \gset
SELECT task_id AS wtask2 FROM task_events.create_task('wendy', 'shadowed') \gset
\c - regress_writer
CREATE TEMP TABLE text (shadow int);
SELECT status, version FROM task_events.update_status(:'wtask2', 'in_progress');
SELECT count(*) AS history FROM task_events.task_history(:'wtask2');
DROP TABLE pg_temp.text;
\c - :superuser

------------------------------------------------------------------------------
-- Append-only against everyone.
------------------------------------------------------------------------------
-- A superuser, also under session_replication_role = replica (superusers
-- only), and with MERGE and INSERT ... ON CONFLICT DO UPDATE.
CREATE FUNCTION regress.append_only_attempts()
RETURNS TABLE (relation text, statement text, sqlstate text, message text) AS $$
	SELECT t, s.verb, e.sqlstate, e.message
	FROM unnest('{task_events.events,task_events.audit_log}'::text[]) AS t,
		 (VALUES (1, 'UPDATE', 'UPDATE %1$s SET event_id = event_id'),
				 (2, 'DELETE', 'DELETE FROM %1$s'),
				 (3, 'TRUNCATE', 'TRUNCATE %1$s'),
				 (4, 'MERGE', 'MERGE INTO %1$s t USING %1$s s ON s.event_id = t.event_id'
							  ' WHEN MATCHED THEN DELETE'),
				 (5, 'ON CONFLICT', 'INSERT INTO %1$s SELECT * FROM %1$s'
									' ON CONFLICT (event_id) DO UPDATE SET event_id = EXCLUDED.event_id'))
		AS s(n, verb, sql),
		 regress.error_of(format(s.sql, t)) AS e
	ORDER BY t, s.n
$$ LANGUAGE sql;
SELECT * FROM regress.row_counts() \gset before_
SELECT count(*) AS audit_rows FROM task_events.audit_log \gset before_
SELECT * FROM regress.append_only_attempts();
SET session_replication_role = replica;
SELECT relation, statement, sqlstate FROM regress.append_only_attempts();
RESET session_replication_role;

-- A table owner that is not a superuser (ownership given for one
-- transaction): refused as well, and it cannot set session_replication_role.
CREATE ROLE regress_owner;
BEGIN;
ALTER TABLE task_events.events OWNER TO regress_owner;
ALTER TABLE task_events.audit_log OWNER TO regress_owner;
GRANT USAGE ON SCHEMA task_events TO regress_owner;
SET ROLE regress_owner;
SELECT relation, statement, sqlstate FROM regress.append_only_attempts();
SELECT * FROM regress.error_of($$SET session_replication_role = replica$$);
RESET ROLE;
ROLLBACK;
DROP ROLE regress_owner;

SELECT tasks - :before_tasks AS new_tasks, events - :before_events AS new_events,
	   (SELECT count(*) FROM task_events.audit_log) - :before_audit_rows AS new_audit_rows
FROM regress.row_counts();

DROP FUNCTION regress.append_only_attempts(), regress.direct_writes(), regress.reads(),
	regress.admin_calls(), regress.privileges_of(name, regclass);
DROP ROLE regress_writer, regress_reader, regress_nobody;

-- Every object of the extension has a description (\df+, \dt+, \dT+ show
-- it): expected, none listed.
SELECT pg_describe_object(d.classid, d.objid, d.objsubid) AS without_comment
FROM pg_depend d
WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
  AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'task_events')
  AND obj_description(d.objid, d.classid::regclass::name) IS NULL
  AND NOT (d.classid = 'pg_type'::regclass
		   AND EXISTS (SELECT FROM pg_type t WHERE t.oid = d.objid AND (t.typrelid <> 0 OR t.typelem <> 0)))
ORDER BY 1;
SELECT obj_description('task_events'::regnamespace, 'pg_namespace') IS NOT NULL AS schema_has_comment;
