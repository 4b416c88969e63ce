# Rules protected here: no state of the database or the settings makes the
# task_events workers fail in a loop; the launcher logs once what keeps a
# database unserved, starts no worker meanwhile, and serves it once it can.
# - DROP EXTENSION task_events while the workers are busy: the DROP completes
#   (it waits for at most the batch in progress), no error in the log; the
#   database's workers then exit (each logs it), none is started while the
#   extension is missing, the launcher stays; after CREATE EXTENSION new
#   workers start and handle new events, exactly.
# - task_events.database names a database that does not exist at server
#   start: ONE LOG line from the launcher, no worker, no connection attempt
#   (no FATAL); the database created without the extension gets no worker;
#   once the extension is created in it, events are handled.
# - DROP DATABASE of the served database succeeds WITHOUT FORCE while its
#   worker is connected (the worker leaves), and WITH (FORCE); neither is
#   followed by a FATAL loop or by connection retries; CREATE DATABASE +
#   CREATE EXTENSION again and events are handled, exactly.
# - task_events.worker_role: the workers connect as that role (and run the
#   handlers as the owners of the handler functions, with an empty
#   search_path); a role that does not exist yet, or cannot log in, is
#   logged once each by the launcher, no worker starts meanwhile and
#   handler_status.workers says why; "can log in now" is logged once it can;
#   a worker that cannot connect for another reason (CONNECT revoked) is
#   retried with a delay of 1 s doubling, each failure logged by the
#   launcher; a role that lacks privileges gets "permission denied" logged
#   with a growing delay, without the worker exiting; once the documented
#   privileges are granted, every handler is exact.
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

# What handler_status.workers says in database db.
sub workers_state
{
	my ($node, $db) = @_;
	return $node->safe_psql($db // 'postgres',
		'SELECT DISTINCT workers FROM task_events.handler_status');
}

###
### DROP EXTENSION while the workers are busy.
###
my $node = te_node(
	'drop_extension',
	conf => "task_events.worker_count = 2\n"
	  . "task_events.poll_interval = 100ms\n"
	  . "task_events.batch_size = 5");
my @pids = wait_for_workers_in($node, 2, 'postgres');
my @seen = @pids;
my $launcher = launcher_loops_quietly($node, 0, 'start');

# A handler that takes a while per batch, so that the workers are inside a
# batch when the DROP comes.
my $SLOW = q{
CREATE FUNCTION public.slow(events task_events.events[]) RETURNS void
LANGUAGE sql AS $$ SELECT pg_catalog.pg_sleep(0.02) $$;
INSERT INTO task_events.handlers (handler, function) VALUES ('slow', 'public.slow(task_events.events[])');
};

# CREATE EXTENSION again: two workers start in postgres, none of them one
# seen before.
sub create_extension_again
{
	my ($what) = @_;
	$node->safe_psql('postgres', 'CREATE EXTENSION task_events');
	@pids = wait_for_workers_in($node, 2, 'postgres');
	my %old = map { $_ => 1 } @seen;
	is(scalar(grep { $old{$_} } @pids), 0, "$what: CREATE EXTENSION again: two new workers start");
	push @seen, @pids;
	return;
}

