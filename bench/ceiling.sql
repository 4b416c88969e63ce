/*
 * ceiling.sql: tables for the two throughput ceilings, in schema ceiling.
 *
 * They are the extension's tables as task_events--1.0.sql creates them
 * (same columns, keys, defaults and indexes, xact_id included), so that the
 * ceiling scripts (ceiling_*.pgbench) write the very rows the extension
 * writes, with plain prepared INSERTs and UPDATEs: no function of the
 * contract, no trigger, no NOTIFY.
 */

CREATE SCHEMA ceiling;

CREATE TYPE ceiling.task_status AS ENUM ('pending', 'in_progress', 'completed', 'cancelled');

CREATE TABLE ceiling.tasks (
	task_id uuid PRIMARY KEY,
	user_id text NOT NULL,
	title text NOT NULL,
	description text,
	status ceiling.task_status NOT NULL,
	version bigint NOT NULL,
	created_at timestamptz NOT NULL,
	updated_at timestamptz NOT NULL,
	completed_at timestamptz
);

CREATE TABLE ceiling.events (
	seq bigserial PRIMARY KEY,
	event_id uuid UNIQUE NOT NULL,
	event_type text NOT NULL,
	event_version int NOT NULL,
	aggregate_id uuid NOT NULL,
	aggregate_version bigint NOT NULL,
	occurred_at timestamptz NOT NULL,
	user_id text,
	payload jsonb NOT NULL,
	xact_id xid8 NOT NULL DEFAULT pg_current_xact_id(),
	UNIQUE (aggregate_id, aggregate_version)
);
CREATE INDEX ON ceiling.events (xact_id);
CREATE INDEX ON ceiling.events USING brin (occurred_at);

CREATE TABLE ceiling.notifications (
	notification_id bigserial PRIMARY KEY,
	event_id uuid UNIQUE NOT NULL,
	user_id text NOT NULL,
	message text NOT NULL,
	created_at timestamptz NOT NULL
);

CREATE TABLE ceiling.analytics_counters (
	metric text,
	user_id text,
	value bigint NOT NULL,
	PRIMARY KEY (metric, user_id)
);

CREATE TABLE ceiling.completion_stats (
	user_id text PRIMARY KEY,
	completed bigint,
	total_seconds float8,
	min_seconds float8,
	max_seconds float8
);

CREATE TABLE ceiling.audit_log (
	event_id uuid PRIMARY KEY,
	seq bigint,
	event_type text,
	event_data jsonb,
	occurred_at timestamptz,
	recorded_at timestamptz
);
