#!/bin/bash
# One stage of the GPU work that the open performance issues need, sized to finish within one
# device command (600 s); every result goes under $OUT (the JSON, logs, summaries).
#   usage: tools/gpu_round.sh STAGE
# stages:
#   tests    the GPU tests of tests/test_gpu.py (tools/run_gpu_tests.sh, 8 shards, then the
#            128k-token tests alone), logs packed into $OUT/gpu-tests.tgz
#   tests2   the GPU tests of every other file, logs packed into $OUT/gpu-tests2.tgz
#   decode   benchmarks/test_decode.py: eager decoding at cache 1k and 8k (batch 1, 8, 64, full and
#            spread lengths, contiguous and paged, static and symbolic batch), with summaries
#   varlen   benchmarks/test_decode.py: the packed variable-length training
#   decode2  benchmarks/test_decode.py: eager decoding at cache 32k, compiled steps at batch 8
#   gap      tools/raw_flex_gap.py at N = 1024, D = 128 (sliding window, document, key padding),
#            with the host-time profile
#   d64      the masked cases at D = 64 against raw FlexAttention and SDPA cuDNN, N = 1k-16k
#   decode3  tools/decode_profile.py: compiled decoding steps at cache 8k, batch 1 and 64, contiguous
#            and paged, with FlexAttention's SPLIT_KV at 16 and 64 (batch 8 at 32k was measured)
#   compat   every GPU test of tests/test_flash_attn_compat.py; compiled paged decoding steps at
#            batch 8 and 64, cache 8k, with bf16 pages read in place inside the step too (the
#            variant's output against the eager call: max diff)
#   inplace  after bf16 pages were read in place inside a caller's compile too: the compat GPU tests of
#            compiled and in-place steps, compiled paged decoding at batch 1, 8 and 64 (cache 8k, spread:
#            decode_profile)
#   paged    eager paged decoding steps at batch 1, 8 and 64 in turn in one process, bf16 pages read in
#            place (forced) and gathered (the default): per batch, time and top kernels
#   decode8k the compiled and eager rows of benchmarks/test_decode.py at cache 8k (flexflash as it is, SDPA;
#            eagerly also kept on FlexAttention, flexflash-flex)
#   static   after compiled decoding steps held their tensors at static addresses (no copy of the cache
#            per CUDA-graph replay) and eager bf16 steps over large paged caches read them in place: the
#            compat GPU tests of in-place and compiled steps, the rows of decode8k, compiled steps at 32k
#   verify   what the static run left open: the reduce-overhead tests (which now assert that no graph
#            ran without CUDA graphs), eager paged steps at batch 8 and 64 under the default rule (the
#            top kernels tell in place from gathered) and the benchmark's batch-64 paged eager rows,
#            the kernels of compiled steps at batch 1 (8k, 32k)
#   tiles    the reduce-overhead tests (block masks by the chunked evaluation and by the builders'
#            body traced into the caller's graph), FlexAttention's decoding kernel under other kernel
#            options (tools/decode_tiles.py: tiles, stages, warps, splits; batch 1, 8, 64 at cache 8k,
#            spread lengths), the compiled rows of benchmarks/test_decode.py at cache 8k
#   tiles2   the same within 400 s: the tests, batch 1 and 64, fewer option sets
#   tiles3   after tiles2: the option sets that held up there, batch 1, 8 and 64, each step also by its
#            kernels' GPU time; compiled steps with the block mask traced by the builders' body
#            against the chunked evaluation (batch 1, 8, 64 at 8k, spread lengths)
#   decide   with the candidates on (tools/run_with.py: traced block masks, a three-stage decoding kernel):
#            the reduce-overhead tests, the
#            compiled rows of benchmarks/test_decode.py at 8k; then tiles3's sweep (3 sets) and compiled
#            steps traced against chunked at batch 64
#   traced   compiled decoding steps with the block mask traced by the builders' body against the
#            chunked evaluation (tools/decode_profile.py --variants chunked; batch 1, 8, 64 at 8k), with
#            the kernels of each step at batch 1
#   tuned    after the decoding kernel's options were chosen: flash-attn's GPU tests, the compiled rows of
#            benchmarks/test_decode.py at cache 8k and 32k
#   checks   the decoding tests past 32-bit indices, the SDPA route of short masked calls, the
#            tuned-tile and max-autotune tests (one shard, after it was cut at 440 s), the GPU tests
#            of flash-attn's decoding
#   callers  with block masks traced by the builders' body by default on CUDA: every GPU test outside
#            tests/test_gpu.py and those of it in a caller's torch.compile (8 shards, then the test
#            past 32-bit indices alone); then where compiled decoding steps spend their time between
#            the host and the GPU (tools/replay_host.py: batch 1 and 64, cache 8k, spread lengths)
#   guards   what the compiled decoding step's guards cost on the host (tools/replay_host.py with torch's
#            guard filters, batch 1 and 64, cache 8k, spread), then the decoding kernel with 128-key tiles
#            and four warps (tools/run_with.py): the reduce-overhead tests, the compiled rows at 8k
#   recheck  after the paged in-place rule compared with guards: the callers stage's tests; each compiled step's
#            guard tree and the time of one check of it (batch 1 and 8, contiguous, with the guard
#            filters); the kernels of compiled steps at batch 1 (contiguous, paged)
#   rows     the compiled rows of benchmarks/test_decode.py at cache 8k (flexflash, flexflash-guards, SDPA)
#   splits   the decoding kernel's splits with three stages (tools/decode_tiles.py, batch 8 and 64)
#   wide     after the decoding entry's wide tiles (128-key tiles of four warps from a (batch, kv head)
#            pair an SM on): the callers stage's tests, then the rows stage's rows
set -u
case "${1:-}" in recheck|rows|splits|wide|tests|tests2|decode|varlen|decode2|gap|d64|decode3|compat|inplace|paged|decode8k|static|verify|tiles|tiles2|tiles3|decide|traced|tuned|checks|callers|guards) ;; *) awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"; exit 2 ;; esac
OUT=${OUT:-$(mktemp -d)}
export PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name --format=csv,noheader
python -c "import torch; print('torch', torch.__version__)"

