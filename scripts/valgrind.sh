#!/usr/bin/env bash
# Run the pg_regress, isolation and pgTAP suites of task_events (and the TAP
# tests with --tap) with every server process under valgrind memcheck, the
# way PostgreSQL's own valgrind support expects it: a server compiled with
# USE_VALGRIND (so that palloc/pfree tell memcheck which chunks of a memory
# context are allocated, freed or uninitialised) and PostgreSQL's suppression
# file src/tools/valgrind.supp.  For machines where AddressSanitizer cannot
# run (this one: see docs/hardening.md).  Run as root.  Slow: see
# docs/hardening.md for the last run's time.
#
# Nothing system-wide is touched, as in scripts/sanitize.sh: everything runs
# in a private, relocated copy of PostgreSQL 15 in a temporary directory
# (the copy of test.sh that runs the suites has its PG_BIN line rewritten to
# it, so it cannot install into /usr/lib/postgresql/15 whatever its
# environment), whose bin/postgres is a wrapper that execs the real binary
# under
#   valgrind --tool=memcheck --trace-children=yes --leak-check=no
#     --track-origins=yes --read-var-info=yes --num-callers=40
#     --suppressions=<PostgreSQL's src/tools/valgrind.supp>
#     --suppressions=test/valgrind.supp (ours, each entry with its reason)
#     --error-markers=VALGRINDERROR-BEGIN,VALGRINDERROR-END
#     --gen-suppressions=all --log-file=<reports>/%p.log
# so every server a suite starts (pg_regress --temp-instance, pg_ctl, the TAP
# Cluster) runs under memcheck, one log file per process.  Not under
# valgrind (run natively by the wrapper): postgres -V/-C, and initdb's
# bootstrap, single-user and --check runs, which never load task_events;
# --initdb puts those under valgrind too.  Executables the
# server starts from /bin or /usr/bin (archive_command's cp) are not traced.
# Leak checking is off: PostgreSQL frees by resetting memory contexts and at
# process exit.  --error-exitcode is not set on purpose: a backend whose exit
# status changed would make the postmaster reset the cluster and fail every
# test after it; the reports are counted in the log files instead.
#
# Which server: PostgreSQL 15's source comes from Debian's archive with
# apt-get (a private apt configuration with deb-src lines, in the cache
# directory; /etc/apt is not changed): the installed postgresql-15's version
# if the archive still has its source, else the newest it has.  The upstream
# tarball (Debian's patches are not applied: they change paths, not memory
# handling) is built once with
#   CPPFLAGS=-DUSE_VALGRIND (implies MEMORY_CONTEXT_CHECKING)
#   CFLAGS='-Og -g -fno-omit-frame-pointer', no cassert, no ICU/readline/zlib
# with dblink and the isolation tester, into the cache directory (about
# 8 minutes on 2 cores; reused by later runs), and each run copies it.  The
# pgtap extension (SQL only) is copied from the system install.
# --debian-server instead runs Debian's own postgres binary (a copy of
# /usr/lib/postgresql/15) under valgrind with the same suppressions: no build,
# but memcheck then sees only malloc'd blocks, not palloc chunks (a read of a
# pfree'd chunk, an overrun of a small chunk or a read of uninitialised palloc
# memory goes unseen), and PostgreSQL warns of false positives from sinval
# messaging without USE_VALGRIND (pg_config_manual.h).
#
# task_events is built in the copy with -Og -g (TE_VG_EXT_FLAGS), so reports
# have file:line.  A report anywhere (a VALGRINDERROR-BEGIN marker in any log
# file), or a server process that valgrind saw die of SIGSEGV, SIGBUS, SIGILL,
# SIGFPE or SIGABRT, is printed and fails the run, as does a failing suite.
#
# Usage: scripts/valgrind.sh [--tap] [--keep] [--self-test] [--initdb]
#                            [--debian-server] [--rebuild]
#   --tap            also the TAP tests (test/t; TE_TAP selects files as in
#                    test.sh); very slow
#   --keep           keep the temporary directory (build, logs, reports)
#   --self-test      prove the harness: plant a read of pfree'd memory in
#                    te_uuid_v7 (under --debian-server: of an uninitialised
#                    stack variable) in a copy, start a server through the
#                    wrapper, call create_task, and check that memcheck
#                    reports it (a few minutes, plus the build the first time)
#   --initdb         run initdb's bootstrap, single-user and --check
#                    postgres under valgrind too (slower)
#   --debian-server  Debian's postgres binary instead of a USE_VALGRIND build
#   --rebuild        build PostgreSQL again even if the cache has it
# Environment:
#   TE_VG_CACHE       PostgreSQL source and build (default
#                     /var/cache/task_events-valgrind)
#   TE_ONLY           the suites, as in test.sh (default "pg_regress
#                     isolation pgTAP"; --tap adds TAP)
#   TE_TAP            the TAP files, as in test.sh (e.g. "001* 009*")
#   TE_SUITE_TIMEOUT  time limit per suite (default here 150m)
#   PG_TEST_TIMEOUT_DEFAULT  the TAP tests' timeout (default here 900 s; a
#                     poll counts attempts, so it can last far longer)
#   TE_VG_EXT_FLAGS   compiler flags for task_events (default -Og -g
#                     -fno-omit-frame-pointer)
#   TE_VG_OPTS        extra valgrind options, appended
# cleanup runs from the EXIT trap, which shellcheck cannot follow.
# shellcheck disable=SC2317
set -euo pipefail

