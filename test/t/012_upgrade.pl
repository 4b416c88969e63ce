# Rules protected here: every released version of task_events upgrades to
# the default version, and the upgraded schema is the same as a fresh
# install's.
# - Every version PostgreSQL lists in pg_available_extension_versions is
#   installed (CREATE EXTENSION task_events VERSION 'x') in its own database,
#   with some data written, then brought up with ALTER EXTENSION task_events
#   UPDATE; it must end at the default version with the same objects as a
#   fresh CREATE EXTENSION task_events: every member of the extension, every
#   column, default, constraint, index, trigger (and its firing mode), policy,
#   function (signature, body, attributes, settings), type, sequence, view,
#   privilege (current and initial), comment, the tables registered for
#   pg_dump, and the rows the install script seeds (task_events.handlers).
# - The data written before the update survives it, and the handlers, run by
#   process_pending() after it, handle old and new events exactly.
# - Every task_events--*.sql of the source tree is installed (a script
#   missing from the Makefile's DATA would be a version nobody can reach).
# - This release's update is among those run: the default version is 1.1,
#   1.0 is installed and updated, and PostgreSQL's path from 1.0 to 1.1 is
#   task_events--1.0--1.1.sql (so that the test cannot pass by updating
#   1.0 to 1.0).
# A new version needs little here: add task_events--A--B.sql (and the new
# task_events--B.sql if you keep full scripts), bump default_version, change
# the expected default version and update path below, and this test picks
# the scripts up (docs/operations.md, "Upgrades").
use strict;
use warnings FATAL => 'all';

use File::Basename;
use File::Compare;
use FindBin;
use lib $FindBin::RealBin;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use TaskEventsTest;

my $node = te_node('upgrade', preload => 0, extension => 0);

# Every script of the tree is installed, unchanged.
my $srcdir = "$FindBin::RealBin/../..";
my $extdir = $node->config_data('--sharedir') . '/extension';
my @scripts = map { basename($_) } glob("$srcdir/task_events--*.sql");
ok(scalar(@scripts) >= 1, 'the tree has install scripts: ' . join(' ', @scripts));
for my $script (@scripts)
{
	is(compare("$srcdir/$script", "$extdir/$script"),
		0, "$script is installed and identical to the tree's (Makefile DATA)");
}

my $default = $node->safe_psql('postgres',
	q{SELECT default_version FROM pg_available_extensions WHERE name = 'task_events'});
my @versions = split /\n/,
  $node->safe_psql('postgres',
	q{SELECT version FROM pg_available_extension_versions WHERE name = 'task_events' ORDER BY version});
note "default version $default; available: @versions";
ok((grep { $_ eq $default } @versions), "the default version $default is available");

# This release's update, which the loop below must take (a test that only
# updated 1.0 to 1.0 would pass without it): from 1.0, the released version,
# to the default, 1.1, with task_events--1.0--1.1.sql.  A new release
# changes these lines.
is($default, '1.1', 'the default version is 1.1');
ok((grep { $_ eq '1.0' } @versions), 'the released version 1.0 is available, to be installed and updated');
is( $node->safe_psql(
		'postgres', q{
	SELECT path FROM pg_extension_update_paths('task_events') WHERE source = '1.0' AND target = '1.1'}),
	'1.0--1.1',
	'PostgreSQL updates 1.0 to 1.1 in one step, with task_events--1.0--1.1.sql');

