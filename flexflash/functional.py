"""The functional API: :func:`attention`."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import Tensor

from . import dropout, reference
from ._checks import block_sizes, describe, normalize
from ._chunked import chunked_attention
from ._compile import captured_tensors, run_flex

__all__ = ["attention"]

log = logging.getLogger("flexflash")

# Tile sizes of the memory-bounded path when no block_size is given (zeta's bucket sizes).
_DEFAULT_CHUNKS = (512, 1024)
_NOTED: set[str] = set()


def _note_once(key: str, message: str) -> None:
    """Tells the user once per process which path a call took (a warning and a log record)."""
    if key not in _NOTED:
        _NOTED.add(key)
        log.info(message)
        warnings.warn(message, UserWarning, stacklevel=3)


def _known_kernel_options() -> set[str] | None:
    try:
        from torch.nn.attention.flex_attention import FlexKernelOptions
    except ImportError:  # pragma: no cover - older torch
        return None
    return set(getattr(FlexKernelOptions, "__annotations__", {})) or None


def _check_modifier(name: str, fn: Any, device: torch.device) -> list[Tensor]:
    if fn is None:
        return []
    if not callable(fn):
        raise TypeError(f"{name}: expected a callable with FlexAttention's signature, got {type(fn).__name__}")
    tensors = captured_tensors(fn)
    for t in tensors:
        if t.device != device:
            raise ValueError(
                f"{name}: {getattr(fn, '__name__', name)} reads a tensor on {t.device} (shape "
                f"{tuple(t.shape)}), expected the device of q ({device}); move it with .to({str(device)!r})")
    return tensors


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
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Scaled dot-product attention with masks, biases and modifiers, compiled by FlexAttention.

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
        block_size: ``int`` or ``(q_block, kv_block)``, the sparsity block of the block mask (the
            granularity at which fully masked tiles are skipped) and, on the memory-bounded path,
            the tile size. Results do not depend on it. Default ``(128, 128)`` on the FlexAttention
            path and ``(512, 1024)`` tiles on the memory-bounded path.
        kernel_options: passed to FlexAttention (e.g. ``{"BACKEND": "FLASH"}``); keys are checked.
        return_lse: also return the natural-log log-sum-exp of each query row.
        backend: ``"auto"`` (the fastest correct path: compiled FlexAttention, or on CPU with
            gradients, ``return_lse`` or dropout the exact memory-bounded path, which it announces
            once),
            ``"flex"`` (compiled FlexAttention; raises where it cannot run) or ``"reference"``
            (the eager oracle of :mod:`flexflash.reference`).

    Compiled kernels and block masks are cached: new sequence lengths, new mask values or a new
    bias of the same shape reuse them.
    """
    p = normalize(q, k, v, mask=mask, bias=bias, scale=scale, dropout_p=dropout_p,
                  block_size=block_size, backend=backend)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__} {causal!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__} {return_lse!r}")
    captured = _check_modifier("mask_mod", mask_mod, p.q.device) + _check_modifier("score_mod", score_mod, p.q.device)
    if kernel_options is not None:
        if not isinstance(kernel_options, dict) or not all(isinstance(key, str) for key in kernel_options):
            raise TypeError(f"kernel_options: expected a dict with str keys, got {kernel_options!r}")
        known = _known_kernel_options()
        unknown = sorted(set(kernel_options) - known) if known else []
        if unknown:
            raise ValueError(f"kernel_options: unknown option(s) {unknown}; expected keys among {sorted(known)}")
    dropout_p = float(dropout_p)

    common = dict(causal=causal, mask=p.mask, bias=p.bias, mask_mod=mask_mod, score_mod=score_mod)
    if backend == "reference" or 0 in (p.batch, p.q_len, p.kv_len):
        # Empty problems are exact and free on the reference path (which draws the dropout seed
        # the same way).
        return reference.attention(p.q, p.k, p.v, scale=p.scale, dropout_p=dropout_p, return_lse=return_lse,
                                   **common)
    # One draw per call from the device's default generator, on every path (see flexflash.dropout).
    drop = dict(dropout_p=dropout_p, dropout_params=dropout.draw_seed(dropout_p, p.q.device) if dropout_p > 0 else None)

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (p.q, p.k, p.v, p.bias, *captured))
    on_cpu = p.q.device.type == "cpu"
    if on_cpu and (needs_grad or return_lse or dropout_p > 0):
        why = ("inputs that require grad" if needs_grad else "return_lse=True" if return_lse
               else f"dropout_p={dropout_p}")
        if backend == "flex":
            missing = "backward pass" if needs_grad else "log-sum-exp output"
            if not (needs_grad or return_lse):
                missing += " (exact dropout needs it)"
            raise NotImplementedError(
                f"backend='flex': compiled FlexAttention has no {missing} on CPU in torch {torch.__version__} "
                f"({why}); use backend='auto' (exact memory-bounded path) or backend='reference'\n"
                f"{describe(q=p.q, k=p.k, v=p.v)}")
        _note_once("cpu-chunked", f"flexflash: CPU call with {why}: compiled FlexAttention cannot do this on CPU in "
                                  f"torch {torch.__version__}, so the exact memory-bounded tiled path is used "
                                  "(this message is shown once)")
        out, lse = chunked_attention(p.q, p.k, p.v, scale=p.scale, chunks=block_sizes(block_size, _DEFAULT_CHUNKS),
                                     captured=captured, **common, **drop)
        return (out, lse) if return_lse else out

    out, lse = run_flex(p.q, p.k, p.v, scale=p.scale, block=block_sizes(block_size),
                        kernel_options=kernel_options, return_lse=return_lse, **common, **drop)
    return (out, lse) if return_lse else out
