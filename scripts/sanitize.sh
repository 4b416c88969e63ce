#!/usr/bin/env bash
# Build task_events with AddressSanitizer + UndefinedBehaviorSanitizer and run
# every test suite (scripts/test.sh: pg_regress, isolation, pgTAP, TAP, bench
# smoke) and the fuzzer (scripts/fuzz.sh) against it.  Run as root.
#
# Nothing system-wide is touched: the sanitized build is installed into a
# private, relocated copy of PostgreSQL 15 (binaries, libraries, share) in a
# temporary directory, so the extension other people test or benchmark on this
# machine (/usr/lib/postgresql/15/lib/task_events.so) stays the normal build,
# and a run of test.sh or the bench next to this one is not disturbed.
#
# How the sanitizers reach the server: postgres itself is not instrumented,
# so the ASan runtime must be the first library of every server process.  In
# the private copy, bin/postgres is a wrapper that sets LD_PRELOAD (libasan,
# libubsan), ASAN_OPTIONS and UBSAN_OPTIONS and execs the real binary; every
# server any suite starts (pg_regress --temp-instance, pg_ctl, the TAP
# Cluster, initdb's bootstrap) goes through it, and nothing else (make, perl,
# psql) runs with the runtimes preloaded.  A report goes to a file in the
# report directory (log_path) where the runtime honours it, else to the
# server's stderr, that is its log (UBSan here); both are scanned, and any
# report fails the run, as does a server process killed by SIGSEGV, SIGBUS,
# SIGILL, SIGFPE or SIGABRT in any log the suites kept.
# Leak detection is off: PostgreSQL frees memory by resetting contexts and at
# process exit, by design.  Note: palloc'd chunks live inside malloc'd blocks,
# so ASan sees overflows of stack and global variables and of large (>8 kB,
# separately malloc'd) chunks, use of freed blocks, and wild or NULL pointer
# dereferences (with a stack); not a one-byte overrun of a small palloc chunk.
# UBSan: -fwrapv (in PostgreSQL's CFLAGS) makes signed overflow defined, so it
# is not reported; shifts, alignment, NULL, bounds, bool/enum loads and float
# casts are.
#
# ASan fallback: on some machines an uninstrumented program with libasan
# preloaded deadlocks in glibc (seen here: Debian 12, kernel 6.18, gcc 12's
# libasan and clang 14's alike; postgres -V hangs in bindtextdomain, psql at
# exit in freelocale, on a glibc rwlock).  The script checks this first
# (postgres -V with the runtime preloaded, 20 s limit); when it hangs, it
# builds with UBSan only, says so in a WARNING line and in the summary, and
# the signal check of the logs still catches crashes.  TE_SAN_REQUIRE_ASAN=1
# makes that a failure instead.
#
# Usage: scripts/sanitize.sh [--no-fuzz] [--keep] [--self-test]
#   --no-fuzz    only the test suites
#   --keep       keep the temporary directory (build, logs, reports)
#   --self-test  prove the harness: build a copy with a deliberate
#                stack-buffer-overflow, start a server through the wrapper,
#                trigger it, and check that a report is found (about 1 min)
# Environment: TE_SAN_FLAGS overrides the compiler flags (see SAN_FLAGS);
# TE_SAN_REQUIRE_ASAN=1 fails instead of falling back to UBSan only.
#
# Test.sh is reused from a copy of the tree, pointed at the private copy
# with TE_PG_BIN (see te_san_point_test_sh).
# cleanup runs from the EXIT trap, which shellcheck cannot follow.
# shellcheck disable=SC2317
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
SYS_PG=/usr/lib/postgresql/15
SYS_SHARE=/usr/share/postgresql/15
ASAN_FLAGS='-fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all -fno-omit-frame-pointer'
UBSAN_FLAGS='-fsanitize=undefined,float-cast-overflow -fno-sanitize-recover=all -fno-omit-frame-pointer'

