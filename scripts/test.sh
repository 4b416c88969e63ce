#!/usr/bin/env bash
# Run every test suite of task_events: the single command README and CI use.
# Run as root (sudo scripts/test.sh): it installs packages (install-deps.sh),
# builds and installs the extension, then runs the suites as the OS user
# postgres in a copy of the tree under /tmp, through the standard targets
# (docs/testing.md): make installcheck (pg_regress, isolation, TAP), make
# pgtap, bench/smoke.sh, then scripts/sanitize.sh (the suites again on a
# sanitized build, and the fuzzer) and scripts/analyze.sh.  Every suite runs
# even when an earlier one failed, except that nothing runs against the
# installed extension when the build failed (it would test a stale install).
# Ends with a summary table; exits non-zero if any suite failed.
#
# Environment:
#   TE_PG_BIN         the PostgreSQL to build against, install into and test
#                     with (default /usr/lib/postgresql/15/bin); a private
#                     copy for scripts/sanitize.sh and scripts/valgrind.sh
#   TE_SUITE_TIMEOUT  time limit per suite, as for timeout(1) (default 20m)
#   TE_KEEP_TMP=1     keep the temporary copy even when everything passed
#   TE_ONLY           run only these suites after the build, e.g. "pgTAP TAP"
#                     (names as in the summary: package pg_regress isolation
#                     pgTAP TAP bench-smoke sanitizers analysis)
#   TE_TAP            run only the TAP files whose names match these globs,
#                     e.g. "004* 01*" (for working on one test; CI sets neither)
# The suites are called through run_suite, which shellcheck cannot follow.
# shellcheck disable=SC2317
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
# scripts/valgrind.sh rewrites this line in its copy: keep it as it is.
PG_BIN=${TE_PG_BIN:-/usr/lib/postgresql/15/bin}
PG_CONFIG=$PG_BIN/pg_config
SUITE_TIMEOUT=${TE_SUITE_TIMEOUT:-20m}

# The suites, in the order they run: "name:function".  BEFORE_BUILD run as
# root on the source tree before the build; AFTER_BUILD in the copy, after
# a successful build and install.  To add one, write its function below and
# add it to one list; TE_ONLY selects among all of them.
BEFORE_BUILD=(package:suite_package)
AFTER_BUILD=(pg_regress:suite_regress isolation:suite_isolation pgTAP:suite_pgtap TAP:suite_tap
	bench-smoke:suite_bench sanitizers:suite_sanitize analysis:suite_analyze)

if [[ $EUID -ne 0 ]]; then
	echo "test.sh: run as root (sudo scripts/test.sh): it installs packages and the extension" >&2
	echo "test.sh: as another user, run the suites with make installcheck and make pgtap (docs/testing.md)" >&2
	exit 1
fi

bash "$ROOT/scripts/install-deps.sh"

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
# failing command fails the suite but not this script.
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
	77) SUITE_RESULTS+=(SKIP) ;; # nothing to run here (said why)
	124 | 137) SUITE_RESULTS+=("FAIL (timed out after $SUITE_TIMEOUT)") ;;
	*) SUITE_RESULTS+=("FAIL (exit $rc)") ;;
	esac
	((rc == 0 || rc == 77)) || FAILED=1
	SUITE_NAMES+=("$name")
	echo "---- $name: ${SUITE_RESULTS[-1]}"
}

selected() {
	[[ -z ${TE_ONLY:-} || " $TE_ONLY " == *" $1 "* ]]
}

# Run a command as postgres in the copy, with the tested PostgreSQL's tools
# first on PATH and a time limit (timeout signals the whole process group).
in_copy() {
	(cd "$COPY" && runuser -u postgres -- env PATH="$PG_BIN:$PATH" \
		timeout -k 30s "$SUITE_TIMEOUT" "$@")
}

