#!/usr/bin/env bash
# TLS termination benchmark: requests per second through residency-proxy in the clear and
# with TLS terminated at the proxy (keep-alive connections), and full TLS handshakes per
# second (a new connection, and so a new handshake, for every request), all in the same run,
# interleaved by repetition. Policy, consent check and decision log are on throughout.
#
#   benches/tls/run.sh                 # defaults: 3 reps x 10 s, 64 connections, 1 KiB
#   REPS=1 DUR=3 benches/tls/run.sh    # quick look
#
# Needs wrk and nginx (Debian: apt-get install wrk nginx-light). Everything listens on
# loopback; every process started here is stopped on exit. Results: target/tls-bench/<time>/.
#
#   backend  nginx static files            127.0.0.2:18280  (CN: the domestic store)
#   plain    residency-proxy, no TLS       127.0.0.1:18290
#   tls      residency-proxy, [tls] set    127.0.0.1:18291  (server.crt from `certs init`,
#                                                            ECDSA P-256; no client_ca:
#                                                            wrk cannot present a certificate)
#   nginx    nginx terminating TLS and     127.0.0.1:18292  (same certificate; a reference
#            proxying to the backend                         for what TLS costs elsewhere)
#   wrk      from 127.0.0.1 (US: a foreign third party holding a valid consent); OpenSSL,
#            HTTP/1.1, no session resumption, so "close" runs are full handshakes.
# Servers share CPU 0 (one nginx worker, one tokio worker each); wrk runs on CPU 1.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DUR=${DUR:-10}
REPS=${REPS:-3}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
OUT=${OUT:-$ROOT/target/tls-bench/$(date +%Y%m%d-%H%M%S)}
W=$OUT/work
mkdir -p "$W/www/payments/u1" "$W/logs" "$W/run"
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 2; }
command -v nginx >/dev/null || { echo "nginx is not installed (apt-get install nginx-light)" >&2; exit 2; }
head -c 1024 /dev/urandom > "$W/www/payments/u1/1k.bin"

cat > "$W/nginx.conf" <<CONF
pid $W/run/nginx.pid;
error_log $W/logs/nginx.error.log warn;
worker_processes 1;
worker_rlimit_nofile 16384;
events { worker_connections 8192; }
http {
    access_log off;
    sendfile on; tcp_nodelay on;
    keepalive_timeout 65s; keepalive_requests 1000000;
    client_body_temp_path $W/run/body; proxy_temp_path $W/run/proxy;
    fastcgi_temp_path $W/run/fcgi; uwsgi_temp_path $W/run/uwsgi; scgi_temp_path $W/run/scgi;
    default_type application/octet-stream;
    upstream store { server 127.0.0.2:18280; keepalive 256; keepalive_requests 1000000; }
    server { listen 127.0.0.2:18280 backlog=4096; root $W/www; location / { } }
    server {
        listen 127.0.0.1:18292 ssl backlog=4096;
        ssl_certificate $W/server.crt; ssl_certificate_key $W/server.key;
        ssl_protocols TLSv1.2 TLSv1.3; ssl_session_tickets off;
        location / {
            proxy_pass http://store; proxy_http_version 1.1; proxy_set_header Connection "";
            proxy_set_header Host \$host; proxy_buffering on; proxy_request_buffering off;
        }
    }
}
CONF

cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/residency-proxy
"$BIN" certs init "$W" >/dev/null

