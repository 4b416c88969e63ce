/*
 * plpgsql_baseline.sql: the task_events contract written the way a user
 * would write it without the extension, as the benchmark's baseline.
 *
 * Same tables (less the extension's xact_id column and its indexes, which
 * only its background workers need), same functions with the same
 * arguments, validations, SQLSTATEs and messages, the same JSON envelope
 * sent with pg_notify() on channel task_events at commit, and the same
 * handlers, as AFTER INSERT triggers on the event table that write the
 * same rows in the writer's transaction: audit_log, notifications,
 * analytics_counters and completion_stats.
 *
 * Setting plpgsql_impl.notify = off (e.g. PGOPTIONS='-c
 * plpgsql_impl.notify=off') skips the pg_notify(): the "no NOTIFY" variant.
 * Ids are gen_random_uuid() (version 4): PostgreSQL 15 has no v7 generator.
 *
 * Everything lives in schema plpgsql_impl; the pgbench scripts reach it with
 * search_path = plpgsql_impl, exactly as they reach the extension with
 * search_path = task_events.
 */

CREATE SCHEMA plpgsql_impl;

CREATE TYPE plpgsql_impl.task_status AS ENUM ('pending', 'in_progress', 'completed', 'cancelled');

CREATE TABLE plpgsql_impl.tasks (
	task_id uuid PRIMARY KEY,
	user_id text NOT NULL,
	title text NOT NULL,
	description text,
	status plpgsql_impl.task_status NOT NULL,
	version bigint NOT NULL,
	created_at timestamptz NOT NULL,
	updated_at timestamptz NOT NULL,
	completed_at timestamptz
);

CREATE TABLE plpgsql_impl.events (
	seq bigserial PRIMARY KEY,
	event_id uuid UNIQUE NOT NULL,
	event_type text NOT NULL,
	event_version int NOT NULL,
	aggregate_id uuid NOT NULL,
	aggregate_version bigint NOT NULL,
	occurred_at timestamptz NOT NULL,
	user_id text,
	payload jsonb NOT NULL,
	UNIQUE (aggregate_id, aggregate_version)
);

CREATE TABLE plpgsql_impl.notifications (
	notification_id bigserial PRIMARY KEY,
	event_id uuid UNIQUE NOT NULL,
	user_id text NOT NULL,
	message text NOT NULL,
	created_at timestamptz NOT NULL
);

CREATE TABLE plpgsql_impl.analytics_counters (
	metric text,
	user_id text,
	value bigint NOT NULL,
	PRIMARY KEY (metric, user_id)
);

CREATE TABLE plpgsql_impl.completion_stats (
	user_id text PRIMARY KEY,
	completed bigint,
	total_seconds float8,
	min_seconds float8,
	max_seconds float8
);

CREATE TABLE plpgsql_impl.audit_log (
	event_id uuid PRIMARY KEY,
	seq bigint,
	event_type text,
	event_data jsonb,
	occurred_at timestamptz,
	recorded_at timestamptz
);

/* ISO 8601 in UTC, like the extension's payload timestamps. */
CREATE FUNCTION plpgsql_impl.iso8601(at timestamptz) RETURNS text
	LANGUAGE sql IMMUTABLE STRICT
	RETURN to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"');

/*
 * The argument checks: NULL 22004, empty or only white space (ASCII or
 * Unicode) 22023, too long 22001.
 */
CREATE FUNCTION plpgsql_impl.check_text(value text, name text, max_chars int, required boolean)
	RETURNS void
	LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
	blanks CONSTANT text := E' \t\n\r\f' || chr(11) || chr(133) || chr(160) || chr(5760)
		|| chr(8192) || chr(8193) || chr(8194) || chr(8195) || chr(8196) || chr(8197)
		|| chr(8198) || chr(8199) || chr(8200) || chr(8201) || chr(8202) || chr(8203)
		|| chr(8232) || chr(8233) || chr(8239) || chr(8287) || chr(12288) || chr(65279);
	n int;
BEGIN
	IF value IS NULL THEN
		IF required THEN
			RAISE EXCEPTION '% must not be null', name USING ERRCODE = '22004';
		END IF;
		RETURN;
	END IF;
	IF required AND btrim(value, blanks) = '' THEN
		IF value = '' THEN
			RAISE EXCEPTION '% must not be empty', name USING ERRCODE = '22023';
		END IF;
		RAISE EXCEPTION '% must not be empty', name USING ERRCODE = '22023',
			DETAIL = format('The %s given, "%s", holds only white space.', name, value);
	END IF;
	n := length(value);
	IF n > max_chars THEN
		RAISE EXCEPTION '% is too long (% characters)', name, n USING ERRCODE = '22001',
			DETAIL = format('The maximum length of %s is %s characters.', name, max_chars);
	END IF;
