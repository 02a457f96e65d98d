#!/usr/bin/env bash
# What IP rules cost the data plane, in one run on loopback (no root):
#   - connections per second through a listener whose accept-time Guard
#     checks a 100k-rule deny policy, against a plain accept() loop
#     (median of rounds, interleaved);
#   - the time from AutoBlock::record returning a ban to that client's next
#     connection being reset (median of 21).
# Ends with:
#   RESULT name=rules_dataplane ratio_100k_rules_vs_none=<guarded/plain cps> ban_enforce_ms=<ms> …
#
# Env: DATAPLANE_RULES (default 100000), DATAPLANE_CONNS per round (20000),
#      DATAPLANE_ROUNDS (5), DATAPLANE_CONCURRENCY (32),
#      BENCH_TIMEOUT (seconds, default 900, build included).
set -euo pipefail
cd "$(dirname "$0")/.."

exec timeout --kill-after=10 "${BENCH_TIMEOUT:-900}" \
    cargo run --quiet --release -p gateway --example dataplanebench -- \
    "${DATAPLANE_RULES:-100000}" "${DATAPLANE_CONNS:-20000}" \
    "${DATAPLANE_ROUNDS:-5}" "${DATAPLANE_CONCURRENCY:-32}"
