#!/usr/bin/env bash
# Consents at scale (SPEC sections 4.1 and 9): N consents in PostgreSQL (default 10,000,000),
# the in-process bench (`cargo bench --bench consent_scale`: generation, start-up, misses,
# cached decisions, hit rates, revocation between two caches), then two real sidecars on the
# same database: time from spawn to /readyz 200, resident set idle and under a load of random
# subjects (uniform, then Zipf(1.1)), the miss-latency histogram from /metrics, and a
# revocation made through sidecar A's admin API while load runs, timed until each sidecar
# answers 451 consent_revoked (polled every 5 ms).
#
#   benches/consent_scale/run.sh                       # 10,000,000 consents, 20 s per load
#   CONSENTS=1000000 DUR=10 benches/consent_scale/run.sh
#   KEEP_DB=1 ...                                      # keep the database (its name is printed)
#   CONSENT_SCALE_DB=name ...                          # reuse a database already filled
#   INPROCESS=0 CONSENT_SCALE_DB=name ...              # the sidecars only
#
# PostgreSQL: RESIDENCY_TEST_POSTGRES, or a throwaway cluster (.ci/postgres.sh) started and
# stopped here. Needs wrk (installed with apt-get when missing), curl and python3. Everything
# listens on loopback; every process started here is stopped on exit, and the database is
# dropped unless kept. Results: target/consent_scale/<time>/summary.md.
#
# Layout, with addresses standing in for countries (as in benches/lib.sh):
#   upstream   python3 tiny store        127.0.0.2:18280  (CN: the domestic store)
#   sidecar A  residency-proxy           127.0.0.1:18281, admin 127.0.0.1:18282
#   sidecar B  residency-proxy           127.0.0.1:18283, admin 127.0.0.1:18284
#   wrk        from 127.0.0.1            (US: the bureau, a third party)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
HERE=$ROOT/benches/consent_scale
export CONSENTS=${CONSENTS:-10000000}
DUR=${DUR:-20}
CONNS=${CONNS:-32}
REVOKES=${REVOKES:-10}
OUT=${OUT:-$ROOT/target/consent_scale/$(date +%Y%m%d-%H%M%S)}
W=$OUT/work
mkdir -p "$W/logs"
if ! command -v wrk >/dev/null; then
  echo "installing wrk" >&2
  if [ "$(id -u)" = 0 ]; then apt-get install -y -qq wrk >&2; else sudo apt-get install -y -qq wrk >&2; fi
fi

PIDS=()
STARTED_PG=
DB=${CONSENT_SCALE_DB:-rp_consent_scale_$$}
KEEP=${KEEP_DB:-${CONSENT_SCALE_DB:+1}}
psql_run() { "$PSQL" -X -q -v ON_ERROR_STOP=1 "$RESIDENCY_TEST_POSTGRES" -c "$1"; }
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -z "$KEEP" ] && [ -n "${PSQL:-}" ] && [ -n "${RESIDENCY_TEST_POSTGRES:-}" ]; then
    psql_run "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  fi
  if [ -n "$STARTED_PG" ]; then postgres_stop; fi
}
trap cleanup EXIT INT TERM

if [ -z "${RESIDENCY_TEST_POSTGRES:-}" ]; then
  source "$ROOT/.ci/postgres.sh"
  postgres_start
  STARTED_PG=1
fi
PSQL=$(command -v psql || ls /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -n 1)

cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/residency-proxy

# 1. In process; it creates and fills the database, and keeps it for the sidecars.
# INPROCESS=0 skips the measurements (CONSENT_SCALE_DB must then name a filled database).
if [ "${INPROCESS:-1}" = 1 ]; then
  echo "== in-process bench (cargo bench --bench consent_scale), $CONSENTS consents, database $DB"
  CONSENT_SCALE_DB=$DB cargo bench --quiet --bench consent_scale 2>&1 | tee "$OUT/inprocess.txt"
else
  : > "$OUT/inprocess.txt"
fi
URL="${RESIDENCY_TEST_POSTGRES%/*}/$DB"

