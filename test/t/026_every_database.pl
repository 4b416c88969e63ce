# Rules protected here: with the library preloaded, task_events serves every
# database of the cluster in which the extension is created, and only those
# (issue 10, "every database"):
# 1. three databases with the extension (db1, db2, db3) under pgbench load at
#    the same time: every built-in handler's output is exact in each, a
#    recording handler gets each event of its database exactly once, only
#    from that database's workers, and no database's outputs hold another's
#    events (analytics counts of db1 are db1's events alone);
# 2. a database without the extension (plain) has no task_events worker
#    connected once the server has started, and still none after events in
#    the other databases (and its name is in at most one worker start line:
#    the look at server start);
# 3. one launcher: exactly one pg_stat_activity row with backend_type
#    'task_events launcher', at start and at the end;
# 4. task_events.worker_count = 2: two workers in each served database;
# 5. under load in db1 and db2: CREATE EXTENSION in a new database (db4)
#    starts its workers and an event written there is handled; DROP
#    EXTENSION there makes them leave; DROP DATABASE db3 WITHOUT FORCE while
#    its workers are in a batch succeeds; db1 and db2 go on being handled,
#    exactly;
# 6. budget exhausted (a second node: max_worker_processes = 3, no logical
#    replication launcher, no parallel workers, worker_count = 1, four
#    databases with the extension: the launcher and two workers, two
#    databases left unserved): the launcher's log line names exactly the
#    databases whose handler_status.workers says 'unserved: no background
#    worker slot ...'; in a served database it says 'running'; in an
#    unserved one, with notify_mode relay (the default), a LISTENer receives
#    the envelope of an event from the writing backend at its commit (in a
#    served one, from a worker: the relay handler); once slots are freed
#    (DROP EXTENSION in the served ones) the launcher says every database is
#    served (one slot freed: the line names the database still unserved,
#    never "every database ... is served" in between), the formerly unserved
#    ones say 'running' and their events written while unserved are handled.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

my @SERVED = qw(db1 db2 db3);

# The number of task_events workers connected to database db.
sub workers_in
{
	my ($node, $db) = @_;
	return $node->safe_psql(
		'postgres', qq{
		SELECT count(*) FROM pg_stat_activity
		WHERE backend_type = 'task_events worker' AND datname = '$db'});
}

# The pids of the task_events workers connected to database db.
sub worker_pids_in
{
	my ($node, $db) = @_;
	return grep { $_ ne '' } split /\n/, $node->safe_psql(
		'postgres', qq{
		SELECT pid FROM pg_stat_activity
		WHERE backend_type = 'task_events worker' AND datname = '$db'});
}

my $LAUNCHERS = q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'task_events launcher'};

# The 'who' handler records, for every event it is called with, the pid of
# the process that called it (the workers run with an empty search_path).
my $WHO = q{
CREATE TABLE public.who (seq bigint NOT NULL, pid int NOT NULL);
CREATE FUNCTION public.who(events task_events.events[]) RETURNS void LANGUAGE sql AS $$
	INSERT INTO public.who SELECT e.seq, pg_catalog.pg_backend_pid() FROM pg_catalog.unnest(events) e
$$;
SELECT task_events.register_handler('who', 'public.who(task_events.events[])');
};

# Events of db not recorded exactly once by 'who', and 'who' rows of no event.
my $WHO_WRONG = q{
	SELECT count(*) FROM task_events.events e
	  FULL JOIN (SELECT seq, count(*) AS n FROM public.who GROUP BY seq) w USING (seq)
	WHERE e.seq IS NULL OR w.n IS DISTINCT FROM 1};

###
### The cluster: db1, db2, db3 with the extension, plain without, created
### before a restart (the launcher finds them at server start).
###
my $node = te_node(
	'every_db',
	extension => 0,
	conf => "task_events.worker_count = 2\n"
	  . "task_events.batch_size = 50\n"
	  . "task_events.poll_interval = 200ms\n"
	  . "max_worker_processes = 16\n"
	  . "max_connections = 60");
