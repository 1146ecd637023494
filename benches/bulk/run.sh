#!/usr/bin/env bash
# Bulk objects (SPEC sections 3.1 and 9): one worker of residency-proxy filters a month's
# spending export record by record, by each subject's consent, beside the same object
# streamed unfiltered through the same proxy, in one run.
#
#   benches/bulk/run.sh                   # 5,000,000 records (1 GiB), 1,000,000 subjects, 10,000,000 consents
#   REPS=1 benches/bulk/run.sh            # one unfiltered and one warm run per format (default 3)
#   RECORDS=50000 SUBJECTS=10000 CONSENTS=100000 benches/bulk/run.sh   # a quick look
#   LOOKUP_TIMEOUT=2s ...                 # [consent] lookup_timeout (default: the product's, 200 ms);
#                                         # a batch of misses slower than it ends the response early
#   CACHE_MB=512 ...                      # [consent] cache_max_bytes, MiB (default 512: holds the
#                                         # object's 1,000,000 subjects, about 250 bytes each)
#   PERF=1 ...                            # perf record (flat, 999 Hz) of the proxy during the cold and
#                                         # the first warm run of each format: OUT/perf-<format>-<run>.txt
#                                         # (perf's own cost slows those runs a little)
#   VERIFY=0 ...                          # skip the untimed SHA-256 pass over each filtered body
#   PIN=0 ...                             # do not pin the proxy to CPU 0 and nginx and curl to CPU 1
#   PREFLIGHT=0 ...                       # measure even if the proxy does not filter (to try the script)
#   KEEP_DB=1 ...                         # keep the database the consents were imported into
#   BULK_DB=name ...                      # that database: filled unless it already holds CONSENTS
#                                         # consents, then reused, and kept (with a
#                                         # RESIDENCY_TEST_POSTGRES that outlives the run)
#
# For each format (JSON lines, then CSV), a fresh proxy, and with curl -o /dev/null:
#   1. unfiltered: the same object through a dataset without `records` (cross_border and
#      third_party "allow"), REPS times;
#   2. filtered, cold cache: the first request of the records dataset (nothing cached);
#   3. filtered, warm cache: the same request again, REPS times;
# then, untimed, the filtered body once more through sha256sum against the generator's.
# During each run: the proxy's resident set every 100 ms (idle before it, min and max during
# it), the decision log's growth (until the exchange's outcome record is written), and the
# exchange's decision, disclosure and outcome records, checked against the generator's truth
# (gen.py: which records and subjects must be kept).
#
# Inputs (gen.py) are cached in target/bench-bulk/data/ and regenerated only when the
# parameters or gen.py change. PostgreSQL: RESIDENCY_TEST_POSTGRES, or a throwaway cluster
# from .ci/postgres.sh, stopped on exit; the consents go into a new database with the
# product's own `consent import` (dropped on exit unless KEEP_DB=1 or BULK_DB). Needs nginx, curl and python3. Everything listens on
# loopback; every process started here is stopped on exit, by its PID. Results:
# target/bench-bulk/runs/<time>/summary.md, copied to benches/bulk/last-run.txt.
#
# Layout, with addresses standing in for countries (as in benches/lib.sh):
#   upstream  nginx, static files       127.0.0.2:18380  (CN: the domestic object store)
#   proxy     residency-proxy           127.0.0.1:18390, admin 127.0.0.1:18391, CPU 0
#   curl      from 127.0.0.1            (US: the credit bureau, a third party), CPU 1 with nginx
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
HERE=$ROOT/benches/bulk
CMDLINE="$(for v in RECORDS SUBJECTS CONSENTS REPS CACHE_MB LOOKUP_TIMEOUT PERF BULK_DB KEEP_DB PIN VERIFY RP_BIN; do [ -z "${!v:-}" ] || printf '%s=%q ' "$v" "${!v}"; done)benches/bulk/run.sh $*"
RECORDS=${RECORDS:-5000000}
SUBJECTS=${SUBJECTS:-1000000}
CONSENTS=${CONSENTS:-10000000}
REPS=${REPS:-3}
CACHE_MB=${CACHE_MB:-512}
PIN=${PIN:-1}
VERIFY=${VERIFY:-1}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
DATA=${BULK_DATA:-$TARGET/bench-bulk/data}
[ "$RECORDS" = 5000000 ] && [ "$SUBJECTS" = 1000000 ] && [ "$CONSENTS" = 10000000 ] \
  || DATA=${BULK_DATA:-$TARGET/bench-bulk/data-$RECORDS-$SUBJECTS-$CONSENTS}
