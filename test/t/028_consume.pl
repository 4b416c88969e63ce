# Rules protected here: task_events_consume (consumer/, issue 12), the
# installed program, delivers a subscription at least once, in order per
# task, and nothing of a rolled-back transaction:
# 1. --jsonl and --exec under pgbench load (random rollbacks, rolled-back
#    savepoints), with a transaction that commits late and one that rolls
#    back late, each program killed with SIGKILL at random moments and
#    restarted: at the end every committed event of the subscription's
#    types was delivered, none of another type; every line is the event's
#    envelope (event_type, event_data = the stored payload, timestamp, seq);
#    no event of a rolled-back transaction or savepoint; within one process
#    no event twice, and an event delivered again after a kill is one of
#    the killed process's last batch (--jsonl: among its last --batch lines;
#    --exec: in the batch it ran last); per task, events in version order
#    in each process and in first deliveries;
# 2. the envelope is byte for byte the NOTIFY payload of the same event
#    (channel task_events);
# 3. --once delivers what is ready and exits 0; run again, delivers nothing;
# 4. exit status 2 and exactly one line on stderr for an unknown
#    subscription, an invalid option, a lane the subscription lacks; with
#    --once, 1 when a batch failed;
# 5. --exec: a command that fails on one event: at the batch's last attempt
#    (task_events.max_attempts) the batch is split, that event alone is
#    dead-lettered, every other event is delivered; the same for a role that
#    has task_events_consumer only;
# 6. SIGTERM while a batch is in hand (the command still running): that
#    batch is delivered and acknowledged whole, no other batch is read, exit
#    0; SIGTERM while waiting: exit 0;
# 7. a server restart while the program runs: it reconnects and goes on
#    delivering; it says so in one line per state change ("connection
#    lost", "connected"), not one per retry, while the server is down;
# 8. --post to a webhook on 127.0.0.1 (HTTP::Daemon) that answers 500 at
#    random, sometimes answers only after the program's --timeout, answers
#    429 with Retry-After once, and 400 to one chosen event, under pgbench
#    load: every other event of the subscription's types arrives (a 2xx
#    answer), each request with Content-Type application/json, the event_id
#    as Idempotency-Key and a valid X-Task-Events-Signature (HMAC-SHA256 of
#    the body with TASK_EVENTS_WEBHOOK_SECRET); per task, requests in seq
#    order; after a 429 the same event is not sent again before its
#    Retry-After; the chosen event is dead-lettered at once (sent once,
#    attempts 1) with the status and the body as its error; a
#    batch that cannot be delivered within its lease (a slow webhook) still
#    goes through: the events delivered are acknowledged, the rest offered
#    again, nothing is dead-lettered;
# 9. two programs (--exec) on a subscription with four lanes under load:
#    every event delivered exactly once (no kill, no lease expired), both
#    programs delivered some, each batch holds events of its lane only, in
#    seq order, and each lane's batches, in the order they were read by
#    either program, keep each task's events in version order; with
#    --progress, a status line on stderr;
# 10. --lane: two programs, one per lane of a two-lane subscription, under
#    load: each delivers the events of its own lane only, every event once.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use File::Path qw(make_path);
use POSIX ();
use IPC::Run;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Digest::SHA qw(hmac_sha256_hex);
use HTTP::Daemon;
use HTTP::Response;
use Time::HiRes qw(usleep);

use TaskEventsTest;

my $JSON = JSON::PP->new;
my $BATCH = 20;
my $LEASE = 2;

my $node = te_node(
	'consume',
	conf => "task_events.max_attempts = 3\n"
	  . "task_events.retry_delay = '20ms'\n"
	  . "max_connections = 40");
my $dir = $node->basedir . '/consume';
make_path($dir);

# The connection string the program gets: database postgres, as
# $consume_user when set (else the superuser).
our $consume_user;
sub consume_connstr
{
	return $node->connstr('postgres') . ($consume_user ? " user=$consume_user" : '');
}

# Start task_events_consume in the background, stdout and stderr to files;
# returns a handle for consume_signal.
my $started = 0;
my %program_pids;
sub consume_start
{
	my ($sub, @args) = @_;
	$started++;
	my $c = {
		out => "$dir/$sub.$started.out",
		err => "$dir/$sub.$started.err",
	};
	my @cmd = ('task_events_consume', '-d', consume_connstr(), '-s', $sub, @args);
	note "starting in the background: @cmd";
	my $pid = fork();
	die "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		open(STDIN, '<', '/dev/null') or die;
		open(STDOUT, '>', $c->{out}) or die;
		open(STDERR, '>', $c->{err}) or die;
		exec(@cmd) or POSIX::_exit(127);    # no END block in a child
	}
	$c->{pid} = $pid;
	$program_pids{$pid} = 1;
	return $c;
}

