#!/usr/bin/env bash
# The task_events benchmark (issue 4): starts ONE throwaway PostgreSQL 15
# server, measures everything on it in one run, writes CSV files and a
# comparison report to $BENCH_OUT and, when gnuplot is installed, the plot.
#
# Normally called by bench/run.sh (full run, as root) or bench/smoke.sh (CI,
# tiny sizes, as any user).  Needs no root: the extension must already be
# installed (make install) and pgbench/psql of PostgreSQL 15 available.
#
# Parts (BENCH_PARTS, default all, in this order):
#   throughput  create_task and lifecycle at each client count: the extension
#               in each notify_mode, the PL/pgSQL baseline with and without
#               NOTIFY, PgQ with its consumers running, the write ceiling and
#               the pipeline ceiling
#   latency     commit -> audit row at a steady BENCH_RATE events/s, for each
#               notify_mode and for PgQ
#   lag         handler backlog sampled each second under the maximum write rate
#   drain       workers draining a backlog of BENCH_DRAIN_EVENTS events, with
#               the workers' memory before and after; then PgQ's consumers
#               draining a backlog of the same size
#   log         create_task with BENCH_LOG_EVENTS events in the log against an
#               empty log
#   subscriptions  a backlog drained by consumers outside the database
#               (bench/subscriptions.sh, a server of its own)
#   lanes       a slow handler draining a backlog in 4 lanes against 1
#               (bench/handler_lanes.sh, a server of its own)
#
# Environment (defaults for a full run; BENCH_SMOKE=1 makes them tiny):
#   BENCH_SECONDS=20        length of each throughput and latency run
#   BENCH_CLIENTS="1 4 16 64"
#   BENCH_RATE=1000         events/s of the latency run
#   BENCH_LAG_SECONDS=30    length of each lag run
#   BENCH_DRAIN_EVENTS=1000000
#   BENCH_LOG_EVENTS=10000000
#   BENCH_WORKERS=2         task_events.worker_count
#   BENCH_OUT=bench/results where the CSV files, report and plot go
#   BENCH_KEEP=1            keep the server's data directory (path printed)
#   BENCH_SERVER_CONF       extra postgresql.conf lines, one per line
#   BENCH_PGQ_TICKER_PERIOD=0.1  pgqd's ticker_period (s), see "PgQ" below
#   BENCH_PGQ_IDLE_SLEEP=0.01    a PgQ consumer's sleep (s) when it found no batch
#
# The PostgreSQL 15 binaries: PG_BIN, else the bindir of PG_CONFIG (as
# scripts/test.sh passes it), else Debian's.  The server runs from the same.
set -euo pipefail

BENCH=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd -- "$BENCH/.." && pwd)
if [[ -z ${PG_BIN:-} ]]; then
	if [[ -n ${PG_CONFIG:-} && -x ${PG_CONFIG:-} ]]; then
		PG_BIN=$("$PG_CONFIG" --bindir)
	else
		PG_BIN=/usr/lib/postgresql/15/bin
	fi
fi
PG_TEMP_BIN=${PG_TEMP_BIN:-$PG_BIN}

SMOKE=${BENCH_SMOKE:-0}
if [[ $SMOKE == 1 ]]; then
	SECONDS_RUN=${BENCH_SECONDS:-1}
	CLIENTS=${BENCH_CLIENTS:-2}
	RATE=${BENCH_RATE:-100}
	LAG_SECONDS=${BENCH_LAG_SECONDS:-2}
	DRAIN_EVENTS=${BENCH_DRAIN_EVENTS:-4000}
	LOG_EVENTS=${BENCH_LOG_EVENTS:-12000}
	CHUNK_EVENTS=1000
else
	SECONDS_RUN=${BENCH_SECONDS:-20}
	CLIENTS=${BENCH_CLIENTS:-1 4 16 64}
	RATE=${BENCH_RATE:-1000}
	LAG_SECONDS=${BENCH_LAG_SECONDS:-30}
	DRAIN_EVENTS=${BENCH_DRAIN_EVENTS:-1000000}
	LOG_EVENTS=${BENCH_LOG_EVENTS:-10000000}
	CHUNK_EVENTS=40000
