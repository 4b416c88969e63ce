-- Bad input: the documented SQLSTATE, a message naming the offending
-- argument or value, and nothing written.
SELECT task_id AS id FROM task_events.create_task('alice', 'Existing') \gset
SELECT * FROM regress.row_counts() \gset before_

-- 22004: NULL user_id, title, task_id or new_status.
SELECT * FROM regress.error_of($$SELECT task_events.create_task(NULL, 'title')$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_task('alice', NULL)$$);
SELECT * FROM regress.error_of($$SELECT task_events.update_status(NULL, 'in_progress')$$);
SELECT * FROM regress.error_of(format('SELECT task_events.update_status(%L, NULL)', :'id'));
SELECT * FROM regress.error_of($$SELECT task_events.complete_task(NULL)$$);
SELECT * FROM regress.error_of($$SELECT * FROM task_events.task_history(NULL)$$);

-- 22023: user_id or title empty or only white space (ASCII or Unicode).
SELECT * FROM regress.error_of($$SELECT task_events.create_task('', 'title')$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_task('alice', '')$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_task('   ', 'title')$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_task('alice', E' \t\n\r ')$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_task('alice', U&'\00A0\3000\2003')$$);

-- 22001: too long, counted in characters: 201, 501 and 10001 characters.
SELECT * FROM regress.error_of($$SELECT task_events.create_task(repeat('u', 201), 'title')$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_task(repeat(U&'\+01F600', 201), 'title')$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_task('alice', repeat('t', 501))$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_task('alice', repeat(U&'\00E9', 501))$$);
SELECT * FROM regress.error_of($$SELECT task_events.create_task('alice', 'title', repeat('d', 10001))$$);

-- P0002: unknown task.
SELECT * FROM regress.error_of($$SELECT task_events.update_status('00000000-0000-0000-0000-000000000001', 'in_progress')$$);
SELECT * FROM regress.error_of($$SELECT task_events.complete_task('00000000-0000-0000-0000-000000000001')$$);
SELECT * FROM regress.error_of($$SELECT * FROM task_events.task_history('00000000-0000-0000-0000-000000000001')$$);

-- 40001: expected_version given and not the current version (which is 1);
-- checked before the transition itself.
SELECT * FROM regress.error_of(format('SELECT task_events.update_status(%L, %L, 2)', :'id', 'in_progress'));
SELECT * FROM regress.error_of(format('SELECT task_events.complete_task(%L, 0)', :'id'));
SELECT * FROM regress.error_of(format('SELECT task_events.update_status(%L, %L, 7)', :'id', 'pending'));

-- 55000: a transition not listed, including to the same status.
SELECT * FROM regress.error_of(format('SELECT task_events.update_status(%L, %L)', :'id', 'pending'));
SELECT status FROM task_events.complete_task(:'id');
SELECT * FROM regress.error_of(format('SELECT task_events.update_status(%L, %L)', :'id', 'in_progress'));
SELECT * FROM regress.error_of(format('SELECT task_events.complete_task(%L)', :'id'));

-- Nothing was written by any failed call: only the one successful
-- complete_task above added its two events.
SELECT tasks - :before_tasks AS new_tasks, events - :before_events AS new_events
FROM regress.row_counts();
SELECT status, version FROM task_events.tasks WHERE task_id = :'id';

-- A bad enum label is rejected by PostgreSQL itself before the call.
SELECT * FROM regress.error_of(format('SELECT task_events.update_status(%L, %L)', :'id', 'done'));

-- 22003: a version that cannot grow any more (only reachable by writing the
-- table directly): refused, nothing written, no wrap-around.
SELECT task_id AS maxed FROM task_events.create_task('alice', 'version at the limit') \gset
UPDATE task_events.tasks SET version = 9223372036854775806 WHERE task_id = :'maxed';
SELECT sqlstate, message
FROM regress.error_of(format('SELECT task_events.update_status(%L, %L)', :'maxed', 'in_progress'));
SELECT count(*) AS events_of_maxed FROM task_events.events WHERE aggregate_id = :'maxed';