END
$$;

/*
 * Append one event of task t and publish it at commit (unless
 * plpgsql_impl.notify = off).  The AFTER INSERT triggers below run the
 * handlers.
 */
CREATE FUNCTION plpgsql_impl.append_event(event_type text, t plpgsql_impl.tasks,
										  version bigint, at timestamptz, extra jsonb)
	RETURNS void
	LANGUAGE plpgsql AS $$
DECLARE
	new_event_id uuid := gen_random_uuid();
	stamp text := plpgsql_impl.iso8601(at);
	body jsonb;
	new_seq bigint;
BEGIN
	body := jsonb_build_object('event_id', new_event_id, 'timestamp', stamp,
							   'aggregate_id', t.task_id, 'event_version', 1) || extra;
	INSERT INTO plpgsql_impl.events
		(event_id, event_type, event_version, aggregate_id, aggregate_version,
		 occurred_at, user_id, payload)
	VALUES (new_event_id, append_event.event_type, 1, t.task_id, version, at, t.user_id, body)
	RETURNING seq INTO new_seq;

	IF coalesce(current_setting('plpgsql_impl.notify', true), '') <> 'off' THEN
		PERFORM pg_notify('task_events',
						  json_build_object('event_type', append_event.event_type,
											'event_data', body, 'timestamp', stamp,
											'seq', new_seq)::text);
	END IF;
END
$$;

CREATE FUNCTION plpgsql_impl.create_task(user_id text, title text, description text DEFAULT NULL)
	RETURNS plpgsql_impl.tasks
	LANGUAGE plpgsql AS $$
DECLARE
	now timestamptz := clock_timestamp();
	t plpgsql_impl.tasks;
BEGIN
	PERFORM plpgsql_impl.check_text(create_task.user_id, 'user_id', 200, true);
	PERFORM plpgsql_impl.check_text(create_task.title, 'title', 500, true);
	PERFORM plpgsql_impl.check_text(create_task.description, 'description', 10000, false);

	INSERT INTO plpgsql_impl.tasks
		(task_id, user_id, title, description, status, version, created_at, updated_at)
	VALUES (gen_random_uuid(), create_task.user_id, create_task.title,
			create_task.description, 'pending', 1, now, now)
	RETURNING * INTO t;

	PERFORM plpgsql_impl.append_event('TaskCreated', t, 1, now,
		jsonb_build_object('task_title', t.title, 'user_id', t.user_id));
	RETURN t;
END
$$;

CREATE FUNCTION plpgsql_impl.update_status(task_id uuid, new_status plpgsql_impl.task_status,
										   expected_version bigint DEFAULT NULL)
	RETURNS plpgsql_impl.tasks
	LANGUAGE plpgsql AS $$
DECLARE
	now timestamptz := clock_timestamp();
	t plpgsql_impl.tasks;
	old_status plpgsql_impl.task_status;
	v bigint;
BEGIN
	IF update_status.task_id IS NULL THEN
		RAISE EXCEPTION 'task_id must not be null' USING ERRCODE = '22004';
	END IF;
	IF new_status IS NULL THEN
		RAISE EXCEPTION 'new_status must not be null' USING ERRCODE = '22004';
	END IF;

	SELECT * INTO t FROM plpgsql_impl.tasks AS k
	WHERE k.task_id = update_status.task_id FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'task % does not exist', update_status.task_id USING ERRCODE = 'P0002';
	END IF;
	IF expected_version IS NOT NULL AND expected_version <> t.version THEN
		RAISE EXCEPTION 'task % is at version %, not the expected version %',
			t.task_id, t.version, expected_version
			USING ERRCODE = '40001', HINT = 'Read the task again and retry with its current version.';
	END IF;
	old_status := t.status;
	IF old_status IN ('completed', 'cancelled') OR old_status = new_status THEN
		RAISE EXCEPTION 'cannot change task % from status "%" to "%"', t.task_id, old_status, new_status
			USING ERRCODE = '55000',
			DETAIL = CASE WHEN old_status = new_status
						  THEN format('The task is already in status "%s".', old_status)
						  ELSE format('Status "%s" is final.', old_status) END;
	END IF;

	v := t.version + 1;
	PERFORM plpgsql_impl.append_event('TaskStatusChanged', t, v, now,
		jsonb_build_object('old_status', old_status, 'new_status', new_status,
						   'task_title', t.title));
	IF new_status = 'completed' THEN
		v := v + 1;
		PERFORM plpgsql_impl.append_event('TaskCompleted', t, v, now,
			jsonb_build_object('task_title', t.title, 'user_id', t.user_id,
							   'completed_at', plpgsql_impl.iso8601(now)));
	END IF;

	UPDATE plpgsql_impl.tasks AS k
	SET status = new_status, version = v, updated_at = now,
		completed_at = CASE WHEN new_status = 'completed' THEN now END
	WHERE k.task_id = t.task_id
	RETURNING * INTO t;
	RETURN t;
