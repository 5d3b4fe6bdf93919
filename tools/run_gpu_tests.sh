#!/bin/bash
# Runs the GPU tests (marker "gpu") in SHARDS parallel pytest processes on one GPU, each limited to
# TIMEOUT seconds (then interrupted, so that pytest still reports its failures): compilation is
# CPU-bound, so shards finish the suite several times faster than one process. Tests whose ids
# match $ALONE (default: the 128k-token test, which takes tens of GiB of GPU memory, enough to make
# the shards beside it run out on an 80 GiB card) run after the shards, alone, within $ALONE_TIMEOUT
# seconds (default TIMEOUT).
# Logs go to $OUT (default: a new temporary folder); a summary per shard is printed.
#   usage: tools/run_gpu_tests.sh SHARDS TIMEOUT [pytest selection...]
#   e.g.   tools/run_gpu_tests.sh 8 450 tests/
set -u
N=$1; T=$2; shift 2
OUT=${OUT:-$(mktemp -d)}
ALONE=${ALONE:-128k_tokens}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD}
ids=$(mktemp)
python -m pytest --collect-only -q -m gpu "$@" -p no:cacheprovider 2>/dev/null | grep "::" > "$ids"
grep -E -- "$ALONE" "$ids" > "$ids.alone"
grep -v -E -- "$ALONE" "$ids" > "$ids.sharded"
echo "$(wc -l < "$ids.sharded") tests in $N shards, then $(wc -l < "$ids.alone") alone; logs in $OUT"
run() {  # log file, test ids file, seconds
  timeout -s INT -k 30 "$3" python -m pytest -q -rfEs -p no:cacheprovider -m gpu $(cat "$2") > "$1" 2>&1
  echo "rc=$?" >> "$1"
}
for i in $(seq 0 $((N - 1))); do
  awk -v n="$N" -v i="$i" 'NR % n == i' "$ids.sharded" > "$ids.$i"
  run "$OUT/shard$i.log" "$ids.$i" "$T" &
done
wait
logs=$(seq -f "$OUT/shard%g.log" 0 $((N - 1)))
if [ -s "$ids.alone" ]; then
  run "$OUT/alone.log" "$ids.alone" "${ALONE_TIMEOUT:-$T}"
  logs="$logs $OUT/alone.log"
fi
status=0
for log in $logs; do
  echo "== $(basename "$log" .log)"; grep -E "passed|failed|rc=|^FAILED|^ERROR|^SKIPPED" "$log" | tail -20
  grep -q "rc=0" "$log" || status=1
done
exit $status