source "$ROOT/benches/lib.sh"
policy() { # NAME PORT EXTRA
  bench_policy "tls-bench-$1" "$2" 18280 "$W/logs/decisions-$1.jsonl" \
    "upstream_idle_per_address = 512" "$3"
}
policy plain 18290 "" > "$W/plain.toml"
policy tls 18291 "[tls]
cert = \"$W/server.crt\"
key = \"$W/server.key\"" > "$W/tls.toml"
"$BIN" check "$W/plain.toml" "$W/tls.toml" >/dev/null

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
taskset -c 0 nginx -p "$W" -c "$W/nginx.conf" -g "daemon off;" & PIDS+=($!)
taskset -c 0 "$BIN" serve --policy "$W/plain.toml" --workers 1 2> "$W/logs/plain.log" & PIDS+=($!)
taskset -c 0 "$BIN" serve --policy "$W/tls.toml" --workers 1 2> "$W/logs/tls.log" & TLS_PID=$!; PIDS+=($TLS_PID)
P=/payments/u1/1k.bin
for u in http://127.0.0.1:18290 https://127.0.0.1:18291 https://127.0.0.1:18292; do
  for _ in $(seq 1 100); do curl -sf --cacert "$W/ca.crt" -o /dev/null -H 'X-Purpose: credit_scoring' "$u$P" && break; sleep 0.1; done
  code=$(curl -s --cacert "$W/ca.crt" -o /dev/null -w '%{http_code}' -H 'X-Purpose: credit_scoring' "$u$P")
  [ "$code" = 200 ] || { echo "$u$P answered $code" >&2; cat "$W"/logs/*.log >&2; exit 1; }
done

# name=url=extra-header
TARGETS="plain=http://127.0.0.1:18290= tls=https://127.0.0.1:18291= plain_close=http://127.0.0.1:18290=Connection:close tls_close=https://127.0.0.1:18291=Connection:close nginx_tls=https://127.0.0.1:18292= nginx_tls_close=https://127.0.0.1:18292=Connection:close"
printf 'target\trep\trps\terrors\n' > "$OUT/runs.tsv"
bench() { # URL EXTRA DURATION
  if [ -n "$2" ]; then
    taskset -c 1 wrk -t"$THREADS" -c"$CONNS" -d"$3" -H 'X-Purpose: credit_scoring' -H "${2/:/: }" "$1$P"
  else
    taskset -c 1 wrk -t"$THREADS" -c"$CONNS" -d"$3" -H 'X-Purpose: credit_scoring' "$1$P"
  fi
}
for t in $TARGETS; do IFS== read -r _ url extra <<<"$t"; bench "$url" "$extra" 2s >/dev/null; done
for rep in $(seq 1 "$REPS"); do
  for t in $TARGETS; do
    IFS== read -r name url extra <<<"$t"
    raw=$OUT/wrk_${name}_r$rep.txt
    bench "$url" "$extra" "${DUR}s" > "$raw"
    rps=$(awk '/^Requests\/sec/{print $2}' "$raw")
    errs=$(awk '/Non-2xx/{print $NF} /Socket errors/{gsub(/,/,""); print $4+$6+$8+$10}' "$raw" | paste -sd+ | bc 2>/dev/null || echo 0)
    printf '%s\t%s\t%s\t%s\n' "$name" "$rep" "$rps" "${errs:-0}" >> "$OUT/runs.tsv"
    printf '  rep %s %-12s %10s rps  errors %s\n' "$rep" "$name" "$rps" "${errs:-0}"
  done
done
kill -TERM "$TLS_PID"; wait "$TLS_PID" || true
python3 - "$OUT" <<'PY' | tee "$OUT/summary.md"
import csv, statistics, sys
out = sys.argv[1]
rows = list(csv.DictReader(open(out + '/runs.tsv'), delimiter='\t'))
med = {t: statistics.median(float(r['rps']) for r in rows if r['target'] == t)
       for t in ('plain', 'tls', 'plain_close', 'tls_close', 'nginx_tls', 'nginx_tls_close')}
errs = sum(int(float(r['errors'] or 0)) for r in rows)
print('| through the proxy | requests/s (median) | ratio |')
print('|---|---|---|')
print('| plain, keep-alive | %.0f | 1.00 |' % med['plain'])
print('| TLS terminated, keep-alive | %.0f | %.2f of plain |' % (med['tls'], med['tls'] / med['plain']))
print('| plain, new connection per request | %.0f | %.2f of plain |' % (med['plain_close'], med['plain_close'] / med['plain']))
print('| TLS, new connection (full handshake) per request | %.0f | %.2f of plain-close |' % (med['tls_close'], med['tls_close'] / med['plain_close']))
print('| reference: nginx terminating TLS, keep-alive | %.0f | ours %.2f of it |' % (med['nginx_tls'], med['tls'] / med['nginx_tls']))
print('| reference: nginx, full handshake per request | %.0f | ours %.2f of it |' % (med['nginx_tls_close'], med['tls_close'] / med['nginx_tls_close']))
print()
print('TLS handshakes/s (each with one proxied request): %.0f; TLS keep-alive throughput %.0f%% of plain; errors in all runs: %d'
      % (med['tls_close'], 100 * med['tls'] / med['plain'], errs))
PY
echo "results in $OUT"
