"""zeta's inner attention, done right: :class:`FlashAttention`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..functional import attention
from ._common import _flag, _probability


class FlashAttention(nn.Module):
    r"""zeta's inner attention: ``softmax(q k^T / sqrt(D) + attn_bias) v`` on ``[B, H, N, D]`` tensors.

    Shapes::

        q          (B, H, Nq, D)
        k, v       (B, Hkv, Nk, D) / (B, Hkv, Nk, Dv), Hkv dividing H, or (B, Nk, D): one shared head
        mask       bool, True = may attend: (B, Nk) key padding or 4-D broadcastable to (B, H, Nq, Nk)
        attn_bias  float, added to the scores: (H, Nq, Nk) (zeta's shape), (Nq, Nk) or 4-D
        out        (B, H, Nq, Dv)

    Args:
        causal: bottom-right causal masking (query ``i`` sees key ``j <= i + Nk - Nq``) on both
            paths.
        dropout: attention dropout probability, applied in training mode only (exact, see
            :func:`flexflash.attention`).
        flash: ``True`` runs the compiled FlexAttention path, ``False`` the eager reference path
            (:mod:`flexflash.reference`); both give the same results.

    Unlike zeta's module, ``mask`` and ``causal`` (and ``attn_bias``) work together, ``mask`` is
    never ignored, the causal alignment is the same on both paths, 3-D k/v work for any ``Nk``
    and every float dtype works.

    :meth:`get_mask` returns zeta's causal mask, whose polarity is the **opposite** of ``mask``:
    True where attention is *not* allowed. Pass ``causal=True`` instead, or ``~get_mask(...)``
    broadcast to 4-D (``[None, None]``) as ``mask``.
    """

    def __init__(self, causal: bool = False, dropout: float = 0.0, flash: bool = True):
        super().__init__()
        self.causal = _flag("causal", causal)
        self.dropout = _probability("dropout", dropout)
        self.flash = _flag("flash", flash)

    def get_mask(self, i: int, j: int, device: torch.device | str | None = None) -> Tensor:
        """zeta's ``(i, j)`` bool mask, **True where bottom-right causal attention is NOT allowed**
        (``ones(i, j).triu(j - i + 1)``); the opposite polarity of ``mask``."""
        return torch.ones((i, j), device=device, dtype=torch.bool).triu(j - i + 1)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, attn_bias: Tensor | None,
                backend: str) -> Tensor:
        return attention(q, k, v, causal=self.causal, mask=mask, bias=attn_bias,
                         dropout_p=self.dropout if self.training else 0.0, backend=backend)

    def flash_attn(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                   attn_bias: Tensor | None = None) -> Tensor:
        """The compiled path, whatever ``flash`` says (zeta's method of the same name)."""
        return self._attend(q, k, v, mask, attn_bias, "auto")

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                attn_bias: Tensor | None = None) -> Tensor:
        """``(B, H, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv) -> (B, H, Nq, Dv)``."""
        return self._attend(q, k, v, mask, attn_bias, "auto" if self.flash else "reference")

    def extra_repr(self) -> str:
        return f"causal={self.causal}, dropout={self.dropout}, flash={self.flash}"
