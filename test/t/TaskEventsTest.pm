# TaskEventsTest.pm: shared helpers of the task_events TAP tests (test/t/*.pl).
#
# - te_node: a PostgreSQL::Test::Cluster node, preloading task_events or not;
# - worker_pids / wait_for_workers: the background workers in pg_stat_activity;
# - wait_caught_up: poll until every enabled handler has events_behind = 0;
# - handler_mismatches / handlers_match: the EXACT comparison of what the
#   built-in handlers wrote against what task_events.events implies, as a list
#   of differences (empty when everything matches);
# - no_handler_failures: no failed attempt, no dead letter, in any handler;
# - handlers_match_after_kills: handlers_match for a run that killed workers
#   in the middle of handler calls (lost batches are counted, but nothing
#   else may fail and nothing may be dead-lettered);
# - pgbench_script / start_pgbench / start_pgbench_loop / stop_pgbench: the
#   write load (create a task, move it, roll back some transactions);
# - log_position / log_since / log_grep / log_appears: the server log from a
#   point on;
# - worker_loops_quietly: the same workers keep looping for a while.
package TaskEventsTest;

use strict;
use warnings FATAL => 'all';

use Exporter 'import';
use IPC::Run;
use Time::HiRes ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

our @EXPORT = qw(
  te_node worker_pids wait_for_workers wait_caught_up
  handler_mismatches handlers_match
  pgbench_script start_pgbench start_pgbench_loop stop_pgbench
  create_tasks log_position log_since log_grep log_appears worker_loops_quietly
  no_handler_failures handlers_match_after_kills
);

our $PRELOAD = "shared_preload_libraries = 'task_events'";

# te_node(name, preload => 1, conf => '...', extension => 1, start => 1,
#         init => { ...Cluster::init params })
# A new node; with preload, shared_preload_libraries = 'task_events';
# with extension (needs start), CREATE EXTENSION task_events in postgres.
sub te_node
{
	my ($name, %opt) = @_;
	my $preload = exists $opt{preload} ? $opt{preload} : 1;
	my $extension = exists $opt{extension} ? $opt{extension} : 1;
	my $start = exists $opt{start} ? $opt{start} : 1;

	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(%{ $opt{init} || {} });
	$node->append_conf('postgresql.conf', $PRELOAD) if $preload;
	$node->append_conf('postgresql.conf', $opt{conf}) if defined $opt{conf};
	if ($start)
	{
		$node->start;
		$node->safe_psql('postgres', 'CREATE EXTENSION task_events')
		  if $extension;
	}
	return $node;
}

# The pids of the task_events workers (not the launcher), sorted.
sub worker_pids
{
	my ($node, $db) = @_;
	my $out = $node->safe_psql($db // 'postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'task_events worker' ORDER BY pid"
	);
	return grep { $_ ne '' } split /\n/, $out;
}

# Poll until exactly n workers run; returns their pids (dies on timeout).
sub wait_for_workers
{
	my ($node, $n, $what) = @_;
	$node->poll_query_until('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'task_events worker'",
		$n)
	  or die "timed out waiting for $n task_events worker(s)"
	  . ($what ? " ($what)" : '');
	return worker_pids($node);
}

# Poll until no enabled handler has an event behind.
sub wait_caught_up
{
	my ($node, $db) = @_;
	$node->poll_query_until(
		$db // 'postgres', q{
		SELECT bool_and(events_behind = 0) FROM task_events.handler_status
		WHERE enabled})
	  or die "timed out waiting for the handlers to catch up: "
	  . $node->safe_psql($db // 'postgres',
		'SELECT handler, events_behind, failed, dead_letters, last_error'
		  . ' FROM task_events.handler_status');
	return;
}

