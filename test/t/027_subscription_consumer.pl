# Rules protected here (issue 11, subscriptions), with a real client
# (test/t/subscription_consumer.py, psycopg 3, the SQL API only) against
# workers running, pgbench writing (some transactions and savepoints rolled
# back), transactions held open while later ones are delivered (committing
# late, or rolling back late), and consumers SIGKILLed at random moments (by
# the test, and by themselves between writing a batch and acknowledging it)
# and restarted, for about 20 s; two subscriptions with lanes = 4, each read
# by two processes sharing its lanes: feed (TaskCreated, TaskCompleted;
# consumers that acknowledge after writing, at least once) and ledger (every
# type; consumers that insert into public.ledger and acknowledge in the same
# transaction, exactly once).  Once the load stops and the consumers drain:
# 1. every lane of each subscription has events_behind 0 and acknowledged =
#    the number of committed events of its types whose task hashes to it
#    (so the sum over lanes = the committed events of its types): each lane
#    position acknowledged exactly once;
# 2. every committed event of a subscription's types (committed after it was
#    created, start_at 'now') is delivered at least once, and nothing else:
#    every delivered event is in task_events.events with the same seq, task
#    and version, of the subscription's types, after its creation, in the
#    lane _lane_of(task); none of a rolled-back transaction (the late
#    rollbacks' events are never delivered);
# 3. public.ledger holds each event of ledger's types exactly once, and no
#    event is delivered again after the batch that acknowledged it;
# 4. per-task order in every lane: a task's events always come from the same
#    lane, and an event of a task is first delivered only after every earlier
#    event of that task (of the subscription's types) was (re-deliveries of a
#    suffix after a kill allowed); a batch is one lane, in seq order;
# 5. the late-committing transactions' events are delivered, after events
#    with higher seqs (every lane of both subscriptions had acknowledged past
#    them before they committed);
# 6. waking: a consumer waits, idle, on a subscription created once the
#    handlers caught up (so no notification for it comes from an earlier
#    event); an event committed makes it receive a notification on channel
#    task_events_subscriptions whose payload is its subscription's name, and
#    the event is delivered to it;
# 7. the consumer exits cleanly (status 0) on SIGTERM, and no consumer ever
#    exited on an error (only SIGKILLs).
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use POSIX qw(WNOHANG);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

use TaskEventsTest;

my $seed = $ENV{TE_SEED} // (time() ^ $$);
srand($seed);
note "random seed $seed (set TE_SEED to repeat the schedule of kills)";

my $LOAD_SECONDS = 20;
my $LEASE = '3 seconds';
my $BATCH = 50;
my $CONSUMER = "$FindBin::RealBin/subscription_consumer.py";

my $node = te_node('consumer',
	conf => "task_events.worker_count = 1\n" . "max_connections = 40");
wait_for_workers($node, 1);
my $base = $node->basedir;
my $out = "$base/delivered.tsv";

# Events from before the subscriptions: start_at 'now' leaves them out.
create_tasks($node, 3, 'before the subscriptions');
my $pre = $node->safe_psql('postgres', 'SELECT max(seq) FROM task_events.events');
$node->safe_psql(
	'postgres', q{
	SELECT task_events.create_subscription('feed', '{TaskCreated,TaskCompleted}', 'now', 4);
	SELECT task_events.create_subscription('ledger', NULL, 'now', 4);
	CREATE TABLE public.ledger (event_id uuid NOT NULL, seq bigint NOT NULL,
		subscription text NOT NULL, batch_id bigint NOT NULL, consumer text NOT NULL);
});

###
### The consumers: processes started with fork/exec, so that the test can
### SIGKILL them and see how they ended.
###
my %consumers = map { $_->{name} => $_ } (
	{ name => 'feed_a', sub => 'feed' },
	{ name => 'feed_b', sub => 'feed' },
	{ name => 'ledger_a', sub => 'ledger', table => 'public.ledger' },
	{ name => 'ledger_b', sub => 'ledger', table => 'public.ledger' });
my @unexpected;    # consumers that ended other than by SIGKILL
my $kills = 0;

