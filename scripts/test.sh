#!/usr/bin/env bash
# Run every test suite of task_events: the single command README and CI use.
# Run as root (sudo scripts/test.sh): it installs packages, installs the
# extension, and runs the servers as the OS user postgres.
#
# Suites: build, pg_regress, isolation, pgTAP (test/pgtap/*.sql), TAP
# (test/t/*.pl), the bench smoke run (bench/smoke.sh), then the same suites
# and the fuzzer against a build with sanitizers (scripts/sanitize.sh) and
# the static analysis (scripts/analyze.sh).  Every suite runs
# even when an earlier one failed, except that nothing runs against the
# installed extension when the build failed (it would test a stale install).
# Ends with a summary table; exits non-zero if any suite failed.
#
# Environment:
#   TE_SUITE_TIMEOUT  time limit per suite, as for timeout(1) (default 20m)
#   TE_KEEP_TMP=1     keep the temporary copy even when everything passed
#   TE_ONLY           run only these suites after the build, e.g. "pgTAP TAP"
#                     (names as in the summary: pg_regress isolation pgTAP TAP
#                     bench-smoke sanitizers analysis)
#   TE_TAP            run only the TAP files whose names match these globs,
#                     e.g. "004* 01*" (for working on one test; CI sets neither)
# The suites are called through run_suite, which shellcheck cannot follow.
# shellcheck disable=SC2317
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
PG_BIN=${TE_PG_BIN:-/usr/lib/postgresql/15/bin}
PG_CONFIG=$PG_BIN/pg_config
PGXS_DIR=${PG_BIN%/bin}/lib/pgxs
SUITE_TIMEOUT=${TE_SUITE_TIMEOUT:-20m}
SKIP=77 # a suite's exit status for "nothing to run"

if [[ $EUID -ne 0 ]]; then
	echo "test.sh: run as root (sudo scripts/test.sh): it installs packages and the extension" >&2
	exit 1
fi

bash "$ROOT/scripts/install-deps.sh"

# The throwaway servers (pgTAP) run the same binaries as the other suites.
PG_TEMP_BIN=${PG_TEMP_BIN:-$PG_BIN}
# shellcheck source=scripts/pg-temp.sh
. "$ROOT/scripts/pg-temp.sh"

# The copy the suites run in: postgres cannot read a clone under /root.
WORK=$(mktemp -d /tmp/task_events_test.XXXXXX)
COPY=$WORK/src
FAILED=0
cleanup() {
	# Keep the copy (diffs, logs) when something failed in it.
	if [[ ! -d $COPY ]] || { ((FAILED == 0)) && [[ ${TE_KEEP_TMP:-0} != 1 ]]; }; then
		rm -rf -- "$WORK"
	else
		echo "test.sh: test files kept in $WORK"
	fi
}
trap cleanup EXIT

SUITE_NAMES=()
SUITE_RESULTS=()

banner() {
	printf '\n==================== %s ====================\n' "$*"
}

# run_suite NAME FUNCTION: run the suite in a subshell with errexit on, so any
# failing command fails the suite but not this script.  Exit status 77 = SKIP.
run_suite() {
	local name=$1 rc
	shift
	banner "$name"
	set +e
	(
		set -e
		"$@"
	)
	rc=$?
	set -e
	case $rc in
	0) SUITE_RESULTS+=(PASS) ;;
	"$SKIP") SUITE_RESULTS+=(SKIP) ;;
	124 | 137)
		SUITE_RESULTS+=("FAIL (timed out after $SUITE_TIMEOUT)")
		FAILED=1
		;;
	*)
		SUITE_RESULTS+=("FAIL (exit $rc)")
		FAILED=1
		;;
	esac
	SUITE_NAMES+=("$name")
	echo "---- $name: ${SUITE_RESULTS[-1]}"
}

not_run() {
	SUITE_NAMES+=("$1")
	SUITE_RESULTS+=("FAIL (not run: $2)")
	FAILED=1
}

# Run a command as postgres in the copy, with PostgreSQL 15's tools first on
# PATH and a time limit (timeout signals the whole process group).
in_copy() {
	pg_temp_as_user -C "$COPY" env PATH="$PG_BIN:$PATH" PG_CONFIG="$PG_CONFIG" \
		timeout -k 30s "$SUITE_TIMEOUT" "$@"
}

