/*
 * subscriptions.sql: the subscriptions' SQL contract, as a client meets it.
 *
 * Rules protected (assertions are named after them):
 *   - the functions exist with the documented signatures and results, the
 *     consumer's run as their owner (SECURITY DEFINER), and the role
 *     task_events_consumer may call read_batch, ack_batch and nack_batch
 *     but not create_subscription or drop_subscription;
 *   - a transaction that commits late (after later events were delivered
 *     and acknowledged) is delivered in a later batch, never skipped;
 *   - an event of a rolled-back transaction is never delivered;
 *   - each task's events go to one lane, in version order;
 *   - acknowledging twice, an unknown subscription, an existing name, bad
 *     arguments: 55000, 42704, 42710, 22023, 22004.
 *
 * Writers are dblink connections that commit (or not) on their own; the
 * test's transaction is the consumer, reading with a fresh snapshot per
 * statement (read committed).
 */
BEGIN ISOLATION LEVEL READ COMMITTED;

SELECT plan(22);

CREATE FUNCTION pg_temp.connstr() RETURNS text LANGUAGE sql STABLE AS $$
	SELECT format('dbname=%L host=%L port=%s user=%L', current_database(),
		coalesce(nullif(trim(split_part(current_setting('unix_socket_directories'), ',', 1)), ''), 'localhost'),
		current_setting('port'), current_user)
$$;
SELECT dblink_connect('late', pg_temp.connstr()) \g /dev/null
SELECT dblink_connect('writer', pg_temp.connstr()) \g /dev/null

-- What the consumer received: every row of every batch, in arrival order.
CREATE TEMP TABLE delivered (ord serial, batch_id bigint, lane int, seq bigint,
							 aggregate_id uuid, aggregate_version bigint);

-- Read and acknowledge every ready batch; returns how many events came in all.
CREATE FUNCTION pg_temp.drain() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
	b bigint;
BEGIN
	LOOP
		WITH r AS (SELECT * FROM task_events.read_batch('pgtap_sub', 3)),
			 kept AS (INSERT INTO delivered (batch_id, lane, seq, aggregate_id, aggregate_version)
					  SELECT r.batch_id, r.lane, r.seq, r.aggregate_id, r.aggregate_version
					  FROM r ORDER BY r.seq)
		SELECT max(r.batch_id) INTO b FROM r;
		EXIT WHEN b IS NULL;
		PERFORM task_events.ack_batch('pgtap_sub', b);
	END LOOP;
	RETURN (SELECT count(*) FROM delivered);
END
$$;

-- The contract.
SELECT has_function('task_events', 'create_subscription', ARRAY['text', 'text[]', 'text', 'integer'],
	'create_subscription(subscription, event_types, start_at, lanes) exists');
SELECT has_function('task_events', 'read_batch', ARRAY['text', 'integer', 'interval'],
	'read_batch(subscription, max_events, lease) exists');
SELECT function_returns('task_events', 'ack_batch', ARRAY['text', 'bigint'], 'bigint',
	'ack_batch returns the number of events acknowledged (bigint)');
SELECT function_returns('task_events', 'nack_batch', ARRAY['text', 'bigint', 'uuid', 'text'], 'void',
	'nack_batch(subscription, batch_id, failed_event_id, error) returns void');
SELECT is(
	(SELECT string_agg(a.name || ' ' || format_type(a.type, NULL), ', ' ORDER BY a.ord)
	 FROM pg_proc p, unnest(p.proargnames, p.proallargtypes::oid[], p.proargmodes::text[])
		  WITH ORDINALITY AS a(name, type, mode, ord)
	 WHERE p.oid = 'task_events.read_batch(text, int, interval)'::regprocedure AND a.mode = 't'),
	'batch_id bigint, lane integer, seq bigint, event_id uuid, event_type text, event_version integer, '
	'aggregate_id uuid, aggregate_version bigint, occurred_at timestamp with time zone, user_id text, payload jsonb',
	'read_batch returns the documented columns, in order');
SELECT ok((SELECT bool_and(prosecdef) FROM pg_proc
		   WHERE oid IN ('task_events.read_batch(text, int, interval)'::regprocedure,
						 'task_events.ack_batch(text, bigint)'::regprocedure,
						 'task_events.nack_batch(text, bigint, uuid, text)'::regprocedure)),
	'the consumer''s functions run as their owner (SECURITY DEFINER)');
