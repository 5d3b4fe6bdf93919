"""The ``flexflash`` command line (also ``python -m flexflash``): ``check``, ``bench`` and ``mask``.

* ``flexflash check`` runs every modifier, every module and the dropout statistics against the eager
  reference on a device and prints a table (case, max error, tolerance, ok); it exits 1 when a case
  fails. Warnings raised during the run are summarised on stderr after the table.
* ``flexflash bench`` times flexflash against SDPA's backends (and the reference where it fits) on a
  table of shapes, printing ms, TFLOP/s and the ratio; ``--json`` and ``--plot`` save them. It warns
  on stderr about rows whose repeats are too far apart to compare.
* ``flexflash mask`` draws a mask as text or, with ``--png``, as an image.

Both long commands show a progress line on stderr, only when stderr is a terminal (stdout, the
table, never gets it). A missing command or an unknown flag prints the usage and an error naming it;
a bad value prints a one-line error naming the argument and the values expected. Neither prints a
traceback; both exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import statistics
import sys
import textwrap
import time
import warnings
from typing import Any, Callable, NamedTuple, NoReturn, TextIO

import torch

from . import __version__, mods, reference
from ._compiled import get_compile_mode, set_compile_mode
from .functional import attention, route

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class UsageError(Exception):
    """A bad command-line argument: reported in one line, exit status 2."""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    return torch.device(name)


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{name}: expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{name}: expected comma-separated positive integers, got {text!r}")
    return values


def _choices(text: str | None, known: list[str], name: str) -> list[str]:
    if text is None:
        return known
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in known]
    if unknown or not chosen:
        raise UsageError(f"{name}: unknown case(s) {unknown or text!r}; expected some of {', '.join(known)}")
    return chosen


class _Progress:
    """A status line on stderr (``[3/17] causal ...``), rewritten in place and erased before each
    result is printed, so that it never ends up between the rows of the stdout table. Written only
    when the stream is a terminal: in a pipe or a log file the carriage returns would leave every
    state behind, one after the other, in the middle of the output."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = sys.stderr if stream is None else stream  # read now: tests and callers swap sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        try:
            self.enabled = bool(isatty and isatty())
        except ValueError:  # a closed stream
            self.enabled = False
        self.width = 0

    def show(self, text: str) -> None:
        if self.enabled:
            self.stream.write("\r" + text + " " * max(0, self.width - len(text)))
            self.stream.flush()
            self.width = len(text)

    def clear(self) -> None:
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


def _warning_summary(caught: list[warnings.WarningMessage], command: str) -> list[str]:
    """The warnings recorded during a run, one line per distinct (category, message) with how often it
    came, printed after the table instead of in the middle of it."""
    counts: dict[tuple[str, str], int] = {}
    for w in caught:
        key = (w.category.__name__, " ".join(str(w.message).split()))
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        return []
    total = sum(counts.values())
    lines = [f"{command}: {total} warning{'s' * (total != 1)} during the run:"]
    lines += [f"  {category}{f' (x{n})' if n > 1 else ''}: {message}" for (category, message), n in counts.items()]
    return lines


# --- check -----------------------------------------------------------------------------------

# The error allowed is a multiple of the reference's own error against float64 in the same dtype
# (the compiled kernel sums in another order, so it may be a few times larger), plus a floor for
# cases where the reference happens to be nearly exact: a few units in the last place of the dtype
# at the output's scale.
_FACTOR = 4.0
_FLOOR = {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}


# The case names, known before any tensor is made (for --help); tests/test_cli.py checks them
# against the cases _modifier_cases and _module_cases build.
MODIFIER_CASES = ["dense", "causal", "key_padding", "mask_4d", "bias_3d", "causal_mask_bias", "sliding_window",
                  "prefix_lm", "document", "alibi_causal", "softcap_bias", "window_or_prefix"]
MODULE_CASES = ["FlashAttention", "FlashMHA", "FlashAttentionTwo", "ChunkedAttention"]
CHECK_CASES = MODIFIER_CASES + MODULE_CASES + ["dropout"]