# The schema as lines of text: one per property of every object of the
# extension, without OIDs, sorted.
my $SCHEMA_SQL = <<'SQL';
WITH ext AS (SELECT oid, extconfig, extcondition FROM pg_extension WHERE extname = 'task_events'),
members AS (
	SELECT d.classid, d.objid, d.objsubid
	FROM pg_depend d, ext
	WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'
),
rels AS (
	SELECT c.oid, c.oid::regclass::text AS name, c.relkind
	FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
	WHERE n.nspname = 'task_events'
),
procs AS (
	SELECT p.oid, p.oid::regprocedure::text AS name
	FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
	WHERE n.nspname = 'task_events'
),
lines AS (
	SELECT 'extension version ' || extversion FROM pg_extension WHERE extname = 'task_events'
	UNION ALL
	SELECT 'member ' || pg_describe_object(classid, objid, objsubid) FROM members
	UNION ALL
	SELECT 'namespace task_events owner-is-superuser ' || r.rolsuper || ' acl ' || coalesce(n.nspacl::text, '-')
	FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner WHERE n.nspname = 'task_events'
	UNION ALL
	SELECT format('relation %s kind %s persistence %s rls %s/%s acl %s options %s',
		r.name, c.relkind, c.relpersistence, c.relrowsecurity, c.relforcerowsecurity,
		coalesce(c.relacl::text, '-'), coalesce(c.reloptions::text, '-'))
	FROM rels r JOIN pg_class c ON c.oid = r.oid
	UNION ALL
	SELECT format('column %s.%s #%s %s notnull %s default %s identity %s generated %s acl %s',
		r.name, a.attname, a.attnum, format_type(a.atttypid, a.atttypmod), a.attnotnull,
		coalesce(pg_get_expr(d.adbin, d.adrelid), '-'), a.attidentity, a.attgenerated,
		coalesce(a.attacl::text, '-'))
	FROM rels r JOIN pg_attribute a ON a.attrelid = r.oid
	LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
	WHERE a.attnum > 0 AND NOT a.attisdropped
	UNION ALL
	SELECT format('constraint %s %s %s', r.name, c.conname, pg_get_constraintdef(c.oid))
	FROM rels r JOIN pg_constraint c ON c.conrelid = r.oid
	UNION ALL
	SELECT format('index %s', pg_get_indexdef(i.indexrelid))
	FROM rels r JOIN pg_index i ON i.indrelid = r.oid
	UNION ALL
	SELECT format('trigger %s enabled %s', pg_get_triggerdef(t.oid), t.tgenabled)
	FROM rels r JOIN pg_trigger t ON t.tgrelid = r.oid WHERE NOT t.tgisinternal
	UNION ALL
	SELECT format('policy %s %s cmd %s permissive %s roles %s using %s check %s',
		r.name, p.polname, p.polcmd, p.polpermissive,
		(SELECT string_agg(CASE WHEN x = 0 THEN 'public' ELSE x::regrole::text END, ',' ORDER BY 1)
		 FROM unnest(p.polroles) x),
		coalesce(pg_get_expr(p.polqual, p.polrelid), '-'),
		coalesce(pg_get_expr(p.polwithcheck, p.polrelid), '-'))
	FROM rels r JOIN pg_policy p ON p.polrelid = r.oid
	UNION ALL
	SELECT format('view %s %s', r.name, pg_get_viewdef(r.oid))
	FROM rels r WHERE r.relkind IN ('v', 'm')
	UNION ALL
	SELECT format('sequence %s %s start %s inc %s min %s max %s cache %s cycle %s',
		r.name, format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmin, s.seqmax,
		s.seqcache, s.seqcycle)
	FROM rels r JOIN pg_sequence s ON s.seqrelid = r.oid
	UNION ALL
	SELECT format('function %s returns %s kind %s lang %s volatile %s strict %s secdef %s leakproof %s parallel %s config %s acl %s',
		f.name, format_type(p.prorettype, NULL), p.prokind, l.lanname, p.provolatile, p.proisstrict,
		p.prosecdef, p.proleakproof, p.proparallel, coalesce(p.proconfig::text, '-'),
		coalesce(p.proacl::text, '-'))
	FROM procs f JOIN pg_proc p ON p.oid = f.oid JOIN pg_language l ON l.oid = p.prolang
	UNION ALL
	SELECT format('function %s source %s %s', f.name, coalesce(p.probin, '-'), p.prosrc)
	FROM procs f JOIN pg_proc p ON p.oid = f.oid
	UNION ALL
	SELECT format('type %s type %s', t.oid::regtype, t.typtype)
	FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
	WHERE n.nspname = 'task_events' AND t.typcategory <> 'A'
	UNION ALL
	SELECT format('enum %s %s %s', e.enumtypid::regtype, e.enumsortorder, e.enumlabel)
	FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid JOIN pg_namespace n ON n.oid = t.typnamespace
	WHERE n.nspname = 'task_events'
	UNION ALL
	SELECT format('initial privileges %s %s', pg_describe_object(i.classoid, i.objoid, i.objsubid), i.initprivs)
	FROM pg_init_privs i JOIN members m ON m.classid = i.classoid AND m.objid = i.objoid
	UNION ALL
	SELECT format('comment %s %s', pg_describe_object(d.classoid, d.objoid, d.objsubid), d.description)
	FROM pg_description d JOIN members m ON m.classid = d.classoid AND m.objid = d.objoid
	UNION ALL
	SELECT format('column comment %s %s', pg_describe_object(d.classoid, d.objoid, d.objsubid), d.description)
	FROM pg_description d JOIN rels r ON d.classoid = 'pg_class'::regclass AND d.objoid = r.oid
	WHERE d.objsubid > 0
	UNION ALL
	SELECT format('dumped with pg_dump %s condition %s', c::regclass, coalesce(w, '-'))
	FROM ext, unnest(ext.extconfig, ext.extcondition) AS u(c, w)
	UNION ALL
	SELECT format('seeded handler %s %s %s %s', handler, function, enabled, description)
	FROM task_events.handlers WHERE handler IN ('analytics', 'audit', 'notification', 'relay')
)
SELECT line FROM lines l(line) ORDER BY line COLLATE "C"
SQL

