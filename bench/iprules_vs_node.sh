#!/usr/bin/env bash
# iprules against Node's net.BlockList on the same rules and queries.
#
# Mix: 45% IPv4 subnets /24–/32, 45% IPv4 ranges of 1–256 addresses, 10%
# IPv6 subnets /32–/64; half the queries fall inside a rule. Both sides read
# the same files; their hit counts must agree or the script fails.
# Medians over several rounds; Node skips 1M rules (~70 ms per check there).
# Ends with: RESULT name=iprules ns_per_check_100k=… ratio_vs_node_10k=… build_100k_ms=… bytes_per_rule_100k=…
set -euo pipefail
cd "$(dirname "$0")/.."
command -v node >/dev/null || { echo "node is not installed: cannot run the peer" >&2; exit 1; }

cargo build --quiet --release -p iprules --example rulebench
bin="${CARGO_TARGET_DIR:-target}/release/examples/rulebench"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

declare -A Q=([10]=100000 [1000]=20000 [10000]=4000 [100000]=400 [1000000]=100000)
declare -A ROUNDS=([10]=7 [1000]=7 [10000]=5 [100000]=3 [1000000]=5)
get() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$2"; }

printf '%-9s | %12s %10s %8s | %12s %10s | %9s\n' rules iprules_ns build_ms B/rule node_ns node_bld_ms ratio
declare -A R
for n in 10 1000 10000 100000 1000000; do
  "$bin" gen "$n" 42 "$work/rules" "$work/queries" "${Q[$n]}"
  ours=$("$bin" run "$work/rules" "$work/queries" "${ROUNDS[$n]}")
  if [ "$n" -le 100000 ]; then
    theirs=$(node bench/blocklist.mjs "$work/rules" "$work/queries" "${ROUNDS[$n]}")
    if [ "$(get hits "$ours")" != "$(get hits "$theirs")" ]; then
      echo "hit counts differ at $n rules: iprules $(get hits "$ours"), node $(get hits "$theirs")" >&2
      exit 1
    fi
    node_ns=$(get ns_per_check "$theirs"); node_build=$(get build_ms "$theirs")
    ratio=$(awk -v a="$node_ns" -v b="$(get ns_per_check "$ours")" 'BEGIN{printf "%.0f", a/b}')
  else
    node_ns=n/a; node_build=n/a; ratio=n/a
  fi
  printf '%-9s | %12s %10s %8s | %12s %10s | %9s\n' "$n" "$(get ns_per_check "$ours")" \
    "$(get build_ms "$ours")" "$(get bytes_per_rule "$ours")" "$node_ns" "$node_build" "$ratio"
  R[$n]="$ours"; R[node$n]=$ratio
done
echo "(ns per check and build time are medians; ratio = node ns / iprules ns; hit counts of both agree)"
echo "RESULT name=iprules ns_per_check_100k=$(get ns_per_check "${R[100000]}") ratio_vs_node_10k=${R[node10000]} ratio_vs_node_100k=${R[node100000]} build_100k_ms=$(get build_ms "${R[100000]}") bytes_per_rule_100k=$(get bytes_per_rule "${R[100000]}") ns_per_check_1m=$(get ns_per_check "${R[1000000]}")"
