"""Triton against FlashAttention-4 kernels through flexflash, with SDPA's backends in the same run:
the measurements behind the generator table in ``flexflash/tuning.json``.

For each case (``benchmarks/test_attention.py``'s cases and shapes: B*N = 16k tokens, hidden 2048,
bf16, inputs requiring grad) it runs ``flexflash.attention(..., backend="flex")`` with FlexAttention's
Triton kernels and with ``kernel_options={"BACKEND": "FLASH"}`` (needs ``flexflash[fa4]``), and SDPA's
cuDNN, flash and efficient backends where they accept the case; forward and forward+backward. Per
call: the median of 30 synchronised calls (kernel and host time, as the suite measures), the host
time alone (the call returning, before synchronisation) and the GPU time alone (the profiler's
kernel times). Compilation happens before any timing.

Usage on a CUDA machine::

    python tools/gpu_generators.py [--n 4096] [--d 128,64] [--cases dense,key_padding,...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import flexflash  # noqa: E402
from test_attention import _grads, attention_fn, make_case  # noqa: E402

CASES = ["dense", "causal", "key_padding", "sliding_window_512", "document", "prefix_lm", "softcap", "bool_mask"]
SDPA = ["sdpa-cudnn", "sdpa-flash", "sdpa-efficient"]


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _gpu_ms(fn, iters=10) -> float:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total_us = sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return total_us / iters / 1e3


def _measure(fn) -> dict:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    sync, host = [], []
    for _ in range(30):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        returned = time.perf_counter()
        torch.cuda.synchronize()
        sync.append(time.perf_counter() - start)
        host.append(returned - start)
    return dict(sync_ms=_median(sync) * 1e3, host_ms=_median(host) * 1e3, gpu_ms=_gpu_ms(fn))


def _variants(c):
    """(name, forward) pairs: the two generators through flexflash, then SDPA's backends."""
    for name, options in (("triton", None), ("flash", {"BACKEND": "FLASH"})):
        kw = dict(c.flex, backend="flex")
        if options:
            kw["kernel_options"] = options
        yield name, (lambda kw=kw: flexflash.attention(c.q, c.k, c.v, **kw))
    for impl in SDPA:
        try:
            yield impl, attention_fn(impl, c)
        except pytest.skip.Exception:  # SDPA cannot express the case
            continue


def run(cases, n, dims) -> list[dict]:
    rows = []
    for name in cases:
        for D in dims:
            c = make_case(name, n, D, torch.bfloat16)
            d_out = torch.randn(c.q.shape[:-1] + (c.v.shape[-1],), device="cuda", dtype=c.q.dtype)
            for variant, forward in _variants(c):
                row = dict(case=name, N=n, D=D, variant=variant)

                def step(forward=forward, grads=_grads(variant, c)):
                    torch.autograd.grad(forward(), grads, d_out)
                try:
                    start = time.perf_counter()
                    forward()
                    step()
                    torch.cuda.synchronize()
                    row["first_call_s"] = time.perf_counter() - start
                    row["fwd"], row["fwd+bwd"] = _measure(forward), _measure(step)
                except Exception as e:  # a generator or backend that cannot run the case
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            del c
            torch.cuda.empty_cache()
    return rows


def table(rows) -> str:
    lines = ["| case | N | D | dir | Triton | FLASH | best SDPA | best SDPA / Triton | best SDPA / FLASH | "
             "FLASH GPU / Triton GPU |", "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, dict] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["case"], r["N"], r["D"]), {})[r["variant"]] = r
    for (case, n, d), g in groups.items():
        for direction in ("fwd", "fwd+bwd"):
            t, f = g.get("triton", {}).get(direction), g.get("flash", {}).get(direction)
            sdpa = [g[i][direction]["sync_ms"] for i in SDPA if i in g]
            best = min(sdpa) if sdpa else None

            def ms(x):
                return f"{x['sync_ms']:.3f}" if x else "—"

            def ratio(x):
                return f"{best / x['sync_ms']:.2f}" if x and best else "—"
            gpu = f"{f['gpu_ms'] / t['gpu_ms']:.2f}" if t and f else "—"
            lines.append(f"| {case} | {n} | {d} | {direction} | {ms(t)} | {ms(f)} | "
                         f"{f'{best:.3f}' if best else '—'} | {ratio(t)} | {ratio(f)} | {gpu} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", default="128,64")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--json", help="also write every measurement to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_generators: needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = run(args.cases.split(","), args.n, [int(d) for d in args.d.split(",")])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; ms per synchronised call")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
