# Rules protected here: an event is handled when its transaction commits,
# however late, even though its seq is lower than the seqs of events already
# handled (no event is skipped when transactions commit out of seq order);
# it is handled exactly once; the event of a transaction that rolls back,
# however long it stayed open, is never handled.
# Prepared transactions: where the write functions NOTIFY in the writing
# transaction (before task_events.notify_mode existed, and in its 'commit'
# mode), a transaction that called one cannot be prepared (PREPARE
# TRANSACTION refuses a transaction that did NOTIFY): PREPARE fails cleanly,
# leaves nothing prepared, and nothing of it is handled.  Where they do not
# (notify_mode relay or off), the prepared event is handled after COMMIT
# PREPARED, exactly once, and not before.  An event inserted directly
# (bypassing the write functions, so no wake-up) in a transaction that is
# prepared and committed later is handled too (the workers' poll finds it).
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

my $node = te_node('late', conf => 'max_prepared_transactions = 5');
wait_for_workers($node, 1);

# Audit rows of the TaskCreated events whose title starts with $prefix.
sub audited
{
	my ($prefix) = @_;
	return $node->safe_psql('postgres',
		"SELECT count(*) FROM task_events.audit_log WHERE event_data ->> 'task_title' LIKE '$prefix%'"
	);
}

# Create a task and wait until the audit handler has handled it: every
# handler has gone round at least once after this point.
my $marks = 0;
sub handled_round
{
	$marks++;
	my $task = $node->safe_psql('postgres',
		"SELECT task_id FROM task_events.create_task('marker', 'mark $marks')");
	$node->poll_query_until(
		'postgres', qq{
		SELECT EXISTS (SELECT FROM task_events.audit_log a JOIN task_events.events e USING (event_id)
		               WHERE e.aggregate_id = '$task')})
	  or die "marker task $marks was not handled";
	return;
}

# Two long transactions: one will commit late, one will roll back.
my $late = $node->background_psql('postgres');
$late->set_query_timer_restart;
$late->query_safe('BEGIN');
my $late_task = $late->query_safe(
	"SELECT task_id FROM task_events.create_task('late', 'late commit')");
my ($late_seq, $late_event) = split /\|/,
  $late->query_safe(
	"SELECT seq, event_id FROM task_events.events WHERE aggregate_id = '$late_task'");

my $doomed = $node->background_psql('postgres');
$doomed->set_query_timer_restart;
$doomed->query_safe('BEGIN');
my $doomed_task = $doomed->query_safe(
	"SELECT task_id FROM task_events.create_task('doomed', 'rolled back late')");
$doomed->query_safe("SELECT task_events.complete_task('$doomed_task')");
my $doomed_events = $doomed->query_safe(
	"SELECT string_agg(quote_literal(event_id), ',') FROM task_events.events WHERE aggregate_id = '$doomed_task'"
);

# Meanwhile, many tasks are created and committed, and handled.
create_tasks($node, 50, 'meanwhile');
ok($node->poll_query_until('postgres',
		"SELECT count(*) = 50 FROM task_events.audit_log WHERE event_data ->> 'task_title' LIKE 'meanwhile %'"),
	'the tasks committed meanwhile are handled');
wait_caught_up($node);
cmp_ok(
	$node->safe_psql(
		'postgres',
		"SELECT min(seq) FROM task_events.events WHERE payload ->> 'task_title' LIKE 'meanwhile %'"),
	'>', $late_seq,
	'the open transaction\'s event has a lower seq than the handled ones');
cmp_ok($node->safe_psql('postgres',
		q{SELECT min(position) FROM task_events.handler_status}),
	'>', $late_seq, 'every handler\'s position is past that seq');
is(audited('late commit'), 0, 'the uncommitted event is not handled');

# Commit late: the event is handled, exactly once.
$late->query_safe('COMMIT');
$late->quit;
ok( $node->poll_query_until(
		'postgres',
		"SELECT EXISTS (SELECT FROM task_events.audit_log WHERE event_id = '$late_event')"),
	'the late-committed event is handled');
ok( $node->poll_query_until(
		'postgres',
		"SELECT EXISTS (SELECT FROM task_events.notifications WHERE event_id = '$late_event')"),
	'... by every handler (notification)');

# Roll back late: nothing is handled.
$doomed->query_safe('ROLLBACK');
$doomed->quit;
handled_round();
is( $node->safe_psql(
		'postgres', qq{
		SELECT (SELECT count(*) FROM task_events.audit_log WHERE event_id IN ($doomed_events))
		     + (SELECT count(*) FROM task_events.notifications WHERE event_id IN ($doomed_events))
		     + (SELECT count(*) FROM task_events.analytics_counters WHERE user_id = 'doomed')
		     + (SELECT count(*) FROM task_events.completion_stats WHERE user_id = 'doomed')}),
	0,
	'the events of a long transaction that rolled back are never handled');

wait_caught_up($node);
handlers_match($node, 'handlers exact after a late commit and a late rollback');
is(audited('late commit'), 1, 'the late event has exactly one audit row');

###
### Prepared transactions
###
# The effective task_events.notify_mode, or '' before that setting existed.
sub notify_mode
{
	return $node->safe_psql('postgres',
		q{SELECT coalesce(current_setting('task_events.notify_mode', true), '')});
}