# 2. Two sidecars on that database.
"$BIN" certs init "$W" >/dev/null
python3 -c 'import secrets; print(secrets.token_hex(24))' > "$W/admin.token"
sidecar_policy() {  # name, listen port, admin port
  cat <<TOML
[policy]
name = "consent-scale-$1"
home = "CN"
[proxy]
listen = "127.0.0.1:$2"
[[networks]]
cidr = "127.0.0.2/32"
country = "CN"
[[networks]]
cidr = "127.0.0.1/32"
country = "US"
[[upstreams]]
name = "store"
url = "http://127.0.0.2:18280"
[[recipients]]
id = "bureau"
relation = "third_party"
country = "US"
networks = ["127.0.0.1/32"]
[[datasets]]
name = "payments"
match = { path_prefix = "/payments/" }
upstream = "store"
category = "user.financial"
subject = { path_segment = 2 }
cross_border = "consent"
third_party = "consent"
[consent]
store = "$URL"
[admin]
listen = "127.0.0.1:$3"
token_file = "$W/admin.token"
[log]
path = "$W/logs/decisions-$1.jsonl"
signing_key = "$W/log-signing.key"
TOML
}
sidecar_policy a 18281 18282 > "$W/a.toml"
sidecar_policy b 18283 18284 > "$W/b.toml"
"$BIN" check "$W/a.toml" >/dev/null

python3 "$HERE/probe.py" upstream 127.0.0.2 18280 & PIDS+=($!)
rss() { awk -v f="$2:" '$1==f{printf "%.1f", $2/1024}' /proc/"$1"/status; }
declare -A PID READY
for s in a b; do
  t0=$(date +%s%N)
  "$BIN" serve --policy "$W/$s.toml" 2> "$W/logs/$s.log" & PID[$s]=$!; PIDS+=($!)
  port=$([ $s = a ] && echo 18282 || echo 18284)
  READY[$s]=$(python3 "$HERE/probe.py" ready "http://127.0.0.1:$port/readyz" "$t0")
  echo "sidecar $s: ready ${READY[$s]} ms after spawn"