# Everything below is one brace group, so bash reads all of it before running
# any of it: editing this file during a run (which takes long) cannot make
# the running bash execute a fragment of the new text.
{
ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
SYS_PG=/usr/lib/postgresql/15
SYS_SHARE=/usr/share/postgresql/15
PG_PACKAGE=postgresql-15
CACHE=${TE_VG_CACHE:-/var/cache/task_events-valgrind}
EXT_FLAGS=${TE_VG_EXT_FLAGS:--Og -g -fno-omit-frame-pointer}
# The server build; a change here makes a new cache entry.
PG_BUILD_CFLAGS='-Og -g -fno-omit-frame-pointer'
PG_BUILD_CPPFLAGS='-DUSE_VALGRIND'
PG_BUILD_CONFIGURE=(--enable-debug --enable-tap-tests --without-readline --without-zlib
	--without-icu --with-system-tzdata=/usr/share/zoneinfo)
OUR_SUPP=$ROOT/test/valgrind.supp

TAP=0 KEEP=0 SELF_TEST=0 VG_INITDB=0 DEBIAN_SERVER=0 REBUILD=0
for arg in "$@"; do
	case $arg in
	--tap) TAP=1 ;;
	--keep) KEEP=1 ;;
	--self-test) SELF_TEST=1 ;;
	--initdb) VG_INITDB=1 ;;
	--debian-server) DEBIAN_SERVER=1 ;;
	--rebuild) REBUILD=1 ;;
	-h | --help)
		sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "valgrind.sh: unknown argument $arg (see --help)" >&2
		exit 2
		;;
	esac
done

if [[ $EUID -ne 0 ]]; then
	echo "valgrind.sh: run as root: it installs packages and runs servers as postgres" >&2
	exit 1
fi

bash "$ROOT/scripts/install-deps.sh"
if ! command -v valgrind >/dev/null || [[ ! -f /usr/include/valgrind/memcheck.h ]]; then
	echo "valgrind.sh: installing valgrind"
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends valgrind
fi

WORK=$(mktemp -d /tmp/task_events_valgrind.XXXXXX)
chmod 755 "$WORK"
PRIV=$WORK/pg # the private PostgreSQL
REPORTS=$WORK/valgrind-reports
COPY=$WORK/src
STATUS=1
cleanup() {
	if ((KEEP == 1 || STATUS != 0)); then
		echo "valgrind.sh: files kept in $WORK (valgrind logs in $REPORTS)"
	else
		rm -rf -- "$WORK"
	fi
}
trap cleanup EXIT

