#!/usr/bin/env bash
# Subscriptions (issue 14): how fast a backlog drains to consumers outside
# the database.
#
#   bench/subscriptions.sh                                   # 1,000,000 events
#   BENCH_SUB_EVENTS=20000 bench/subscriptions.sh            # a quick look
#
# One throwaway server (scripts/pg-temp.sh), not preloaded: no worker runs,
# so the figures are the consumers' and the server's alone (reading a
# subscription needs no worker).  Three subscriptions are created, then
# BENCH_SUB_EVENTS events written (create_task, BENCH_SUB_CHUNK per
# transaction); each subscription's backlog is then drained by one client:
#   sql    a libpq client (python3-psycopg) that reads 1,000-event batches
#          (every column of read_batch to the client) and acknowledges each,
#          with synchronous_commit = off as the README suggests;
#   jsonl  task_events_consume --jsonl --batch 1000 --once > /dev/null;
#   post   task_events_consume --post to a local HTTP server that answers
#          200 at once, BENCH_SUB_POST_EVENTS events only (one request per
#          event: the server's speed is part of the figure).
# Prints one line per consumer and, with BENCH_OUT, writes
# $BENCH_OUT/subscriptions.csv (consumer,events,seconds,events_per_s,
# client_cpu_s,client_cpu_us_per_event).  Needs the extension and task_events_consume
# installed in PG_BIN's PostgreSQL (make install), python3 and psycopg 3.
# Run it alone on the machine.
#
# Environment:
#   PG_BIN=/usr/lib/postgresql/15/bin   PostgreSQL 15 binaries
#   BENCH_SUB_EVENTS=1000000            events in the backlog
#   BENCH_SUB_POST_EVENTS=20000         events delivered with --post
#   BENCH_SUB_CHUNK=50000               events per writing transaction
#   BENCH_OUT                           where subscriptions.csv goes
set -euo pipefail

BENCH=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd -- "$BENCH/.." && pwd)
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
EVENTS=${BENCH_SUB_EVENTS:-1000000}
POST_EVENTS=${BENCH_SUB_POST_EVENTS:-20000}
CHUNK=${BENCH_SUB_CHUNK:-50000}
DB=bench_sub
CONSUME=$PG_BIN/task_events_consume
# Debian's python3 (python3-psycopg), not one a version manager puts first on PATH.
PYTHON=/usr/bin/python3

PG_TEMP_BIN=$PG_BIN
# shellcheck source=scripts/pg-temp.sh
. "$ROOT/scripts/pg-temp.sh"

log() { printf '%s subscriptions: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
	printf 'subscriptions: %s\n' "$*" >&2
	exit 1
}

[[ -x $CONSUME ]] || die "$CONSUME not found: run make install"
"$PYTHON" -c 'import psycopg' 2>/dev/null || die "python3 with psycopg 3 is needed (python3-psycopg)"
((POST_EVENTS <= EVENTS)) || POST_EVENTS=$EVENTS

WORK=$(mktemp -d /tmp/task_events_bench_sub.XXXXXX)
HTTP_PID=
cleanup() {
	[[ -z $HTTP_PID ]] || kill "$HTTP_PID" 2>/dev/null || true
	pg_temp_cleanup
	rm -rf -- "$WORK"
}
trap cleanup EXIT
pg_temp_chown "$WORK"

log "starting a throwaway server in $WORK/data"
pg_temp_start "$WORK/data" "task_events.notify_mode = off" "shared_buffers = 512MB" \
	"max_wal_size = 8GB" "checkpoint_timeout = 30min"
