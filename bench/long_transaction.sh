#!/usr/bin/env bash
# Long transactions and idle workers (issue 9): what the workers and
# handler_status cost while a prepared transaction holds the xmin back behind
# a million events that were written and handled.
#
#   bench/long_transaction.sh                                  # the measurement
#   BENCH_LT_EVENTS=20000 BENCH_LT_IDLE_SECONDS=5 bench/long_transaction.sh   # a quick look
#
# One throwaway server (scripts/pg-temp.sh), preloaded, with the extension in
# database bench_lt.  A prepared transaction writes one event and stays
# prepared; BENCH_LT_EVENTS events are written (create_task, two sessions)
# and handled; then, with the workers idle:
#   - the CPU seconds the workers use over BENCH_LT_IDLE_SECONDS
#     (/proc/<pid>/stat utime + stime), and what their rounds read from
#     task_events.events and its indexes (pg_stat_user_tables/_indexes);
#   - EXPLAIN (ANALYZE, BUFFERS) of the peek's window query (expanded from
#     TE_WINDOW_MIN_SEQ in src/include/commit_horizon.h, with the audit
#     handler's window_start and the current snapshot, generic plan as the
#     workers run it) and of SELECT * FROM task_events.handler_status;
# then COMMIT PREPARED: the time and worker CPU to handle its event; and the
# same idle measurement again, without a long transaction: the baseline.
# The 1.0 forms of the two queries (a range from the position's xmin) run on
# the same data for comparison.
#
# Needs the extension installed in PG_BIN's PostgreSQL (make install) and a
# C compiler (to expand the header's macro).  As root the server runs as the
# OS user postgres.  The machine should be quiet: the CPU figures are the
# workers' own, but a busy machine slows everything.
#
# Environment:
#   PG_BIN=/usr/lib/postgresql/15/bin   PostgreSQL 15 binaries (server and clients)
#   BENCH_LT_EVENTS=1000000             events written behind the prepared transaction
#   BENCH_LT_IDLE_SECONDS=60            length of each idle measurement
#   BENCH_LT_CHUNK=50000                events per writing transaction
#   BENCH_WORKERS=2                     task_events.worker_count
#   BENCH_SERVER_CONF                   extra postgresql.conf lines, one per line
#   BENCH_KEEP=1                        keep the data directory (path printed)
set -euo pipefail

BENCH=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd -- "$BENCH/.." && pwd)
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
EVENTS=${BENCH_LT_EVENTS:-1000000}
IDLE_SECONDS=${BENCH_LT_IDLE_SECONDS:-60}
CHUNK=${BENCH_LT_CHUNK:-50000}
WORKERS=${BENCH_WORKERS:-2}
CATCHUP_TIMEOUT=${BENCH_CATCHUP_TIMEOUT:-3600}
DB=bench_lt
# The handler whose window query is explained.
HANDLER=audit

PG_TEMP_BIN=$PG_BIN
# shellcheck source=scripts/pg-temp.sh
. "$ROOT/scripts/pg-temp.sh"

log() { printf '%s long_transaction: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
	printf 'long_transaction: %s\n' "$*" >&2
	exit 1
}

for tool in psql pg_config; do
	[[ -x $PG_BIN/$tool ]] || die "$PG_BIN/$tool not found (PostgreSQL 15)"
done
[[ -f $("$PG_BIN/pg_config" --sharedir)/extension/task_events.control ]] ||
	die "task_events is not installed in $("$PG_BIN/pg_config" --sharedir): run make install"
CC=${CC:-cc}
command -v "$CC" >/dev/null || die "no C compiler ($CC) to expand TE_WINDOW_MIN_SEQ"
((EVENTS >= 2)) || die "BENCH_LT_EVENTS must be at least 2"

WORK=$(mktemp -d /tmp/task_events_long_transaction.XXXXXX)
RAW=$WORK/raw
mkdir -p -- "$RAW"
cleanup() {
	local rc=$?
	pg_temp_cleanup
	if [[ ${BENCH_KEEP:-0} == 1 || $rc -ne 0 ]]; then
		echo "long_transaction: data directory and raw outputs kept in $WORK" >&2
	else
		rm -rf -- "$WORK"
	fi
}
trap cleanup EXIT
pg_temp_chown "$WORK"

