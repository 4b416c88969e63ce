# Rules protected here: a handler that fails on one event (a "poison" event)
# - retries it with backoff up to task_events.max_attempts attempts, then
#   records it in task_events.dead_letters (handler, seq, event_id, attempts,
#   sqlstate, message) and moves on;
# - handles every other event exactly once, in seq order, and the later
#   events of the poison event's task only after it was dead-lettered
#   (per-task version order);
# - shows it in handler_status (failed counts the attempts, dead_letters,
#   last_error, last_sqlstate);
# - does not disturb the other handlers (exact comparison passes);
# and retry_dead_letters(handler) gives each dead letter one more attempt: a
# failing one goes back with attempts + 1, a succeeding one is removed and
# the event is handled once.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

my $node = te_node('poison');
wait_for_workers($node, 1);
$node->safe_psql(
	'postgres', q{
	ALTER SYSTEM SET task_events.max_attempts = 3;
	ALTER SYSTEM SET task_events.retry_delay = 20;
	SELECT pg_reload_conf();
});
# Once a new session sees the new values the postmaster has reloaded and
# signalled the worker, which rereads the file before its next round: the
# poison handler, registered below, is only ever run with the new values
# after its first attempt.
$node->poll_query_until('postgres',
	q{SELECT current_setting('task_events.max_attempts') || '/' || current_setting('task_events.retry_delay')},
	'3/20ms')
  or die 'the new settings were not loaded';

# Events from before the handler is registered: a new handler starts from
# the beginning of the log.
create_tasks($node, 5, 'early');