fi
WORKERS=${BENCH_WORKERS:-2}
# Longest wait for the handlers to catch up before the bench gives up.
CATCHUP_TIMEOUT=${BENCH_CATCHUP_TIMEOUT:-$([[ $SMOKE == 1 ]] && echo 60 || echo 3600)}
PARTS=${BENCH_PARTS:-throughput latency lag drain log subscriptions lanes}
OUT=$(realpath -m -- "${BENCH_OUT:-$BENCH/results}")
# The client count of the headline comparisons and targets.
MAIN_CLIENTS=16
[[ " $CLIENTS " == *" $MAIN_CLIENTS "* ]] || MAIN_CLIENTS=${CLIENTS##* }
EXT_DB=bench_ext
BASE_DB=bench_baseline # the PL/pgSQL baseline, the ceilings and PgQ
PGQ_TICKER_PERIOD=${BENCH_PGQ_TICKER_PERIOD:-0.1}
PGQ_IDLE_SLEEP=${BENCH_PGQ_IDLE_SLEEP:-0.01}

# shellcheck source=scripts/pg-temp.sh
. "$ROOT/scripts/pg-temp.sh"

log() { printf '%s bench: %s\n' "$(date +%H:%M:%S)" "$*"; }
die() {
	printf 'bench: %s\n' "$*" >&2
	exit 1
}

for tool in psql pgbench; do
	[[ -x $PG_BIN/$tool ]] || die "$PG_BIN/$tool not found (PostgreSQL 15 client tools)"
done
[[ -f $("$PG_BIN/pg_config" --sharedir)/extension/task_events.control ]] ||
	die "task_events is not installed: run make install (bench/run.sh does)"
[[ -f $("$PG_BIN/pg_config" --sharedir)/extension/pgq.control ]] ||
	die "PgQ is not installed in $("$PG_BIN/pg_config" --sharedir): install postgresql-15-pgq3 (scripts/install-deps.sh does)"
PGQD=$(command -v pgqd) || die "pgqd not found: install pgqd (scripts/install-deps.sh does)"

WORK=$(mktemp -d /tmp/task_events_bench.XXXXXX)
DATADIR=$WORK/data
RAW=$WORK/raw # pgbench outputs and other raw material
mkdir -p -- "$RAW" "$OUT"
SAMPLER_PID=
PGQD_PID=
PGQ_CONSUMER_PIDS=()
cleanup() {
	local rc=$?
	if [[ -n $SAMPLER_PID ]]; then
		kill "$SAMPLER_PID" 2>/dev/null || true
		wait "$SAMPLER_PID" 2>/dev/null || true
	fi
	pgq_stop >/dev/null 2>&1 || true
	pg_temp_cleanup
	if [[ ${BENCH_KEEP:-0} == 1 || $rc -ne 0 ]]; then
		echo "bench: data directory and raw outputs kept in $WORK"
	else
		rm -rf -- "$WORK"
	fi
}
trap cleanup EXIT
pg_temp_chown "$WORK"

# ---------------------------------------------------------------- server
# Tuned for a write benchmark on a small machine, durability kept:
# fsync, full_page_writes and synchronous_commit on (pg-temp.sh turns the
# first two off for tests; the later lines win).
SERVER_CONF=(
	"shared_preload_libraries = 'task_events'"
	"task_events.database = '$EXT_DB'"
	"task_events.worker_count = $WORKERS"
	"fsync = on"
	"full_page_writes = on"
	"synchronous_commit = on"
	"max_connections = 200"
	"shared_buffers = 1GB"
	"wal_buffers = 64MB"
	"max_wal_size = 16GB"
	"min_wal_size = 1GB"
	"checkpoint_timeout = 30min"
	"checkpoint_completion_target = 0.9"
	"maintenance_work_mem = 256MB"
	"track_commit_timestamp = on"
	"log_checkpoints = on"
)
[[ $SMOKE == 1 ]] && SERVER_CONF+=("shared_buffers = 128MB" "max_wal_size = 1GB")
# Extra postgresql.conf lines, one per line of BENCH_SERVER_CONF (later
# lines win), e.g. BENCH_SERVER_CONF="plan_cache_mode = force_custom_plan".
if [[ -n ${BENCH_SERVER_CONF:-} ]]; then
	mapfile -t extra_conf <<<"$BENCH_SERVER_CONF"
	SERVER_CONF+=("${extra_conf[@]}")
fi
printf '%s\n' "${SERVER_CONF[@]}" >"$OUT/server_settings.txt"

log "starting a throwaway server in $DATADIR"
pg_temp_start "$DATADIR" "${SERVER_CONF[@]}"

psql() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 "$@"; }
# One value from a query.
q() {
	local db=$1
	shift
	"$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -d "$db" -c "$@"
}

psql -d postgres -c "CREATE DATABASE $EXT_DB" -c "CREATE DATABASE $BASE_DB"
psql -d "$EXT_DB" -c 'CREATE EXTENSION task_events'
psql -d "$BASE_DB" -f "$BENCH/plpgsql_baseline.sql" -f "$BENCH/ceiling.sql" -f "$BENCH/pgq_baseline.sql" >/dev/null

# Is task_events.notify_mode there?  Without it everything is 'commit'.
HAVE_MODES=$(q "$EXT_DB" "SELECT count(*) FROM pg_settings WHERE name = 'task_events.notify_mode'")
if [[ $HAVE_MODES == 1 ]]; then
	MODES=(commit relay off)
	BEST_MODE=relay
else
	MODES=(commit)
	BEST_MODE=commit
	log "task_events.notify_mode does not exist in this build: only 'commit' is measured"
fi

# ---------------------------------------------------------------- machine
{
	echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
	echo "cpus: $(nproc)"
	echo "cpu: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | sort -u | paste -sd ';')"
	echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
	echo "kernel: $(uname -sr)"
	echo "disk: $(df -h --output=source,fstype,size "$WORK" | tail -n 1 | tr -s ' ')"
	echo "server: $(q postgres 'SELECT version()')"
	echo "pgbench: $("$PG_BIN/pgbench" --version)"
	echo "task_events.notify_mode available: $([[ $HAVE_MODES == 1 ]] && echo yes || echo no)"
	echo "postgresql binaries: $PG_BIN"
	echo "pgq: $(q "$BASE_DB" 'SELECT pgq.version()'); $("$PGQD" -V) (ticker_period $PGQ_TICKER_PERIOD s)"
	echo "git: $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
	if [[ $SMOKE != 1 && -x $PG_BIN/pg_test_fsync ]]; then
		echo "fdatasync: $(cd "$WORK" && "$PG_BIN/pg_test_fsync" -s 1 -f "$WORK/fsync.test" 2>/dev/null |
			awk '/^ *fdatasync/ {print $2 " ops/s (one 8kB write, pg_test_fsync)"; exit}')"
		rm -f -- "$WORK/fsync.test"
	fi
	echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$OUT/machine.txt"
sed 's/^/  /' "$OUT/machine.txt"