for my $db (@SERVED, 'plain')
{
	$node->safe_psql('postgres', "CREATE DATABASE $db");
}
for my $db (@SERVED)
{
	$node->safe_psql($db, "CREATE EXTENSION task_events;\n$WHO");
}
my $since_start = log_position($node);
$node->restart;

### Rules 3 and 4.
ok($node->poll_query_until('postgres', $LAUNCHERS, '1'),
	'rule 3: one task_events launcher runs');
ok( $node->poll_query_until(
		'postgres', q{
		SELECT string_agg(d || ' ' || (SELECT count(*) FROM pg_stat_activity a
		                               WHERE a.backend_type = 'task_events worker' AND a.datname = d),
		                  ', ' ORDER BY d)
		FROM unnest('{db1,db2,db3}'::text[]) d},
		'db1 2, db2 2, db3 2'),
	'rule 4: worker_count = 2: two workers in each database with the extension');

### Rule 2, at start.
my $PLAIN = q{
	SELECT count(*) FROM pg_stat_activity
	WHERE backend_type = 'task_events worker' AND datname = 'plain'};
ok($node->poll_query_until('postgres', $PLAIN, '0'),
	'rule 2: after startup, no task_events worker is connected to the database without the extension');

### Rule 1: pgbench in the three databases at the same time.
my %pids = map { $_ => { map { $_ => 1 } worker_pids_in($node, $_) } } @SERVED;
my %load = map { $_ => start_pgbench_in($node, $_, clients => 2, seconds => 8) } @SERVED;
# While the load runs, every database's handlers make progress; meanwhile,
# no worker ever shows up in plain.
my $plain_max = 0;
ok( wait_until(
		sub {
			my $p = $node->safe_psql('postgres', $PLAIN);
			$plain_max = $p if $p > $plain_max;
			return !grep {
				$node->safe_psql($_, 'SELECT count(*) >= 300 FROM task_events.audit_log') ne 't'
			} @SERVED;
		}),
	'rule 1: the handlers of the three databases work while the load runs');
for my $db (@SERVED)
{
	my $h = $load{$db};
	is(stop_pgbench($h), 0, "rule 1: pgbench ran without error in $db");
	like($h->{out}, qr/number of failed transactions: 0\b/, "rule 1: no pgbench transaction failed in $db")
	  if $h->{out} =~ /number of failed transactions/;
	$pids{$db}{$_} = 1 for worker_pids_in($node, $db);
	is(workers_in($node, $db), 2, "rule 4: still two workers in $db after the load");
}
is($plain_max, 0, 'rule 2: no worker was seen in plain while the load ran');

my %event_ids;
for my $db (@SERVED)
{
	wait_caught_up($node, $db);
	my $events = $node->safe_psql($db, 'SELECT count(*) FROM task_events.events');
	cmp_ok($events, '>', 300, "rule 1: the load wrote a fair number of events in $db ($events)");
	handlers_match($node, "rule 1: in $db, every built-in handler's output is exact", db => $db);
	is($node->safe_psql($db, $WHO_WRONG), 0,
		"rule 1: in $db, the recording handler got every event exactly once");
	my @who = grep { $_ ne '' } split /\n/,
	  $node->safe_psql($db, 'SELECT DISTINCT pid FROM public.who ORDER BY 1');
	is_deeply([ grep { !$pids{$db}{$_} } @who ],
		[], "rule 1: the events of $db were handled by $db\'s workers only");
	$event_ids{$db} = {
		map { $_ => 1 } split /\n/,
		$node->safe_psql($db, 'SELECT event_id FROM task_events.events')
	};
}
# Each database's outputs hold its own events only (counters are checked
# against its own log by handlers_match; audit rows by event_id here).
for my $db (@SERVED)
{
	my @audited = split /\n/, $node->safe_psql($db, 'SELECT event_id FROM task_events.audit_log');
	my @foreign = grep {
		my $id = $_;
		grep { $_ ne $db && $event_ids{$_}{$id} } @SERVED
	} @audited;
	is(scalar(@foreign), 0, "rule 1: the audit log of $db holds no event of another database");
}
is($node->safe_psql('postgres', $PLAIN), 0,
	'rule 2: after events in the other databases, still no worker in plain');

