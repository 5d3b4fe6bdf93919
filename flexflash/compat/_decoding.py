"""A decoding step of :func:`flexflash.compat.flash_attn.flash_attn_with_kvcache` traced into a
caller's torch.compile on CUDA: one new query per sequence attending to its keys
``[cache_leftpad, total)``, by a short path of its own.

Why a path of its own: every function and module-level name Dynamo traces through becomes a guard
that the compiled step checks on each call. A decoding step through :func:`flexflash.attention`
traces some ninety of flexflash's functions: a guard tree of about 600 lines on an H100, against
350-400 here (benchmarks/NOTES.md). And its block mask is written down from the lengths (a run of
each sequence's key blocks, elementwise: one or two small kernels, the inverse of a page table one more),
where flexflash's general builders evaluate the mask over every key and list the blocks from the
flags (a scan and a scatter): a batch-1 step's kernels took 14 µs of GPU time against 23.

The computation is the one the general path traces for these calls: FlexAttention's decoding
kernel (a static batch; fewer query rows a key/value head than a query block), the same kernel
options (:func:`flexflash._tuning.decoding_options`), the mask ``start <= kv < total`` evaluated in
every visited block (no lists of full blocks: see :func:`flexflash._flex._without_full_blocks`), a
paged cache read in place over its pool of pages (:mod:`flexflash._paged`, which it follows: the
dtypes read in place, pages a multiple of the key block). Calls outside that case (:func:`applies`)
take the general path.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .._kernels import AuxRequest
from .._kinds import decoding_shape
from .._paged import IN_PLACE_DECODING_DTYPES, IN_PLACE_DTYPES, Pages, _inverse
from .._tuning import decoding_options

__all__ = ["TRACED_ON", "applies", "prefix_blocks", "step", "visited"]

# Devices on which a traced decoding step takes this path: CUDA (FlexAttention's decoding kernel).
# Tests add the CPU.
TRACED_ON: set[str] = {"cuda"}
KEY_BLOCK = 128  # the key block of the block mask (the general path's, and the tuned tiles')
_QUERY_BLOCK = 128
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def prefix_blocks(first: Tensor, count: Tensor, table: Tensor | None, per_page: int, logical: int,
                  width: int) -> tuple[Tensor, Tensor]:
    """The key blocks each sequence visits, in FlexAttention's block-mask layout: ``count (B,)``
    blocks from its logical block ``first (B,)`` on (of ``logical`` blocks), as ``(kv_num_blocks (B,
    1, 1), kv_indices (B, 1, 1, width))`` int32. Logical block ``j`` is block ``j`` of the keys, or
    with a ``table (B, L)`` of pages of ``per_page`` blocks, block ``j % per_page`` of page
    ``table[b, j // per_page]`` of the pool (:func:`_physical`). The entries past ``count`` repeat
    the last logical block (never visited)."""
    B = first.shape[0]
    j = (first[:, None] + torch.arange(width, device=first.device)).clamp(max=logical - 1)
    return count.to(torch.int32).view(B, 1, 1), _physical(j, table, per_page, width).to(torch.int32).view(B, 1, 1, width)


def _physical(j: Tensor, table: Tensor | None, per_page: int, width: int) -> Tensor:
    """Logical key blocks ``j (B, n)`` (within the table) as blocks of the ``width`` blocks the
    kernel reads (entries of the table past a sequence's length may hold anything: kept within
    the pool)."""
    if table is None:
        return j
    return table.long().gather(1, j // per_page).clamp(0, width // per_page - 1) * per_page + j % per_page


def applies(q: Tensor, k_cache: Tensor, v_cache: Tensor, table: Tensor | None, softmax_scale) -> bool:
    """Whether a decoding call (one query a sequence, no left window, no ``cache_batch_idx``) of
    ``q (B, 1, Hq, D)`` takes :func:`step`: traced on a device of ``TRACED_ON``, no gradients,
    16- or 32-bit inputs of one dtype (paged: a dtype read in place), a power-of-two head dim of
    16-256, grouped heads a power of two, rows of unit stride, more than one key block (pages of
    whole key blocks, laid end to end), and FlexAttention's decoding kernel for its shapes
    (:func:`flexflash._kinds.decoding_shape`: a static batch, no input past 2**31 - 1 elements).
    Everything it reads is known at trace time."""
    if not (torch.compiler.is_compiling() and q.device.type in TRACED_ON):
        return False
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))):
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad):
        return False
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return False
    if table is not None and q.dtype not in IN_PLACE_DTYPES.get(q.device.type, ()) + IN_PLACE_DECODING_DTYPES.get(
            q.device.type, ()):
        return False
    D, rows = q.shape[3], k_cache.shape[1]
    if D & (D - 1) or not 16 <= D <= 256 or k_cache.shape[3] != D or v_cache.shape != k_cache.shape:
        return False
    if any(t.stride(-1) != 1 for t in (q, k_cache, v_cache)):
        return False
    if table is None:
        if rows <= KEY_BLOCK:  # (one key block: the general path pads its block masks to two)
            return False
    elif rows % KEY_BLOCK or any(c.stride(0) != rows * c.stride(1) for c in (k_cache, v_cache)):
        return False
    # FlexAttention's decoding kernel: a static batch, grouped heads, 32-bit indices (the general
    # path's own test; the transposed pages span as many elements as their pool)
    return decoding_shape(q.transpose(1, 2), k_cache.transpose(1, 2), (_QUERY_BLOCK, KEY_BLOCK))


def visited(total: Tensor, start: Tensor | None, table: Tensor | None, rows: int, pages: int):
    """The block mask of the keys ``[start, total)`` of each sequence (``start`` None: 0) over the
    keys the kernel reads: each sequence's row of ``rows`` keys of a contiguous cache, or with a
    ``table (B, L)`` the pool of ``pages`` pages of ``rows`` keys (a multiple of ``KEY_BLOCK``) that
    the table's entries index. Returns ``(kv_num_blocks (B, 1, 1), kv_indices (B, 1, 1, width),
    mask_mod, position)``: the key blocks each sequence visits (its keys' blocks alone), the mask
    (exact on every key, visited or not), and ``position(b, kv_idx)``, the logical index of a key
    the kernel reads (-1 for a key of the pool that is not one of sequence ``b``'s)."""
    start = None if start is None else start.clamp(min=0)
    if table is None:
        per_page, logical = 1, -(-rows // KEY_BLOCK)
        width = logical
    else:
        per_page = rows // KEY_BLOCK
        width, logical = pages * per_page, table.shape[1] * per_page
    end = torch.clamp((total + (KEY_BLOCK - 1)) // KEY_BLOCK, max=logical)  # past the last visited block
    if start is None:
        first, count = torch.zeros_like(total), end
    else:  # (no block for a sequence without keys: its start at or past its end)
        first = start // KEY_BLOCK
        count = torch.where(start < total, torch.clamp(end - first, min=0), 0)
    kv_num, kv_idx = prefix_blocks(first, count, table, per_page, logical, width)
    if table is None:
        def position(b, kv_idx):
            return kv_idx
    else:
        # The logical page of each page of the pool in each sequence (-1: not one of its pages
        # holding keys below its length), and a key's logical index through it, as flexflash._paged
        # evaluates masks and modifiers over a pool.
        inverse = _inverse(Pages.of(table, rows, total), pages)

        def position(b, kv_idx):
            page = inverse[b, kv_idx // rows]
            return torch.where(page >= 0, page * rows + kv_idx % rows, -1)

    if start is None and table is None:
        def mask(b, h, q_idx, kv_idx):
            return kv_idx < total[b]
    elif start is None:
        def mask(b, h, q_idx, kv_idx):
            j = position(b, kv_idx)
            return (j < total[b]) & (j >= 0)
    else:
        def mask(b, h, q_idx, kv_idx):
            j = position(b, kv_idx)
            return (j < total[b]) & (j >= start[b])
    return kv_num, kv_idx, mask, position


def step(q: Tensor, k_cache: Tensor, v_cache: Tensor, total: Tensor, start: Tensor | None, table: Tensor | None,
         softmax_scale, score_mod, return_lse: bool):
    """Attention of ``q (B, 1, Hq, D)`` to each sequence's keys ``[start, total)`` of the cache
    (``(B, S, Hkv, D)``, or pages ``(num_pages, page, Hkv, D)`` of ``table (B, L)``), ``score_mod``
    over logical key indices, flash-attn's ``softmax_scale``
    (None: ``D ** -0.5``). Returns ``out (B, Hq, 1, D)`` (and the log-sum-exp ``(B, Hq, 1)`` with
    ``return_lse``). For calls :func:`applies` accepts."""
    B, D, Hkv = q.shape[0], q.shape[3], k_cache.shape[2]
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    qt = q.transpose(1, 2)
    if table is None:
        keys, values = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    else:  # the pool of pages as a key/value batch of one, broadcast over the queries' batch
        keys, values = (c.flatten(0, 1).transpose(0, 1).unsqueeze(0) for c in (k_cache, v_cache))
    kv_num, kv_idx, mask, position = visited(total, start, table, k_cache.shape[1], k_cache.shape[0])
    if score_mod is not None and table is not None:
        logical_score = score_mod

        def score_mod(score, b, h, q_idx, kv_idx):  # (a key of another sequence: masked already)
            return logical_score(score, b, h, q_idx, position(b, kv_idx).clamp(min=0))
    block_mask = BlockMask((1, keys.shape[2]), kv_num, kv_idx, None, None, None, None, None, None,
                           (_QUERY_BLOCK, KEY_BLOCK), mask)
    options = decoding_options(q.device, q.dtype, D, B, Hkv, (_QUERY_BLOCK, KEY_BLOCK))
    kw = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[2] != Hkv,
              kernel_options=options)
    if not return_lse:
        return flex_attention(qt, keys, values, **kw)
    if AuxRequest is not None:
        out, aux = flex_attention(qt, keys, values, return_aux=AuxRequest(lse=True), **kw)
        return out, aux.lse
    return flex_attention(qt, keys, values, return_lse=True, **kw)