FUZZ=1 KEEP=0 SELF_TEST=0
for arg in "$@"; do
	case $arg in
	--no-fuzz) FUZZ=0 ;;
	--keep) KEEP=1 ;;
	--self-test) SELF_TEST=1 ;;
	-h | --help)
		sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "sanitize.sh: unknown argument $arg (see --help)" >&2
		exit 2
		;;
	esac
done

if [[ $EUID -ne 0 ]]; then
	echo "sanitize.sh: run as root: it installs packages and runs servers as postgres" >&2
	exit 1
fi

bash "$ROOT/scripts/install-deps.sh"

LIBASAN=$(gcc -print-file-name=libasan.so)
LIBUBSAN=$(gcc -print-file-name=libubsan.so)
for lib in "$LIBASAN" "$LIBUBSAN"; do
	if [[ ! -e $lib ]]; then
		echo "sanitize.sh: $lib not found (gcc's sanitizer runtimes, package libasan8/libubsan1)" >&2
		exit 1
	fi
done
LIBASAN=$(realpath -- "$LIBASAN")
LIBUBSAN=$(realpath -- "$LIBUBSAN")

# Can the ASan runtime be preloaded into PostgreSQL's binaries here?
SAN_MODE=asan
if ! timeout -k 5 20 env LD_PRELOAD="$LIBASAN" ASAN_OPTIONS=detect_leaks=0 \
	"$SYS_PG/bin/postgres" -V >/dev/null 2>&1; then
	if [[ ${TE_SAN_REQUIRE_ASAN:-0} == 1 ]]; then
		echo "sanitize.sh: postgres does not run with $LIBASAN preloaded (hangs or fails) and TE_SAN_REQUIRE_ASAN=1" >&2
		exit 1
	fi
	SAN_MODE=ubsan
	echo "sanitize.sh: WARNING: postgres hangs or fails with $LIBASAN preloaded on this machine:" \
		"building with UndefinedBehaviorSanitizer only (no AddressSanitizer)" >&2
fi
if [[ -n ${TE_SAN_FLAGS:-} ]]; then
	SAN_FLAGS=$TE_SAN_FLAGS
elif [[ $SAN_MODE == asan ]]; then
	SAN_FLAGS=$ASAN_FLAGS
else
	SAN_FLAGS=$UBSAN_FLAGS
fi
if [[ $SAN_MODE == asan ]]; then
	SAN_PRELOAD=$LIBASAN:$LIBUBSAN
else
	SAN_PRELOAD=$LIBUBSAN
fi

WORK=$(mktemp -d /tmp/task_events_sanitize.XXXXXX)
chmod 755 "$WORK"
PRIV=$WORK/pg                 # the private PostgreSQL, laid out like /usr
PRIV_BIN=$PRIV$SYS_PG/bin
REPORTS=$WORK/sanitizer-reports
COPY=$WORK/src
STATUS=1
cleanup() {
	if ((KEEP == 1 || STATUS != 0)); then
		echo "sanitize.sh: files kept in $WORK (sanitizer reports in $REPORTS)"
	else
		rm -rf -- "$WORK"
	fi
}
trap cleanup EXIT