# make TARGET in the copy, with the tested PostgreSQL.
make_in_copy() {
	in_copy make --no-print-directory PG_CONFIG="$PG_CONFIG" "$@"
}

# Print a file with a heading, if it exists.
show() {
	if [[ -s $1 ]]; then
		echo "----- $1 -----"
		cat -- "$1"
	fi
}

# The Debian package: built, installed, tested with the regression suites
# and purged again (scripts/package.sh), before the build installs the tree.
suite_package() {
	bash "$ROOT/scripts/package.sh"
}

suite_build() {
	make -C "$ROOT" PG_CONFIG="$PG_CONFIG" -j"$(nproc)"
	make -C "$ROOT" PG_CONFIG="$PG_CONFIG" install
}

suite_regress() {
	make_in_copy installcheck ISOLATION= TAP_TESTS= || {
		show "$COPY/regression.diffs"
		return 1
	}
}

suite_isolation() {
	make_in_copy installcheck REGRESS= TAP_TESTS= || {
		show "$COPY/output_iso/regression.diffs"
		return 1
	}
}

# make pgtap prints the tail of its server's log when a file fails.
suite_pgtap() {
	make_in_copy pgtap
}

suite_tap() {
	local -a globs
	local glob tests="" name out=$WORK/tap.out
	read -ra globs <<<"${TE_TAP:-*}"
	for glob in "${globs[@]}"; do
		tests+=" test/t/$glob.pl" # expanded by the shell of make's recipe
	done
	make_in_copy installcheck REGRESS= ISOLATION= PROVE_TESTS="${tests# }" | tee "$out" || {
		# A failed test's own log holds the commands it ran and their output;
		# prove's summary names the failed files ("test/t/x.pl   (Wstat: ...").
		sed -n 's|^test/t/\([^ /]*\)\.pl *(Wstat.*|\1|p' "$out" | while read -r name; do
			echo "----- last lines of tmp_check/log/regress_log_$name -----"
			tail -n 80 "$COPY/tmp_check/log/regress_log_$name" || true
		done
		return 1
	}
}

# The benchmark smoke run: no thresholds, it only has to complete.  The
# bench and scripts/pg-temp.sh take their PostgreSQL from these variables.
suite_bench() {
	in_copy env PG_BIN="$PG_BIN" PG_TEMP_BIN="$PG_BIN" bash bench/smoke.sh
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

for s in "${BEFORE_BUILD[@]}"; do
	if selected "${s%%:*}"; then
		run_suite "${s%%:*}" "${s#*:}"
	fi
done
run_suite build suite_build
if [[ ${SUITE_RESULTS[-1]} == PASS ]]; then
	# cp -a keeps the build's timestamps, so nothing rebuilds in the copy.
	mkdir -p -- "$COPY"
	cp -a -- "$ROOT/." "$COPY/"
	# Outputs of earlier local runs would be mistaken for this run's.
	rm -rf -- "$COPY"/{tmp_check*,results,output_iso,log} "$COPY"/regression.{diffs,out}
	chown -R postgres: "$WORK"
fi
for s in "${AFTER_BUILD[@]}"; do
	if ! selected "${s%%:*}"; then
		continue
	elif [[ -d $COPY ]]; then
		run_suite "${s%%:*}" "${s#*:}"
	else
		SUITE_NAMES+=("${s%%:*}")
		SUITE_RESULTS+=("FAIL (not run: build failed)")
	fi
done

banner summary
passed=0 failed=0
for i in "${!SUITE_NAMES[@]}"; do
	printf '  %-12s %s\n' "${SUITE_NAMES[$i]}" "${SUITE_RESULTS[$i]}"
	if [[ ${SUITE_RESULTS[$i]} == PASS ]]; then
		passed=$((passed + 1))
	elif [[ ${SUITE_RESULTS[$i]} == SKIP ]]; then
		:
	else
		failed=$((failed + 1))
	fi
done
echo "suites: $passed passed, $failed failed"
exit "$FAILED"
