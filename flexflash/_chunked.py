"""The exact, memory-bounded path: FlashAttention-2 style tiling in eager PyTorch.

Compiled FlexAttention has no backward pass (and no log-sum-exp output) on CPU in torch 2.11-2.13,
so CPU training runs here. Queries and keys are processed in ``(q_chunk, kv_chunk)`` tiles with an
online softmax in fp32 (fp64 for fp64 inputs); the forward pass keeps only the output and the
log-sum-exp, and the backward pass recomputes each tile's probabilities from the saved log-sum-exp
(FlashAttention-2, Algorithm 2). Peak extra memory is a few ``(B, H, q_chunk, kv_chunk)`` tiles,
never ``(Nq, Nk)``. Tiles in which the mask allows nothing are skipped (outside a caller's
torch.compile, where the test would be data-dependent).

Masks and score modifiers are evaluated over broadcast index grids of each tile. Gradients reach
``bias`` and any tensor a score modifier captures that requires grad (they are passed to the
autograd function as extra inputs and differentiated through the modifier in the backward pass).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import accumulation_dtype
from ._compose import Structure, compose_mask, compose_score, tile_grids
from ._sdpa_tiles import sdpa_tiles
from .dropout import Draw, keep

__all__ = ["chunked_attention"]


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask_fn, score_fn, scale, chunks, drop, *captured):
        # q (B, H, Nq, D); k (B, H, Nk, D); v (B, H, Nk, Dv): heads already expanded for GQA.
        B, H, Nq, _ = q.shape
        Nk, Dv = k.shape[2], v.shape[3]
        acc_dtype = accumulation_dtype(q.dtype)
        qc, kc = chunks
        # The output is kept in the accumulation dtype for the backward pass: its softmax term
        # D_i = dO_i . O_i taken from an output rounded to bf16/fp16 would be off by the rounding
        # (visible where O is not representable, e.g. a single key with dropout scaling).
        out = torch.zeros(B, H, Nq, Dv, dtype=acc_dtype, device=q.device)
        lse = torch.full((B, H, Nq), float("-inf"), dtype=acc_dtype, device=q.device)
        for q0, q1 in _tiles(Nq, qc):
            qi = q[:, :, q0:q1].to(acc_dtype)
            m = torch.full((B, H, q1 - q0), float("-inf"), dtype=acc_dtype, device=q.device)
            l = torch.zeros_like(m)
            acc = torch.zeros(B, H, q1 - q0, Dv, dtype=acc_dtype, device=q.device)
            for k0, k1 in _tiles(Nk, kc):
                tile = _allowed(B, H, q0, q1, k0, k1, mask_fn, q.device)
                if tile is None:
                    continue
                s = _modify(scale * (qi @ k[:, :, k0:k1].to(acc_dtype).transpose(-1, -2)), *tile, score_fn)
                m_new = torch.maximum(m, s.amax(dim=-1))
                m_safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
                p = torch.exp(s - m_safe[..., None])  # 0 where s = -inf
                alpha = torch.exp(m - m_safe)  # 0 while m = -inf
                l = l * alpha + p.sum(dim=-1)  # the normaliser counts dropped entries too
                if drop is not None:
                    p = p * _kept(drop, B, H, q0, q1, k0, k1, q.device)
                acc = acc * alpha[..., None] + p @ v[:, :, k0:k1].to(acc_dtype)
                m = m_new
            seen = l > 0  # rows with at least one allowed, finite score
            denom = l if drop is None else l * (1.0 - drop[1])  # P' = P * keep / (1 - p)
            out[:, :, q0:q1] = torch.where(seen[..., None], acc / torch.where(seen, denom, 1.0)[..., None], 0.0)
            lse[:, :, q0:q1] = torch.where(seen, m + torch.log(torch.where(seen, l, 1.0)), float("-inf"))
        ctx.save_for_backward(q, k, v, out, lse, *captured)
        ctx.mask_fn, ctx.score_fn, ctx.scale, ctx.chunks, ctx.drop = mask_fn, score_fn, scale, chunks, drop
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse, *captured = ctx.saved_tensors
        mask_fn, score_fn, scale, (qc, kc), drop = ctx.mask_fn, ctx.score_fn, ctx.scale, ctx.chunks, ctx.drop
        B, H, Nq, _ = q.shape
        Nk = k.shape[2]
        acc_dtype = lse.dtype
        want = [t for t in captured if t.requires_grad]
        traced = torch.compiler.is_compiling()
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc_dtype, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc_dtype, device=q.device)
        d_captured = [torch.zeros_like(t, dtype=torch.promote_types(t.dtype, acc_dtype)) for t in want]
        if d_out is None:
            d_out = torch.zeros_like(out)
        # D_i = rowsum(dO_i * O_i) - dlse_i: the softmax-Jacobian term (dlse enters as d lse/d s = P).
        # With dropout O = P' V, P' = P * keep / (1 - p), and still sum_j P_ij dP_ij = dO_i . O_i.
        delta = (d_out.to(acc_dtype) * out.to(acc_dtype)).sum(-1)
        if d_lse is not None:
            delta = delta - torch.where(torch.isneginf(lse), 0.0, d_lse.to(acc_dtype))
        safe_lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        for q0, q1 in _tiles(Nq, qc):
            qi = q[:, :, q0:q1].to(acc_dtype)
            doi = d_out[:, :, q0:q1].to(acc_dtype)
            for k0, k1 in _tiles(Nk, kc):
                tile = _allowed(B, H, q0, q1, k0, k1, mask_fn, q.device)
                if tile is None:
                    continue
                kj, vj = k[:, :, k0:k1].to(acc_dtype), v[:, :, k0:k1].to(acc_dtype)
                score_vjp = None
                if traced:
                    # Dynamo does not trace torch.autograd.grad here; torch.func.vjp it does.
                    raw = scale * (qi @ kj.transpose(-1, -2))
                    if score_fn is None:
                        s = _modify(raw, *tile, None)
                    else:
                        s, score_vjp = torch.func.vjp(lambda r, tile=tile: _modify(r, *tile, score_fn), raw)
                else:
                    with torch.enable_grad():
                        raw = (scale * (qi @ kj.transpose(-1, -2))).detach().requires_grad_(score_fn is not None)
                        s = _modify(raw, *tile, score_fn)
                p = torch.exp(s.detach() - safe_lse[:, :, q0:q1, None])  # (B, H, rows, cols)
                dp = doi @ vj.transpose(-1, -2)
                if drop is not None:
                    scaled_keep = _kept(drop, B, H, q0, q1, k0, k1, q.device) / (1.0 - drop[1])
                    dv[:, :, k0:k1] += (p * scaled_keep).transpose(-1, -2) @ doi
                    dp = dp * scaled_keep  # dL/dP = keep / (1 - p) * dL/dP'
                else:
                    dv[:, :, k0:k1] += p.transpose(-1, -2) @ doi
                ds = p * (dp - delta[:, :, q0:q1, None])
                if score_vjp is not None:
                    (ds,) = score_vjp(ds)
                    if want:  # the bias (chunked_attention lets no other captured tensor need grad here)
                        _add_broadcast(d_captured[0], ds, q0, q1, k0, k1)
                elif score_fn is not None:
                    grads = torch.autograd.grad(s, [raw, *want], ds, allow_unused=True)
                    ds = grads[0] if grads[0] is not None else torch.zeros_like(raw)
                    for acc, g in zip(d_captured, grads[1:]):
                        if g is not None:
                            acc += g
                dq[:, :, q0:q1] += scale * (ds @ kj)
                dk[:, :, k0:k1] += scale * (ds.transpose(-1, -2) @ qi)
        it = iter(d_captured)
        d_cap = [next(it).to(t.dtype) if t.requires_grad else None for t in captured]
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, *d_cap)


# Query rows per tile of SDPA's CPU kernel: fewer rows fit a sliding window's or a document's key
# span more tightly, more rows cost fewer calls; 256 was fastest of 128/256/512 (2-core CPU,
# B*N = 4096, H = 8, D = 64, fwd+bwd, document, sliding window and causal key padding masks).
_FUSED_ROWS = 256


def _fused(q: Tensor, v: Tensor, bias: Tensor | None, score_mod, dropout, grad: bool, return_lse: bool) -> bool:
    """Whether SDPA's fused CPU kernel computes the call in tiles (flexflash._sdpa_tiles): on CPU,
    outside a caller's torch.compile (a tile's key span depends on the mask's values), with q's
    head dim equal to v's, and without what the kernel has no place for: a score_mod, dropout
    (flexflash's own keep flags), gradients of a bias or of the lse (``grad``: the call needs a
    backward pass)."""
    return (q.device.type == "cpu" and not torch.compiler.is_compiling() and q.shape[-1] == v.shape[-1]
            and score_mod is None and dropout is None
            and not (grad and (return_lse or (bias is not None and bias.requires_grad))))


def _reads_grad_tensors(score_mod, device: torch.device) -> bool:
    """Whether ``score_mod`` reads a tensor that requires grad, told by evaluating it once at one
    entry: inside a caller's torch.compile the tensors its closure reads are not listed
    (``captured`` is empty there), but the result of reading one requires grad."""
    if score_mod is None:
        return False
    b, h, q_idx, kv_idx = tile_grids(1, 1, 0, 1, 0, 1, device)  # as the tiles call it, over index grids
    return bool(score_mod(torch.zeros(1, 1, 1, 1, device=device), b, h, q_idx, kv_idx).requires_grad)


def _add_broadcast(acc: Tensor, ds: Tensor, q0, q1, k0, k1) -> None:
    """Adds the gradient ``ds`` of one tile's scores ``(B, H, rows, cols)`` to the gradient ``acc``
    of a 4-D bias added to them, summed over the bias's broadcast (size-1) dimensions."""
    Bb, Hb, Mq, Mk = acc.shape
    g = ds
    for dim, size in ((0, Bb), (1, Hb), (2, Mq), (3, Mk)):
        if size == 1:
            g = g.sum(dim, keepdim=True)
    rows = slice(q0, q1) if Mq != 1 else slice(0, 1)
    cols = slice(k0, k1) if Mk != 1 else slice(0, 1)
    acc[:, :, rows, cols] += g.to(acc.dtype)