OUT=$(realpath -m "${OUT:-$TARGET/bench-bulk/runs/$(date +%Y%m%d-%H%M%S)}")
W=$OUT/work
mkdir -p "$W/www/exports/spending" "$W/www/exports/spending-csv" "$W/www/raw/spending" "$W/logs" "$W/run"
command -v nginx >/dev/null || { echo "nginx is not installed (apt-get install nginx-light)" >&2; exit 2; }
command -v curl >/dev/null || { echo "curl is not installed" >&2; exit 2; }
LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
if [ "$PIN" = 1 ] && [ "$(nproc)" -ge 2 ]; then
  PROXY_CPUS=0; CLIENT_CPUS=1
else
  PROXY_CPUS=0-$(( $(nproc) - 1 )); CLIENT_CPUS=$PROXY_CPUS
fi
export PYTHONDONTWRITEBYTECODE=1
probe() { python3 "$HERE/probe.py" "$@"; }

# 1. Inputs, generated once.
STAMP=$(python3 "$HERE/gen.py" --stamp --records "$RECORDS" --subjects "$SUBJECTS" --consents "$CONSENTS")
if [ "$(cat "$DATA/stamp" 2>/dev/null)" != "$STAMP" ]; then
  echo "== generating the inputs in $DATA (once; about a minute on a quiet machine)"
  rm -rf "$DATA"
  python3 "$HERE/gen.py" "$DATA" --records "$RECORDS" --subjects "$SUBJECTS" --consents "$CONSENTS"
fi
TRUTH=$DATA/truth.json
truth() { python3 -c "import json; print(json.load(open('$TRUTH'))['$1'])"; }
ln -sf "$DATA/2026-11.jsonl" "$W/www/exports/spending/2026-11.jsonl"
ln -sf "$DATA/2026-11.csv" "$W/www/exports/spending-csv/2026-11.csv"
ln -sf "$DATA/2026-11.jsonl" "$W/www/raw/spending/2026-11.jsonl"
ln -sf "$DATA/2026-11.csv" "$W/www/raw/spending/2026-11.csv"
# A two-record object for the pre-flight check: a subject outside the object that holds a
# consent for the bureau (kept) and a record without a subject field (dropped). Nothing of
# the object's own subjects gets cached by it.
printf '{"user_id":"u%07d","amount_cents":1}\n{"amount_cents":2}\n' $((SUBJECTS + 1)) > "$W/www/exports/spending/probe.jsonl"

PIDS=()
STARTED_PG=
DB=${BULK_DB:-rp_bulk_$$}
KEEP=${KEEP_DB:-}
psql_run() { "$PSQL" -X -q -v ON_ERROR_STOP=1 "$RESIDENCY_TEST_POSTGRES" -tA -c "$1"; }
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -z "$KEEP" ] && [ -z "${BULK_DB:-}" ] && [ -n "${PSQL:-}" ] && [ -n "${RESIDENCY_TEST_POSTGRES:-}" ]; then
    psql_run "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  fi
  if [ -n "$STARTED_PG" ]; then postgres_stop; fi
}
trap cleanup EXIT INT TERM

# 2. The upstream: nginx serving the files, checked to be faster than anything behind it.
source "$ROOT/benches/lib.sh"
nginx_conf upstream "server { listen 127.0.0.2:18380 backlog=1024; root $W/www; location / { } }" > "$W/upstream.conf"
taskset -c "$CLIENT_CPUS" nginx -p "$W" -c "$W/upstream.conf" -g "daemon off;" & PIDS+=($!)
for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.2:18380/exports/spending/probe.jsonl" && break; sleep 0.1; done
declare -A DIRECT
for f in jsonl csv; do
  best=0
  for _ in 1 2; do
    r=$(taskset -c "$CLIENT_CPUS" curl -sf -o /dev/null -w '%{size_download} %{time_total}' "http://127.0.0.2:18380/raw/spending/2026-11.$f")
    best=$(awk -v r="$r" -v b="$best" 'BEGIN{split(r, a, " "); v = a[1] / a[2] / 1e6; print (v > b) ? v : b}')
  done
  DIRECT[$f]=$best
  echo "upstream straight to curl, $f: $best MB/s"
  awk -v v="$best" 'BEGIN{exit !(v < 1000)}' && echo "WARNING: the upstream serves $f at under 1 GB/s; it may bound what the proxy shows" >&2
done

# 3. The registry: 10,000,000 consents in PostgreSQL through `consent import`.
if [ -z "${RP_BIN:-}" ]; then
  cargo build --release --quiet --bin residency-proxy
