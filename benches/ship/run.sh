#!/usr/bin/env bash
# Shipping benchmark (SPEC sections 5.1 and 9), against a real S3-compatible server (moto):
#
# 1. seal -> listed: residency-proxy under wrk load seals its log by size (ROTATE_BYTES,
#    default 16 MiB) and on a schedule; a poller lists the bucket every 50 ms and notes when
#    each object first appears. The time from the proxy's "decision log rotated" event to
#    that listing is the figure (target: under 10 s).
# 2. audit verify over object storage: records per second of `audit verify s3://…` on what
#    the run shipped, beside the same objects verified from a local folder (file://), which
#    takes the network and the store out (target: at least 100,000 records/s).
#
#   benches/ship/run.sh                     # 20 s of load, 64 connections
#   DUR=60 ROTATE_BYTES=104857600 benches/ship/run.sh
#
# Shipping's cost in throughput is measured by the load benchmark, side by side:
#   BASE_SHIP=1 benches/load/run.sh
#
# Needs wrk, nginx and python3 with moto[server] (pip install 'moto[server]'). Everything
# listens on loopback; every process started here is stopped on exit. Results:
# target/ship/<time>/summary.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DUR=${DUR:-20}
CONNS=${CONNS:-64}
ROTATE_BYTES=${ROTATE_BYTES:-16777216}
OUT=${OUT:-$ROOT/target/ship/$(date +%Y%m%d-%H%M%S)}
W=$OUT/work
mkdir -p "$W/www/payments/u1" "$W/logs" "$W/run" "$W/copy"
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 2; }
command -v nginx >/dev/null || { echo "nginx is not installed (apt-get install nginx-light)" >&2; exit 2; }
python3 -c 'import moto' 2>/dev/null || { echo "moto is not installed (pip install 'moto[server]')" >&2; exit 2; }
head -c 1024 /dev/urandom > "$W/www/payments/u1/1k.bin"

source "$ROOT/benches/lib.sh"
nginx_conf backend "server { listen 127.0.0.2:18280 backlog=4096; root $W/www; location / { } }" > "$W/backend.conf"
if [ -z "${RP_BIN:-}" ]; then
  cargo build --release --quiet
fi
BIN=${RP_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/residency-proxy}
"$BIN" certs init "$W" >/dev/null

STORE=127.0.0.40:18240
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench
bench_policy ship-bench 18290 18280 "$W/logs/decisions.jsonl" "upstream_idle_per_address = 512" \
  "instance = \"bench-1\"
rotate_bytes = $ROTATE_BYTES
rotate_interval = \"30s\"
[log.ship]
url = \"s3://fleet/logs/\"
endpoint = \"http://$STORE\"
region = \"cn-north-1\"
[[networks]]
cidr = \"127.0.0.40/32\"
country = \"CN\"" > "$W/policy.toml"
"$BIN" check "$W/policy.toml" >/dev/null

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
# The store gets CPU 1 with wrk: a real store runs on other machines.
taskset -c 1 python3 -m moto.server -H 127.0.0.40 -p 18240 > "$W/logs/moto.log" 2>&1 & PIDS+=($!)
for _ in $(seq 1 100); do curl -s -o /dev/null "http://$STORE/" && break; sleep 0.1; done
curl -sf -X PUT "http://$STORE/fleet" > /dev/null
taskset -c 0 nginx -p "$W" -c "$W/backend.conf" -g "daemon off;" & PIDS+=($!)
taskset -c 0 "$BIN" --log-format json serve --policy "$W/policy.toml" --workers 1 2> "$W/logs/proxy.log" & OURS=$!; PIDS+=($OURS)
URL=http://127.0.0.1:18290/payments/u1/1k.bin
for _ in $(seq 1 100); do curl -sf -o /dev/null -H 'X-Purpose: credit_scoring' "$URL" && break; sleep 0.1; done