# apt-get with a configuration of our own in the cache directory: deb-src
# lines for bookworm and bookworm-security, their indexes kept there.
te_vg_apt() {
	local dir=$CACHE/apt
	mkdir -p -- "$dir/lists/partial"
	if [[ ! -f $dir/sources.list ]]; then
		cat >"$dir/sources.list" <<-'EOF'
			deb-src http://deb.debian.org/debian bookworm main
			deb-src http://deb.debian.org/debian bookworm-updates main
			deb-src http://deb.debian.org/debian-security bookworm-security main
		EOF
	fi
	apt-get -o Dir::Etc::SourceList="$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null \
		-o Dir::State::Lists="$dir/lists" "$@"
}

# Download PostgreSQL 15's source into $CACHE/src and print its Debian
# version: the installed package's if the archive has it, else the newest.
te_vg_fetch_source() {
	local installed ver
	local -a versions
	mkdir -p -- "$CACHE/src"
	# apt-get source downloads as the user _apt where it can write.
	chown _apt "$CACHE/src" 2>/dev/null || true
	installed=$(dpkg-query -W -f='${Version}' "$PG_PACKAGE")
	te_vg_apt -qq update >&2
	mapfile -t versions < <(te_vg_apt_cache showsrc "$PG_PACKAGE" 2>/dev/null |
		sed -n 's/^Version: //p' | sort -u -r -V)
	for ver in "$installed" "${versions[@]/#$installed/}"; do
		[[ -n $ver ]] || continue
		if compgen -G "$CACHE/src/${PG_PACKAGE}_${ver%%-*}.orig.tar.*" >/dev/null; then
			echo "$ver"
			return 0
		fi
		if (cd "$CACHE/src" && te_vg_apt -qq source --download-only "$PG_PACKAGE=$ver") >&2; then
			echo "$ver"
			return 0
		fi
		echo "valgrind.sh: the source of $PG_PACKAGE $ver is not in the archive; trying an older one" >&2
	done
	echo "valgrind.sh: no source of $PG_PACKAGE could be downloaded" >&2
	return 1
}
te_vg_apt_cache() {
	local dir=$CACHE/apt
	apt-cache -o Dir::Etc::SourceList="$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null \
		-o Dir::State::Lists="$dir/lists" "$@"
}

# The PostgreSQL source tree for this run: the newest finished one in the
# cache, else downloaded and unpacked.  Sets PG_SRC_DIR and PG_VERSION.
te_vg_source() {
	local tarball dir
	if ((REBUILD == 0)) && [[ -d $CACHE ]]; then
		dir=$(find "$CACHE" -maxdepth 2 -name SOURCE_OK -printf '%h\n' 2>/dev/null | sort -V | tail -n 1)
		if [[ -n $dir ]]; then
			PG_SRC_DIR=$dir/source
			PG_VERSION=$(cat "$dir/SOURCE_OK")
			return 0
		fi
	fi
	PG_VERSION=$(te_vg_fetch_source)
	dir=$CACHE/pg-${PG_VERSION%%-*}
	rm -rf -- "$dir"
	mkdir -p -- "$dir/source"
	tarball=$(compgen -G "$CACHE/src/${PG_PACKAGE}_${PG_VERSION%%-*}.orig.tar.*" | head -n 1)
	tar -xf "$tarball" -C "$dir/source" --strip-components=1
	[[ -f $dir/source/src/tools/valgrind.supp ]] || {
		echo "valgrind.sh: $tarball has no src/tools/valgrind.supp" >&2
		return 1
	}
	echo "$PG_VERSION" >"$dir/SOURCE_OK"
	PG_SRC_DIR=$dir/source
}