fi
BIN=${RP_BIN:-$TARGET/release/residency-proxy}
if [ -z "${RESIDENCY_TEST_POSTGRES:-}" ]; then
  source "$ROOT/.ci/postgres.sh"
  postgres_start
  STARTED_PG=1
fi
PSQL=$(command -v psql || ls /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -n 1)
URL="${RESIDENCY_TEST_POSTGRES%/*}/$DB"
PG_VERSION=$(psql_run "SHOW server_version" | awk '{print $1}')
HAVE=0
if [ -n "$(psql_run "SELECT 1 FROM pg_database WHERE datname = '$DB'")" ]; then
  HAVE=$("$PSQL" -X -q -tA "$URL" -c "SELECT count(*) FROM consents" 2>/dev/null || echo 0)
else
  psql_run "CREATE DATABASE $DB"
fi
if [ "$HAVE" = "$CONSENTS" ]; then
  IMPORT="database $DB reused ($HAVE consents)"
  echo "== $IMPORT"
else
  echo "== importing $CONSENTS consents into database $DB (consent import)"
  t0=$(date +%s.%N)
  "$BIN" consent import --store "$URL" --by bench "$DATA/consents.jsonl" > "$W/import.txt" 2>&1 \
    || { cat "$W/import.txt" >&2; exit 1; }
  t1=$(date +%s.%N)
  IMPORT=$(awk -v n="$CONSENTS" -v a="$t0" -v b="$t1" 'BEGIN{printf "imported in %.0f s (%.0f consents/s)", b - a, n / (b - a)}')
  echo "$IMPORT"
  "$PSQL" -X -q "$URL" -c "ANALYZE" >/dev/null
fi

# 4. The proxy's policy: a JSON lines records dataset, a CSV one, and the same objects
# unfiltered under /raw/.
"$BIN" certs init "$W" >/dev/null
cat > "$W/policy.toml" <<TOML
[policy]
name = "bulk-bench"
home = "CN"
[proxy]
listen = "127.0.0.1:18390"
[[networks]]
cidr = "127.0.0.2/32"
country = "CN"
name = "oss-shanghai"
[[networks]]
cidr = "127.0.0.1/32"
country = "US"
[[upstreams]]
name = "oss-shanghai"
url = "http://127.0.0.2:18380"
[[recipients]]
id = "credit-bureau-us"
relation = "third_party"
country = "US"
networks = ["127.0.0.1/32"]
[[datasets]]
name = "spending-exports"
match = { path_prefix = "/exports/spending/" }
upstream = "oss-shanghai"
category = "user.financial"
records = { format = "jsonl", subject = "user_id" }
cross_border = "consent"
third_party = "consent"
[[datasets]]
name = "spending-exports-csv"
match = { path_prefix = "/exports/spending-csv/" }
upstream = "oss-shanghai"
category = "user.financial"
records = { format = "csv", subject = "user_id" }
cross_border = "consent"
third_party = "consent"
[[datasets]]
name = "spending-raw"
match = { path_prefix = "/raw/spending/" }
upstream = "oss-shanghai"
category = "user.financial"
cross_border = "allow"
third_party = "allow"
[consent]
store = "$URL"
cache_max_bytes = $((CACHE_MB * 1048576))
${LOOKUP_TIMEOUT:+lookup_timeout = \"$LOOKUP_TIMEOUT\"}
[admin]
listen = "127.0.0.1:18391"
[log]
path = "LOGDIR/decisions.jsonl"
durability = "write"
signing_key = "$W/log-signing.key"
rotate_bytes = 17179869184
TOML
sed "s#LOGDIR#$W/logs/check#" "$W/policy.toml" > "$W/check.toml"
"$BIN" check "$W/check.toml" > "$W/check.txt" 2>&1 || { cat "$W/check.txt" >&2; exit 1; }

PROXY=
start_proxy() {  # phase: a fresh proxy with its own log folder
  mkdir -p "$W/logs/$1"
  sed "s#LOGDIR#$W/logs/$1#" "$W/policy.toml" > "$W/policy-$1.toml"
  taskset -c "$PROXY_CPUS" "$BIN" serve --policy "$W/policy-$1.toml" --workers 1 2> "$W/logs/$1/proxy.log" & PROXY=$!; PIDS+=($PROXY)
  for _ in $(seq 1 300); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:18391/readyz)" = 200 ] && return 0
    kill -0 "$PROXY" 2>/dev/null || break
    sleep 0.1
  done
  echo "the proxy did not become ready:" >&2; tail -n 20 "$W/logs/$1/proxy.log" >&2; exit 1
}
stop_proxy() { kill -TERM "$PROXY"; wait "$PROXY" || true; }

