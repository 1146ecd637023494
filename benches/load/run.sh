#!/usr/bin/env bash
# Load benchmark (SPEC section 9): requests per second and added latency through
# residency-proxy (policy, consent check and decision log all on) against going direct and
# against nginx as a plain reverse proxy, measured in the same run, interleaved by repetition.
#
#   benches/load/run.sh                     # defaults: 3 reps x 10 s, 64 connections, 1 KiB
#   REPS=1 DUR=3 benches/load/run.sh        # quick look
#   DURABILITY=fsync benches/load/run.sh    # decision log in fsync mode
#   BASE_BIN=/tmp/rp-before benches/load/run.sh   # a baseline build side by side ("base")
#   BASE_BIN=target/release/residency-proxy BASE_DURABILITY=fsync benches/load/run.sh
#                                           # the same build, fsync beside write
#   BASE_SHIP=1 benches/load/run.sh         # the same build beside itself shipping its log
#                                           # ("base": rotate_interval SHIP_ROTATE, default
#                                           # 10s, and rotation by size, zstd, to a file://
#                                           # store), for shipping's cost at full load
#   WORKERS=2 CONNS=256 benches/load/run.sh # two workers each, servers on both cores
#   H2=1 benches/load/run.sh                # HTTP/2 clients in the clear (h2c, prior knowledge)
#                                           # through h2load, 10 streams per connection; the
#                                           # upstream side stays HTTP/1.1 (apt-get install
#                                           # nghttp2-client). h2load reports a mean latency,
#                                           # no percentiles: "p50" is the mean, "p99" is empty.
#
# Needs wrk and nginx (Debian: apt-get install wrk nginx-light). Everything listens on
# loopback; every process started here is stopped on exit. Results: target/load/<time>/.
#
# Layout, with addresses standing in for countries:
#   backend  nginx static files   127.0.0.2:18080  (CN: the domestic store)
#   nginx    plain reverse proxy  127.0.0.1:18081
#   ours     residency-proxy      127.0.0.1:18090
#   wrk      from 127.0.0.1       (US: a foreign third party holding a valid consent)
#   base     residency-proxy      127.0.0.1:18091  (BASE_BIN: another build, same policy)
# Servers share CPU 0 (one nginx worker, one tokio worker); wrk runs on CPU 1. With WORKERS=2,
# every server has two workers and all of them share both CPUs with wrk.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DUR=${DUR:-10}
REPS=${REPS:-3}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
PAYLOAD=${PAYLOAD:-1k}
DURABILITY=${DURABILITY:-write}
WORKERS=${WORKERS:-1}
BASE_BIN=${BASE_BIN:-}
BASE_DURABILITY=${BASE_DURABILITY:-$DURABILITY}
BASE_SHIP=${BASE_SHIP:-}
SHIP_ROTATE=${SHIP_ROTATE:-10s}
export NGINX_WORKERS=$WORKERS
SRV_CPUS=0; [ "$WORKERS" -gt 1 ] && SRV_CPUS=0,1
OUT=${OUT:-$ROOT/target/load/$(date +%Y%m%d-%H%M%S)}
W=$OUT/work
mkdir -p "$W/www/payments/u1" "$W/logs" "$W/run"
H2=${H2:-}
if [ -n "$H2" ]; then
  command -v h2load >/dev/null || { echo "h2load is not installed (apt-get install nghttp2-client)" >&2; exit 2; }
else
  command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 2; }
fi
command -v nginx >/dev/null || { echo "nginx is not installed (apt-get install nginx-light)" >&2; exit 2; }

case $PAYLOAD in 1k) SIZE=1024;; 64k) SIZE=65536;; 1m) SIZE=1048576;; *) echo "PAYLOAD is 1k, 64k or 1m" >&2; exit 2;; esac
head -c "$SIZE" /dev/urandom > "$W/www/payments/u1/$PAYLOAD.bin"

