# shellcheck shell=bash
# Throwaway PostgreSQL 15 servers for scripts and tests.  Source this file:
#
#   . scripts/pg-temp.sh
#   trap pg_temp_cleanup EXIT
#   pg_temp_start /tmp/x/data "shared_preload_libraries = 'task_events'"
#   psql -X -c 'select 1'          # PGHOST, PGPORT, PGUSER are exported
#   pg_temp_stop /tmp/x/data
#
# The server listens only on a unix socket in a private directory (no TCP), so
# it never conflicts with Debian's "main" cluster or another throwaway server.
# initdb and postgres refuse to run as root: as root, every server command
# runs as the OS user postgres (runuser); as any other user, as that user.
# The functions return non-zero on failure rather than exiting, and leave the
# caller's shell options alone.

PG_TEMP_BIN=${PG_TEMP_BIN:-/usr/lib/postgresql/15/bin}
PG_TEMP_OS_USER=${PG_TEMP_OS_USER:-postgres}
# Data directories started from this shell, for pg_temp_cleanup.
PG_TEMP_STARTED=()

# pg_temp_as_user [-C dir] cmd args...
# Run a command as the user that owns throwaway servers.  It runs from dir
# (default /): a cwd that user cannot read, such as /root, makes initdb fail.
pg_temp_as_user() {
	local dir=/
	if [[ ${1-} == -C ]]; then
		dir=$2
		shift 2
	fi
	if [[ $EUID -eq 0 ]]; then
		(cd "$dir" && runuser -u "$PG_TEMP_OS_USER" -- "$@")
	else
		(cd "$dir" && "$@")
	fi
}

# Give a path to the server user, so that it can write there.
pg_temp_chown() {
	if [[ $EUID -eq 0 ]]; then
		chown -R "$PG_TEMP_OS_USER:" "$@"
	fi
}

# Print a port that no TCP listener and no socket in the usual places uses.
# The server listens on neither, but clients and logs are less confusing
# when the number is unique on the machine.
_pg_temp_free_port() {
	local port _
	for _ in {1..100}; do
		port=$((20000 + RANDOM % 20000))
		[[ -e /var/run/postgresql/.s.PGSQL.$port || -e /tmp/.s.PGSQL.$port ]] && continue
		# A successful connect means something is listening.
		(exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && continue
		echo "$port"
		return 0
	done
	echo "pg-temp: no free port found" >&2
	return 1
}

# pg_temp_start <datadir> [postgresql.conf line...]
# initdb a new cluster in datadir (must not exist or be empty), configure it,
# start it and export PGHOST, PGPORT, PGUSER (and PG_TEMP_DATADIR) for clients.
# The server log is datadir/server.log; it is printed if the start fails.
pg_temp_start() {
	if [[ $# -lt 1 ]]; then
		echo "usage: pg_temp_start <datadir> [postgresql.conf line...]" >&2
		return 2
	fi
	local datadir port sockdir out line
	datadir=$(realpath -m -- "$1") || return 1
	shift
	if [[ -e $datadir && -n "$(ls -A -- "$datadir")" ]]; then
		echo "pg-temp: $datadir exists and is not empty" >&2
		return 1
	fi
	mkdir -p -- "$datadir" || return 1
	pg_temp_chown "$datadir" || return 1
	chmod 700 "$datadir" || return 1

	port=$(_pg_temp_free_port) || return 1

	# trust auth: only the owner (and root) can reach the socket directory.
	if ! out=$(pg_temp_as_user "$PG_TEMP_BIN/initdb" -D "$datadir" -U postgres \
		-A trust -E UTF8 --locale=C --no-sync 2>&1); then
		printf '%s\n' "$out" >&2
		echo "pg-temp: initdb failed in $datadir" >&2
		return 1
	fi

	# A socket path is limited to 107 bytes; use a short directory when the
	# data directory's own path is too long, and remember it for pg_temp_stop.
	if ((${#datadir} <= 80)); then
		sockdir=$datadir
	else
		sockdir=$(mktemp -d /tmp/pg_temp_sock.XXXXXX) || return 1
		pg_temp_chown "$sockdir" || return 1
		printf '%s\n' "$sockdir" >"$datadir/pg_temp_sockdir"
	fi

	{
		echo
		echo "# Added by scripts/pg-temp.sh: a socket-only throwaway server."
		echo "listen_addresses = ''"
		echo "port = $port"
		echo "unix_socket_directories = '${sockdir//\'/\'\'}'"
		# Throwaway data: durability buys nothing and costs time.
		echo "fsync = off"
		echo "full_page_writes = off"
		echo "log_line_prefix = '%m [%p] %q%a '"
		for line in "$@"; do
			printf '%s\n' "$line"
		done
	} >>"$datadir/postgresql.conf" || return 1

	# The server inherits PGHOST/PGPORT/PGUSER, so libpq inside it (dblink,
	# postgres_fdw) reaches this server by default, not Debian's on 5432.
	if ! pg_temp_as_user env PGHOST="$sockdir" PGPORT="$port" PGUSER=postgres \
		"$PG_TEMP_BIN/pg_ctl" -D "$datadir" -l "$datadir/server.log" -w -t 60 -s start; then
		echo "pg-temp: server in $datadir failed to start; its log:" >&2
		cat "$datadir/server.log" >&2 || true
		# pg_ctl may time out while the postmaster is still coming up.
		pg_temp_as_user "$PG_TEMP_BIN/pg_ctl" -D "$datadir" -m immediate -s stop >/dev/null 2>&1 || true
		return 1
	fi
	PG_TEMP_STARTED+=("$datadir")

	export PGHOST=$sockdir PGPORT=$port PGUSER=postgres PG_TEMP_DATADIR=$datadir
}

# pg_temp_stop <datadir>
# Stop the server (fast shutdown, immediate if that fails) and remove its
# separate socket directory if it had one.  The data directory is left for the
# caller to remove.  Safe to call on a server that is not running.
pg_temp_stop() {
	if [[ $# -ne 1 ]]; then
		echo "usage: pg_temp_stop <datadir>" >&2
		return 2
	fi
	local datadir rc=0 d kept=()
	datadir=$(realpath -m -- "$1") || return 1
	if [[ -f $datadir/postmaster.pid ]]; then
		if ! pg_temp_as_user "$PG_TEMP_BIN/pg_ctl" -D "$datadir" -m fast -w -t 60 -s stop; then
			pg_temp_as_user "$PG_TEMP_BIN/pg_ctl" -D "$datadir" -m immediate -w -s stop || rc=1
		fi
	fi
	if [[ -f $datadir/pg_temp_sockdir ]]; then
		rm -rf -- "$(cat "$datadir/pg_temp_sockdir")"
		rm -f -- "$datadir/pg_temp_sockdir"
	fi
	for d in "${PG_TEMP_STARTED[@]}"; do
		[[ $d == "$datadir" ]] || kept+=("$d")
	done
	PG_TEMP_STARTED=("${kept[@]}")
	return "$rc"
}

# Stop every server started from this shell.  Meant for `trap ... EXIT`:
# never fails, so it cannot mask the script's own exit status.
pg_temp_cleanup() {
	local d
	for d in "${PG_TEMP_STARTED[@]}"; do
		pg_temp_stop "$d" || echo "pg-temp: could not stop server in $d" >&2
	done
	return 0
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
	echo "pg-temp.sh is a library: source it (. scripts/pg-temp.sh), don't run it" >&2
	exit 2
fi