done
sleep 1
for u in 127.0.0.2:18280 127.0.0.1:18281 127.0.0.1:18283; do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H 'X-Purpose: credit_scoring' "http://$u/payments/u1/2026-01.json")
  [ "$code" = 200 ] || { echo "http://$u answered $code" >&2; tail -n 20 "$W"/logs/*.log >&2; exit 1; }
done
IDLE_A=$(rss "${PID[a]}" VmRSS); IDLE_B=$(rss "${PID[b]}" VmRSS)

{
  echo "| sidecar measure | A | B | target |"
  echo "|---|---|---|---|"
  echo "| spawn to /readyz 200 | ${READY[a]} ms | ${READY[b]} ms | < 1 s |"
  echo "| resident set idle (VmRSS) | $IDLE_A MiB | $IDLE_B MiB | - |"
} > "$OUT/sidecars.md"

for dist in uniform zipf; do
  echo "== load: $dist subjects over $CONSENTS, ${DUR} s, $CONNS connections per sidecar"
  for s in a b; do python3 "$HERE/probe.py" scrape "127.0.0.1:$([ $s = a ] && echo 18282 || echo 18284)" "$W/metrics-$s-$dist-0.txt"; done
  DIST=$dist wrk -t1 -c"$CONNS" -d"${DUR}s" --latency -s "$HERE/subjects.lua" http://127.0.0.1:18281 > "$OUT/wrk-a-$dist.txt" & WA=$!
  DIST=$dist wrk -t1 -c"$CONNS" -d"${DUR}s" --latency -s "$HERE/subjects.lua" http://127.0.0.1:18283 > "$OUT/wrk-b-$dist.txt" & WB=$!
  PIDS+=($WA $WB)
  if [ "$dist" = zipf ]; then
    sleep 3
    python3 "$HERE/probe.py" revocations 127.0.0.1:18281 127.0.0.1:18282 127.0.0.1:18283 "$W/admin.token" \
      "$CONSENTS" "$REVOKES" "$OUT/revocations.json" > "$OUT/revocations-summary.json" & REV=$!; PIDS+=($REV)
  fi
  # Peak resident set during the load: sampled every 0.5 s.
  peak_a=0; peak_b=0
  while kill -0 $WA 2>/dev/null || kill -0 $WB 2>/dev/null; do
    a=$(rss "${PID[a]}" VmRSS); b=$(rss "${PID[b]}" VmRSS)
    peak_a=$(awk -v x="$a" -v y="$peak_a" 'BEGIN{print (x>y)?x:y}'); peak_b=$(awk -v x="$b" -v y="$peak_b" 'BEGIN{print (x>y)?x:y}')
    sleep 0.5
  done
  wait $WA $WB || true
  if [ "$dist" = zipf ]; then wait $REV; fi
  for s in a b; do
    python3 "$HERE/probe.py" scrape "127.0.0.1:$([ $s = a ] && echo 18282 || echo 18284)" "$W/metrics-$s-$dist-1.txt"
    python3 "$HERE/probe.py" metrics "$W/metrics-$s-$dist-0.txt" "$W/metrics-$s-$dist-1.txt" > "$OUT/metrics-$s-$dist.json"
  done
  j() { python3 -c "import json,sys; v=json.load(open('$OUT/metrics-$1-$dist.json'))['$2']; print(('%.1f %%' % (v*100)) if '$2'=='hit_rate' else (('%.1f MiB' % (v/1048576)) if '$2'=='cache_bytes' else v))"; }
  w() { awk -v k="$2" '$0 ~ k {print $2; exit}' "$OUT/wrk-$1-$dist.txt"; }
  non2xx() { awk '/Non-2xx/{print $NF}' "$OUT/wrk-$1-$dist.txt" | grep . || echo 0; }
  {
    echo "| $dist: requests/s (wrk, ${DUR} s) | $(awk '/^Requests\/sec/{print $2}' "$OUT/wrk-a-$dist.txt") | $(awk '/^Requests\/sec/{print $2}' "$OUT/wrk-b-$dist.txt") | - |"
    echo "| $dist: latency p50 / p99 (wrk) | $(w a '^ +50%') / $(w a '^ +99%') | $(w b '^ +50%') / $(w b '^ +99%') | - |"
    echo "| $dist: non-2xx answers (451 consent_store_unavailable, a miss over lookup_timeout) | $(non2xx a) | $(non2xx b) | 0 |"
    echo "| $dist: cache hit rate (/metrics) | $(j a hit_rate) | $(j b hit_rate) | - |"
    echo "| $dist: miss query p50 / p99 (/metrics histogram, bucket bound) | $(j a miss_p50) / $(j a miss_p99) | $(j b miss_p50) / $(j b miss_p99) | p99 < 2 ms |"
    echo "| $dist: cache bytes after the load / evictions | $(j a cache_bytes) / $(j a evictions) | $(j b cache_bytes) / $(j b evictions) | <= 64 MiB |"
    echo "| $dist: resident set peak during / after the load | $peak_a / $(rss "${PID[a]}" VmRSS) MiB | $peak_b / $(rss "${PID[b]}" VmRSS) MiB | < 100 MiB |"
  } >> "$OUT/sidecars.md"
done
echo "| resident set high-water mark (VmHWM) over the whole run | $(rss "${PID[a]}" VmHWM) MiB | $(rss "${PID[b]}" VmHWM) MiB | < 100 MiB |" >> "$OUT/sidecars.md"

python3 - "$OUT/revocations-summary.json" >> "$OUT/sidecars.md" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("| revocation through A's admin API, under zipf load, until 451 consent_revoked (%d revocations): median / max | %.1f / %.1f ms (both A and B) | %.1f / %.1f ms | < 1 s |"
      % (r["revocations"], r["both_median_ms"], r["both_max_ms"], r["B_median_ms"], r["B_max_ms"]))
print("|   of which the revoke call itself (until A's admin API answered): median / max | %.1f / %.1f ms | | - |"
      % (r["commit_median_ms"], r["commit_max_ms"]))
PY
{
  echo "# consent_scale, $(date -u +%Y-%m-%dT%H:%MZ), $CONSENTS consents, commit $(git rev-parse --short HEAD)"
  echo
  echo "## In process"
  echo
  grep '^|' "$OUT/inprocess.txt" || echo "(skipped)"
  echo
  echo "## Two sidecars (release build, cache mode, default 64 MiB)"
  echo
  cat "$OUT/sidecars.md"
} > "$OUT/summary.md"
cat "$OUT/summary.md"
echo "results in $OUT"