# ---------------------------------------------------------------- helpers
# Set notify_mode for the whole server (writers and the relay handler must
# agree) and wait until a new session sees it.
set_mode() {
	[[ $HAVE_MODES == 1 ]] || return 0
	psql -d "$EXT_DB" -c "ALTER SYSTEM SET task_events.notify_mode = '$1'" -c 'SELECT pg_reload_conf()' >/dev/null
	local i
	for i in $(seq 1 100); do
		[[ $(q "$EXT_DB" 'SHOW task_events.notify_mode') == "$1" ]] && return 0
		sleep 0.05
	done
	die "notify_mode did not become $1"
}

# Wait until the extension's workers are connected.
wait_workers() {
	local i
	for i in $(seq 1 300); do
		[[ $(q "$EXT_DB" "SELECT count(*) FROM pg_stat_activity
			WHERE backend_type = 'task_events worker' AND datname = current_database()") -ge $WORKERS ]] && return 0
		sleep 0.1
	done
	die "the task_events workers did not connect to $EXT_DB"
}

worker_pids() {
	q "$EXT_DB" "SELECT pid FROM pg_stat_activity WHERE backend_type = 'task_events worker' ORDER BY pid" | paste -sd' '
}

behind() { q "$EXT_DB" 'SELECT coalesce(sum(events_behind), 0) FROM task_events.handler_status'; }
max_seq() { q "$EXT_DB" 'SELECT coalesce(max(seq), 0) FROM task_events.events'; }
now_s() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now_s)" 'BEGIN {printf "%.2f", b - a}'; }

# Wait until every handler has caught up; print the seconds it took.
# Cheap polling of the handlers' positions first, then the exact view.
catch_up() {
	local t0 target
	t0=$(now_s)
	target=$(max_seq)
	while (($(q "$EXT_DB" "SELECT coalesce(min(s.last_seq), 0) FROM task_events.handler_state s
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
timed_out() { awk -v a="$1" -v b="$(now_s)" -v l="$CATCHUP_TIMEOUT" 'BEGIN {exit !(b - a > l)}'; }

# An empty event log and empty handler tables: the extension is dropped and
# created again in one transaction (the workers never see it missing).
# A worker still in a batch can deadlock with the DROP (which then fails):
# try again.
reset_ext() {
	local try
	catch_up >/dev/null
	for try in 1 2 3 4 5; do
		if psql -d "$EXT_DB" -1 -c 'DROP EXTENSION task_events' -c 'CREATE EXTENSION task_events' 2>"$RAW/reset.err"; then
			wait_workers
			return 0
		fi
		log "resetting the extension failed (try $try): $(head -n 1 "$RAW/reset.err")"
		sleep 1
	done
	die "could not drop and create the extension"
}

reset_baseline() {
	psql -d "$BASE_DB" -c 'TRUNCATE plpgsql_impl.tasks, plpgsql_impl.events, plpgsql_impl.notifications,
		plpgsql_impl.analytics_counters, plpgsql_impl.completion_stats, plpgsql_impl.audit_log,
		ceiling.tasks, ceiling.events, ceiling.notifications, ceiling.analytics_counters,
		ceiling.completion_stats, ceiling.audit_log RESTART IDENTITY'
}

# run_pgbench TAG DB SCRIPT CLIENTS SECONDS [pgbench options...]
# Prints "tps latency_ms failed"; the full output is kept in $RAW/TAG.txt.
# A client that aborts (an error in the script) fails the bench.
run_pgbench() {
	local tag=$1 db=$2 script=$3 clients=$4 secs=$5 threads out
	shift 5
	threads=$((clients < 2 ? clients : 2))
	out=$RAW/$tag.txt
	if ! "$PG_BIN/pgbench" -n -M prepared -c "$clients" -j "$threads" -T "$secs" "$@" \
		-f "$BENCH/$script" "$db" >"$out" 2>&1; then
		cat "$out" >&2
		die "pgbench failed: $tag"
	fi
	if grep -q 'aborted' "$out"; then
		cat "$out" >&2
		die "pgbench clients aborted: $tag"
	fi
	awk '/^tps = / {tps = $3}
		/^latency average = / {lat = $4}
		/^number of failed transactions: / {failed = $5}
		END {printf "%s %s %s\n", tps, lat, (failed == "" ? 0 : failed)}' "$out"
}

# gen_lifecycles EVENTS [SCHEMA]: append EVENTS events (complete lifecycles:
# create, start, complete = 4 events per task) in chunks of CHUNK_EVENTS, from
# two sessions in parallel, printing progress.  Returns when all committed.
# SCHEMA task_events (the default) writes to the extension, bench_pgq to PgQ.
gen_lifecycles() {
	local events=$1 schema=${2:-task_events} db=$EXT_DB tasks chunks per i s pids=() t0 last=0
	[[ $schema == task_events ]] || db=$BASE_DB
	tasks=$(((events + 3) / 4))
	chunks=$(((tasks * 4 + CHUNK_EVENTS - 1) / CHUNK_EVENTS))
	t0=$(now_s)
	for s in 0 1; do
		per=$(((chunks - s + 1) / 2))
		(
			for ((i = 0; i < per; i++)); do
				n=$((CHUNK_EVENTS / 4))
				remaining=$((tasks - (2 * i + s) * n))
				((remaining < n)) && n=$remaining
				((n > 0)) || break
				echo "SELECT count(*) FROM (SELECT $schema.complete_task(($schema.update_status(
					($schema.create_task(((g % 1000) + 1)::text, 'Benchmark task',
					'A task created by the benchmark')).task_id, 'in_progress')).task_id)
					FROM pg_catalog.generate_series(1, $n) AS g) AS s;"
			done | "$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -d "$db" >/dev/null
		) &
		pids+=($!)
	done
	while :; do
		local running=0 p
		for p in "${pids[@]}"; do
			kill -0 "$p" 2>/dev/null && running=1
		done
		((running)) || break
		sleep 1
		if (($(date +%s) - last >= 15)); then
			last=$(date +%s)
			if [[ $schema == task_events ]]; then
				log "  log at $(max_seq) events, slowest handler at $(q "$EXT_DB" \
					'SELECT coalesce(min(last_seq), 0) FROM task_events.handler_state') ($(elapsed "$t0") s)"
			else
				log "  queue at $(pgq_events) events ($(elapsed "$t0") s)"
			fi
		fi
	done
	for p in "${pids[@]}"; do
		wait "$p" || die "generating events failed"
	done
}

# The workers' memory: VmRSS, RssAnon, RssShmem (kB) from /proc, and the
# total of their memory contexts (bytes) that pg_log_backend_memory_contexts
# writes to the server log.  Appends one CSV line per worker.
worker_memory() {
	local label=$1 pid rss anon shmem ctx
	for pid in $(worker_pids); do
		rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
		anon=$(awk '/^RssAnon:/ {print $2}' "/proc/$pid/status")
		shmem=$(awk '/^RssShmem:/ {print $2}' "/proc/$pid/status")
		local lines
		lines=$(grep -c "\[$pid\].*Grand total" "$DATADIR/server.log" || true)
		q "$EXT_DB" "SELECT pg_log_backend_memory_contexts($pid)" >/dev/null
		ctx=
		for _ in $(seq 1 50); do
			if (($(grep -c "\[$pid\].*Grand total" "$DATADIR/server.log" || true) > lines)); then
				ctx=$(grep "\[$pid\].*Grand total" "$DATADIR/server.log" | tail -n 1 |
					sed -n 's/.*Grand total: \([0-9]*\) bytes.*/\1/p')
				break
			fi
			sleep 0.1
		done
		echo "$label,$pid,$rss,$anon,$shmem,$ctx" >>"$OUT/memory.csv"
	done
}

# ---------------------------------------------------------------- PgQ
# The PgQ variant (bench/pgq_baseline.sql, in $BASE_DB): the writers put the
# envelopes into the queue task_events; pgqd, the ticker daemon, cuts the
# queue into batches ("ticks"); three PL/pgSQL consumers, one psql each,
# run bench_pgq.run_consumer: next_batch, get_batch_events, the handler's
# INSERTs, finish_batch, COMMIT, and a sleep of PGQ_IDLE_SLEEP when there
# was no batch.  pgqd and the consumers run only during a PgQ measurement:
# pgq_start before it, pgq_stop after it (and on exit).
#
# pgqd's settings, and why:
#   ticker_period   0.1 s instead of 1 s: a tick every 0.1 s under load, so a
#                   batch holds the events of 0.1 s and an event waits 0.05 s
#                   on average for its tick; the queue's ticker_max_lag is
#                   half of it (pgq_reset), so every ticker call that finds
#                   new events ticks (BENCHMARKS.md, "PgQ")
#   database_list   only $BASE_DB: pgqd ticks nothing else
#   base_connstr    this server's socket directory and port, explicitly (pgqd
#                   is Debian's binary: nothing else would point it here)
#   maint_period, check_period, retry_period: the defaults (120, 60, 30 s)
cat >"$WORK/pgqd.ini" <<EOF
[pgqd]
logfile = $RAW/pgqd.log
syslog = 0
base_connstr = host='$PGHOST' port=$PGPORT user=$PGUSER
initial_database = $BASE_DB
database_list = $BASE_DB
ticker_period = $PGQ_TICKER_PERIOD
EOF

# The server's clock, for comparisons with PgQ's tick times.
server_now() { q "$BASE_DB" 'SELECT clock_timestamp()'; }

# The events written to the queue (the envelopes' seq).
pgq_events() { q "$BASE_DB" 'SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM bench_pgq.event_seq'; }

# An empty queue, its three consumers registered, empty PgQ tables.
pgq_reset() {
	pgq_stop
	q "$BASE_DB" "SELECT bench_pgq.reset_queue(($PGQ_TICKER_PERIOD * interval '1 s') / 2)" >/dev/null
}

# Is this background process of the bench still running?  Asks bash's job
# table, so that a process id the system has reused is never taken for ours.
running() { jobs -pr | grep -qx "$1"; }

# Start pgqd and wait until it has called the ticker in $BASE_DB.
pgq_start_ticker() {
	local i since
	since=$(server_now) # not the backend of a pgqd stopped just before
	"$PGQD" -q "$WORK/pgqd.ini" >>"$RAW/pgqd.out" 2>&1 &
	PGQD_PID=$!
	for i in $(seq 1 100); do
		[[ $(q "$BASE_DB" "SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND query LIKE '%pgq.ticker()%'
				AND pid <> pg_backend_pid() AND backend_start > '$since'") -ge 1 ]] && return 0
		running "$PGQD_PID" || break
		sleep 0.1
	done
	cat "$RAW/pgqd.log" "$RAW/pgqd.out" >&2 2>/dev/null || true
	die "pgqd did not start ticking in $BASE_DB"
}

# Start the three consumers and wait until they are connected.
pgq_start_consumers() {
	local c i since
	since=$(server_now)
	for c in notification analytics audit; do
		PGAPPNAME=bench_pgq_$c "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -d "$BASE_DB" \
			-c "CALL bench_pgq.run_consumer('$c', $PGQ_IDLE_SLEEP)" >>"$RAW/pgq_consumer_$c.out" 2>&1 &
		PGQ_CONSUMER_PIDS+=($!)
	done
	for i in $(seq 1 100); do
		[[ $(q "$BASE_DB" "SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND application_name LIKE 'bench\_pgq\_%'
				AND backend_start > '$since'") -ge 3 ]] && return 0
		pgq_check_consumers
		sleep 0.1
	done
	die "the PgQ consumers did not connect to $BASE_DB"
}

pgq_start() {
	pgq_start_ticker
	pgq_start_consumers
}

# Die if a consumer has exited: it runs until pgq_stop, so it failed.  (In
# a subshell, bash's job table is a copy: kill -0 sees the exit there.)
pgq_check_consumers() {
	local p
	for p in "${PGQ_CONSUMER_PIDS[@]}"; do
		if ! running "$p" || ! kill -0 "$p" 2>/dev/null; then
			cat "$RAW"/pgq_consumer_*.out >&2
			die "a PgQ consumer exited"
		fi
	done
}

# Stop the consumers (each returns after its round) and pgqd (SIGINT, its
# stop signal).  Returns non-zero if a consumer failed or had to be killed.
pgq_stop() {
	local p i rc=0
	if ((${#PGQ_CONSUMER_PIDS[@]} > 0)); then
		q "$BASE_DB" 'UPDATE bench_pgq.consumer_control SET stop = true' >/dev/null || true
		for p in "${PGQ_CONSUMER_PIDS[@]}"; do
			for i in $(seq 1 300); do
				running "$p" || break
				sleep 0.1
			done
			if running "$p"; then
				kill "$p"
				rc=1
			fi
			wait "$p" || rc=1
		done
		PGQ_CONSUMER_PIDS=()
		if ((rc != 0)); then
			cat "$RAW"/pgq_consumer_*.out >&2
			echo "bench: a PgQ consumer failed or did not stop" >&2
		fi
	fi
	if [[ -n $PGQD_PID ]]; then
		if running "$PGQD_PID"; then
			kill -INT "$PGQD_PID"
		fi
		wait "$PGQD_PID" 2>/dev/null || true
		PGQD_PID=
	fi
	return "$rc"
}

# pgq_catch_up AT: wait until every consumer has handled every event
# committed before AT (a server timestamp taken after the writers stopped);
# print the seconds it took.  Returns 1 after CATCHUP_TIMEOUT.
pgq_catch_up() {
	local at=$1 t0
	t0=$(now_s)
	while [[ $(q "$BASE_DB" "SELECT bench_pgq.caught_up('$at')") != t ]]; do
		pgq_check_consumers
		timed_out "$t0" && return 1
		sleep 0.1
	done
	elapsed "$t0"
}

# Every CSV file starts with its header only, so that the report also works
# for a run of some parts (BENCH_PARTS).
init_csv() {
	echo "workload,variant,clients,seconds,tps,events_per_s,latency_ms,failed,events,behind_at_end,catchup_s,notes" \
		>"$OUT/throughput.csv"
	echo "mode,clients,rate_target,seconds,rate_achieved,events,p50_ms,p99_ms,max_ms,client_latency_ms,schedule_lag_ms" \
		>"$OUT/latency.csv"
	echo "mode,t,events_behind,seconds_behind" >"$OUT/lag_samples.csv"
	echo "mode,clients,seconds,write_events_per_s,max_behind,end_behind,max_seconds_behind,slope_second_half,catchup_s,bounded" \
		>"$OUT/lag.csv"
	echo "label,log_events,mode,clients,seconds,tps,latency_ms" >"$OUT/log_size.csv"
	echo "when,pid,vmrss_kb,rssanon_kb,rssshmem_kb,context_bytes" >"$OUT/memory.csv"
	echo "events,handlers,mode,generate_s,drain_s,events_per_s,handler_events_per_s" >"$OUT/drain.csv"
	echo "handler,processed,batches,mean_batch_ms,max_batch_ms" >"$OUT/drain_handlers.csv"
	echo "consumer,events,seconds,events_per_s,client_cpu_s,client_cpu_us_per_event" >"$OUT/subscriptions.csv"
	echo "lanes,events,seconds,events_per_s" >"$OUT/handler_lanes.csv"
}

# ---------------------------------------------------------------- part 1
part_throughput() {
	local workload clients variant tag r tps lat failed events behind_end catchup mode per_event notes at
	for workload in create_task lifecycle; do
		for clients in $CLIENTS; do
			for variant in ext_commit ext_relay ext_off plpgsql_notify plpgsql_nonotify pgq ceiling_write ceiling_pipeline; do
				tag=${workload}_${variant}_c$clients
				behind_end='' catchup='' notes=''
				case $variant in
				ext_*)
					mode=${variant#ext_}
					if [[ $HAVE_MODES != 1 && $mode != commit ]]; then
						echo "$workload,$variant,$clients,$SECONDS_RUN,,,,,,,,notify_mode not available" >>"$OUT/throughput.csv"
						log "$tag: not available (no task_events.notify_mode)"
						continue
					fi
					reset_ext
					set_mode "$mode"
					psql -d "$EXT_DB" -c CHECKPOINT
					r=$(PGOPTIONS='-c search_path=task_events' run_pgbench "$tag" "$EXT_DB" \
						"$workload.pgbench" "$clients" "$SECONDS_RUN")
					behind_end=$(behind)
					catchup=$(catch_up)
					events=$(max_seq)
					;;
				plpgsql_*)
					reset_baseline
					psql -d "$BASE_DB" -c CHECKPOINT
					local opts='-c search_path=plpgsql_impl'
					[[ $variant == plpgsql_nonotify ]] && opts+=' -c plpgsql_impl.notify=off'
					r=$(PGOPTIONS=$opts run_pgbench "$tag" "$BASE_DB" "$workload.pgbench" "$clients" "$SECONDS_RUN")
					events=$(q "$BASE_DB" 'SELECT count(*) FROM plpgsql_impl.events')
					;;
				pgq)
					# Consumers that do not keep up are reported (notes), not fatal.
					pgq_reset
					psql -d "$BASE_DB" -c CHECKPOINT
					pgq_start
					r=$(run_pgbench "$tag" "$BASE_DB" "pgq_$workload.pgbench" "$clients" "$SECONDS_RUN")
					at=$(server_now)
					behind_end=$(q "$BASE_DB" 'SELECT bench_pgq.events_behind()')
					if ! catchup=$(pgq_catch_up "$at"); then
						catchup=''
						notes="the PgQ consumers did not catch up within ${CATCHUP_TIMEOUT}s"
						log "$tag: $notes"
					fi
					pgq_stop || die "a PgQ consumer failed: $tag"
					events=$(pgq_events)
					;;
				ceiling_*)
					reset_baseline
					psql -d "$BASE_DB" -c CHECKPOINT
					r=$(run_pgbench "$tag" "$BASE_DB" "${variant}_$workload.pgbench" "$clients" "$SECONDS_RUN")
					events=$(q "$BASE_DB" 'SELECT count(*) FROM ceiling.events')
					;;
				esac
				read -r tps lat failed <<<"$r"
				per_event=$(awk -v e="$events" -v s="$SECONDS_RUN" 'BEGIN {printf "%.1f", e / s}')
				echo "$workload,$variant,$clients,$SECONDS_RUN,$tps,$per_event,$lat,$failed,$events,$behind_end,$catchup,$notes" \
					>>"$OUT/throughput.csv"
				log "$tag: $tps tps, $per_event events/s${behind_end:+, $behind_end events behind at the end}${catchup:+, caught up in ${catchup}s}"
			done
		done
	done
}

# ---------------------------------------------------------------- part 3
part_latency() {
	local mode seq0 r tps lat failed stats achieved
	for mode in "${MODES[@]}"; do
		reset_ext
		set_mode "$mode"
		psql -d "$EXT_DB" -c CHECKPOINT
		seq0=$(max_seq)
		r=$(PGOPTIONS='-c search_path=task_events' run_pgbench "latency_$mode" "$EXT_DB" \
			create_task.pgbench "$MAIN_CLIENTS" "$SECONDS_RUN" --rate "$RATE")
		read -r tps lat failed <<<"$r"
		catch_up >/dev/null
		stats=$(q "$EXT_DB" "SELECT count(*), round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 3),
				round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 3), round(max(ms)::numeric, 3)
			FROM (SELECT 1000 * date_part('epoch', a.recorded_at - pg_xact_commit_timestamp(xid(e.xact_id))) AS ms
				  FROM task_events.events e JOIN task_events.audit_log a USING (event_id)
				  WHERE e.seq > $seq0) AS s" | tr '|' ' ')
		read -r events p50 p99 max <<<"$stats"
		achieved=$(awk -v e="$events" -v s="$SECONDS_RUN" 'BEGIN {printf "%.1f", e / s}')
		local slag
		slag=$(awk '/^rate limit schedule lag: avg/ {print $6}' "$RAW/latency_$mode.txt")
		echo "$mode,$MAIN_CLIENTS,$RATE,$SECONDS_RUN,$achieved,$events,$p50,$p99,$max,$lat,$slag" >>"$OUT/latency.csv"
		log "latency $mode: $achieved events/s, commit -> audit row p50 $p50 ms, p99 $p99 ms, max $max ms"
	done
	part_latency_pgq
}

# The same for PgQ: pgqd ticking, the consumers running; ev_txid in the
# queue's tables is the writer's transaction.
part_latency_pgq() {
	local r tps lat failed stats events p50 p99 max achieved slag
	pgq_reset
	psql -d "$BASE_DB" -c CHECKPOINT
	pgq_start
	r=$(run_pgbench latency_pgq "$BASE_DB" pgq_create_task.pgbench "$MAIN_CLIENTS" "$SECONDS_RUN" --rate "$RATE")
	read -r tps lat failed <<<"$r"
	pgq_catch_up "$(server_now)" >/dev/null ||
		die "the PgQ consumers did not catch up within ${CATCHUP_TIMEOUT}s (latency)"
	pgq_stop || die "a PgQ consumer failed (latency)"
	stats=$(q "$BASE_DB" "SELECT count(*), round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 3),
			round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 3), round(max(ms)::numeric, 3)
		FROM bench_pgq.commit_to_audit_ms() AS ms" | tr '|' ' ')
	read -r events p50 p99 max <<<"$stats"
	achieved=$(awk -v e="$events" -v s="$SECONDS_RUN" 'BEGIN {printf "%.1f", e / s}')
	slag=$(awk '/^rate limit schedule lag: avg/ {print $6}' "$RAW/latency_pgq.txt")
	echo "pgq,$MAIN_CLIENTS,$RATE,$SECONDS_RUN,$achieved,$events,$p50,$p99,$max,$lat,$slag" >>"$OUT/latency.csv"
	log "latency pgq: $achieved events/s, commit -> audit row p50 $p50 ms, p99 $p99 ms, max $max ms"
}

# ---------------------------------------------------------------- part 4
part_lag() {
	local mode seq0 r tps lat failed behind_end catchup events t0 samples
	for mode in "${MODES[@]}"; do
		reset_ext
		set_mode "$mode"
		psql -d "$EXT_DB" -c CHECKPOINT
		seq0=$(max_seq)
		t0=$(now_s)
		(
			while :; do
				q "$EXT_DB" "SELECT '$mode', round((date_part('epoch', clock_timestamp()) - $t0)::numeric, 2),
					coalesce(sum(events_behind), 0), round(coalesce(max(seconds_behind), 0)::numeric, 3)
					FROM task_events.handler_status" | tr '|' ',' >>"$OUT/lag_samples.csv"
				sleep 1
			done
		) &
		SAMPLER_PID=$!
		r=$(PGOPTIONS='-c search_path=task_events' run_pgbench "lag_$mode" "$EXT_DB" \
			create_task.pgbench "$MAIN_CLIENTS" "$LAG_SECONDS")
		kill "$SAMPLER_PID" 2>/dev/null || true
		wait "$SAMPLER_PID" 2>/dev/null || true
		SAMPLER_PID=
		behind_end=$(behind)
		catchup=$(catch_up)
		events=$(($(max_seq) - seq0))
		# Bounded: over the second half of the run the backlog grew by less
		# than 5% of the write rate (the workers drained at least 95% of it).
		samples=$(awk -F, -v m="$mode" '$1 == m {printf "%s(%s,%s,%s)", sep, $2, $3, $4; sep = ","}' \
			"$OUT/lag_samples.csv")
		[[ -n $samples ]] || samples="(0, 0, 0)"
		q "$EXT_DB" "WITH s AS (SELECT t::float8 AS t, b::float8 AS b, sb::float8 AS sb FROM (VALUES
				$samples) AS v(t, b, sb)),
			w AS (SELECT $events / $LAG_SECONDS.0 AS rate)
			SELECT '$mode', $MAIN_CLIENTS, $LAG_SECONDS, round(w.rate, 1), max(s.b), $behind_end,
				   round(max(s.sb)::numeric, 3),
				   round(coalesce(regr_slope(s.b, s.t) FILTER (WHERE s.t >= $LAG_SECONDS / 2.0), 0)::numeric, 1),
				   $catchup,
				   coalesce(regr_slope(s.b, s.t) FILTER (WHERE s.t >= $LAG_SECONDS / 2.0), 0) < 0.05 * w.rate
			FROM s, w GROUP BY w.rate" | tr '|' ',' >>"$OUT/lag.csv"
		log "lag $mode: $(tail -n 1 "$OUT/lag.csv")"
	done
}

# ---------------------------------------------------------------- parts 2, 5, 6
# The empty-log throughput, then the drain of a backlog (with the workers'
# memory around it), then the log filled to BENCH_LOG_EVENTS and the same
# throughput again.
part_drain_and_log() {
	local r tps lat failed seq0 t0 drain_s gen_s n events handlers

	reset_ext
	set_mode "$BEST_MODE"
	if [[ " $PARTS " == *" log "* ]]; then
		psql -d "$EXT_DB" -c CHECKPOINT
		r=$(PGOPTIONS='-c search_path=task_events' run_pgbench "log_empty" "$EXT_DB" \
			create_task.pgbench "$MAIN_CLIENTS" "$SECONDS_RUN")
		read -r tps lat failed <<<"$r"
		echo "empty,0,$BEST_MODE,$MAIN_CLIENTS,$SECONDS_RUN,$tps,$lat" >>"$OUT/log_size.csv"
		log "create_task on an empty log: $tps tps"
		catch_up >/dev/null
	fi

	# Part 2: a backlog written while the handlers are disabled, then the
	# time for the workers to handle all of it.
	if [[ " $PARTS " == *" drain "* ]]; then
		psql -d "$EXT_DB" -c 'UPDATE task_events.handlers SET enabled = false'
		seq0=$(max_seq)
		log "drain: writing a backlog of $DRAIN_EVENTS events (handlers disabled)"
		t0=$(now_s)
		gen_lifecycles "$DRAIN_EVENTS"
		gen_s=$(elapsed "$t0")
		events=$(($(max_seq) - seq0))
		psql -d "$EXT_DB" -c CHECKPOINT -c 'DROP TABLE IF EXISTS public.bench_handlers_before' \
			-c 'CREATE TABLE public.bench_handlers_before AS SELECT handler, processed, batches,
				coalesce(mean_batch_ms * batches, 0) AS batch_ms FROM task_events.handler_status'
		worker_memory before_drain
		handlers=$(q "$EXT_DB" 'SELECT count(*) FROM task_events.handlers')
		log "drain: $events events written in ${gen_s}s; enabling the $handlers handlers"
		# The commit of create_task wakes the workers at once.
		t0=$(now_s)
		psql -d "$EXT_DB" -c 'BEGIN' -c 'UPDATE task_events.handlers SET enabled = true' \
			-c "SELECT task_id FROM task_events.create_task('0', 'wake up')" -c 'COMMIT' >/dev/null
		drain_s=$(catch_up)
		n=$((events + 1))
		echo "$n,$handlers,$BEST_MODE,$gen_s,$drain_s,$(awk -v n="$n" -v s="$drain_s" 'BEGIN {printf "%.0f", n / s}'),$(awk -v n="$n" -v h="$handlers" -v s="$drain_s" 'BEGIN {printf "%.0f", n * h / s}')" \
			>>"$OUT/drain.csv"
		q "$EXT_DB" "SELECT a.handler, a.processed - b.processed, a.batches - b.batches,
				round(((a.mean_batch_ms * a.batches - b.batch_ms) / nullif(a.batches - b.batches, 0))::numeric, 2),
				round(a.max_batch_ms::numeric, 2)
			FROM task_events.handler_status a JOIN public.bench_handlers_before b USING (handler)
			ORDER BY a.handler" | tr '|' ',' >>"$OUT/drain_handlers.csv"
		worker_memory after_drain
		log "drain: $n events through $handlers handlers in ${drain_s}s"
		part_drain_pgq
	fi

	# Part 6: fill the log, handlers running, then measure again.
	if [[ " $PARTS " == *" log "* ]]; then
		n=$((LOG_EVENTS - $(max_seq)))
		if ((n > 0)); then
			log "log: filling the event log to $LOG_EVENTS events (handlers running)"
			t0=$(now_s)
			gen_lifecycles "$n"
			log "log: written in $(elapsed "$t0")s; waiting for the handlers"
			log "log: handlers caught up $(catch_up)s after the last write"
		fi
		log "log: VACUUM ANALYZE and CHECKPOINT"
		psql -d "$EXT_DB" -c 'VACUUM (ANALYZE) task_events.events, task_events.tasks, task_events.audit_log,
			task_events.notifications, task_events.analytics_counters, task_events.completion_stats,
			task_events.handler_state' -c CHECKPOINT
		events=$(q "$EXT_DB" 'SELECT count(*) FROM task_events.events')
		r=$(PGOPTIONS='-c search_path=task_events' run_pgbench "log_full" "$EXT_DB" \
			create_task.pgbench "$MAIN_CLIENTS" "$SECONDS_RUN")
		read -r tps lat failed <<<"$r"
		echo "full,$events,$BEST_MODE,$MAIN_CLIENTS,$SECONDS_RUN,$tps,$lat" >>"$OUT/log_size.csv"
		log "create_task with $events events in the log: $tps tps"
		catch_up >/dev/null
		worker_memory after_log_fill
	fi
}

# The drain for PgQ: a backlog of the same size written with pgqd ticking
# and the consumers stopped (the ticks made while it was written are its
# batches), then the consumers started and timed until they have handled
# every event.
part_drain_pgq() {
	local t0 gen_s at drain_s n
	pgq_reset
	pgq_start_ticker
	log "drain (PgQ): writing a backlog of $DRAIN_EVENTS events (consumers stopped)"
	t0=$(now_s)
	gen_lifecycles "$DRAIN_EVENTS" bench_pgq
	gen_s=$(elapsed "$t0")
	n=$(pgq_events)
	# A tick after the last commit, so that the backlog is all in batches.
	at=$(server_now)
	t0=$(now_s)
	while [[ $(q "$BASE_DB" "SELECT bench_pgq.ticked_after('$at')") != t ]]; do
		timed_out "$t0" && die "pgqd did not tick within ${CATCHUP_TIMEOUT}s"
		sleep 0.1
	done
	psql -d "$BASE_DB" -c CHECKPOINT
	log "drain (PgQ): $n events written in ${gen_s}s; starting the 3 consumers"
	t0=$(now_s)
	pgq_start_consumers
	pgq_catch_up "$at" >/dev/null || die "the PgQ consumers did not drain the backlog within ${CATCHUP_TIMEOUT}s"
	drain_s=$(elapsed "$t0")
	pgq_stop || die "a PgQ consumer failed (drain)"
	echo "$n,3,pgq,$gen_s,$drain_s,$(awk -v n="$n" -v s="$drain_s" 'BEGIN {printf "%.0f", n / s}'),$(awk -v n="$n" -v s="$drain_s" 'BEGIN {printf "%.0f", n * 3 / s}')" \
		>>"$OUT/drain.csv"
	log "drain (PgQ): $n events through 3 consumers in ${drain_s}s"
}

# ---------------------------------------------------------------- run
START=$(now_s)
init_csv
for part in $PARTS; do
	case $part in
	throughput | latency | lag) ;;
	drain | log | subscriptions | lanes) continue ;;
	*) die "unknown part $part (BENCH_PARTS)" ;;
	esac
	log "==== $part"
	"part_$part"
done
if [[ " $PARTS " == *" drain "* || " $PARTS " == *" log "* ]]; then
	log "==== drain / log size"
	part_drain_and_log
fi
# Their own servers (this one stays up, idle), with the sizes of a smoke run
# when BENCH_SMOKE is set.
if [[ " $PARTS " == *" subscriptions "* ]]; then
	log "==== subscriptions"
	if [[ $SMOKE == 1 ]]; then
		export BENCH_SUB_EVENTS=${BENCH_SUB_EVENTS:-3000} BENCH_SUB_POST_EVENTS=${BENCH_SUB_POST_EVENTS:-300} \
			BENCH_SUB_CHUNK=${BENCH_SUB_CHUNK:-1000}
	fi
	PG_BIN=$PG_BIN BENCH_OUT=$OUT bash "$BENCH/subscriptions.sh"
fi
if [[ " $PARTS " == *" lanes "* ]]; then
	log "==== lanes"
	[[ $SMOKE == 1 ]] && export BENCH_LANES_EVENTS=${BENCH_LANES_EVENTS:-200}
	PG_BIN=$PG_BIN BENCH_OUT=$OUT bash "$BENCH/handler_lanes.sh"
fi
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/machine.txt"
echo "bench duration: $(elapsed "$START") s" >>"$OUT/machine.txt"
log "measurements done in $(elapsed "$START")s"

# ---------------------------------------------------------------- report
# report.sql reads the CSV files from the current directory.
(cd "$OUT" && "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -d postgres -v main_clients="$MAIN_CLIENTS" \
	-v drain_target=80000 -f "$BENCH/report.sql") | tee "$OUT/report.md"

if (($(wc -l <"$OUT/throughput.csv") <= 1)); then
	log "no throughput measured: no plot"
elif command -v gnuplot >/dev/null; then
	gnuplot -e "datafile='$OUT/throughput.csv'; outfile='$OUT/throughput.png'" "$BENCH/plot.gp"
	log "plot written to $OUT/throughput.png"
else
	log "gnuplot is not installed: no plot (bench/run.sh installs gnuplot-nox)"
fi
log "results in $OUT"