# The exact comparison: what analytics, audit and notification wrote against
# what the event log implies, and the built-in handlers' health.  Returns a
# list of differences (at most 50, then a count), empty when all match.
# Call it after wait_caught_up.
my $MISMATCH_SQL = <<'SQL';
WITH ev AS (SELECT * FROM task_events.events),
audit AS (
	SELECT e.seq AS k, format('audit_log: no row for event seq %s (%s, %s)',
		e.seq, e.event_type, e.event_id) AS m
	FROM ev e
	WHERE NOT EXISTS (SELECT FROM task_events.audit_log a WHERE a.event_id = e.event_id)
	UNION ALL
	SELECT a.seq, format('audit_log: row for event_id %s (seq %s) matches no event',
		a.event_id, a.seq)
	FROM task_events.audit_log a
	WHERE NOT EXISTS (SELECT FROM ev e WHERE e.event_id = a.event_id)
	UNION ALL
	SELECT e.seq, format('audit_log: row of event seq %s differs: got (%s, %s, %s, %s), expected (%s, %s, %s, %s)',
		e.seq, a.seq, a.event_type, a.event_data, a.occurred_at,
		e.seq, e.event_type, e.payload, e.occurred_at)
	FROM ev e JOIN task_events.audit_log a USING (event_id)
	WHERE (a.seq, a.event_type, a.event_data, a.occurred_at)
		IS DISTINCT FROM (e.seq, e.event_type, e.payload, e.occurred_at)
	   OR a.recorded_at IS NULL
	UNION ALL
	SELECT seq, format('audit_log: task %s version %s recorded at %s, before its version %s (%s)',
		aggregate_id, aggregate_version, recorded_at, prev_version, prev_recorded_at)
	FROM (SELECT e.seq, e.aggregate_id, e.aggregate_version, a.recorded_at,
				 lag(e.aggregate_version) OVER w AS prev_version,
				 lag(a.recorded_at) OVER w AS prev_recorded_at
		  FROM ev e JOIN task_events.audit_log a USING (event_id)
		  WINDOW w AS (PARTITION BY e.aggregate_id ORDER BY e.aggregate_version)) o
	WHERE recorded_at < prev_recorded_at
),
notif_expected AS (
	SELECT e.seq, e.event_id, e.user_id, e.aggregate_id, e.aggregate_version,
		CASE e.event_type WHEN 'TaskCreated' THEN 'New task created: '
			 ELSE 'Congratulations! Task completed: ' END
		|| (e.payload ->> 'task_title') AS message
	FROM ev e WHERE e.event_type IN ('TaskCreated', 'TaskCompleted')
),
notif AS (
	SELECT x.seq AS k, format('notifications: no row for event seq %s (%s)', x.seq, x.event_id) AS m
	FROM notif_expected x
	WHERE NOT EXISTS (SELECT FROM task_events.notifications n WHERE n.event_id = x.event_id)
	UNION ALL
	SELECT NULL, format('notifications: row %s for event_id %s matches no TaskCreated/TaskCompleted event',
		n.notification_id, n.event_id)
	FROM task_events.notifications n
	WHERE NOT EXISTS (SELECT FROM notif_expected x WHERE x.event_id = n.event_id)
	UNION ALL
	SELECT x.seq, format('notifications: row of event seq %s differs: got (%s, %s), expected (%s, %s)',
		x.seq, n.user_id, n.message, x.user_id, x.message)
	FROM notif_expected x JOIN task_events.notifications n USING (event_id)
	WHERE (n.user_id, n.message) IS DISTINCT FROM (x.user_id, x.message)
	   OR n.created_at IS NULL
	UNION ALL
	SELECT seq, format('notifications: task %s version %s has notification_id %s, below %s of its version %s',
		aggregate_id, aggregate_version, notification_id, prev_id, prev_version)
	FROM (SELECT x.seq, x.aggregate_id, x.aggregate_version, n.notification_id,
				 lag(x.aggregate_version) OVER w AS prev_version,
				 lag(n.notification_id) OVER w AS prev_id
		  FROM notif_expected x JOIN task_events.notifications n USING (event_id)
		  WINDOW w AS (PARTITION BY x.aggregate_id ORDER BY x.aggregate_version)) o
	WHERE notification_id < prev_id
),
counters_expected AS (
	SELECT CASE e.event_type WHEN 'TaskCreated' THEN 'tasks_created'
		   ELSE 'tasks_completed' END AS metric, e.user_id, count(*) AS value
	FROM ev e WHERE e.event_type IN ('TaskCreated', 'TaskCompleted')
	GROUP BY 1, 2
),
counters AS (
	SELECT NULL::bigint AS k, format('analytics_counters: %s of user %s is %s, expected %s',
		metric, user_id, coalesce(c.value::text, 'missing'), coalesce(x.value::text, 'no row')) AS m
	FROM counters_expected x FULL JOIN task_events.analytics_counters c USING (metric, user_id)
	WHERE x.value IS DISTINCT FROM c.value
),
stats_expected AS (
	SELECT user_id, count(*) AS completed, sum(s) AS total_seconds,
		   min(s) AS min_seconds, max(s) AS max_seconds
	FROM (SELECT d.user_id,
				 (extract(epoch FROM d.occurred_at) - extract(epoch FROM c.occurred_at))::float8 AS s
		  FROM ev d JOIN ev c ON c.aggregate_id = d.aggregate_id AND c.event_type = 'TaskCreated'
		  WHERE d.event_type = 'TaskCompleted') t
	GROUP BY user_id
),
stats AS (
	SELECT NULL::bigint AS k, format('completion_stats: user %s is (%s, %s, %s, %s), expected (%s, %s, %s, %s)',
		user_id, s.completed, s.total_seconds, s.min_seconds, s.max_seconds,
		x.completed, x.total_seconds, x.min_seconds, x.max_seconds) AS m
	FROM stats_expected x FULL JOIN task_events.completion_stats s USING (user_id)
	WHERE x.completed IS DISTINCT FROM s.completed
	   OR x.completed IS NULL OR s.completed IS NULL
	   OR s.total_seconds IS NULL OR s.min_seconds IS NULL OR s.max_seconds IS NULL
	   OR abs(x.total_seconds - s.total_seconds) > 1e-6 + 1e-9 * abs(x.total_seconds)
	   OR abs(x.min_seconds - s.min_seconds) > 1e-6
	   OR abs(x.max_seconds - s.max_seconds) > 1e-6
),
health AS (
	SELECT NULL::bigint AS k, format('handler_status: %s has events_behind %s, failed %s, dead_letters %s (last error: %s)',
		handler, events_behind, failed, dead_letters, last_error) AS m
	FROM task_events.handler_status
	WHERE handler IN ('analytics', 'audit', 'notification')
	  AND (events_behind <> 0 OR failed <> 0 OR dead_letters <> 0)
	UNION ALL
	SELECT NULL, format('handlers: built-in handler %s is missing', b)
	FROM unnest('{analytics,audit,notification}'::text[]) b
	WHERE NOT EXISTS (SELECT FROM task_events.handlers h WHERE h.handler = b)
),
everything AS (
	SELECT 1 AS o, * FROM audit
	UNION ALL SELECT 2, * FROM notif
	UNION ALL SELECT 3, * FROM counters
	UNION ALL SELECT 4, * FROM stats
	UNION ALL SELECT 5, * FROM health
)
SELECT m FROM (
	SELECT o, k, m FROM everything
	UNION ALL
	SELECT 9, NULL, format('... %s differences in all', count(*)) FROM everything HAVING count(*) > 50
) r
ORDER BY o, k NULLS LAST, m
LIMIT 51
SQL

