"""Where flexflash and raw FlexAttention differ on one masked case: forward and forward+backward
times of flexflash against ``torch.compile(flex_attention)`` with a block mask built once, compiled
with static and with dynamic shapes, and the GPU kernels each runs (the profiler's top kernels by
device time), in one process.

Usage on a CUDA machine::

    python tools/raw_flex_gap.py [--cases document,sliding_window,key_padding] [--n 4096,8192] [--d 128]
                                 [--host 20]

``--host K``: also the K operations with the most host time (self CPU time: Python-side ops,
kernel launches, copies, synchronisations) in 20 forward calls of flexflash and of raw static
FlexAttention, for calls that lose on host time rather than in their kernels.
``--device cpu`` runs the forward rows only (FlexAttention has no CPU backward), as a smoke run.
Shapes as in ``benchmarks/test_attention.py``: B*N = 16k tokens, hidden 2048, bf16 (fp32 on CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import flexflash
from flexflash import mods

CASES = ("document", "sliding_window", "key_padding", "prefix_lm")


def make(name: str, N: int, D: int, device: str, dtype: torch.dtype):
    """(q, k, v, flexflash keywords, mask_mod for raw FlexAttention) of one case."""
    H = 2048 // D
    B = max(1, 16384 // N)
    gen = torch.Generator(device=device).manual_seed(N + D)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=gen) for _ in range(3))
    if name == "document":  # 8 documents per sequence, causal within each
        cuts = torch.sort(torch.randperm(N - 1, device=device, generator=gen)[:7] + 1).values
        ids = torch.bucketize(torch.arange(N, device=device), cuts, right=True).expand(B, N).contiguous()
        fn = mods.and_masks(mods.document(ids), mods.causal(0))
        return q, k, v, dict(mask_mod=fn), fn
    if name == "sliding_window":
        fn = mods.sliding_window(1024)
        return q, k, v, dict(mask_mod=fn), fn
    if name == "key_padding":
        lengths = torch.tensor([N, 3 * N // 4, N // 2, N // 4], device=device).repeat(B)[:B]
        pad = torch.arange(N, device=device)[None] < lengths[:, None]
        return q, k, v, dict(mask=pad), mods.key_padding(mask=pad)
    if name == "prefix_lm":
        fn = mods.prefix_lm(torch.full((B,), N // 4, device=device), offset=0)
        return q, k, v, dict(mask_mod=fn), fn
    raise SystemExit(f"--cases: expected names from {CASES}, got {name!r}")


def timed(fn, device: str, reps: int = 20) -> float:
    """Median ms of ``fn()`` after three warm-up calls (CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _profiled(fn, device: str, activities: list, calls: int) -> list:
    """The profiler's averages per operation over ``calls`` calls of ``fn()``, after one warm-up call."""
    from torch.profiler import profile
    fn()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    return list(prof.key_averages())


def top_kernels(fn, device: str, count: int = 5, calls: int = 5) -> list[tuple[str, float]]:
    """The ``count`` GPU kernels of ``fn()`` with the most device time (µs per call)."""
    from torch.profiler import ProfilerActivity
    rows = sorted(_profiled(fn, device, [ProfilerActivity.CUDA], calls), key=lambda e: e.device_time_total,
                  reverse=True)[:count]
    return [(e.key[:70], e.device_time_total / calls) for e in rows]


def top_host_ops(fn, device: str, count: int, calls: int = 20) -> list[tuple[str, int, float]]:
    """The ``count`` operations of ``fn()`` with the most host time: (name, calls per call of
    ``fn``, self CPU µs per call of ``fn``)."""
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    rows = sorted(_profiled(fn, device, activities, calls), key=lambda e: e.self_cpu_time_total, reverse=True)[:count]
    return [(e.key[:70], e.count // calls, e.self_cpu_time_total / calls) for e in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="document")
    parser.add_argument("--n", default="4096,8192")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--host", type=int, default=0, help="print this many operations by host time")
    args = parser.parse_args()
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    grad = device == "cuda"
    static = torch.compile(flex_attention, dynamic=False)
    dynamic = torch.compile(flex_attention, dynamic=True)
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, torch {torch.__version__}, "
          f"D = {args.d}, {dtype}; median ms")
    print("| case | N | flexflash path | dir | flexflash | raw static | raw dynamic | flexflash / raw static |")
    print("|---|---|---|---|---|---|---|---|")
    profiles, host_profiles = [], []
    for name in args.cases.split(","):
        for N in (int(n) for n in args.n.split(",")):
            q, k, v, kw, fn = make(name, N, args.d, device, dtype)
            leaves = [t.requires_grad_(grad) for t in (q, k, v)]
            block_mask = create_block_mask(fn, q.shape[0], None, N, N, device=device)
            plan = flexflash.explain(*leaves, **kw)
            impls = {"flexflash": lambda: flexflash.attention(*leaves, **kw),
                     "raw static": lambda: static(*leaves, block_mask=block_mask),
                     "raw dynamic": lambda: dynamic(*leaves, block_mask=block_mask)}
            d_out = torch.randn_like(q)
            for direction in (("fwd", "fwd+bwd") if grad else ("fwd",)):
                ms = {}
                for impl, call in impls.items():
                    if direction == "fwd":
                        step = call
                        if not grad:
                            def step(call=call):
                                with torch.no_grad():
                                    return call()
                    else:
                        def step(call=call):
                            return torch.autograd.grad(call(), leaves, d_out)
                    try:  # a raw variant that does not compile is reported, not fatal
                        ms[impl] = timed(step, device)
                    except Exception as e:  # noqa: BLE001 (Inductor's errors have no common base)
                        failed = str(e).strip().splitlines()[0][:60] if str(e).strip() else ""
                        ms[impl] = f"failed: {type(e).__name__} {failed}"
                        continue
                    if device == "cuda" and direction == "fwd+bwd" and impl in ("flexflash", "raw static"):
                        profiles.append((name, N, impl, top_kernels(step, device)))
                    if args.host and direction == "fwd" and impl in ("flexflash", "raw static"):
                        host_profiles.append((name, N, impl, top_host_ops(step, device, args.host)))
                cell = lambda impl: f"{ms[impl]:.3f}" if isinstance(ms[impl], float) else ms[impl]  # noqa: E731
                ratio = (f"{ms['flexflash'] / ms['raw static']:.2f}"
                         if all(isinstance(ms[i], float) for i in ("flexflash", "raw static")) else "—")
                print(f"| {name} | {N} | {plan.path} ({plan.generator}, {plan.kernel_options}) | {direction} | "
                      f"{cell('flexflash')} | {cell('raw static')} | {cell('raw dynamic')} | {ratio} |")
    for name, N, impl, kernels in profiles:
        print(f"\n{name} N={N} {impl}, forward+backward, top kernels (µs per call):")
        for kernel, us in kernels:
            print(f"  {us:9.1f}  {kernel}")
    for name, N, impl, ops in host_profiles:
        print(f"\n{name} N={N} {impl}, forward, top operations by host time (self CPU µs per call, calls):")
        for op, count, us in ops:
            print(f"  {us:9.1f}  {count:4d}  {op}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