# Pre-flight: the records dataset must answer a filtered body (consent_filtered), or there
# is nothing to measure.
preflight() {
  local body code
  code=$(curl -s -o "$W/run/probe.out" -D "$W/run/probe.hdr" -w '%{http_code}' -H 'X-Purpose: credit_scoring' \
    http://127.0.0.1:18390/exports/spending/probe.jsonl)
  body=$(cat "$W/run/probe.out")
  if [ "$code" != 200 ] || [ "$body" != "$(head -n 1 "$W/www/exports/spending/probe.jsonl")" ]; then
    echo "the proxy does not filter records yet: GET /exports/spending/probe.jsonl answered $code with:" >&2
    head -c 600 "$W/run/probe.out" >&2; echo >&2
    exit 3
  fi
}

# CPU ticks (1/100 s, user + system) of a process, all its threads.
ticks() { sed 's/^.*) //' /proc/"$1"/stat | awk '{print $12 + $13}'; }
RUNS=$OUT/runs.jsonl
: > "$RUNS"
# One measured request: curl from the bureau's address, the proxy's resident set sampled
# every 100 ms, the log's size before and after the exchange's outcome record.
measure() {  # phase, format, kind, path
  local phase=$1 fmt=$2 kind=$3 path=$4 c0 c1 cexit n tag before after t0 t1 code bytes secs ttfb decision rss m0 m1
  n=$(grep -c . "$RUNS" || true)
  tag=$W/run/$n-$fmt-$kind
  before=$(probe log-bytes "$W/logs/$phase")
  probe scrape 127.0.0.1:18391 "$tag.m0"
  rm -f "$tag.stop"
  taskset -c "$CLIENT_CPUS" python3 "$HERE/probe.py" sample "$PROXY" "$tag.rss" "$tag.stop" & local s=$!
  sleep 0.6
  local perf=
  if [ "${PERF:-0}" = 1 ] && [ "$kind" != unfiltered ] && [ ! -e "$OUT/perf-$fmt-$kind.data" ]; then
    perf record -q -F 999 -p "$PROXY" -o "$OUT/perf-$fmt-$kind.data" 2> "$W/run/perf-$fmt-$kind.log" & perf=$!
    sleep 0.5
  fi
  c0=$(ticks "$PROXY")
  t0=$(date +%s.%N)
  read -r code bytes secs ttfb cexit < <(taskset -c "$CLIENT_CPUS" curl -s -o /dev/null -D "$tag.hdr" \
    -w '%{http_code} %{size_download} %{time_total} %{time_starttransfer} %{exitcode}\n' \
    -H 'X-Purpose: credit_scoring' "http://127.0.0.1:18390$path")
  t1=$(date +%s.%N)
  c1=$(ticks "$PROXY")
  if [ -n "$perf" ]; then
    kill -INT "$perf"; wait "$perf" || true
    perf report -i "$OUT/perf-$fmt-$kind.data" --no-children --sort symbol --percent-limit 1 --stdio 2>/dev/null \
      | grep -v '^#' | grep -v '^$' | sed 's/ *- *- *$//' | head -40 > "$OUT/perf-$fmt-$kind.txt" || true
  fi
  decision=$(awk -F': *' 'tolower($1) == "x-residency-decision" {gsub(/\r/, "", $2); print $2}' "$tag.hdr")
  after=$(probe wait-outcome "$W/logs/$phase" "$decision")
  sleep 0.3
  touch "$tag.stop"; wait "$s" || true
  probe scrape 127.0.0.1:18391 "$tag.m1"
  rss=$(probe rss "$tag.rss" "$t0" "$t1")
  python3 - "$RUNS" "$tag" <<PY
import json, sys
sys.path.insert(0, "$HERE")
from probe import metrics
m0, m1 = metrics(sys.argv[2] + ".m0"), metrics(sys.argv[2] + ".m1")
cb = "residency_consent_cache_bytes"
r = {"phase": "$phase", "format": "$fmt", "kind": "$kind", "path": "$path", "code": int("$code"),
     "bytes": int("$bytes"), "curl_exit": int("$cexit"), "secs": float("$secs"), "ttfb": float("$ttfb"), "decision": "$decision",
     "log_growth": int("$after") - int("$before"), "proxy_cpu_s": ($c1 - $c0) / 100.0,
     "loadavg": "$(cut -d' ' -f1-3 /proc/loadavg)",
     "cache_bytes_delta": (m1[cb] - m0.get(cb, 0)) if cb in m1 else None}
r.update(json.loads('$rss'))
open(sys.argv[1], "a").write(json.dumps(r) + "\n")
PY
  printf '  %-5s %-10s HTTP %s %11d bytes in %6.2f s  (%s)%s\n' "$fmt" "$kind" "$code" "$bytes" "$secs" "$decision" \
    "$([ "$cexit" = 0 ] || echo "  CUT SHORT: curl exit $cexit")"
  [ "$code" = 200 ] || { echo "$path answered $code" >&2; tail -n 20 "$W/logs/$phase/proxy.log" >&2; exit 1; }
}

declare -A VERIFY_BYTES VERIFY_SHA HWM
for f in jsonl csv; do
  case $f in jsonl) FILTERED=/exports/spending/2026-11.jsonl;; csv) FILTERED=/exports/spending-csv/2026-11.csv;; esac
  echo "== $f: fresh proxy"
  start_proxy "$f"
  [ "$f" = jsonl ] && [ "${PREFLIGHT:-1}" = 1 ] && preflight
  for _ in $(seq 1 "$REPS"); do measure "$f" "$f" unfiltered "/raw/spending/2026-11.$f"; done
  measure "$f" "$f" cold "$FILTERED"
  probe scrape 127.0.0.1:18391 "$W/run/cold-$f.metrics"
  for _ in $(seq 1 "$REPS"); do measure "$f" "$f" warm "$FILTERED"; done
  if [ "$VERIFY" = 1 ]; then
    read -r VERIFY_BYTES[$f] VERIFY_SHA[$f] < <(curl -s -H 'X-Purpose: credit_scoring' "http://127.0.0.1:18390$FILTERED" | probe digest)
    echo "  $f filtered body: ${VERIFY_BYTES[$f]} bytes, sha256 ${VERIFY_SHA[$f]} (expected $(truth sha256_filtered_$f))"
  fi
  HWM[$f]=$(awk '/^VmHWM/{print $2}' /proc/$PROXY/status)
  stop_proxy
