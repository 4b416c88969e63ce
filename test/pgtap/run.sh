#!/usr/bin/env bash
# The pgTAP suite: pg_prove runs test/pgtap/*.sql (or the files given) in a
# database with pgtap, dblink and task_events, on a throwaway server set up
# like pg_regress's (test/regress.conf; task_events is not preloaded, so no
# worker runs and notify_mode is commit, which the files rely on).
# `make pgtap` calls this; any user can, once task_events is installed into
# the PostgreSQL that PG_CONFIG names (default: pg_config on PATH).
#
# The server: pg_virtualenv (postgresql-common) when that PostgreSQL is the
# system's, /usr/lib/postgresql/<major>.  pg_virtualenv only runs the
# system's binaries, so for a private copy (TE_PG_BIN of scripts/test.sh,
# the instrumented servers of scripts/sanitize.sh and scripts/valgrind.sh)
# it is that copy's initdb and pg_ctl, through scripts/pg-temp.sh, with the
# data directory and its server.log in ./tmp_check_pgtap (kept for the
# sanitizers' scan of the logs; make clean removes it).
set -euo pipefail

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd -- "$HERE/../.." && pwd)
DB=task_events_pgtap

# Inside the server's environment (PGHOST, PGPORT, PGUSER set).
if [[ ${1-} == --in-server ]]; then
	shift
	psql -X -q -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE $DB"
	psql -X -q -v ON_ERROR_STOP=1 -d "$DB" -c 'CREATE EXTENSION pgtap' \
		-c 'CREATE EXTENSION dblink' -c 'CREATE EXTENSION task_events'
	exec pg_prove -d "$DB" "$@"
fi

PG_CONFIG=${PG_CONFIG:-pg_config}
BINDIR=$("$PG_CONFIG" --bindir)
MAJOR=$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
export PATH="$BINDIR:$PATH" # psql, and the psql pg_prove runs
DATA=$PWD/tmp_check_pgtap
if (($# == 0)); then
	cd -- "$ROOT"
	set -- test/pgtap/*.sql
fi

if [[ $BINDIR == "/usr/lib/postgresql/$MAJOR/bin" ]] && command -v pg_virtualenv >/dev/null; then
	# -t: a temporary cluster directory even as root (not /etc/postgresql).
	exec pg_virtualenv -t -v "$MAJOR" -o "include=$ROOT/test/regress.conf" \
		bash "${BASH_SOURCE[0]}" --in-server "$@"
fi

rm -rf -- "$DATA"
# shellcheck disable=SC2034 # read by pg-temp.sh
PG_TEMP_BIN=$BINDIR
# shellcheck source=scripts/pg-temp.sh
. "$ROOT/scripts/pg-temp.sh"
trap pg_temp_cleanup EXIT
pg_temp_start "$DATA" "include = '${ROOT//\'/\'\'}/test/regress.conf'"
rc=0
bash "${BASH_SOURCE[0]}" --in-server "$@" || rc=$?
if ((rc != 0)); then
	echo "----- last lines of the server log, $DATA/server.log -----"
	tail -n 100 "$DATA/server.log" || true
fi
pg_temp_stop "$DATA"
exit "$rc"
