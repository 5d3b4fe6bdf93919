"""Splits the time of small eager flexflash calls into flexflash's own Python, the compiled
kernel's wrapper (Dynamo's guards, Inductor's launcher) and the device time, against raw compiled
``flex_attention`` with a block mask built once (benchmarks/test_model.py's host-time cases).

Usage::

    python tools/host_time.py [--device cuda|cpu] [--batch 32] [--heads 16] [--seq 512] [--dim 128]
                              [--grad] [--profile 15]

Per case it prints, in µs per call: the wall time of flexflash and of raw FlexAttention (20 calls
between synchronisations), the device time of each (CUDA events around the same 20 calls: the
kernels' own time once the queue is full), flexflash's Python alone (the compiled kernel replaced
by a stub) and the compiled kernel called directly with the arguments flexflash passed it.
``--grad``: the inputs require grad and the calls record the graph (a training forward; CUDA only,
FlexAttention's CPU kernel takes no inputs that require grad). ``--profile K``: also the K
functions with the most own time in 200 of flexflash's calls per case (cProfile).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import flexflash
from flexflash import _kernels, mods


def _cases(B: int, N: int, device: str, gen: torch.Generator) -> dict:
    ids = torch.sort(torch.randint(0, 4, (B, N), generator=gen), dim=-1).values.to(device)
    keep = (torch.arange(N)[None, :] < torch.randint(N // 2, N + 1, (B, 1), generator=gen)).to(device)
    return {
        "document": (dict(mask_mod=mods.document(ids)), mods.document(ids), B),
        "sliding_window": (dict(mask_mod=mods.sliding_window(128), causal=True),
                           lambda b, h, i, j: (j <= i) & (i - j < 128), None),
        "key_padding": (dict(mask=keep), lambda b, h, i, j: keep[b, j], B),
    }


def _per_call(fn, device: str, calls: int = 20, rounds: int = 15) -> tuple[float, float | None]:
    """(median wall µs per call, median device µs per call or None on CPU)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    walls, kernels = [], []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        for _ in range(calls):
            fn()
        if device == "cuda":
            end.record()
        sync()
        walls.append((time.perf_counter() - start) / calls * 1e6)
        if device == "cuda":
            kernels.append(begin.elapsed_time(end) / calls * 1e3)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return med(walls), (med(kernels) if kernels else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--grad", action="store_true", help="inputs requiring grad, calls recording the graph")
    parser.add_argument("--profile", type=int, default=0, help="print this many functions of a cProfile")
    args = parser.parse_args()
    device, B, H, N, D = args.device, args.batch, args.heads, args.seq, args.dim
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, N, D, generator=gen).to(device, dtype).requires_grad_(args.grad) for _ in range(3))
    raw = torch.compile(flex_attention)
    seen = {}
    original = _kernels._Kernel.__call__

    def spy(kernel, *call_args):
        seen["kernel"] = (kernel, call_args)
        return original(kernel, *call_args)

    print(f"{device}, torch {torch.__version__}, B={B} H={H} N={N} D={D} {dtype}"
          f"{', inputs requiring grad' if args.grad else ''}; µs per call")
    print(f"{'case':16} {'flexflash':>10} {'(device)':>9} {'raw flex':>9} {'(device)':>9} "
          f"{'our Python':>11} {'kernel direct':>14}")
    profiles = []
    with contextlib.nullcontext() if args.grad else torch.no_grad():
        for name, (kw, fn, batch) in _cases(B, N, device, gen).items():
            ours = lambda: flexflash.attention(q, k, v, **kw)  # noqa: E731
            _kernels._Kernel.__call__ = spy
            for _ in range(3):
                ours()
            _kernels._Kernel.__call__ = original
            kernel, call_args = seen["kernel"]
            direct = lambda: kernel._fn(*call_args, kernel.static)  # noqa: E731
            block_mask = create_block_mask(fn, batch, None, N, N, device=device)
            theirs = lambda: raw(q, k, v, block_mask=block_mask)  # noqa: E731
            theirs()
            ours_wall, ours_dev = _per_call(ours, device)
            raw_wall, raw_dev = _per_call(theirs, device)
            direct_wall, _ = _per_call(direct, device)
            _kernels._Kernel.__call__ = lambda kernel, *a: (a[0], None)  # the kernel stubbed
            try:
                python_only, _ = _per_call(ours, device)
            finally:
                _kernels._Kernel.__call__ = original
            show = lambda x: f"{x:9.0f}" if x is not None else f"{'—':>9}"  # noqa: E731
            print(f"{name:16} {ours_wall:10.0f} {show(ours_dev)} {raw_wall:9.0f} {show(raw_dev)} "
                  f"{python_only:11.0f} {direct_wall:14.0f}")
            if args.profile:
                profiler = cProfile.Profile()
                profiler.runcall(lambda: [ours() for _ in range(200)])
                profiles.append((name, profiler))
    for name, profiler in profiles:
        print(f"\n{name}: flexflash, 200 calls, top {args.profile} by own time")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
