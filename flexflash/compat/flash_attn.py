"""flash-attn 2's functions on flexflash: ``from flexflash.compat.flash_attn import flash_attn_func``.

Layout ``(batch, seqlen, nheads, headdim)`` (flash-attn's, not flexflash's ``(B, H, N, D)``); packed
variable-length tensors ``(total_tokens, nheads, headdim)``. The same argument names, defaults and
return values as flash-attn 2.x, with its semantics:

* scores ``s = softmax_scale * q @ k^T`` (default ``headdim ** -0.5``), then with ``softcap > 0``
  ``softcap * tanh(s / softcap)``, then ALiBi's bias, then the masks;
* ``causal`` is aligned to the bottom-right corner: query ``i`` sees key ``j`` iff
  ``j <= i + seqlen_k - seqlen_q``;
* ``window_size=(left, right)``: query ``i`` sees keys ``i + seqlen_k - seqlen_q - left`` to
  ``i + seqlen_k - seqlen_q + right``; -1 leaves that side unbounded; ``causal`` sets ``right`` to 0;
* ``alibi_slopes`` of shape ``(nheads,)`` or ``(batch, nheads)``, read in float32 (float64 for
  float64 inputs): the bias
  ``-slope * |i + seqlen_k - seqlen_q - j|`` (with ``causal`` flash-attn's kernel adds ``slope * j``
  instead, which differs by a constant per row: the same output, a log-sum-exp shifted by that
  constant); slopes get no gradient;
* grouped heads (MQA/GQA): ``nheads % nheads_k == 0``;
* ``dropout_p`` as flash-attn: pass 0.0 in evaluation;
* ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: ``softmax_lse`` is
  ``(batch, nheads, seqlen_q)`` float32, float64 for float64 inputs (``(nheads, total_q)`` for the
  variable-length functions);
  the third value, flash-attn's dropout pattern for its tests, is not materialised (None);
* ``deterministic`` is accepted (flexflash's backward is deterministic).

Where flexflash differs: a query that sees no key returns 0 with a log-sum-exp of ``-inf`` (flash-attn's
kernel writes ``+inf`` there); inputs may be any floating dtype on any device flexflash runs on
(CPU included); everything runs through :func:`flexflash.attention`, so its paths (SDPA, compiled
FlexAttention, the CPU tiles) and caches apply, except paged caches read in place (on CUDA, float32
pages of a multiple of 128 tokens, no gradients: flexflash's FlexAttention path over the pool of pages,
``flexflash._paged``; other paged calls gather the pages) and decoding steps traced into a caller's
torch.compile on CUDA (FlexAttention's decoding kernel by a short path, ``flexflash.compat._decoding``,
with fewer guards and block-mask kernels per step); ``rotary_dim`` may be any even number up to
``headdim`` (flash-attn's kernel needs a multiple of 16), and ``cache_leftpad`` works with paged
caches too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import accumulation_dtype
from .._compose import tile_grids
from .._paged import Pages, paged_attention, reads_in_place
from . import _decoding
from ._kv_cache import append, cache_lengths, check_cache, positions, rotate, sequences
from ..functional import attention

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]


def _window(window_size) -> tuple[int, int]:
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"window_size: expected (left, right) ints (-1 = unbounded), got {window_size!r}") from None
    return left, right


def _mask_mod(diag, left: int, right: int, causal: bool, extra=None):
    """The mask of a call: ``diag(b, q_idx)`` is the key aligned with query ``q_idx`` (bottom-right),
    ``extra(b, h, q_idx, kv_idx)`` a further condition (documents, cache lengths); None where
    nothing is masked."""
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left < 0 and right < 0 and extra is None:
        return None

    def flash_attn_mask(b, h, q_idx, kv_idx):
        d = diag(b, q_idx) if left >= 0 or right >= 0 else None
        parts = (([kv_idx >= d - left] if left >= 0 else [])
                 + ([kv_idx <= (d + right if right else d)] if right >= 0 else []))
        if extra is not None:
            parts.append(extra(b, h, q_idx, kv_idx))
        ok = parts[0]
        for part in parts[1:]:
            ok = ok & part
        return ok

    return flash_attn_mask


def _score_mod(diag, softcap: float, alibi_slopes: Tensor | None, nheads: int, batch: int, slope_row=None,
               dtype: torch.dtype = torch.float32):
    """Soft-capping, then ALiBi's bias (see the module docstring); None where scores are unchanged.
    ``slope_row(b, q_idx)``: the row of 2-D slopes of each query (default: its batch ``b``). The
    slopes are read in the accumulation dtype of a call of ``dtype`` (float32, flash-attn's dtype
    for them; float64 for float64 calls)."""
    softcap = float(softcap)
    if softcap < 0:
        raise ValueError(f"softcap: expected a float >= 0 (0 = off), got {softcap}")
    slopes = None
    if alibi_slopes is not None:
        if slope_row is None and alibi_slopes.shape not in ((nheads,), (batch, nheads)):
            raise ValueError(f"alibi_slopes: expected shape ({nheads},) or ({batch}, {nheads}), got "
                             f"{tuple(alibi_slopes.shape)}")
        slopes = alibi_slopes.detach().to(accumulation_dtype(dtype))
    if softcap == 0 and slopes is None:
        return None
    batched = slopes is not None and slopes.dim() == 2

    def flash_attn_score(score, b, h, q_idx, kv_idx):
        if softcap > 0:
            score = softcap * torch.tanh(score / softcap)
        if slopes is not None:
            slope = (slopes[b if slope_row is None else slope_row(b, q_idx), h] if batched else slopes[h])
            score = score - slope * (diag(b, q_idx) - kv_idx).abs()
        return score

    return flash_attn_score


def _bhsd(t: Tensor, name: str, rank: int = 4) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != rank:
        shape = "(batch, seqlen, nheads, headdim)" if rank == 4 else "(total_tokens, nheads, headdim)"
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a {rank}-D tensor {shape} (flash-attn's layout), got {got}")
    return t.transpose(1, 2) if rank == 4 else t.transpose(0, 1).unsqueeze(0)


def _run(q, k, v, *, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, lse, diag=None,
         extra=None, as_tensor=False, slope_row=None, pages: Pages | None = None):
    """flexflash.attention on ``(B, H, N, D)`` views, with flash-attn's masks and modifiers;
    ``as_tensor``: the mask function evaluated once over the call's index grids, passed as a
    ``(B, 1, Nq, Nk)`` mask tensor (see ``_TENSOR_MASK_ROWS``); ``pages``: ``k``, ``v`` are paged
    caches ``(num_blocks, page_block_size, nheads_k, headdim)`` read in place at these pages
    (:func:`flexflash._paged.paged_attention`)."""
    B, H, Nq = q.shape[:3]
    if diag is None:
        offset = k.shape[2] - Nq

        def diag(b, q_idx):
            return q_idx + offset
    left, right = _window(window_size)
    mask_mod = _mask_mod(diag, left, right, causal, extra)
    score_mod = _score_mod(diag, softcap, alibi_slopes, H, B, slope_row, q.dtype)
    if pages is not None:
        return paged_attention(q, k, v, pages, mask_mod=mask_mod, score_mod=score_mod, scale=softmax_scale,
                               return_lse=lse)
    mask = None
    if as_tensor and mask_mod is not None:
        mask, mask_mod = mask_mod(*_grids(Nq, k.shape[2], q.device)), None
    return attention(q, k, v, mask=mask, mask_mod=mask_mod, score_mod=score_mod, scale=softmax_scale,
                     dropout_p=dropout_p, return_lse=lse)


_GRIDS: dict[tuple, tuple] = {}

# The batch "grid" of a short call's mask tensor: the index that lays a (batch,) tensor out as
# (batch, 1, 1, 1). flash-attn's mask functions read the batch index only to index per-sequence
# lengths (``total[b]``, ``start[b]``); with this basic index such a read is a view, where an index
# tensor would cost a gather per read (a launch per decoding step on a GPU).
_BATCH_ROWS = (slice(None), None, None, None)


def _grids(Nq: int, Nk: int, device: torch.device) -> tuple:
    """The index grids over which a short call's mask function is evaluated as a tensor
    (:func:`flexflash._compose.tile_grids`, the batch grid replaced by ``_BATCH_ROWS``), kept
    from call to call outside a caller's torch.compile: a decoding step of one shape makes none
    anew. flash-attn's mask functions here only read them."""
    if torch.compiler.is_compiling():
        return _new_grids(Nq, Nk, device)
    key = (Nq, Nk, device)
    grids = _GRIDS.get(key)
    if grids is None:
        if len(_GRIDS) >= 64:
            _GRIDS.clear()
        grids = _GRIDS[key] = _new_grids(Nq, Nk, device)
    return grids


