#!/usr/bin/env bash
# CI smoke run of the benchmark (scripts/test.sh runs it as the OS user
# postgres, after make install): every part of bench/bench.sh with tiny sizes,
# in well under two minutes.  It checks that each part produced numbers, never
# what they are: timings never fail CI.  Exits non-zero only when the bench
# itself is broken.
set -euo pipefail

BENCH=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
OUT=$(mktemp -d /tmp/task_events_bench_smoke.XXXXXX)
trap 'rm -rf -- "$OUT"' EXIT

BENCH_SMOKE=1 BENCH_OUT=$OUT bash "$BENCH/bench.sh"

passed=0 failed=0
# check NAME FILE MIN_ROWS AWK_CONDITION [AWK_FILTER]: FILE has at least
# MIN_ROWS data rows (of those the filter selects, if given) and every one of
# them satisfies the condition (fields split on commas).
check() {
	local name=$1 file=$OUT/$2 min=$3 cond=$4 filter=${5:-1} rows bad
	rows=$(awk -F, "NR > 1 && ($filter)" "$file" | wc -l)
	bad=$(awk -F, "NR > 1 && ($filter) && !($cond)" "$file" | head -n 3)
	if ((rows >= min)) && [[ -z $bad ]]; then
		passed=$((passed + 1))
		echo "ok: $name ($rows rows)"
	else
		failed=$((failed + 1))
		echo "FAILED: $name: $rows rows (at least $min expected)${bad:+; rows without numbers: $bad}"
	fi
}
num='^[0-9]+(\.[0-9]+)?$'
check "throughput" throughput.csv 16 "(\$5 ~ /$num/ && \$5 > 0) || \$12 == \"notify_mode not available\""
check "extension runs caught up" throughput.csv 14 "\$2 !~ /^ext/ || \$12 != \"\" || \$11 ~ /$num/"
check "PgQ throughput, consumers caught up" throughput.csv 2 "\$5 ~ /$num/ && \$5 > 0 && \$11 ~ /$num/" "\$2 == \"pgq\""
check "PgQ latency" latency.csv 1 "\$6 > 0 && \$7 ~ /$num/ && \$8 ~ /$num/ && \$9 ~ /$num/" "\$1 == \"pgq\""
check "latency" latency.csv 1 "\$7 ~ /$num/ && \$8 ~ /$num/ && \$9 ~ /$num/"
check "lag" lag.csv 1 "\$4 ~ /$num/ && \$5 ~ /$num/ && (\$10 == \"t\" || \$10 == \"f\")"
check "drain" drain.csv 1 "\$6 ~ /$num/ && \$6 > 0"
check "PgQ drain" drain.csv 1 "\$1 > 0 && \$6 ~ /$num/ && \$6 > 0" "\$3 == \"pgq\""
check "drain per handler" drain_handlers.csv 3 "\$2 ~ /$num/ && \$2 > 0"
check "worker memory" memory.csv 2 "\$3 ~ /$num/ && \$4 ~ /$num/"
check "log size" log_size.csv 2 "\$6 ~ /$num/ && \$6 > 0"
check "subscriptions" subscriptions.csv 3 "\$4 ~ /$num/ && \$4 > 0"
check "handler lanes" handler_lanes.csv 2 "\$3 ~ /$num/ && \$4 ~ /$num/ && \$4 > 0"
if grep -q '^## Targets' "$OUT/report.md" && grep -q 'relay >= 1.5x PgQ (.*| [0-9.]*× |' "$OUT/report.md"; then
	passed=$((passed + 1))
	echo "ok: report"
else
	failed=$((failed + 1))
	echo "FAILED: report.md has no targets table, or no relay / PgQ ratio in it"
fi
echo "bench smoke: $passed passed, $failed failed"
((failed == 0))