q() { "$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -d "$DB" -c "$@"; }
"$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE $DB"
q 'CREATE EXTENSION task_events'
for s in sql jsonl post; do
	q "SELECT task_events.create_subscription('bench_$s')" >/dev/null
done

log "writing $EVENTS events"
for ((done_ = 0; done_ < EVENTS; done_ += CHUNK)); do
	n=$((EVENTS - done_ < CHUNK ? EVENTS - done_ : CHUNK))
	q "SELECT count(*) FROM pg_catalog.generate_series(1, $n) i,
		task_events.create_task('user' || i % 1000, 'Benchmark task', NULL)" >/dev/null
done
q 'VACUUM ANALYZE task_events.events'
[[ $(q "SELECT count(*) FROM task_events.events") == "$EVENTS" ]] || die "the backlog is not $EVENTS events"

CSV=${BENCH_OUT:+$BENCH_OUT/subscriptions.csv}
[[ -z $CSV ]] || echo 'consumer,events,seconds,events_per_s,client_cpu_s,client_cpu_us_per_event' >"$CSV"
# measure NAME EVENTS COMMAND...: run the consumer (its stderr to a file),
# check that it acknowledged the whole backlog, print and record the rate
# over EVENTS and the client's CPU time (bash's time: user + system).
measure() {
	local name=$1 n=$2 secs cpu acked rate per_event TIMEFORMAT='%R %U %S'
	shift 2
	{ time "$@" >/dev/null 2>"$WORK/$name.err"; } 2>"$WORK/$name.time" ||
		die "$name: the consumer failed: $(tail -n 3 "$WORK/$name.err")"
	read -r secs cpu < <(awk '{printf "%s %.2f\n", $1, $2 + $3}' "$WORK/$name.time")
	acked=$(q "SELECT sum(acknowledged) FROM task_events.subscription_status WHERE subscription = 'bench_$name'")
	((acked == EVENTS)) || die "$name: $acked of $EVENTS events acknowledged"
	rate=$(awk -v n="$n" -v s="$secs" 'BEGIN {printf "%.0f", n / s}')
	per_event=$(awk -v n="$n" -v c="$cpu" 'BEGIN {printf "%.1f", c * 1e6 / n}')
	log "$name: $n events in ${secs}s, $rate events/s, client CPU ${cpu}s (${per_event} us/event)"
	[[ -z $CSV ]] || echo "$name,$n,$secs,$rate,$cpu,$per_event" >>"$CSV"
}

conninfo="host=$PGHOST port=$PGPORT user=$PGUSER dbname=$DB"
measure sql "$EVENTS" "$PYTHON" - "$conninfo" <<'PY'
import sys
import psycopg

with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    # At-least-once delivery, as task_events_consume (README, "Acknowledging").
    conn.execute("SET synchronous_commit = off")
    while True:
        rows = conn.execute("SELECT * FROM task_events.read_batch('bench_sql', 1000)").fetchall()
        if not rows:
            break
        conn.execute("SELECT task_events.ack_batch('bench_sql', %s)", (rows[0][0],))
PY
measure jsonl "$EVENTS" "$CONSUME" -d "$conninfo" -s bench_jsonl --jsonl --batch 1000 --once

# The webhook: answers 200 at once, to POSTs, until killed.
"$PYTHON" - >"$WORK/http.port" <<'PY' &
import http.server, sys

class Ok(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", 0), Ok)
print(server.server_address[1], flush=True)
server.serve_forever()
PY
HTTP_PID=$!
for _ in $(seq 1 100); do
	[[ -s $WORK/http.port ]] && break
	sleep 0.05
done
[[ -s $WORK/http.port ]] || die "the local HTTP server did not start"
# --post delivers the last POST_EVENTS events: the others are acknowledged
# first, in reads of at most 100,000 (read_batch's limit).
for ((left = EVENTS - POST_EVENTS; left > 0; left -= n)); do
	n=$((left < 100000 ? left : 100000))
	q "SELECT task_events.ack_batch('bench_post', (SELECT min(batch_id)
		FROM task_events.read_batch('bench_post', $n)))" >/dev/null
done
measure post "$POST_EVENTS" "$CONSUME" -d "$conninfo" -s bench_post --post "http://127.0.0.1:$(cat "$WORK/http.port")/" \
	--batch 1000 --once
