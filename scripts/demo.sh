#!/usr/bin/env bash
# Show task_events working: build and install it, start a throwaway server,
# run scripts/demo.sql while a second client LISTENs on channel task_events,
# then print what that client received.  Run as root (sudo scripts/demo.sh).
# With --psql, end in an interactive psql on the throwaway server (database
# postgres, where the extension is not created yet: the README's first
# session); the server is removed when psql exits.
#
# Environment:
#   TE_PRELOAD=0  start the server without shared_preload_libraries = 'task_events'
#                 (no background workers; events are then left unhandled)
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
PG_BIN=/usr/lib/postgresql/15/bin
PG_CONFIG=$PG_BIN/pg_config
DB=task_events_demo
DEMO_SQL=$ROOT/scripts/demo.sql
LISTENER_APP=task_events_demo_listener
# The listener gives up after this many seconds even if the demo never ends.
LISTEN_LIMIT=50

OPEN_PSQL=0
case ${1:-} in
--psql) OPEN_PSQL=1 ;;
"") ;;
*)
	echo "usage: scripts/demo.sh [--psql]" >&2
	exit 2
	;;
esac

if [[ $EUID -ne 0 ]]; then
	echo "demo.sh: run as root (sudo scripts/demo.sh): it installs packages and the extension" >&2
	exit 1
fi

bash "$ROOT/scripts/install-deps.sh"
make -C "$ROOT" PG_CONFIG="$PG_CONFIG" -j"$(nproc)"
make -C "$ROOT" PG_CONFIG="$PG_CONFIG" install

# shellcheck source=scripts/pg-temp.sh
. "$ROOT/scripts/pg-temp.sh"

TMP=$(mktemp -d /tmp/task_events_demo.XXXXXX)
LISTENER_PID=
cleanup() {
	if [[ -n $LISTENER_PID ]]; then
		kill "$LISTENER_PID" 2>/dev/null || true
		wait "$LISTENER_PID" 2>/dev/null || true
	fi
	pg_temp_cleanup
	rm -rf -- "$TMP"
}
trap cleanup EXIT
pg_temp_chown "$TMP"

conf=()
if [[ ${TE_PRELOAD:-1} == 1 ]]; then
	conf+=("shared_preload_libraries = 'task_events'")
fi
pg_temp_start "$TMP/data" "${conf[@]}"
DATADIR=$PG_TEMP_DATADIR

# Clients run as root: they reach the socket and can read the repo's files.
psql() { "$PG_BIN/psql" -X -v ON_ERROR_STOP=1 "$@"; }

psql -q -d postgres -c "CREATE DATABASE $DB"
psql -d "$DB" -e -c 'CREATE EXTENSION task_events'

# The worker connects to $DB, which did not exist when the server started:
# it retries by itself; wait until it is in, so the demo shows live handling.
if [[ ${TE_PRELOAD:-1} == 1 ]]; then
	for _ in $(seq 1 300); do
		n=$(psql -At -d "$DB" -c "SELECT count(*) FROM pg_stat_activity
			WHERE backend_type = 'task_events worker' AND datname = current_database()")
		[[ $n -ge 1 ]] && break
		sleep 0.1
	done
	echo "task_events worker connected to $DB"
fi

if [[ ! -f $DEMO_SQL ]]; then
	echo
	echo "Note: $DEMO_SQL does not exist yet; nothing more to show."
	exit 0
fi

# The listener: LISTEN, then one statement that waits until this script
# creates the file demo_done in the data directory (pg_stat_file is relative to
# it).  Notifications reach a client only between statements, so psql prints
# them right after that wait ends, i.e. after the demo has committed.
PGAPPNAME=$LISTENER_APP psql -q -d "$DB" -v "limit=$LISTEN_LIMIT" \
	>"$TMP/listener.out" 2>&1 <<'SQL' &
SET demo.listen_limit = :'limit';
LISTEN task_events;
DO $$
DECLARE
	deadline timestamptz := pg_catalog.clock_timestamp()
		+ pg_catalog.current_setting('demo.listen_limit')::int * interval '1 second';
BEGIN
	WHILE pg_catalog.pg_stat_file('demo_done', true) IS NULL
		AND pg_catalog.clock_timestamp() < deadline
	LOOP
		PERFORM pg_catalog.pg_sleep(0.05);
	END LOOP;
END
$$;
SQL
LISTENER_PID=$!

# Start the demo only once the listener is inside its wait: its LISTEN has
# committed by then, so it cannot miss a notification.
for ((i = 0; ; i++)); do
	active=$(psql -At -d "$DB" -v "app=$LISTENER_APP" <<'SQL'
SELECT count(*) FROM pg_catalog.pg_stat_activity
WHERE application_name = :'app' AND state = 'active' AND query LIKE 'DO%';
SQL
	)
	[[ $active == 1 ]] && break
	if ! kill -0 "$LISTENER_PID" 2>/dev/null || ((i >= 200)); then
		echo "demo.sh: the listening client did not start; its output:" >&2
		cat "$TMP/listener.out" >&2
		exit 1
	fi
	sleep 0.05
done

echo
echo "==== Running $DEMO_SQL"
demo_rc=0
psql -d "$DB" -e -f "$DEMO_SQL" || demo_rc=$?

# Release the listener and collect what it printed.
pg_temp_as_user touch "$DATADIR/demo_done"
listener_rc=0
wait "$LISTENER_PID" || listener_rc=$?
LISTENER_PID=
echo
echo "==== What a listening client received:"
if grep -q . "$TMP/listener.out"; then
	cat "$TMP/listener.out"
else
	echo "(nothing)"
fi

if ((demo_rc != 0)); then
	echo "demo.sh: $DEMO_SQL failed (psql exit $demo_rc)" >&2
	exit "$demo_rc"
fi
if ((listener_rc != 0)); then
	echo "demo.sh: the listening client failed (psql exit $listener_rc)" >&2
	exit "$listener_rc"
fi
if ((OPEN_PSQL == 1)); then
	echo
	echo "==== psql on the demo's server (database postgres); \\q ends it and removes the server"
	psql -d postgres || true
fi
