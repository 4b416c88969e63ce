# Rules protected here (handler lanes, set_handler_lanes): a handler in 4
# lanes, with 4 workers, under a write load,
# - is run by more than one worker at the same time (one per lane), which a
#   handler without lanes never is;
# - handles every event exactly once, and each task's events in seq order,
#   through a SIGKILL of a worker in one of its calls (crash restart) and
#   a change from 4 lanes to 2 while events flow (no event skipped or
#   repeated at the barrier);
# - counts the batch lost with the killed worker on the row of its lane
#   only (the other workers, ended by the crash restart, count nothing);
# - leaves the other handlers exact, and dead-letters nothing.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

my $node = te_node(
	'lanes',
	conf => "restart_after_crash = on\n"
	  . "max_connections = 40\n"
	  . "task_events.worker_count = 4\n"
	  . "task_events.batch_size = 20\n"
	  # A kill in a handler call counts an attempt: none may dead-letter.
	  . "task_events.max_attempts = 1000\n"
	  . "task_events.retry_delay = 10ms");
wait_for_workers($node, 4);

# The handler records each event it handles with its worker's pid and how
# many workers were running one of its lanes at that moment (itself
# included), and takes 1 ms per event.  At the events of a task titled
# 'block lanes' it waits while public.blocking has a row, and logs its pid.
$node->safe_psql(
	'postgres', q{
CREATE TABLE public.lanes_seen (
	n bigserial PRIMARY KEY,
	seq bigint NOT NULL,
	task uuid NOT NULL,
	pid int NOT NULL,
	running int NOT NULL
);
CREATE TABLE public.blocking (b int);
CREATE FUNCTION public.laned(events task_events.events[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
	e task_events.events;
	running int := (SELECT pg_catalog.count(*)::int FROM pg_catalog.pg_stat_activity a
					WHERE a.backend_type OPERATOR(pg_catalog.=) 'task_events worker'
					  AND a.state OPERATOR(pg_catalog.=) 'active'
					  AND a.query OPERATOR(pg_catalog.~~) 'handling events: laned%');
BEGIN
	FOREACH e IN ARRAY events LOOP
		IF e.payload OPERATOR(pg_catalog.->>) 'task_title' OPERATOR(pg_catalog.=) 'block lanes'
		   AND EXISTS (SELECT FROM public.blocking) THEN
			RAISE LOG 'te_test: deliberate SIGKILL to PID %', pg_catalog.pg_backend_pid();
			WHILE EXISTS (SELECT FROM public.blocking) LOOP
				PERFORM pg_catalog.pg_sleep(0.05);
			END LOOP;
		END IF;
		PERFORM pg_catalog.pg_sleep(0.001);
		INSERT INTO public.lanes_seen (seq, task, pid, running)
		VALUES (e.seq, e.aggregate_id, pg_catalog.pg_backend_pid(), running);
	END LOOP;
END $$;
SELECT task_events.register_handler('laned', 'public.laned(task_events.events[])');
SELECT task_events.set_handler_lanes('laned', 4);
});

sub seen
{
	return $node->safe_psql('postgres', 'SELECT count(*) FROM public.lanes_seen');
}

sub progress_past
{
	my ($n, $what) = @_;
	ok( $node->poll_query_until('postgres', "SELECT count(*) > $n FROM public.lanes_seen"),
		"the lanes make progress $what");
}

my $load = start_pgbench_loop($node, clients => 3, seconds => 2);
progress_past(300, 'under the load');

# SIGKILL a worker while it is in a call of the handler, in the lane of the
# task 'block lanes': the postmaster crash-restarts the server.
my $offset = log_position($node);
$node->safe_psql('postgres', 'INSERT INTO public.blocking VALUES (1)');
my $blocked_lane = $node->safe_psql('postgres',
	q{SELECT task_events._lane_of(task_id, 4) FROM task_events.create_task('alice', 'block lanes')});
$node->wait_for_log(qr/te_test: deliberate SIGKILL to PID \d+/, $offset);
my ($victim) = log_since($node, $offset) =~ /te_test: deliberate SIGKILL to PID (\d+)/;
$offset = log_position($node);
is(kill('KILL', $victim), 1, "SIGKILL sent to worker $victim, in a call of lane $blocked_lane");
ok( $node->poll_query_until(
		'postgres', qq{
		SELECT count(*) = 4 AND bool_and(pid <> $victim) FROM pg_stat_activity
		WHERE backend_type = 'task_events worker'}),
	'4 new workers run after the crash restart');
like(log_since($node, $offset), qr/all server processes terminated; reinitializing/,
	'the SIGKILL crash-restarted the server');
$node->safe_psql('postgres', 'DELETE FROM public.blocking');
ok( $node->poll_query_until(
		'postgres', q{
		SELECT string_agg(lane || ':' || failed || ':' || COALESCE(last_sqlstate, '-'), ',' ORDER BY lane)
		FROM task_events.handler_state WHERE handler = 'laned'},
		join(',', map { $_ == $blocked_lane ? "$_:1:58000" : "$_:0:-" } 0 .. 3)),
	"the lost batch was counted once, on the row of lane $blocked_lane only");
my $before = seen();
progress_past($before + 300, 'after the crash restart');

# From 4 lanes to 2 while the load goes on.
$node->safe_psql('postgres', q{SELECT task_events.set_handler_lanes('laned', 2)});
ok( $node->poll_query_until(
		'postgres', q{
		SELECT bool_and(lanes = 2 AND lanes_barrier IS NULL) FROM task_events.handler_state
		WHERE handler = 'laned'}),
	'every lane reached the barrier: the handler runs in 2 lanes');
my $switched_at = $node->safe_psql('postgres', 'SELECT max(n) FROM public.lanes_seen');
$before = seen();
progress_past($before + 300, 'in 2 lanes');

stop_pgbench($load);
wait_caught_up($node);

my ($seen, $distinct, $events) = split /\|/,
  $node->safe_psql('postgres',
	'SELECT (SELECT count(*) FROM public.lanes_seen), (SELECT count(DISTINCT seq) FROM public.lanes_seen),'
	  . ' (SELECT count(*) FROM task_events.events)');
note "events $events, handled $seen";
cmp_ok($events, '>', 1000, 'the load wrote events');
is($seen, $events, 'every event was handled once: as many calls as events');
is($distinct, $events, '... each event of the log among them');
is( $node->safe_psql(
		'postgres', q{
		SELECT count(*) FROM (
			SELECT task FROM public.lanes_seen GROUP BY task
			HAVING array_agg(seq ORDER BY n) <> array_agg(seq ORDER BY seq)) t}),
	'0',
	"each task's events were handled in seq order");
cmp_ok(
	$node->safe_psql('postgres', "SELECT max(running) FROM public.lanes_seen WHERE n <= $switched_at"),
	'>', 1, 'more than one worker ran the handler at the same time');
cmp_ok($node->safe_psql('postgres', 'SELECT count(DISTINCT pid) FROM public.lanes_seen'),
	'>', 1, 'more than one worker handled its events');
is( $node->safe_psql(
		'postgres', q{
		SELECT string_agg(lane || ':' || lanes || ':' || (lanes_barrier IS NULL)::int, ',' ORDER BY lane)
		FROM task_events.handler_state WHERE handler = 'laned'}),
	'0:2:1,1:2:1,2:2:1,3:2:1',
	'lanes 0 and 1 of 2 in effect; 2 and 3 retired');
is( $node->safe_psql(
		'postgres', q{SELECT lanes || ' ' || events_behind || ' ' || dead_letters
					  FROM task_events.handler_status WHERE handler = 'laned'}),
	'2 0 0',
	'handler_status: 2 lanes, nothing behind, no dead letter');
handlers_match_after_kills($node, 'the other handlers are exact');

$node->stop;
done_testing();