step() {  # name, seconds, command...: the command's output to $OUT/name.log, its tail printed
  local name=$1 limit=$2; shift 2
  echo "=== $name"
  timeout -s INT -k 20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$?"
  tail -5 "$OUT/$name.log"
}

gpu_tests() {  # name, seconds, pytest selection...: GPU tests, their failures (and skipped CUDA graphs) printed
  local name=$1 limit=$2; shift 2
  step "$name" "$limit" python -m pytest -q -rfEsxX -p no:cacheprovider -m gpu "$@"
  grep -E "^(FAILED|ERROR|XPASS)|Error:|skipping cudagraphs" "$OUT/$name.log" | head -20
}

decode() {  # name, seconds, -k expression
  step "$1" "$2" python -m pytest benchmarks/test_decode.py -q -p no:cacheprovider -k "$3" \
    --benchmark-json="$OUT/$1.json"
  [ -s "$OUT/$1.json" ] && python tools/run_benchmarks.py --summarize-decode "$OUT/$1.json"
}

caller_tests() {  # name, seconds: every GPU test outside tests/test_gpu.py and those of it in a caller's
  # torch.compile (8 shards, then the test past 32-bit indices alone), logs packed into $OUT/name.tgz
  echo "=== $1"
  OUT=$OUT/t ALONE_TIMEOUT=90 tools/run_gpu_tests.sh 8 "$2" tests/test_flash_attn_compat.py tests/test_decoding_path.py tests/test_traced.py \
    tests/test_parallel.py tests/test_route.py \
    tests/test_gpu.py::test_modules_under_torch_compile_on_gpu \
    tests/test_gpu.py::test_short_calls_stay_on_flexattention_where_sdpa_does_not_fit \
    tests/test_gpu.py::test_decoding_at_128k_tokens_past_32_bit_indices
  grep -hE "^(FAILED|ERROR)|skipping cudagraphs| passed| failed" "$OUT"/t/*.log | head -30
  (cd "$OUT" && tar czf "$1.tgz" t && rm -rf t)
}

case "${1:-}" in
recheck)
  caller_tests recheck-tests 230
  step guard-trees 120 python tools/replay_host.py --batch 1,8 --cache 8192 --lengths spread --layout contiguous \
    --guard-filters --guards "$OUT/guard-trees" --rounds 3
  grep -E "^guards:" "$OUT/guard-trees.log"; grep -A10 "^| batch" "$OUT/guard-trees.log"
  step kernels1 80 python tools/decode_profile.py --batch 1 --cache 8192 --layout contiguous,paged \
    --lengths spread --kernels 14
  grep -vE "^\s*$" "$OUT/kernels1.log" | tail -40 ;;
wide)
  caller_tests wide-tests 230 ;&  # (then the rows stage's rows)
rows)
  decode rows-8k 300 "compiled and 8192 and not flexflash-flex" ;;
splits)
  step splits 150 python tools/decode_tiles.py --kernel-time --batch 8,64 --cache 8192 --lengths spread --options \
"num_stages=3;num_stages=3,SPLITx=2;num_stages=3,SPLITx=4;num_stages=3,num_warps=4,SPLITx=2;BLOCK_N=128,num_stages=3,num_warps=4"
  grep -vE "Warning|warn" "$OUT/splits.log" | tail -14 ;;
tests)
  # (in one command the whole GPU suite did not finish on an H100: 10 shards of 330 s; on an H200
  # 7 of 8 shards took 161-300 s, one was cut at 440 s)
  OUT=$OUT/t ALONE_TIMEOUT=120 tools/run_gpu_tests.sh 8 400 tests/test_gpu.py
  (cd "$OUT" && tar czf gpu-tests.tgz t && rm -rf t) ;;
tests2)
  OUT=$OUT/t tools/run_gpu_tests.sh 8 480 tests/ --ignore=tests/test_gpu.py
  (cd "$OUT" && tar czf gpu-tests2.tgz t && rm -rf t) ;;
decode)
  decode decode-eager 330 "test_decode and eager and (1024 or 8192)" ;;
varlen)
  decode varlen 150 "varlen" ;;
decode2)
  decode decode-eager-32k 250 "test_decode and eager and 32768"
  decode decode-compiled 250 "test_decode and compiled and 8-8192" ;;
gap)
  step gap 500 python tools/raw_flex_gap.py --cases sliding_window,document,key_padding --n 1024 --d 128 --host 25
  tail -120 "$OUT/gap.log" ;;
d64)
  for case in document sliding_window_512 key_padding; do
    step "d64-$case" 170 python tools/run_benchmarks.py --out "$OUT/d64-$case" --dtypes bfloat16 \
      --cases "$case" --n 1024,4096,16384 --d 64 --impls flexflash,flex-raw,sdpa-cudnn
  done ;;
decode3)
  step decode-profile 380 python tools/decode_profile.py --batch 1,64 --cache 8192 --layout contiguous,paged \
    --lengths spread --variants split16,split64 --kernels 0
  tail -80 "$OUT/decode-profile.log" ;;
compat)
  gpu_tests compat 330 tests/test_flash_attn_compat.py
  step decode-inplace 200 python tools/decode_profile.py --batch 8,64 --cache 8192 --layout paged \
    --lengths spread --variants inplace --kernels 0
  tail -4 "$OUT/decode-inplace.log" ;;
inplace)
  gpu_tests inplace-tests 200 tests/test_flash_attn_compat.py -k "reduce_overhead or in_place or kvcache"
  step decode-paged 150 python tools/decode_profile.py --batch 1,8,64 --cache 8192 --layout paged --lengths spread --kernels 0
  tail -5 "$OUT/decode-paged.log" ;;
paged)
  for pages in inplace gathered; do
    step "paged-$pages" 150 python tools/eager_host_profile.py --paged-batches 1,8,64 --pages "$pages"
    grep -E "^==|^ +[0-9]" "$OUT/paged-$pages.log"
  done ;;
decode8k)
  decode decode-compiled-8k 300 "compiled and 8192 and not flexflash-flex"
  decode decode-eager-8k 200 "eager and 8192" ;;
static)
  gpu_tests static-tests 150 tests/test_flash_attn_compat.py -k "reduce_overhead or in_place"
  decode decode-compiled-8k 200 "compiled and 8192 and not flexflash-flex"
  decode decode-eager-8k 150 "eager and 8192"
  decode decode-compiled-32k 150 "compiled and 32768 and not flexflash-flex" ;;
verify)
  gpu_tests verify-tests 150 tests/test_flash_attn_compat.py -k "reduce_overhead"
  step verify-paged 120 python tools/eager_host_profile.py --paged-batches 8,64
  grep -E "^==|^ +[0-9]" "$OUT/verify-paged.log"
  decode verify-paged-rows 120 "eager and 64-8192 and paged"
  step verify-kernels 240 python tools/decode_profile.py --batch 1 --cache 8192,32768 --layout contiguous,paged \
    --lengths full,spread --kernels 12
  grep -vE "^\s*$" "$OUT/verify-kernels.log" | tail -150 ;;
tiles)
  gpu_tests tiles-tests 170 tests/test_flash_attn_compat.py -k "reduce_overhead"
  step tiles 230 python tools/decode_tiles.py --batch 1,64,8 --cache 8192 --lengths spread --options "default;\
num_stages=3;BLOCK_N=64,num_stages=3,num_warps=4;fwd_BLOCK_N=64,fwd_num_stages=3,fwd_num_warps=4;\
BLOCK_N=64,num_stages=4,num_warps=4;BLOCK_N=128,num_stages=3,num_warps=4;BLOCK_N=128,num_stages=3,num_warps=8;\
SPLITx=2;BLOCK_N=64,num_stages=3,num_warps=4,SPLITx=2"
  grep -vE "Warning|warn" "$OUT/tiles.log" | tail -45
  decode decode-compiled-8k 180 "compiled and 8192 and not flexflash-flex" ;;
tiles2)  # (tiles within 400 s: the tests, batch 1 and 64, fewer option sets)
  gpu_tests tiles-tests 150 tests/test_flash_attn_compat.py -k "reduce_overhead"
  step tiles 210 python tools/decode_tiles.py --batch 1,64 --cache 8192 --lengths spread --options "default;\
num_stages=3;BLOCK_N=64,num_stages=3,num_warps=4;fwd_BLOCK_N=64,fwd_num_stages=3,fwd_num_warps=4;\
BLOCK_N=128,num_stages=3,num_warps=4;SPLITx=2;BLOCK_N=64,num_stages=3,num_warps=4,SPLITx=2"
  grep -vE "Warning|warn" "$OUT/tiles.log" | tail -30 ;;
tiles3)
  step tiles3 240 python tools/decode_tiles.py --kernel-time --batch 1,8,64 --cache 8192 --lengths spread --options \
"default;num_stages=3;num_stages=3,num_warps=4;BLOCK_N=128,num_stages=3,num_warps=4;SPLITx=2;num_stages=3,SPLITx=2;\
BLOCK_N=128,num_stages=3,num_warps=4,SPLITx=2;num_stages=3,SPLITx=4"
  grep -vE "Warning|warn" "$OUT/tiles3.log" | tail -6
  step traced3 250 python tools/decode_profile.py --batch 1,8,64 --cache 8192 --layout contiguous,paged \
    --lengths spread --variants chunked --kernels 0
  tail -12 "$OUT/traced3.log" ;;
decide)
  step decide-tests 100 python tools/run_with.py --traced --decoding fwd_num_stages=3 -- -q -rfEsxX \
    -p no:cacheprovider -m gpu tests/test_flash_attn_compat.py -k "reduce_overhead"
  grep -E "^(FAILED|ERROR)|Error:|skipping cudagraphs|passed|failed" "$OUT/decide-tests.log" | head
  step decide-8k 220 python tools/run_with.py --traced --decoding fwd_num_stages=3 -- \
    benchmarks/test_decode.py -q -p no:cacheprovider -k "compiled and 8192 and not flexflash-flex" \
    --benchmark-json="$OUT/decide-8k.json"
  [ -s "$OUT/decide-8k.json" ] && python tools/run_benchmarks.py --summarize-decode "$OUT/decide-8k.json"
  step tiles3 120 python tools/decode_tiles.py --kernel-time --batch 1,8,64 --cache 8192 --lengths spread --options \
"default;num_stages=3;BLOCK_N=128,num_stages=3,num_warps=4"
  grep -vE "Warning|warn" "$OUT/tiles3.log" | tail -4
  step traced3 80 python tools/decode_profile.py --batch 64 --cache 8192 --layout contiguous,paged \
    --lengths spread --variants chunked --kernels 0
  tail -4 "$OUT/traced3.log" ;;
traced)
  step traced-kernels 200 python tools/decode_profile.py --batch 1 --cache 8192 --layout contiguous,paged \
    --lengths spread --variants chunked --kernels 14
  grep -vE "^\s*$" "$OUT/traced-kernels.log" | tail -80
  step traced 230 python tools/decode_profile.py --batch 8,64 --cache 8192 --layout contiguous,paged \
    --lengths full,spread --variants chunked --kernels 0
  tail -12 "$OUT/traced.log" ;;
tuned)
  gpu_tests tuned-tests 200 tests/test_flash_attn_compat.py
  decode decode-compiled-8k 200 "compiled and 8192 and not flexflash-flex"
  decode decode-compiled-32k 150 "compiled and 32768 and not flexflash-flex" ;;
checks)
  gpu_tests checks 270 tests/test_gpu.py tests/test_flash_attn_compat.py \
    -k "32_bit or short_calls or processs_first or (max_autotune and sliding_window) or (masked_calls_with_tuned_tiles and 97-1025-sliding_window) or (tuned_tiles_fp16_and_d64 and dtype2-64-sliding_window-128-64) or reduce_overhead_on_gpu or varlen_and_kvcache_on_gpu" ;;
guards)
  step guards 170 python tools/replay_host.py --batch 1,64 --cache 8192 --lengths spread \
    --layout contiguous,paged --guard-filters
  grep -A12 "^| batch" "$OUT/guards.log"
  T128="fwd_BLOCK_N=128,fwd_num_stages=3,fwd_num_warps=4"
  step t128-tests 100 python tools/run_with.py --decoding "$T128" -- -q -rfEsxX -p no:cacheprovider -m gpu \
    tests/test_flash_attn_compat.py -k "reduce_overhead and 128"
  grep -E "^(FAILED|ERROR)|Error:|skipping cudagraphs|passed|failed" "$OUT/t128-tests.log" | head
  step t128-8k 200 python tools/run_with.py --decoding "$T128" -- benchmarks/test_decode.py -q -p no:cacheprovider \
    -k "compiled and 8192 and not flexflash-flex" --benchmark-json="$OUT/t128-8k.json"
  [ -s "$OUT/t128-8k.json" ] && python tools/run_benchmarks.py --summarize-decode "$OUT/t128-8k.json" ;;
callers)
  caller_tests callers-tests 250
  step replay 160 python tools/replay_host.py --batch 1,64 --cache 8192 --lengths spread \
    --layout contiguous,paged --profile 14
  grep -A8 "^| batch" "$OUT/replay.log" ;;
esac