# Send sig to the program and wait for it to exit; returns its exit status
# (-1 when a signal ended it).
sub consume_signal
{
	my ($c, $sig) = @_;
	kill $sig, $c->{pid} if defined $sig;
	my $status;
	wait_until(sub { waitpid($c->{pid}, POSIX::WNOHANG()) == $c->{pid} and $status = $?; return defined $status; })
	  or die "task_events_consume ($c->{out}) did not exit";
	note "$c->{out}: stderr:\n" . slurp_file($c->{err});
	return ($status & 127) ? -1 : $status >> 8;
}

# Run the program to its end; returns (exit status, stdout, stderr).
sub consume_run
{
	my ($sub, @args) = @_;
	my ($out, $err) = ('', '');
	my @cmd = ('task_events_consume', '-d', consume_connstr(), '-s', $sub, @args);
	note "running: @cmd";
	IPC::Run::run(\@cmd, '<', \undef, '>', \$out, '2>', \$err,
		IPC::Run::timeout($PostgreSQL::Test::Utils::timeout_default));
	note "stderr: $err";
	return ($? >> 8, $out, $err);
}

# Complete lines of a file (a line cut by a kill is not delivered).
sub complete_lines
{
	my ($file) = @_;
	return () unless -e $file;
	my $text = slurp_file($file);
	$text =~ s/[^\n]*\z//;
	return split /\n/, $text;
}

# The events of the log, by seq: [event_id, event_type, aggregate_id,
# aggregate_version, payload text, title].
sub log_events
{
	my %ev;
	for my $row (split /\n/,
		$node->safe_psql(
			'postgres', q{
		SELECT seq, event_id, event_type, aggregate_id, aggregate_version, payload::text
		FROM task_events.events ORDER BY seq}))
	{
		my ($seq, @f) = split /\|/, $row, 6;
		$ev{$seq} = \@f;
	}
	return \%ev;
}

