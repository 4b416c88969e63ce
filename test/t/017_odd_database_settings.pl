# Rules protected here (issue 9, "A handler that misbehaves": odd database
# defaults): the workers set what they need whatever ALTER DATABASE ... SET
# says, and keep working with several workers.
# - With the database's defaults set to default_transaction_isolation
#   serializable (and, in a second round, repeatable read),
#   default_transaction_read_only on, session_replication_role replica,
#   statement_timeout, lock_timeout and idle_in_transaction_session_timeout
#   1ms and search_path 'nowhere', a handler called by any of three workers
#   sees the workers' own values: read committed (its transaction too),
#   read-write, origin, no timeouts, an empty search_path.
# - Under a write load (pgbench; the clients set their own values), with
#   task_events.worker_count = 3, no worker raises an error (a failed round
#   costs a pause of 1 s or more), every built-in handler's output is exactly
#   what the log implies, and no handler fails an attempt.
# The probe handler records current_setting(...) inside its call: the call
# runs in a GUC nesting level of its own, but starts from the worker's
# values, which are what another backend's pg_settings would show.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

my $node = te_node(
	'odd_settings',
	conf => "task_events.worker_count = 3\ntask_events.poll_interval = 100ms");
wait_for_workers($node, 3);

my @SETTINGS = qw(default_transaction_isolation transaction_isolation
  default_transaction_read_only transaction_read_only session_replication_role
  statement_timeout lock_timeout idle_in_transaction_session_timeout search_path);
my $state_sql = join " || ' | ' || ",
  map { "'$_=' || pg_catalog.current_setting('$_')" } @SETTINGS;
$node->safe_psql(
	'postgres', qq{
CREATE TABLE public.probe_seen (pid int NOT NULL, state text NOT NULL);
CREATE FUNCTION public.probe(events task_events.events[]) RETURNS void
LANGUAGE sql AS \$\$
	INSERT INTO public.probe_seen (pid, state) SELECT pg_catalog.pg_backend_pid(), $state_sql
\$\$;
INSERT INTO task_events.handlers (handler, function)
VALUES ('probe', 'public.probe(task_events.events[])');
});
my $WORKER_STATE =
    'default_transaction_isolation=read committed | transaction_isolation=read committed | '
  . 'default_transaction_read_only=off | transaction_read_only=off | session_replication_role=origin | '
  . 'statement_timeout=0 | lock_timeout=0 | idle_in_transaction_session_timeout=0 | search_path=';

# The test's own sessions and the pgbench clients set their own values.
my %CLIENT = (
	default_transaction_isolation => 'read\ committed',
	default_transaction_read_only => 'off',
	session_replication_role => 'origin',
	statement_timeout => '0',
	lock_timeout => '0',
	idle_in_transaction_session_timeout => '0',
	search_path => 'public');
$ENV{PGOPTIONS} = join ' ', map { "-c $_=$CLIENT{$_}" } sort keys %CLIENT;

for my $isolation ('serializable', 'repeatable read')
{
	$node->safe_psql(
		'postgres', qq{
		ALTER DATABASE postgres SET default_transaction_isolation = '$isolation';
		ALTER DATABASE postgres SET default_transaction_read_only = on;
		ALTER DATABASE postgres SET session_replication_role = replica;
		ALTER DATABASE postgres SET statement_timeout = '1ms';
		ALTER DATABASE postgres SET lock_timeout = '1ms';
		ALTER DATABASE postgres SET idle_in_transaction_session_timeout = '1ms';
		ALTER DATABASE postgres SET search_path = 'nowhere';
		TRUNCATE public.probe_seen;
	});
	# The workers are idle (no call under way): restarting them so that they
	# connect under the new defaults loses nothing.
	$node->restart;
	my @workers = wait_for_workers($node, 3);

	# A new session that overrides only the timeouts gets the odd defaults.
	{
		local $ENV{PGOPTIONS} =
		  '-c statement_timeout=0 -c lock_timeout=0 -c idle_in_transaction_session_timeout=0';
		is( $node->safe_psql(
				'postgres',
				q{SELECT current_setting('default_transaction_isolation') || ' | '
				  || current_setting('default_transaction_read_only') || ' | '
				  || current_setting('session_replication_role') || ' | '
				  || current_setting('search_path')}),
			"$isolation | on | replica | nowhere",
			"$isolation: a new session gets the database's odd defaults");
	}

	my $log = log_position($node);
	my $load = start_pgbench($node, clients => 4, seconds => 8);
	is(stop_pgbench($load), 0, "$isolation: the write load ran without error");
	wait_caught_up($node);
	# A worker's round that fails is rolled back and the worker waits 1 s
	# or more before the next: the workers must not fail at all.
	my $pids = join '|', @workers;
	my @errors = log_grep($node, $log, qr/\[(?:$pids)\] (?:ERROR|FATAL|PANIC):/);
	is(scalar(@errors), 0, "$isolation: no worker raised an error")
	  or diag(join "\n", @errors[ 0 .. ($#errors < 4 ? $#errors : 4) ]);
	handlers_match($node, "$isolation: with three workers the built-in handlers are exact");
	no_handler_failures($node);

	my %seen = map { split /\|/, $_, 2 } split /\n/,
	  $node->safe_psql('postgres',
		q{SELECT pid || '|' || string_agg(DISTINCT state, ' // ') FROM public.probe_seen GROUP BY pid});
	my @bad = grep { $seen{$_} ne $WORKER_STATE } sort keys %seen;
	ok(%seen && !@bad,
		"$isolation: every call of the probe saw the workers' own settings ("
		  . scalar(keys %seen) . ' worker(s) ran it)')
	  or diag(join "\n", map { "worker $_: $seen{$_}" } @bad);
	my %worker = map { $_ => 1 } @workers;
	is(join(',', grep { !$worker{$_} } sort keys %seen), '',
		"$isolation: the probe ran only in the workers");
	is(join(',', worker_pids($node)), join(',', @workers),
		"$isolation: no worker was restarted");
}

$node->stop;
done_testing();
