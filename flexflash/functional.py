"""The functional API: :func:`attention`."""

from __future__ import annotations

import logging
import warnings

import torch
from torch import Tensor

from . import dropout, parallel, reference
from ._checks import KEYWORDS, validate
from ._chunked import chunked_attention
from ._flex import run_flex
from ._sdpa import sdpa
from .parallel import is_dtensor
from .plan import TILES_FASTER, Plan, make_plan, needs_grad, plan_call

__all__ = ["attention", "explain", "route", "generator"]

log = logging.getLogger("flexflash")

_NOTED: set[str] = set()
# CPU training through the tiled path inside a caller's torch.compile: on torch 2.11 the traced
# path computed wrong input gradients (FlashAttentionTwo, fullgraph), and a graph break before it
# (the old note of the path) made graphs whose cache entries torch 2.11 crashed saving. Correct on
# torch 2.13 (tests/test_modules.py, test_cpu_training_under_torch_compile_fullgraph).
_TRACED_CPU_TRAINING_FAILS = torch.__version__ < "2.13"


def _note_once(key: str, message) -> None:
    """Tells the user once per process which path a call took (a warning and a log record);
    ``message`` is a function building the text, called only the first time. Not while a caller's
    torch.compile traces the call: logging there breaks the caller's graph (Dynamo does not trace
    logger methods), and the traced code runs no Python to tell anything later."""
    if not torch.compiler.is_compiling() and key not in _NOTED:
        _NOTED.add(key)
        text = message()
        log.info(text)
        warnings.warn(text, UserWarning, stacklevel=3)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    mask_mod=None,
    score_mod=None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    block_size: int | tuple[int, int] | None = None,
    kernel_options: dict | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    **unexpected,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Attention over ``(B, H, N, D)`` tensors with masks, biases and modifiers, compiled by FlexAttention.

    The layout is SDPA's, (batch, heads, sequence, head dim); a ``(B, N, H, D)`` tensor of the same
    sizes cannot be told apart, so flash-attn's layout goes through its functions in
    :mod:`flexflash.compat.flash_attn`.

    Shapes::

        q      (B, Hq,  Nq, D)
        k      (B, Hkv, Nk, D)    or (B, Nk, D): one key/value head shared by all query heads
        v      (B, Hkv, Nk, Dv)   or (B, Nk, Dv)
        mask   bool, True = may attend: (B, Nk) key padding, or 4-D broadcastable to (B, Hq, Nq, Nk)
        bias   float, added to the scores: (Nq, Nk), (Hq, Nq, Nk) or 4-D broadcastable to (B, Hq, Nq, Nk)
        out    (B, Hq, Nq, Dv) in q's dtype;   lse (B, Hq, Nq) float32 (float64 for float64 inputs)

    ``Hq`` must be a multiple of ``Hkv`` (grouped-query attention; query head ``h`` uses key/value
    head ``h // (Hq // Hkv)``). Scores are ``scale * q @ k^T`` (``scale = D ** -0.5`` by default),
    then ``+ bias``, then ``score_mod(score, b, h, q_idx, kv_idx)``; a key is visible where
    ``causal``, ``mask`` and ``mask_mod(b, h, q_idx, kv_idx)`` all allow it. ``-inf`` bias entries
    act as a mask. A query with no visible key returns 0 (never NaN), its ``lse`` is ``-inf`` and its
    gradients are 0.

    ``causal=True`` is aligned to the bottom-right corner (FlashAttention >= 2.1, zeta's
    ``get_mask``): query ``i`` sees key ``j`` iff ``j <= i + (Nk - Nq)``. With Nq=2, Nk=5::

        1 1 1 1 0        (SDPA's is_causal=True is top-left:   1 0 0 0 0
        1 1 1 1 1                                               1 1 0 0 0)

    Args:
        mask_mod, score_mod: functions with FlexAttention's signatures, e.g. from
            :mod:`flexflash.mods`; combined with the arguments above (``and`` for masks, score
            modifiers applied after the bias). Tensors they capture must be on q's device.
        scale: softmax scale (a finite float); default ``D ** -0.5``.
        dropout_p: attention dropout probability in ``[0, 1)``: the probabilities become
            ``P * keep / (1 - dropout_p)`` with ``keep`` Bernoulli(1 - dropout_p) per
            ``(b, h, i, j)``, the same in the backward pass, drawn from the default generator of q's
            device (``torch.manual_seed`` reproduces it; every call draws anew). Applied whenever
            it is > 0 (a module decides by its training flag). Exact, and no ``(Nq, Nk)`` tensor is
            stored: see :mod:`flexflash.dropout`. ``lse`` stays that of the undropped attention.
            Under ``backend="auto"``, a CUDA call SDPA takes (below) uses SDPA's fused dropout
            instead: the same distribution from SDPA's own random stream (other entries than
            the reference's; ``backend="flex"`` keeps flexflash's).
        block_size: ``int`` or ``(q_block, kv_block)``, the sparsity block of the block mask (the
            granularity at which fully masked tiles are skipped) and, on the memory-bounded path,
            the tile size. Results do not depend on it. Default ``(128, 128)`` on the FlexAttention
            path and ``(512, 1024)`` tiles on the memory-bounded path.
        kernel_options: passed to FlexAttention (e.g. ``{"BACKEND": "FLASH"}``); keys are checked.
        return_lse: also return the natural-log log-sum-exp of each query row.
        backend: ``"auto"`` (the fastest correct path: compiled FlexAttention; PyTorch's SDPA
            where it computes the call exactly and faster: on a CUDA GPU (sm80+), fp16/bf16 dense
            or causal (``Nq == Nk``) attention, also with grouped heads and dropout, without mask,
            bias, modifiers, ``return_lse``, ``kernel_options`` or ``block_size`` (cuDNN, else
            flash, else efficient), and on CPU the same in any dtype or with one mask or bias
            tensor alone; on CPU the other calls with gradients, ``return_lse``, dropout or
            float64, and calls inside a caller's ``torch.compile``, take the exact memory-bounded
            path, which it announces once, and so do bfloat16 calls, and float16 calls without a
            mask_mod, that have no score_mod, where it is faster),
            ``"flex"`` (compiled FlexAttention; raises where it cannot run) or ``"reference"``
            (the eager oracle of :mod:`flexflash.reference`).

    Compiled kernels and block masks are cached: new sequence lengths, new mask values or a new
    bias of the same shape reuse them.
    """
    if unexpected:
        raise _unexpected_keywords(unexpected)
    if is_dtensor(q) or is_dtensor(k) or is_dtensor(v):
        return parallel.attention(q, k, v, local=_attention, causal=causal, mask=mask, bias=bias, mask_mod=mask_mod,
                                  score_mod=score_mod, scale=scale, dropout_p=dropout_p, block_size=block_size,
                                  kernel_options=kernel_options, return_lse=return_lse, backend=backend)
    return _attention(q, k, v, causal=causal, mask=mask, bias=bias, mask_mod=mask_mod, score_mod=score_mod,
                      scale=scale, dropout_p=dropout_p, block_size=block_size, kernel_options=kernel_options,
                      return_lse=return_lse, backend=backend)


# Keywords of other attention APIs, and what flexflash calls them.
_OTHER_NAMES = {
    "is_causal": "causal=True (bottom-right aligned: query i sees key j iff j <= i + Nk - Nq; SDPA's is_causal is "
                 "top-left, the same only for Nq == Nk)",
    "attn_mask": "mask= for a bool mask (True = may attend) or bias= for an additive float mask",
    "softmax_scale": "scale=",
    "enable_gqa": "nothing: grouped heads (Hq a multiple of Hkv) are automatic",
    "window_size": "mask_mod=flexflash.mods.sliding_window(...) (or flexflash.compat.flash_attn's functions)",
    "softcap": "score_mod=flexflash.mods.tanh_softcap(...)",
    "alibi_slopes": "score_mod=flexflash.mods.alibi(...)",
    "block_mask": "mask_mod= (flexflash builds and caches the block mask)",
}


def _unexpected_keywords(unexpected: dict) -> TypeError:
    lines = []
    for name in unexpected:
        hint = _OTHER_NAMES.get(name)
        lines.append(f"{name}: flexflash.attention uses {hint}" if hint else f"{name}: not a keyword of flexflash.attention")
    return TypeError("flexflash.attention got unexpected keyword argument(s):\n  " + "\n  ".join(lines))


def _attention(q, k, v, *, causal, mask, bias, mask_mod, score_mod, scale, dropout_p, block_size, kernel_options,
               return_lse, backend, dropout_offsets: tuple[int, int, int, int] | None = None):
    """:func:`attention` on plain tensors. ``dropout_offsets = (b0, h0, q0, heads)``: this call is a
    shard of a larger one (flexflash.parallel); its dropout draws the larger call's ``keep`` for
    batch, query-head and query-row offsets ``b0, h0, q0`` and ``heads`` query heads in all."""
    p, infos, dropout_p = validate(q, k, v, causal=causal, mask=mask, bias=bias, mask_mod=mask_mod,
                                    score_mod=score_mod, scale=scale, dropout_p=dropout_p, block_size=block_size,
                                    kernel_options=kernel_options, return_lse=return_lse, backend=backend)
    plan = plan_call(p, infos, causal=causal, mask_mod=mask_mod, score_mod=score_mod, dropout_p=dropout_p,
                     block_size=block_size, kernel_options=kernel_options, return_lse=return_lse, backend=backend,
                     shard=dropout_offsets is not None)
    path = plan.path
    common = dict(causal=causal, mask=p.mask, bias=p.bias, mask_mod=mask_mod, score_mod=score_mod)
    if path == "reference":
        if dropout_offsets is not None and dropout_p > 0 and 0 not in (p.batch, p.q_len, p.kv_len):
            raise NotImplementedError(f"backend='reference': dropout on a shard of a DTensor call is not "
                                      f"supported (dropout_p={dropout_p}); use backend='auto' or 'flex'")
        # Empty problems are exact and free on the reference path (which draws the dropout seed
        # the same way).
        return reference.attention(p.q, p.k, p.v, scale=p.scale, dropout_p=dropout_p, return_lse=return_lse,
                                   **common)
    if path == "sdpa":
        return sdpa(p.q, p.k, p.v, causal=causal, scale=p.scale, mask=p.mask, bias=p.bias, dropout_p=dropout_p)
    # One draw per call from the device's default generator, on every path (see flexflash.dropout).
    drop = dropout.Draw(dropout_p, dropout.draw_seed_for(dropout_p, p.q), dropout_offsets) if dropout_p > 0 else None
    if path == "memory-bounded":
        captured = [*infos[0].tensors, *infos[1].tensors]
        grad = needs_grad(p, captured)
        if _TRACED_CPU_TRAINING_FAILS and torch.compiler.is_compiling() and grad:
            raise NotImplementedError(
                f"flexflash: a CPU call whose inputs require grad, inside torch.compile, is not supported on torch "
                f"{torch.__version__} (expected torch >= 2.13): traced whole, its tiled path gave wrong gradients "
                "there, and with a graph break before it torch 2.11 crashed saving the compile cache; call it "
                "outside torch.compile (torch.compiler.disable) or use torch >= 2.13")
        if plan.reasons["flex"] != TILES_FASTER:  # a choice of speed is not announced
            _note_once("cpu-chunked", lambda: f"flexflash: {plan.reasons['flex']}; the exact memory-bounded tiled path "
                                              "is used (this message is shown once)")
        out, lse = chunked_attention(p.q, p.k, p.v, scale=p.scale, chunks=p.chunks,
                                     captured=captured, dropout=drop, return_lse=return_lse, grad=grad, **common)
        return (out, lse) if return_lse else out

    q, k, v = p.q, p.k, p.v
    if q.device.type == "cpu" and not torch.is_grad_enabled():
        # Under no_grad, inputs that require grad are plain inputs; FlexAttention's CPU entry
        # rejects any that require grad, whatever the grad mode.
        q, k, v = q.detach(), k.detach(), v.detach()
        common.update(bias=p.bias.detach() if p.bias is not None else None)
    out, lse = run_flex(q, k, v, scale=p.scale, block=p.block,
                        kernel_options=kernel_options, return_lse=return_lse, mask_info=infos[0], score_info=infos[1],
                        kind=plan.kind, dropout=drop, **common)
    return (out, lse) if return_lse else out


def explain(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Plan:
    """The plan of ``attention(q, k, v, **kwargs)`` without running it: its path (``"sdpa"``,
    ``"flex"``, ``"memory-bounded"`` or ``"reference"``), the kernel generator and options on the flex
    path, and for each path not taken the reason (``plan.reasons``; ``print(plan)`` shows them all).
    The call executes exactly this plan. Takes :func:`attention`'s keywords and raises what the
    call would raise for invalid arguments; whether gradients are needed is read from the inputs
    and the current grad mode, as the call would."""
    return _explain("explain", q, k, v, kwargs)


def _explain(name: str, q: Tensor, k: Tensor, v: Tensor, kwargs: dict) -> Plan:
    unknown = sorted(set(kwargs) - set(KEYWORDS))
    if unknown:
        hints = "".join(f"\n  {u}: flexflash.attention uses {_OTHER_NAMES[u]}" for u in unknown if u in _OTHER_NAMES)
        raise TypeError(f"{name}: unknown keyword(s) {unknown}; expected those of flexflash.attention{hints}")
    options = {**KEYWORDS, **kwargs}
    p, infos, dropout_p = validate(q, k, v, **options)
    return make_plan(p, infos, causal=options["causal"], mask_mod=options["mask_mod"], score_mod=options["score_mod"],
                     dropout_p=dropout_p, block_size=options["block_size"], kernel_options=options["kernel_options"],
                     return_lse=options["return_lse"], backend=options["backend"])


def route(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> str:
    """The path of a call: ``explain(q, k, v, **kwargs).path`` (see :func:`explain`)."""
    return _explain("route", q, k, v, kwargs).path


def generator(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> str | None:
    """The kernel generator of a call on the flex path, ``"flash"`` (FlashAttention-4 kernels) or
    ``"triton"`` (FlexAttention's Triton templates, or its CPU template on CPU), None on the other
    paths: ``explain(q, k, v, **kwargs).generator`` (see :func:`explain`)."""
    return _explain("generator", q, k, v, kwargs).generator