# A copy of PostgreSQL 15 under $PRIV.  PostgreSQL finds its share and lib
# directories relative to its binary, so the copy uses its own lib/ (where
# the sanitized task_events.so goes) and share/ (control file, SQL script),
# and pg_config there reports the copy's paths to PGXS.  Headers are linked.
te_san_private_pg() {
	mkdir -p -- "$PRIV/usr/lib/postgresql" "$PRIV/usr/share/postgresql" "$PRIV/usr/include"
	cp -a -- "$SYS_PG" "$PRIV/usr/lib/postgresql/"
	cp -a -- "$SYS_SHARE" "$PRIV/usr/share/postgresql/"
	ln -s /usr/include/postgresql "$PRIV/usr/include/postgresql"
	# Whatever task_events build is installed system-wide must not be tested
	# by mistake: the copy has none until the sanitized one is installed.
	rm -rf -- "$PRIV$SYS_PG/lib/task_events.so" "$PRIV$SYS_PG/lib/bitcode/task_events" \
		"$PRIV$SYS_PG/lib/bitcode/task_events.index.bc" \
		"$PRIV$SYS_SHARE"/extension/task_events[.-]*

	mv -- "$PRIV_BIN/postgres" "$PRIV_BIN/postgres.real"
	cat >"$PRIV_BIN/postgres" <<EOF
#!/bin/bash
# Written by scripts/sanitize.sh: postgres with the sanitizer runtimes
# preloaded, so that an instrumented task_events.so can be loaded.
export LD_PRELOAD='$SAN_PRELOAD'\${LD_PRELOAD:+:\$LD_PRELOAD}
export ASAN_OPTIONS='detect_leaks=0:abort_on_error=1:halt_on_error=1:disable_coredump=1:detect_odr_violation=0:log_path=$REPORTS/asan'
export UBSAN_OPTIONS='print_stacktrace=1:halt_on_error=1:abort_on_error=1:log_path=$REPORTS/ubsan'
exec -a "\$0" "\${0%/*}/postgres.real" "\$@"
EOF
	chmod 755 "$PRIV_BIN/postgres"
	mkdir -p -- "$REPORTS"
	chmod 1777 "$REPORTS"
	if [[ $("$PRIV_BIN/pg_config" --bindir) != "$PRIV_BIN" ]]; then
		echo "sanitize.sh: the copy of PostgreSQL in $PRIV is not relocatable" >&2
		return 1
	fi
}

# test.sh takes the PostgreSQL to test from TE_PG_BIN: check that its copy
# still does, so that it cannot test the system-wide install instead.
te_san_point_test_sh() {
	local f=$1
	# shellcheck disable=SC2016 # literal text to find, not expansions
	if ! grep -q '^PG_BIN=${TE_PG_BIN:-' "$f"; then
		echo "sanitize.sh: $f does not take its PostgreSQL from TE_PG_BIN any more (its PG_BIN line changed)" >&2
		return 1
	fi
}

# The lines of log file f that report a sanitizer finding or a crash, but
# for the crashes of processes a test announced it would crash on purpose.
te_san_unexplained_crashes() {
	local f=$1 pids
	pids=$(grep -o -E 'te_test: deliberate SIG[A-Z]+ to PID [0-9]+' -- "$f" | awk '{print $NF}' | sort -u | paste -sd'|' || true)
	grep -E 'terminated by signal (4|6|7|8|11)[^0-9]|ERROR: (Address|UndefinedBehavior)Sanitizer|runtime error:' -- "$f" |
		{ if [[ -n $pids ]]; then grep -v -E "\(PID ($pids)\) was terminated by signal"; else cat; fi; } || true
}

