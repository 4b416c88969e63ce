# Rules protected here: a handler whose function fails on an event, with any
# SQLSTATE, must not stop the other handlers nor make the worker exit; the
# event is retried and, after task_events.max_attempts, dead-lettered.
# The case here is SQLSTATE 57014 (query_canceled) raised from inside the
# handler function, as it comes when the handler calls another server
# (dblink, postgres_fdw) and the remote statement_timeout fires.  The worker
# itself was not cancelled.  The handler is named to sort before the
# built-in handlers, which a worker runs after it in each round.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

use TaskEventsTest;

my $node = te_node('canceled',
	conf => "task_events.max_attempts = 3\ntask_events.retry_delay = 20");
my ($pid) = wait_for_workers($node, 1);

# The handler pushes 'remote...' tasks to a "remote" server (this one, over
# dblink) whose statement_timeout is shorter than the remote statement.
my $remote = $node->connstr('postgres') . " options='-c statement_timeout=50'";
$remote =~ s/'/''/g;
$node->safe_psql(
	'postgres', qq{
CREATE EXTENSION dblink;
CREATE FUNCTION public.remote_push(events task_events.events[]) RETURNS void
LANGUAGE plpgsql AS \$\$
DECLARE
	e task_events.events;
BEGIN
	FOREACH e IN ARRAY events LOOP
		IF e.payload ->> 'task_title' LIKE 'remote%' THEN
			PERFORM public.dblink('$remote', 'SELECT pg_sleep(5)');
		END IF;
	END LOOP;
END \$\$;
INSERT INTO task_events.handlers (handler, function)
VALUES ('a_remote', 'public.remote_push(task_events.events[])');
});

create_tasks($node, 3, 'before');
create_tasks($node, 1, 'remote');
my $seq = $node->safe_psql('postgres',
	q{SELECT seq FROM task_events.events WHERE payload ->> 'task_title' = 'remote 1'});
create_tasks($node, 3, 'after');

# Poll until the built-in handlers have caught up, or until the worker has
# exited three times (it would go on restarting every second: no need to
# wait for the timeout to know).
my ($done, $exits) = (0, 0);
my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
while (time < $deadline)
{
	$done = $node->safe_psql(
		'postgres', q{
		SELECT bool_and(events_behind = 0) FROM task_events.handler_status
		WHERE handler IN ('analytics', 'audit', 'notification')}) eq 't';
	last if $done;
	$exits = () = log_since($node, 0) =~
	  /background worker "task_events worker" \(PID \d+\) exited with exit code/g;
	last if $exits >= 3;
	usleep(100_000);
}
note "the worker exited $exits times" if $exits;
unless (ok($done, 'the built-in handlers catch up while a_remote fails with 57014'))
{
	my @log = grep { /ERROR|exited/ } split /\n/, log_since($node, 0);
	splice(@log, 0, @log - 6) if @log > 6;
	diag $node->safe_psql('postgres',
		'SELECT handler, events_behind, failed, dead_letters, last_error FROM task_events.handler_status'
	), "\nlast lines of the log:\n", join("\n", @log);
}

SKIP:
{
	skip 'the built-in handlers did not catch up', 5 unless $done;
	handlers_match($node, 'the built-in handlers are exact');
	ok( $node->poll_query_until(
			'postgres', q{
			SELECT events_behind = 0 FROM task_events.handler_status WHERE handler = 'a_remote'}),
		'a_remote goes on past the failing event');
	is( $node->safe_psql(
			'postgres',
			q{SELECT seq, attempts, sqlstate FROM task_events.dead_letters WHERE handler = 'a_remote'}),
		"$seq|3|57014",
		'the event is dead-lettered after max_attempts, with SQLSTATE 57014');
	is_deeply([ worker_pids($node) ], [$pid], 'the worker was not restarted');
	my @exits = grep { /exited with exit code/ } split /\n/, log_since($node, 0);
	is_deeply(\@exits, [], 'no worker exit in the log');
}

$node->stop;
done_testing();
