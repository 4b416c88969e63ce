#!/usr/bin/env bash
# Handler lanes (issue 14): how much faster a slow handler drains a backlog
# in 4 lanes than in 1.
#
#   bench/handler_lanes.sh                                   # 2,000 events
#   BENCH_LANES_EVENTS=200 bench/handler_lanes.sh            # a quick look
#
# One throwaway server (scripts/pg-temp.sh), preloaded, with 4 workers.  The
# built-in handlers are paused; two handlers are registered paused, each
# taking BENCH_LANES_SLEEP seconds per event (pg_sleep: no CPU), one in 1
# lane and one in 4 (set_handler_lanes).  BENCH_LANES_EVENTS events are
# written (one transaction); then each handler in turn is resumed and timed
# until it has handled them all (handler_state.processed over its lanes).
# Prints events/s per lane count and the ratio of 4 lanes to 1, and with
# BENCH_OUT writes $BENCH_OUT/handler_lanes.csv (lanes,events,seconds,
# events_per_s).  Needs the extension installed in PG_BIN's PostgreSQL
# (make install).  Run it alone on the machine.
#
# Environment:
#   PG_BIN=/usr/lib/postgresql/15/bin   PostgreSQL 15 binaries
#   BENCH_LANES_EVENTS=2000             events in the backlog
#   BENCH_LANES_SLEEP=0.001             seconds the handler sleeps per event
#   BENCH_OUT                           where handler_lanes.csv goes
set -euo pipefail

BENCH=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd -- "$BENCH/.." && pwd)
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
EVENTS=${BENCH_LANES_EVENTS:-2000}
SLEEP=${BENCH_LANES_SLEEP:-0.001}
DB=bench_lanes

PG_TEMP_BIN=$PG_BIN
# shellcheck source=scripts/pg-temp.sh
. "$ROOT/scripts/pg-temp.sh"

log() { printf '%s handler_lanes: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
	printf 'handler_lanes: %s\n' "$*" >&2
	exit 1
}

WORK=$(mktemp -d /tmp/task_events_bench_lanes.XXXXXX)
cleanup() {
	pg_temp_cleanup
	rm -rf -- "$WORK"
}
trap cleanup EXIT
pg_temp_chown "$WORK"

log "starting a throwaway server in $WORK/data"
# A short poll interval: resume_handler() does not wake the workers.
pg_temp_start "$WORK/data" "shared_preload_libraries = 'task_events'" \
	"task_events.worker_count = 4" "task_events.poll_interval = 10" \
	"task_events.notify_mode = off"
q() { "$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -d "$DB" -c "$@"; }
"$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE $DB"
q 'CREATE EXTENSION task_events'
q "SELECT count(task_events.pause_handler(h.handler)) FROM task_events.handlers h" >/dev/null
q "CREATE FUNCTION public.slow_handler(events task_events.events[]) RETURNS void
	LANGUAGE plpgsql AS \$\$
	BEGIN
		FOR i IN 1 .. pg_catalog.cardinality(events) LOOP
			PERFORM pg_catalog.pg_sleep($SLEEP);
		END LOOP;
	END \$\$"
for lanes in 1 4; do
	q "BEGIN;
	   SELECT task_events.register_handler('lanes_$lanes', 'public.slow_handler(task_events.events[])');
	   SELECT task_events.pause_handler('lanes_$lanes');
	   SELECT task_events.set_handler_lanes('lanes_$lanes', $lanes);
	   COMMIT" >/dev/null
done

log "writing $EVENTS events"
q "SELECT count(*) FROM pg_catalog.generate_series(1, $EVENTS) i,
	task_events.create_task('user' || i % 100, 'Benchmark task', NULL)" >/dev/null
[[ $(q "SELECT count(*) FROM task_events.events") == "$EVENTS" ]] || die "the backlog is not $EVENTS events"

CSV=${BENCH_OUT:+$BENCH_OUT/handler_lanes.csv}
[[ -z $CSV ]] || echo 'lanes,events,seconds,events_per_s' >"$CSV"
declare -A rate
for lanes in 1 4; do
	h=lanes_$lanes
	start=$(date +%s.%N)
	q "SELECT task_events.resume_handler('$h')" >/dev/null
	until [[ $(q "SELECT COALESCE(sum(processed), 0) >= $EVENTS FROM task_events.handler_state
				  WHERE handler = '$h'") == t ]]; do
		sleep 0.02
	done
	end=$(date +%s.%N)
	q "SELECT task_events.pause_handler('$h')" >/dev/null
	workers=$(q "SELECT count(*) FROM task_events.handler_state WHERE handler = '$h' AND processed > 0")
	secs=$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.3f", b - a}')
	rate[$lanes]=$(awk -v n="$EVENTS" -v s="$secs" 'BEGIN {printf "%.0f", n / s}')
	log "$lanes lane(s): $EVENTS events in ${secs}s, ${rate[$lanes]} events/s ($workers lane(s) handled some)"
	[[ -z $CSV ]] || echo "$lanes,$EVENTS,$secs,${rate[$lanes]}" >>"$CSV"
done
[[ $(q "SELECT count(*) FROM task_events.dead_letters") == 0 ]] || die "dead letters"
log "4 lanes / 1 lane: $(awk -v a="${rate[4]}" -v b="${rate[1]}" 'BEGIN {printf "%.2f", a / b}')x"