# The peek's window query, as the workers run it: TE_WINDOW_MIN_SEQ($1, $2)
# expanded by the preprocessor from the header, the C string literals joined.
# shellcheck disable=SC2016 # $1 and $2 are SQL parameters
printf '#include "commit_horizon.h"\nte_bench_window_sql = TE_WINDOW_MIN_SEQ("$1", "$2");\n' >"$RAW/window.c"
WINDOW_SQL=$("$CC" -E -P -I "$ROOT/src/include" -I "$("$PG_BIN/pg_config" --includedir-server)" "$RAW/window.c" |
	perl -ne 'print join("", /"((?:[^"\\]|\\.)*)"/g) if s/^.*te_bench_window_sql = //')
[[ $WINDOW_SQL == *task_events.events* ]] || die "could not expand TE_WINDOW_MIN_SEQ from src/include/commit_horizon.h"

# The same question as task_events 1.0 asked it (commit 8dea167): a range of
# events_xact_id_idx from the position's xmin, every event since then.
# shellcheck disable=SC2016 # $1 and $2 are SQL parameters
WINDOW_SQL_1_0='(SELECT pg_catalog.min(w.seq)
	FROM (SELECT e.seq FROM task_events.events e
		  WHERE e.xact_id >= pg_catalog.pg_snapshot_xmin($1)
			AND e.xact_id < pg_catalog.pg_snapshot_xmax($2)
			AND NOT pg_catalog.pg_visible_in_snapshot(e.xact_id, $1)
			AND pg_catalog.pg_visible_in_snapshot(e.xact_id, $2)
		  OFFSET 0) w)'
# handler_status's backlog as 1.0 computed it: task_events.handler_backlog
# of task_events--1.0.sql, as a temporary function (SET keeps it from being
# inlined, as 1.0's was), over every handler.
# shellcheck disable=SC2016 # $1 and $$ are SQL
BACKLOG_1_0='CREATE FUNCTION pg_temp.handler_backlog_1_0(handler text,
	OUT events_behind bigint, OUT oldest_unhandled timestamptz)
	SET search_path = pg_catalog, pg_temp
	AS $$
	SELECT pg_catalog.count(*), pg_catalog.min(e.occurred_at)
	FROM (SELECT COALESCE(s.window_start, '"'1:1:'"'::pg_catalog.pg_snapshot) AS ws,
				 s.window_end AS we, COALESCE(s.window_seq, 0) AS wseq
		  FROM (SELECT $1 AS handler) AS h
		  LEFT JOIN task_events.handler_state s ON s.handler OPERATOR(pg_catalog.=) h.handler) AS p
	JOIN task_events.events e
	  ON e.xact_id OPERATOR(pg_catalog.>=) pg_catalog.pg_snapshot_xmin(p.ws)
	 AND NOT pg_catalog.pg_visible_in_snapshot(e.xact_id, p.ws)
	WHERE NOT (p.we IS NOT NULL
			   AND pg_catalog.pg_visible_in_snapshot(e.xact_id, p.we)
			   AND e.seq OPERATOR(pg_catalog.<=) p.wseq)
	$$ LANGUAGE sql STABLE;'
STATUS_SQL_1_0='SELECT h.handler, b.* FROM task_events.handlers h
	CROSS JOIN LATERAL pg_temp.handler_backlog_1_0(h.handler) b'

# ---------------------------------------------------------------- server
SERVER_CONF=(
	"shared_preload_libraries = 'task_events'"
	"task_events.database = '$DB'"
	"task_events.worker_count = $WORKERS"
	"max_prepared_transactions = 4"
	"shared_buffers = 512MB"
	"max_wal_size = 8GB"
	"checkpoint_timeout = 30min"
)
if [[ -n ${BENCH_SERVER_CONF:-} ]]; then
	mapfile -t extra_conf <<<"$BENCH_SERVER_CONF"
	SERVER_CONF+=("${extra_conf[@]}")