### Rule 5: load in db1 and db2 while db4 gets the extension, loses it, and
### db3 is dropped.
my %loop = map { $_ => start_pgbench_loop_in($node, $_, clients => 2) } qw(db1 db2);
for my $db (qw(db1 db2))
{
	my $start = $node->safe_psql($db, 'SELECT max(seq) FROM task_events.events');
	$node->poll_query_until($db, "SELECT max(seq) >= $start + 100 FROM task_events.events")
	  or die "the load writes no events in $db";
}

$node->safe_psql('postgres', 'CREATE DATABASE db4');
$node->safe_psql('db4', 'CREATE EXTENSION task_events');
create_tasks_in($node, 'db4', 1, 'in db4', 'dave');
my $db4_event = $node->safe_psql('db4',
	q{SELECT event_id FROM task_events.events WHERE payload ->> 'task_title' = 'in db4 1'});
ok( $node->poll_query_until('postgres',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'task_events worker' AND datname = 'db4'},
		'2'),
	'rule 5: CREATE EXTENSION under load: two workers connect to the new database');
ok( $node->poll_query_until('db4',
		"SELECT EXISTS (SELECT FROM task_events.audit_log WHERE event_id = '$db4_event')"),
	'rule 5: an event written in the new database is handled');

$node->safe_psql('db4', 'DROP EXTENSION task_events');
ok( $node->poll_query_until('postgres',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'task_events worker' AND datname = 'db4'},
		'0'),
	'rule 5: DROP EXTENSION: the workers of that database leave');

# db3's workers are kept in a batch: a handler that sleeps, with a backlog.
$node->safe_psql(
	'db3', q{
CREATE FUNCTION public.slow(events task_events.events[]) RETURNS void
LANGUAGE sql AS $$ SELECT pg_catalog.pg_sleep(0.2) $$;
SELECT task_events.register_handler('slow', 'public.slow(task_events.events[])');
SELECT count(task_events.create_task('erin', 'backlog ' || i)) FROM generate_series(1, 500) i;
});
$node->poll_query_until(
	'postgres', q{
	SELECT EXISTS (SELECT FROM pg_stat_activity
	               WHERE backend_type = 'task_events worker' AND datname = 'db3' AND wait_event = 'PgSleep')})
  or die 'no worker of db3 got into a batch of the slow handler';
is(workers_in($node, 'db3'), 2, 'rule 5: db3 has its two workers, one in a batch, before the DROP');
my $drop_seq = { map { $_ => $node->safe_psql($_, 'SELECT max(seq) FROM task_events.events') } qw(db1 db2) };
my ($ret, $out, $err) = $node->psql('postgres', 'DROP DATABASE db3', on_error_die => 0, timeout => 120);
is($ret, 0, 'rule 5: DROP DATABASE without FORCE succeeds while the workers of that database run');
diag($err) if $ret;
is($node->safe_psql('postgres', q{SELECT count(*) FROM pg_database WHERE datname = 'db3'}),
	0, 'rule 5: db3 is gone');

# db1 and db2 go on being handled after the DROP, under load.
for my $db (qw(db1 db2))
{
	ok( $node->poll_query_until($db,
			"SELECT EXISTS (SELECT FROM task_events.audit_log WHERE seq > $drop_seq->{$db} + 50)"),
		"rule 5: after the DROP DATABASE, events of $db go on being handled under load");
}
for my $db (qw(db1 db2))
{
	my $h = $loop{$db};
	stop_pgbench($h);
	like($h->{out}, qr/pgbench runs: [1-9]/, "rule 5: the load ran in $db");
	unlike($h->{err}, qr/error|abort|FATAL/i, "rule 5: no pgbench run failed in $db");
	wait_caught_up($node, $db);
	handlers_match($node, "rule 5: after CREATE/DROP EXTENSION and DROP DATABASE, $db is exact", db => $db);
	is($node->safe_psql($db, $WHO_WRONG), 0,
		"rule 5: in $db, the recording handler got every event exactly once");
}
ok( $node->poll_query_until(
		'postgres', q{
		SELECT string_agg(d || ' ' || (SELECT count(*) FROM pg_stat_activity a
		                               WHERE a.backend_type = 'task_events worker' AND a.datname = d),
		                  ', ' ORDER BY d)
		FROM unnest('{db1,db2,db4,plain}'::text[]) d},
		'db1 2, db2 2, db4 0, plain 0'),
	'rules 2, 4, 5: at the end, two workers in db1 and db2, none in db4 (extension dropped) or plain');