# Start consumer c (a new incarnation); die_before_ack => n: it SIGKILLs
# itself before acknowledging its nth batch.
sub start_consumer
{
	my ($c, %opt) = @_;
	$c->{incarnation}++;
	my @cmd = (
		'/usr/bin/python3', $CONSUMER,
		'--dsn' => $node->connstr('postgres'),
		'--subscription' => $c->{sub},
		'--name' => "$c->{name}.$c->{incarnation}",
		'--out' => $out,
		'--notify-log' => "$base/notify_$c->{name}",
		'--batch' => $BATCH,
		'--lease' => $LEASE,
		'--die-before-ack' => $opt{die_before_ack} // 0,
		$c->{table} ? ('--mode' => 'exactly-once', '--table' => $c->{table}) : ());
	my $log = "$base/consumer_$c->{name}.log";
	my $pid = fork() // die "fork: $!";
	if ($pid == 0)
	{
		open(STDOUT, '>>', $log) or POSIX::_exit(126);
		open(STDERR, '>&', \*STDOUT) or POSIX::_exit(126);
		exec(@cmd) or POSIX::_exit(127);
	}
	$c->{pid} = $pid;
	return;
}

# How consumer c's process ended ($? of waitpid), recorded when unexpected.
sub ended
{
	my ($c, $status, $expected_status) = @_;
	delete $c->{pid};
	push @unexpected, "$c->{name}.$c->{incarnation}: wait status $status"
	  if $status != $expected_status;
	return;
}

# Restart the consumers that died (by their own SIGKILL); with faults, the
# new incarnation may SIGKILL itself before one of its first acks.
sub reap_and_restart
{
	my (%opt) = @_;
	for my $c (values %consumers)
	{
		next unless $c->{pid} && waitpid($c->{pid}, WNOHANG) == $c->{pid};
		ended($c, $?, 9);
		start_consumer($c, faulty_options(%opt));
	}
	return;
}

sub faulty_options
{
	my (%opt) = @_;
	return () unless $opt{faults};
	return (die_before_ack => rand() < 0.4 ? 1 + int(rand(6)) : 0);
}

sub kill_consumer
{
	my ($c) = @_;
	kill 'KILL', $c->{pid};
	waitpid($c->{pid}, 0);
	ended($c, $?, 9);
	$kills++;
	return;
}

END
{
	# Whatever happened, leave no consumer behind.
	for my $c (values %consumers)
	{
		kill 'KILL', $c->{pid} if $c->{pid};
	}
}

###
### Late transactions: one commits, one rolls back, after every lane of
### both subscriptions acknowledged events with higher seqs.
###
my (@late_seqs, @doomed_ids);

# Open a transaction that writes a task's three events (created, started,
# completed) and keep it open; returns the session and the events' seqs.
sub open_late
{
	my ($user, $n) = @_;
	my $s = $node->background_psql('postgres');
	# It stays open for a while: the time limit counts from each query.
	$s->set_query_timer_restart;
	$s->query_safe('BEGIN');
	my $task = $s->query_safe(
		"SELECT task_id FROM task_events.create_task('$user', '$user $n')");
	$s->query_safe(
		"SELECT status FROM task_events.update_status('$task', 'in_progress')");
	$s->query_safe("SELECT status FROM task_events.complete_task('$task')");
	my $events = $s->query_safe(
		"SELECT string_agg(seq || ' ' || event_id, ',' ORDER BY seq) FROM task_events.events WHERE aggregate_id = '$task'"
	);
	return ($s, [ map { [ split / / ] } split /,/, $events ]);
}

# Whether every lane of every subscription has acknowledged an event with a
# seq above $seq.
sub every_lane_past
{
	my ($seq) = @_;
	return $node->safe_psql('postgres',
		"SELECT bool_and(position > $seq) FROM task_events.subscription_status"
	) eq 't';
}

###
### Under load, with kills.
###
for my $c (values %consumers)
{
	start_consumer($c, faulty_options(faults => 1));
}
my $load = start_pgbench($node, clients => 2, seconds => $LOAD_SECONDS);
my $started = time();
my ($late, $late_events, $doomed, $doomed_events);

# The late transaction commits, the doomed one rolls back; their events are
# remembered for the checks at the end.
sub end_late_cycle
{
	$late->query_safe('COMMIT');
	$late->quit;
	$doomed->query_safe('ROLLBACK');
	$doomed->quit;
	push @late_seqs, map { $_->[0] } @$late_events;
	push @doomed_ids, map { $_->[1] } @$doomed_events;
	$late = undef;
}
my $cycles = 0;
# After the load, the kills go on until the last late transaction commits
# (the consumers catch up with the events after it), for a minute at most.
while (time() < $started + $LOAD_SECONDS
	|| ($late && time() < $started + $LOAD_SECONDS + 60))
{
	if (!$late && time() < $started + $LOAD_SECONDS - 8)
	{
		$cycles++;
		($late, $late_events) = open_late('late', $cycles);
		($doomed, $doomed_events) = open_late('doomed', $cycles);
	}

	# A random consumer, at a random moment.
	usleep(300_000 + int(rand(1_000_000)));
	reap_and_restart(faults => 1);
	my @alive = grep { $_->{pid} } sort { $a->{name} cmp $b->{name} } values %consumers;
	my $victim = $alive[ int(rand(@alive)) ];
	kill_consumer($victim);
	start_consumer($victim, faulty_options(faults => 1));

	end_late_cycle() if $late && every_lane_past($late_events->[-1][0]);
}
my $rc = stop_pgbench($load);
is($rc, 0, 'pgbench ran without error');
ok(!$late,
	'each late transaction stayed open until every lane of both subscriptions had acknowledged events with higher seqs'
);
end_late_cycle() if $late;
my $kills_under_load = $kills;
note "late transaction cycles: $cycles; consumers killed by the test: $kills";

