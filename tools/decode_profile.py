"""Where a compiled decoding step's GPU time goes: ``flash_attn_with_kvcache`` (one query token per
sequence, the cases of ``benchmarks/test_decode.py``) against SDPA on the padded cache with a key
padding mask, each step compiled (``torch.compile(fullgraph=True)``) as a generation loop runs it.

Per case it prints the median ms of a step under ``mode="reduce-overhead"`` (CUDA graphs: the
kernels' own time, as the benchmark measures it), the largest difference of each variant's
compiled output from flexflash's eager call (``max diff``) and, from the profiler over 20 steps compiled in
the default mode, every GPU kernel of a step with its µs per step: the attention kernel(s) apart
from what builds the block mask and the mask.

``--variants`` also times flexflash with changes made here (around ``flex_attention``, or through
a switch of the library's), each a ``+``-joined list of:

* ``splitN``: FlexAttention's decoding kernel given ``SPLIT_KV = N`` (its default is
  ``2 * SMs // (batch * kv_heads)``: 4 at batch 8 on 132 SMs, so 256 programs each walk a quarter
  of the cache), to see whether more splits bring a step nearer the memory bandwidth;
* ``full``: the lists of full blocks passed to FlexAttention as flexflash did before
  (``flexflash._flex._DECODING_FULL_BLOCKS``). A decoding step's query block is incomplete, so
  those lists are empty, but given at all they make FlexAttention's decoding kernel split the whole
  cache length (``HAS_FULL_BLOCKS``: ``TILE_KV = cdiv(KV_LEN, SPLIT_KV)``) rather than each
  sequence's own blocks, so a shorter sequence's programs do not finish sooner; flexflash now
  leaves them out (``_flex._without_full_blocks``);
* ``inplace``: 16-bit paged caches read in place by every CUDA call (``flexflash._paged.IN_PLACE_DTYPES``;
  by default float32 pages are, and bfloat16 ones in decoding steps inside a caller's compile, as
  the steps timed here: for them the variant equals the default; float16 pages are gathered);
* ``chunked``: the step's block mask built inside the caller's graph by the chunked evaluation
  (``flexflash._blockmask.TRACED_FUSED_ON``, ``flexflash._paged.TRACED_BUILDS_ON`` emptied), query
  chunks padded to 128 rows a block, where flexflash's default on CUDA traces the compiled builders'
  body, one evaluation of the mask fused into the block reductions over the step's one query row;
* ``general``: the step through flexflash's general path (:func:`flexflash.attention` and its block-mask
  builders) rather than the short decoding path (``flexflash.compat._decoding.TRACED_ON`` emptied),
  the path of every variant above.

Usage on a CUDA machine::

    python tools/decode_profile.py [--batch 1,8,64] [--cache 8192,32768] [--lengths full,spread]
                                   [--layout contiguous,paged] [--variants split16,full,split32+full]
                                   [--kernels 12]

``FLEXFLASH_BENCH_DEVICE=cpu`` runs the benchmark's small CPU shapes (default mode, wall clock): a
smoke run of this script, no measurement.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import test_decode as bench  # noqa: E402  (the benchmark's shapes and lengths)
from raw_flex_gap import timed  # noqa: E402  (this folder's: median ms after warm-up, CUDA events on a GPU)

from flexflash import _blockmask, _flex, _kernels, _paged  # noqa: E402
from flexflash.compat import _decoding  # noqa: E402
from flexflash.compat.flash_attn import flash_attn_with_kvcache  # noqa: E402

_FLEX = _kernels.flex_attention
DEV = bench.DEVICE


def _variant(name: str):
    """``flex_attention`` changed as ``name`` says (see the module's docstring) for calls of fewer
    than 128 queries."""
    parts = [x for x in name.split("+") if x and x not in ("default", "full", "inplace", "chunked", "general")]
    split = next((int(x[5:]) for x in parts if x.startswith("split")), None)

    def flex(q, k, v, *args, kernel_options=None, **kw):
        if q.shape[-2] < 128 and split:
            kernel_options = {**(kernel_options or {}), "SPLIT_KV": split}
        return _FLEX(q, k, v, *args, kernel_options=kernel_options, **kw)
    return flex


def case(B: int, S: int, spread: bool, paged: bool):
    """(flexflash step, SDPA step) of one benchmark case."""
    gen = torch.Generator().manual_seed(B * 100003 + S)
    lens = bench._lengths(B, S, spread, gen).to(DEV)
    k_cache, v_cache = (torch.randn(B, S, bench.HKV, bench.D, generator=gen).to(DEV, bench.DTYPE) for _ in range(2))
    q = torch.randn(B, 1, bench.HQ, bench.D, generator=gen).to(DEV, bench.DTYPE)
    qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    positions = torch.arange(S, device=DEV)

    def sdpa():
        mask = (positions[None, :] < lens[:, None])[:, None, None, :]
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)

    table = None
    if paged:
        pages = torch.randperm(B * S // bench.PAGE, generator=gen)
        table = pages.view(B, S // bench.PAGE).to(DEV, torch.int32)
        order = torch.argsort(pages)
        k_cache, v_cache = (c.view(B * S // bench.PAGE, bench.PAGE, bench.HKV, bench.D)[order].contiguous()
                            for c in (k_cache, v_cache))

    def flex():
        return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, block_table=table, causal=True)

    return flex, sdpa


def graphed_ms(step, reps: int = 50) -> tuple[float, torch.Tensor]:
    """Median ms of a step compiled with CUDA graphs (on CPU: the default mode, wall clock), its
    tensors at static addresses (``bench.static_closure``), and the step's output."""
    torch._dynamo.reset()
    fn = torch.compile(bench.static_closure(step), mode="default" if bench.CPU else "reduce-overhead", fullgraph=True)
    skips = bench.counters["inductor"]["cudagraph_skips"]
    with torch.no_grad():
        ms = timed(fn, DEV, reps)
        if not bench.CPU and bench.counters["inductor"]["cudagraph_skips"] > skips:
            print("  (this step ran without CUDA graphs: Inductor skipped them, its log says why)", flush=True)
        return ms, fn().clone()


def kernels(step, top: int, steps: int = 20) -> list[tuple[str, int, float]]:
    """(kernel name, launches per step, µs per step) of a step compiled in the default mode."""
    torch._dynamo.reset()
    fn = torch.compile(step, fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            fn()
        bench._sync()
        activity = torch.profiler.ProfilerActivity.CPU if bench.CPU else torch.profiler.ProfilerActivity.CUDA
        with torch.profiler.profile(activities=[activity]) as prof:
            for _ in range(steps):
                fn()
            bench._sync()
    count, total = defaultdict(int), defaultdict(float)
    kind = torch.autograd.DeviceType.CPU if bench.CPU else torch.autograd.DeviceType.CUDA
    for e in prof.events():
        if e.device_type == kind and (not bench.CPU or e.name.startswith(("cpp_", "graph_", "aten::"))):
            count[e.name] += 1
            total[e.name] += e.self_cpu_time_total if bench.CPU else e.device_time
    rows = sorted(((n, count[n] // steps, total[n] / steps) for n in count), key=lambda r: -r[2])
    return rows[:top]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", default="1,8,64")
    p.add_argument("--cache", default="8192,32768")
    p.add_argument("--lengths", default="full,spread")
    p.add_argument("--layout", default="contiguous,paged")
    p.add_argument("--variants", default="", help="changes to time besides flexflash as it is: splitN, full, "
                                                  "inplace, chunked, joined by + (e.g. split32+full), comma-separated")
    p.add_argument("--kernels", type=int, default=12, help="kernels listed per step (0: none)")
    a = p.parse_args()
    variants = [x for x in a.variants.split(",") if x]
    if not bench.CPU:
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"{torch.cuda.get_device_properties('cuda').multi_processor_count} SMs")
    summary = []
    for B in (int(x) for x in a.batch.split(",")):
        for S in (int(x) for x in a.cache.split(",")):
            for lengths in a.lengths.split(","):
                for layout in a.layout.split(","):
                    flex, sdpa = case(B, S, lengths == "spread", layout == "paged")
                    row = dict(B=B, S=S, lengths=lengths, layout=layout, sdpa=graphed_ms(sdpa)[0])
                    with torch.no_grad():
                        want = flex().float()  # the eager call: each variant's compiled output against it
                    for variant in ["default", *variants]:
                        _kernels.flex_attention = _variant(variant)
                        _flex._DECODING_FULL_BLOCKS = "full" in variant.split("+")
                        in_place = dict(_paged.IN_PLACE_DTYPES)
                        if "inplace" in variant.split("+"):
                            _paged.IN_PLACE_DTYPES["cuda"] = (torch.float32, torch.float16, torch.bfloat16)
                        traced = _blockmask.TRACED_FUSED_ON, _paged.TRACED_BUILDS_ON
                        if "chunked" in variant.split("+"):
                            _blockmask.TRACED_FUSED_ON, _paged.TRACED_BUILDS_ON = set(), set()
                        short = set(_decoding.TRACED_ON)
                        if variant != "default":  # (every variant but the default is of the general path)
                            _decoding.TRACED_ON.clear()
                        try:
                            row[f"flexflash {variant}"], got = graphed_ms(flex)
                            row[f"{variant} max diff"] = float((got.float() - want).abs().max())
                        except Exception as e:  # noqa: BLE001  (a configuration the lowering rejects)
                            row[f"flexflash {variant}"] = f"{type(e).__name__}: {str(e)[:80]}"
                        finally:
                            _kernels.flex_attention = _FLEX
                            _flex._DECODING_FULL_BLOCKS = False
                            _paged.IN_PLACE_DTYPES.update(in_place)
                            _blockmask.TRACED_FUSED_ON, _paged.TRACED_BUILDS_ON = traced
                            _decoding.TRACED_ON.update(short)
                    summary.append(row)
                    print(row, flush=True)
                    if a.kernels:
                        for name, step in (("flexflash", flex), ("sdpa", sdpa)):
                            print(f"  {name} kernels per step (launches, µs):")
                            for kname, n, us in kernels(step, a.kernels):
                                print(f"    {us:8.1f} µs  x{n}  {kname[:110]}")
                    if not bench.CPU:
                        torch.cuda.empty_cache()
    print("\n| batch | cache | lengths | layout | " + " | ".join(k for k in summary[0] if k not in
                                                            ("B", "S", "lengths", "layout")) + " |")
    for row in summary:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