is($node->safe_psql('postgres', $LAUNCHERS), 1, 'rule 3: still one launcher at the end');
my @plain_starts = log_grep($node, $since_start, qr/task_events worker \d+ started in database "plain"/);
cmp_ok(scalar(@plain_starts), '<=', 1,
	'rule 2: at most one worker start in plain since the server started (the look at start)');
diag(join("\n", @plain_starts)) if @plain_starts > 1;
$node->stop;

###
### Rule 6: the budget exhausted.
###
my $small = te_node(
	'budget',
	extension => 0,
	conf => "task_events.worker_count = 1\n"
	  . "task_events.poll_interval = 200ms\n"
	  . "max_worker_processes = 3\n"
	  . "max_logical_replication_workers = 0\n"
	  . "max_parallel_workers = 0");
my @DBS = qw(b1 b2 b3 b4);
for my $db (@DBS)
{
	$small->safe_psql('postgres', "CREATE DATABASE $db");
	$small->safe_psql($db, 'CREATE EXTENSION task_events');
}
is($small->safe_psql('b1', q{SELECT current_setting('task_events.notify_mode')}),
	'relay', 'rule 6: notify_mode is relay by default when preloaded');

# The workers column of handler_status in each of the databases given.
my %state;
sub read_states
{
	%state = map {
		$_ => $small->safe_psql($_, q{SELECT string_agg(DISTINCT workers, ' | ') FROM task_events.handler_status})
	} @_;
	return;
}
my $UNSERVED = qr/^unserved: no background worker slot/;
my (@served, @unserved);
ok( wait_until(
		sub {
			read_states(@DBS);
			@served = grep { $state{$_} eq 'running' } @DBS;
			@unserved = grep { $state{$_} =~ $UNSERVED } @DBS;
			return @served == 2 && @unserved == 2
			  && $small->safe_psql('postgres',
				q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'task_events worker'}) == 2;
		}),
	'rule 6: with room for two workers, two databases are served and two are unserved, and handler_status says so'
) or diag(explain \%state);
is_deeply([ map { workers_in($small, $_) } @served, @unserved ],
	[ 1, 1, 0, 0 ], 'rule 6: one worker in each served database, none in the unserved ones');

