"""``flexflash bench``: flexflash against SDPA's backends (and the reference where it fits) on a
table of shapes."""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple

import torch

from .. import __version__, mods, reference
from .._compiled import get_compile_mode, set_compile_mode
from ..functional import attention, route
from ._common import DTYPES, _choices, _device, _int_list, _Progress, _require_matplotlib


BENCH_CASES = ["dense", "causal", "key_padding", "sliding_window", "document", "bias_causal"]


def _bench_inputs(case: str, B: int, H: int, N: int, D: int, dtype, device, gen):
    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)
    q, k, v = randn(B, H, N, D), randn(B, H, N, D), randn(B, H, N, D)
    lengths = torch.tensor([max(1, N * (4 - b % 4) // 4) for b in range(B)], device=device)
    ids = (torch.arange(N, device=device) * 4 // N).expand(B, N)
    flex: dict[str, Any] = {}
    allowed = None
    if case == "causal":
        flex, allowed = dict(causal=True), mods.causal()
    elif case == "key_padding":
        pad = torch.arange(N, device=device)[None] < lengths[:, None]
        flex, allowed = dict(mask=pad), mods.key_padding(mask=pad)
    elif case == "sliding_window":
        allowed = mods.sliding_window(max(1, N // 8))
        flex = dict(mask_mod=allowed)
    elif case == "document":
        allowed = mods.and_masks(mods.document(ids, ids), mods.causal())
        flex = dict(mask_mod=allowed)
    elif case == "bias_causal":
        flex, allowed = dict(bias=randn(B, H, N, N), causal=True), mods.causal()
    grids = reference.index_grids(B, 1, N, N, device)
    dense = None if allowed is None else allowed(*grids).expand(B, 1, N, N)
    density = 1.0 if dense is None else float(dense.double().mean())
    sdpa: dict[str, Any] = {}
    if case in ("dense", "causal"):
        sdpa = dict(is_causal=case == "causal")
    elif "bias" in flex:
        sdpa = dict(attn_mask=flex["bias"].masked_fill(~dense, float("-inf")))
    else:
        sdpa = dict(attn_mask=dense)
    return (q, k, v), flex, sdpa, density


# Above this spread a row's timings are too far apart for its ratio to mean much.
_NOISY = 0.10


class _Timing(NamedTuple):
    ms: float  # the median over the repeats
    spread: float  # _spread of the repeats
    repeats: int


def _spread(times: list[float]) -> float:
    """The interquartile range of the repeats over their median: how far apart they are, relative to
    the time reported. Not (max - min) / median: on a shared CPU one repeat in fifty descheduled
    would flag every row, though it does not move the median reported."""
    if len(times) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    median = statistics.median(times)
    return (q3 - q1) / median if median > 0 else 0.0


def _timer(device) -> Callable[[Callable], _Timing]:
    def measure(fn, budget: float = 0.3) -> _Timing:
        fn()  # compilation and warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        times: list[float] = []
        spent = time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - spent < budget and len(times) < 50):
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return _Timing(statistics.median(times) * 1e3, _spread(times), len(times))
    return measure


def _impls(device, flex, sdpa, qkv, fits: bool):
    import torch.nn.functional as F
    q, k, v = qkv
    impls = {"flexflash": lambda: attention(q, k, v, **flex)}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for label, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
                               ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION), ("sdpa math", SDPBackend.MATH)):
            if label == "sdpa math" and not fits:
                continue

            def run(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, **sdpa)
            impls[label] = run
    else:
        impls["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, **sdpa)
    if fits:
        impls["reference"] = lambda: reference.attention(q, k, v, **flex)
    return impls


def cmd_bench(args) -> int:
    device = _device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cases = _choices(args.cases, BENCH_CASES, "--cases")
    if device.type == "cuda":
        seq_lens = _int_list(args.seq_lens or "1024,2048,4096", "--seq-lens")
        tokens, D, H = 16384, 128, 16
    else:
        seq_lens = _int_list(args.seq_lens or "128,256,512", "--seq-lens")
        tokens, D, H = 1024, 64, 4
    if args.plot:
        _require_matplotlib("--plot")
    if args.compile_mode:
        previous = set_compile_mode(args.compile_mode)
        try:
            return _bench(args, device, dtype, cases, seq_lens, tokens, D, H)
        finally:
            set_compile_mode(previous)
    return _bench(args, device, dtype, cases, seq_lens, tokens, D, H)


def _bench(args, device, dtype, cases, seq_lens, tokens, D, H) -> int:
    measure = _timer(device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    noisy: list[str] = []
    progress = _Progress()
    plan = [(case, N) for case in cases for N in seq_lens]
    print(f"flexflash {__version__} bench on {device} ({dtype}), torch {torch.__version__}; "
          f"B*N = {tokens} tokens, H = {H}, D = {D}; compile mode {get_compile_mode()}", flush=True)
    for i, (case, N) in enumerate(plan, 1):
        B = max(1, tokens // N)
        qkv, flex, sdpa, density = _bench_inputs(case, B, H, N, D, dtype, device, gen)
        fits = B * H * N * N * 4 * 3 < (2 << 30)
        flops = 4 * B * H * N * N * D * density
        timings: dict[str, _Timing] = {}
        with torch.no_grad():
            for label, fn in _impls(device, flex, sdpa, qkv, fits).items():
                progress.show(f"[{i}/{len(plan)}] {case} N={N}: {label}")
                try:
                    timings[label] = measure(fn)
                except RuntimeError as e:  # a backend that does not take the case
                    if "No available kernel" not in str(e):
                        raise
            path = route(*qkv, **flex)
        progress.clear()
        times = {label: t.ms for label, t in timings.items()}
        spread = {label: t.spread for label, t in timings.items()}
        wide = [f"{label} {t.spread:.0%} of {t.repeats}" for label, t in timings.items() if t.spread > _NOISY]
        if wide:
            noisy.append(f"{case} N={N}: {', '.join(wide)}")
        baselines = [t for label, t in times.items() if label.startswith("sdpa")]
        rows.append(dict(case=case, N=N, B=B, H=H, D=D, dtype=str(dtype).replace("torch.", ""), path=path,
                         density=density, ms=times, spread=spread,
                         tflops={k: flops / (t * 1e-3) / 1e12 for k, t in times.items()},
                         ratio=(min(baselines) / times["flexflash"]) if baselines else None))
        r = rows[-1]
        others = "  ".join(f"{k} {t:.3f}" for k, t in times.items() if k != "flexflash")
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "—"
        print(f"{case:15} N={N:<6} flexflash[{path}] {times['flexflash']:9.3f} ms {r['tflops']['flexflash']:8.3f} TFLOP/s"
              f"  | {others} | best SDPA / flexflash {ratio}", flush=True)
    for line in noisy:  # after the table, so that they do not split it where stdout and stderr meet
        print(f"flexflash bench: warning: timings too noisy to compare (interquartile range / median of the "
              f"repeats above {_NOISY:.0%}): {line}", file=sys.stderr)
    meta = dict(device=str(device), name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, flexflash=__version__, date=time.strftime("%Y-%m-%d"),
                compile_mode=get_compile_mode())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        _plot_bench(rows, meta, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _plot_bench(rows, meta, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 3.4), squeeze=False)
    for ax, case in zip(axes[0], cases):
        mine = [r for r in rows if r["case"] == case]
        labels = list(dict.fromkeys(k for r in mine for k in r["tflops"]))
        for label in labels:
            pts = [(r["N"], r["tflops"][label]) for r in mine if label in r["tflops"]]
            ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_title(case)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"flexflash {meta['flexflash']} on {meta['name']}, torch {meta['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
