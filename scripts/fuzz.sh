#!/usr/bin/env bash
# Fuzz every SQL function and view of task_events with random and hostile
# arguments (test/fuzz/fuzz.py says which), on a throwaway server that
# preloads the extension (workers running, every notify_mode in turn).
# Fails when a backend crashes, when an error has an internal SQLSTATE
# (class XX) or none, when the task/event invariants break afterwards, or
# when the server log shows a crash, a PANIC or a sanitizer report.
#
#   scripts/fuzz.sh                 default: 6000 random calls + the fixed hostile cases, under 3 minutes
#   scripts/fuzz.sh --long          30000 calls, then sqlsmith (random SQL
#                                   over the whole catalog) for
#                                   TE_FUZZ_SQLSMITH_SECONDS (default 600)
#   options: --seed N (default: the time; printed, to replay a run),
#            --calls N, --out DIR (keep the server log and the JSON summary)
#
# Tests the extension installed in the PostgreSQL of $PG_BIN (default
# /usr/lib/postgresql/15/bin): run make install first (scripts/test.sh
# does).  scripts/sanitize.sh runs it against the sanitized build.  As root,
# the server runs as the OS user postgres (scripts/pg-temp.sh) and missing
# packages (python3, sqlsmith for --long) are installed.
# finish runs from the EXIT trap, which shellcheck cannot follow.
# shellcheck disable=SC2317
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
LONG=0 SEED=$(date +%s) CALLS='' OUT=
while (($# > 0)); do
	case $1 in
	--long) LONG=1 ;;
	--seed) SEED=$2; shift ;;
	--calls) CALLS=$2; shift ;;
	--out) OUT=$2; shift ;;
	-h | --help)
		sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "fuzz.sh: unknown argument $1 (see --help)" >&2
		exit 2
		;;
	esac
	shift
done
CALLS=${CALLS:-$([[ $LONG == 1 ]] && echo 30000 || echo 6000)}
SQLSMITH_SECONDS=${TE_FUZZ_SQLSMITH_SECONDS:-600}

need_pkgs=()
PYTHON=/usr/bin/python3
[[ -x $PYTHON ]] || need_pkgs+=(python3)
if ((LONG == 1)) && ! command -v sqlsmith >/dev/null; then
	need_pkgs+=(sqlsmith)
fi
if ((${#need_pkgs[@]} > 0)); then
	if [[ $EUID -ne 0 ]]; then
		echo "fuzz.sh: missing ${need_pkgs[*]} (run as root to install them)" >&2
		exit 2
	fi
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need_pkgs[@]}"
fi
if [[ ! -f $("$PG_BIN/pg_config" --sharedir)/extension/task_events.control ]]; then
	echo "fuzz.sh: task_events is not installed in $("$PG_BIN/pg_config" --sharedir): run make install" >&2
	exit 2
fi

# shellcheck disable=SC2034 # read by pg-temp.sh
PG_TEMP_BIN=$PG_BIN
# shellcheck source=scripts/pg-temp.sh
. "$ROOT/scripts/pg-temp.sh"

KEEP_OUT=1
if [[ -z $OUT ]]; then
	OUT=$(mktemp -d /tmp/task_events_fuzz.XXXXXX)
	KEEP_OUT=0
fi
mkdir -p -- "$OUT"
chmod 755 "$OUT"
DATA=$OUT/data
RC=0
finish() {
	pg_temp_cleanup
	if ((KEEP_OUT == 0 && RC == 0)); then
		rm -rf -- "$OUT"
	else
		echo "fuzz.sh: server log and summary kept in $OUT"
	fi
}
trap finish EXIT

pg_temp_start "$DATA" \
	"shared_preload_libraries = 'task_events'" \
	"task_events.worker_count = 2" \
	"task_events.poll_interval = '200ms'" \
	"task_events.retry_delay = '10ms'" \
	"max_prepared_transactions = 5" \
	"log_min_messages = warning" \
	"log_line_prefix = '%m [%p] %e %q%a '" \
	"restart_after_crash = on"
PSQL=("$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -d postgres)
"${PSQL[@]}" -c 'CREATE EXTENSION task_events'
START=$(date +%s)

# The default run stops calling after 150 s whatever --calls says, to stay
# under 3 minutes on a slow or busy machine.
if ((LONG == 1)); then
	MODE_ARGS=(--long)
else
	MODE_ARGS=(--max-seconds 150)
fi
set +e
"$PYTHON" "$ROOT/test/fuzz/fuzz.py" --seed "$SEED" --calls "$CALLS" --json "$OUT/summary.json" "${MODE_ARGS[@]}"
FUZZ_RC=$?
set -e
((FUZZ_RC == 0)) || RC=1

SMITH_RC=-
if ((LONG == 1)); then
	# sqlsmith: random queries built from every function, operator and
	# type of the catalog (ours included) over the extension's tables and
	# views (--exclude-catalog: not the system catalogs).  As the superuser
	# by default, so that it reaches every function of the extension (the
	# handlers are superuser-only); TE_FUZZ_SQLSMITH_ROLE=fuzz_low runs it
	# with the task_events_writer/reader privileges instead.
	echo "fuzz.sh: sqlsmith for ${SQLSMITH_SECONDS}s as ${TE_FUZZ_SQLSMITH_ROLE:-postgres}"
	set +e
	timeout -k 10 "$SQLSMITH_SECONDS" sqlsmith --verbose --seed="$SEED" --exclude-catalog \
		--target="host=$PGHOST port=$PGPORT user=${TE_FUZZ_SQLSMITH_ROLE:-postgres} dbname=postgres" >"$OUT/sqlsmith.out" 2>&1
	SMITH_RC=$?
	set -e
	tail -n 15 "$OUT/sqlsmith.out"
	# 124: stopped by the time limit, as intended.
	case $SMITH_RC in 0 | 124) ;; *) RC=1 ;; esac
fi

# The server's own record: a crashed backend, a PANIC, a failed assertion,
# a sanitizer report (the sanitized build writes them to the server's stderr).
echo "==================== server log ===================="
LOG=$DATA/server.log
if grep -n -E 'terminated by signal|PANIC:|TRAP:|was terminated by exception|runtime error:|ERROR: (Address|UndefinedBehavior)Sanitizer|all server processes terminated; reinitializing' "$LOG" | head -n 40; then
	echo "fuzz.sh: the server log records a crash (above)"
	RC=1
else
	echo "no crash, PANIC or sanitizer report in the server log"
fi
grep -c -E ' ERROR: ' "$LOG" | sed 's/^/server-side ERROR lines (refused input, expected): /'
# log_line_prefix carries the SQLSTATE (%e): internal errors of any
# session, worker or sqlsmith query included.
if grep -q -E '^[^[]*\[[0-9]+\] XX[0-9A-Z]{3} ' "$LOG"; then
	echo "fuzz.sh: internal errors (SQLSTATE class XX) in the server log:"
	grep -E -A2 '^[^[]*\[[0-9]+\] XX[0-9A-Z]{3} ' "$LOG" | head -n 30
	RC=1
fi

echo "fuzz.sh: seed $SEED, $(($(date +%s) - START))s, fuzz.py exit $FUZZ_RC, sqlsmith ${SMITH_RC}; result: $([[ $RC == 0 ]] && echo PASS || echo FAIL)"
exit "$RC"
