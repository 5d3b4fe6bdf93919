"""Builds the mask and score functions of one call from its parts.

The same composition serves every evaluation context: inside the compiled FlexAttention kernel
(scalar indices, ``offset`` a 0-d tensor), in the eager block-mask builder (vmap) and in the
memory-bounded CPU path (broadcast index grids). Keeping it in one place keeps the three paths in
agreement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Structure", "compose_mask", "compose_score", "index_broadcast", "squeeze_broadcast", "tile_grids"]


def index_broadcast(t: Tensor, full: tuple[bool, ...], b, h, q_idx, kv_idx) -> Tensor:
    """``t[b, h, q_idx, kv_idx]`` for a 4-D ``t`` whose size-1 dimensions broadcast (``full[d]``
    is False for those, and they are indexed at 0), or for ``t`` with those dimensions squeezed out
    (:func:`squeeze_broadcast`), which is indexed by the full dimensions' indices alone: no constant
    index, which FlashAttention-4's code generator cannot take."""
    idx = (b, h, q_idx, kv_idx)
    if t.dim() == 4:
        return t[tuple(i if f else 0 for i, f in zip(idx, full))]
    return t[tuple(i for i, f in zip(idx, full) if f)]


def squeeze_broadcast(t: Tensor, full: tuple[bool, ...]) -> Tensor:
    """A view of the 4-D ``t`` without its broadcast (size-1) dimensions."""
    return t.reshape([n for n, f in zip(t.shape, full) if f])


def tile_grids(B: int, H: int, q0: int, q1: int, k0: int, k1: int, device: torch.device):
    """Broadcastable int32 index grids of the tile ``[q0, q1) x [k0, k1)``: b (B,1,1,1),
    h (1,H,1,1), q (1,1,rows,1), kv (1,1,1,cols)."""
    ar = lambda a, b: torch.arange(a, b, device=device, dtype=torch.int32)  # noqa: E731
    return (ar(0, B).view(B, 1, 1, 1), ar(0, H).view(1, H, 1, 1),
            ar(q0, q1).view(1, 1, q1 - q0, 1), ar(k0, k1).view(1, 1, 1, k1 - k0))


@dataclass(frozen=True)
class Structure:
    """What a call is made of, apart from tensor values and sequence lengths.

    ``mask_full``/``bias_full`` say which dimensions of the 4-D mask/bias are full size (True) or
    broadcast (False); ``None`` means absent. ``single_query`` marks a query block padded from one
    row to two (the CPU kernel cannot compile a single query row), whose extra row must evaluate the
    modifiers at query 0."""

    causal: bool
    mask_full: tuple[bool, ...] | None
    bias_full: tuple[bool, ...] | None
    has_mask_mod: bool
    has_score_mod: bool
    single_query: bool = False
    # Causal with Nq == Nk: the offset is the constant 0 (no captured offset to read).
    causal_aligned: bool = False

    @classmethod
    def of(cls, *, causal: bool, mask: Tensor | None, bias: Tensor | None, mask_mod, score_mod,
           **flags: bool) -> Structure:
        """The structure of a validated call (4-D mask/bias); ``flags``: ``single_query``,
        ``causal_aligned``."""
        return cls(causal=causal,
                   mask_full=None if mask is None else tuple(s > 1 for s in mask.shape),
                   bias_full=None if bias is None else tuple(s > 1 for s in bias.shape),
                   has_mask_mod=mask_mod is not None, has_score_mod=score_mod is not None, **flags)

    # The parts of a call that other kernels see, without its score function, each built field by
    # field: ``dataclasses.replace`` iterates the fields, and traced into a caller's graph every
    # field it reads adds guards.
    def _scoreless(self, mask_full, bias_full, causal_aligned: bool) -> Structure:
        return Structure(causal=self.causal, mask_full=mask_full, bias_full=bias_full, has_mask_mod=self.has_mask_mod,
                         has_score_mod=False, single_query=self.single_query, causal_aligned=causal_aligned)

    def mask_part(self) -> Structure:
        """The mask's part of the call (no bias, no score function)."""
        return self._scoreless(self.mask_full, None, self.causal_aligned)

    def function_part(self) -> Structure:
        """The mask functions' part of the call (causal, the mask_mod), the offset a Python int."""
        return self._scoreless(None, None, False)

    def without_score_mod(self) -> Structure:
        return self._scoreless(self.mask_full, self.bias_full, self.causal_aligned)

    @property
    def masked(self) -> bool:
        return self.causal or self.mask_full is not None or self.has_mask_mod

    @property
    def scored(self) -> bool:
        return self.bias_full is not None or self.has_score_mod


def compose_mask(st: Structure, offset, mask: Tensor | None, mask_mod):
    """The call's mask function (``None`` when nothing is masked): causal (``j <= i + offset``),
    the bool ``mask`` and the user's ``mask_mod``, and-ed."""
    if not st.masked:
        return None

    def call_mask(b, h, q_idx, kv_idx):
        if st.single_query:
            q_idx = q_idx * 0
        allowed = None
        if st.causal:
            allowed = kv_idx <= q_idx if st.causal_aligned else kv_idx <= q_idx + offset
        if st.mask_full is not None:
            m = index_broadcast(mask, st.mask_full, b, h, q_idx, kv_idx)
            allowed = m if allowed is None else allowed & m
        if st.has_mask_mod:
            m = mask_mod(b, h, q_idx, kv_idx)
            allowed = m if allowed is None else allowed & m
        return allowed

    return call_mask


def compose_score(st: Structure, bias: Tensor | None, score_mod):
    """The call's score function (``None`` when scores are unmodified): ``+ bias``, then the
    user's ``score_mod``."""
    if not st.scored:
        return None

    def call_score(score, b, h, q_idx, kv_idx):
        if st.single_query:
            q_idx = q_idx * 0
        if st.bias_full is not None:
            score = score + index_broadcast(bias, st.bias_full, b, h, q_idx, kv_idx)
        if st.has_score_mod:
            score = score_mod(score, b, h, q_idx, kv_idx)
        return score

    return call_score