def _new_grids(Nq: int, Nk: int, device: torch.device) -> tuple:
    return (_BATCH_ROWS,) + tile_grids(1, 1, 0, Nq, 0, Nk, device)[1:]  # (no batch grid: _BATCH_ROWS)


# Up to this many new query tokens per sequence (a decoding step, a few speculative tokens), and
# up to _TENSOR_MASK_ENTRIES entries in all, the mask of a flash_attn_with_kvcache call is built as
# a (batch, 1, seqlen_q, seqlen_cache) tensor: small, cheaper to make than a block mask from a mask
# function, and a call SDPA takes whole where no score modifier is needed (its CPU kernel; on CUDA
# eager fp16/bf16 steps: flexflash.plan.short_masked_call).
_TENSOR_MASK_ROWS = 16
_TENSOR_MASK_ENTRIES = 1 << 24  # 16 MiB of bool: batch 64 at 16 tokens of a 16k cache


def _mask_as_tensor(q: Tensor, B: int, Sq: int, S: int) -> bool:
    """Whether a flash_attn_with_kvcache call builds its mask as a tensor (``_TENSOR_MASK_ROWS``):
    short calls, except inside a caller's torch.compile on a GPU. There the call runs FlexAttention
    either way (on CUDA SDPA takes masked calls only eagerly), which takes the mask function best, and a mask
    tensor computed in the caller's graph was fused into FlexAttention's template, which Triton
    failed to compile (torch 2.11, H200, a float32 decoding step under ``mode="reduce-overhead"``)."""
    if Sq > _TENSOR_MASK_ROWS or B * Sq * S > _TENSOR_MASK_ENTRIES:
        return False
    return q.device.type == "cpu" or not torch.compiler.is_compiling()