# Build the USE_VALGRIND server, dblink and the isolation tester from
# PG_SRC_DIR into $PG_SRC_DIR/../pgsql, unless that was done with the same
# flags.  Sets PG_BUILD (the install) and PG_BUILD_SECS (0 when cached).
te_vg_build_pg() {
	local dir=${PG_SRC_DIR%/source} stamp start
	PG_BUILD=$dir/pgsql
	stamp="CFLAGS=$PG_BUILD_CFLAGS CPPFLAGS=$PG_BUILD_CPPFLAGS ${PG_BUILD_CONFIGURE[*]}"
	PG_BUILD_SECS=0
	if ((REBUILD == 0)) && [[ -f $dir/BUILD_OK && $(cat "$dir/BUILD_OK") == "$stamp" ]]; then
		echo "valgrind.sh: using the USE_VALGRIND build of PostgreSQL $PG_VERSION in $PG_BUILD" \
			"(built in $(cat "$dir/BUILD_SECONDS") s)"
		return 0
	fi
	echo "valgrind.sh: building PostgreSQL $PG_VERSION with $PG_BUILD_CPPFLAGS into $PG_BUILD" \
		"(log: $dir/build.log; about 10 minutes on 2 cores)"
	rm -f -- "$dir/BUILD_OK"
	rm -rf -- "$PG_BUILD"
	start=$(date +%s)
	(
		cd "$PG_SRC_DIR"
		[[ ! -f GNUmakefile ]] || make -s distclean
		./configure --prefix="$PG_BUILD" "${PG_BUILD_CONFIGURE[@]}" \
			CFLAGS="$PG_BUILD_CFLAGS" CPPFLAGS="$PG_BUILD_CPPFLAGS"
		make -s -j"$(nproc)"
		make -s install
		make -s -C contrib/dblink -j"$(nproc)" install
		make -s -C src/test/isolation -j"$(nproc)" install
	) >"$dir/build.log" 2>&1 || {
		tail -n 40 "$dir/build.log" >&2
		echo "valgrind.sh: building PostgreSQL failed (log: $dir/build.log)" >&2
		return 1
	}
	PG_BUILD_SECS=$(($(date +%s) - start))
	echo "$PG_BUILD_SECS" >"$dir/BUILD_SECONDS"
	echo "$stamp" >"$dir/BUILD_OK"
	echo "valgrind.sh: PostgreSQL built in $PG_BUILD_SECS s"
}

