-- The handler registry accepts only functions that take
-- task_events.events[] and return void (42P13 otherwise), on INSERT and
-- when a handler's function is changed.
CREATE FUNCTION regress.good_handler(events task_events.events[]) RETURNS void
	LANGUAGE sql AS $$ SELECT $$;
CREATE FUNCTION regress.two_args(events task_events.events[], extra int) RETURNS void
	LANGUAGE sql AS $$ SELECT $$;
CREATE FUNCTION regress.returns_int(events task_events.events[]) RETURNS int
	LANGUAGE sql AS $$ SELECT 1 $$;
CREATE PROCEDURE regress.a_procedure(events task_events.events[])
	LANGUAGE sql AS $$ SELECT $$;

SELECT * FROM regress.error_of($$INSERT INTO task_events.handlers (handler, function)
	VALUES ('bad', 'pg_catalog.textcat(text, text)')$$);
SELECT * FROM regress.error_of($$INSERT INTO task_events.handlers (handler, function)
	VALUES ('bad', 'pg_catalog.jsonb_pretty(jsonb)')$$);
SELECT * FROM regress.error_of($$INSERT INTO task_events.handlers (handler, function)
	VALUES ('bad', 'regress.two_args(task_events.events[], int)')$$);
SELECT * FROM regress.error_of($$INSERT INTO task_events.handlers (handler, function)
	VALUES ('bad', 'regress.returns_int(task_events.events[])')$$);
SELECT * FROM regress.error_of($$INSERT INTO task_events.handlers (handler, function)
	VALUES ('bad', 'regress.a_procedure(task_events.events[])')$$);
-- Handler names are lower-case identifiers.
SELECT * FROM regress.error_of($$INSERT INTO task_events.handlers (handler, function)
	VALUES ('Bad Name', 'regress.good_handler(task_events.events[])')$$);

INSERT INTO task_events.handlers (handler, function)
	VALUES ('good', 'regress.good_handler(task_events.events[])');
SELECT * FROM regress.error_of($$UPDATE task_events.handlers
	SET function = 'regress.returns_int(task_events.events[])' WHERE handler = 'good'$$);
SELECT handler, function, enabled FROM task_events.handlers WHERE handler IN ('good', 'bad');
DELETE FROM task_events.handlers WHERE handler = 'good';