sub handler_mismatches
{
	my ($node, $db) = @_;
	my $out = $node->safe_psql($db // 'postgres', $MISMATCH_SQL);
	return grep { $_ ne '' } split /\n/, $out;
}

# A test: the built-in handlers' output is exactly what the log implies;
# on failure the differences are printed.
sub handlers_match
{
	my ($node, $name, %opt) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my @diff = handler_mismatches($node, $opt{db});
	my $ok = is(scalar(@diff), 0, $name);
	diag(join("\n", @diff)) unless $ok;
	return $ok;
}

# A test, for runs that kill workers (SIGTERM, SIGKILL) under load: a worker
# killed in a handler call counts a failed attempt of that call (a lost
# batch, SQLSTATE 58000), so failures are expected, but of no other kind,
# never a dead letter (the test nodes set task_events.max_attempts high
# enough), and the outputs are exact.
sub handlers_match_after_kills
{
	my ($node, $name) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my @diff = grep { !/^handler_status: \w+ has events_behind 0, failed \d+, dead_letters 0 \(last error: the handler's process ended during the call\)$/ }
	  handler_mismatches($node);
	my $ok = is(scalar(@diff), 0, $name);
	diag(join("\n", @diff)) unless $ok;
	is( $node->safe_psql(
			'postgres', q{
			SELECT sum(dead_letters) || ' ' || count(*) FILTER (WHERE failed > 0 AND last_sqlstate <> '58000')
			FROM task_events.handler_status}),
		'0 0',
		"$name: no dead letter, and every failure is a batch lost with its killed worker");
	return $ok;
}

# The pgbench load: each transaction creates a task and moves it (start and
# complete, complete, cancel, or leave pending), sometimes also completes an
# older in_progress task of the same user, sometimes creates a task in a
# savepoint it rolls back, and one transaction in ten rolls back.
# public.attempts counts the tasks attempted (a sequence ignores rollbacks);
# start_pgbench and start_pgbench_loop create it.
sub pgbench_script
{
	return <<'EOS';
\set r random(1, 10)
\set u random(1, 8)
\set m random(1, 5)
BEGIN;
SELECT nextval('public.attempts') AS n \gset
SELECT task_id AS tid FROM task_events.create_task('user_' || :u, 'bench task ' || :n) \gset
\if :m = 1
SELECT status FROM task_events.update_status(':tid', 'in_progress');
SELECT status FROM task_events.complete_task(':tid');
\elif :m = 2
SELECT status FROM task_events.complete_task(':tid', 1);
\elif :m = 3
SELECT status FROM task_events.update_status(':tid', 'cancelled');
\elif :m = 4
SELECT status FROM task_events.update_status(':tid', 'in_progress');
\endif
\if :r = 2
SELECT count(*) FROM (SELECT task_events.complete_task(t.task_id)
	FROM (SELECT task_id FROM task_events.tasks
		  WHERE user_id = 'user_' || :u AND status = 'in_progress'
		  LIMIT 1 FOR UPDATE SKIP LOCKED) t) c;
\elif :r = 3
SAVEPOINT s;
SELECT nextval('public.attempts') AS n \gset
SELECT task_id FROM task_events.create_task('user_' || :u, 'savepoint rolled back ' || :n);
ROLLBACK TO SAVEPOINT s;
\endif
\if :r = 1
ROLLBACK;
\else
COMMIT;
\endif
EOS
}

our $PGBENCH_SETUP_SQL = 'CREATE SEQUENCE IF NOT EXISTS public.attempts';

# Start a pgbench run in the background; returns a handle for stop_pgbench.
sub start_pgbench
{
	my ($node, %opt) = @_;
	return start_pgbench_in($node, 'postgres', %opt);
}

# Start back-to-back short pgbench runs in the background until stop_pgbench:
# a run that fails (server crashed or restarting) is followed by another,
# after a short pause.
sub start_pgbench_loop
{
	my ($node, %opt) = @_;
	return start_pgbench_loop_in($node, 'postgres', %opt);
}

# Wait for the background load to end; returns pgbench's exit status.
sub stop_pgbench
{
	my ($h) = @_;
	PostgreSQL::Test::Utils::append_to_file($h->{stop}, '') if $h->{stop};
	$h->{run}->finish;
	my $rc = $h->{run}->result(0);
	note "pgbench stdout:\n$h->{out}";
	note "pgbench stderr:\n$h->{err}";
	return $rc;
}

# Create n tasks, each in its own transaction; returns nothing.
sub create_tasks
{
	my ($node, $n, $prefix, $user) = @_;
	return create_tasks_in($node, 'postgres', $n, $prefix, $user);
}

# A test: no handler (the relay handler and registered ones included) has
# failed an attempt, and there is no dead letter.
sub no_handler_failures
{
	my ($node) = @_;
	Test::More::is(
		$node->safe_psql(
			'postgres',
			q{SELECT sum(failed) || '/' || sum(dead_letters) FROM task_events.handler_status}),
		'0/0',
		'no handler failed and there is no dead letter');
	return;
}

# The current size of the server log, to read what comes after it later.
sub log_position
{
	my ($node) = @_;
	return -s $node->logfile;
}

# The server log from offset on.
sub log_since
{
	my ($node, $offset) = @_;
	my $log = PostgreSQL::Test::Utils::slurp_file($node->logfile);
	return substr($log, $offset);
}

# The lines of the server log from offset on that match the regexp re.
sub log_grep
{
	my ($node, $offset, $re) = @_;
	return grep { /$re/ } split /\n/, log_since($node, $offset);
}

# Poll until the server log from offset on matches the regexp re: true if it
# does before the timeout, false if not, for ok().  ($node->wait_for_log
# dies on timeout instead, so ok($node->wait_for_log(...)) cannot fail.)
sub log_appears
{
	my ($node, $re, $offset) = @_;
	return eval { $node->wait_for_log($re, $offset); 1 } ? 1 : 0;
}

# Poll until the n task_events workers (in any database, or none) have
# changed state at least ms milliseconds after this call started, that is
# are still going round their loop; returns their pids, sorted (dies on
# timeout).  Together with the pids from before, this shows whether they
# were restarted in between.
sub worker_loops_quietly
{
	my ($node, $n, $ms, $what) = @_;
	my $mark = $node->safe_psql('postgres', 'SELECT clock_timestamp()');
	$node->poll_query_until(
		'postgres', qq{
		SELECT count(*) = $n FROM pg_stat_activity
		WHERE backend_type = 'task_events worker'
		  AND state_change > '$mark'::timestamptz + interval '$ms ms'})
	  or die "timed out waiting for $n task_events worker(s) to loop for $ms ms"
	  . ($what ? " ($what)" : '');
	return worker_pids($node);
}

# Helpers for tests that use several databases (026_every_database.pl).
#
# - start_pgbench_in / start_pgbench_loop_in: start_pgbench and
#   start_pgbench_loop in database db (public.attempts is created there);
#   several can run at once, in different databases;
# - create_tasks_in: create_tasks in database db.
push @EXPORT, qw(start_pgbench_in start_pgbench_loop_in create_tasks_in);

sub _pgbench_cmd_in
{
	my ($node, $db, %opt) = @_;
	my $file = $node->basedir . '/task_events_load_in.sql';
	PostgreSQL::Test::Utils::append_to_file($file, pgbench_script())
	  unless -e $file;
	$node->safe_psql($db, $PGBENCH_SETUP_SQL);
	return [
		$node->installed_command('pgbench'), '-n',
		'-h', $node->host, '-p', $node->port,
		'-c', $opt{clients} // 4, '-j', 2,
		'-T', $opt{seconds} // 15,
		'-f', $file, $db
	];
}

# start_pgbench_in(node, db, clients => 4, seconds => 15): a pgbench run in
# database db, in the background; returns a handle for stop_pgbench.
sub start_pgbench_in
{
	my ($node, $db, %opt) = @_;
	my $h = { out => '', err => '' };
	my $cmd = _pgbench_cmd_in($node, $db, %opt);
	note "starting in the background: @$cmd";
	$h->{run} = IPC::Run::start($cmd, '>', \$h->{out}, '2>', \$h->{err});
	return $h;
}

# start_pgbench_loop_in(node, db, clients => 4, seconds => 2): back-to-back
# short pgbench runs in database db until stop_pgbench, as
# start_pgbench_loop; each database has its own stop file.
sub start_pgbench_loop_in
{
	my ($node, $db, %opt) = @_;
	my $h = { out => '', err => '' };
	my $seconds = $opt{seconds} // 2;
	my $cmd = _pgbench_cmd_in($node, $db, %opt, seconds => $seconds);
	$h->{stop} = $node->basedir . "/stop_pgbench_loop_$db";
	unlink $h->{stop};
	# A pgbench started while the server restarts after a crash can hang
	# (seen with 16 clients): each run is cut off well after its -T.
	my $pg = join ' ', 'timeout', '-k', '5', $seconds + 20, map { "'$_'" } @$cmd;
	my $loop = qq{n=0; while [ ! -e '$h->{stop}' ]; do n=\$((n+1)); $pg || sleep 0.2; done; echo "pgbench runs: \$n"};
	note "starting in the background: $loop";
	$h->{run} = IPC::Run::start([ 'bash', '-c', $loop ], '>', \$h->{out}, '2>', \$h->{err});
	return $h;
}

# create_tasks_in(node, db, n, prefix, user): create_tasks in database db.
sub create_tasks_in
{
	my ($node, $db, $n, $prefix, $user) = @_;
	$user //= 'alice';
	my $sql = join "\n",
	  map { "SELECT FROM task_events.create_task('$user', '$prefix $_');" } 1 .. $n;
	$node->safe_psql($db, $sql);
	return;
}

# The pids of the task_events workers (not the launcher, nor its probes), in
# database db only if given, sorted.
sub workers
{
	my ($node, $db) = @_;
	my $in = defined $db ? "AND datname = '$db'" : '';
	return grep { $_ ne '' } split /\n/,
	  $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'task_events worker' $in ORDER BY pid"
	  );
}

# Poll until exactly n workers run, all in database db; true if they do
# before the timeout (for ok()), false if not.
sub workers_in_are
{
	my ($node, $n, $db) = @_;
	return $node->poll_query_until(
		'postgres', qq{
		SELECT count(*) = $n AND coalesce(bool_and(datname = '$db'), true) FROM pg_stat_activity
		WHERE backend_type = 'task_events worker'});
}

# Poll until exactly n workers run, all in database db; returns their pids.
sub wait_for_workers_in
{
	my ($node, $n, $db) = @_;
	workers_in_are($node, $n, $db)
	  or die "timed out waiting for $n task_events worker(s) in database $db";
	return workers($node, $db);
}

# Every task_events process, as "backend_type/datname" lines, sorted.
sub te_processes
{
	my ($node) = @_;
	return $node->safe_psql(
		'postgres', q{
		SELECT string_agg(backend_type || '/' || coalesce(datname, '(none)'), E'\n' ORDER BY 1)
		FROM pg_stat_activity WHERE backend_type LIKE 'task_events%'});
}

# Poll until the launcher has gone round its loop for at least ms
# milliseconds after this call, and no probe of it is running; returns the
# launcher's pid (dies on timeout).  A worker that the launcher was to start
# in that time would have been started.
sub launcher_loops_quietly
{
	my ($node, $ms, $what) = @_;
	my $mark = $node->safe_psql('postgres', 'SELECT clock_timestamp()');
	$node->poll_query_until(
		'postgres', qq{
		SELECT count(*) FILTER (WHERE backend_type = 'task_events launcher'
		                          AND state_change > '$mark'::timestamptz + interval '$ms ms') = 1
		   AND count(*) FILTER (WHERE backend_type = 'task_events probe') = 0
		FROM pg_stat_activity})
	  or die "timed out waiting for the launcher to loop for $ms ms ($what)";
	return $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'task_events launcher'");
}

push @EXPORT, qw(workers workers_in_are wait_for_workers_in te_processes launcher_loops_quietly);

# Poll until check (a code reference) returns true, every 0.1 s, up to the
# default timeout; returns whether it did.
sub wait_until
{
	my ($check) = @_;
	for (1 .. 10 * $PostgreSQL::Test::Utils::timeout_default)
	{
		return 1 if $check->();
		Time::HiRes::usleep(100_000);
	}
	return 0;
}

push @EXPORT, qw(wait_until);

1;