# The private PostgreSQL under $PRIV, with bin/postgres replaced by the
# valgrind wrapper.  Sets PRIV_BIN.  Whatever task_events build the source
# has installed is removed: the copy has none until this run installs it.
te_vg_private_pg() {
	local share
	if ((DEBIAN_SERVER == 1)); then
		mkdir -p -- "$PRIV/usr/lib/postgresql" "$PRIV/usr/share/postgresql" "$PRIV/usr/include"
		cp -a -- "$SYS_PG" "$PRIV/usr/lib/postgresql/"
		cp -a -- "$SYS_SHARE" "$PRIV/usr/share/postgresql/"
		ln -s /usr/include/postgresql "$PRIV/usr/include/postgresql"
		PRIV_BIN=$PRIV$SYS_PG/bin
	else
		cp -a -- "$PG_BUILD" "$PRIV"
		PRIV_BIN=$PRIV/bin
		# pgtap is SQL only: its files from the system install.
		share=$("$PRIV_BIN/pg_config" --sharedir)
		cp -a -- "$SYS_SHARE"/extension/pgtap* "$share/extension/"
	fi
	share=$("$PRIV_BIN/pg_config" --sharedir)
	rm -rf -- "$("$PRIV_BIN/pg_config" --pkglibdir)"/task_events.so \
		"$("$PRIV_BIN/pg_config" --pkglibdir)"/bitcode/task_events* \
		"$share"/extension/task_events[.-]*

	local -a opts=(--tool=memcheck --trace-children=yes
		"--trace-children-skip=/bin/*,/usr/bin/*,/usr/sbin/*"
		--leak-check=no --track-origins=yes --read-var-info=yes --num-callers=40
		"--suppressions=$WORK/postgresql-valgrind.supp"
		"--error-markers=VALGRINDERROR-BEGIN,VALGRINDERROR-END" --gen-suppressions=all
		--time-stamp=yes "--log-file=$REPORTS/%p.log")
	# Ours: in the copy of the tree, so that the run and the file match.
	[[ ! -f $OUR_SUPP ]] || opts+=("--suppressions=$COPY/test/valgrind.supp")
	# shellcheck disable=SC2206 # extra options, split on blanks on purpose
	[[ -z ${TE_VG_OPTS:-} ]] || opts+=($TE_VG_OPTS)
	cp -- "$PG_SRC_DIR/src/tools/valgrind.supp" "$WORK/postgresql-valgrind.supp"

	mv -- "$PRIV_BIN/postgres" "$PRIV_BIN/postgres.real"
	{
		cat <<-EOF
			#!/bin/bash
			# Written by scripts/valgrind.sh: postgres under valgrind memcheck.
			# Version and configuration queries, and initdb's bootstrap,
			# single-user and --check runs unless --initdb was given, run natively.
			real=\${0%/*}/postgres.real
			for a in "\$@"; do
			case \$a in
			-V | --version | -C | --describe-config) exec -a "\$0" "\$real" "\$@" ;;
		EOF
		# shellcheck disable=SC2016 # the wrapper's own variables
		((VG_INITDB == 1)) || echo '--boot | --single | --check) exec -a "$0" "$real" "$@" ;;'
		echo 'esac'
		echo 'done'
		printf 'exec valgrind'
		printf ' %q' "${opts[@]}"
		# shellcheck disable=SC2016 # the wrapper's own variables
		printf ' "$real" "$@"\n'
	} >"$PRIV_BIN/postgres"
	chmod 755 "$PRIV_BIN/postgres"
	mkdir -p -- "$REPORTS"
	chmod 1777 "$REPORTS"
	if [[ $("$PRIV_BIN/pg_config" --bindir) != "$PRIV_BIN" ]]; then
		echo "valgrind.sh: the copy of PostgreSQL in $PRIV is not relocatable" >&2
		return 1
	fi
}

# Copy the tree (uncommitted changes included) and remove build outputs.
# The copy's test.sh gets the private PostgreSQL written into its PG_BIN line,
# not only passed in TE_PG_BIN: whatever its environment, it cannot build,
# install or test against the system-wide PostgreSQL.
te_vg_copy_tree() {
	local testsh=$COPY/scripts/test.sh
	mkdir -p -- "$COPY"
	cp -a -- "$ROOT/." "$COPY/"
	make -s -C "$COPY" PG_CONFIG="$PRIV_BIN/pg_config" clean >/dev/null
	rm -rf -- "$COPY"/{tmp_check,tmp_check_iso,results,output_iso,log} "$COPY/test/tmp_check"
	# shellcheck disable=SC2016 # literal text of test.sh
	if [[ $(grep -c '^PG_BIN=${TE_PG_BIN:-/usr/lib/postgresql/15/bin}$' "$testsh") -ne 1 ]]; then
		echo "valgrind.sh: cannot point $testsh at the private PostgreSQL: its PG_BIN line changed" >&2
		return 1
	fi
	sed -i "s|^PG_BIN=\${TE_PG_BIN:-/usr/lib/postgresql/15/bin}\$|PG_BIN=$PRIV_BIN|" "$testsh"
	grep -q -x "PG_BIN=$PRIV_BIN" "$testsh"
}

# Print every valgrind report (the text between the error markers, with the
# process it came from) and every process valgrind saw die of a crash signal
# or fail itself.  Returns 1 when there is any.  Sets VG_REPORTS, VG_CRASHES.
te_vg_findings() {
	local f n cmd
	VG_REPORTS=0 VG_CRASHES=0
	shopt -s nullglob
	for f in "$REPORTS"/*.log; do
		n=$(grep -c '^==[^=]*== VALGRINDERROR-BEGIN$' -- "$f" || true)
		if grep -q -E '^==[^=]*== (Process terminating with default action of signal (4|6|7|8|11) |.*(the .impossible. happened|out of memory))' -- "$f"; then
			VG_CRASHES=$((VG_CRASHES + 1))
			echo "===== process died or valgrind failed: $f ====="
			grep -n -E -A30 'Process terminating with default action|impossible. happened|out of memory' -- "$f" | head -n 60
		fi
		((n > 0)) || continue
		VG_REPORTS=$((VG_REPORTS + n))
		cmd=$(sed -n 's/^==[^=]*== Command: //p' -- "$f" | head -n 1)
		echo "===== $n valgrind report(s) in $f (${cmd:-forked child}) ====="
		sed -n '/VALGRINDERROR-BEGIN/,/VALGRINDERROR-END/p' -- "$f"
	done
	shopt -u nullglob
	((VG_REPORTS == 0 && VG_CRASHES == 0))
}

# --self-test: a throwaway copy with a planted memory error in te_uuid_v7
# (every create_task reaches it) must produce a report that names it.
te_vg_self_test() {
	local src=$COPY/src/uuid_v7.c data=$WORK/selftest-data out rc=0 bug expect
	if ((DEBIAN_SERVER == 0)); then
		# Visible only to a USE_VALGRIND server: the chunk stays in its block.
		bug='{ unsigned char *volatile te_p = palloc(UUID_LEN); memcpy(te_p, random_bytes, UUID_LEN); pfree(te_p); out->data[0] ^= te_p[1]; }'
		expect='Invalid read of size 1'
	else
		bug='{ volatile unsigned char te_u[2]; if (te_u[1] == 42) out->data[0] ^= 1; }'
		expect='depends on uninitialised value'
	fi
	grep -q 'memcpy(out->data, random_bytes, UUID_LEN);' "$src" || {
		echo "valgrind.sh: self-test: the line to break in $src is gone; update the self-test" >&2
		return 1
	}
	sed -i "s/memcpy(out->data, random_bytes, UUID_LEN);/& $bug/" "$src"
	make -s -C "$COPY" PG_CONFIG="$PRIV_BIN/pg_config" COPT="$EXT_FLAGS -Wno-error" -j"$(nproc)" >/dev/null
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
	if te_vg_findings >"$WORK/selftest-findings.txt"; then
		echo "self-test FAILED: the planted memory error was not reported"
		return 1
	fi
	if ! grep -q "$expect" "$WORK/selftest-findings.txt" ||
		! grep -q -E 'te_uuid_v7 \(uuid_v7\.c:[0-9]+\)' "$WORK/selftest-findings.txt"; then
		echo "self-test FAILED: a report was found, but not '$expect' in te_uuid_v7 (uuid_v7.c:LINE):"
		cat "$WORK/selftest-findings.txt"
		return 1
	fi
	grep -m1 -A4 "$expect" "$WORK/selftest-findings.txt"
	echo "self-test passed ($VG_REPORTS report(s)): the planted error was reported in te_uuid_v7 and fails the run"
}

START_ALL=$(date +%s)
te_vg_source
PG_BUILD_SECS=-
if ((DEBIAN_SERVER == 0)); then
	te_vg_build_pg
	SERVER="PostgreSQL $PG_VERSION (upstream source), built with $PG_BUILD_CPPFLAGS, CFLAGS $PG_BUILD_CFLAGS"
else
	SERVER="Debian's $("$SYS_PG/bin/postgres" -V | sed 's/^postgres (PostgreSQL) //') binary (no USE_VALGRIND)"
fi
te_vg_private_pg
te_vg_copy_tree
echo "valgrind.sh: server: $SERVER; suppressions: PostgreSQL $PG_VERSION's src/tools/valgrind.supp$([[ -f $OUR_SUPP ]] && echo ' + test/valgrind.supp'); task_events built with $EXT_FLAGS"

if ((SELF_TEST == 1)); then
	te_vg_self_test
	STATUS=0
	exit 0
fi

SUITES=${TE_ONLY:-pg_regress isolation pgTAP}
((TAP == 0)) || [[ " $SUITES " == *" TAP "* ]] || SUITES+=" TAP"
START=$(date +%s)
FAILED=0
set +e
# test.sh builds with COPT from the environment, installs into the private
# PostgreSQL (TE_PG_BIN) and runs the suites; its servers start through the
# wrapper.  PGCTLTIMEOUT (pg_regress, pg_ctl), PGISOLATIONTIMEOUT
# (isolationtester's step wait) and PG_TEST_TIMEOUT_DEFAULT (the TAP tests'
# waits and polls) are raised for valgrind.
COPT=$EXT_FLAGS TE_PG_BIN=$PRIV_BIN PG_TEMP_BIN=$PRIV_BIN TE_ONLY=$SUITES TE_KEEP_TMP=1 \
	TE_SUITE_TIMEOUT=${TE_SUITE_TIMEOUT:-150m} PGCTLTIMEOUT=900 PGISOLATIONTIMEOUT=900 \
	PG_TEST_TIMEOUT_DEFAULT=${PG_TEST_TIMEOUT_DEFAULT:-900} \
	bash "$COPY/scripts/test.sh" 2>&1 | tee "$WORK/test.out"
TEST_RC=${PIPESTATUS[0]}
set -e
TEST_SECS=$(($(date +%s) - START))
TEST_WORK=$(sed -n 's/^test.sh: test files kept in //p' "$WORK/test.out" | tail -n 1)
((TEST_RC == 0)) || FAILED=1

# The compiler flags gcc recorded in the debug information of the installed
# library: the optimisation level of EXT_FLAGS must be there.
SO=$("$PRIV_BIN/pg_config" --pkglibdir)/task_events.so
PRODUCERS=$(readelf --debug-dump=info "$SO" 2>/dev/null | grep 'DW_AT_producer' || true)
if ! grep -q -e " ${EXT_FLAGS%% *}" <<<"$PRODUCERS"; then
	echo "valgrind.sh: the installed $SO is not the $EXT_FLAGS build" >&2
	FAILED=1
fi

printf '\n==================== valgrind findings ====================\n'
te_vg_findings >"$WORK/findings.txt" || FAILED=1
cat "$WORK/findings.txt"
NLOGS=$(find "$REPORTS" -name '*.log' | wc -l)
if ((VG_REPORTS == 0 && VG_CRASHES == 0)); then
	echo "none: no valgrind report in $NLOGS process logs, no process crashed"
fi
if ((VG_REPORTS == 0 && VG_CRASHES == 0 && KEEP == 0)) && [[ -n $TEST_WORK && $TEST_RC -eq 0 ]]; then
	rm -rf -- "$TEST_WORK"
fi
[[ -z $TEST_WORK || ! -d $TEST_WORK ]] || echo "valgrind.sh: test files of test.sh kept in $TEST_WORK"

if [[ $PG_BUILD_SECS == - ]]; then
	BUILD_NOTE='none (--debian-server)'
elif [[ $PG_BUILD_SECS == 0 ]]; then
	BUILD_NOTE="cached (built in $(cat "${PG_SRC_DIR%/source}/BUILD_SECONDS") s)"
else
	BUILD_NOTE="${PG_BUILD_SECS}s"
fi
printf '\n==================== valgrind.sh summary ====================\n'
grep -A20 '^==================== summary' "$WORK/test.out" | sed -n '2,/^suites:/p'
printf '  %-22s %s\n' "server" "$SERVER" \
	"PostgreSQL build" "$BUILD_NOTE" \
	"suites ($SUITES)" "exit $TEST_RC, ${TEST_SECS}s" \
	"process logs" "$NLOGS" \
	"valgrind reports" "$VG_REPORTS$( ((VG_REPORTS == 0)) || echo ' (SEE ABOVE)')" \
	"crashed processes" "$VG_CRASHES" \
	"total time" "$(($(date +%s) - START_ALL))s"
echo "the system-wide PostgreSQL and task_events install were not touched"
STATUS=$FAILED
exit "$FAILED"
}