def _modifier_cases(B: int, Hq: int, Hkv: int, Nq: int, Nk: int, gen: torch.Generator, device) -> dict[str, Callable]:
    """name -> a function of ``grad`` returning attention keyword arguments on ``device`` (queries
    and keys of different lengths, grouped-query heads)."""
    def rand(*shape):
        return torch.rand(*shape, generator=gen).to(device)

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_(grad)

    ids = torch.sort(torch.randint(0, 4, (B, max(Nq, Nk)), generator=gen), dim=-1).values.to(device)
    off = Nk - Nq
    return {
        "dense": lambda grad: {},
        "causal": lambda grad: dict(causal=True),
        "key_padding": lambda grad: dict(mask=rand(B, Nk) > 0.3),
        "mask_4d": lambda grad: dict(mask=rand(B, 1, Nq, Nk) > 0.5),
        "bias_3d": lambda grad: dict(bias=randn(Hq, Nq, Nk, grad=grad)),
        "causal_mask_bias": lambda grad: dict(causal=True, mask=rand(B, Nk) > 0.2,
                                                  bias=randn(B, Hq, Nq, Nk, grad=grad)),
        "sliding_window": lambda grad: dict(mask_mod=mods.sliding_window(24, offset=off)),
        "prefix_lm": lambda grad: dict(mask_mod=mods.prefix_lm(torch.tensor([5, Nk // 2], device=device)[:B],
                                                               offset=off)),
        "document": lambda grad: dict(mask_mod=mods.document(ids[:, :Nq], ids[:, :Nk])),
        "alibi_causal": lambda grad: dict(causal=True, score_mod=mods.alibi(Hq)),
        "softcap_bias": lambda grad: dict(score_mod=mods.tanh_softcap(2.0), bias=randn(Nq, Nk, grad=grad)),
        "window_or_prefix": lambda grad: dict(mask_mod=mods.or_masks(mods.sliding_window(8, offset=off),
                                                                     mods.prefix_lm(5))),
    }


def _as64(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().double().requires_grad_(x.requires_grad)
    return x


def _compare(fast: torch.Tensor, ref: torch.Tensor, gold: torch.Tensor, dtype) -> tuple[float, float]:
    scale = max(1.0, float(gold.detach().abs().max()))
    err = float((fast.detach().double() - gold.detach()).abs().max())
    ref_err = float((ref.detach().double() - gold.detach()).abs().max())
    return err, _FACTOR * ref_err + _FLOOR[dtype] * scale


def _check_attention(q, k, v, kw, dtype) -> list[tuple[str, float, float]]:
    """(what, error, tolerance) of the output and of every gradient."""
    leaves = {n: t for n, t in dict(q=q, k=k, v=v, bias=kw.get("bias")).items()
              if isinstance(t, torch.Tensor) and t.requires_grad}
    out = attention(q, k, v, **kw)
    ref = reference.attention(q, k, v, **kw)
    kw64 = {n: _as64(t) for n, t in kw.items()}
    q64, k64, v64 = _as64(q), _as64(k), _as64(v)
    gold = reference.attention(q64, k64, v64, **kw64)
    rows = [("out", *_compare(out, ref, gold, dtype))]
    if leaves:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        names = list(leaves)
        leaves64 = dict(q=q64, k=k64, v=v64, bias=kw64.get("bias"))
        got = torch.autograd.grad(out, [leaves[n] for n in names], g)
        want = torch.autograd.grad(ref, [leaves[n] for n in names], g)
        gold_g = torch.autograd.grad(gold, [leaves64[n] for n in names], g.double())
        rows += [(f"d{n}", *_compare(a, b, c, dtype)) for n, a, b, c in zip(names, got, want, gold_g)]
    return rows


@contextlib.contextmanager
def _modules_on_reference():
    """The modules' attention calls on the reference path (the gold runs the same module code)."""
    from . import modules
    saved = modules.attention
    modules.attention = functools.partial(attention, backend="reference")
    try:
        yield
    finally:
        modules.attention = saved


def _module_cases(device, gen):
    from . import modules
    x = torch.randn(2, 37, 64, generator=gen)
    ctx = torch.randn(2, 45, 64, generator=gen)
    keep = torch.rand(2, 45, generator=gen) > 0.3
    q, k, v = (torch.randn(2, 4, n, 16, generator=gen) for n in (37, 45, 45))
    bias = torch.randn(4, 37, 45, generator=gen)
    return {
        "FlashAttention": (
            lambda: modules.FlashAttention(causal=True), (q, k, v), dict(mask=keep, attn_bias=bias)),
        "FlashMHA": (
            lambda: modules.FlashMHA(64, 4, causal=True), (x, ctx, ctx), dict(key_padding_mask=~keep)),
        "FlashAttentionTwo": (
            lambda: modules.FlashAttentionTwo(dim=64, heads=4, dim_head=16, causal=True), (x,),
            dict(context=ctx, mask=keep)),
        "ChunkedAttention": (
            lambda: modules.ChunkedAttention(64, 4, chunk_size=16), (ctx, ctx, x), dict(mask=keep)),
    }


def _check_module(make, args, kw, device, dtype) -> list[tuple[str, float, float]]:
    torch.manual_seed(0)
    module = make().to(device=device, dtype=dtype)
    torch.manual_seed(0)
    gold_module = make().to(device=device, dtype=torch.float64)
    gold_module.load_state_dict({n: t.double() for n, t in module.state_dict().items()})
    # One leaf per distinct input (the same tensor passed as key and value stays one tensor, in
    # both runs), so that the fast, reference and float64 runs take the same code path.
    distinct = {id(a): a.detach().to(device=device, dtype=dtype).requires_grad_() for a in args}
    distinct64 = {i: _as64(t) for i, t in distinct.items()}
    inputs, inputs64 = [distinct[id(a)] for a in args], [distinct64[id(a)] for a in args]
    kw = {n: (t.to(device=device, dtype=dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else
              t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    out = module(*inputs, **kw)
    with _modules_on_reference():
        ref = module(*inputs, **kw)
        gold = gold_module(*inputs64, **{n: _as64(t) for n, t in kw.items()})
    rows = [("out", *_compare(out, ref, gold, dtype))]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
    params, params64 = list(module.parameters()), list(gold_module.parameters())
    leaves, leaves64 = list(distinct.values()), list(distinct64.values())
    got = torch.autograd.grad(out, leaves + params, g)
    want = torch.autograd.grad(ref, leaves + params, g)
    gold_g = torch.autograd.grad(gold, leaves64 + params64, g.double())
    names = [f"d input {i}" for i in range(len(leaves))] + [f"d {n}" for n, _ in module.named_parameters()]
    rows += [(n, *_compare(a, b, c, dtype)) for n, a, b, c in zip(names, got, want, gold_g)]
    return rows


def _dropout_rows(device) -> list[tuple[str, str, float, float, bool]]:
    """The dropped fraction over a large draw (within 5 standard deviations of p) and the same
    dropped entries on the fast path and the reference for one seed."""
    p, B, H, N = 0.2, 2, 4, 256
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, N, 16, generator=gen).to(device)
    eye = torch.eye(N, device=device).expand(B, H, N, N)
    torch.manual_seed(5)
    with torch.no_grad():
        dropped = attention(q, q, eye, dropout_p=p)
    torch.manual_seed(5)
    with torch.no_grad():
        ref = reference.attention(q, q, eye, dropout_p=p)
    frac = float((dropped == 0).double().mean())
    sigma = math.sqrt(p * (1 - p) / dropped.numel())
    same = float(((dropped == 0) != (ref == 0)).double().mean())
    return [("dropout", "dropped fraction - p", abs(frac - p), 5 * sigma, abs(frac - p) <= 5 * sigma),
            ("dropout", "entries unlike reference", same, 0.0, same == 0.0)]


def cmd_check(args) -> int:
    device = _device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    gen = torch.Generator().manual_seed(0)
    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 37, 53, 32
    modifier_cases = _modifier_cases(B, Hq, Hkv, Nq, Nk, gen, device)
    module_cases = _module_cases(device, gen)
    known = list(modifier_cases) + list(module_cases) + ["dropout"]
    chosen = _choices(args.cases, known, "--cases")
    caught: list[warnings.WarningMessage] = []
    try:
        # Library warnings (the CPU path note, recompilation notices) would land between the rows.
        with warnings.catch_warnings(record=True) as caught:
            return _check_table(args, device, dtype, gen, (B, Hq, Hkv, Nq, Nk, D), modifier_cases, module_cases,
                                chosen)
    finally:
        for line in _warning_summary(caught, "flexflash check"):
            print(line, file=sys.stderr)


def _check_table(args, device, dtype, gen, sizes, modifier_cases, module_cases, chosen) -> int:
    B, Hq, Hkv, Nq, Nk, D = sizes
    progress = _Progress()
    print(f"flexflash {__version__} check on {device} ({dtype}), torch {torch.__version__}", flush=True)
    print(f"tolerance = {_FACTOR:g} x the reference's own error against float64 + {_FLOOR[dtype]:g} x scale\n")
    header = f"{'case':18} {'what':30} {'max error':>11} {'tolerance':>11}  ok"
    print(header)
    print("-" * len(header))
    failures = 0

    def show(case, what, err, tol, ok):
        nonlocal failures
        failures += not ok
        progress.clear()
        print(f"{case:18} {what:30} {err:11.3e} {tol:11.3e}  {'ok' if ok else 'FAIL'}", flush=True)

    for i, name in enumerate(chosen, 1):
        progress.show(f"[{i}/{len(chosen)}] {name} ...")
        start = time.perf_counter()
        if name in modifier_cases:
            for grad in (False, True):
                q = torch.randn(B, Hq, Nq, D, generator=gen).to(device, dtype).requires_grad_(grad)
                k = torch.randn(B, Hkv, Nk, D, generator=gen).to(device, dtype).requires_grad_(grad)
                v = torch.randn(B, Hkv, Nk, D, generator=gen).to(device, dtype).requires_grad_(grad)
                kw = modifier_cases[name](grad)
                kw = {n: (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
                      for n, t in kw.items()}
                with torch.set_grad_enabled(grad):
                    path = route(q, k, v, **kw)
                    for what, err, tol in _check_attention(q, k, v, kw, dtype):
                        show(name, f"{what} ({path})", err, tol, err <= tol)
        elif name in module_cases:
            make, margs, mkw = module_cases[name]
            for what, err, tol in _check_module(make, margs, mkw, device, dtype):
                show(name, what, err, tol, err <= tol)
        else:
            for case, what, err, tol, ok in _dropout_rows(device):
                show(case, what, err, tol, ok)
        progress.clear()
        if args.verbose:
            print(f"  ({time.perf_counter() - start:.1f} s)")
    print(f"\n{'all ' + str(len(chosen)) + ' cases ok' if not failures else str(failures) + ' check(s) FAILED'}")
    return 1 if failures else 0


# --- bench -----------------------------------------------------------------------------------

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


def _require_matplotlib(option: str):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"{option}: drawing needs matplotlib, which is not installed; "
                         "install it with: pip install 'flexflash[plot]'") from None


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


# --- mask ------------------------------------------------------------------------------------

MASK_KINDS = ["causal", "sliding_window", "prefix_lm", "document", "padding"]


def _mask_fn(args):
    off = args.kv_len - args.q_len
    if args.kind == "causal":
        return mods.causal(off), f"causal, bottom-right (offset Nk - Nq = {off})"
    if args.kind == "sliding_window":
        return mods.sliding_window(args.window, offset=off), f"sliding window {args.window} (offset {off})"
    if args.kind == "prefix_lm":
        return mods.prefix_lm(args.prefix, offset=off), f"prefix-LM, prefix {args.prefix} (offset {off})"
    if args.kind == "document":
        lengths = _int_list(args.docs, "--docs")
        if sum(lengths) != args.kv_len:
            raise UsageError(f"--docs: expected document lengths summing to --kv-len={args.kv_len}, got {lengths} "
                             f"(sum {sum(lengths)})")
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
        return mods.document(ids[:, off:] if off >= 0 else ids, ids), f"documents {lengths} (queries: the last {args.q_len} rows)"
    valid = args.valid if args.valid is not None else args.kv_len
    return (mods.key_padding(torch.tensor([valid])), f"key padding: the first {valid} keys are valid")


def cmd_mask(args) -> int:
    if args.kind == "document" and args.q_len > args.kv_len:
        raise UsageError(f"--q-len: the document drawing needs --q-len <= --kv-len, got {args.q_len} > {args.kv_len}")
    if args.kind == "document" and args.docs is None:
        args.docs = ",".join(str(x) for x in _split(args.kv_len, 3))
    fn, title = _mask_fn(args)
    grid = fn(*reference.index_grids(1, 1, args.q_len, args.kv_len, "cpu")).expand(1, 1, args.q_len, args.kv_len)[0, 0]
    if args.png:
        _require_matplotlib("--png")
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        width = max(3, args.kv_len / 8)
        fig, ax = plt.subplots(figsize=(width, max(3, args.q_len / 8)))
        ax.imshow(grid.numpy(), cmap="Blues", interpolation="nearest", vmin=0, vmax=1)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        ax.set_title(_wrap_title(title, width, 9), fontsize=9)
        fig.tight_layout()
        # tight: the saved image grows to hold whatever still sticks out (a long word of the title).
        fig.savefig(args.png, dpi=110, bbox_inches="tight")
        print(f"wrote {args.png}")
        return 0
    print(f"{title}; Nq={args.q_len}, Nk={args.kv_len}; '#' = may attend, '.' = masked")
    for i, row in enumerate(grid.tolist()):
        print(f"{i:4d} " + "".join("#" if x else "." for x in row))
    return 0


def _wrap_title(title: str, width_in: float, fontsize: float) -> str:
    """The title broken into lines that fit a figure ``width_in`` inches wide: one line is centred over
    the axes and cut off at the figure's edges, which a narrow mask (3 inches) reached at about 40
    characters. A character is taken as 0.6 em wide, with a margin of 0.3 inch."""
    chars = max(10, int((width_in - 0.3) * 72 / (0.6 * fontsize)))
    return textwrap.fill(title, width=chars, break_long_words=False, break_on_hyphens=False)


def _split(n: int, parts: int) -> list[int]:
    parts = min(parts, n)
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


# --- entry point -----------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    commands: dict[str, argparse.ArgumentParser]  # the top-level parser's subcommands (build_parser)

    def error(self, message):  # one line, exit status 2, no traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flexflash", description="flexflash: attention as FlexAttention mask/score functions.")
    parser.add_argument("--version", action="version", version=f"flexflash {__version__} (torch {torch.__version__})")
    # Not required=True: argparse would then say "the following arguments are required: command"
    # without the usage; main() prints the usage itself.
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    parser.commands = sub.choices

    check = sub.add_parser("check", help="check every modifier, module and dropout against the reference",
                           description="Runs every modifier (forward and backward), every module and the dropout "
                                       "statistics against the eager reference; exits 1 on any failure.")
    check.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    check.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    check.add_argument("--cases", help=f"comma-separated subset of {', '.join(CHECK_CASES)} (default: all)")
    check.add_argument("-v", "--verbose", action="store_true", help="print the time of each case")
    check.set_defaults(func=cmd_check)

    bench = sub.add_parser("bench", help="time flexflash against SDPA's backends",
                           description="Times flexflash, SDPA's backends and (where it fits) the reference; prints "
                                       "ms, TFLOP/s and the ratio best SDPA / flexflash. Small shapes on CPU.")
    bench.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    bench.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    bench.add_argument("--cases", help=f"comma-separated subset of {', '.join(BENCH_CASES)}")
    bench.add_argument("--seq-lens", help="comma-separated sequence lengths (default 1024,2048,4096 on CUDA, "
                                          "128,256,512 on CPU)")
    bench.add_argument("--compile-mode", choices=["default", "max-autotune"],
                       help="flexflash's compile mode for this run (default: the current one, see "
                            "flexflash.set_compile_mode)")
    bench.add_argument("--json", metavar="PATH", help="write the results as JSON")
    bench.add_argument("--plot", metavar="PNG", help="draw TFLOP/s against sequence length (needs matplotlib)")
    bench.set_defaults(func=cmd_bench)

    mask = sub.add_parser("mask", help="draw a mask as text or PNG",
                          description="Draws which keys each query may attend to.")
    mask.add_argument("kind", choices=MASK_KINDS)
    mask.add_argument("--q-len", type=_positive, default=8)
    mask.add_argument("--kv-len", type=_positive, default=None, help="default: --q-len")
    mask.add_argument("--window", type=_positive, default=3, help="sliding_window: keys per query")
    mask.add_argument("--prefix", type=_positive, default=2, help="prefix_lm: prefix length")
    mask.add_argument("--docs", help="document: comma-separated document lengths summing to --kv-len")
    mask.add_argument("--valid", type=_positive, help="padding: number of valid keys (default: all)")
    mask.add_argument("--png", metavar="PATH", help="write a PNG instead of text (needs matplotlib)")
    mask.set_defaults(func=cmd_mask)
    return parser


def _usage_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """The usage, then the error: for a missing command or an unknown flag, where the user needs to
    see what there is (a bad value gets _Parser.error's one line, which names the values expected)."""
    parser.print_usage(sys.stderr)
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        where = parser.commands[args.command] if args.command else parser
        _usage_error(where, f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        _usage_error(parser, f"expected a command: one of {', '.join(parser.commands)}")
    if getattr(args, "kv_len", 0) is None:
        args.kv_len = args.q_len
    try:
        return args.func(args)
    except UsageError as e:
        print(f"flexflash {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
