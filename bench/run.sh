#!/usr/bin/env bash
# The task_events benchmark, full run: sudo bench/run.sh
#
# Installs what is missing (PostgreSQL 15, build tools, PgQ and pgqd through
# scripts/install-deps.sh, gnuplot-nox for the plot), builds and installs the
# extension, then runs bench/bench.sh: one throwaway server, every
# measurement of issue 4, a comparison table on stdout, and in bench/results/
# the CSV files, report.md and throughput.png.  Takes 40 to 60 minutes with
# the defaults; see bench/bench.sh for the BENCH_* settings (e.g.
# BENCH_SECONDS=5 BENCH_LOG_EVENTS=2000000 for a quicker look).
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config

if [[ $EUID -ne 0 ]]; then
	echo "run.sh: run as root (sudo bench/run.sh): it installs packages and the extension" >&2
	exit 1
fi

bash "$ROOT/scripts/install-deps.sh"
if ! command -v gnuplot >/dev/null; then
	echo "run.sh: installing gnuplot-nox (for bench/results/throughput.png)"
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gnuplot-nox
fi

make -C "$ROOT" PG_CONFIG="$PG_CONFIG" -j"$(nproc)"
make -C "$ROOT" PG_CONFIG="$PG_CONFIG" install

exec bash "$ROOT/bench/bench.sh"
