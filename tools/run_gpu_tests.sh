#!/bin/bash
# Runs the GPU tests (marker "gpu") in SHARDS parallel pytest processes on one GPU, each limited to
# TIMEOUT seconds (then interrupted, so that pytest still reports its failures): compilation is
# CPU-bound, so shards finish the suite several times faster than one process. Logs go to $OUT (default: a new temporary folder); a summary per shard is printed.
#   usage: tools/run_gpu_tests.sh SHARDS TIMEOUT [pytest selection...]
#   e.g.   tools/run_gpu_tests.sh 8 450 tests/
set -u
N=$1; T=$2; shift 2
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD}
ids=$(mktemp)
python -m pytest --collect-only -q -m gpu "$@" -p no:cacheprovider 2>/dev/null | grep "::" > "$ids"
echo "$(wc -l < "$ids") tests in $N shards; logs in $OUT"
for i in $(seq 0 $((N - 1))); do
  awk -v n="$N" -v i="$i" 'NR % n == i' "$ids" > "$ids.$i"
  (timeout -s INT -k 30 "$T" python -m pytest -q -rfEs -p no:cacheprovider -m gpu $(cat "$ids.$i") > "$OUT/shard$i.log" 2>&1
   echo "rc=$?" >> "$OUT/shard$i.log") &
done
wait
status=0
for i in $(seq 0 $((N - 1))); do
  echo "== shard $i"; grep -E "passed|failed|rc=|^FAILED|^ERROR|^SKIPPED" "$OUT/shard$i.log" | tail -20
  grep -q "rc=0" "$OUT/shard$i.log" || status=1
done
exit $status