SELECT ok(has_function_privilege('task_events_consumer', 'task_events.read_batch(text, int, interval)', 'EXECUTE')
	  AND has_function_privilege('task_events_consumer', 'task_events.ack_batch(text, bigint)', 'EXECUTE')
	  AND has_function_privilege('task_events_consumer', 'task_events.nack_batch(text, bigint, uuid, text)', 'EXECUTE'),
	'task_events_consumer may read, acknowledge and nack');
SELECT ok(NOT has_function_privilege('task_events_consumer', 'task_events.create_subscription(text, text[], text, int)', 'EXECUTE')
	  AND NOT has_function_privilege('task_events_consumer', 'task_events.drop_subscription(text)', 'EXECUTE'),
	'task_events_consumer may not create or drop subscriptions');

SELECT lives_ok($$SELECT task_events.create_subscription('pgtap_sub', NULL, 'now', 3)$$,
	'a subscription with three lanes, from now');

-- A transaction that will commit late holds an event with a low seq.
SELECT dblink_exec('late', 'BEGIN') \g /dev/null
SELECT * FROM dblink('late', $$SELECT (task_events.create_task('lena', 'late')).task_id$$) AS t(id uuid) \g /dev/null
SELECT * FROM dblink('writer', $$SELECT count(task_events.create_task('walt', 'early ' || i)) FROM generate_series(1, 5) i$$)
	AS t(n bigint) \g /dev/null
SELECT is(pg_temp.drain(), 5::bigint, 'the committed events are delivered; the late transaction''s is not yet');
SELECT dblink_exec('late', 'COMMIT') \g /dev/null
SELECT is(pg_temp.drain(), 6::bigint, 'once it commits, the late transaction''s event is delivered in a later batch');
SELECT ok((SELECT d.seq < (SELECT max(x.seq) FROM delivered x WHERE x.ord < d.ord)
		   FROM delivered d ORDER BY d.ord DESC LIMIT 1),
	'... with a seq lower than events delivered before it: never skipped');

-- A rolled-back transaction: never delivered.
SELECT dblink_exec('writer', 'BEGIN') \g /dev/null
SELECT * FROM dblink('writer', $$SELECT (task_events.create_task('rolf', 'rolled back')).task_id$$) AS t(id uuid) \g /dev/null
SELECT dblink_exec('writer', 'ROLLBACK') \g /dev/null
SELECT * FROM dblink('writer', $$SELECT (task_events.create_task('walt', 'after the rollback')).task_id$$)
	AS t(id uuid) \g /dev/null
SELECT is(pg_temp.drain(), 7::bigint, 'after a rollback, only the committed event is delivered');
SELECT is((SELECT count(*) FROM delivered d JOIN task_events.events e USING (seq)
		   WHERE e.user_id = 'rolf'), 0::bigint, 'no event of the rolled-back transaction was delivered');

-- Each task's events: one lane, in version order.
SELECT * FROM dblink('writer', $$SELECT count(task_events.complete_task(t.task_id))
								FROM task_events.tasks t WHERE t.user_id = 'walt'$$) AS t(n bigint) \g /dev/null
SELECT cmp_ok(pg_temp.drain(), '>', 7::bigint, 'the completions are delivered');
SELECT is((SELECT count(*) FROM (SELECT aggregate_id FROM delivered GROUP BY aggregate_id
								 HAVING count(DISTINCT lane) > 1) x), 0::bigint,
	'each task''s events came from one lane');
SELECT is((SELECT count(*) FROM delivered d JOIN delivered p
		   ON p.aggregate_id = d.aggregate_id AND p.ord < d.ord AND p.aggregate_version >= d.aggregate_version),
	0::bigint, 'each task''s events came in version order');

-- Errors.
SELECT throws_ok($$SELECT task_events.ack_batch('pgtap_sub', (SELECT max(batch_id) FROM delivered))$$,
	'55000', NULL, 'acknowledging a batch twice: 55000');
SELECT throws_ok($$SELECT * FROM task_events.read_batch('no_such_sub')$$,
	'42704', NULL, 'an unknown subscription: 42704');
SELECT throws_ok($$SELECT task_events.create_subscription('pgtap_sub')$$,
	'42710', NULL, 'an existing name: 42710');
SELECT throws_ok($$SELECT task_events.create_subscription('other_sub', lanes => 65)$$,
	'22023', NULL, 'lanes outside 1..64: 22023');
SELECT throws_ok($$SELECT * FROM task_events.read_batch('pgtap_sub', NULL)$$,
	'22004', NULL, 'a NULL max_events: 22004');

SELECT * FROM finish();
ROLLBACK;