def _tiles(n, size: int):
    """``(start, end)`` of the tiles of ``[0, n)``. Counted and clamped without comparing ``n``
    itself, so that traced inside a caller's torch.compile a symbolic length stays symbolic (a
    ``range(0, n, size)`` would specialise the graph to one length): the graph guards only on the
    number of tiles."""
    for i in range((n + size - 1) // size):
        yield i * size, torch.sym_min(n, (i + 1) * size)


def _kept(drop, B: int, H: int, q0: int, q1: int, k0: int, k1: int, device: torch.device) -> Tensor:
    """The dropout keep flags of one tile as 0/1 floats (B, H, rows, cols) (see flexflash.dropout)."""
    params, _, dtype, offsets = drop
    b, h, qi, kj = tile_grids(B, H, q0, q1, k0, k1, device)
    if offsets is not None:  # a shard of a larger call: its global indices (flexflash.parallel)
        b0, h0, r0, H = offsets
        b, h, qi = b + b0, h + h0, qi + r0
    return keep(params, H, b, h, qi, kj).to(dtype)


def _allowed(B: int, H: int, q0: int, q1: int, k0: int, k1: int, mask_fn, device):
    """The tile's index grids and mask (None: no mask), or None where the mask allows nothing in
    it, told before any score of the tile is computed."""
    grids = tile_grids(B, H, q0, q1, k0, k1, device)
    if mask_fn is None:
        return grids, None
    allowed = mask_fn(*grids)
    # Skipping a tile is a data-dependent branch: inside a caller's torch.compile every tile
    # is computed (an empty one adds exact zeros), so the call traces into one graph.
    if not torch.compiler.is_compiling() and not bool(allowed.any()):
        return None
    return grids, allowed


def _modify(raw: Tensor, grids, allowed: Tensor | None, score_fn) -> Tensor:
    """Scores of one tile after the score modifiers and the mask (``grids``, ``allowed``: from
    :func:`_allowed`)."""
    s = raw if score_fn is None else score_fn(raw, *grids)
    return s if allowed is None else s.masked_fill(~allowed, float("-inf"))


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, mask: Tensor | None,
                      bias: Tensor | None, mask_mod, score_mod, scale: float, chunks: tuple[int, int],
                      captured: list[Tensor], dropout: Draw | None = None,
                      return_lse: bool = False, grad: bool = True) -> tuple[Tensor, Tensor]:
    """Exact attention in ``chunks = (q_chunk, kv_chunk)`` tiles; returns ``(out, lse)``.

    Takes a validated call (4-D ``q/k/v``, 4-D broadcastable ``mask``/``bias``). ``captured`` are
    tensors read by ``score_mod`` that may require grad. With ``dropout``, its drawn parameters decide
    which probabilities are kept; the lse is that of the undropped attention. Calls that SDPA's
    CPU kernel can compute tile by tile go there (flexflash._sdpa_tiles); ``return_lse``: the
    caller returns the lse (which those tiles do not differentiate); ``grad``: the call needs a
    backward pass (flexflash.plan.needs_grad)."""
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq != Hkv:  # GQA: query head h reads key/value head h // (Hq / Hkv)
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    st = Structure.of(causal=causal, mask=mask, bias=bias, mask_mod=mask_mod, score_mod=score_mod)
    mask_fn = compose_mask(st, k.shape[2] - q.shape[2], mask, mask_mod)
    score_fn = compose_score(st, bias, score_mod)
    others = [t for t in captured if t is not bias]  # tensors the score_mod reads
    extra = ([bias] if bias is not None else []) + others
    if torch.compiler.is_compiling() and torch.is_grad_enabled() and _reads_grad_tensors(score_mod, q.device):
        raise NotImplementedError(
            "flexflash: inside torch.compile on CPU, a score_mod that reads a tensor requiring grad is not "
            "supported (its gradient is taken with torch.autograd.grad, which Dynamo does not trace); pass an "
            "additive tensor as bias=, or call flexflash outside torch.compile (torch.compiler.disable)")
    if _fused(q, v, bias, score_mod, dropout, grad, return_lse):
        return sdpa_tiles(q, k, v, mask_fn=mask_fn, bias=bias, scale=scale, q_chunk=min(chunks[0], _FUSED_ROWS),
                          return_lse=return_lse)
    acc_dtype = accumulation_dtype(q.dtype)
    drop = None if dropout is None else (dropout.params, float(dropout.p), acc_dtype, dropout.offsets)
    return _ChunkedAttention.apply(q, k, v, mask_fn, score_fn, scale, chunks, drop, *extra)
