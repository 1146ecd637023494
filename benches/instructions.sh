#!/usr/bin/env bash
# Instructions per request on the proxy's own thread, counted by valgrind (callgrind): unlike
# requests per second on a shared VM, which drift by 30% from run to run, the count repeats to
# within 0.5%, so that a change worth a few percent can be seen. It runs the allocation
# benchmark (benches/alloc.rs: the real proxy, a client and an upstream in one process, the
# proxy on a thread of its own) twice, with 500 and 1,500 requests, and divides the difference
# by the 2,000 extra requests, so that start-up is not counted.
#
#   benches/instructions.sh              # forwarded requests (1 KiB GET under consent)
#   benches/instructions.sh refused      # refused requests (no consent)
#   BENCH=/path/to/alloc-binary benches/instructions.sh   # another build's benchmark binary
#
# Under valgrind aws-lc hashes with its AVX code (valgrind has no SHA extensions), which makes
# SHA-256 look several times dearer than on hardware that has them; compare builds with each
# other, not with a profile taken on the hardware. Needs valgrind (apt-get install valgrind).
set -euo pipefail
cd "$(dirname "$0")/.."
CASE=${1:-forwarded}
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 2; }
if [ -z "${BENCH:-}" ]; then
  BENCH=$(cargo bench --bench alloc --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "alloc" and m.get("executable"):
        print(m["executable"])')
fi
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
for n in 500 1500; do
  CASE=$CASE REQUESTS=$n valgrind --tool=callgrind --separate-threads=yes --dump-instr=no \
    --callgrind-out-file="$W/cg.$n" "$BENCH" > /dev/null 2>&1
  # The proxy's thread is the one that ran the decision-log committer.
  best=0
  for f in "$W/cg.$n"-*; do
    grep -q Committer "$f" || continue
    ir=$(awk '/^summary:/{print $2; exit}' "$f")
    [ "$ir" -gt "$best" ] && best=$ir
  done
  echo "$n $best" >> "$W/totals"
done
# Each case sends REQUESTS unmeasured and REQUESTS measured requests: 2 x 1,000 more.
awk -v c="$CASE" 'NR==1{n=$1; a=$2} NR==2{printf "%s: %.0f instructions per request on the proxy thread\n", c, ($2-a)/(($1-n)*2)}' "$W/totals"
