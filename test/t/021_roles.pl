# Rules protected here (README, "Security"):
# - CREATE EXTENSION creates the NOLOGIN group roles task_events_writer and
#   task_events_reader when they are missing; a role of that name that
#   already exists is used as it is; a second database of the cluster reuses
#   both (no error, same roles).
# - Every database gets the same privileges (the same ACLs), and a pg_dump
#   restored into a new database keeps them: writers write through the
#   functions only, readers read, PUBLIC gets nothing.
# - DROP EXTENSION leaves the roles (cluster-wide) and the schema; the roles
#   can be dropped once no database has the extension or its schema.
use strict;
use warnings FATAL => 'all';

use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

my $ROLES = q{
SELECT coalesce(string_agg(rolname || ' oid=' || oid || ' login=' || rolcanlogin
                           || ' connlimit=' || rolconnlimit, ', ' ORDER BY rolname), 'none')
FROM pg_roles WHERE rolname IN ('task_events_writer', 'task_events_reader')};

# Every ACL of the schema and of its objects.
my $ACLS = q{
SELECT string_agg(x, E'\n' ORDER BY x) FROM (
	SELECT 'schema ' || nspname || ' ' || coalesce(nspacl::text, 'default')
	FROM pg_namespace WHERE nspname = 'task_events'
	UNION ALL
	SELECT 'relation ' || relname || ' ' || coalesce(relacl::text, 'default')
	FROM pg_class
	WHERE relnamespace = 'task_events'::regnamespace AND relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
	UNION ALL
	SELECT 'function ' || oid::regprocedure || ' ' || coalesce(proacl::text, 'default')
	FROM pg_proc WHERE pronamespace = 'task_events'::regnamespace) s(x)};

# What a login role can do in a database: "ok" or the SQLSTATE, per statement.
sub outcomes
{
	my ($node, $db, $user, @statements) = @_;
	my @got;
	for my $sql (@statements)
	{
		my ($ret, $out, $err) = $node->psql(
			$db, "\\set VERBOSITY sqlstate\n$sql",
			extra_params => [ '-U', $user, '-v', 'ON_ERROR_STOP=1' ]);
		chomp $err;
		push @got, $ret == 0 ? 'ok' : ($err =~ /([0-9A-Z]{5})$/ ? $1 : "failed: $err");
	}
	return join ' ', @got;
}

my @WRITER_CAN = (
	q{SELECT task_events.create_task('w', 'by a writer')},
	q{SELECT count(*) FROM task_events.tasks},);
my @WRITER_CANNOT = (
	q{INSERT INTO task_events.tasks SELECT * FROM task_events.tasks},
	q{UPDATE task_events.tasks SET title = title},
	q{DELETE FROM task_events.events},
	q{SELECT count(*) FROM task_events.events},
	q{SELECT task_events.process_pending()},);
my @READER_CAN = (
	q{SELECT count(*) FROM task_events.events},
	q{SELECT count(*) FROM task_events.handler_status},);
my @READER_CANNOT = (
	q{SELECT task_events.create_task('r', 'by a reader')},
	q{INSERT INTO task_events.notifications (event_id, user_id, message, created_at)
	  SELECT event_id, 'r', 'forged', now() FROM task_events.events LIMIT 1},);

my $node = te_node('roles', preload => 0, extension => 0);
$node->safe_psql(
	'postgres', q{
	CREATE DATABASE db1;
	CREATE DATABASE db2;
	CREATE DATABASE db3;
	-- A reader role made beforehand by the administrator.
	CREATE ROLE task_events_reader NOLOGIN CONNECTION LIMIT 3;
});
my $reader_oid =
  $node->safe_psql('postgres', q{SELECT oid FROM pg_roles WHERE rolname = 'task_events_reader'});

$node->safe_psql('db1', 'CREATE EXTENSION task_events');
my $roles = $node->safe_psql('postgres', $ROLES);
like($roles, qr/^task_events_reader oid=$reader_oid login=false connlimit=3, task_events_writer oid=\d+ login=false connlimit=-1$/,
	'CREATE EXTENSION creates the missing writer role (NOLOGIN) and keeps the existing reader role as it is');