# The poison handler records every event it handles (n gives the order), and
# fails on the TaskCreated of a task titled 'poison...'.  For a later event of
# a poison task it records whether the TaskCreated was dead-lettered by then
# (the dead letter is written in the same transaction, before the handler
# goes on with the events after it).  The workers run with
# search_path = pg_catalog, pg_temp: every name is qualified.
my $POISON_FAILS = q{
CREATE OR REPLACE FUNCTION public.poison(events task_events.events[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
	e task_events.events;
BEGIN
	FOREACH e IN ARRAY events LOOP
		INSERT INTO public.poison_seen (seq, event_type, aggregate_id, aggregate_version, created_dead_lettered)
		VALUES (e.seq, e.event_type, e.aggregate_id, e.aggregate_version,
				EXISTS (SELECT FROM task_events.dead_letters d
						JOIN task_events.events c ON c.seq = d.seq
						WHERE d.handler = 'poison' AND c.aggregate_id = e.aggregate_id
						  AND c.aggregate_version = 1));
		IF e.event_type = 'TaskCreated' AND e.payload ->> 'task_title' LIKE 'poison%' THEN
			RAISE EXCEPTION USING ERRCODE = 'P0001',
				MESSAGE = format('poisoned event %s', e.seq);
		END IF;
	END LOOP;
END $$;
};
$node->safe_psql(
	'postgres', qq{
CREATE TABLE public.poison_seen (
	n bigserial PRIMARY KEY,
	seq bigint NOT NULL,
	event_type text NOT NULL,
	aggregate_id uuid NOT NULL,
	aggregate_version bigint NOT NULL,
	created_dead_lettered boolean NOT NULL);
$POISON_FAILS
INSERT INTO task_events.handlers (handler, function)
VALUES ('poison', 'public.poison(task_events.events[])');
});

create_tasks($node, 5, 'before');
# The poison task is created and started in one transaction, completed in
# the next: both later events come after the poison event.
my $poison_task = $node->safe_psql(
	'postgres', q{
	BEGIN;
	SELECT task_id FROM task_events.create_task('mallory', 'poison pill') \gset
	SELECT FROM task_events.update_status(:'task_id', 'in_progress');
	COMMIT;
	SELECT FROM task_events.complete_task(:'task_id');
	SELECT :'task_id';
});
create_tasks($node, 5, 'after');
my ($poison_seq, $poison_event_id) = split /\|/,
  $node->safe_psql('postgres',
	"SELECT seq, event_id FROM task_events.events WHERE aggregate_id = '$poison_task' AND aggregate_version = 1"
  );

ok( $node->poll_query_until(
		'postgres', q{
		SELECT dead_letters = 1 AND events_behind = 0
		FROM task_events.handler_status WHERE handler = 'poison'}),
	'the poison handler dead-letters one event and catches up');
is( $node->safe_psql(
		'postgres',
		q{SELECT seq, event_id, attempts, sqlstate, message, retry_requested
		  FROM task_events.dead_letters WHERE handler = 'poison'}),
	"$poison_seq|$poison_event_id|3|P0001|poisoned event $poison_seq|f",
	'the dead letter is the poison TaskCreated, after max_attempts = 3 attempts, with its SQLSTATE and message'
);

is( $node->safe_psql(
		'postgres', qq{
		SELECT count(*) FROM task_events.events e
		WHERE e.seq <> $poison_seq
		  AND (SELECT count(*) FROM public.poison_seen s WHERE s.seq = e.seq) <> 1}),
	0,
	'every other event was handled by the poison handler exactly once');
is( $node->safe_psql(
		'postgres',
		"SELECT count(*) FROM public.poison_seen WHERE seq = $poison_seq OR seq NOT IN (SELECT seq FROM task_events.events)"
	),
	0,
	'the poison event left no row (its attempts were rolled back)');
is( $node->safe_psql(
		'postgres', q{
		SELECT count(*) FROM (SELECT seq, lag(seq) OVER (ORDER BY n) AS prev
		                      FROM public.poison_seen) o
		WHERE seq <= prev}),
	0,
	'the poison handler handled the events in seq order');
is( $node->safe_psql(
		'postgres', qq{
		SELECT string_agg(aggregate_version || ':' || created_dead_lettered, ',' ORDER BY n)
		FROM public.poison_seen WHERE aggregate_id = '$poison_task'}),
	'2:true,3:true,4:true',
	'the poison task\'s later events were handled after the poison event was dead-lettered, in version order'
);

my ($failed, $dead, $last_error, $last_sqlstate) = split /\|/,
  $node->safe_psql('postgres',
	q{SELECT failed, dead_letters, last_error, last_sqlstate
	  FROM task_events.handler_status WHERE handler = 'poison'});
cmp_ok($failed, '>=', 3, "handler_status counts the failed attempts ($failed)");
is($dead, 1, 'handler_status shows one dead letter');
is($last_error, "poisoned event $poison_seq", 'handler_status shows the last error');
is($last_sqlstate, 'P0001', 'handler_status shows the last SQLSTATE');

wait_caught_up($node);
handlers_match($node, 'the built-in handlers are not disturbed by the poison handler');

# retry_dead_letters while the event still fails: one more attempt, back to
# the dead letters with attempts + 1.
is($node->safe_psql('postgres', q{SELECT task_events.retry_dead_letters('poison')}),
	1, 'retry_dead_letters queues the dead letter');
ok( $node->poll_query_until(
		'postgres', qq{
		SELECT attempts = 4 AND NOT retry_requested FROM task_events.dead_letters
		WHERE handler = 'poison' AND seq = $poison_seq}),
	'a retried dead letter that fails again goes back with attempts + 1');

# Make the handler succeed, retry: the dead letter goes, the event is handled once.
(my $poison_cured = $POISON_FAILS) =~ s/IF e\.event_type = 'TaskCreated'/IF false/;
$node->safe_psql('postgres', $poison_cured);
is($node->safe_psql('postgres', q{SELECT task_events.retry_dead_letters('poison')}),
	1, 'retry_dead_letters queues the dead letter again');
ok( $node->poll_query_until(
		'postgres',
		q{SELECT count(*) = 0 FROM task_events.dead_letters WHERE handler = 'poison'}),
	'the dead letter disappears once its retry succeeds');
# One more event through the handler, so that a second (wrong) retry of the
# dead letter would have happened by the time it is handled.
my $last_task = $node->safe_psql('postgres',
	q{SELECT task_id FROM task_events.create_task('alice', 'last')});
ok( $node->poll_query_until(
		'postgres',
		"SELECT EXISTS (SELECT FROM public.poison_seen WHERE aggregate_id = '$last_task')"),
	'the poison handler goes on with new events');
is($node->safe_psql('postgres', "SELECT count(*) FROM public.poison_seen WHERE seq = $poison_seq"),
	1, 'the retried event was handled exactly once');
is( $node->safe_psql(
		'postgres', q{
		SELECT count(*) FROM task_events.events e
		WHERE (SELECT count(*) FROM public.poison_seen s WHERE s.seq = e.seq) <> 1}),
	0,
	'in the end the poison handler handled every event exactly once');
is( $node->safe_psql(
		'postgres',
		q{SELECT dead_letters || '/' || events_behind FROM task_events.handler_status WHERE handler = 'poison'}),
	'0/0',
	'handler_status: no dead letter, nothing behind');

# Backoff: the delay before the next attempt is retry_delay, then doubles.
# Seen in the state the handler saves after each failed attempt (retry_at
# is computed just before last_error_at is stamped), not by measuring time.
$node->safe_psql('postgres', $POISON_FAILS);
$node->safe_psql('postgres',
	'ALTER SYSTEM SET task_events.retry_delay = 1000; SELECT pg_reload_conf()');
$node->poll_query_until('postgres', q{SELECT current_setting('task_events.retry_delay')}, '1s')
  or die 'retry_delay was not reloaded';
my $poison2 = $node->safe_psql('postgres',
	q{SELECT task_id FROM task_events.create_task('mallory', 'poison again')});
my $behind = $node->safe_psql('postgres',
	q{SELECT task_id FROM task_events.create_task('alice', 'behind the poison')});
for my $attempt (1, 2)
{
	ok( $node->poll_query_until(
			'postgres', qq{
			SELECT retry_attempts >= $attempt FROM task_events.handler_status
			WHERE handler = 'poison'}),
		"the poison handler is backing off after attempt $attempt");
	# The attempt count and the delay come from one row: on a slow machine
	# the handler may already be one attempt further than polled for.
	my ($seen, $ms) = split /\|/, $node->safe_psql(
		'postgres', q{
		SELECT retry_attempts, round(1000 * extract(epoch FROM retry_at - last_error_at))
		FROM task_events.handler_status WHERE handler = 'poison'});
	$seen ||= 3;    # already dead-lettered: checked below
	next if $seen == 3;
	my $delay = 1000 * 2**($seen - 1);
	ok($ms > 0.75 * $delay && $ms <= $delay + 1,
		"after attempt $seen the next attempt is due after about $delay ms ($ms ms)");
	is( $node->safe_psql(
			'postgres',
			"SELECT count(*) FROM public.poison_seen WHERE aggregate_id = '$behind'"),
		0,
		"after attempt $seen the events behind the failing one wait");
}
ok( $node->poll_query_until(
		'postgres', qq{
		SELECT EXISTS (SELECT FROM task_events.dead_letters d JOIN task_events.events e USING (seq)
		               WHERE d.handler = 'poison' AND e.aggregate_id = '$poison2' AND d.attempts = 3)
		   AND EXISTS (SELECT FROM public.poison_seen WHERE aggregate_id = '$behind')}),
	'after the third attempt the event is dead-lettered and the handler goes on');

wait_caught_up($node);
handlers_match($node, 'the built-in handlers are still exact');

$node->stop;
done_testing();
