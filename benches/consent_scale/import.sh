#!/usr/bin/env bash
# `consent import` at scale (SPEC section 4.1: at least 100,000 consents per second): N
# consents as JSON lines, imported into a fresh SQLite file and into a fresh PostgreSQL
# database, then imported again (everything unchanged). Prints consents/s and peak RSS.
#
#   benches/consent_scale/import.sh                 # 1,000,000 consents
#   N=200000 benches/consent_scale/import.sh
#   N=10000000 STORES=postgres benches/consent_scale/import.sh   # one store only
#
# PostgreSQL: RESIDENCY_TEST_POSTGRES if set (a database may be created from it), else a
# throwaway cluster from .ci/postgres.sh, stopped on exit. Uses a release build
# (CARGO_TARGET_DIR honoured; RP_BIN to use another binary). Files go to
# target/consent_scale/ and are removed on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
N=${N:-1000000}
STORES=${STORES:-sqlite postgres}
W=${W:-${CARGO_TARGET_DIR:-$ROOT/target}/consent_scale/$$}
mkdir -p "$W"
STARTED_PG=
cleanup() {
  rm -rf "$W"
  if [ -n "$STARTED_PG" ]; then postgres_stop; fi
}
trap cleanup EXIT

if [ -z "${RP_BIN:-}" ]; then
  cargo build --release --quiet --bin residency-proxy
fi
BIN=${RP_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/residency-proxy}

# Ids in a scrambled order (as an export from another system would list them), each subject
# with its own consent.
python3 - "$N" > "$W/consents.jsonl" <<'PY'
import sys
n = int(sys.argv[1])
out = sys.stdout
for i in range(n):
    k = (i * 2654435761) % (1 << 32)
    out.write(
        '{"id":"c-%08x-%d","subject":"u%d","recipient":"credit-bureau-us",'
        '"purposes":["credit_scoring"],"categories":["user.financial"],'
        '"destinations":["US"],"method":"explicit","granted_at":"2026-01-01T00:00:00Z",'
        '"expires_at":"2030-01-01T00:00:00Z","evidence":"receipt %d"}\n' % (k, i, i, i))
PY
echo "input: $N consents, $(du -m "$W/consents.jsonl" | cut -f1) MiB"

# CPU seconds (user + system) that the PostgreSQL server's ended sessions used, when this
# script started the server (its postmaster counts the time of the children it reaped).
server_cpu() {
  local pid
  if [ -n "$STARTED_PG" ] && pid=$(head -n 1 "$POSTGRES_DIR/data/postmaster.pid" 2>/dev/null); then
    awk -v hz="$(getconf CLK_TCK)" '{ print ($16 + $17) / hz }' "/proc/$pid/stat"
  else
    echo 0
  fi
}

# Runs the command, printing its wall time (s), peak RSS (MiB) and CPU time (s, or - when
# unknown) on stdout.
measure() {
  local start end rss cpu=-
  if [ -x /usr/bin/time ]; then
    start=$(date +%s.%N)
    /usr/bin/time -v -o "$W/time.txt" "$@" > "$W/out.txt" 2> "$W/err.txt"
    end=$(date +%s.%N)
    rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$W/time.txt")
    cpu=$(awk -F': ' '/(User|System) time/ { t += $2 } END { print t }' "$W/time.txt")
  else
    start=$(date +%s.%N)
    "$@" > "$W/out.txt" 2> "$W/err.txt" &
    local pid=$! peak=0 now
    while kill -0 "$pid" 2>/dev/null; do
      now=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
      [ "${now:-0}" -gt "$peak" ] && peak=$now
      sleep 0.05
    done
    wait "$pid"
    end=$(date +%s.%N)
    rss=$peak
  fi
  echo "$(awk "BEGIN { print $end - $start }") $((rss / 1024)) $cpu"
}

run_import() {  # label, store URL
  local secs mib cpu server0 server
  server0=$(server_cpu)
  read -r secs mib cpu < <(measure "$BIN" consent import --store "$2" --by bench "$W/consents.jsonl")
  server=$(awk "BEGIN { print $(server_cpu) - $server0 }")
  printf '%-38s %7.2f s %8.0f consents/s %5d MiB peak RSS  CPU: %s s import, %s s server\n    %s\n' \
    "$1" "$secs" "$(awk "BEGIN { print $N / $secs }")" "$mib" "$cpu" "$server" "$(tail -n 1 "$W/out.txt")"
}

echo "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs (the rates are wall-clock)"

if [[ " $STORES " == *" sqlite "* ]]; then
  run_import "sqlite (new file)" "sqlite:$W/consent.db"
  run_import "sqlite (again: unchanged)" "sqlite:$W/consent.db"
  echo "sqlite file: $(du -m "$W/consent.db" | cut -f1) MiB"
fi
if [[ " $STORES " != *" postgres "* ]]; then
  exit 0
fi

if [ -z "${RESIDENCY_TEST_POSTGRES:-}" ]; then
  source "$ROOT/.ci/postgres.sh"
  postgres_start
  STARTED_PG=1
fi
PSQL=$(command -v psql || ls /usr/lib/postgresql/*/bin/psql | sort -V | tail -n 1)
DB=rp_import_$$
"$PSQL" -q -d "$RESIDENCY_TEST_POSTGRES" -c "CREATE DATABASE $DB"
URL="${RESIDENCY_TEST_POSTGRES%/*}/$DB"
run_import "postgres (new database)" "$URL"
run_import "postgres (again: unchanged)" "$URL"
"$PSQL" -q -d "$RESIDENCY_TEST_POSTGRES" -c "DROP DATABASE $DB"
