# Rules protected here: no state of the database or the settings makes the
# task_events workers fail in a loop; they wait quietly and resume.
# - DROP EXTENSION task_events while the workers are busy: the DROP completes
#   (it waits for at most the batch in progress), no error in the log, the
#   workers are not restarted; after CREATE EXTENSION new events are handled,
#   exactly.
# - task_events.database names a database that does not exist at server
#   start: one FATAL from the first connection attempt, then ONE clear LOG
#   line, and the worker waits (no restart); once the database and the
#   extension are created, events are handled.
# - DROP DATABASE of the workers' database: refused without FORCE (a
#   background worker is connected and PostgreSQL 15 cannot ask it to
#   leave); WITH (FORCE) works, and the worker then waits quietly as above;
#   CREATE DATABASE + CREATE EXTENSION again and events are handled.
# - task_events.worker_role: the workers connect as that role and run the
#   handlers as it, with an empty search_path; a role that does not exist
#   yet, or cannot log in, is waited for (one LOG line each); a role that
#   lacks privileges gets
#   "permission denied" logged with a growing delay, without the worker
#   exiting; once the documented privileges are granted, every handler is
#   exact.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

my $BAD = qr/\b(ERROR|FATAL|PANIC):|exited with exit code/;

# Tasks in several states, in database db.
sub writes
{
	my ($node, $db, $tag) = @_;
	$node->safe_psql(
		$db, qq{
		SELECT FROM generate_series(1, 20) i, task_events.create_task('user' || i % 3, '$tag ' || i);
		SELECT FROM task_events.tasks t, task_events.complete_task(t.task_id)
		  WHERE t.status = 'pending' AND t.title LIKE '$tag %5';
		SELECT FROM task_events.tasks t, task_events.update_status(t.task_id, 'in_progress')
		  WHERE t.status = 'pending' AND t.title LIKE '$tag %7';});
	return;
}

###
### DROP EXTENSION while the workers are busy.
###
my $node = te_node(
	'drop_extension',
	conf => "task_events.worker_count = 2\n"
	  . "task_events.poll_interval = 100ms\n"
	  . "task_events.batch_size = 5");
my @pids = wait_for_workers($node, 2);

# A handler that takes a while per batch, so that the workers are inside a
# batch when the DROP comes.
my $SLOW = q{
CREATE FUNCTION public.slow(events task_events.events[]) RETURNS void
LANGUAGE sql AS $$ SELECT pg_catalog.pg_sleep(0.02) $$;
INSERT INTO task_events.handlers (handler, function) VALUES ('slow', 'public.slow(task_events.events[])');
};

for my $round (1 .. 3)
{
	$node->safe_psql('postgres', 'CREATE EXTENSION task_events') if $round > 1;
	$node->safe_psql('postgres', $SLOW);
	my $offset = log_position($node);
	$node->safe_psql('postgres',
		"SELECT FROM generate_series(1, 300) i, task_events.create_task('u' || i % 7, 'busy $round ' || i)"
	);
	$node->poll_query_until('postgres',
		q{SELECT processed > 0 FROM task_events.handler_status WHERE handler = 'slow'})
	  or die 'the slow handler never ran';
	# The handler's function depends on the extension's type: CASCADE.
	my ($ret, $out, $err) = $node->psql(
		'postgres', 'DROP EXTENSION task_events CASCADE',
		extra_params => [ '-v', 'ON_ERROR_STOP=1' ],
		on_error_die => 0,
		timeout => 120);
	is($ret, 0, "round $round: DROP EXTENSION completes while the workers are busy");
	note $err if $ret;
	my @now = worker_loops_quietly($node, 2, 500, "round $round, after the DROP");
	is_deeply(\@now, \@pids, "round $round: the workers were not restarted");
	is_deeply([ log_grep($node, $offset, $BAD) ], [], "round $round: no error in the log");
}

$node->safe_psql('postgres', 'CREATE EXTENSION task_events');
writes($node, 'postgres', 'after');
wait_caught_up($node);
handlers_match($node, 'after CREATE EXTENSION again: handlers exact');
is_deeply([ worker_pids($node) ], \@pids, 'the same two workers handled them');
$node->stop;

