"""``flexflash check``: every modifier, module and the dropout statistics against the eager
reference, as a table."""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
import warnings
from typing import Callable

import torch

from .. import __version__, mods, reference
from ..functional import attention, route
from ._common import DTYPES, _choices, _device, _Progress, _warning_summary


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
    from ..modules import chunked, flash_attention, flash_attention_two, flash_mha
    files = (chunked, flash_attention, flash_attention_two, flash_mha)  # each calls attention
    saved = [f.attention for f in files]
    for f in files:
        f.attention = functools.partial(attention, backend="reference")
    try:
        yield
    finally:
        for f, fn in zip(files, saved):
            f.attention = fn


def _module_cases(device, gen):
    from .. import modules
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