my $default_mode = notify_mode();
note "task_events.notify_mode: " . ($default_mode eq '' ? '(none)' : $default_mode);

# The writers NOTIFY: PREPARE fails.
if ($default_mode ne '' && $default_mode ne 'commit')
{
	$node->safe_psql('postgres',
		"ALTER SYSTEM SET task_events.notify_mode = 'commit'; SELECT pg_reload_conf()");
	$node->poll_query_until('postgres',
		q{SELECT current_setting('task_events.notify_mode')}, 'commit')
	  or die 'notify_mode commit was not loaded';
}
my ($ret, $out, $err) = $node->psql(
	'postgres', q{
	BEGIN;
	SELECT task_id FROM task_events.create_task('prepared', 'prepared task');
	PREPARE TRANSACTION 'te_write';
});
isnt($ret, 0, 'PREPARE TRANSACTION fails after a write function that NOTIFYs');
like(
	$err,
	qr/cannot PREPARE a transaction that has executed LISTEN, UNLISTEN, or NOTIFY/,
	'... because the write functions NOTIFY');
is($node->safe_psql('postgres', 'SELECT count(*) FROM pg_prepared_xacts'),
	0, 'nothing is left prepared');
is( $node->safe_psql(
		'postgres', q{
		SELECT (SELECT count(*) FROM task_events.tasks WHERE user_id = 'prepared')
		     + (SELECT count(*) FROM task_events.events WHERE user_id = 'prepared')}),
	0,
	'the failed PREPARE rolled the task and its event back');
handled_round();
is(audited('prepared task'), 0, 'nothing of the failed PREPARE is handled');

# The writers do not NOTIFY (notify_mode relay or off): a prepared write is
# handled once committed.
if ($default_mode ne '' && $default_mode ne 'commit')
{
	$node->safe_psql('postgres',
		'ALTER SYSTEM RESET task_events.notify_mode; SELECT pg_reload_conf()');
	$node->poll_query_until('postgres',
		q{SELECT current_setting('task_events.notify_mode')}, $default_mode)
	  or die "notify_mode $default_mode was not loaded";
	$node->safe_psql(
		'postgres', q{
		BEGIN;
		SELECT task_id FROM task_events.create_task('prepared', 'prepared write');
		PREPARE TRANSACTION 'te_write';
	});
	create_tasks($node, 5, 'while the write is prepared');
	handled_round();
	is(audited('prepared write'), 0,
		"notify_mode $default_mode: a prepared write is not handled before COMMIT PREPARED");
	$node->safe_psql('postgres', q{COMMIT PREPARED 'te_write'});
	ok( $node->poll_query_until(
			'postgres',
			"SELECT count(*) = 1 FROM task_events.audit_log WHERE event_data ->> 'task_title' = 'prepared write'"
		),
		"notify_mode $default_mode: a prepared write is handled after COMMIT PREPARED");
}

# Insert a TaskCreated event directly (bypassing the write functions, so no
# wake-up) in a transaction prepared as $gid.
sub prepare_direct_event
{
	my ($gid, $title) = @_;
	$node->safe_psql(
		'postgres', qq{
		BEGIN;
		INSERT INTO task_events.events (event_id, event_type, event_version, aggregate_id,
			aggregate_version, occurred_at, user_id, payload)
		SELECT id, 'TaskCreated', 1, task, 1, now(), 'prepared',
			jsonb_build_object('event_id', id, 'aggregate_id', task, 'task_title', '$title',
				'user_id', 'prepared', 'timestamp', now(), 'event_version', 1)
		FROM (SELECT gen_random_uuid() AS id, gen_random_uuid() AS task) x;
		PREPARE TRANSACTION '$gid';
	});
	return;
}

# An event inserted directly, in a transaction prepared now and committed
# after other events were handled.
prepare_direct_event('te_direct', 'prepared direct');
create_tasks($node, 10, 'while prepared');
handled_round();
is(audited('prepared direct'), 0, 'the prepared event is not handled before COMMIT PREPARED');
$node->safe_psql('postgres', q{COMMIT PREPARED 'te_direct'});
ok( $node->poll_query_until(
		'postgres',
		"SELECT count(*) = 1 FROM task_events.audit_log WHERE event_data ->> 'task_title' = 'prepared direct'"
	),
	'an event committed by COMMIT PREPARED is handled');

# The same, rolled back: ROLLBACK PREPARED events are never handled, and
# the handlers go on with the events written while it was prepared.
prepare_direct_event('te_direct_rollback', 'prepared rolled back');
create_tasks($node, 10, 'while prepared for rollback');
wait_caught_up($node);
is($node->safe_psql('postgres', q{SELECT count(*) FROM pg_prepared_xacts}),
	1, 'the transaction is still prepared while the handlers caught up with the others');
$node->safe_psql('postgres', q{ROLLBACK PREPARED 'te_direct_rollback'});
create_tasks($node, 3, 'after the rollback');
handled_round();
wait_caught_up($node);
is(audited('prepared rolled back'), 0, 'an event of ROLLBACK PREPARED is never handled');
is(audited('after the rollback'), 3, 'the events after it are handled');

wait_caught_up($node);
handlers_match($node, 'handlers exact after the prepared transactions');

$node->stop;
done_testing();