# Print every sanitizer report and every server process killed by a signal
# that means a crash, from the report directory and the logs under the given
# directories.  Returns 1 when there is any.
te_san_findings() {
	local found=0 f
	shopt -s nullglob
	for f in "$REPORTS"/*; do
		found=1
		echo "===== sanitizer report $f ====="
		cat -- "$f"
	done
	shopt -u nullglob
	if (($# > 0)); then
		# SIGKILL, SIGTERM and SIGQUIT are what the TAP tests send on purpose;
		# a test that crashes a process on purpose logs
		# "te_test: deliberate SIG... to PID n" first, and that crash is no
		# finding.
		while IFS= read -r f; do
			if [[ -z $(te_san_unexplained_crashes "$f") ]]; then
				continue
			fi
			found=1
			echo "===== crash in $f ====="
			grep -n -E -B2 -A20 'terminated by signal (4|6|7|8|11)[^0-9]|ERROR: (Address|UndefinedBehavior)Sanitizer|runtime error:' -- "$f" | head -n 80
		done < <(find "$@" -type f \( -name '*.log' -o -name 'postmaster.log' -o -name 'server.log' -o -name 'regress_log_*' \) \
			-exec grep -l -E 'terminated by signal (4|6|7|8|11)[^0-9]|ERROR: (Address|UndefinedBehavior)Sanitizer|runtime error:' {} + 2>/dev/null)
	fi
	return $((found == 0 ? 0 : 1))
}

# Copy the tree (the source as it is, uncommitted changes included) and
# remove the build outputs, so that everything is compiled with SAN_FLAGS.
te_san_copy_tree() {
	mkdir -p -- "$COPY"
	cp -a -- "$ROOT/." "$COPY/"
	make -s -C "$COPY" PG_CONFIG="$PRIV_BIN/pg_config" clean >/dev/null
	rm -rf -- "$COPY"/{tmp_check,tmp_check_iso,results,output_iso,log} "$COPY/test/tmp_check"
}

# --self-test: a throwaway copy with a deliberate bug in te_uuid_v7 (every
# create_task reaches it) must produce a report and fail: a stack-buffer
# overflow under ASan, a shift past the width of int under UBSan only.
te_san_self_test() {
	local src=$COPY/src/uuid_v7.c data=$WORK/selftest-data out rc=0 bug expect
	if [[ $SAN_MODE == asan ]]; then
		bug='{ volatile int te_off = UUID_LEN + 8; out->data[0] ^= random_bytes[te_off]; }'
		expect='stack-buffer-overflow'
	else
		bug='{ volatile int te_shift = 40; out->data[0] ^= (unsigned char) (1 << te_shift); }'
		expect='runtime error: shift exponent'
	fi
	grep -q 'memcpy(out->data, random_bytes, UUID_LEN);' "$src" || {
		echo "sanitize.sh: self-test: the line to break in $src is gone; update the self-test" >&2
		return 1
	}
	sed -i "s/memcpy(out->data, random_bytes, UUID_LEN);/& $bug/" "$src"
	make -s -C "$COPY" PG_CONFIG="$PRIV_BIN/pg_config" COPT="$SAN_FLAGS" -j"$(nproc)" >/dev/null
	make -s -C "$COPY" PG_CONFIG="$PRIV_BIN/pg_config" install >/dev/null
	# shellcheck disable=SC2034 # read by pg-temp.sh
	PG_TEMP_BIN=$PRIV_BIN
	# shellcheck source=scripts/pg-temp.sh
	. "$ROOT/scripts/pg-temp.sh"
	trap 'pg_temp_cleanup; cleanup' EXIT
	pg_temp_start "$data"
	out=$("$PRIV_BIN/psql" -X -q -d postgres -c 'CREATE EXTENSION task_events' \
		-c "SELECT task_events.create_task('u', 't')" 2>&1) || rc=$?
	pg_temp_stop "$data"
	echo "psql (exit $rc): $out"
	if te_san_findings "$data" >"$WORK/selftest-findings.txt"; then
		echo "self-test FAILED: the injected overflow was not reported"
		return 1
	fi
	grep -m1 -h -E 'ERROR: AddressSanitizer|runtime error' "$REPORTS"/* "$data/server.log" 2>/dev/null || true
	grep -q "$expect" "$WORK/selftest-findings.txt" || {
		echo "self-test FAILED: a report was found, but not the expected '$expect':"
		cat "$WORK/selftest-findings.txt"
		return 1
	}
	echo "self-test passed ($SAN_MODE): the injected bug was reported ($expect) and fails the run"
	rm -rf -- "${REPORTS:?}"/*
}

echo "sanitize.sh: mode $SAN_MODE; private PostgreSQL in $PRIV; flags: $SAN_FLAGS"
te_san_private_pg
te_san_copy_tree

if ((SELF_TEST == 1)); then
	te_san_self_test
	STATUS=0
	exit 0
fi

te_san_point_test_sh "$COPY/scripts/test.sh"

START=$(date +%s)
FAILED=0
# test.sh builds (make picks COPT up from the environment), installs into
# the private PostgreSQL (PG_CONFIG of TE_PG_BIN) and runs every suite; its
# servers start through the wrapper.  bench.sh reads PG_BIN, pg-temp.sh
# PG_TEMP_BIN.
set +e
# TE_KEEP_TMP and BENCH_KEEP keep test.sh's and the bench's directories
# (their server logs) for the scan below; they are removed after it.
COPT=$SAN_FLAGS TE_PG_BIN=$PRIV_BIN PG_BIN=$PRIV_BIN PG_TEMP_BIN=$PRIV_BIN TE_KEEP_TMP=1 BENCH_KEEP=1 \
	bash "$COPY/scripts/test.sh" 2>&1 | tee "$WORK/test.out"
TEST_RC=${PIPESTATUS[0]}
set -e
TEST_SECS=$(($(date +%s) - START))
TEST_WORK=$(sed -n 's/^test.sh: test files kept in //p' "$WORK/test.out" | tail -n 1)
BENCH_WORK=$(sed -n 's/^bench: data directory and raw outputs kept in //p' "$WORK/test.out" | tail -n 1)
((TEST_RC == 0)) || FAILED=1

if ! readelf -d "$PRIV$SYS_PG/lib/task_events.so" 2>/dev/null | grep -q 'libubsan'; then
	echo "sanitize.sh: the installed task_events.so is not the sanitized build" >&2
	FAILED=1
fi

FUZZ_RC=-
FUZZ_SECS=0
if ((FUZZ == 1)); then
	START=$(date +%s)
	set +e
	PG_BIN=$PRIV_BIN bash "$COPY/scripts/fuzz.sh" --out "$WORK/fuzz" 2>&1 | tee "$WORK/fuzz.out"
	FUZZ_RC=${PIPESTATUS[0]}
	set -e
	FUZZ_SECS=$(($(date +%s) - START))
	((FUZZ_RC == 0)) || FAILED=1
fi

printf '\n==================== sanitizer findings ====================\n'
FINDINGS=0
te_san_findings ${TEST_WORK:+"$TEST_WORK"} ${BENCH_WORK:+"$BENCH_WORK"} "$WORK/fuzz" || FINDINGS=1
if ((FINDINGS == 0)); then
	echo "none: no sanitizer report, no server process crashed"
fi
((FINDINGS == 0)) || FAILED=1
# test.sh and the bench kept their files for this scan only, unless
# something failed there (test.sh keeps them then anyway).
if ((FINDINGS == 0 && KEEP == 0)); then
	[[ -z $BENCH_WORK ]] || rm -rf -- "$BENCH_WORK"
	[[ -z $TEST_WORK || $TEST_RC -ne 0 ]] || rm -rf -- "$TEST_WORK"
fi
[[ -z $TEST_WORK || ! -d $TEST_WORK ]] || echo "sanitize.sh: test files of test.sh kept in $TEST_WORK"
[[ -z $BENCH_WORK || ! -d $BENCH_WORK ]] || echo "sanitize.sh: bench files kept in $BENCH_WORK"

printf '\n==================== sanitize.sh summary ====================\n'
printf '  %-22s %s\n' "sanitizers" "$([[ $SAN_MODE == asan ]] && echo 'ASan + UBSan' || echo 'UBSan only (ASan cannot be preloaded here, see WARNING)')" \
	"test suites (test.sh)" "exit $TEST_RC, ${TEST_SECS}s" \
	"fuzz.sh" "$([[ $FUZZ_RC == - ]] && echo 'not run' || echo "exit $FUZZ_RC, ${FUZZ_SECS}s")" \
	"sanitizer findings" "$([[ $FINDINGS == 0 ]] && echo none || echo 'SEE ABOVE')"
echo "the system-wide task_events install was not touched"
STATUS=$FAILED
exit "$FAILED"
