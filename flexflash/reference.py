"""The eager reference: a readable implementation of flexflash's attention semantics.

It is the oracle of every test and the path of ``backend="reference"`` / ``flash=False``. It never
imports the fast path. Scores are dense, ``(B, H, Nq, Nk)``; masks and modifiers are evaluated over
broadcast index grids; the softmax runs in fp32 (fp64 for fp64 inputs).

Semantics::

    s   = scale * q @ k^T            # scale = D ** -0.5 unless given
    s   = s + bias                    # if given
    s   = score_mod(s, b, h, i, j)    # if given
    ok  = causal & mask & mask_mod    # causal: j <= i + (Nk - Nq)  (bottom-right)
    P   = softmax(where(ok, s, -inf)) # a row with no allowed key is all zeros, its lse is -inf
    P   = P * keep / (1 - dropout_p)  # if dropout_p > 0; keep from flexflash.dropout
    out = P @ v                       # (B, Hq, Nq, Dv) in q's dtype
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import dropout
from ._checks import accumulation_dtype, normalize

__all__ = ["attention", "index_grids"]


def index_grids(B: int, H: int, Nq: int, Nk: int, device: torch.device, *, q_start: int = 0,
                kv_start: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """int32 index tensors shaped to broadcast to ``(B, H, Nq, Nk)``: ``b (B,1,1,1)``,
    ``h (1,H,1,1)``, ``q (1,1,Nq,1)``, ``kv (1,1,1,Nk)`` (queries/keys counted from the starts)."""
    def ar(start: int, n: int) -> Tensor:
        return torch.arange(start, start + n, device=device, dtype=torch.int32)

    return (ar(0, B).view(B, 1, 1, 1), ar(0, H).view(1, H, 1, 1),
            ar(q_start, Nq).view(1, 1, Nq, 1), ar(kv_start, Nk).view(1, 1, 1, Nk))


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, mask: Tensor | None = None,
              bias: Tensor | None = None, mask_mod=None, score_mod=None, scale: float | None = None,
              dropout_p: float = 0.0, return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Eager attention with the semantics of :func:`flexflash.attention` (same arguments).

    Shapes: ``q (B, Hq, Nq, D)``, ``k (B, Hkv, Nk, D)`` or ``(B, Nk, D)``, ``v`` like ``k`` with
    ``Dv``; returns ``(B, Hq, Nq, Dv)`` and, with ``return_lse``, the fp32 (fp64 for fp64 inputs)
    log-sum-exp ``(B, Hq, Nq)`` (of the attention before dropout).

    With ``dropout_p > 0`` the seed is drawn from the default generator of q's device exactly as
    :func:`flexflash.attention` draws it, so after the same ``torch.manual_seed`` both drop the same
    entries."""
    p = normalize(q, k, v, mask=mask, bias=bias, scale=scale, dropout_p=dropout_p)
    compute = accumulation_dtype(p.q.dtype)
    B, Hq, Nq, _ = p.q.shape
    Nk = p.kv_len
    group = Hq // p.kv_heads
    k4 = p.k.repeat_interleave(group, dim=1) if group > 1 else p.k  # (B, Hq, Nk, D)
    v4 = p.v.repeat_interleave(group, dim=1) if group > 1 else p.v  # (B, Hq, Nk, Dv)

    s = p.scale * (p.q.to(compute) @ k4.to(compute).transpose(-1, -2))  # (B, Hq, Nq, Nk)
    if p.bias is not None:
        s = s + p.bias.to(compute)
    b, h, i, j = index_grids(B, Hq, Nq, Nk, p.q.device)
    if score_mod is not None:
        s = score_mod(s, b, h, i, j)

    allowed = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=p.q.device)
    if causal:
        allowed = allowed & (j <= i + (Nk - Nq))
    if p.mask is not None:
        allowed = allowed & p.mask
    if mask_mod is not None:
        allowed = allowed & mask_mod(b, h, i, j)
    s = s.masked_fill(~allowed, float("-inf"))

    # Rows where every score is -inf (nothing allowed) get lse = -inf and zero probabilities; they
    # are computed on zeros so that their gradients are 0 rather than NaN.
    empty = torch.isneginf(s).all(dim=-1, keepdim=True)  # (B, Hq, Nq, 1)
    finite_lse = torch.logsumexp(s.masked_fill(empty, 0.0), dim=-1, keepdim=True)
    probs = torch.exp(s - finite_lse)  # exactly 0 on masked entries and empty rows
    lse = finite_lse.masked_fill(empty, float("-inf")).squeeze(-1)  # (B, Hq, Nq)
    if dropout_p > 0:
        params = dropout.draw_seed(dropout_p, p.q.device)
        probs = probs * dropout.keep(params, Hq, b, h, i, j).to(compute) / (1.0 - dropout_p)
    out = (probs @ v4.to(compute)).to(p.q.dtype)
    return (out, lse) if return_lse else out