def _finish(result, lse: bool, back, packed: bool = False, probs: bool = True):
    """flash-attn's return value from flexflash's: the output laid out back by ``back`` and, with
    ``lse``, the log-sum-exp (``(nheads, total)`` for ``packed`` sequences) and, with ``probs``,
    None for flash-attn's dropout pattern."""
    if not lse:
        return back(result)
    out, softmax_lse = result
    softmax_lse = softmax_lse[0] if packed else softmax_lse
    return (back(out), softmax_lse, None) if probs else (back(out), softmax_lse)


def _batched(o: Tensor) -> Tensor:
    """``(B, H, N, D)`` to flash-attn's ``(B, N, H, D)``."""
    return o.transpose(1, 2).contiguous()


def _unpack(o: Tensor) -> Tensor:
    """``(1, H, total, D)`` to flash-attn's packed ``(total, H, D)``."""
    return o[0].transpose(0, 1).contiguous()


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_func``: ``q (batch, seqlen_q, nheads, headdim)``, ``k``/``v``
    ``(batch, seqlen_k, nheads_k, headdim)``; returns ``out (batch, seqlen_q, nheads, headdim)``
    (and ``softmax_lse``, None with ``return_attn_probs``)."""
    result = _run(_bhsd(q, "q"), _bhsd(k, "k"), _bhsd(v, "v"), dropout_p=dropout_p, softmax_scale=softmax_scale,
                  causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                  lse=return_attn_probs)
    return _finish(result, return_attn_probs, _batched)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``qkv (batch, seqlen, 3, nheads, headdim)``."""
    _packed(qkv, "qkv", 5, 2, 3)
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``q (batch, seqlen_q, nheads, headdim)``, ``kv (batch, seqlen_k, 2, nheads_k, headdim)``."""
    _packed(kv, "kv", 5, 2, 2)
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def _packed(t, name: str, rank: int, dim: int, size: int) -> None:
    if not isinstance(t, Tensor) or t.dim() != rank or t.shape[dim] != size:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a {rank}-D tensor with {size} at dimension {dim} (flash-attn's packed "
                         f"layout), got {got}")


def _cu(cu: Tensor, name: str, total: int) -> Tensor:
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.numel() < 2 or cu.is_floating_point():
        raise ValueError(f"{name}: expected a 1-D integer tensor [0, ..., total] (batch + 1 entries), got "
                         f"{tuple(cu.shape) if isinstance(cu, Tensor) else cu!r}")
    if not torch.compiler.is_compiling():
        if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or int(cu[-1]) > total:
            raise ValueError(f"{name}: expected non-decreasing offsets from 0 to at most {total} tokens, got "
                             f"{cu.tolist()}")
    return cu.long()


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn's ``flash_attn_varlen_func``: sequences packed without padding, ``q (total_q,
    nheads, headdim)``, ``k``/``v`` ``(total_k, nheads_k, headdim)``, sequence ``i`` at
    ``cu_seqlens[i]:cu_seqlens[i + 1]``; causal masks and windows apply within each sequence
    (bottom-right per sequence); ``alibi_slopes`` ``(nheads,)`` or per sequence ``(batch, nheads)``.
    With ``block_table (batch, max_blocks)``, ``k``/``v`` are paged caches ``(num_blocks,
    page_block_size, nheads_k, headdim)`` and sequence ``i``'s keys are the first
    ``cu_seqlens_k[i + 1] - cu_seqlens_k[i]`` of its pages laid end to end. Computed over the packed
    tokens with a document mask (no padding); new lengths and offsets reuse the compiled kernel.
    ``max_seqlen_q/k`` are accepted and not needed. Returns ``out (total_q, nheads, headdim)`` (and
    ``softmax_lse (nheads, total_q)``, None with ``return_attn_probs``)."""
    qt = _bhsd(q, "q", 3)
    cu_q = _cu(cu_seqlens_q, "cu_seqlens_q", q.shape[0])
    nseq = cu_q.numel() - 1
    if block_table is None:
        kt, vt = _bhsd(k, "k", 3), _bhsd(v, "v", 3)
        nk = k.shape[0]
    else:  # each sequence's pages laid end to end: (nseq * capacity, heads, dim)
        for c, name in ((k, "k"), (v, "v")):
            check_cache(c, None, block_table, nseq, name)
        nk = nseq * block_table.shape[1] * k.shape[1]
    cu_k = _cu(cu_seqlens_k, "cu_seqlens_k", nk)
    if cu_k.numel() != cu_q.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k: expected the same number of sequences, got "
                         f"{nseq} and {cu_k.numel() - 1}")
    in_place = block_table is not None and not dropout_p and reads_in_place(qt, k, v, return_attn_probs, block_table)
    if in_place:
        kt, vt = k, v  # the paged caches themselves (flexflash._paged)
    elif block_table is not None:
        kt, vt = (_bhsd(sequences(c, None, block_table).flatten(0, 1), name, 3) for c, name in ((k, "k"), (v, "v")))
    device = q.device
    tq, tk = torch.arange(q.shape[0], device=device), torch.arange(nk, device=device)
    # The sequence of each token: the last offset at or before it (a token past the last sequence:
    # index nseq). Searched in the whole offsets, not cu[1:], whose length is 1 for one sequence:
    # a size Dynamo specialises on, so a caller's compiled graph would compile again for it (for the
    # same reason, per-sequence values are read per token, cu[d + 1] - cu[d], never as cu[1:] - cu[:-1]).
    doc_q = torch.searchsorted(cu_q, tq, right=True) - 1
    doc_q = torch.where(doc_q < nseq, doc_q, -1)
    if block_table is None:
        k_start = cu_k
        doc_k = torch.searchsorted(cu_k, tk, right=True) - 1
        doc_k = torch.where(doc_k < nseq, doc_k, -2)  # tokens past the sequences see nothing, are seen by none
    else:
        capacity = nk // max(nseq, 1)
        if not torch.compiler.is_compiling() and nseq and int((cu_k[1:] - cu_k[:-1]).max()) > capacity:
            raise ValueError(f"cu_seqlens_k: sequences of {(cu_k[1:] - cu_k[:-1]).tolist()} keys, expected at "
                             f"most the {capacity} of block_table's pages")
        k_start = torch.arange(nseq + 1, device=device) * capacity
        doc_k = tk // capacity
        doc_k = torch.where(tk - doc_k * capacity < cu_k[doc_k + 1] - cu_k[doc_k], doc_k, -2)  # past its keys: unseen
    d = doc_q.clamp(min=0)  # tokens past the sequences: any sequence (they see nothing)
    # the key aligned with each query (bottom-right within its sequence), as an index into k
    aligned = tq - cu_q[d] + (cu_k[d + 1] - cu_k[d]) - (cu_q[d + 1] - cu_q[d]) + k_start[d]

    def diag(b, q_idx):
        return aligned[q_idx]

    def same_sequence(b, h, q_idx, kv_idx):
        return doc_q[q_idx] == doc_k[kv_idx]

    if alibi_slopes is not None and alibi_slopes.dim() == 2:  # per sequence: each query token's row
        if alibi_slopes.shape != (nseq, q.shape[1]):
            raise ValueError(f"alibi_slopes: expected shape ({q.shape[1]},) or ({nseq}, {q.shape[1]}), got "
                             f"{tuple(alibi_slopes.shape)}")
        alibi_slopes = alibi_slopes[d]  # (total_q, nheads)
    pages = None
    if in_place:  # each query reads its own sequence's pages
        s = torch.arange(nseq, device=device)
        pages = Pages.of(block_table, k.shape[1], cu_k[s + 1] - cu_k[s], flat=True, row=lambda b, q_idx: d[q_idx])
    result = _run(qt, kt, vt, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                  softcap=softcap, alibi_slopes=alibi_slopes, lse=return_attn_probs, diag=diag, extra=same_sequence,
                  slope_row=None if alibi_slopes is None or alibi_slopes.dim() == 1 else (lambda b, q_idx: q_idx),
                  pages=pages)
    return _finish(result, return_attn_probs, _unpack, packed=True)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """``qkv (total, 3, nheads, headdim)``."""
    _packed(qkv, "qkv", 4, 1, 3)
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``q (total_q, nheads, headdim)``, ``kv (total_k, 2, nheads_k, headdim)``."""
    _packed(kv, "kv", 4, 1, 2)
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash-attn's ``flash_attn_with_kvcache`` for decoding: ``q (batch, seqlen_q, nheads,
    headdim)``; ``k_cache``/``v_cache`` ``(batch_cache, seqlen_cache, nheads_k, headdim)``, or paged
    ``(num_blocks, page_block_size, nheads_k, headdim)`` with ``block_table (batch, max_blocks)``
    (int32 block indices). ``cache_seqlens`` (an int or a ``(batch,)`` int tensor) is how much of each
    sequence's cache is filled; ``k``/``v`` ``(batch, seqlen_new, nheads_k, headdim)``, if given, are
    written into the cache in place at those positions first. Each query then attends to its
    sequence's ``cache_seqlens + seqlen_new`` keys, ``causal`` aligned to their end.
    ``cache_batch_idx (batch,)`` picks the cache row of each sequence; ``cache_leftpad (batch,)``
    is where each sequence's keys start in its cache (the keys before are not attended to; causal
    masks and windows stay aligned to the end). With ``rotary_cos``/``rotary_sin`` ``(seqlen_ro,
    rotary_dim / 2)`` (and ``k``, ``v``), the new keys are rotated at their cache positions
    ``cache_seqlens, cache_seqlens + 1, ...`` before they are written, and ``q`` at the same
    positions if ``causal`` or a window is set, else all at ``cache_seqlens``; pairs of dims
    ``(0, 1), (2, 3), ...`` with ``rotary_interleaved`` (the default), else ``(i, i + rotary_dim / 2)``.
    Lengths enter the kernel as tensors: growing caches do not recompile. ``num_splits`` is accepted
    (flexflash chooses its own tiles). Returns ``out (batch, seqlen_q, nheads, headdim)`` (and ``softmax_lse (batch, nheads,
    seqlen_q)`` with ``return_softmax_lse``)."""
    if (k is None) != (v is None):
        raise ValueError("k and v: expected both or neither (the new keys and values to append)")
    for name, new in (("k", k), ("v", v)):
        if new is not None and (not isinstance(new, Tensor) or new.dim() != 4):
            raise ValueError(f"{name}: expected (batch, seqlen_new, nheads_k, headdim), got "
                             f"{tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__}")
    B, Sq = _bhsd(q, "q").shape[0], q.shape[1]
    lengths = cache_lengths(cache_seqlens, B, q.device)
    start = None if cache_leftpad is None else cache_lengths(cache_leftpad, B, q.device, "cache_leftpad")
    if block_table is not None and cache_batch_idx is not None:
        raise ValueError("cache_batch_idx and block_table: expected at most one (a paged cache is indexed by "
                         "block_table)")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin: expected both or neither")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos and rotary_sin: rotary embeddings apply to new keys; expected k and v too")
        local = tuple(_window(window_size)) != (-1, -1)
        # q at the positions of the new tokens if causal or local, else all at the first one (flash-attn's rule)
        q = rotate(q, rotary_cos, rotary_sin, positions(lengths, Sq) if causal or local else
                    lengths[:, None].expand(B, Sq), rotary_interleaved)
        k = rotate(k, rotary_cos, rotary_sin, positions(lengths, k.shape[1]), rotary_interleaved)
    for c, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        check_cache(c, cache_batch_idx, block_table, B, name)
    if k is not None:
        append(k_cache, k, lengths, cache_batch_idx, block_table, "k")
        append(v_cache, v, lengths, cache_batch_idx, block_table, "v")
        lengths = lengths + k.shape[1]
    total = lengths

    def diag(b, q_idx):
        return q_idx + total[b] - Sq

    if start is None:
        def filled(b, h, q_idx, kv_idx):
            return kv_idx < total[b]
    else:  # left-padded caches: keys cache_leftpad to total; causal and windows stay aligned to total
        def filled(b, h, q_idx, kv_idx):
            return (kv_idx < total[b]) & (kv_idx >= start[b])

    if Sq == 1 and _window(window_size)[0] < 0:
        # One new query per sequence, aligned with its last key (total - 1): the causal bound and
        # any right window allow every key up to it already, so the filled part (and the left
        # padding) is the whole mask. (The score modifiers still read diag.)
        causal, window_size = False, (-1, -1)
        if (cache_batch_idx is None
                and _decoding.applies(q, k_cache, v_cache, block_table, softmax_scale)):
            # traced into a caller's graph on CUDA: the short path (flexflash.compat._decoding)
            score_mod = _score_mod(diag, softcap, alibi_slopes, q.shape[2], B, dtype=q.dtype)
            result = _decoding.step(q, k_cache, v_cache, total, start, block_table, softmax_scale, score_mod,
                                    return_softmax_lse)
            return _finish(result, return_softmax_lse, _batched, probs=False)
    qt, pages = _bhsd(q, "q"), None
    # (each sequence's row of a plain cache is a view already; a row of cache_batch_idx is one page)
    table = block_table if block_table is not None else None if cache_batch_idx is None else cache_batch_idx[:, None]
    if table is not None and reads_in_place(qt, k_cache, v_cache, return_softmax_lse, table):
        keys, values, pages = k_cache, v_cache, Pages.of(table, k_cache.shape[1], total)
    else:
        keys, values = (sequences(c, cache_batch_idx, block_table).transpose(1, 2) for c in (k_cache, v_cache))
    result = _run(qt, keys, values, dropout_p=0.0, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                  softcap=softcap, alibi_slopes=alibi_slopes, lse=return_softmax_lse, diag=diag, extra=filled,
                  as_tensor=pages is None and _mask_as_tensor(q, B, Sq, keys.shape[2]), pages=pages)
    return _finish(result, return_softmax_lse, _batched, probs=False)
