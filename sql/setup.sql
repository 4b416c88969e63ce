-- Installs the extension and the helpers the other regression files share.
CREATE EXTENSION task_events;
-- Without NOTIFY-checking clients pg_regress cannot observe the relay
-- handler (test/pgtap/relay.sql does); removed here so that the handler
-- counts below are those of the handlers with visible outputs.
DELETE FROM task_events.handlers WHERE handler = 'relay';
CREATE SCHEMA regress;
GRANT USAGE ON SCHEMA regress TO PUBLIC;

-- Runs a statement that must fail and returns what a client sees, with
-- uuids masked so that the expected output is stable.
CREATE FUNCTION regress.error_of(stmt text,
	OUT sqlstate text, OUT message text, OUT detail text, OUT hint text)
AS $$
DECLARE
	state text;
BEGIN
	EXECUTE stmt;
	error_of.sqlstate := 'no error';
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT,
		detail = PG_EXCEPTION_DETAIL, hint = PG_EXCEPTION_HINT;
	error_of.sqlstate := state;
	message := regexp_replace(message,
		'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', '<uuid>', 'g');
END
$$ LANGUAGE plpgsql;

-- Row counts of the extension's tables: a failed call must leave them as they were.
CREATE FUNCTION regress.row_counts(OUT tasks bigint, OUT events bigint)
AS $$
	SELECT (SELECT count(*) FROM task_events.tasks), (SELECT count(*) FROM task_events.events)
$$ LANGUAGE sql;