fi
log "starting a throwaway server in $WORK/data"
pg_temp_start "$WORK/data" "${SERVER_CONF[@]}"

psql() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 "$@"; }
q() {
	local db=$1
	shift
	"$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -d "$db" -c "$@"
}
now_s() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now_s)" 'BEGIN {printf "%.2f", b - a}'; }
timed_out() { awk -v a="$1" -v b="$(now_s)" -v l="$CATCHUP_TIMEOUT" 'BEGIN {exit !(b - a > l)}'; }

psql -d postgres -c "CREATE DATABASE $DB"
psql -d "$DB" -c 'CREATE EXTENSION task_events'

worker_pids() {
	q "$DB" "SELECT pid FROM pg_stat_activity WHERE backend_type = 'task_events worker' ORDER BY pid" | paste -sd' '
}
wait_workers() {
	local _
	for _ in $(seq 1 300); do
		[[ $(q "$DB" "SELECT count(*) FROM pg_stat_activity
			WHERE backend_type = 'task_events worker' AND datname = current_database()") -ge $WORKERS ]] && return 0
		sleep 0.1
	done
	die "the task_events workers did not connect to $DB"
}
max_seq() { q "$DB" 'SELECT coalesce(max(seq), 0) FROM task_events.events'; }
behind() { q "$DB" 'SELECT coalesce(sum(events_behind), 0) FROM task_events.handler_status'; }

# Wait until every handler has caught up (positions first, then the exact
# view); print the seconds it took.
catch_up() {
	local t0 target
	t0=$(now_s)
	target=$(max_seq)
	while (($(q "$DB" "SELECT coalesce(min(s.last_seq), 0) FROM task_events.handler_state s
			JOIN task_events.handlers h USING (handler) WHERE h.enabled") < target)); do
		timed_out "$t0" && die "the handlers did not catch up within ${CATCHUP_TIMEOUT}s: $(behind) events behind"
		sleep 0.1
	done
	while (($(behind) > 0)); do
		timed_out "$t0" && die "the handlers did not catch up within ${CATCHUP_TIMEOUT}s: $(behind) events behind"
		sleep 0.1
	done
	elapsed "$t0"
}

# CPU seconds (user + system) the processes used so far, summed.
CLK_TCK=$(getconf CLK_TCK)
cpu_seconds() {
	local pid total=0 fields
	for pid in "$@"; do
		# Fields after "pid (comm) ": utime and stime are the 12th and 13th.
		fields=$(sed 's/^.*) //' "/proc/$pid/stat")
		total=$((total + $(awk '{print $12 + $13}' <<<"$fields")))
	done
	awk -v t="$total" -v hz="$CLK_TCK" 'BEGIN {printf "%.2f", t / hz}'
}

# Wait until the first number stat_counters prints differs from $1 (the
# workers flushed their statistics).
wait_flush() {
	local _
	for _ in $(seq 1 300); do
		[[ $(stat_counters | cut -d' ' -f1) != "$1" ]] && return 0
		sleep 0.2
	done
	die "the workers flushed no statistics for a minute"
}

# "peeks entries rows": task_events.handlers scans (one per worker round),
# entries read from the indexes of task_events.events, and its rows read,
# as the workers flushed them (at most once a second).
stat_counters() {
	q "$DB" "SELECT (SELECT seq_scan + coalesce(idx_scan, 0) FROM pg_stat_user_tables
			WHERE relid = 'task_events.handlers'::regclass)
		|| ' ' || (SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes
			WHERE relid = 'task_events.events'::regclass)
		|| ' ' || (SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables
			WHERE relid = 'task_events.events'::regclass)"
}

# idle_measure LABEL: the workers' CPU over IDLE_SECONDS, and what their
# rounds read; sets IDLE_CPU, IDLE_PEEKS, IDLE_ENTRIES, IDLE_ROWS.  Waits for
# the statistics of earlier busy rounds to be flushed first.
idle_measure() {
	local pids c0 c1 cpu0 cpu1 p0 e0 r0 p1 e1 r1
	pids=$(worker_pids)
	c0=$(stat_counters)
	wait_flush "${c0%% *}"
	read -r p0 e0 r0 <<<"$(stat_counters)"
	# shellcheck disable=SC2086 # one pid per word
	cpu0=$(cpu_seconds $pids)
	sleep "$IDLE_SECONDS"
	# shellcheck disable=SC2086
	cpu1=$(cpu_seconds $pids)
	[[ $(worker_pids) == "$pids" ]] || die "$1: the workers restarted during the idle measurement"
	# The rounds of the last second are flushed within a second.
	c1=$(stat_counters)
	wait_flush "${c1%% *}"
	read -r p1 e1 r1 <<<"$(stat_counters)"
	IDLE_CPU=$(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN {printf "%.2f", b - a}')
	IDLE_PEEKS=$((p1 - p0))
	IDLE_ENTRIES=$((e1 - e0))
	IDLE_ROWS=$((r1 - r0))
	log "$1: workers $pids used ${IDLE_CPU} CPU s in ${IDLE_SECONDS} s; $IDLE_PEEKS rounds read $IDLE_ENTRIES index entries, $IDLE_ROWS rows"
}

# explain NAME SQL...: EXPLAIN (ANALYZE, BUFFERS) into $RAW/NAME.txt (psql
# script lines before it may set variables); prints "ms buffers".
explain() {
	local name=$1
	shift
	printf '%s\n' "$@" | psql -d "$DB" -At >"$RAW/$name.txt"
	awk '/^Execution Time:/ {ms = $3}
		/Buffers:/ && !b {b = $0; sub(/^ *Buffers: */, "", b)}
		END {printf "%s ms, buffers %s\n", ms, b}' "$RAW/$name.txt"
}

wait_workers

# ---------------------------------------------------------------- the long transaction
psql -d "$DB" <<'SQL'
BEGIN;
SELECT task_events.create_task('held', 'written by the prepared transaction') \g /dev/null
PREPARE TRANSACTION 'bench_long_transaction';
SQL
HELD_XID=$(q "$DB" "SELECT transaction FROM pg_prepared_xacts WHERE gid = 'bench_long_transaction'")
log "prepared transaction $HELD_XID holds the xmin; writing $EVENTS events"

# ---------------------------------------------------------------- the events
t0=$(now_s)
pids=()
for s in 0 1; do
	(
		left=$((EVENTS / 2 + (s == 0 ? EVENTS % 2 : 0)))
		while ((left > 0)); do
			n=$((left < CHUNK ? left : CHUNK))
			echo "SELECT count(*) FROM pg_catalog.generate_series(1, $n) AS g,
				task_events.create_task(((g % 1000) + 1)::text, 'Benchmark task behind a long transaction');"
			left=$((left - n))
		done | "$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -d "$DB" >/dev/null
	) &
	pids+=($!)
done
for p in "${pids[@]}"; do
	wait "$p" || die "writing the events failed"
done
GEN_S=$(elapsed "$t0")
log "written in ${GEN_S}s; waiting for the handlers"
CATCHUP_S=$(catch_up)
log "handled ${CATCHUP_S}s after the last write"
XMIN=$(q "$DB" 'SELECT pg_snapshot_xmin(pg_current_snapshot())')
[[ $XMIN == "$HELD_XID" ]] || die "the xmin is $XMIN, not the prepared transaction's $HELD_XID"
# The plans the workers and handler_status get once autovacuum has analyzed
# the table.
psql -d "$DB" -c 'ANALYZE task_events.events'
HANDLERS=$(q "$DB" 'SELECT count(*) FROM task_events.handlers WHERE enabled')
POLL=$(q "$DB" 'SHOW task_events.poll_interval')

# ---------------------------------------------------------------- held: idle
idle_measure "held"
HELD_CPU=$IDLE_CPU HELD_PEEKS=$IDLE_PEEKS HELD_ENTRIES=$IDLE_ENTRIES HELD_ROWS=$IDLE_ROWS

WS_SET="SELECT window_start AS ws FROM task_events.handler_state WHERE handler = '$HANDLER' \\gset"
W_NEW=$(explain window_new "$WS_SET" 'SET plan_cache_mode = force_generic_plan;' \
	"PREPARE w(pg_catalog.pg_snapshot, pg_catalog.pg_snapshot) AS SELECT $WINDOW_SQL;" \
	"EXPLAIN (ANALYZE, BUFFERS) EXECUTE w(:'ws', pg_catalog.pg_current_snapshot());")
W_OLD=$(explain window_1_0 "$WS_SET" 'SET plan_cache_mode = force_generic_plan;' \
	"PREPARE w(pg_catalog.pg_snapshot, pg_catalog.pg_snapshot) AS SELECT $WINDOW_SQL_1_0;" \
	"EXPLAIN (ANALYZE, BUFFERS) EXECUTE w(:'ws', pg_catalog.pg_current_snapshot());")
S_NEW=$(explain status_new 'EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM task_events.handler_status;')
S_OLD=$(explain status_1_0 "$BACKLOG_1_0" "EXPLAIN (ANALYZE, BUFFERS) $STATUS_SQL_1_0;")

# ---------------------------------------------------------------- commit
# shellcheck disable=SC2046
cpu0=$(cpu_seconds $(worker_pids))
t0=$(now_s)
psql -d "$DB" -c "COMMIT PREPARED 'bench_long_transaction'"
COMMIT_S=$(catch_up)
# shellcheck disable=SC2046
COMMIT_CPU=$(awk -v a="$cpu0" -v b="$(cpu_seconds $(worker_pids))" 'BEGIN {printf "%.2f", b - a}')
HELD_AUDITED=$(q "$DB" "SELECT count(*) FROM task_events.audit_log
	WHERE event_data ->> 'task_title' = 'written by the prepared transaction'")
log "committed: its event handled in ${COMMIT_S}s (audit rows: $HELD_AUDITED)"

# ---------------------------------------------------------------- baseline: idle
idle_measure "no long transaction"
S_BASE=$(explain status_base 'EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM task_events.handler_status;')

# ---------------------------------------------------------------- report
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f×", a / b; else print "n/a"}'; }
per() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.1f", a / b; else print "n/a"}'; }
cat <<EOF

== Long transaction (issue 9): $EVENTS events behind a prepared transaction ==
server: $(q "$DB" 'SHOW server_version'), $(nproc) CPUs, $WORKERS workers, $HANDLERS handlers, poll_interval $POLL, git $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)
writing: ${GEN_S} s; handlers caught up ${CATCHUP_S} s after the last write

workers idle for ${IDLE_SECONDS} s          CPU s   rounds  index entries/round  rows/round
  prepared transaction open       $(printf '%6s  %6s  %19s  %10s' "$HELD_CPU" "$HELD_PEEKS" "$(per "$HELD_ENTRIES" "$HELD_PEEKS")" "$(per "$HELD_ROWS" "$HELD_PEEKS")")
  no long transaction (baseline)  $(printf '%6s  %6s  %19s  %10s' "$IDLE_CPU" "$IDLE_PEEKS" "$(per "$IDLE_ENTRIES" "$IDLE_PEEKS")" "$(per "$IDLE_ROWS" "$IDLE_PEEKS")")
  ratio (open / baseline)         $(ratio "$HELD_CPU" "$IDLE_CPU")

with the prepared transaction open (EXPLAIN ANALYZE, BUFFERS):
  peek window query ($HANDLER)     ${W_NEW}
    1.0 form (range from xmin)    ${W_OLD}
  SELECT * FROM handler_status    ${S_NEW}
    1.0 handler_backlog()         ${S_OLD}
  handler_status, baseline        ${S_BASE}

COMMIT PREPARED: its event handled by every handler in ${COMMIT_S} s, ${COMMIT_CPU} CPU s of the workers (audit rows: $HELD_AUDITED)

-- plan: peek window query, prepared transaction open --
$(cat "$RAW/window_new.txt")

-- plan: SELECT * FROM task_events.handler_status, prepared transaction open --
$(cat "$RAW/status_new.txt")
EOF