# Two nginx processes, as in ../shared/perf: the backend, and nginx as a plain reverse proxy.
# Kept apart so that nginx-the-proxy pays for talking to its backend across processes exactly
# as residency-proxy does.
source "$ROOT/benches/lib.sh"
# With H2, clients speak HTTP/2 in the clear: the backend also listens for it on 18083 (the
# direct target), and nginx-the-proxy takes it on 18081; both proxies reach the backend
# over HTTP/1.1 on 18080.
H2_LISTEN=""; [ -n "$H2" ] && H2_LISTEN=" http2"
nginx_conf backend "server { listen 127.0.0.2:18080 backlog=4096; ${H2:+listen 127.0.0.2:18083 backlog=4096 http2;} root $W/www; location / { } }" > "$W/backend.conf"
# Each proxy keeps as many idle upstream connections as there are client connections: with a
# smaller pool nginx reopens upstream connections under load and measures that churn instead.
POOL=$(( CONNS > 256 ? CONNS : 256 ))
nginx_conf proxy "upstream store { server 127.0.0.2:18080; keepalive $POOL; keepalive_requests 1000000; }
    server { listen 127.0.0.1:18081 backlog=4096$H2_LISTEN; $NGINX_PROXY_LOCATION }" > "$W/proxy.conf"

# RP_BIN=/path/to/residency-proxy measures a given build (to compare two side by side).
if [ -z "${RP_BIN:-}" ]; then
  cargo build --release --quiet
fi
BIN=${RP_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/residency-proxy}
[ -n "$BASE_SHIP" ] && BASE_BIN=${BASE_BIN:-$BIN}
"$BIN" certs init "$W" >/dev/null

bench_policy load-bench 18090 18080 "$W/logs/decisions.jsonl" "upstream_idle_per_address = $(( POOL > 512 ? POOL : 512 ))" \
  "durability = \"$DURABILITY\"" > "$W/policy.toml"
"$BIN" check "$W/policy.toml" >/dev/null

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
taskset -c $SRV_CPUS nginx -p "$W" -c "$W/backend.conf" -g "daemon off;" & BACKEND=$!; PIDS+=($BACKEND)
taskset -c $SRV_CPUS nginx -p "$W" -c "$W/proxy.conf" -g "daemon off;" & NGINX=$!; PIDS+=($NGINX)
taskset -c $SRV_CPUS "$BIN" serve --policy "$W/policy.toml" --workers "$WORKERS" 2> "$W/logs/proxy.log" & OURS=$!; PIDS+=($OURS)
DIRECT=http://127.0.0.2:18080; [ -n "$H2" ] && DIRECT=http://127.0.0.2:18083
URLS="$DIRECT http://127.0.0.1:18081 http://127.0.0.1:18090"
TARGETS="direct=$DIRECT nginx=http://127.0.0.1:18081 ours=http://127.0.0.1:18090"
BASE=$OURS
if [ -n "$BASE_BIN" ]; then
  mkdir -p "$W/base-logs"
  sed -e 's/127.0.0.1:18090/127.0.0.1:18091/' -e "s#$W/logs/decisions.jsonl#$W/base-logs/decisions.jsonl#" \
    -e "s/^durability = .*/durability = \"$BASE_DURABILITY\"/" "$W/policy.toml" > "$W/base-policy.toml"
  if [ -n "$BASE_SHIP" ]; then
    # [log] is the policy's last table: seal on a schedule and ship to a local store. The
    # proxy's share of shipping (reading, compressing, writing) is what runs on its CPU; the
    # store's own work would run elsewhere in a real deployment.
    printf 'rotate_interval = "%s"\n[log.ship]\nurl = "file://%s/store/"\n' "$SHIP_ROTATE" "$W" >> "$W/base-policy.toml"
    # Its admin listener on a known port, for the shipping CPU counter.
    sed -i 's/^listen = "127.0.0.1:0"$/listen = "127.0.0.1:18092"/' "$W/base-policy.toml"
  fi
  taskset -c $SRV_CPUS "$BASE_BIN" serve --policy "$W/base-policy.toml" --workers "$WORKERS" 2> "$W/base-logs/proxy.log" & BASE=$!; PIDS+=($BASE)
  URLS="$URLS http://127.0.0.1:18091"
  TARGETS="$TARGETS base=http://127.0.0.1:18091"
fi
URL_PATH=/payments/u1/$PAYLOAD.bin
CURL_H2=(); [ -n "$H2" ] && CURL_H2=(--http2-prior-knowledge)
for u in $URLS; do
  for _ in $(seq 1 100); do curl -sf "${CURL_H2[@]}" -o /dev/null -H 'X-Purpose: credit_scoring' "$u$URL_PATH" && break; sleep 0.1; done
  code=$(curl -s "${CURL_H2[@]}" -o /dev/null -w '%{http_code}' -H 'X-Purpose: credit_scoring' "$u$URL_PATH")
  [ "$code" = 200 ] || { echo "$u$URL_PATH answered $code" >&2; cat "$W/logs/proxy.log" >&2; exit 1; }
