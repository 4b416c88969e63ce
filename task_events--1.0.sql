/* task_events--1.0.sql: the task domain, its immutable event log and the write functions */

\echo Use "CREATE EXTENSION task_events" to load this file. \quit

CREATE TYPE task_events.task_status AS ENUM ('pending', 'in_progress', 'completed', 'cancelled');

/* Current state of each task: version is the aggregate_version of its latest event. */
CREATE TABLE task_events.tasks (
	task_id uuid PRIMARY KEY,
	user_id text NOT NULL,
	title text NOT NULL,
	description text,
	status task_events.task_status NOT NULL,
	version bigint NOT NULL,
	created_at timestamptz NOT NULL,
	updated_at timestamptz NOT NULL,
	completed_at timestamptz
);

CREATE SEQUENCE task_events.events_seq_seq AS bigint;

/*
 * The event log: append-only, one row per domain event.  xact_id records the
 * inserting transaction so that readers can tell which events a snapshot
 * already showed them (see README, "Commit-safe reading").
 */
CREATE TABLE task_events.events (
	seq bigint PRIMARY KEY DEFAULT nextval('task_events.events_seq_seq'),
	event_id uuid UNIQUE NOT NULL,
	event_type text NOT NULL,
	event_version int NOT NULL,
	aggregate_id uuid NOT NULL,
	aggregate_version bigint NOT NULL,
	occurred_at timestamptz NOT NULL,
	user_id text,
	payload jsonb NOT NULL,
	xact_id xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id(),
	UNIQUE (aggregate_id, aggregate_version)
);
ALTER SEQUENCE task_events.events_seq_seq OWNED BY task_events.events.seq;

SELECT pg_catalog.pg_extension_config_dump('task_events.tasks', '');
SELECT pg_catalog.pg_extension_config_dump('task_events.events', '');
SELECT pg_catalog.pg_extension_config_dump('task_events.events_seq_seq', '');

/* Refuses UPDATE, DELETE and TRUNCATE, for every role and replication mode. */
CREATE FUNCTION task_events.refuse_modification()
	RETURNS trigger
	AS 'MODULE_PATHNAME', 'refuse_modification'
	LANGUAGE C;

CREATE TRIGGER events_append_only
	BEFORE UPDATE OR DELETE OR TRUNCATE ON task_events.events
	FOR EACH STATEMENT EXECUTE FUNCTION task_events.refuse_modification();
ALTER TABLE task_events.events ENABLE ALWAYS TRIGGER events_append_only;

CREATE FUNCTION task_events.create_task(user_id text, title text, description text DEFAULT NULL)
	RETURNS task_events.tasks
	AS 'MODULE_PATHNAME', 'create_task'
	LANGUAGE C VOLATILE;

CREATE FUNCTION task_events.update_status(task_id uuid, new_status task_events.task_status,
										  expected_version bigint DEFAULT NULL)
	RETURNS task_events.tasks
	AS 'MODULE_PATHNAME', 'update_status'
	LANGUAGE C VOLATILE;

CREATE FUNCTION task_events.complete_task(task_id uuid, expected_version bigint DEFAULT NULL)
	RETURNS task_events.tasks
	AS 'MODULE_PATHNAME', 'complete_task'
	LANGUAGE C VOLATILE;

CREATE FUNCTION task_events.task_history(task_id uuid)
	RETURNS SETOF task_events.events
	AS 'MODULE_PATHNAME', 'task_history'
	LANGUAGE C STABLE;

COMMENT ON TABLE task_events.tasks IS 'Current state of each task; written only by the task_events functions';
COMMENT ON TABLE task_events.events IS 'Append-only log of domain events, one row per event';