# The poller: when each object is first listed.
python3 - "$STORE" "$W/listed.tsv" "$W/run/poll.stop" <<'PY' & POLLER=$!; PIDS+=($POLLER)
import os, re, sys, time, urllib.request
store, out, stop = sys.argv[1:4]
seen = {}
with open(out, 'w') as f:
    while not os.path.exists(stop):
        token = ''
        while True:
            q = 'http://%s/fleet?list-type=2&prefix=logs/%s' % (store, token)
            body = urllib.request.urlopen(q).read().decode()
            now = time.time()
            for key in re.findall(r'<Key>([^<]+)</Key>', body):
                if key not in seen:
                    seen[key] = now
                    f.write('%s\t%.3f\n' % (key, now)); f.flush()
            m = re.search(r'<NextContinuationToken>([^<]+)</NextContinuationToken>', body)
            if not m:
                break
            token = '&continuation-token=' + urllib.parse.quote(m.group(1))
        time.sleep(0.05)
PY

taskset -c 1 wrk -t2 -c"$CONNS" -d"${DUR}s" --latency -H 'X-Purpose: credit_scoring' "$URL" > "$OUT/wrk.txt"
kill -TERM "$OURS"; wait "$OURS" || true
sleep 1; touch "$W/run/poll.stop"; wait "$POLLER" || true

# Verify over S3, then the same objects from a local folder.
python3 - "$STORE" "$W/copy" <<'PY'
import os, sys, boto3  # boto3 comes with moto
store, dest = sys.argv[1:3]
s3 = boto3.client('s3', endpoint_url='http://' + store, region_name='cn-north-1')
for page in s3.get_paginator('list_objects_v2').paginate(Bucket='fleet', Prefix='logs/'):
    for o in page.get('Contents', []):
        path = os.path.join(dest, o['Key'])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        s3.download_file('fleet', o['Key'], path)
PY
timed() { local t0 t1; t0=$(date +%s.%N); "$@" > "$W/run/out.txt" 2>&1 || true; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
S3_SECS=$(timed "$BIN" audit verify s3://fleet/logs/ --endpoint "http://$STORE" --key "$W/log-signing.pub")
cp "$W/run/out.txt" "$OUT/verify-s3.txt"
LOCAL_SECS=$(timed "$BIN" audit verify "file://$W/copy/logs/" --key "$W/log-signing.pub")
cp "$W/run/out.txt" "$OUT/verify-local.txt"

python3 - "$OUT" "$W" "$S3_SECS" "$LOCAL_SECS" <<'PY' | tee "$OUT/summary.md"
import json, re, statistics, sys, calendar, time
out, w, s3_secs, local_secs = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
def unix(ts):  # 2026-12-02T01:00:00.123456Z
    base, frac = ts.rstrip('Z').split('.')
    return calendar.timegm(time.strptime(base, '%Y-%m-%dT%H:%M:%S')) + float('0.' + frac)
rotated = {}
for line in open(w + '/logs/proxy.log'):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    f = e.get('fields', {})
    if f.get('message') == 'decision log rotated':
        first = int(re.search(r'-(\d{20})-', f['log.rotated']).group(1))
        rotated[first] = unix(e['timestamp'])
lags = []
for line in open(w + '/listed.tsv'):
    key, t = line.split('\t')
    first = int(key.split('/')[-1].split('-')[0])
    if first in rotated:
        lags.append(float(t) - rotated[first])
wrk = open(out + '/wrk.txt').read()
rps = float(re.search(r'Requests/sec:\s+([\d.]+)', wrk).group(1))
v = open(out + '/verify-s3.txt').read().strip()
m = re.search(r': ok, (\d+) records, (\d+) checkpoints', v)
records = int(m.group(1)) + int(m.group(2)) if m else 0
print('| figure | value | target |')
print('|---|---|---|')
if lags:
    lags.sort()
    print('| seal -> listed, median of %d files | %.2f s | < 10 s |' % (len(lags), statistics.median(lags)))
    print('| seal -> listed, max | %.2f s | < 10 s |' % max(lags))
print('| audit verify over S3 (moto) | %.0f records/s (%d records in %.2f s) | >= 100,000 |' % (records / s3_secs, records, s3_secs))
print('| the same objects from a local folder | %.0f records/s (%.2f s) | |' % (records / local_secs, local_secs))
print()
print('load while shipping: %.0f req/s (wrk, %s)' % (rps, 'one worker'))
print('verify over S3: ' + v.replace('\n', '; '))
PY
echo "results in $OUT"
