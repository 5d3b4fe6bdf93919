"""A quick GPU comparison of flexflash against SDPA's backends in one run (medians, bf16).

Usage on a CUDA machine: ``python tools/gpu_quick_bench.py [--json PATH]``. The full regression
suite lives in ``benchmarks/``; this script is a smoke test that prints one table."""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import flexflash

SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION}


def cases(B=4, H=16, N=4096, D=128):
    dev, dt = "cuda", torch.bfloat16
    lengths = torch.tensor([N, N * 3 // 4, N // 2, N // 4], device=dev)[:B]
    padding = torch.arange(N, device=dev)[None] < lengths[:, None]  # (B, N)
    bias = torch.randn(B, H, N, N, device=dev, dtype=dt)
    tri = torch.ones(N, N, dtype=torch.bool, device=dev).tril()
    yield "causal", dict(causal=True), dict(is_causal=True), 0.5
    yield "key padding", dict(mask=padding), dict(attn_mask=padding[:, None, None, :]), float(lengths.sum() / (B * N))
    yield "bias+causal", dict(bias=bias, causal=True), dict(attn_mask=bias.masked_fill(~tri, float("-inf"))), 0.5
    yield "sliding 512", dict(mask_mod=flexflash.mods.sliding_window(512)), dict(attn_mask=tri & ~tri.tril(-512)), 512 / N


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    B, H, N, D = 4, 16, 4096, 128
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    rows = []
    for name, ff_kw, sdpa_kw, density in cases(B, H, N, D):
        flops = 4 * B * H * N * N * D * density
        for direction in ("fwd", "fwd+bwd"):
            mult = 1.0 if direction == "fwd" else 3.5
            times = {}

            def run_ff():
                out = flexflash.attention(q, k, v, **ff_kw)
                if direction != "fwd":
                    out.backward(torch.ones_like(out))
            for label, fn in [("flexflash", run_ff)] + [
                (f"sdpa {b}", (lambda b=b: _sdpa(q, k, v, SDPA[b], sdpa_kw, direction))) for b in SDPA]:
                try:
                    fn()
                    torch.cuda.synchronize()
                    times[label] = do_bench(fn, warmup=50, rep=200, return_mode="median")
                except RuntimeError:
                    times[label] = None
            best = min((t for n, t in times.items() if n.startswith("sdpa") and t), default=None)
            ff = times["flexflash"]
            rows.append(dict(case=name, direction=direction, ms=times,
                             tflops=flops * mult / (ff * 1e-3) / 1e12, ratio=(best / ff) if best else None))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, B={B} H={H} N={N} D={D} bf16, median ms")
    print(f"{'case':14} {'dir':8} {'flexflash':>9} {'flash':>8} {'cudnn':>8} {'effic.':>8} {'TFLOP/s':>8} {'best SDPA/ff':>12}")
    for r in rows:
        m = r["ms"]
        cell = lambda x: f"{x:8.3f}" if x else "       —"  # noqa: E731
        ratio = f"{r['ratio']:12.2f}" if r["ratio"] else "           —"
        print(f"{r['case']:14} {r['direction']:8} {m['flexflash']:9.3f} {cell(m['sdpa flash'])} {cell(m['sdpa cudnn'])} "
              f"{cell(m['sdpa efficient'])} {r['tflops']:8.0f} {ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def _sdpa(q, k, v, backend, kw, direction):
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k, v, **kw)
    if direction != "fwd":
        out.backward(torch.ones_like(out))


if __name__ == "__main__":
    main()
