#!/usr/bin/env bash
# Lines per second parsing a generated 1M-line nginx log (`combined` +
# $upstream_addr $upstream_status $request_time $upstream_response_time),
# single-threaded: accesslog's compiled log_format against a `regex`-crate
# parser extracting the same fields (the ipmanager seed's approach), in one
# run. Ends with:
#   RESULT name=accesslog lines_per_s=<ours> ratio_vs_regex=<regex time / ours>
# Targets (issue #4): lines_per_s >= 1000000 and ratio_vs_regex >= 5.
#
# Env: ACCESSLOG_BENCH_LINES (default 1000000), ACCESSLOG_BENCH_REPS (default 5),
#      BENCH_TIMEOUT (seconds, default 900, build included).
set -euo pipefail

cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "accesslog bench: cargo not found" >&2
    exit 1
fi

exec timeout --kill-after=10 "${BENCH_TIMEOUT:-900}" \
    cargo bench --quiet -p accesslog --bench parse