done

printf 'target\trep\trps\tp50_ms\tp99_ms\trequests\terrors\tbackend_ticks\tnginx_ticks\tours_ticks\tbase_ticks\n' > "$OUT/runs.tsv"
# CPU ticks (1/100 s, user + system) of a process and its children (nginx's worker).
ticks() {
  local total=0 q
  for q in "$1" $(cat /proc/"$1"/task/*/children 2>/dev/null); do
    [ -r /proc/$q/stat ] && total=$(( total + $(sed 's/^.*) //' /proc/$q/stat | awk '{print $12 + $13}') ))
  done
  echo $total
}
to_ms() { awk -v v="$1" 'BEGIN{ if (v ~ /us$/) {sub(/us/,"",v); print v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v); print v+0} else {sub(/s/,"",v); print v*1000} }'; }
# One load run: wrk (HTTP/1.1) or h2load (H2), pinned to CPU 1.
load() {  # seconds, url
  if [ -n "$H2" ]; then
    taskset -c 1 h2load -t"$THREADS" -c"$CONNS" -m10 -D"$1" -H 'X-Purpose: credit_scoring' "$2"
  else
    taskset -c 1 wrk -t"$THREADS" -c"$CONNS" -d"$1s" --latency -H 'X-Purpose: credit_scoring' "$2"
  fi
}
for t in $TARGETS; do load 2 "${t#*=}$URL_PATH" >/dev/null; done
for rep in $(seq 1 "$REPS"); do
  for t in $TARGETS; do
    name=${t%%=*}
    raw=$OUT/wrk_${name}_r$rep.txt
    b0=$(ticks $BACKEND); n0=$(ticks $NGINX); o0=$(ticks $OURS); s0=$(ticks $BASE)
    load "$DUR" "${t#*=}$URL_PATH" > "$raw"
    b1=$(ticks $BACKEND); n1=$(ticks $NGINX); o1=$(ticks $OURS); s1=$(ticks $BASE)
    if [ -n "$H2" ]; then
      rps=$(awk '/^finished in/{print $4}' "$raw")
      p50=$(to_ms "$(awk '/^time for request:/{print $6}' "$raw")")
      p99=nan
      reqs=$(awk '/^requests:/{print $2}' "$raw")
      errs=$(awk '/^requests:/{print $10 + $12 + $14} /^status codes:/{print $7 + $9}' "$raw" | paste -sd+ | bc 2>/dev/null || echo 0)
    else
      rps=$(awk '/^Requests\/sec/{print $2}' "$raw")
      p50=$(to_ms "$(awk '$1=="50%"{print $2}' "$raw")")
      p99=$(to_ms "$(awk '$1=="99%"{print $2}' "$raw")")
      reqs=$(awk '/requests in/{print $1}' "$raw")
      errs=$(awk '/Non-2xx/{print $NF} /Socket errors/{gsub(/,/,""); print $4+$6+$8+$10}' "$raw" | paste -sd+ | bc 2>/dev/null || echo 0)
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rep" "$rps" "$p50" "$p99" "$reqs" "${errs:-0}" $((b1 - b0)) $((n1 - n0)) $((o1 - o0)) $((s1 - s0)) >> "$OUT/runs.tsv"
    printf '  rep %s %-7s %10s rps  p50 %6s ms  p99 %6s ms\n' "$rep" "$name" "$rps" "$p50" "$p99"
  done
done
RSS_KB=$(awk '/^VmRSS/{print $2}' /proc/$OURS/status)
kill -TERM "$OURS"; wait "$OURS" || true
if [ -n "$BASE_SHIP" ]; then
  # Shipping's own CPU (reading and compressing sealed files) against all of base's CPU.
  SHIP_CPU=$(curl -s http://127.0.0.1:18092/metrics | awk '$1=="residency_log_ship_cpu_seconds_total"{print $2}')
  echo "${SHIP_CPU:-0} $(ticks $BASE)" > "$OUT/ship-cpu.txt"
fi
[ -n "$BASE_BIN" ] && { kill -TERM "$BASE"; wait "$BASE" || true; }
if [ -n "$BASE_SHIP" ]; then
  "$BIN" audit verify "file://$W/store/" > "$OUT/verify-shipped.txt" 2>&1 || true
  ls "$W/base-logs" | grep -c -- '-0000' > "$OUT/unshipped.txt" || true
fi
"$BIN" audit verify "$W/logs" > "$OUT/verify.txt" 2>&1 || true
python3 - "$OUT" "$W/logs/decisions.jsonl" "$RSS_KB" "$DURABILITY" <<'PY' | tee "$OUT/summary.md"
import csv, json, statistics, sys
out, log, rss, dur = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rows = list(csv.DictReader(open(out + '/runs.tsv'), delimiter='\t'))
med = lambda t, k: statistics.median(float(r[k]) for r in rows if r['target'] == t)
targets = [t for t in ('direct', 'nginx', 'ours', 'base') if any(r['target'] == t for r in rows)]
d = {t: {k: med(t, k) for k in ('rps', 'p50_ms', 'p99_ms')} for t in targets}
# CPU per request of each process, from its own ticks.
cpu = lambda t, k: statistics.median(int(r[k]) * 10000.0 / max(int(r['requests']), 1) for r in rows if r['target'] == t)
ticks_of = {'direct': 'backend_ticks', 'nginx': 'nginx_ticks', 'ours': 'ours_ticks', 'base': 'base_ticks'}
print('| target | rps | vs nginx | p50 ms | p99 ms | added p50 | added p99 | CPU µs/req | rps spread |')
print('|---|---|---|---|---|---|---|---|---|')
for t in targets:
    x = d[t]
    all_rps = [float(r['rps']) for r in rows if r['target'] == t]
    print('| %s | %.0f | %.2f | %.3f | %.3f | %.3f | %.3f | %.1f | %.0f%% |' % (t, x['rps'], x['rps'] / d['nginx']['rps'], x['p50_ms'], x['p99_ms'],
          x['p50_ms'] - d['direct']['p50_ms'], x['p99_ms'] - d['direct']['p99_ms'], cpu(t, ticks_of[t]),
          100.0 * (max(all_rps) - min(all_rps)) / statistics.median(all_rps)))
print()
print('CPU per request (µs): backend %.1f (direct); nginx as proxy %.1f; residency-proxy %.1f'
      % (cpu('direct', 'backend_ticks'), cpu('nginx', 'nginx_ticks'), cpu('ours', 'ours_ticks')))
print()
print('ours / nginx throughput: %.2f; added latency p50 ours %.3f ms vs nginx %.3f ms; p99 ours %.3f ms vs nginx %.3f ms'
      % (d['ours']['rps'] / d['nginx']['rps'], d['ours']['p50_ms'] - d['direct']['p50_ms'], d['nginx']['p50_ms'] - d['direct']['p50_ms'],
         d['ours']['p99_ms'] - d['direct']['p99_ms'], d['nginx']['p99_ms'] - d['direct']['p99_ms']))
dec = out_ = 0
ids = {}
outs = {}
import glob, os
files = sorted(glob.glob(os.path.join(os.path.dirname(log), 'decisions*.jsonl')))
for line in (l for f in files for l in open(f)):
    r = json.loads(line)
    if r['kind'] == 'decision':
        dec += 1; ids[r['id']] = ids.get(r['id'], 0) + 1
    elif r['kind'] == 'outcome':
        out_ += 1; outs[r['id']] = outs.get(r['id'], 0) + 1
dups = sum(1 for v in ids.values() if v > 1)
unmatched = sum(1 for i in ids if outs.get(i, 0) != 1)
print('decision log (%s, %d chain files): %d decision records, %d outcome records, %d duplicate ids, %d decisions without exactly one outcome; %s'
      % (dur, len(files), dec, out_, dups, unmatched, open(out + '/verify.txt').read().strip()))
print('proxy RSS at the end of the run: %.1f MiB' % (rss / 1024))
if os.path.exists(out + '/verify-shipped.txt'):
    print('base shipped its log: %s; sealed files left unshipped: %s'
          % (open(out + '/verify-shipped.txt').read().strip(), open(out + '/unshipped.txt').read().strip() or '0'))
    ship_cpu, base_ticks = open(out + '/ship-cpu.txt').read().split()
    print('shipping (reading and compressing sealed files) used %.2f s of base\'s %.2f s of CPU: %.1f%%'
          % (float(ship_cpu), int(base_ticks) / 100.0, 100.0 * float(ship_cpu) / max(int(base_ticks) / 100.0, 0.01)))
PY
echo "results in $OUT"