###
### Drain: the last incarnations without faults.
###
reap_and_restart();
for my $c (values %consumers)
{
	kill_consumer($c);
	start_consumer($c);
}
ok( $node->poll_query_until(
		'postgres',
		'SELECT bool_and(events_behind = 0) FROM task_events.subscription_status'),
	'the consumers drain both subscriptions')
  or diag $node->safe_psql('postgres',
	'SELECT * FROM task_events.subscription_status ORDER BY 1, 2');
reap_and_restart();

###
### What was delivered, in the order it was written.
###
$node->safe_psql(
	'postgres', qq{
	CREATE TABLE public.delivered (n bigserial PRIMARY KEY, consumer text, subscription text,
		lane int, batch_id bigint, seq bigint, event_id uuid, aggregate_id uuid,
		aggregate_version bigint);
	COPY public.delivered (consumer, subscription, lane, batch_id, seq, event_id,
		aggregate_id, aggregate_version) FROM '$out';
	CREATE TABLE public.expected AS
	SELECT s.subscription, e.seq, e.event_id, e.event_type, e.aggregate_id, e.aggregate_version,
		   task_events._lane_of(e.aggregate_id, s.lanes) AS lane
	FROM task_events.subscriptions s
	JOIN task_events.events e ON e.seq > $pre
	 AND (s.event_types IS NULL OR e.event_type = ANY (s.event_types));
});

# A test: the query lists nothing (at most 20 lines shown).
sub none
{
	my ($sql, $name) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my @rows = grep { $_ ne '' } split /\n/,
	  $node->safe_psql('postgres', "SELECT * FROM ($sql) q LIMIT 20");
	my $ok = is(scalar(@rows), 0, $name);
	diag join("\n", @rows) unless $ok;
	return $ok;
}

# What makes the run meaningful.
my ($expected_feed, $expected_ledger, $rolled_back, $redelivered) = split /\|/,
  $node->safe_psql(
	'postgres', q{
	SELECT (SELECT count(*) FROM public.expected WHERE subscription = 'feed'),
	       (SELECT count(*) FROM public.expected WHERE subscription = 'ledger'),
	       (SELECT last_value FROM task_events.events_seq_seq)
	         - (SELECT count(*) FROM task_events.events),
	       (SELECT count(*) - count(DISTINCT (subscription, seq)) FROM public.delivered)});
note "events: feed $expected_feed, ledger $expected_ledger; "
  . "seqs of rolled-back events: $rolled_back; deliveries beyond the first: $redelivered";
cmp_ok($expected_ledger, '>', 500, 'the load wrote a fair number of events');
cmp_ok($rolled_back, '>', 0, 'some events were written and rolled back (gaps in seq)');
cmp_ok($redelivered, '>', 0, 'some events were delivered again after a kill');
cmp_ok($kills_under_load, '>=', 5, 'consumers were killed under load');
cmp_ok(scalar(@late_seqs), '>', 0, 'some transactions committed late');

# 1. Each lane position acknowledged exactly once.
none(
	q{SELECT format('%s lane %s: events_behind %s, acknowledged %s, committed events of its types in the lane %s',
		st.subscription, st.lane, st.events_behind, st.acknowledged,
		(SELECT count(*) FROM public.expected x
		 WHERE x.subscription = st.subscription AND x.lane = st.lane))
	  FROM task_events.subscription_status st
	  WHERE st.events_behind <> 0
	     OR st.acknowledged <> (SELECT count(*) FROM public.expected x
		                        WHERE x.subscription = st.subscription AND x.lane = st.lane)},
	'every lane: events_behind 0, acknowledged = its committed events');