for my $round (1 .. 3)
{
	create_extension_again("round $round") if $round > 1;
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
	ok( $node->poll_query_until(
			'postgres',
			"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'task_events worker'", 0),
		"round $round: the workers exit after the DROP");
	is_deeply(
		[ sort map { s/.*LOG:  //r } log_grep($node, $offset, qr/LOG:  task_events worker \d+: /) ],
		[
			'task_events worker 1: the extension is not installed in database "postgres"; stopping',
			'task_events worker 2: the extension is not installed in database "postgres"; stopping'
		],
		"round $round: each worker logs once that it stops because the extension is gone");
	is(launcher_loops_quietly($node, 500, "round $round, after the DROP"),
		$launcher, "round $round: the launcher stays");
	is(te_processes($node), 'task_events launcher/(none)',
		"round $round: no worker is started while the extension is missing");
	is_deeply([ log_grep($node, $offset, $BAD) ], [], "round $round: no error in the log");
}

create_extension_again('after the rounds');
my @handling = @pids;
writes($node, 'postgres', 'after');
wait_caught_up($node);
handlers_match($node, 'after CREATE EXTENSION again: handlers exact');
is_deeply([ workers($node) ], \@handling, 'the two new workers handled them without restarting');
$node->stop;

###
### task_events.database missing at start; DROP DATABASE with and without FORCE.
###
$node = te_node(
	'drop_database',
	extension => 0,
	conf => "task_events.database = 'app'\ntask_events.poll_interval = 100ms");

my $MISSING =
  qr/LOG:  task_events launcher: database "app" \(task_events.database\) does not exist; it is served once it is created with the extension/;
ok(log_appears($node, $MISSING, 0),
	'missing database at start: the launcher logs that it serves it once it is created with the extension');
$launcher = launcher_loops_quietly($node, 700, 'app missing');
is(te_processes($node), 'task_events launcher/(none)', 'missing database: no worker runs');
is(scalar(log_grep($node, 0, $MISSING)), 1, 'missing database: the line is logged once');
is_deeply([ log_grep($node, 0, $BAD) ],
	[], 'missing database: no connection attempt fails, no error in the log');

my $offset = log_position($node);
$node->safe_psql('postgres', 'CREATE DATABASE app');
launcher_loops_quietly($node, 500, 'app without the extension');
is(te_processes($node), 'task_events launcher/(none)',
	'database created without the extension: no worker');

# Create the extension in app, check that its worker handles events.
sub serve_app
{
	my ($what, $tag) = @_;
	my $offset = log_position($node);
	$node->safe_psql('app', 'CREATE EXTENSION task_events');
	my @connected = wait_for_workers_in($node, 1, 'app');
	writes($node, 'app', $tag);
	wait_caught_up($node, 'app');
	handlers_match($node, "$what: handlers exact", db => 'app');
	is($node->safe_psql('app', 'SELECT count(*) FROM task_events.audit_log'),
		$node->safe_psql('app', 'SELECT count(*) FROM task_events.events'),
		"$what: one audit row per event");
	is_deeply(
		[ map { s/.*LOG:  //r } log_grep($node, $offset, qr/LOG:  task_events (worker|launcher)/) ],
		['task_events worker 1 started in database "app" as role "postgres"'],
		"$what: one worker starts in app, and nothing else is logged");
	is_deeply([ log_grep($node, $offset, $BAD) ], [], "$what: no error in the log");
	return @connected;
}

# DROP DATABASE app while its worker is connected, then check that the
# worker is gone, none is started, and nothing fails in a loop.
sub drop_app
{
	my ($what, $sql, @connected) = @_;
	my $offset = log_position($node);
	is_deeply([ workers($node, 'app') ], \@connected, "$what: the worker is connected to app before the DROP");
	my ($ret, $out, $err) = $node->psql('postgres', $sql, timeout => 120);
	is($ret, 0, "$what: DROP DATABASE succeeds while the worker is connected");
	is($err, '', "$what: ... without an error or a notice");
	is($node->safe_psql('postgres', "SELECT count(*) FROM pg_database WHERE datname = 'app'"),
		0, "$what: ... and app is gone");
	is(launcher_loops_quietly($node, 700, "after $what"), $launcher, "$what: the launcher stays");
	is(te_processes($node), 'task_events launcher/(none)',
		"$what: the worker has left, and no worker is started");
	return $offset;
}

serve_app('database created', 'first');
$offset = drop_app('without FORCE', 'DROP DATABASE app', workers($node, 'app'));
is_deeply([ log_grep($node, $offset, qr/FATAL:|exited with exit code|could not connect/) ],
	[], 'without FORCE: the worker leaves quietly, no FATAL, no retry');
is_deeply([ log_grep($node, $offset, $BAD) ], [], 'without FORCE: no error in the log');
is_deeply([ log_grep($node, $offset, qr/LOG:  task_events (worker|launcher)/) ],
	[], 'without FORCE: the launcher logs nothing about the database dropped');

$node->safe_psql('postgres', 'CREATE DATABASE app');
my @connected = serve_app('database created again', 'second');
$offset = drop_app('WITH (FORCE)', 'DROP DATABASE app WITH (FORCE)', @connected);
# The worker leaves, or is terminated by the DROP: then one FATAL says so.
is_deeply(
	[
		grep { !/FATAL:  terminating background worker "task_events worker" due to administrator command/ }
		  log_grep($node, $offset, qr/FATAL:/)
	],
	[],
	'WITH (FORCE): no FATAL but the termination of the worker, no FATAL loop');
ok(scalar(log_grep($node, $offset, qr/FATAL:/)) <= 1, 'WITH (FORCE): one termination at most');
is_deeply([ log_grep($node, $offset, qr/could not connect|\b(ERROR|PANIC):/) ],
	[], 'WITH (FORCE): no retry, no error in the log');
is_deeply([ log_grep($node, $offset, qr/LOG:  task_events (worker|launcher)/) ],
	[], 'WITH (FORCE): the launcher logs nothing about the database dropped');

$node->safe_psql('postgres', 'CREATE DATABASE app');
serve_app('database created a third time', 'third');
$node->stop;

###
### task_events.worker_role.
###
$node = te_node(
	'worker_role',
	conf => "task_events.worker_role = 'te_worker'\ntask_events.poll_interval = 100ms");
my $UNSERVED_ROLE = 'unserved: role "te_worker" cannot log in (task_events.worker_role)';
my $ROLE_MISSING =
  qr/LOG:  task_events launcher: role "te_worker" does not exist; no database is served until it is created/;
ok(log_appears($node, $ROLE_MISSING, 0), 'missing role: the launcher logs that no database is served until it is created');
$launcher = launcher_loops_quietly($node, 500, 'role missing');
is(te_processes($node), 'task_events launcher/(none)', 'missing role: no worker starts');
is(workers_state($node), $UNSERVED_ROLE, 'missing role: handler_status.workers says why');
is(scalar(log_grep($node, 0, $ROLE_MISSING)), 1, 'missing role: logged once');
is_deeply([ log_grep($node, 0, $BAD) ], [], 'missing role: no failed connection, no error in the log');

# A handler that records the role it runs as, and its search_path.
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

# A role without LOGIN cannot be connected as: the launcher says so.
$offset = log_position($node);
$node->safe_psql('postgres', 'CREATE ROLE te_worker NOLOGIN');
my $NOLOGIN =
  qr/LOG:  task_events launcher: role "te_worker" is not permitted to log in; no database is served until it is/;
ok(log_appears($node, $NOLOGIN, $offset), 'role without LOGIN: the launcher says so');
is(launcher_loops_quietly($node, 500, 'role without LOGIN'), $launcher, 'role without LOGIN: the launcher stays');
is(te_processes($node), 'task_events launcher/(none)', 'role without LOGIN: no worker starts');
is(workers_state($node), $UNSERVED_ROLE, 'role without LOGIN: handler_status.workers says why');
is(scalar(log_grep($node, $offset, $NOLOGIN)), 1, 'role without LOGIN: logged once');
is_deeply([ log_grep($node, $offset, $BAD) ], [], 'role without LOGIN: no failed connection, no error in the log');

# The role can log in, but not connect to postgres: the launcher retries the
# worker with a growing delay, and says so at each failure.
$node->safe_psql('postgres', 'REVOKE CONNECT ON DATABASE postgres FROM PUBLIC');
$offset = log_position($node);
$node->safe_psql('postgres', 'ALTER ROLE te_worker LOGIN');
ok(log_appears($node, qr/LOG:  task_events launcher: role "te_worker" can log in now/, $offset),
	'role given LOGIN: the launcher says it can log in now');
my $RETRY = qr/LOG:  task_events launcher: worker 1 could not connect to database "postgres"; retrying in (\d+) s/;
$node->wait_for_log(qr/$RETRY[\s\S]*$RETRY/, $offset);
my @delays = map { /$RETRY/ ? $1 : () } log_grep($node, $offset, $RETRY);
is_deeply([ @delays[ 0, 1 ] ], [ 1, 2 ],
	'CONNECT revoked: each failed connection is logged by the launcher, retried in 1 s, then 2 s');
like(
	log_since($node, $offset),
	qr/FATAL:  permission denied for database "postgres"[\s\S]*$RETRY/,
	'... after the FATAL of the connection attempt, which says why');
$node->safe_psql('postgres', 'GRANT CONNECT ON DATABASE postgres TO PUBLIC');
ok( $node->poll_query_until(
		'postgres',
		"SELECT usename FROM pg_stat_activity WHERE backend_type = 'task_events worker' AND datname = 'postgres'",
		'te_worker'),
	'CONNECT granted again: the worker connects as te_worker');
is(scalar(log_grep($node, $offset, qr/LOG:  task_events launcher: role/)), 1,
	'"can log in now" is logged once');
$offset = log_position($node);

# Without privileges: permission denied, logged with a growing delay, and the
# worker stays.
my @role_pids = workers($node);
$node->wait_for_log(qr/ERROR:  permission denied[\s\S]*ERROR:  permission denied/, $offset);
is_deeply([ workers($node) ], \@role_pids, 'no privileges: the worker errs but does not exit');
is(scalar(log_grep($node, $offset, qr/exited with exit code|FATAL:/)), 0,
	'no privileges: no exit and no FATAL in the log');

# The privileges docs/operations.md lists: those of the worker's own
# queries (without EXECUTE on _lane_of, which only handlers with lanes need:
# none has lanes here).  The handlers run as the owners of their functions, with the
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
is_deeply([ workers($node) ], \@role_pids, 'the same worker did it all');
$node->stop;

done_testing();