my ($ret, $out, $err) = $node->psql('db2', 'CREATE EXTENSION task_events');
is($ret, 0, 'CREATE EXTENSION in a second database succeeds');
is($err, '', '... without a message');
is($node->safe_psql('postgres', $ROLES), $roles, '... and reuses both roles');

my $acls = $node->safe_psql('db1', $ACLS);
unlike($acls, qr/(^|[{,])=/m, 'nothing is granted to PUBLIC');
unlike($acls, qr/ default$/m, 'no object keeps the default privileges');
is($node->safe_psql('db2', $ACLS), $acls, 'the second database has the same privileges');

$node->safe_psql(
	'postgres', q{
	CREATE ROLE app_writer LOGIN IN ROLE task_events_writer;
	CREATE ROLE app_reader LOGIN IN ROLE task_events_reader;
	CREATE ROLE app_nobody LOGIN;
});
for my $db (qw(db1 db2))
{
	is(outcomes($node, $db, 'app_writer', @WRITER_CAN), 'ok ok', "$db: the writer writes through the functions");
	is(outcomes($node, $db, 'app_writer', @WRITER_CANNOT),
		'42501 42501 42501 42501 42501', "$db: the writer cannot write tables, read events or process");
	is(outcomes($node, $db, 'app_reader', @READER_CAN), 'ok ok', "$db: the reader reads");
	is(outcomes($node, $db, 'app_reader', @READER_CANNOT), '42501 42501', "$db: the reader writes nothing");
	is(outcomes($node, $db, 'app_nobody', @READER_CAN, $WRITER_CAN[0]),
		'42501 42501 42501', "$db: another role can do nothing");
}

# pg_dump db1, restore into db3.
my $dump = $node->basedir . '/db1.sql';
$node->command_ok([ 'pg_dump', '-d', $node->connstr('db1'), '-f', $dump ], 'pg_dump db1');
$node->command_ok(
	[ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('db3'), '-f', $dump ],
	'restore the dump into db3');
is($node->safe_psql('db3', $ACLS), $acls, 'the restored database has the same privileges');
is($node->safe_psql('db3', q{SELECT count(*) FROM task_events.tasks WHERE user_id = 'w'}),
	1, 'the restored database has the data');
is(outcomes($node, 'db3', 'app_writer', @WRITER_CAN), 'ok ok', 'db3: the writer writes through the functions');
is(outcomes($node, 'db3', 'app_writer', @WRITER_CANNOT),
	'42501 42501 42501 42501 42501', 'db3: the writer cannot write tables, read events or process');
is(outcomes($node, 'db3', 'app_reader', @READER_CAN), 'ok ok', 'db3: the reader reads');
is(outcomes($node, 'db3', 'app_reader', @READER_CANNOT), '42501 42501', 'db3: the reader writes nothing');

# DROP EXTENSION leaves the roles, and the schema (it was not created by the
# extension's script) with its grants; the roles go once the schemas do.
$node->safe_psql($_, 'DROP EXTENSION task_events') for qw(db1 db2 db3);
is($node->safe_psql('postgres', $ROLES), $roles, 'DROP EXTENSION leaves the roles');
($ret, $out, $err) = $node->psql('postgres', 'DROP ROLE task_events_writer');
like($err, qr/cannot be dropped because some objects depend on it.*1 object in database db1/s,
	'a role cannot be dropped while a database keeps the schema task_events');
($ret, $out, $err) = $node->psql('db1', 'DROP ROLE task_events_writer');
like($err, qr/privileges for schema task_events/, '... (its privileges on the schema)');
$node->safe_psql($_, 'DROP SCHEMA task_events') for qw(db1 db2 db3);
$node->safe_psql('postgres', 'DROP ROLE task_events_writer, task_events_reader');
is($node->safe_psql('postgres', $ROLES), 'none', 'after DROP SCHEMA the roles can be dropped');

# A new CREATE EXTENSION creates both again.
$node->safe_psql('db1', 'CREATE EXTENSION task_events');
like($node->safe_psql('postgres', $ROLES),
	qr/^task_events_reader oid=\d+ login=false connlimit=-1, task_events_writer oid=\d+ login=false connlimit=-1$/,
	'CREATE EXTENSION creates both roles when both are missing');

$node->stop;
done_testing();
