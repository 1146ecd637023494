#!/usr/bin/env bash
# Memory benchmark (SPEC section 9): resident size of residency-proxy (policy, consent check
# and decision log all on) idle, with 1,000 open keep-alive client connections (each has made
# one request, so every connection holds what a served connection holds), and while a 1 GiB
# object streams through it; nginx as a plain reverse proxy measured the same way beside it.
#
#   benches/memory/run.sh                  # 1,000 connections, 1 GiB
#   CONNS=2000 SIZE_MB=256 benches/memory/run.sh
#
# Needs nginx, curl and python3. Everything listens on loopback; processes started here are
# stopped on exit. Results: target/memory/<time>/summary.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
CONNS=${CONNS:-1000}
SIZE_MB=${SIZE_MB:-1024}
OUT=${OUT:-$ROOT/target/memory/$(date +%Y%m%d-%H%M%S)}
W=$OUT/work
mkdir -p "$W/www/payments/u1" "$W/logs" "$W/run"
command -v nginx >/dev/null || { echo "nginx is not installed (apt-get install nginx-light)" >&2; exit 2; }
ulimit -n 65536 2>/dev/null || ulimit -n 16384

# A sparse file: the store serves zeros without the disk holding them.
truncate -s "${SIZE_MB}M" "$W/www/payments/u1/big.bin"
echo "small" > "$W/www/payments/u1/small.txt"

source "$ROOT/benches/lib.sh"
nginx_conf backend "server { listen 127.0.0.2:18180 backlog=4096; root $W/www; location / { } }" > "$W/backend.conf"
nginx_conf proxy "upstream store { server 127.0.0.2:18180; keepalive 256; }
    server { listen 127.0.0.1:18181 backlog=4096; $NGINX_PROXY_LOCATION }" > "$W/proxy.conf"

if [ -z "${RP_BIN:-}" ]; then
  cargo build --release --quiet
fi
BIN=${RP_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/residency-proxy}
"$BIN" certs init "$W" >/dev/null

bench_policy memory-bench 18190 18180 "$W/logs/decisions.jsonl" \
  "header_read_timeout = \"300s\"
max_connections = 20000" > "$W/policy.toml"
"$BIN" check "$W/policy.toml" >/dev/null

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
nginx -p "$W" -c "$W/backend.conf" -g "daemon off;" & PIDS+=($!)
nginx -p "$W" -c "$W/proxy.conf" -g "daemon off;" & NGINX=$!; PIDS+=($NGINX)
"$BIN" serve --policy "$W/policy.toml" --workers "${WORKERS:-2}" 2> "$W/logs/proxy.log" & OURS=$!; PIDS+=($OURS)
for u in http://127.0.0.1:18181 http://127.0.0.1:18190; do
  for _ in $(seq 1 100); do curl -sf -o /dev/null -H 'X-Purpose: credit_scoring' "$u/payments/u1/small.txt" && break; sleep 0.1; done
done

# Resident size in KiB of a process and its children (nginx's worker).
rss() {
  local total=0 q
  for q in "$1" $(cat /proc/"$1"/task/*/children 2>/dev/null); do
    [ -r /proc/$q/status ] && total=$(( total + $(awk '/^VmRSS/{print $2}' /proc/$q/status) ))
  done
  echo $total
}

# Opens $CONNS connections, one request each, writes how many answered 200 to $3, and holds
# them until the file $4 exists.
hold() {  # port, count file, release file
  python3 - "$1" "$CONNS" "$2" "$3" <<'PY'
import os, socket, sys, time
port, n, done, release = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
req = (b"GET /payments/u1/small.txt HTTP/1.1\r\nHost: store.internal\r\n"
       b"X-Purpose: credit_scoring\r\n\r\n")
conns, ok = [], 0
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(req)
    conns.append(s)
for s in conns:
    data = b""
    while b"small\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    ok += data.startswith(b"HTTP/1.1 200")
with open(done + ".tmp", "w") as f:
    f.write(str(ok))
os.rename(done + ".tmp", done)
while not os.path.exists(release):
    time.sleep(0.1)
PY
}

measure_conns() {  # pid, port -> "idle_kib held_kib answered"
  local pid=$1 port=$2 idle held answered
  idle=$(rss "$pid")
  hold "$port" "$W/run/held.$port" "$W/run/release.$port" &
  local h=$!
  while [ ! -e "$W/run/held.$port" ]; do sleep 0.1; done
  answered=$(cat "$W/run/held.$port")
  sleep 1
  held=$(rss "$pid")
  touch "$W/run/release.$port"
  wait "$h"
  echo "$idle $held $answered"
}

measure_stream() {  # pid, port -> "peak_kib bytes"
  local pid=$1 port=$2 peak=0 r bytes
  curl -s -o /dev/null -w '%{size_download}' -H 'X-Purpose: credit_scoring' \
    "http://127.0.0.1:$port/payments/u1/big.bin" > "$W/run/bytes.$port" &
  local c=$!
  while kill -0 "$c" 2>/dev/null; do
    r=$(rss "$pid"); [ "$r" -gt "$peak" ] && peak=$r
    sleep 0.05
  done
  wait "$c"
  bytes=$(cat "$W/run/bytes.$port")
  echo "$peak $bytes"
}

read -r o_idle o_held o_ok < <(measure_conns "$OURS" 18190)
read -r n_idle n_held n_ok < <(measure_conns "$NGINX" 18181)
sleep 1
o_before=$(rss "$OURS"); read -r o_peak o_bytes < <(measure_stream "$OURS" 18190)
n_before=$(rss "$NGINX"); read -r n_peak n_bytes < <(measure_stream "$NGINX" 18181)

mib() { awk -v k="$1" 'BEGIN{printf "%.1f", k/1024}'; }
{
  echo "| | residency-proxy | nginx (plain proxy) |"
  echo "|---|---|---|"
  echo "| idle | $(mib "$o_idle") MiB | $(mib "$n_idle") MiB |"
  echo "| $CONNS open connections ($o_ok / $n_ok answered 200) | $(mib "$o_held") MiB | $(mib "$n_held") MiB |"
  echo "| before streaming ${SIZE_MB} MiB | $(mib "$o_before") MiB | $(mib "$n_before") MiB |"
  echo "| peak while streaming it ($o_bytes / $n_bytes bytes) | $(mib "$o_peak") MiB | $(mib "$n_peak") MiB |"
} | tee "$OUT/summary.md"
echo "results in $OUT"
