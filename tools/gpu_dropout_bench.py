"""Attention dropout on the GPU: flexflash with and without dropout against SDPA's flash and
efficient backends with the same dropout, in one run (medians of ``triton.testing.do_bench``).

Usage on a CUDA machine: ``python tools/gpu_dropout_bench.py [--json PATH]``. Default shape: B=4,
H=16, N=4096, D=128 (B*N = 16k tokens), bf16, inputs requiring grad. Cases: causal, and causal /
non-causal key padding (lengths 100/75/50/25%; SDPA gets the materialised boolean mask)."""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import flexflash

SDPA = {"sdpa flash": SDPBackend.FLASH_ATTENTION, "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--cases", default="causal,causal + key padding,key padding",
                        help="comma-separated subset of the cases")
    args = parser.parse_args()
    B, H, N, D, p = 4, 16, 4096, 128, args.p
    dev = "cuda"
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    d_out = torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16)
    lengths = torch.tensor([N, N * 3 // 4, N // 2, N // 4], device=dev)[:B]
    padding = torch.arange(N, device=dev)[None] < lengths[:, None]  # (B, N), True = attend
    tri = torch.ones(N, N, dtype=torch.bool, device=dev).tril()
    cases = [
        ("causal", dict(causal=True), dict(is_causal=True)),
        ("causal + key padding", dict(causal=True, mask=padding), dict(attn_mask=tri & padding[:, None, None, :])),
        ("key padding", dict(mask=padding), dict(attn_mask=padding[:, None, None, :])),
    ]
    wanted = [c.strip() for c in args.cases.split(",")]
    cases = [c for c in cases if c[0] in wanted]
    rows = []
    for name, ff_kw, sdpa_kw in cases:
        for direction in ("fwd", "fwd+bwd"):
            times = {}
            # Without dropout, backend="auto" sends a plain causal call to SDPA; "flex" is the same
            # FlexAttention path that the dropout passes run on.
            variants = [(f"flexflash p=0.0 {backend}", lambda kw=ff_kw, be=backend: _ff(q, k, v, d_out, kw, 0.0, direction, be))
                        for backend in ("auto", "flex")]
            variants += [(f"flexflash p={p}", lambda kw=ff_kw: _ff(q, k, v, d_out, kw, p, direction, "auto"))]
            variants += [(f"{label} p={p}", lambda b=b: _sdpa(q, k, v, d_out, b, sdpa_kw, p, direction))
                         for label, b in SDPA.items()]
            for label, fn in variants:
                try:
                    start = time.perf_counter()
                    fn()
                    torch.cuda.synchronize()
                    print(f"{name:22} {direction:8} {label:20} first call {time.perf_counter() - start:6.1f} s", flush=True)
                    times[label] = do_bench(fn, warmup=25, rep=150, return_mode="median")
                    print(f"{name:22} {direction:8} {label:20} {times[label]:8.3f} ms", flush=True)
                except RuntimeError as e:  # a backend that does not take the case
                    times[label] = None
                    print(f"{name} {direction} {label}: {str(e).splitlines()[0][:120]}")
            rows.append(dict(case=name, direction=direction, p=p, ms=times))
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, B={B} H={H} N={N} D={D} bf16, "
          f"dropout p={p}, median ms")
    labels = list(rows[0]["ms"])
    print(f"{'case':22} {'dir':8} " + " ".join(f"{lab:>20}" for lab in labels)
          + f" {'drop/flex':>10} {'drop/auto':>10}")
    for r in rows:
        m = r["ms"]
        cells = " ".join(f"{m[lab]:20.3f}" if m[lab] else f"{'—':>20}" for lab in labels)
        r["dropout_cost"] = {be: m[f"flexflash p={p}"] / m[f"flexflash p=0.0 {be}"] for be in ("flex", "auto")}
        print(f"{r['case']:22} {r['direction']:8} {cells} {r['dropout_cost']['flex']:10.2f} {r['dropout_cost']['auto']:10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, shape=[B, H, N, D], rows=rows),
                      f, indent=1)


def _ff(q, k, v, d_out, kw, p, direction, backend):
    out = flexflash.attention(q, k, v, dropout_p=p, backend=backend, **kw)
    if direction != "fwd":
        out.backward(d_out)


def _sdpa(q, k, v, d_out, backend, kw, p, direction):
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, **kw)
    if direction != "fwd":
        out.backward(d_out)


if __name__ == "__main__":
    main()
