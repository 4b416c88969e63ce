#!/usr/bin/env bash
# Where create_task spends its time, in instructions (stable on a noisy
# machine, unlike timings): N calls in a single-user backend under
# valgrind --tool=callgrind, then the functions with the most inclusive
# instructions.  Needs the extension installed; as root it runs the server
# as the OS user postgres.
#
#   sudo bench/profile_create_task.sh [CALLS]      default 2000
set -euo pipefail
ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
CALLS=${1:-2000}
command -v valgrind >/dev/null || { apt-get update && apt-get install -y --no-install-recommends valgrind; }

# shellcheck source=scripts/pg-temp.sh
. "$ROOT/scripts/pg-temp.sh"
WORK=$(mktemp -d /tmp/task_events_profile.XXXXXX)
trap 'rm -rf -- "$WORK"' EXIT
pg_temp_chown "$WORK"
pg_temp_as_user "$PG_BIN/initdb" -D "$WORK/data" -A trust >/dev/null

# Warm-up call first (plans, caches), then the measured calls, each its own
# transaction as a client's would be.
{
	# -j: a statement ends at a semicolon followed by an empty line.
	printf '%s\n\n' "CREATE EXTENSION task_events;" "SELECT task_events.create_task('warm', 'up');"
	for ((i = 0; i < CALLS; i++)); do
		printf '%s\n\n' "SELECT task_events.create_task('user$((i % 100))', 'Profiled task', 'A task created under callgrind');"
	done
} >"$WORK/calls.sql"
chmod 644 "$WORK/calls.sql"
pg_temp_as_user valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.out" \
	"$PG_BIN/postgres" --single -D "$WORK/data" -j postgres <"$WORK/calls.sql" >"$WORK/out.txt" 2>"$WORK/valgrind.txt"

total=$(callgrind_annotate "$WORK/callgrind.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "calls: $CALLS (+1 warm-up and CREATE EXTENSION); program total: $total instructions"
echo "per call (total / calls, start-up and CREATE EXTENSION included): $((total / CALLS))"
echo
echo "Inclusive instructions per function (share of the program total):"
callgrind_annotate --inclusive=yes --auto=no --threshold=100 "$WORK/callgrind.out" 2>/dev/null |
	grep -E ':(create_task|te_[a-z_0-9]+|SPI_execute_plan|standard_ExecutorStart|standard_ExecutorEnd|standard_ExecutorRun|ExecInsertIndexTuples|heap_insert|uuid_generate_random|srandom_r|Async_Notify|CommitTransaction|XLogInsert|pushJsonbValue|exec_simple_query|PostgresMain)( |$)' |
	grep -F "[" | head -30 || true