my $SLOTS = qr/task_events launcher: not enough background worker slots \(max_worker_processes = (\d+)\); databases left unserved: (.*)$/;
my ($max_wp, @named);
ok( wait_until(
		sub {
			my @lines = log_grep($small, 0, $SLOTS);
			return 0 unless @lines;
			($max_wp, my $list) = $lines[-1] =~ $SLOTS;
			@named = map { s/""/"/gr } $list =~ /"((?:[^"]|"")*)"/g;
			return join(',', sort @named) eq join(',', sort @unserved);
		}),
	'rule 6: the launcher logs the databases left unserved');
is_deeply([ sort @named ], [ sort @unserved ], 'rule 6: the log line names exactly the unserved databases');
is($max_wp, 3, 'rule 6: ... and says max_worker_processes');

# Who publishes: the process that sent a notification, and its envelope.
sub hear_event
{
	my ($db, $title) = @_;
	my $listener = $small->background_psql($db);
	$listener->query_safe('LISTEN task_events');
	my $writer = $small->background_psql($db);
	my $writer_pid = $writer->query_safe('SELECT pg_backend_pid()');
	$writer->query_safe(qq{SELECT FROM task_events.create_task('carol', '$title')});
	my ($seq, $type, $payload) = split /\|/, $writer->query_safe(qq{
		SELECT seq, event_type, payload FROM task_events.events
		WHERE payload ->> 'task_title' = '$title'});
	$writer->quit;
	my ($envelope, $sender);
	my $heard = '';
	wait_until(
		sub {
			$heard .= $listener->query_safe('SELECT 1') . "\n";
			for my $line (split /\n/, $heard)
			{
				next unless $line =~
				  /^Asynchronous notification "task_events" with payload "(.*)" received from server process with PID (\d+)\.$/;
				my ($p, $pid) = ($1, $2);
				my $env = eval { decode_json($p) } or next;
				($envelope, $sender) = ($env, $pid) if ($env->{seq} // -1) == $seq;
			}
			return defined $envelope;
		});
	$listener->quit;
	return {
		seq => $seq,
		type => $type,
		payload => decode_json($payload),
		writer => $writer_pid,
		envelope => $envelope,
		sender => $sender,
		heard => $heard
	};
}

my $u = $unserved[0] // 'b4';
my $n = hear_event($u, 'while unserved');
ok(defined $n->{envelope}, "rule 6: in unserved $u, a LISTENer receives the event's envelope")
  or diag("heard: $n->{heard}");
is($n->{sender}, $n->{writer}, "rule 6: ... sent by the writing backend (at its commit)");
is_deeply(
	$n->{envelope} && { map { $_ => $n->{envelope}{$_} } qw(event_type event_data seq) },
	{ event_type => $n->{type}, event_data => $n->{payload}, seq => $n->{seq} },
	'rule 6: ... and the envelope is the event');
is(workers_in($small, $u), 0, "rule 6: no worker serves $u, it is still unserved");

my $s = $served[0] // 'b1';
is($state{$s}, 'running', "rule 6: in served $s, handler_status.workers says running");
my $r = hear_event($s, 'while served');
ok(defined $r->{envelope} && $r->{sender} != $r->{writer}
	  && grep({ $_ == $r->{sender} } worker_pids_in($small, $s)),
	"rule 6: in served $s, the envelope is sent by its worker (relay handler)")
  or diag("writer $r->{writer}, sender " . ($r->{sender} // 'none') . "; heard: $r->{heard}");

# One slot freed (DROP EXTENSION in one served database): one unserved
# database gets it, the log names the one left, and at no moment does the
# launcher say that every database is served (nor does handler_status, which
# writers read to decide whether they publish at commit).
my $pos = log_position($small);
$small->safe_psql($served[0], 'DROP EXTENSION task_events');
my @left;
ok( wait_until(
		sub {
			read_states(@unserved);
			@left = grep { $state{$_} =~ $UNSERVED } @unserved;
			my @now = grep { $state{$_} eq 'running' } @unserved;
			my @lines = log_grep($small, $pos, $SLOTS);
			return @now == 1 && @left == 1
			  && @lines && $lines[-1] =~ /databases left unserved: "\Q$left[0]\E"$/;
		}),
	'rule 6: one slot freed: one unserved database is served, the log names the one left')
  or diag(explain \%state);
is_deeply([ map { s/.*LOG:  //r } log_grep($small, $pos, qr/every database with task_events is served/) ],
	[], 'rule 6: ... and meanwhile the launcher never said that every database was served');

# Both freed: every database is served.
$pos = log_position($small);
$small->safe_psql($served[1], 'DROP EXTENSION task_events');
ok(log_appears($small, qr/task_events launcher: every database with task_events is served/, $pos),
	'rule 6: once slots are free for all, the launcher says every database is served');
for my $db (@unserved)
{
	ok( $small->poll_query_until($db,
			q{SELECT string_agg(DISTINCT workers, ' | ') FROM task_events.handler_status}, 'running'),
		"rule 6: formerly unserved $db says running");
}
wait_caught_up($small, $u);
is( $small->safe_psql($u,
		"SELECT count(*) FROM task_events.audit_log WHERE seq = $n->{seq}"),
	1, "rule 6: the event written in $u while unserved is handled once it is served");
handlers_match($small, "rule 6: $u is exact once served", db => $u);

$small->stop;
done_testing();