is( $node->safe_psql(
		'postgres', q{
		SELECT string_agg(format('%s %s/%s', subscription, acked,
			(SELECT count(*) FROM public.expected x WHERE x.subscription = a.subscription)), ', '
			ORDER BY subscription)
		FROM (SELECT subscription, sum(acknowledged) AS acked
			  FROM task_events.subscription_status GROUP BY subscription) a}),
	"feed $expected_feed/$expected_feed, ledger $expected_ledger/$expected_ledger",
	'acknowledged, summed over the lanes = the committed events of the subscription\'s types');

# 2. At least once, and nothing else.
none(
	q{SELECT format('%s: event seq %s (%s) never delivered', subscription, seq, event_type)
	  FROM public.expected x
	  WHERE NOT EXISTS (SELECT FROM public.delivered d
	                    WHERE d.subscription = x.subscription AND d.event_id = x.event_id)
	  ORDER BY seq},
	'every committed event of a subscription\'s types is delivered at least once');
none(
	q{SELECT format('%s: line %s, event_id %s (seq %s) is not in task_events.events',
		subscription, n, event_id, seq)
	  FROM public.delivered d
	  WHERE NOT EXISTS (SELECT FROM task_events.events e WHERE e.event_id = d.event_id)
	  ORDER BY n},
	'every delivered event is a committed one (none of a rolled-back transaction)');
my $doomed_list = join ',', map { "'$_'" } @doomed_ids;
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM public.delivered WHERE event_id IN ($doomed_list)"),
	0,
	'the events of the transactions rolled back late are never delivered');
none(
	q{SELECT format('%s: line %s (seq %s, event_id %s, task %s v%s, lane %s) is no event of its types, after its creation, in that lane',
		subscription, n, seq, event_id, aggregate_id, aggregate_version, lane)
	  FROM public.delivered d
	  WHERE NOT EXISTS (SELECT FROM public.expected x
	                    WHERE (x.subscription, x.seq, x.event_id, x.aggregate_id, x.aggregate_version, x.lane)
	                        = (d.subscription, d.seq, d.event_id, d.aggregate_id, d.aggregate_version, d.lane))
	  ORDER BY n},
	'every delivered event is as in the log, of the subscription\'s types, after its creation, in its task\'s lane'
);

# 3. Exactly once with the ack in the consumer's transaction.
none(
	q{SELECT format('ledger: event seq %s (%s) is in public.ledger %s times', x.seq, x.event_id, coalesce(l.n, 0))
	  FROM (SELECT * FROM public.expected WHERE subscription = 'ledger') x
	  FULL JOIN (SELECT event_id, count(*) AS n FROM public.ledger GROUP BY event_id) l USING (event_id)
	  WHERE l.n IS DISTINCT FROM 1 OR x.seq IS NULL
	  ORDER BY x.seq},
	'public.ledger holds each event of the ledger subscription exactly once');
none(
	q{SELECT format('ledger: event seq %s acknowledged in batch %s (line %s), delivered again at line %s in batch %s',
		a.seq, a.batch_id, a.n, d.n, d.batch_id)
	  FROM (SELECT d.* FROM public.ledger l
	        JOIN public.delivered d ON d.batch_id = l.batch_id AND d.event_id = l.event_id) a
	  JOIN public.delivered d ON d.subscription = 'ledger' AND d.event_id = a.event_id AND d.n > a.n
	  ORDER BY d.n},
	'no event is delivered again after the batch that acknowledged it');

# 4. Per-task order in every lane.
none(
	q{SELECT format('%s: task %s delivered from lanes %s', subscription, aggregate_id,
		string_agg(DISTINCT lane::text, ','))
	  FROM public.delivered GROUP BY subscription, aggregate_id
	  HAVING count(DISTINCT lane) > 1},
	'a task\'s events always come from the same lane');
none(
	q{WITH first AS (
		SELECT subscription, aggregate_id, aggregate_version, min(n) AS n
		FROM public.delivered GROUP BY 1, 2, 3)
	  SELECT format('%s: task %s version %s first delivered at line %s, its version %s %s',
		f.subscription, f.aggregate_id, f.aggregate_version, f.n, x.aggregate_version,
		coalesce('at line ' || g.n, 'never'))
	  FROM first f
	  JOIN public.expected x ON x.subscription = f.subscription AND x.aggregate_id = f.aggregate_id
	   AND x.aggregate_version < f.aggregate_version
	  LEFT JOIN first g ON (g.subscription, g.aggregate_id, g.aggregate_version)
	                     = (x.subscription, x.aggregate_id, x.aggregate_version)
	  WHERE g.n IS NULL OR g.n > f.n
	  ORDER BY f.n},
	'per-task order: a task\'s event is first delivered after all its earlier events');
