#!/usr/bin/env bash
# Install the Debian 12 packages that building and testing task_events needs.
# Run as root.  Installs only what is missing, so a machine that already has
# everything never touches the network.
#
# Note: installing postgresql-15 may create and start a "main" cluster on port
# 5432, and installing prometheus and prometheus-postgres-exporter may start
# their services on ports 9090 and 9187.  Nothing in scripts/ uses them: every
# test server is a throwaway one on a unix socket in a temporary directory,
# and test/t/029 runs its own exporter on a free port.
set -euo pipefail

PG_MAJOR=15

PACKAGES=(
	build-essential                       # make, gcc
	perl                                  # prove, for the TAP tests
	"postgresql-$PG_MAJOR"                # server, initdb, psql, contrib (dblink)
	"postgresql-server-dev-$PG_MAJOR"     # PGXS, headers, pg_regress, pg_isolation_regress
	postgresql-contrib
	"postgresql-$PG_MAJOR-pgtap"          # the pgtap extension
	libtap-parser-sourcehandler-pgtap-perl # pg_prove
	libipc-run-perl                       # needed by PostgreSQL::Test::Cluster
	python3-psycopg                       # the subscription consumer of test/t/027 (a real client)
	uuid-dev                              # -luuid
	libcurl4-openssl-dev                  # task_events_consume --post (HTTP)
	libssl-dev                            # task_events_consume --post (HMAC-SHA256)
	libhttp-daemon-perl                   # the webhook of test/t/028_consume.pl
	prometheus-postgres-exporter          # scraped by test/t/029_prometheus.pl (contrib/prometheus/queries.yaml)
	prometheus                            # promtool, checks contrib/prometheus/alerts.yml in test/t/029
	"postgresql-$PG_MAJOR-pgq3"           # PgQ: the benchmark peer of bench/ (bench/pgq_baseline.sql)
	pgqd                                  # PgQ's ticker daemon: the benchmark peer of bench/
)

if [[ $EUID -ne 0 ]]; then
	echo "install-deps.sh: must run as root (it installs Debian packages)" >&2
	exit 1
fi

# True when dpkg knows the package as fully installed.
is_installed() {
	[[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
	is_installed "$pkg" || missing+=("$pkg")
done

if ((${#missing[@]} > 0)); then
	echo "install-deps.sh: installing ${missing[*]}"
	# A fresh machine may have no package lists at all, so update first.
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
else
	echo "install-deps.sh: all ${#PACKAGES[@]} packages already installed"
fi

# dblink ships inside postgresql-15 on Debian; fail here, not in the middle of
# the pgTAP suite, if that ever changes.
sharedir=/usr/share/postgresql/$PG_MAJOR/extension
for ext in dblink pgtap pgq; do
	if [[ ! -f $sharedir/$ext.control ]]; then
		echo "install-deps.sh: extension $ext not found in $sharedir after install" >&2
		exit 1
	fi
done
for tool in /usr/lib/postgresql/$PG_MAJOR/bin/pg_config /usr/bin/pg_prove /usr/bin/prove \
	/usr/bin/prometheus-postgres-exporter /usr/bin/promtool /usr/bin/pgqd; do
	if [[ ! -x $tool ]]; then
		echo "install-deps.sh: $tool missing after install" >&2
		exit 1
	fi
done
