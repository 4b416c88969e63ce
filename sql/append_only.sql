-- The event log is append-only: UPDATE, DELETE and TRUNCATE are refused
-- for everyone, the table owner and superusers included, and also under
-- session_replication_role = replica.
SELECT task_id AS id FROM task_events.create_task('alice', 'Immutable') \gset
SELECT * FROM regress.row_counts() \gset before_

SELECT * FROM regress.error_of($$UPDATE task_events.events SET user_id = 'mallory'$$);
SELECT * FROM regress.error_of($$DELETE FROM task_events.events$$);
SELECT * FROM regress.error_of($$TRUNCATE task_events.events$$);
-- Refused even when no row matches.
SELECT * FROM regress.error_of($$DELETE FROM task_events.events WHERE false$$);

SET session_replication_role = replica;
SELECT * FROM regress.error_of($$UPDATE task_events.events SET payload = '{}'$$);
SELECT * FROM regress.error_of($$DELETE FROM task_events.events$$);
SELECT * FROM regress.error_of($$TRUNCATE task_events.events$$);
RESET session_replication_role;

-- A role granted every privilege on the table is refused all the same.
CREATE ROLE regress_event_editor;
GRANT USAGE ON SCHEMA task_events TO regress_event_editor;
GRANT ALL ON task_events.events TO regress_event_editor;
SET ROLE regress_event_editor;
SELECT * FROM regress.error_of($$UPDATE task_events.events SET user_id = 'mallory'$$);
SELECT * FROM regress.error_of($$DELETE FROM task_events.events$$);
SELECT * FROM regress.error_of($$TRUNCATE task_events.events$$);
RESET ROLE;
REVOKE ALL ON task_events.events FROM regress_event_editor;
REVOKE ALL ON SCHEMA task_events FROM regress_event_editor;
DROP ROLE regress_event_editor;

SELECT tasks - :before_tasks AS new_tasks, events - :before_events AS new_events
FROM regress.row_counts();
SELECT count(*) FROM task_events.events WHERE aggregate_id = :'id' AND user_id = 'alice';
