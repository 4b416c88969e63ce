# Rules protected here (issue 13, metrics for Prometheus): Debian's real
# postgres_exporter (prometheus-postgres-exporter), run with
# contrib/prometheus/queries.yaml against a server with workers, connected
# as a role that is only a member of pg_monitor, serves on /metrics the
# task_events_* series with their labels (datname, handler, subscription,
# lane, event_type) and the values SQL gives:
# 1. for every handler, events_behind, processed_total, failed_total,
#    dead_letters, retry_attempts, retrying and paused are handler_status's
#    (retrying and paused as 0/1); in particular a handler that
#    dead-lettered an event shows dead_letters 1, and while it backs off on
#    another failing event it shows retrying 1, retry_attempts 1 and the
#    events waiting behind it; its seconds_behind lies between the values
#    SQL gives just before and just after the scrape;
# 2. for every lane of a subscription nobody reads, events_behind is
#    subscription_status's, and the lanes add up to every event of the log;
# 3. the published estimate of each event type is its exact count once the
#    log is analyzed (a small log: ANALYZE reads all of it);
# 4. after pause_handler, the next scrape shows paused 1 for that handler;
# and promtool (Debian's prometheus) accepts contrib/prometheus/alerts.yml,
# counting every rule in it.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use HTTP::Tiny;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

my $EXPORTER = '/usr/bin/prometheus-postgres-exporter';
my $PROMTOOL = '/usr/bin/promtool';
my $CONTRIB = "$FindBin::RealBin/../../contrib/prometheus";
for my $tool ($EXPORTER, $PROMTOOL)
{
	-x $tool or die "$tool is missing: scripts/install-deps.sh installs it";
}

###
### promtool: the example alert rules are valid, all of them.
###
{
	my ($out, $err) = ('', '');
	my $ok = IPC::Run::run([ $PROMTOOL, 'check', 'rules', "$CONTRIB/alerts.yml" ],
		'>', \$out, '2>', \$err);
	note "promtool:\n$out$err";
	ok($ok, 'promtool check rules accepts contrib/prometheus/alerts.yml');
	my $written = () = slurp_file("$CONTRIB/alerts.yml") =~ /^\s*- alert:/mg;
	cmp_ok($written, '>=', 4, "alerts.yml has the example rules ($written)");
	like($out, qr/SUCCESS: $written rules found/, "promtool finds all $written rules");
}

###
### A server with workers: a handler with a dead letter, then retrying, and
### a subscription nobody reads.
###
my $node = te_node('prometheus');
wait_for_workers($node, 1);
$node->safe_psql(
	'postgres', q{
	ALTER SYSTEM SET task_events.max_attempts = 2;
	ALTER SYSTEM SET task_events.retry_delay = 20;
	SELECT pg_reload_conf();
});
$node->poll_query_until('postgres',
	q{SELECT current_setting('task_events.max_attempts') || '/' || current_setting('task_events.retry_delay')},
	'2/20ms')
  or die 'the new settings were not loaded';

