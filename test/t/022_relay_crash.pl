# Rule protected here: in notify_mode relay, a notification is heard only once
# the commit of the relay batch that sent it is durable, so a crash never
# publishes an event twice.  The workers commit asynchronously; the relay
# handler's batches ask for a durable commit (handler_call.c).
#
# How: a listener hears every event of a batch; the server is stopped in
# immediate mode right away, with the WAL writer configured to sleep 10 s
# (an asynchronous commit would still be in the WAL buffers, and be lost).
# After the restart a new listener is in place before any worker connects
# (the workers' role does not exist yet: they wait, worker.c), then the role
# is created: the relay handler resumes from its position, and the listener
# must hear no event of the first batch again, and every new event once.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

my $node = te_node(
	'relay_crash',
	conf => join("\n",
		"task_events.notify_mode = relay",
		"task_events.poll_interval = 200ms",
		# Nothing but a commit flushes the WAL: a lost asynchronous commit
		# stays lost.
		"wal_writer_delay = 10s",
		"wal_writer_flush_after = 1GB",
		"bgwriter_lru_maxpages = 0",
		"checkpoint_timeout = 1h",
		"autovacuum = off"));
wait_for_workers($node, 1);

# A psql session that LISTENs on the task_events channel; heard_seqs returns
# the seq of every notification it received so far.
sub start_listener
{
	my %l = (in => "LISTEN task_events;\n", out => '', err => '');
	$l{h} = IPC::Run::start(
		[ $node->installed_command('psql'), '-X', '-q', '-d', $node->connstr('postgres') ],
		'<', \$l{in}, '>', \$l{out}, '2>', \$l{err});
	return \%l;
}

sub heard_seqs
{
	my ($l) = @_;
	$l->{in} .= "SELECT 1;\n";
	$l->{h}->pump_nb;
	return $l->{out} =~ /Asynchronous notification "task_events" with payload ".*?"seq": (\d+)\}" received/g;
}

# Poll until the listener's LISTEN is in place (it answered a later query).
sub wait_listening
{
	my ($l) = @_;
	for (1 .. 10 * $PostgreSQL::Test::Utils::timeout_default)
	{
		heard_seqs($l);
		return if $l->{out} =~ /^\s*1\s*$/m;
		select(undef, undef, undef, 0.1);
	}
	die "the listener did not start: $l->{err}";
}

# Poll until the listener heard every seq in @want; returns what it heard.
sub wait_heard
{
	my ($l, @want) = @_;
	my %want = map { $_ => 1 } @want;
	for (1 .. 10 * $PostgreSQL::Test::Utils::timeout_default)
	{
		my @heard = heard_seqs($l);
		my %heard = map { $_ => 1 } @heard;
		return @heard unless grep { !$heard{$_} } keys %want;
		select(undef, undef, undef, 0.1);
	}
	die 'timed out waiting for the listener to hear seqs ' . join(',', @want)
	  . "; it heard: $l->{out}\nstderr: $l->{err}";
}

my $first = start_listener();
wait_listening($first);

$node->safe_psql('postgres',
	q{SELECT count(task_events.create_task('alice', 'before crash ' || i)) FROM generate_series(1, 5) i});
my @batch = split /\n/,
  $node->safe_psql('postgres', 'SELECT seq FROM task_events.events ORDER BY seq');
my @heard = wait_heard($first, @batch);
is(scalar(@heard), scalar(@batch), 'the listener heard each event of the batch once before the crash');

$node->stop('immediate');
$first->{h}->kill_kill;

$node->append_conf('postgresql.conf', "task_events.worker_role = 'late_worker'");
$node->start;
my $second = start_listener();
wait_listening($second);
$node->safe_psql('postgres', 'CREATE ROLE late_worker SUPERUSER LOGIN');
$node->poll_query_until('postgres',
	q{SELECT count(*) FROM pg_stat_activity
	  WHERE backend_type = 'task_events worker' AND datname = 'postgres'}, '1')
  or die 'the worker did not connect once its role existed';

$node->safe_psql('postgres',
	q{SELECT count(task_events.create_task('alice', 'after crash ' || i)) FROM generate_series(1, 3) i});
my @after = split /\n/,
  $node->safe_psql('postgres',
	'SELECT seq FROM task_events.events WHERE seq > ' . $batch[-1] . ' ORDER BY seq');
my @heard_after = wait_heard($second, @after);
wait_caught_up($node);
@heard_after = heard_seqs($second);

my %before = map { $_ => 1 } @batch;
is_deeply([ grep { $before{$_} } @heard_after ],
	[], 'no event published before the crash is published again after it');
is_deeply([ sort { $a <=> $b } @heard_after ],
	[@after], 'every event written after the restart is heard once');
handlers_match($node, 'the other handlers are exact across the crash');

$second->{h}->kill_kill;
$node->stop;
done_testing();