###
### task_events.database missing at start; DROP DATABASE with and without FORCE.
###
$node = te_node(
	'drop_database',
	extension => 0,
	conf => "task_events.database = 'app'\ntask_events.poll_interval = 100ms");

my $WAITING = qr/LOG:  task_events worker 1: database "app" does not exist; waiting for it to be created/;
ok($node->wait_for_log($WAITING, 0), 'missing database at start: the worker logs that it waits for it');
my @waiting = worker_pids($node);
is( $node->safe_psql(
		'postgres',
		"SELECT coalesce(datname, '(none)') || ' ' || query FROM pg_stat_activity WHERE pid = $waiting[0]"),
	'(none) waiting until database "app" can be connected to',
	'the waiting worker is connected to no database and says what it waits for');
is_deeply([ worker_loops_quietly($node, 1, 700, 'waiting for app') ],
	\@waiting, 'the waiting worker is not restarted');
my @fatal = log_grep($node, 0, qr/FATAL:/);
is(scalar(@fatal), 1, 'one FATAL only, from the first connection attempt');
like($fatal[0] // '', qr/database "app" does not exist/, '... which says the database does not exist');
is(scalar(log_grep($node, 0, $WAITING)), 1, 'the waiting line is logged once');
like(
	log_since($node, 0),
	qr/$WAITING.*\n.*HINT:  Create the database, or set task_events.database/,
	'... with a hint naming task_events.database');

my $offset = log_position($node);
$node->safe_psql('postgres', 'CREATE DATABASE app');
$node->poll_query_until('postgres',
	"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'task_events worker' AND datname = 'app'",
	1)
  or die 'the worker did not connect to app';
$node->safe_psql('app', 'CREATE EXTENSION task_events');
writes($node, 'app', 'first');
wait_caught_up($node, 'app');
handlers_match($node, 'database created: handlers exact', db => 'app');
is_deeply(
	[ map { s/.*LOG:  //r } log_grep($node, $offset, qr/task_events worker 1/) ],
	[
		'task_events worker 1: database "app" can be connected to now; restarting to connect',
		'task_events worker 1 started in database "app" as role "postgres"'
	],
	'database created: the worker says it reconnects, and does');
is_deeply([ log_grep($node, $offset, qr/\b(ERROR|FATAL|PANIC):/) ],
	[], 'database created: no error in the log');

# Without FORCE, DROP DATABASE waits 5 s for the worker to leave, then fails.
my @connected = worker_pids($node);
my ($ret, $out, $err) = $node->psql('postgres', 'DROP DATABASE app');
isnt($ret, 0, 'DROP DATABASE without FORCE fails while the worker is connected');
like($err, qr/database "app" is being accessed by other users/, '... being accessed by other users');
is_deeply([ worker_pids($node) ], \@connected, '... and the worker is still there');

$offset = log_position($node);
$node->safe_psql('postgres', 'DROP DATABASE app WITH (FORCE)');
ok($node->wait_for_log($WAITING, $offset), 'DROP DATABASE WITH (FORCE) works; the worker then waits');
@waiting = worker_pids($node);
is_deeply([ worker_loops_quietly($node, 1, 700, 'waiting after the DROP') ],
	\@waiting, 'the waiting worker is not restarted');
is(scalar(log_grep($node, $offset, $WAITING)), 1, 'after the DROP: the waiting line is logged once');
# The worker is terminated by the DROP, and its successor's connection
# attempt fails once: two FATALs, then quiet.
is_deeply(
	[ map { s/.*FATAL:  //r } log_grep($node, $offset, qr/FATAL:/) ],
	[
		'terminating background worker "task_events worker" due to administrator command',
		'database "app" does not exist'
	],
	'after the DROP: the termination and one failed connection attempt, no FATAL loop');
is(scalar(log_grep($node, $offset, qr/\bERROR:/)), 0, 'after the DROP: no ERROR');

$offset = log_position($node);
$node->safe_psql('postgres', 'CREATE DATABASE app');
$node->safe_psql('app', 'CREATE EXTENSION task_events');
writes($node, 'app', 'second');
wait_caught_up($node, 'app');
handlers_match($node, 'database created again: handlers exact', db => 'app');
is($node->safe_psql('app', 'SELECT count(*) FROM task_events.audit_log'),
	$node->safe_psql('app', 'SELECT count(*) FROM task_events.events'),
	'database created again: one audit row per event');
is_deeply([ log_grep($node, $offset, qr/\b(ERROR|FATAL|PANIC):/) ],
	[], 'database created again: no error in the log');
$node->stop;

###
### task_events.worker_role.
###
$node = te_node(
	'worker_role',
	conf => "task_events.worker_role = 'te_worker'\ntask_events.poll_interval = 100ms");
my $ROLE_WAITING = qr/LOG:  task_events worker 1: role "te_worker" does not exist; waiting for it to be created/;
ok($node->wait_for_log($ROLE_WAITING, 0), 'missing role: the worker logs that it waits for it');
is_deeply([ worker_loops_quietly($node, 1, 500, 'waiting for the role') ],
	[ worker_pids($node) ], 'missing role: the waiting worker is not restarted');

# Handlers run as the worker role, with an empty search_path.
$node->safe_psql(
	'postgres', q{
CREATE TABLE public.whoami (seq bigint PRIMARY KEY, who text, path text);
CREATE FUNCTION public.whoami(events task_events.events[]) RETURNS void
LANGUAGE sql AS $$
	INSERT INTO public.whoami SELECT e.seq, current_user, current_setting('search_path')
	FROM unnest(events) e
$$;
INSERT INTO task_events.handlers (handler, function) VALUES ('whoami', 'public.whoami(task_events.events[])');
});
writes($node, 'postgres', 'early');

# A role without LOGIN cannot be connected as: the waiting worker says so.
$offset = log_position($node);
$node->safe_psql('postgres', 'CREATE ROLE te_worker NOLOGIN');
ok( $node->wait_for_log(
		qr/LOG:  task_events worker 1: role "te_worker" is not permitted to log in; waiting until it is/,
		$offset),
	'role without LOGIN: the waiting worker says so');
is(scalar(log_grep($node, $offset, qr/exited with exit code|FATAL:/)), 0,
	'role without LOGIN: the worker keeps waiting, no restart');
$node->safe_psql('postgres', 'ALTER ROLE te_worker LOGIN');
$node->poll_query_until('postgres',
	"SELECT usename FROM pg_stat_activity WHERE backend_type = 'task_events worker' AND datname = 'postgres'",
	'te_worker')
  or die 'the worker did not connect as te_worker';
pass('role created: the worker connects as it');
$offset = log_position($node);

# Without privileges: permission denied, logged with a growing delay, and the
# worker stays.
my @role_pids = worker_pids($node);
$node->wait_for_log(qr/ERROR:  permission denied[\s\S]*ERROR:  permission denied/, $offset);
is_deeply([ worker_pids($node) ], \@role_pids, 'no privileges: the worker errs but does not exit');
is(scalar(log_grep($node, $offset, qr/exited with exit code|FATAL:/)), 0,
	'no privileges: no exit and no FATAL in the log');

# The privileges docs/operations.md lists: those of the worker's own
# queries.  The handlers run as the owners of their functions, with the
# owners' privileges, so the worker role needs none on their tables.
$node->safe_psql(
	'postgres', q{
GRANT USAGE ON SCHEMA task_events TO te_worker;
GRANT SELECT ON task_events.handlers, task_events.events, task_events.log_origin TO te_worker;
GRANT SELECT, INSERT, UPDATE ON task_events.handler_state TO te_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON task_events.dead_letters TO te_worker;
});
writes($node, 'postgres', 'late');
wait_caught_up($node);
handlers_match($node, 'worker_role with the documented privileges: handlers exact');
is( $node->safe_psql(
		'postgres',
		q{SELECT count(*) || ' ' || string_agg(DISTINCT who || '/' || quote_literal(path), ',')
		  FROM public.whoami}),
	$node->safe_psql('postgres',
		q{SELECT count(*) || ' ' || (SELECT proowner::regrole FROM pg_proc WHERE proname = 'whoami')
		  FROM task_events.events}) . "/''",
	'every event was handled as the owner of the handler function (not the worker role), with an empty search_path'
);
is_deeply([ worker_pids($node) ], \@role_pids, 'the same worker did it all');
$node->stop;

done_testing();

