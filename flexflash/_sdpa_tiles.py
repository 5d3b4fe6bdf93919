"""The memory-bounded path on SDPA's fused CPU kernel, for masks SDPA cannot take whole.

Each tile of query rows attends to the span of keys its mask allows (from the first allowed key
to the last), with the tile's mask, and bias, as the kernel's additive mask. Query rows are
independent, so the tiles need no merging; keys outside every row's span (a causal mask's upper
triangle, the other documents, a sliding window's far keys) cost nothing. The backward pass
recomputes each tile's mask and runs the kernel's backward from the saved output and log-sum-exp.
Peak extra memory is one ``(B, H, q_chunk, span)`` float mask, never ``(Nq, Nk)``.

Used by :mod:`flexflash._chunked` for the calls without score modifiers, dropout, or a bias that
needs its gradient; the eager tiles there compute those.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _torch_private
from ._checks import accumulation_dtype
from ._compose import tile_grids

__all__ = ["cpu_mask_dtype", "sdpa_tiles"]


def _tile_mask(B, H, q0, q1, Nk, mask_fn, bias: Tensor | None, mask_dtype, device, rows: bool = False):
    """``(k0, k1, attn_mask, empty_rows)`` of the query rows ``[q0, q1)``: the span of keys any of
    them may see, the additive mask over it in ``mask_dtype`` (None where it allows everything and
    there is no bias) and, with ``rows``, the rows that see no key (None where there are none, or
    without ``rows``); None where the rows see nothing."""
    k0, k1, allowed, empty = 0, Nk, None, None
    if mask_fn is not None:
        allowed = mask_fn(*tile_grids(B, H, q0, q1, 0, Nk, device))
        cols = allowed.reshape(-1, Nk).any(0).nonzero()
        if cols.numel() == 0:
            return None
        k0, k1 = int(cols[0]), int(cols[-1]) + 1
        allowed = allowed[..., k0:k1]
        if bool(allowed.all()):
            allowed = None
    attn = None
    if bias is not None:
        tile_rows = slice(q0, q1) if bias.shape[2] != 1 else slice(None)
        keys = slice(k0, k1) if bias.shape[3] != 1 else slice(None)
        attn = bias[:, :, tile_rows, keys]
    if allowed is not None:  # one pass: the bias where allowed, -inf elsewhere
        inf = torch.tensor(float("-inf"), dtype=mask_dtype, device=device)
        attn = torch.where(allowed, torch.zeros((), dtype=mask_dtype, device=device) if attn is None else attn, inf)
    if attn is not None:
        attn = attn.to(mask_dtype)  # a no-op where the bias is in mask_dtype already
        attn = attn if attn.stride(-1) == 1 else attn.contiguous()  # as for q, k, v (see sdpa_tiles)
        if rows:  # rows without a key: masked, or -inf in the bias
            empty = torch.isneginf(attn).all(-1)
            empty = empty if bool(empty.any()) else None
    return k0, k1, attn, empty


def cpu_mask_dtype(q_dtype: torch.dtype, bias: Tensor | None) -> torch.dtype:
    """The dtype SDPA's CPU kernel gets an additive mask in (it takes q's or float32): a bias's own
    where the kernel takes it (float32 keeps a float32 bias exact for half inputs), else float32
    for half inputs (the precision the scores are summed in) and q's otherwise; without a bias
    (a mask of 0 and -inf), float32, or float64 for float64 inputs."""
    half = q_dtype in (torch.float16, torch.bfloat16)
    if bias is None:
        return accumulation_dtype(q_dtype)
    if bias.dtype in (q_dtype, torch.float32):
        return bias.dtype
    return torch.float32 if half else q_dtype


class _SdpaTiles(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, mask_fn, scale, q_chunk, rows):
        # q (B, H, Nq, D); k, v (B, H, Nk, D): heads already expanded for GQA.
        B, H, Nq, _ = q.shape
        Nk = k.shape[2]
        acc_dtype = accumulation_dtype(q.dtype)
        mask_dtype = cpu_mask_dtype(q.dtype, bias)
        out = torch.zeros(B, H, Nq, v.shape[3], dtype=q.dtype, device=q.device)
        lse = torch.zeros(B, H, Nq, dtype=acc_dtype, device=q.device)  # the kernel's: 0 on empty rows
        public = torch.full((B, H, Nq), float("-inf"), dtype=acc_dtype, device=q.device)  # -inf on empty rows
        for q0 in range(0, Nq, q_chunk):
            q1 = min(Nq, q0 + q_chunk)
            tile = _tile_mask(B, H, q0, q1, Nk, mask_fn, bias, mask_dtype, q.device, rows)
            if tile is None:
                continue
            k0, k1, attn, empty = tile
            o, l = _torch_private.cpu_flash_forward(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], attn, scale)
            out[:, :, q0:q1] = o
            lse[:, :, q0:q1] = l
            public[:, :, q0:q1] = l if empty is None else l.masked_fill(empty, float("-inf"))
        ctx.save_for_backward(q, k, v, out, lse, bias)
        ctx.mask_fn, ctx.scale, ctx.q_chunk = mask_fn, scale, q_chunk
        ctx.mark_non_differentiable(public)
        return out, public

    @staticmethod
    def backward(ctx, d_out, d_lse):  # d_lse: the lse needs no gradient here (see sdpa_tiles)
        q, k, v, out, lse, bias = ctx.saved_tensors
        B, H, Nq, _ = q.shape
        Nk = k.shape[2]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k, dtype=lse.dtype), torch.zeros_like(v, dtype=lse.dtype)
        d_out = d_out.contiguous()
        for q0 in range(0, Nq, ctx.q_chunk):
            q1 = min(Nq, q0 + ctx.q_chunk)
            tile = _tile_mask(B, H, q0, q1, Nk, ctx.mask_fn, bias, cpu_mask_dtype(q.dtype, bias), q.device)
            if tile is None:
                continue
            k0, k1, attn, _ = tile
            g = _torch_private.cpu_flash_backward(d_out[:, :, q0:q1], q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1],
                                                  out[:, :, q0:q1], lse[:, :, q0:q1], attn, ctx.scale)
            dq[:, :, q0:q1] = g[0]
            dk[:, :, k0:k1] += g[1]
            dv[:, :, k0:k1] += g[2]
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def sdpa_tiles(q: Tensor, k: Tensor, v: Tensor, *, mask_fn, bias: Tensor | None, scale: float,
               q_chunk: int, return_lse: bool = True) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of a validated CPU call (k/v heads expanded to q's) in tiles of ``q_chunk``
    query rows; ``mask_fn``: the composed mask over index grids (flexflash._compose), ``bias`` a 4-D
    bias that needs no gradient. Rows that see no key: out 0, lse ``-inf`` (found only with
    ``return_lse``: without it the lse of such rows is the kernel's 0, for a caller that discards
    it). The lse carries no gradient (calls that differentiate it take the eager tiles)."""
    # The kernel reads the head dim as contiguous whatever its stride (wrong results otherwise).
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _SdpaTiles.apply(q, k, v, bias, mask_fn, scale, q_chunk, return_lse)
