"""Where the host time of two eager calls goes that lose to their baseline by more than their
kernels explain: a decoding step (``flash_attn_with_kvcache``, batch 8, cache 8k, lengths spread
over 4x, 32/8 heads, D = 128, bf16) against SDPA on the padded cache with a mask built in the step,
and a training forward with a sliding window of 512 (B = 16, H = 32, N = 1024, D = 64, bf16, inputs
requiring grad) against ``torch.compile(flex_attention)`` with a block mask built once.

Per case and implementation it prints, in µs per call: the median of single calls each ended by a
synchronisation (as the benchmarks time them; CUDA events, ``raw_flex_gap.timed``), the mean of 50 calls queued between two
synchronisations (host time where the host is slower than the device), the operations with the
most host time (torch.profiler, self CPU µs per call) and, for flexflash, the Python functions
with the most own time (cProfile over 200 calls).

Usage on a CUDA machine::

    python tools/eager_host_profile.py [--cases decode,paged,window] [--top 20]

``paged``: the decoding step over the same caches as a pool of shuffled pages (``block_table``),
against flexflash's contiguous step. ``--paged-batches 1,8,64 [--pages inplace|gathered]``: the
paged step at each batch in turn in one process, its pages read in place or gathered (time, and
the compilations and top kernels of each batch).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import flexflash
from flexflash import mods
from flexflash.compat.flash_attn import flash_attn_with_kvcache
from raw_flex_gap import timed, top_host_ops, top_kernels  # this folder's: median ms (CUDA events), the profiler's ops


def decode_case(paged: bool = False, B: int = 8):
    S, HQ, HKV, D = 8192, 32, 8, 128
    gen = torch.Generator().manual_seed(B * 100003 + S)
    lens = torch.randint(S // 4, S + 1, (B,), generator=gen, dtype=torch.int32).cuda()
    k_cache, v_cache = (torch.randn(B, S, HKV, D, generator=gen).to("cuda", torch.bfloat16) for _ in range(2))
    q = torch.randn(B, 1, HQ, D, generator=gen).to("cuda", torch.bfloat16)
    qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    positions = torch.arange(S, device="cuda")

    def ours():
        with torch.no_grad():
            return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True)

    if paged:  # the same caches as pages of 256 tokens in a shuffled pool (benchmarks/test_decode.py's)
        pages = torch.randperm(B * S // 256, generator=gen)
        table = pages.view(B, S // 256).to("cuda", torch.int32)
        k_pool, v_pool = (c.view(-1, 256, HKV, D)[torch.argsort(pages)].contiguous() for c in (k_cache, v_cache))

        def paged_step():
            with torch.no_grad():
                return flash_attn_with_kvcache(q, k_pool, v_pool, cache_seqlens=lens, block_table=table, causal=True)
        return {"flexflash": paged_step, "flexflash contiguous": ours}

    def sdpa():
        with torch.no_grad():
            mask = (positions[None, :] < lens[:, None])[:, None, None, :]
            return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)
    return {"flexflash": ours, "SDPA": sdpa}


def window_case():
    B, H, N, D = 16, 32, 1024, 64
    gen = torch.Generator(device="cuda").manual_seed(N + D)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for _ in range(3))
    fn = mods.sliding_window(512, offset=0)
    block_mask = create_block_mask(fn, B, None, N, N, device="cuda")
    raw = torch.compile(flex_attention)
    return {"flexflash": lambda: flexflash.attention(q, k, v, mask_mod=fn),
            "raw FlexAttention": lambda: raw(q, k, v, block_mask=block_mask)}


def queued(fn, calls: int = 50) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e6 / calls


def python_functions(fn, top: int, calls: int = 200) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def paged_batches(batches: list[int], pages: str) -> None:
    """The paged decoding step at each batch of ``batches`` in turn, in this process (as
    benchmarks/test_decode.py runs them), its pages read in place by eager calls (``pages="inplace"``,
    forced) or gathered (``"gathered"``, the default of eager bf16 steps): synchronised ms, the
    kernels compiled meanwhile (none expected) and the top kernels by device time."""
    from flexflash import _compiled, _paged
    if pages == "inplace":
        _paged.IN_PLACE_DTYPES["cuda"] = (*_paged.IN_PLACE_DTYPES["cuda"], torch.bfloat16)
    for B in batches:
        step = decode_case(paged=True, B=B)["flexflash"]
        for _ in range(3):
            step()
        compiles = _compiled._STATS["compiles"]
        ms = timed(step, "cuda", 20)
        print(f"\n== paged {pages}, batch {B}: synchronised {ms * 1e3:.1f} µs, "
              f"compilations while timed {_compiled._STATS['compiles'] - compiles}")
        for kernel, us in top_kernels(step, "cuda", 4):
            print(f"  {us:8.1f}  {kernel}")
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="decode,window")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--paged-batches", default="", help="instead of --cases: the paged step at these batches "
                                                            "in turn, e.g. 1,8,64")
    parser.add_argument("--pages", default="gathered", choices=["gathered", "inplace"])
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; µs per call")
    if args.paged_batches:
        paged_batches([int(b) for b in args.paged_batches.split(",")], args.pages)
        return 0
    cases = {"decode": decode_case, "paged": lambda: decode_case(paged=True), "window": window_case}
    for name in args.cases.split(","):
        impls = cases[name]()
        for impl, fn in impls.items():
            for _ in range(5):
                fn()
            print(f"\n== {name} {impl}: synchronised {timed(fn, 'cuda', 50) * 1e3:.1f}, queued {queued(fn):.1f}")
            print("host operations (self CPU µs per call, calls per call, name):")
            for op, count, us in top_host_ops(fn, "cuda", args.top):
                print(f"  {us:8.1f}  {count:3d}  {op}")
            print("kernels (device µs per call):")
            for kernel, us in top_kernels(fn, "cuda", 8):
                print(f"  {us:8.1f}  {kernel}")
            if impl == "flexflash":
                print(python_functions(fn, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