# Check delivered lines against the log: each is an event's envelope.
# Returns the list of problems (empty when all is right).
sub envelope_problems
{
	my ($log, $types, @lines) = @_;
	my @bad;
	for my $line (@lines)
	{
		my $e = eval { $JSON->decode($line) };
		if (!$e)
		{
			push @bad, "not JSON: $line";
			next;
		}
		my $ev = $log->{ $e->{seq} // '' };
		if (!$ev)
		{
			push @bad, "seq $e->{seq} is no committed event: $line";
			next;
		}
		my $payload = $JSON->decode($ev->[4]);
		push @bad, "seq $e->{seq}: envelope differs from the event: $line"
		  unless $e->{event_type} eq $ev->[1]
		  && JSON::PP->new->canonical->encode($e->{event_data}) eq
		  JSON::PP->new->canonical->encode($payload)
		  && $e->{timestamp} eq $payload->{timestamp}
		  && join(',', sort keys %$e) eq 'event_data,event_type,seq,timestamp';
		push @bad, "seq $e->{seq}: type $ev->[1] is not one of the subscription's"
		  unless $types->{ $ev->[1] };
	}
	return @bad;
}

# Per task, versions increasing along a list of seqs; returns problems.
sub order_problems
{
	my ($log, $what, @seqs) = @_;
	my (%last, @bad);
	for my $seq (@seqs)
	{
		my ($task, $version) = @{ $log->{$seq} }[ 2, 3 ];
		push @bad, "$what: task $task version $version after version $last{$task}"
		  if defined $last{$task} && $version <= $last{$task};
		$last{$task} = $version;
	}
	return @bad;
}

# A pgbench run of pgbench_script() at a limited rate (transactions per
# second), in the background; returns a handle for stop_pgbench.
sub start_pgbench_rate
{
	my ($rate, $seconds) = @_;
	my $file = "$dir/load.sql";
	append_to_file($file, pgbench_script()) unless -e $file;
	$node->safe_psql('postgres', $TaskEventsTest::PGBENCH_SETUP_SQL);
	my $h = { out => '', err => '' };
	my @cmd = ('pgbench', '-n', '-h', $node->host, '-p', $node->port, '-c', 2, '-j', 2,
		'-R', $rate, '-T', $seconds, '-f', $file, 'postgres');
	note "starting in the background: @cmd";
	$h->{run} = IPC::Run::start(\@cmd, '>', \$h->{out}, '2>', \$h->{err});
	return $h;
}

# Polls until every lane of the subscriptions has delivered everything and
# holds no batch (all acknowledged).
sub caught_up
{
	my $names = join(', ', map { "'$_'" } @_);
	return $node->poll_query_until(
		'postgres', qq{
		SELECT bool_and(events_behind = 0 AND batch_id IS NULL)
		FROM task_events.subscription_status WHERE subscription IN ($names)});
}

my %ALL = map { $_ => 1 } qw(TaskCreated TaskStatusChanged TaskCompleted);
my %EXEC_TYPES = map { $_ => 1 } qw(TaskCreated TaskCompleted);

###
### Rules 1 and 7: --jsonl and --exec under load, killed and restarted; a
### server restart.
###
$node->safe_psql(
	'postgres', q{
	SELECT task_events.create_subscription('lines', start_at => 'beginning');
	SELECT task_events.create_subscription('runs', '{TaskCreated,TaskCompleted}', 'beginning');
});
my @exec_args = (
	'--exec', "cat > '$dir/batch.'\$TASK_EVENTS_BATCH_ID.\$PPID",
	'--batch', $BATCH, '--lease', $LEASE);
my @jsonl_args = ('--batch', $BATCH, '--lease', $LEASE);

my $load = start_pgbench_loop($node, clients => 2);

# A transaction that commits late, one that rolls back late.
my $late = $node->background_psql('postgres');
$late->query_safe('BEGIN');
my $late_task = $late->query_safe("SELECT task_id FROM task_events.create_task('late', 'late commit')");
my $doomed = $node->background_psql('postgres');
$doomed->query_safe('BEGIN');
$doomed->query_safe("SELECT task_id FROM task_events.create_task('doomed', 'late rollback')");

# The segments: each process's output; jsonl ones are files of lines,
# exec ones are known by the batch ids they ran (their files).
my @jsonl_segments;
my $lines = consume_start('lines', @jsonl_args);
my $runs = consume_start('runs', @exec_args);
my $kills = 0;
for my $round (1 .. 4)
{
	for my $which ('lines', 'runs')
	{
		# Kill once it has delivered something new, a random moment later.
		my $c = $which eq 'lines' ? $lines : $runs;
		my $count = sub {
			return $which eq 'lines' ? scalar(complete_lines($c->{out})) : scalar(() = glob("$dir/batch.*"));
		};
		my $seen = $count->();
		wait_until(sub { $count->() > $seen }) or die "$which delivers nothing under load";
		usleep(int(rand(400_000)));
		is(consume_signal($c, 'KILL'), -1, "rule 1: $which killed by SIGKILL (round $round)");
		$kills++;
		if ($which eq 'lines')
		{
			push @jsonl_segments, $c->{out};
			$lines = consume_start('lines', @jsonl_args);
		}
		else
		{
			$runs = consume_start('runs', @exec_args);
		}
	}
}

# The late transactions end after many later events were delivered.
my $late_seq = $late->query_safe("SELECT seq FROM task_events.events WHERE aggregate_id = '$late_task'");
$late->query_safe('COMMIT');
$late->quit;
$doomed->query_safe('ROLLBACK');
$doomed->quit;

# Rule 7 under the same load: the server stops, stays down while the
# program retries (a few seconds: its backoff is 1, 2, 4 s; a duration, not
# a synchronisation), and starts again.
my $lines_err = $lines->{err};
$node->stop('fast');
ok(wait_until(sub { slurp_file($lines_err) =~ /connection lost/ }),
	'rule 7: the program noticed the server stopped');
sleep(4);
$node->start;
ok(wait_until(sub { slurp_file($lines_err) =~ /connected to database/ }),
	'rule 7: once the server is back the program says it is connected again');
is(stop_pgbench($load), 0, 'rule 1: the pgbench load ran');
create_tasks($node, 5, 'after the restart', 'ivan');

ok(caught_up('lines', 'runs'),
	'rule 1: both subscriptions are caught up, every batch acknowledged');
is(consume_signal($lines, 'TERM'), 0, 'rule 6: SIGTERM while waiting: --jsonl exits 0');
is(consume_signal($runs, 'TERM'), 0, 'rule 6: SIGTERM while waiting: --exec exits 0');
push @jsonl_segments, $lines->{out};

my $log = log_events();
cmp_ok(scalar(keys %$log), '>', 300, 'rule 1: the load wrote a fair number of events');
my @rolled_back = grep { $_->[4] =~ /savepoint rolled back|late rollback/ } values %$log;
is(scalar(@rolled_back), 0, 'rule 1: the log holds no event of the rolled-back work');

# --jsonl: every committed event, each line an envelope, duplicates only of
# the batch in flight at a kill, order per task.
{
	my (@all, @seqs_of, @dup_bad, @order_bad, @within, @firsts, %done);
	for my $f (@jsonl_segments)
	{
		my @l = complete_lines($f);
		push @all, @l;
		push @seqs_of, [ map { ($JSON->decode($_))->{seq} } @l ];
	}
	for my $i (0 .. $#seqs_of)
	{
		my @seqs = @{ $seqs_of[$i] };
		my %count;
		$count{$_}++ for @seqs;
		push @within, grep { $count{$_} > 1 } sort keys %count;
		push @order_bad, order_problems($log, "jsonl process $i", @seqs);
		push @firsts, grep { !$done{$_}++ } @seqs;
		# Its events delivered again by a later process: of its last batch.
		my $from = @seqs > $BATCH ? @seqs - $BATCH : 0;
		my %tail = map { $_ => 1 } @seqs[ $from .. $#seqs ];
		my %later = map { $_ => 1 } map { @$_ } @seqs_of[ $i + 1 .. $#seqs_of ];
		push @dup_bad, grep { $later{$_} && !$tail{$_} } @seqs;
	}
	is_deeply([ envelope_problems($log, \%ALL, @all) ], [], 'rule 1: --jsonl: every line is a committed event\'s envelope');
	my @missing = grep { !$done{$_} } sort { $a <=> $b } keys %$log;
	is_deeply(\@missing, [], 'rule 1: --jsonl: every committed event was delivered');
	ok($done{$late_seq}, 'rule 1: --jsonl: the late commit was delivered');
	is_deeply(\@within, [], 'rule 1: --jsonl: no process delivered an event twice');
	is_deeply(\@dup_bad, [],
		'rule 1: --jsonl: an event delivered again after a kill was in the killed process\'s last batch');
	is_deeply(\@order_bad, [], 'rule 1: --jsonl: per task, events in version order in each process');
	is_deeply([ order_problems($log, 'jsonl first deliveries', @firsts) ],
		[], 'rule 1: --jsonl: per task, first deliveries in version order');
}

# --exec: the files batch.<batch id>.<pid of the program that ran it>.
{
	my (%batches_of, %times, @all, @order_bad, @firsts, %done);
	my @files = sort { ($a =~ /batch\.(\d+)\./)[0] <=> ($b =~ /batch\.(\d+)\./)[0] } glob("$dir/batch.*");
	for my $f (@files)
	{
		my ($batch, $pid) = $f =~ /batch\.(\d+)\.(\d+)$/;
		my @l = complete_lines($f);
		my @seqs = map { ($JSON->decode($_))->{seq} } @l;
		push @all, @l;
		push @{ $batches_of{$pid} }, [ $batch, @seqs ];
		$times{$_}++ for @seqs;
		push @firsts, grep { !$done{$_}++ } @seqs;
		push @order_bad, order_problems($log, "exec batch $batch", @seqs);
	}
	is_deeply([ envelope_problems($log, \%EXEC_TYPES, @all) ],
		[], 'rule 1: --exec: every line is a committed event\'s envelope, of the subscription\'s types');
	my @missing = grep { !$times{$_} && $EXEC_TYPES{ $log->{$_}[1] } } sort { $a <=> $b } keys %$log;
	is_deeply(\@missing, [], 'rule 1: --exec: every committed event of its types was delivered');
	ok($done{$late_seq}, 'rule 1: --exec: the late commit (a TaskCreated) was delivered');
	# An event run again: every batch that ran it before is the last batch
	# of its program (in flight at a kill).
	my (%last_batch, %batches_with, @dup_bad);
	for my $pid (keys %batches_of)
	{
		$last_batch{$pid} = $batches_of{$pid}[-1][0];
		for my $b (@{ $batches_of{$pid} })
		{
			push @{ $batches_with{$_} }, $b->[0] for @$b[ 1 .. $#$b ];
		}
	}
	for my $pid (sort keys %batches_of)
	{
		for my $b (@{ $batches_of{$pid} })
		{
			my ($batch, @seqs) = @$b;
			# A command whose parent is not one of the programs (but init) was
			# started as its program was killed: in flight.
			next if $batch == $last_batch{$pid} || !$program_pids{$pid};
			push @dup_bad, map { "seq $_ of batch $batch (process $pid) ran again" }
			  grep { my $s = $_; grep { $_ > $batch } @{ $batches_with{$s} } } @seqs;
		}
	}
	is_deeply(\@dup_bad, [],
		'rule 1: --exec: an event run again was in the last batch of a killed program');
	is_deeply(\@order_bad, [], 'rule 1: --exec: per task, events in version order in each batch');
	is_deeply([ order_problems($log, 'exec first deliveries', @firsts) ],
		[], 'rule 1: --exec: per task, first deliveries in version order');
}

# Rule 7's log: one line per state change.
{
	my $err = slurp_file($lines_err);
	my @lost = $err =~ /connection lost/g;
	my @back = $err =~ /connected to database/g;
	my @retry = $err =~ /could not connect/g;
	is(scalar(@lost) . ' ' . scalar(@retry) . ' ' . scalar(@back), '1 0 1',
		'rule 7: one "connection lost" and one "connected" line for the outage, none per retry');
}

###
### Rule 2: the envelope is the NOTIFY payload.
###
$node->safe_psql('postgres', q{SELECT task_events.create_subscription('same')});
my $listener = $node->background_psql('postgres');
$listener->query_safe('LISTEN task_events');
my $same_task = $node->safe_psql('postgres', q{SELECT task_id FROM task_events.create_task('erin', 'quote " and \ and é')});
my $notified = '';
ok( wait_until(
		sub {
			$notified .= $listener->query_safe('SELECT 1');
			return $notified =~ /payload "(.*)" received/;
		}),
	'rule 2: the listener got the NOTIFY payload');
my ($payload) = $notified =~ /payload "(.*)" received/;
$listener->quit;
my ($rc, $out, $err) = consume_run('same', '--once');
is($rc, 0, 'rule 3: --once exits 0');
is($out, "$payload\n", 'rule 2: the line is byte for byte the NOTIFY payload');

###
### Rules 3 and 4: --once, exit statuses.
###
$node->safe_psql('postgres', q{SELECT task_events.create_subscription('once', lanes => 3)});
create_tasks($node, 12, 'once', 'frank');
($rc, $out, $err) = consume_run('once', '--once', '--batch', 5);
is($rc, 0, 'rule 3: --once exits 0 after delivering');
my @once = split /\n/, $out;
is(scalar(@once), 12, 'rule 3: --once delivered the 12 events ready (3 lanes, batches of 5)');
is($node->safe_psql('postgres', q{SELECT sum(events_behind) FROM task_events.subscription_status WHERE subscription = 'once'}),
	0, 'rule 3: and acknowledged them');
($rc, $out, $err) = consume_run('once', '--once');
is("$rc [$out]", '0 []', 'rule 3: run again, --once delivers nothing and exits 0');

for my $case (
	[ [ '-s', 'nosuch' ], qr/^task_events_consume: subscription "nosuch" does not exist\n\z/, 'an unknown subscription' ],
	[ [ '-s', 'once', '--batch', 0 ], qr/^task_events_consume: --batch must be an integer from 1 to 100000, not "0" .*\n\z/, 'an invalid option' ],
	[ [ '-s', 'once', '--lane', 3 ], qr/^task_events_consume: --lane 3 does not exist: subscription "once" has lanes 0 to 2\n\z/, 'a lane the subscription lacks' ],
	[ [ '-s', 'once', '--exec', 'true', '--post', 'http://127.0.0.1:1/' ], qr/^task_events_consume: --jsonl, --exec and --post exclude each other .*\n\z/, 'two modes' ])
{
	my ($args, $re, $what) = @$case;
	my ($o, $e) = ('', '');
	IPC::Run::run([ 'task_events_consume', '-d', $node->connstr('postgres'), '--once', @$args ],
		'<', \undef, '>', \$o, '2>', \$e, IPC::Run::timeout($PostgreSQL::Test::Utils::timeout_default));
	is($? >> 8, 2, "rule 4: exit status 2 for $what");
	like($e, $re, "rule 4: one line on stderr for $what");
}

###
### Rule 5: --exec, a command that fails on one event.
###
# As a superuser, and as a role with task_events_consumer only.
$node->safe_psql('postgres', 'CREATE ROLE regress_consumer LOGIN IN ROLE task_events_consumer');
my ($status_ret) = $node->psql('postgres', 'SELECT count(*) FROM task_events.subscription_status',
	extra_params => [ '-U', 'regress_consumer' ]);
is($status_ret, 0, 'task_events_consumer can read subscription_status');
for my $case ([ 'poison', undef ], [ 'poison_consumer', 'regress_consumer' ])
{
	my ($sub, $user) = @$case;
	local $consume_user = $user;
	my $as = $user ? " (as $user)" : '';
	$node->safe_psql('postgres', qq{SELECT task_events.create_subscription('$sub')});
	create_tasks($node, 4, "$sub before", 'gina');
	create_tasks($node, 1, "$sub poison", 'gina');
	create_tasks($node, 4, "$sub after", 'gina');
	my $cmd = qq{cat > '$dir/$sub.in'; if grep -q '"task_title": "$sub poison 1"' '$dir/$sub.in'; then exit 3; fi; cat '$dir/$sub.in' >> '$dir/$sub.ok'};
	($rc, $out, $err) = consume_run($sub, '--once', '--exec', $cmd);
	is($rc, 1, "rule 4: --once exits 1 when a batch failed$as");
	my $c = consume_start($sub, '--exec', $cmd);
	ok( $node->poll_query_until(
			'postgres', qq{
			SELECT events_behind = 0 AND dead_letters = 1 AND batch_id IS NULL
			FROM task_events.subscription_status WHERE subscription = '$sub'}),
		"rule 5: the subscription moved past the failing event$as");
	is(consume_signal($c, 'TERM'), 0, "rule 6: SIGTERM: exit 0$as");
	is( $node->safe_psql(
			'postgres', qq{
			SELECT string_agg(e.payload ->> 'task_title' || ' ' || d.attempts || ' ' || d.message, ',')
			FROM task_events.subscription_dead_letters d JOIN task_events.events e USING (seq)
			WHERE d.subscription = '$sub'}),
		"$sub poison 1 3 command exited with status 3",
		"rule 5: the failing event alone is dead-lettered, after max_attempts attempts$as");
	my %ok_titles = map { ($JSON->decode($_))->{event_data}{task_title} => 1 } complete_lines("$dir/$sub.ok");
	is_deeply([ sort keys %ok_titles ],
		[ sort((map { "$sub before $_" } 1 .. 4), (map { "$sub after $_" } 1 .. 4)) ],
		"rule 5: every other event was delivered$as");
	like(slurp_file($c->{err}) . $err, qr/splitting it to find the event that fails/,
		"rule 5: the batch was split$as");
}

###
### Rule 6: SIGTERM with a batch in hand.
###
$node->safe_psql('postgres', q{SELECT task_events.create_subscription('term')});
create_tasks($node, 3, 'term', 'hank');
my $gate = "$dir/term.go";
my $term = consume_start('term', '--exec',
	qq{cat > '$dir/term.in'; touch '$dir/term.started'; while [ ! -e '$gate' ]; do sleep 0.05; done});
ok(wait_until(sub { -e "$dir/term.started" }), 'rule 6: the command runs with the batch');
kill 'TERM', $term->{pid};
# Events written after the stop request are not read.
create_tasks($node, 2, 'after term', 'hank');
append_to_file($gate, '');
is(consume_signal($term, undef), 0, 'rule 6: SIGTERM with a batch in hand: exit 0');
is( $node->safe_psql(
		'postgres', q{
		SELECT acknowledged || ' ' || events_behind || ' ' || (batch_id IS NULL)
		FROM task_events.subscription_status WHERE subscription = 'term'}),
	'3 2 true',
	'rule 6: the batch in hand was acknowledged whole, nothing else was read');
is(scalar(complete_lines("$dir/term.in")), 3, 'rule 6: the command got the whole batch');

###
### Rule 8: --post to a webhook.
###
my $SECRET = 'the webhook secret';
my $hook_log = "$dir/hook.log";
my $daemon = HTTP::Daemon->new(LocalAddr => '127.0.0.1', LocalPort => 0, ReuseAddr => 1)
  or die "cannot start the webhook: $!";
my $url = $daemon->url . 'events';
my $hook_pid = fork();
die "fork: $!" unless defined $hook_pid;
if ($hook_pid == 0)
{
	# The webhook: one connection at a time; each request logged (tab
	# separated) before it is answered.
	$SIG{PIPE} = 'IGNORE';
	my ($n, $sent_429, $sent_500, $sent_late) = (0, 0, 0, 0);
	# No END block in a child: they would stop the node.
	$SIG{TERM} = sub { POSIX::_exit(0) };
	while (my $conn = $daemon->accept)
	{
		while (my $req = $conn->get_request)
		{
			$n++;
			my $body = $req->content;
			my $e = eval { decode_json($body) } || {};
			my $title = $e->{event_data}{task_title} // '';
			my ($status, $sleep) = (200, 0);
			if ($req->uri->path eq '/slow') { }
			elsif ($title =~ /^rejected by the webhook/) { $status = 400 }
			elsif (!$sent_429 && $n > 5) { ($status, $sent_429) = (429, 1) }
			# Each at random, and once for sure.
			elsif (!$sent_500 || rand() < 0.1) { ($status, $sent_500) = (500, 1) }
			# Late answers only after the 429: a request the program gave up
			# on waits in the queue of this one-at-a-time webhook, and a 429
			# answered to it would never reach the program.
			elsif ($sent_429 && (($n > 10 && !$sent_late) || rand() < 0.03)) { ($sleep, $sent_late) = (1.5, 1) }    # past --timeout
			my $sig = $req->header('X-Task-Events-Signature') // '';
			open(my $log, '>>', $hook_log) or POSIX::_exit(1);
			print $log join("\t",
				Time::HiRes::time(), $status, $sleep,
				$sig eq 'sha256=' . hmac_sha256_hex($body, $SECRET) ? 'signed' : "bad signature '$sig'",
				$req->method . ' ' . $req->uri->path,
				$req->header('Content-Type') // '',
				$req->header('Idempotency-Key') // '',
				$e->{event_data}{event_id} // '',
				$e->{seq} // '', $e->{event_data}{aggregate_id} // '', $title, $body), "\n";
			close($log);
			$sleep = 0.3 if $req->uri->path eq '/slow';
			Time::HiRes::sleep($sleep) if $sleep;
			my $resp = HTTP::Response->new($status);
			$resp->header('Retry-After' => 2) if $status == 429;
			$resp->content($status == 400 ? "rejected:\nthe test refuses this event" : 'ok');
			$conn->send_response($resp);
		}
		$conn->close;
	}
	POSIX::_exit(0);
}
my $hook_start = $node->safe_psql('postgres', 'SELECT coalesce(max(seq), 0) FROM task_events.events');
$node->safe_psql('postgres', q{SELECT task_events.create_subscription('hook', '{TaskCreated,TaskCompleted}', lanes => 2)});
my $hook;
{
	local $ENV{TASK_EVENTS_WEBHOOK_SECRET} = $SECRET;
	$hook = consume_start('hook', '--post', $url, '--timeout', '0.5');
}
my $hook_load = start_pgbench_rate(30, 3);
create_tasks($node, 1, 'rejected by the webhook', 'judy');
is(stop_pgbench($hook_load), 0, 'rule 8: the pgbench load ran');
ok( $node->poll_query_until(
		'postgres', q{
		SELECT bool_and(events_behind = 0 AND batch_id IS NULL) AND sum(dead_letters) = 1
		FROM task_events.subscription_status WHERE subscription = 'hook'}),
	'rule 8: the subscription is caught up, one dead letter');
is(consume_signal($hook, 'TERM'), 0, 'rule 8: SIGTERM: exit 0');

{
	my @req = map { [ split /\t/, $_, -1 ] } complete_lines($hook_log);
	my $hlog = log_events();
	my @expected = grep {
		$_ > $hook_start && $EXEC_TYPES{ $hlog->{$_}[1] } && $hlog->{$_}[4] !~ /rejected by the webhook/
	} sort { $a <=> $b } keys %$hlog;
	my %arrived = map { $_->[8] => 1 } grep { $_->[1] =~ /^2/ } @req;
	cmp_ok(scalar(@expected), '>', 50, 'rule 8: the load wrote a fair number of events of the types');
	is_deeply([ grep { !$arrived{$_} } @expected ], [], 'rule 8: every other event arrived');
	is_deeply(
		[ map { "$_->[8]: $_->[3], $_->[4], $_->[5], key $_->[6] for event $_->[7]" } grep {
				$_->[3] ne 'signed' || $_->[4] ne 'POST /events' || $_->[5] ne 'application/json' || $_->[6] ne $_->[7]
		} @req ],
		[],
		'rule 8: every request is a signed JSON POST with the event_id as Idempotency-Key');
	is_deeply([ envelope_problems($hlog, \%EXEC_TYPES, map { $_->[11] } @req) ],
		[], 'rule 8: every body is a committed event\'s envelope, of the subscription\'s types');
	my %seen_status = map { $_->[1] => 1 } @req;
	ok($seen_status{500} && $seen_status{429} && grep({ $_->[2] > 0 } @req),
		'rule 8: the webhook answered 500, 429 and too late at least once each');
	my (%last, @order_bad);
	for my $r (@req)
	{
		my ($seq, $task) = @$r[ 8, 9 ];
		push @order_bad, "task $task: seq $seq after $last{$task}"
		  if defined $last{$task} && $seq < $last{$task};
		$last{$task} = $seq;
	}
	is_deeply(\@order_bad, [], 'rule 8: per task, requests in seq order');
	my ($i429) = grep { $req[$_][1] == 429 } 0 .. $#req;
	my ($next) = grep { $req[$_][6] eq $req[$i429][6] } $i429 + 1 .. $#req;
	ok(defined $next && $req[$next][0] - $req[$i429][0] >= 1.9,
		'rule 8: after a 429 with Retry-After: 2 the event was sent again no sooner');
	my @rejected = grep { $_->[10] eq 'rejected by the webhook 1' } @req;
	is(scalar(@rejected), 1, 'rule 8: the rejected event was sent once: a 4xx is not retried');
	is( $node->safe_psql(
			'postgres', q{
			SELECT e.payload ->> 'task_title' || ': attempts ' || d.attempts || ': ' || d.message
			FROM task_events.subscription_dead_letters d JOIN task_events.events e USING (seq)
			WHERE d.subscription = 'hook'}),
		'rejected by the webhook 1: attempts 1: HTTP 400: rejected: the test refuses this event',
		'rule 8: the event answered 400 is dead-lettered at its first attempt, with the status and body as error');
}

# A batch that cannot be delivered within its lease: the path /slow answers
# after 0.3 s, batches of 20 events have a lease of 2 s.  The events
# delivered before the lease runs out are acknowledged (a nack at the next
# one), the rest offered again: all arrive, none is dead-lettered.
$node->safe_psql('postgres', q{SELECT task_events.create_subscription('slowhook', '{TaskCreated}')});
create_tasks($node, 20, 'slow', 'kate');
my $slow_from = scalar(complete_lines($hook_log));
my $slowhook = consume_start('slowhook', '--post', $daemon->url . 'slow', '--batch', 20, '--lease', 2);
ok(caught_up('slowhook'),
	'rule 8: batches longer than their lease: the subscription is caught up');
is(consume_signal($slowhook, 'TERM'), 0, 'rule 8: SIGTERM: exit 0');
kill 'TERM', $hook_pid;
waitpid($hook_pid, 0);
{
	my @req = map { [ split /\t/, $_, -1 ] } (complete_lines($hook_log))[ $slow_from .. scalar(complete_lines($hook_log)) - 1 ];
	my %arrived = map { $_->[10] => 1 } grep { $_->[1] =~ /^2/ && $_->[4] eq 'POST /slow' } @req;
	is(join(',', grep { !$arrived{"slow $_"} } 1 .. 20), '', 'rule 8: every event of the slow batches arrived');
	like(
		$node->safe_psql(
			'postgres', q{
			SELECT failed || ' ' || dead_letters || ' ' || last_error FROM task_events.subscription_status
			WHERE subscription = 'slowhook'}),
		qr/^[1-9]\d* 0 delivered \d+ of \d+ events before the lease ran out/,
		'rule 8: the lease ran out in a batch: its delivered events were acknowledged, nothing dead-lettered');
}

###
### Rule 9: two programs, four lanes.
###
$node->safe_psql('postgres', q{SELECT task_events.create_subscription('quad', lanes => 4)});
my $quad_start = $node->safe_psql('postgres', 'SELECT coalesce(max(seq), 0) FROM task_events.events');
# Files quad.<lane>.<batch id>.<pid of the program>: batch ids grow in the
# order batches are read, whichever program reads them.
my @quad = map {
	consume_start('quad', '--batch', 20, '--progress', '--exec',
		"cat > '$dir/quad.'\$TASK_EVENTS_LANE.\$TASK_EVENTS_BATCH_ID.\$PPID")
} 1 .. 2;
my $quad_load = start_pgbench_rate(100, 4);
is(stop_pgbench($quad_load), 0, 'rule 9: the pgbench load ran');
ok(caught_up('quad'),
	'rule 9: the four lanes are caught up');
my $PROGRESS = qr/^task_events_consume: [0-9.]+ events\/s, lane \d, batch \d+, \d+ events behind, 0 failed attempts$/m;
ok(wait_until(sub { slurp_file($quad[0]{err}) =~ $PROGRESS }), 'rule 9: --progress prints a status line');
is(consume_signal($_, 'TERM'), 0, 'rule 9: SIGTERM: exit 0') for @quad;
{
	my $qlog = log_events();
	my %lane_of = map { split /\|/ } split /\n/,
	  $node->safe_psql('postgres',
		"SELECT seq, task_events._lane_of(aggregate_id, 4) FROM task_events.events WHERE seq > $quad_start");
	my (%times, %by_program, @wrong_lane, @order_bad, %lane_seqs);
	my @files = sort { ($a =~ /quad\.\d+\.(\d+)\./)[0] <=> ($b =~ /quad\.\d+\.(\d+)\./)[0] } glob("$dir/quad.*.*.*");
	for my $f (@files)
	{
		my ($lane, $batch, $pid) = $f =~ /quad\.(\d+)\.(\d+)\.(\d+)$/;
		my @seqs = map { ($JSON->decode($_))->{seq} } complete_lines($f);
		$by_program{$pid} += @seqs;
		$times{$_}++ for @seqs;
		push @wrong_lane, map { "seq $_ (lane $lane_of{$_}) in a batch of lane $lane" }
		  grep { ($lane_of{$_} // -1) != $lane } @seqs;
		push @{ $lane_seqs{$lane} }, @seqs;
		push @order_bad, "batch $batch not in seq order" if join(',', @seqs) ne join(',', sort { $a <=> $b } @seqs);
	}
	push @order_bad, order_problems($qlog, "lane $_", @{ $lane_seqs{$_} }) for sort keys %lane_seqs;
	my @expected = grep { $_ > $quad_start } sort { $a <=> $b } keys %$qlog;
	cmp_ok(scalar(@expected), '>', 100, 'rule 9: the load wrote a fair number of events');
	is_deeply([ grep { ($times{$_} // 0) != 1 } @expected ], [], 'rule 9: every event delivered exactly once');
	is(scalar(grep { $_ <= $quad_start } keys %times), 0, 'rule 9: no other event delivered');
	is(scalar(grep { $program_pids{$_} && $by_program{$_} > 0 } keys %by_program),
		2, 'rule 9: both programs delivered events (' . join(', ', values %by_program) . ')');
	is_deeply(\@wrong_lane, [], 'rule 9: each batch holds events of its lane only');
	is_deeply(\@order_bad, [],
		'rule 9: each lane, its batches in the order read by either program, keeps each task\'s order');
}

###
### Rule 10: --lane.
###
$node->safe_psql('postgres', q{SELECT task_events.create_subscription('pinned', lanes => 2)});
my $pinned_start = $node->safe_psql('postgres', 'SELECT coalesce(max(seq), 0) FROM task_events.events');
my @pinned = map { consume_start('pinned', '--lane', $_) } 0 .. 1;
my $pinned_load = start_pgbench_rate(50, 3);
is(stop_pgbench($pinned_load), 0, 'rule 10: the pgbench load ran');
ok(caught_up('pinned'),
	'rule 10: both lanes are caught up');
is(consume_signal($_, 'TERM'), 0, 'rule 10: SIGTERM: exit 0') for @pinned;
{
	my %lane_of = map { split /\|/ } split /\n/,
	  $node->safe_psql('postgres',
		"SELECT seq, task_events._lane_of(aggregate_id, 2) FROM task_events.events WHERE seq > $pinned_start");
	my (%times, @wrong);
	for my $lane (0 .. 1)
	{
		my @seqs = map { ($JSON->decode($_))->{seq} } complete_lines($pinned[$lane]{out});
		$times{$_}++ for @seqs;
		push @wrong, map { "seq $_ of lane " . ($lane_of{$_} // '?') . " delivered by --lane $lane" }
		  grep { ($lane_of{$_} // -1) != $lane } @seqs;
	}
	is_deeply(\@wrong, [], 'rule 10: each --lane program delivered its own lane\'s events only');
	my @expected = sort { $a <=> $b } keys %lane_of;
	cmp_ok(scalar(@expected), '>', 50, 'rule 10: the load wrote a fair number of events');
	is_deeply([ grep { ($times{$_} // 0) != 1 } @expected ], [], 'rule 10: every event delivered once');
}

done_testing();
