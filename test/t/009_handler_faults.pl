# Rules protected here: a resource error inside a built-in handler's batch
# (disk full, SQLSTATE 53100; out of memory, 53200) halfway through its
# multi-row INSERT
# - leaves nothing half-written: none of the failing event's rows, and the
#   events before it in the batch kept exactly once;
# - is retried (with backoff) and shown in handler_status (failed,
#   last_sqlstate), without holding up the other handlers;
# - once the fault is gone, the handler goes on and every handler's output is
#   exactly what the log implies, with no dead letter.
# The fault is injected by a trigger on task_events.audit_log that raises the
# error when the row of one chosen event is inserted (a real full disk or
# exhausted memory raise the same errors from inside the INSERT).
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

my $node = te_node(
	'faults',
	conf => "task_events.max_attempts = 1000\n"
	  . "task_events.retry_delay = 10ms\n"
	  . "task_events.poll_interval = 100ms");
wait_for_workers($node, 1);

$node->safe_psql(
	'postgres', q{
CREATE TABLE public.fault (seq bigint NOT NULL, sqlstate text NOT NULL, message text NOT NULL);
CREATE FUNCTION public.inject_fault() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
	f public.fault;
BEGIN
	SELECT * INTO f FROM public.fault WHERE seq OPERATOR(pg_catalog.=) NEW.seq;
	IF FOUND THEN
		RAISE EXCEPTION USING ERRCODE = f.sqlstate, MESSAGE = f.message;
	END IF;
	RETURN NEW;
END $$;
CREATE TRIGGER inject_fault BEFORE INSERT ON task_events.audit_log
	FOR EACH ROW EXECUTE FUNCTION public.inject_fault();
});

create_tasks($node, 10, 'before');
wait_caught_up($node);

# Ten new events in one batch of the audit handler: it is disabled while
# they are written, then enabled with the fault armed on the sixth.
$node->safe_psql('postgres',
	q{UPDATE task_events.handlers SET enabled = false WHERE handler = 'audit'});
my $first = $node->safe_psql('postgres', 'SELECT max(seq) + 1 FROM task_events.events');
create_tasks($node, 10, 'during');
my $faulty = $first + 5;
my $last = $node->safe_psql('postgres', 'SELECT max(seq) FROM task_events.events');

for my $fault ([ '53100', 'could not extend file: No space left on device' ],
	[ '53200', 'out of memory' ])
{
	my ($sqlstate, $message) = @$fault;
	$node->safe_psql(
		'postgres', qq{
		DELETE FROM public.fault;
		INSERT INTO public.fault VALUES ($faulty, '$sqlstate', '$message');
		UPDATE task_events.handlers SET enabled = true WHERE handler = 'audit';});
	ok( $node->poll_query_until(
			'postgres', qq{
			SELECT last_sqlstate = '$sqlstate' AND retry_attempts >= 2
			FROM task_events.handler_status WHERE handler = 'audit'}),
		"$sqlstate: the audit handler retries the event it failed on, and shows the error");
	is( $node->safe_psql(
			'postgres', qq{
			SELECT count(*) FILTER (WHERE seq >= $faulty) || '/' || count(*) FILTER (WHERE seq < $faulty)
			FROM task_events.audit_log WHERE seq >= $first}),
		'0/5',
		"$sqlstate: nothing of the failing event or after it is written; the five before it are, once");
	is( $node->safe_psql(
			'postgres', q{
			SELECT string_agg(handler || ' ' || events_behind, ', ' ORDER BY handler)
			FROM task_events.handler_status WHERE handler <> 'audit'}),
		'analytics 0, notification 0, relay 0',
		"$sqlstate: the other handlers are not held up");
}

is( $node->safe_psql(
		'postgres', q{SELECT failed >= 4 FROM task_events.handler_status WHERE handler = 'audit'}),
	't', 'handler_status counts the failed attempts');

$node->safe_psql('postgres', 'DELETE FROM public.fault');
wait_caught_up($node);
is( $node->safe_psql(
		'postgres', qq{SELECT count(*) FROM task_events.audit_log WHERE seq BETWEEN $first AND $last}),
	$last - $first + 1,
	'once the fault is gone, every event of the batch is audited exactly once');
# The audit handler's failed attempts are expected here: every other
# difference counts.
my @diff = grep { !/^handler_status: audit has events_behind 0, failed \d+, dead_letters 0 / }
  handler_mismatches($node);
is_deeply(\@diff, [], 'after the faults every handler output is exactly what the log implies');
is($node->safe_psql('postgres', 'SELECT count(*) FROM task_events.dead_letters'),
	0, 'no dead letter');

$node->stop;
done_testing();