END
$$;

CREATE FUNCTION plpgsql_impl.complete_task(task_id uuid, expected_version bigint DEFAULT NULL)
	RETURNS plpgsql_impl.tasks
	LANGUAGE plpgsql AS $$
BEGIN
	IF complete_task.task_id IS NULL THEN
		RAISE EXCEPTION 'task_id must not be null' USING ERRCODE = '22004';
	END IF;
	RETURN plpgsql_impl.update_status(complete_task.task_id, 'completed', expected_version);
END
$$;

/* The three handlers, as row triggers on the event table. */
CREATE FUNCTION plpgsql_impl.audit_trigger() RETURNS trigger
	LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO plpgsql_impl.audit_log (event_id, seq, event_type, event_data, occurred_at, recorded_at)
	VALUES (NEW.event_id, NEW.seq, NEW.event_type, NEW.payload, NEW.occurred_at, clock_timestamp());
	RETURN NULL;
END
$$;

CREATE FUNCTION plpgsql_impl.notification_trigger() RETURNS trigger
	LANGUAGE plpgsql AS $$
BEGIN
	IF NEW.event_type = 'TaskCreated' THEN
		INSERT INTO plpgsql_impl.notifications (event_id, user_id, message, created_at)
		VALUES (NEW.event_id, NEW.user_id, 'New task created: ' || (NEW.payload ->> 'task_title'),
				clock_timestamp());
	ELSIF NEW.event_type = 'TaskCompleted' THEN
		INSERT INTO plpgsql_impl.notifications (event_id, user_id, message, created_at)
		VALUES (NEW.event_id, NEW.user_id,
				'Congratulations! Task completed: ' || (NEW.payload ->> 'task_title'),
				clock_timestamp());
	END IF;
	RETURN NULL;
END
$$;

CREATE FUNCTION plpgsql_impl.analytics_trigger() RETURNS trigger
	LANGUAGE plpgsql AS $$
DECLARE
	seconds float8;
BEGIN
	IF NEW.event_type = 'TaskCreated' THEN
		INSERT INTO plpgsql_impl.analytics_counters AS c (metric, user_id, value)
		VALUES ('tasks_created', NEW.user_id, 1)
		ON CONFLICT (metric, user_id) DO UPDATE SET value = c.value + 1;
	ELSIF NEW.event_type = 'TaskCompleted' THEN
		INSERT INTO plpgsql_impl.analytics_counters AS c (metric, user_id, value)
		VALUES ('tasks_completed', NEW.user_id, 1)
		ON CONFLICT (metric, user_id) DO UPDATE SET value = c.value + 1;

		SELECT date_part('epoch', NEW.occurred_at - c.occurred_at) INTO seconds
		FROM plpgsql_impl.events AS c
		WHERE c.aggregate_id = NEW.aggregate_id AND c.aggregate_version = 1;
		INSERT INTO plpgsql_impl.completion_stats AS s
			(user_id, completed, total_seconds, min_seconds, max_seconds)
		VALUES (NEW.user_id, 1, seconds, seconds, seconds)
		ON CONFLICT (user_id) DO UPDATE SET
			completed = s.completed + 1,
			total_seconds = s.total_seconds + EXCLUDED.total_seconds,
			min_seconds = LEAST(s.min_seconds, EXCLUDED.min_seconds),
			max_seconds = GREATEST(s.max_seconds, EXCLUDED.max_seconds);
	END IF;
	RETURN NULL;
END
$$;

CREATE TRIGGER audit AFTER INSERT ON plpgsql_impl.events
	FOR EACH ROW EXECUTE FUNCTION plpgsql_impl.audit_trigger();
CREATE TRIGGER notification AFTER INSERT ON plpgsql_impl.events
	FOR EACH ROW EXECUTE FUNCTION plpgsql_impl.notification_trigger();
CREATE TRIGGER analytics AFTER INSERT ON plpgsql_impl.events
	FOR EACH ROW EXECUTE FUNCTION plpgsql_impl.analytics_trigger();