none(
	q{SELECT format('batch %s: lines %s to %s, lanes %s, consumers %s, %s lines', batch_id,
		min(n), max(n), string_agg(DISTINCT lane::text, ','), string_agg(DISTINCT consumer, ','), count(*))
	  FROM public.delivered GROUP BY batch_id
	  HAVING count(DISTINCT lane) > 1 OR count(DISTINCT consumer) > 1 OR max(n) - min(n) + 1 <> count(*)
	  UNION ALL
	  SELECT format('batch %s: seq %s after seq %s', batch_id, seq, prev)
	  FROM (SELECT batch_id, seq, lag(seq) OVER (PARTITION BY batch_id ORDER BY n) AS prev
	        FROM public.delivered) b
	  WHERE seq <= prev},
	'a batch is one lane\'s, delivered once, in seq order');

# 5. The late commits.
my $late_list = join ',', @late_seqs;
is( $node->safe_psql(
		'postgres', qq{
		SELECT count(*) FILTER (WHERE subscription = 'ledger') || ' '
			   || count(*) FILTER (WHERE EXISTS (
			SELECT FROM public.delivered d
			WHERE d.subscription = x.subscription AND d.seq = x.seq
			  AND EXISTS (SELECT FROM public.delivered h
			              WHERE h.subscription = x.subscription AND h.seq > x.seq AND h.n < d.n)))
			   || '/' || count(*)
		FROM public.expected x WHERE x.seq IN ($late_list)}),
	scalar(@late_seqs) . ' '
	  . join('/',
		($node->safe_psql('postgres', "SELECT count(*) FROM public.expected WHERE seq IN ($late_list)"))
		  x 2),
	'the events of the late-committing transactions are delivered, after events with higher seqs');

###
### 6. Waking.  A third subscription, created once the handlers have caught
### up: no notification for it can come from an earlier event.
###
wait_caught_up($node);
$node->safe_psql('postgres',
	q{SELECT task_events.create_subscription('wake', '{TaskCreated}')});
$consumers{wake_a} = { name => 'wake_a', sub => 'wake' };
start_consumer($consumers{wake_a});
# Once it has called read_batch, it listens.
$node->poll_query_until(
	'postgres', q{
	SELECT EXISTS (SELECT FROM pg_stat_activity
	               WHERE application_name = 'consumer wake_a.1' AND query LIKE '%read_batch%')})
  or die 'the wake consumer did not start reading';
is(-s "$base/notify_wake_a" // 0, 0, 'the wake consumer has received no notification yet');
my $woken_task = $node->safe_psql('postgres',
	"SELECT task_id FROM task_events.create_task('wake', 'wake up')");
my $woken = $node->safe_psql('postgres',
	"SELECT event_id FROM task_events.events WHERE aggregate_id = '$woken_task'");

# Poll until file has a line matching re; returns whether it did.
sub file_gets
{
	my ($file, $re) = @_;
	for (1 .. 10 * $PostgreSQL::Test::Utils::timeout_default)
	{
		return 1 if -e $file && slurp_file($file) =~ $re;
		usleep(100_000);
	}
	return 0;
}
ok( file_gets(
		"$base/notify_wake_a", qr/^wake_a\.1\ttask_events_subscriptions\twake$/m),
	'a waiting consumer receives a notification on task_events_subscriptions with its subscription as payload'
);
ok(file_gets($out, qr/^wake_a\.1\twake\t\d+\t\d+\t\d+\t\Q$woken\E\t/m),
	'... and the event is delivered to it');

###
### 7. SIGTERM: a clean exit; and no consumer ended on an error.
###
for my $c (values %consumers)
{
	kill 'TERM', $c->{pid};
}
for my $c (sort { $a->{name} cmp $b->{name} } values %consumers)
{
	waitpid($c->{pid}, 0);
	is($?, 0, "consumer $c->{name} exits with status 0 on SIGTERM");
	delete $c->{pid};
}
is(join("\n", @unexpected), '', 'no consumer ended other than by SIGKILL (an error would)');
for my $c (sort { $a->{name} cmp $b->{name} } values %consumers)
{
	my $log = slurp_file("$base/consumer_$c->{name}.log");
	my $lost = () = $log =~ /\(55000\)/g;
	note "consumer $c->{name}: $c->{incarnation} incarnations, $lost batches not acknowledged (lease lost)";
	diag "consumer $c->{name} log:\n$log" if @unexpected;
}

$node->stop;
done_testing();
