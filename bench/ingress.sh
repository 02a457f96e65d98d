#!/usr/bin/env bash
# The ingress reverse proxy (`ippool serve`, [ingress.*]) against nginx and
# HAProxy in front of the same backend, and against the backend direct; then
# backend self-registration ([registry]) and memory with 1,000 agents. Every
# figure from one run. Driver for the registration part:
# crates/registry/examples/regbench.rs.
#
# Backend: nginx, 1 worker, `return 200 "ok"` (2-byte body), access log off,
#   keep-alive without a request limit. "direct" is wrk straight at it.
# Proxies, each with 2 worker threads/processes, each adding the client's
#   address in X-Forwarded-For, keeping the Host header, HTTP/1.1 kept-alive
#   connections to the backend, no logging:
#   ippool   `ippool serve` (its runtime: 2 tokio workers); one static route
#            for host 127.0.0.1 (what wrk sends); `forwarded = false` and
#            `via = ""` as the others add neither (X-Forwarded-Proto and
#            -Host still go with X-Forwarded-For: one switch); keeps up to
#            512 idle backend conns.
#   nginx    worker_processes 2, upstream keepalive 256 per worker (512 in
#            all, as ippool; with 64, nginx opens and closes backend
#            connections at c=256: 128 in flight per worker), upstream
#            keepalive_requests unlimited, proxy_http_version 1.1,
#            Connection "".
#   haproxy  nbthread 2, mode http, option http-keep-alive, http-reuse
#            always, option forwardfor, timeouts 5s/60s.
# Load: wrk -t2, keep-alive, GET /, c=32 and c=256, INGRESS_BENCH_SECS (5) s
#   per run after a 1 s warm-up per target; INGRESS_BENCH_ROUNDS (3) rounds,
#   each running the four targets back to back in an order rotating between
#   rounds; medians of req/s, p50 and p99 (wrk --latency) over the rounds.
# CPU layouts, both measured in one run (INGRESS_BENCH_LAYOUTS, default
#   "apart shared"); the same running processes are re-pinned between them:
#   apart   wrk alone on CPU 0; the backend and the proxy on CPU 1 (direct:
#           the backend alone there). The load generator does not take CPU
#           from the system under test, as in any proxy benchmark worth
#           its numbers (wrk's own advice); the proxy and the backend, on
#           one core, bound the req/s by the CPU each proxy takes per
#           request. The targets are judged here and RESULT comes from it.
#   shared  wrk (2 threads), the proxy (2 workers) and the backend (1
#           worker) unpinned on both cores: a proxy's req/s is also bounded
#           by how much CPU wrk gets, which dilutes the difference between
#           proxies (direct gives wrk and the backend both cores).
#   The cpu_us/req column is the proxy's processes' user+system time per
#   request, from /proc. The machine may be shared: other load shows up as
#   spread between rounds (printed).
# Registration (a fresh daemon holding only the static route): 1,000 agent
#   keys generated before it starts; 200 agents started one after another,
#   each timed from Agent::start() to its first 200 through the ingress
#   for its host (polled every 1 ms, kept-alive client connection opened
#   beforehand); 750 more at once (awaited until each host answers); the
#   last 50 timed again with the table near full; all stay connected; VmRSS
#   of the daemon once /api/services counts 1,000 services (and before the
#   first agent).
# Targets (issue), at c=256 (layout apart): ippool >= 1.1x nginx req/s with
#   p99 <= nginx's, ippool >= HAProxy req/s; registration p99 <= 50 ms.
# Env: INGRESS_BENCH_SECS (5), INGRESS_BENCH_ROUNDS (3),
#   INGRESS_BENCH_LAYOUTS ("apart shared"), INGRESS_BENCH_AGENTS (1000).
# Ends with: RESULT name=ingress ratio_vs_nginx=… ratio_vs_haproxy=… ratio_vs_direct=…
#   p99_ms=… nginx_p99_ms=… register_p99_ms=… rss_1000_agents_mb=…
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # Packages must not start services: this script starts its own.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends wrk haproxy nginx >/dev/null; } || true
    rm -f /usr/sbin/policy-rc.d
  fi
  for p in "${need[@]}"; do
    command -v "$p" >/dev/null || [ -x "/usr/sbin/$p" ] || {
      echo "ingress bench: $p is not installed: cannot run that peer" >&2; exit 1; }
  done
fi
PATH=$PATH:/usr/sbin
command -v ss >/dev/null || { echo "ingress bench: ss (iproute2) is not installed" >&2; exit 1; }