# Fails on the TaskCreated of a task titled 'poison...' (the workers run
# with search_path = pg_catalog, pg_temp: every name is qualified).
$node->safe_psql(
	'postgres', q{
CREATE FUNCTION public.poison(events task_events.events[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
	e task_events.events;
BEGIN
	FOREACH e IN ARRAY events LOOP
		IF e.event_type = 'TaskCreated' AND e.payload ->> 'task_title' LIKE 'poison%' THEN
			RAISE EXCEPTION 'poisoned event %', e.seq;
		END IF;
	END LOOP;
END $$;
SELECT task_events.register_handler('poison', 'public.poison(task_events.events[])');
SELECT task_events.create_subscription('feed', start_at => 'beginning', lanes => 2);
});

create_tasks($node, 6, 'early');
$node->safe_psql(
	'postgres', q{
	SELECT count(task_events.complete_task(t.task_id))
	FROM (SELECT task_id FROM task_events.tasks ORDER BY created_at LIMIT 3) t;
	SELECT count(task_events.update_status(t.task_id, 'in_progress'))
	FROM (SELECT task_id FROM task_events.tasks WHERE status = 'pending' ORDER BY created_at LIMIT 2) t;
});
create_tasks($node, 1, 'poison one');
$node->poll_query_until(
	'postgres', q{
	SELECT dead_letters = 1 AND events_behind = 0 FROM task_events.handler_status
	WHERE handler = 'poison'})
  or die 'the poison handler did not dead-letter its event';

# Retrying: after its first attempt the next poison event waits the longest
# backoff, 10 minutes (retry_delay 1h, capped), with three events behind it:
# they stay as they are until the test is over.
$node->safe_psql('postgres',
	q{ALTER SYSTEM SET task_events.retry_delay = '1h'; SELECT pg_reload_conf()});
$node->poll_query_until('postgres', q{SELECT current_setting('task_events.retry_delay')}, '1h')
  or die 'retry_delay was not reloaded';
create_tasks($node, 1, 'poison two');
create_tasks($node, 3, 'late');
$node->poll_query_until(
	'postgres', q{
	SELECT retry_attempts = 1 AND retry_at > now() + interval '5 minutes'
	FROM task_events.handler_status WHERE handler = 'poison'})
  or die 'the poison handler is not backing off';
$node->poll_query_until(
	'postgres', q{
	SELECT bool_and(events_behind = 0) FROM task_events.handler_status WHERE handler <> 'poison'})
  or die 'the other handlers did not catch up';
$node->safe_psql('postgres', 'ANALYZE task_events.events');
$node->safe_psql('postgres', 'CREATE ROLE prometheus LOGIN IN ROLE pg_monitor');

###
### The exporter, on a free port, with only the task_events queries.
###
my $port = PostgreSQL::Test::Cluster::get_free_port();
my ($exp_out, $exp_err) = ('', '');
my $exporter;
{
	local $ENV{DATA_SOURCE_NAME} =
	  'host=' . $node->host . ' port=' . $node->port . ' dbname=postgres user=prometheus sslmode=disable';
	$exporter = IPC::Run::start(
		[
			$EXPORTER, "--web.listen-address=127.0.0.1:$port",
			"--extend.query-path=$CONTRIB/queries.yaml",
			'--disable-default-metrics', '--disable-settings-metrics',
			'--no-collector.database', '--no-collector.bgwriter',
		],
		'>', \$exp_out, '2>', \$exp_err);
}

END
{
	# Whatever happened, leave no exporter behind.
	$exporter->kill_kill if $exporter && $exporter->pumpable;
}

my $http = HTTP::Tiny->new(timeout => 10);

# One scrape: the samples, as { name, labels => { ... }, value }.
sub scrape
{
	my $r = $http->get("http://127.0.0.1:$port/metrics");
	return undef unless $r->{success};
	my @samples;
	for my $line (split /\n/, $r->{content})
	{
		next if $line =~ /^#/ || $line eq '';
		$line =~ /^(\w+)(?:\{(.*)\})? (\S+)$/ or die "unexpected line: $line";
		my ($name, $labels, $value) = ($1, $2 // '', $3);
		my %l = $labels =~ /(\w+)="((?:[^"\\]|\\.)*)"/g;
		push @samples, { name => $name, labels => \%l, value => $value };
	}
	return \@samples;
}