# Data written before the update: tasks in several states.  The handlers run
# only once the schema is the library's (before, process_pending refuses).
my $WRITES = q{
SELECT FROM generate_series(1, 10) i, task_events.create_task('user' || i % 3, 'before ' || i);
SELECT FROM task_events.tasks t, task_events.complete_task(t.task_id) WHERE t.title = 'before 5';
SELECT FROM task_events.tasks t, task_events.update_status(t.task_id, 'cancelled') WHERE t.title = 'before 7';
};

sub schema
{
	my ($db) = @_;
	return [ split /\n/, $node->safe_psql($db, $SCHEMA_SQL) ];
}

$node->safe_psql('postgres', 'CREATE DATABASE fresh');
$node->safe_psql('fresh', 'CREATE EXTENSION task_events');
my $fresh = schema('fresh');
cmp_ok(scalar(@$fresh), '>', 50, 'the fresh install has a schema to compare: ' . scalar(@$fresh) . ' lines');

my @updated;    # the versions updated to the default, not already there
for my $version (@versions)
{
	my $db = 'from_' . ($version =~ s/\W/_/gr);
	$node->safe_psql('postgres', "CREATE DATABASE $db");
	$node->safe_psql($db, "CREATE EXTENSION task_events VERSION '$version'");
	is($node->safe_psql($db, q{SELECT extversion FROM pg_extension WHERE extname = 'task_events'}),
		$version, "$version: CREATE EXTENSION task_events VERSION '$version' installs $version");
	$node->safe_psql($db, $WRITES);
	my $before = $node->safe_psql($db,
		'SELECT count(*) || \'/\' || max(seq) FROM task_events.events');
	if ($version ne $default)
	{
		my ($rc, $stdout, $stderr) = $node->psql($db, 'SELECT task_events.process_pending()');
		like($stderr, qr/ERROR:  task_events $version is installed in this database, but its handlers need version $default.*HINT:  Run ALTER EXTENSION task_events UPDATE;/s,
			"$version: before the update the handlers refuse to run, and say how to update");
	}

	my ($ret, $out, $err) = $node->psql($db, 'ALTER EXTENSION task_events UPDATE');
	is($ret, 0, "$version: ALTER EXTENSION task_events UPDATE succeeds")
	  or diag $err;
	my $updated_to =
	  $node->safe_psql($db, q{SELECT extversion FROM pg_extension WHERE extname = 'task_events'});
	is($updated_to, $default, "$version: updated to the default version $default");
	push @updated, $version if $ret == 0 && $updated_to eq $default && $version ne $default;

	my $got = schema($db);
	my %in_fresh = map { $_ => 1 } @$fresh;
	my %in_got = map { $_ => 1 } @$got;
	my @missing = grep { !$in_got{$_} } @$fresh;
	my @extra = grep { !$in_fresh{$_} } @$got;
	ok(!@missing && !@extra, "$version: the updated schema is the fresh install's")
	  or diag join "\n", (map { "missing after update: $_" } @missing),
	  (map { "not in a fresh install: $_" } @extra);

	is($node->safe_psql($db, 'SELECT count(*) || \'/\' || max(seq) FROM task_events.events'),
		$before, "$version: the events written before the update are kept");
	$node->safe_psql($db, $WRITES =~ s/before/after/gr);
	$node->safe_psql($db, 'SELECT task_events.process_pending()');
	handlers_match($node, "$version: old and new events handled exactly after the update", db => $db);
}

ok((grep { $_ eq '1.0' } @updated), 'the update from 1.0 to 1.1 was run, and checked above')
  or diag "versions updated: @updated";

$node->stop;
done_testing();