cargo build --quiet --release -p ippool
cargo build --quiet --release -p registry --example regbench
start=$(date +%s)
load0=$(cut -d' ' -f1-3 /proc/loadavg)
tdir=${CARGO_TARGET_DIR:-target}/release
ippool=$tdir/ippool
regbench=$tdir/examples/regbench

secs=${INGRESS_BENCH_SECS:-5}
rounds=${INGRESS_BENCH_ROUNDS:-3}
read -r -a layouts <<<"${INGRESS_BENCH_LAYOUTS:-apart shared}"
for l in "${layouts[@]}"; do
  case "$l" in apart|shared) ;; *) echo "ingress bench: INGRESS_BENCH_LAYOUTS: unknown layout '$l' (apart, shared)" >&2; exit 1 ;; esac
done
[ ${#layouts[@]} -gt 0 ] || { echo "ingress bench: INGRESS_BENCH_LAYOUTS is empty" >&2; exit 1; }
main=${layouts[0]}
[[ " ${layouts[*]} " == *" apart "* ]] && main=apart
[ "$(nproc)" -ge 2 ] || { echo "ingress bench: needs 2 CPUs (wrk on one, the proxy on another)" >&2; exit 1; }
nagents=${INGRESS_BENCH_AGENTS:-1000}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

work=$(mktemp -d)
pids=()
stop() { # pid: TERM, then KILL after 5 s
  local i
  kill "$1" 2>/dev/null || return 0
  for i in $(seq 1 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
cleanup() {
  local rc=$? p f
  for p in "${pids[@]}"; do stop "$p"; done
  if [ "$rc" != 0 ]; then
    for f in "$work"/*.err; do
      [ -s "$f" ] && { echo "--- $(basename "$f") (last lines)" >&2; tail -5 "$f" >&2; }
    done
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

used=" "
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 30000))
    case "$used" in *" $p "*) continue ;; esac
    ss -Htan "( sport = :$p or dport = :$p )" | grep -q . && continue
    used+="$p "; echo "$p"; return
  done
}
wait_port() { # port what pid
  local i
  for i in $(seq 1 200); do
    ss -Htln "sport = :$1" | grep -q . && return 0
    kill -0 "$3" 2>/dev/null || { echo "ingress bench: $2 exited at start:" >&2; cat "$work/$2.err" >&2 2>/dev/null || true; exit 1; }
    sleep 0.05
  done
  echo "ingress bench: $2 does not listen on $1" >&2; exit 1
}
# layout NAME: pins every running server (and its worker processes) and
# sets how wrk is started.
on_wrk=()
layout() {
  local p q cpus=0-$(( $(nproc) - 1 ))
  on_wrk=()
  [ "$1" = apart ] && { cpus=1; on_wrk=(taskset -c 0); }
  for p in "${pids[@]}"; do
    kill -0 "$p" 2>/dev/null || continue
    for q in "$p" $(pgrep -P "$p" || true); do taskset -a -pc "$cpus" "$q" >/dev/null; done
  done
}

bport=$(free_port); nport=$(free_port); hport=$(free_port); iport=$(free_port); rport=$(free_port)

# --- backend nginx
mkdir -p "$work/backend/tmp" "$work/nginx/tmp"
nginx_common() { # tmpdir
  cat <<EOF
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
worker_rlimit_nofile 16384;
events { worker_connections 8000; multi_accept on; }
EOF
}
nginx_temps() {
  echo "  client_body_temp_path $1/tmp/body; proxy_temp_path $1/tmp/proxy; fastcgi_temp_path $1/tmp/fcgi;"
  echo "  uwsgi_temp_path $1/tmp/uwsgi; scgi_temp_path $1/tmp/scgi;"
}
{
  echo "worker_processes 1;"; nginx_common "$work/backend"
  echo "http {"; nginx_temps "$work/backend"
  cat <<EOF
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  server {
    listen 127.0.0.1:$bport reuseport backlog=4096;
    location / { return 200 "ok"; }
  }
}
EOF
} > "$work/backend/nginx.conf"

# --- nginx proxy
{
  echo "worker_processes 2;"; nginx_common "$work/nginx"
  echo "http {"; nginx_temps "$work/nginx"
  cat <<EOF
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  upstream backend {
    server 127.0.0.1:$bport;
    keepalive 256;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
  }
  server {
    listen 127.0.0.1:$nport backlog=4096;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$http_host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
EOF
} > "$work/nginx/nginx.conf"

# --- HAProxy
cat > "$work/haproxy.cfg" <<EOF
global
  nbthread 2
  maxconn 8000
defaults
  mode http
  option http-keep-alive
  option forwardfor
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-request 10s
  timeout http-keep-alive 60s
frontend bench
  bind 127.0.0.1:$hport
  default_backend backend
backend backend
  server b1 127.0.0.1:$bport
EOF

# --- ippool
ippool_conf() { # dir ingress-port registry-port
  mkdir -p "$1/keys"
  cat > "$1/ippool.toml" <<EOF
[admin]
listen = "127.0.0.1:0"
[ingress.bench]
listen = "127.0.0.1:$2"
forwarded = false
via = ""
[ingress.bench.routes.all]
host = "127.0.0.1"
backends = ["127.0.0.1:$bport"]
[registry]
listen = "127.0.0.1:$3"
keys_dir = "keys"
EOF
  "$ippool" check -c "$1/ippool.toml" >/dev/null
}
ippool_conf "$work/ippool" "$iport" "$rport"

nginx -p "$work/backend" -c "$work/backend/nginx.conf" -e "$work/backend/error.log" 2>"$work/backend.err" &
backend_pid=$!; pids+=("$backend_pid"); wait_port "$bport" backend "$backend_pid"
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" 2>"$work/nginx.err" &
nginx_pid=$!; pids+=("$nginx_pid"); wait_port "$nport" nginx "$nginx_pid"
haproxy -db -f "$work/haproxy.cfg" 2>"$work/haproxy.err" &
haproxy_pid=$!; pids+=("$haproxy_pid"); wait_port "$hport" haproxy "$haproxy_pid"
"$ippool" serve -c "$work/ippool/ippool.toml" 2>"$work/ippool.err" &
ippool_pid=$!; pids+=("$ippool_pid"); wait_port "$iport" ippool "$ippool_pid"

declare -A PORT=([direct]=$bport [ippool]=$iport [nginx]=$nport [haproxy]=$hport)
declare -A PID=([direct]=$backend_pid [ippool]=$ippool_pid [nginx]=$nginx_pid [haproxy]=$haproxy_pid)
targets=(direct ippool nginx haproxy)

for t in "${targets[@]}"; do
  body=$(curl -s --max-time 5 "http://127.0.0.1:${PORT[$t]}/" || true)
  [ "$body" = ok ] || { echo "ingress bench: $t answers '$body', not 'ok'" >&2; cat "$work/$t.err" >&2 || true; exit 1; }
done

# CPU ticks (user + system) of a process and its children (nginx workers).
cpu_ticks() {
  local p t=0 kids
  kids=$(pgrep -P "$1" || true)
  for p in "$1" $kids; do
    [ -r "/proc/$p/stat" ] && t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$t"
}
hz=$(getconf CLK_TCK)

# wrk output -> "rps p50_ms p99_ms requests errors"
parse_wrk() {
  awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /m$/) return v * 60000; if (v ~ /s$/) return v * 1000; return v }
    /^ +50%/ { p50 = ms($2) } /^ +99%/ { p99 = ms($2) }
    /requests in/ { n = $1 }
    /Requests\/sec:/ { rps = $2 }
    /Socket errors:/ { gsub(",", ""); err += $4 + $6 + $8 + $10 }
    /Non-2xx or 3xx/ { err += $5 }
    END { printf "%.0f %.3f %.3f %d %d\n", rps, p50, p99, n, err }'
}

run_wrk() { # target conns secs -> parsed line + cpu us/req of the target's processes
  local t=$1 c=$2 d=$3 before after out
  kill -0 "${PID[$t]}" 2>/dev/null || { echo "ingress bench: $t (pid ${PID[$t]}) is gone; its stderr:" >&2; tail -20 "$work/${t/direct/backend}.err" >&2 || true; exit 1; }
  before=$(cpu_ticks "${PID[$t]}")
  out=$("${on_wrk[@]}" wrk -t2 -c"$c" -d"${d}s" --latency "http://127.0.0.1:${PORT[$t]}/")
  after=$(cpu_ticks "${PID[$t]}")
  read -r rps p50 p99 n err <<<"$(parse_wrk <<<"$out")"
  echo "$rps $p50 $p99 $n $err $(awk -v t=$((after - before)) -v hz="$hz" -v n="$n" 'BEGIN{printf "%.1f", n ? t / hz * 1e6 / n : 0}')"
}

median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END{if (NR % 2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'; }

echo "ingress bench: wrk -t2, keep-alive, ${secs}s x $rounds rounds, c=32 and c=256; layouts ${layouts[*]}; $(nproc) CPUs; $(nginx -v 2>&1 | sed 's/.*\///'), haproxy $(haproxy -v | sed -n '1s/HAProxy version \([^ ]*\).*/\1/p'), $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}')"
declare -A RPS P50 P99 CPU ERR
for lay in "${layouts[@]}"; do
  layout "$lay"
  for c in 32 256; do
    for t in "${targets[@]}"; do run_wrk "$t" "$c" 1 >/dev/null; done   # warm-up: connections, pools
  done
  for r in $(seq 0 $((rounds - 1))); do
    order=("${targets[@]:r%4}" "${targets[@]:0:r%4}")
    for c in 32 256; do
      for t in "${order[@]}"; do
        read -r rps p50 p99 n err cpu <<<"$(run_wrk "$t" "$c" "$secs")"
        k="$lay/$t/$c"
        RPS[$k]+="$rps "; P50[$k]+="$p50 "; P99[$k]+="$p99 "; CPU[$k]+="$cpu "; ERR[$k]=$(( ${ERR[$k]:-0} + err ))
      done
    done
    echo "  $lay: round $((r + 1))/$rounds done ($(( $(date +%s) - start )) s; order ${order[*]})"
  done
done
ippool_rss_http=$(awk '/^VmRSS/{printf "%.1f", $2/1024}' "/proc/$ippool_pid/status")

declare -A M
for k in "${!RPS[@]}"; do
  M[rps/$k]=$(median <<<"${RPS[$k]}"); M[p50/$k]=$(median <<<"${P50[$k]}")
  M[p99/$k]=$(median <<<"${P99[$k]}"); M[cpu/$k]=$(median <<<"${CPU[$k]}")
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", b ? a / b : 0}'; }
verdict() { awk -v v="$1" -v l="$3" -v op="$2" 'BEGIN{ok = (op == ">=") ? v >= l : v <= l; print (ok ? "ok" : "MISSED")}'; }

for lay in "${layouts[@]}"; do
  echo
  case "$lay" in
    apart) echo "layout apart: wrk on CPU 0; backend and proxy on CPU 1" ;;
    shared) echo "layout shared: wrk, backend and proxy unpinned on both CPUs" ;;
  esac
  printf '%-8s %5s | %9s %8s %8s %9s | %9s %9s | %s\n' target conns req/s p50_ms p99_ms cpu_us/req ippool/x x/direct "req/s per round"
  for c in 32 256; do
    for t in "${targets[@]}"; do
      k="$lay/$t/$c"
      rel=-; [ "$t" != ippool ] && rel=$(ratio "${M[rps/$lay/ippool/$c]}" "${M[rps/$k]}")
      printf '%-8s %5s | %9s %8.2f %8.2f %9s | %9s %9s | %s\n' "$t" "$c" "${M[rps/$k]}" "${M[p50/$k]}" "${M[p99/$k]}" \
        "${M[cpu/$k]}" "$rel" "$(ratio "${M[rps/$k]}" "${M[rps/$lay/direct/$c]}")" "${RPS[$k]% }"
    done
  done
done
echo "(medians over $rounds rounds; ippool/x = ippool req/s / x req/s; cpu_us/req: CPU time of the target's own processes (direct: the backend) per request)"
for k in "${!ERR[@]}"; do
  if [ "${ERR[$k]}" != 0 ]; then echo "WARNING: $k: ${ERR[$k]} socket errors or non-2xx responses in wrk's counts"; fi
done

# --- registration: a fresh daemon, 1,000 agent keys in its store
stop "$ippool_pid"
iport2=$(free_port); rport2=$(free_port)
ippool_conf "$work/reg" "$iport2" "$rport2"
kstart=$(date +%s.%N)
"$regbench" keygen "$work/reg/keys" "$nagents"
keygen_s=$(awk -v a="$kstart" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b - a}')
"$ippool" serve -c "$work/reg/ippool.toml" 2>"$work/reg.err" &
reg_pid=$!; pids+=("$reg_pid"); wait_port "$iport2" reg "$reg_pid"; wait_port "$rport2" reg "$reg_pid"
layout "$main"
admin=""
for _ in $(seq 1 100); do
  admin=$(sed -n 's/.*admin API listening on \(http:\/\/[0-9.:]*\).*/\1/p' "$work/reg.err" | head -1)
  [ -n "$admin" ] && break; sleep 0.05
done
if [ -z "$admin" ]; then # no log line (another log level): ask the kernel instead
  admin=http://$(ss -Htlnp | awk -v p="pid=$reg_pid," -v a="$iport2" -v b="$rport2" \
    '$0 ~ p && $4 !~ ":"a"$" && $4 !~ ":"b"$" {print $4; exit}')
fi
head=$(( nagents >= 250 ? 200 : nagents / 2 )); tail=$(( nagents >= 250 ? 50 : 0 ))
reg=$(timeout --kill-after=5 120 "${on_wrk[@]}" "$regbench" run registry="ws://127.0.0.1:$rport2" \
  ingress="127.0.0.1:$iport2" admin="$admin" backend="127.0.0.1:$bport" keys="$work/reg/keys" \
  pid="$reg_pid" agents="$nagents" head="$head" tail="$tail") \
  || { echo "ingress bench: registration run failed" >&2; tail -20 "$work/reg.err" >&2; exit 1; }
get() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$2"; }

echo
reg_p99=$(get reg_p99_ms "$reg")
printf '%-44s| %s\n' "registration: start() -> first routed 200" "ms p50 / p99 / max"
printf '%-44s| %s / %s / %s   p99 <= 50 %s\n' "  all $(get measured "$reg") timed agents" \
  "$(get reg_p50_ms "$reg")" "$reg_p99" "$(get reg_max_ms "$reg")" "$(verdict "$reg_p99" "<=" 50)"
printf '%-44s| %s / %s\n' "  first $head (table of 0..$head agents)" "$(get head_p50_ms "$reg")" "$(get head_p99_ms "$reg")"
printf '%-44s| %s / %s\n' "  last $tail (table of $((nagents - tail))..$nagents agents)" "$(get tail_p50_ms "$reg")" "$(get tail_p99_ms "$reg")"
printf '%-44s| %s / %s\n' "  to the registry's ack (state Registered)" "$(get ack_p50_ms "$reg")" "$(get ack_p99_ms "$reg")"
printf '  %s agents at once: all acknowledged in %s s, all routed in %s s; %s key pairs generated in %s s\n' \
  "$(get bulk_agents "$reg")" "$(get bulk_s "$reg")" "$(get bulk_routed_s "$reg")" "$nagents" "$keygen_s"
printf '  503 answers while a new route had no backend yet: %s\n' "$(get no_backend_503 "$reg")"
printf 'memory: daemon VmRSS %s MB with %s agents connected (%s services), %s MB before (%s KB per agent); %s MB after the HTTP runs\n' \
  "$(get rss_mb "$reg")" "$(get registered "$reg")" "$(get services "$reg")" "$(get rss_before_mb "$reg")" "$(get rss_per_agent_kb "$reg")" "$ippool_rss_http"

echo
# at c=256 in LAYOUT -> "r_nginx r_haproxy r_direct p99 nginx_p99"
figures() {
  printf '%s %s %s %.2f %.2f\n' "$(ratio "${M[rps/$1/ippool/256]}" "${M[rps/$1/nginx/256]}")" \
    "$(ratio "${M[rps/$1/ippool/256]}" "${M[rps/$1/haproxy/256]}")" "$(ratio "${M[rps/$1/ippool/256]}" "${M[rps/$1/direct/256]}")" \
    "${M[p99/$1/ippool/256]}" "${M[p99/$1/nginx/256]}"
}
for lay in "${layouts[@]}"; do
  read -r r_n r_h r_d p99 np99 <<<"$(figures "$lay")"
  echo "$lay at c=256: req/s >= 1.1x nginx: $r_n $(verdict "$r_n" ">=" 1.1); p99 <= nginx's: $p99 vs $np99 ms $(verdict "$p99" "<=" "$np99");" \
    ">= HAProxy: $r_h $(verdict "$r_h" ">=" 1)$([ "$lay" = "$main" ] || echo " (for information: targets are judged in $main)")"
done
read -r r_n r_h r_d p99 np99 <<<"$(figures "$main")"
echo "registration p99 <= 50 ms: $reg_p99 $(verdict "$reg_p99" "<=" 50)"
echo "($(( $(date +%s) - start )) s after the build; load average before/after: $load0 / $(cut -d' ' -f1-3 /proc/loadavg))"
echo "RESULT name=ingress ratio_vs_nginx=$r_n ratio_vs_haproxy=$r_h ratio_vs_direct=$r_d p99_ms=$p99 nginx_p99_ms=$np99 register_p99_ms=$reg_p99 rss_1000_agents_mb=$(get rss_mb "$reg")"