done

# 5. The log verifies, and what it says of each exchange.
for f in jsonl csv; do
  "$BIN" audit verify "$W/logs/$f" --key "$W/log-signing.pub" > "$W/run/verify-log-$f.txt" 2>&1 || true
done
probe run-figures "$RUNS" "$W/logs" "$TRUTH"
python3 - "$OUT/info.json" <<PY
import json, sys
sys.path.insert(0, "$HERE")
from probe import metrics
info = {"when": "$(date -u +%Y-%m-%dT%H:%MZ)", "commit": "$(git rev-parse --short HEAD 2>/dev/null || echo -)$(git diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo " with uncommitted changes to src")",
        "cpus": $(nproc), "loadavg": "$LOADAVG", "proxy_cpus": "CPU $PROXY_CPUS", "client_cpus": "CPU $CLIENT_CPUS",
        "pg": "PostgreSQL $PG_VERSION, database $DB", "import": "$IMPORT",
        "nginx": "$(nginx -v 2>&1 | sed 's#.*/##')", "cache_max_bytes": $((CACHE_MB * 1048576)),
        "direct": {"jsonl": ${DIRECT[jsonl]}, "csv": ${DIRECT[csv]}},
        "verify": {}, "metrics": {}}
for f in ("jsonl", "csv"):
    m = metrics("$W/run/cold-%s.metrics" % f)
    g = lambda k: sum(v for key, v in m.items() if key == k or key.startswith(k + "{"))
    n = g("residency_consent_batch_lookup_duration_seconds_count")
    info["metrics"][f] = {"cache_bytes": g("residency_consent_cache_bytes"), "hits": g("residency_consent_cache_hits_total"),
                          "misses": g("residency_consent_cache_misses_total"), "evictions": g("residency_consent_cache_evictions_total"),
                          "batches": n, "batch_mean_ms": 1000 * g("residency_consent_batch_lookup_duration_seconds_sum") / n if n else 0}
    info["log_verify_" + f] = open("$W/run/verify-log-%s.txt" % f).read().strip()
if "$VERIFY" == "1":
    info["verify"] = {"jsonl": {"bytes": int("${VERIFY_BYTES[jsonl]:-0}"), "sha256": "${VERIFY_SHA[jsonl]:-}"},
                      "csv": {"bytes": int("${VERIFY_BYTES[csv]:-0}"), "sha256": "${VERIFY_SHA[csv]:-}"}}
info["hwm_kib"] = {"jsonl": int("${HWM[jsonl]:-0}"), "csv": int("${HWM[csv]:-0}")}
json.dump(info, open(sys.argv[1], "w"), indent=1)
PY
probe summary "$OUT" "$TRUTH" "$CMDLINE" | tee "$OUT/summary.md"
cp "$OUT/summary.md" "$HERE/last-run.txt"
echo "results in $OUT"
