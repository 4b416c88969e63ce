#!/usr/bin/env bash
# The long soak (issue 5): test/t/008_soak.pl for 10 minutes at 16 clients:
# a pgbench load with random rollbacks and savepoints while the workers are
# killed again and again, then the exact comparison of every handler's output
# with the event log.  Run as root, like scripts/test.sh (which it calls with
# only that test).
#
#   sudo scripts/soak.sh [SECONDS [CLIENTS]]     defaults: 600 16
set -euo pipefail
ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
export TE_SOAK_SECONDS=${1:-600} TE_SOAK_CLIENTS=${2:-16}
export TE_ONLY=TAP TE_TAP=008_soak TE_SUITE_TIMEOUT=$((TE_SOAK_SECONDS / 60 + 15))m
exec bash "$ROOT/scripts/test.sh"
