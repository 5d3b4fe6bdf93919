"""The SDPA path: PyTorch's scaled_dot_product_attention with its fused backends first, for the
calls the plan (flexflash.plan) sends there."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend

from . import _torch_private
from ._sdpa_tiles import cpu_mask_dtype

__all__ = ["sdpa"]

_SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


_PRIORITIES: dict[tuple[int, ...], list[int]] = {}


def _sdpa_priority(previous: list[int]) -> list[int]:
    """SDPA's backend priority order for the SDPA route: ``_SDPA_ORDER`` first, then the rest in
    their previous order."""
    key = tuple(previous)
    wanted = _PRIORITIES.get(key)
    if wanted is None:
        first = [int(b) for b in _SDPA_ORDER]
        wanted = _PRIORITIES[key] = first + [b for b in previous if b not in first]
    return wanted


def sdpa(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float, mask: Tensor | None = None,
         bias: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """PyTorch's SDPA with cuDNN, flash and efficient attention first in its priority order, for
    the duration of the call. Which backends are enabled stays the caller's choice (e.g. through
    ``torch.nn.attention.sdpa_kernel``). The priority is switched directly rather than through
    ``sdpa_kernel``, which costs ~30 µs of host time per call on an H200 machine.

    ``mask`` (bool) or ``bias`` (float), at most one, become SDPA's ``attn_mask`` (the plan sends
    them on CPU, and masks of eager decoding steps on CUDA: flexflash.plan.short_masked_call).
    SDPA's dropout draws from its own random stream. Rows a mask allows nothing in give 0, as on
    every path: SDPA's CPU kernel gives 0 there itself; on CUDA those rows are set to 0 (SDPA's
    CUDA backends may give NaN)."""
    # Grouped heads: SDPA's enable_gqa maps query head h to key/value head h // (Hq // Hkv), as we do.
    gqa = q.shape[1] != k.shape[1]
    attn_mask = mask if bias is None else _cpu_bias(bias, q.dtype)
    if q.device.type == "cpu":
        # SDPA's fused CPU kernel needs unit strides along the head dim (else its math backend runs).
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    kw = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal, scale=scale, enable_gqa=gqa)
    out = _prioritised(q, k, v, kw)
    if mask is not None and q.device.type != "cpu":
        out = torch.where(mask.any(-1, keepdim=True), out, 0.0)
    return out


# Whether SDPA's CUDA dispatch has installed its default priority order in this process (see
# _torch_private.settle_sdp_priority_order).
_SETTLED = [False]


def _prioritised(q: Tensor, k: Tensor, v: Tensor, kw: dict) -> Tensor:
    """SDPA's call with ``_SDPA_ORDER`` first in its priority order for its duration; the order
    restored afterwards is SDPA's own default where the process had not dispatched a CUDA call yet
    (torch installs it then), not the static order it replaces."""
    if torch.compiler.is_compiling():  # inside a caller's torch.compile, inductor chooses the kernel
        return F.scaled_dot_product_attention(q, k, v, **kw)
    if not _SETTLED[0] and q.device.type == "cuda":
        _torch_private.settle_sdp_priority_order(q)
        _SETTLED[0] = True
    previous = _torch_private.sdp_priority_order()
    wanted = _sdpa_priority(previous)
    if wanted == previous:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    _torch_private.set_sdp_priority_order(wanted)
    try:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    finally:
        _torch_private.set_sdp_priority_order(previous)


def _cpu_bias(bias: Tensor, dtype: torch.dtype) -> Tensor:
    """The bias as SDPA's additive mask, in the dtype of :func:`flexflash._sdpa_tiles.cpu_mask_dtype`
    (its own where SDPA takes it)."""
    return bias.to(cpu_mask_dtype(dtype, bias))