# The values of the series name whose labels include those given.
sub values_of
{
	my ($samples, $name, %labels) = @_;
	return map { $_->{value} } grep {
		my $s = $_;
		$s->{name} eq $name
		  && !grep { ($s->{labels}{$_} // "\0") ne $labels{$_} } keys %labels
	} @$samples;
}

# The one value of a series ('missing' or 'n series' otherwise).
sub value_of
{
	my @v = values_of(@_);
	return @v == 1 ? $v[0] : @v ? scalar(@v) . ' series' : 'missing';
}

my $samples;
wait_until(
	sub {
		$exporter->pump_nb;
		$samples = scrape();
		return $samples && values_of($samples, 'task_events_handler_paused');
	})
  or die "no task_events series from the exporter:\n$exp_err";
is(value_of($samples, 'pg_up'), 1, 'the exporter is connected');

###
### 1. The handlers.
###
my %handler_sql = map { my ($h, @v) = split /\|/; ($h => \@v) } split /\n/,
  $node->safe_psql(
	'postgres', q{
	SELECT handler, events_behind, processed, failed, dead_letters,
		   coalesce(retry_attempts, 0), (coalesce(retry_attempts, 0) > 0)::int, paused::int
	FROM task_events.handler_status ORDER BY handler});
my ($before) = $node->safe_psql('postgres',
	q{SELECT seconds_behind FROM task_events.handler_status WHERE handler = 'poison'});
$samples = scrape();
my ($after) = $node->safe_psql('postgres',
	q{SELECT seconds_behind FROM task_events.handler_status WHERE handler = 'poison'});
my @columns = qw(events_behind processed_total failed_total dead_letters retry_attempts retrying paused);
is_deeply(
	[ sort(values_of($samples, 'task_events_handler_paused', datname => 'postgres')) ],
	[ map { 0 } keys %handler_sql ],
	'one paused series per handler of handler_status, all 0');
for my $h (sort keys %handler_sql)
{
	my %got = map { ($_ => value_of($samples, "task_events_handler_$_", handler => $h, datname => 'postgres')) }
	  @columns;
	my %want;
	@want{@columns} = @{ $handler_sql{$h} };
	is_deeply(\%got, \%want, "handler $h: the exporter's values are handler_status's");
}
is( join(' ', map { value_of($samples, "task_events_handler_$_", handler => 'poison') }
	  qw(events_behind dead_letters retrying retry_attempts)),
	'4 1 1 1',
	'the poison handler: 4 events behind, 1 dead letter, retrying, after 1 attempt');
my $seconds = value_of($samples, 'task_events_handler_seconds_behind', handler => 'poison');
ok($seconds > 0 && $seconds >= $before && $seconds <= $after,
	"the poison handler's seconds_behind ($seconds) is between SQL's before ($before) and after ($after)");

###
### 2. The subscription's lanes.
###
my %lane_sql = map { split /\|/ } split /\n/,
  $node->safe_psql('postgres',
	q{SELECT lane, events_behind FROM task_events.subscription_status WHERE subscription = 'feed'});
my $events = $node->safe_psql('postgres', 'SELECT count(*) FROM task_events.events');
my %lane_got = map {
	($_ => value_of($samples, 'task_events_subscription_events_behind',
		subscription => 'feed', lane => $_, datname => 'postgres'))
} 0, 1;
is_deeply(\%lane_got, \%lane_sql, "subscription feed: each lane's events_behind is subscription_status's");
is($lane_got{0} + $lane_got{1}, $events, "the lanes add up to every event of the log ($events)");
is( value_of($samples, 'task_events_subscription_dead_letters', subscription => 'feed', lane => 0),
	0, 'subscription feed: no dead letter');

###
### 3. Published per event type.
###
my %published_sql = map { split /\|/ } split /\n/,
  $node->safe_psql('postgres', 'SELECT event_type, count(*) FROM task_events.events GROUP BY 1');
my %published_got = map {
	($_ => value_of($samples, 'task_events_published_estimate', event_type => $_, datname => 'postgres'))
} qw(TaskCreated TaskStatusChanged TaskCompleted);
is_deeply(\%published_got, \%published_sql,
	'the published estimate of each event type is its exact count (analyzed)');
is( scalar(values_of($samples, 'task_events_published_last_minute')),
	3, 'a last_minute series per event type');

###
### 4. Paused.
###
$node->safe_psql('postgres', q{SELECT task_events.pause_handler('audit')});
$samples = scrape();
is( join(' ', map { "$_=" . value_of($samples, 'task_events_handler_paused', handler => $_) }
	  sort keys %handler_sql),
	join(' ', map { "$_=" . ($_ eq 'audit' ? 1 : 0) } sort keys %handler_sql),
	'after pause_handler(audit): paused 1 for audit only');

$exporter->kill_kill;
$exporter->finish;
note "exporter log:\n$exp_out$exp_err";
$node->stop;
done_testing();