# Print a file with a heading, if it exists.
show() {
	if [[ -s $1 ]]; then
		echo "----- $1 -----"
		cat -- "$1"
	fi
}

# A variable of the Makefile, e.g. REGRESS, as make sees it.
make_var() {
	# shellcheck disable=SC2016 # $($*) is make syntax, not shell
	make -s --no-print-directory -C "$ROOT" -f Makefile -f - PG_CONFIG="$PG_CONFIG" \
		"print-$1" <<<'print-%: ; @echo $($*)'
}

# Names declared in the Makefile must have their files: a declared test whose
# file is missing is an error, and this says which ones.  Returns SKIP when the
# Makefile declares none.
check_declared() {
	local kind=$1 pattern=$2 name missing=()
	shift 2
	if (($# == 0)); then
		echo "no $kind tests declared in the Makefile"
		return "$SKIP"
	fi
	for name in "$@"; do
		[[ -f $COPY/${pattern//@/$name} ]] || missing+=("${pattern//@/$name}")
	done
	if ((${#missing[@]} > 0)); then
		echo "the Makefile declares $kind tests whose files are missing: ${missing[*]}" >&2
		return 1
	fi
}

suite_build() {
	make -C "$ROOT" PG_CONFIG="$PG_CONFIG" -j"$(nproc)"
	make -C "$ROOT" PG_CONFIG="$PG_CONFIG" install
}

# pg_regress on its own temp instance (Makefile: REGRESS, REGRESS_OPTS).
suite_regress() {
	local -a tests
	local rc
	read -ra tests <<<"$(make_var REGRESS)"
	rc=0
	check_declared pg_regress 'sql/@.sql' "${tests[@]}" || rc=$?
	((rc != SKIP)) || return "$SKIP"
	# Run even with files missing: the tests that exist still report.
	in_copy make PG_CONFIG="$PG_CONFIG" installcheck ISOLATION= || {
		rc=$?
		show "$COPY/regression.diffs"
	}
	return "$rc"
}

# Isolation specs on their own temp instance (Makefile: ISOLATION, ISOLATION_OPTS).
suite_isolation() {
	local -a tests
	local rc
	read -ra tests <<<"$(make_var ISOLATION)"
	rc=0
	check_declared isolation 'test/isolation/specs/@.spec' "${tests[@]}" || rc=$?
	((rc != SKIP)) || return "$SKIP"
	in_copy make PG_CONFIG="$PG_CONFIG" installcheck REGRESS= || {
		rc=$?
		show "$COPY/output_iso/regression.diffs"
	}
	return "$rc"
}

# pgTAP files with pg_prove against a throwaway server configured like the
# pg_regress instances (test/regress.conf).
suite_pgtap() {
	local -a files
	local db=task_events_pgtap datadir=$WORK/pgtap-data rc
	shopt -s nullglob
	files=("$COPY"/test/pgtap/*.sql)
	shopt -u nullglob
	if ((${#files[@]} == 0)); then
		echo "no pgTAP tests yet (test/pgtap/*.sql): skipped"
		return "$SKIP"
	fi
	trap pg_temp_cleanup EXIT
	pg_temp_start "$datadir" "include_if_exists = '$COPY/test/regress.conf'"
	in_copy "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE $db"
	in_copy "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -d "$db" \
		-c 'CREATE EXTENSION pgtap' -c 'CREATE EXTENSION dblink' -c 'CREATE EXTENSION task_events'
	in_copy pg_prove -d "$db" "${files[@]#"$COPY"/}" || {
		rc=$?
		echo "----- tail of the server log ($datadir/server.log) -----"
		tail -n 100 "$datadir/server.log" || true
		return "$rc"
	}
	pg_temp_stop "$datadir"
}

# Perl TAP tests with PostgreSQL::Test::Cluster, set up as PGXS's
# prove_installcheck does: TESTDIR (where tmp_check/ and its logs go),
# PG_REGRESS (Cluster->init runs "pg_regress --config-auth"), and PATH with the
# server binaries first (initdb, pg_ctl, pg_config are found through PATH).
suite_tap() {
	local -a files
	local name out=$WORK/tap.out rc
	shopt -s nullglob
	if [[ -n ${TE_TAP:-} ]]; then
		local glob globs
		read -ra globs <<<"$TE_TAP"
		files=()
		for glob in "${globs[@]}"; do
			files+=("$COPY"/test/t/$glob.pl)
		done
	else
		files=("$COPY"/test/t/*.pl)
	fi
	shopt -u nullglob
	if ((${#files[@]} == 0)); then
		echo "no TAP tests yet (test/t/*.pl): skipped"
		return "$SKIP"
	fi
	rm -rf -- "$COPY/test/tmp_check"
	in_copy env \
		PERL5LIB="$PGXS_DIR/src/test/perl${PERL5LIB:+:$PERL5LIB}" \
		TESTDIR="$COPY/test" \
		PG_REGRESS="$PGXS_DIR/src/test/regress/pg_regress" \
		prove -I "$COPY/test/t" "${files[@]#"$COPY"/}" | tee "$out" || {
		rc=$?
		# A failed test's own log holds the commands it ran and their output;
		# prove's summary names the failed files ("t/x.pl (Wstat: ...").
		sed -n 's|^test/t/\([^ /]*\)\.pl (Wstat.*|\1|p' "$out" | while read -r name; do
			echo "----- last lines of test/tmp_check/log/regress_log_$name -----"
			tail -n 80 "$COPY/test/tmp_check/log/regress_log_$name" || true
		done
		return "$rc"
	}
}

# The benchmark smoke run: no thresholds, it only has to complete.  Runs as
# postgres from the copy's root; it may source scripts/pg-temp.sh.
suite_bench() {
	if [[ ! -f $COPY/bench/smoke.sh ]]; then
		echo "no bench/smoke.sh yet: skipped"
		return "$SKIP"
	fi
	in_copy bash bench/smoke.sh
}

# Every suite again, and the fuzzer, on a sanitized build in a private copy
# of PostgreSQL (the system-wide install is not touched).  The nested
# test.sh it runs skips these last two suites.
suite_sanitize() {
	TE_ONLY="pg_regress isolation pgTAP TAP bench-smoke" bash "$ROOT/scripts/sanitize.sh"
}

suite_analyze() {
	bash "$ROOT/scripts/analyze.sh"
}

run_suite build suite_build
if [[ ${SUITE_RESULTS[-1]} == PASS ]]; then
	# cp -a keeps the build's timestamps, so nothing rebuilds in the copy.
	mkdir -p -- "$COPY"
	cp -a -- "$ROOT/." "$COPY/"
	# Outputs of earlier local runs would be mistaken for this run's.
	rm -rf -- "$COPY"/{tmp_check,tmp_check_iso,results,output_iso,log} \
		"$COPY"/regression.{diffs,out} "$COPY/test/tmp_check"
	pg_temp_chown "$WORK"
	for s in pg_regress:suite_regress isolation:suite_isolation pgTAP:suite_pgtap \
		TAP:suite_tap bench-smoke:suite_bench sanitizers:suite_sanitize analysis:suite_analyze; do
		if [[ -z ${TE_ONLY:-} || " $TE_ONLY " == *" ${s%%:*} "* ]]; then
			run_suite "${s%%:*}" "${s#*:}"
		fi
	done
else
	for s in pg_regress isolation pgTAP TAP bench-smoke sanitizers analysis; do
		not_run "$s" "build failed"
	done
fi

banner summary
passed=0 failed=0 skipped=0
for i in "${!SUITE_NAMES[@]}"; do
	printf '  %-12s %s\n' "${SUITE_NAMES[$i]}" "${SUITE_RESULTS[$i]}"
	case ${SUITE_RESULTS[$i]} in
	PASS) passed=$((passed + 1)) ;;
	SKIP) skipped=$((skipped + 1)) ;;
	*) failed=$((failed + 1)) ;;
	esac
done
echo "suites: $passed passed, $failed failed, $skipped skipped"
exit "$FAILED"
