"""The SDPA path: PyTorch's scaled_dot_product_attention with its fused backends first, for the
calls the plan (flexflash.plan) sends there."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend

from . import _torch_private

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


def sdpa(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float) -> Tensor:
    """PyTorch's SDPA with cuDNN, flash and efficient attention first in its priority order, for
    the duration of the call. Which backends are enabled stays the caller's choice (e.g. through
    ``torch.nn.attention.sdpa_kernel``). The priority is switched directly rather than through
    ``sdpa_kernel``, which costs ~30 µs of host time per call on an H200 machine."""
    # Grouped heads: SDPA's enable_gqa maps query head h to key/value head h // (Hq // Hkv), as we do.
    gqa = q.shape[1] != k.shape[1]
    if torch.compiler.is_compiling():  # inside a caller's torch.compile, inductor chooses the kernel
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    previous = _torch_private.sdp_priority_order()
    wanted = _sdpa_priority(previous)
    if wanted == previous:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    _torch_private.set_sdp_priority_order(wanted)
    try:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    finally:
        _torch_private.set_sdp_priority_order(previous)
