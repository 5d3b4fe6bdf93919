"""flash-attn's KV caches, for :func:`flexflash.compat.flash_attn.flash_attn_with_kvcache` and the
paged variable-length calls: the checked layouts (contiguous ``(batch_cache, seqlen_cache, nheads_k,
headdim)``, rows picked by ``cache_batch_idx``, or pages ``(num_blocks, page_block_size, nheads_k,
headdim)`` of a ``block_table``), the filled lengths, rotary embeddings at cache positions, appending
new keys and values in place, and each sequence's keys gathered where they are not read in place."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import accumulation_dtype

__all__ = ["append", "cache_lengths", "check_cache", "positions", "rotate", "sequences"]


def cache_lengths(cache_seqlens, batch: int, device, name: str = "cache_seqlens") -> Tensor:
    if cache_seqlens is None:
        raise ValueError(f"{name}: expected an int or a (batch,) integer tensor (the filled part of each "
                         "sequence's cache), got None")
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        return torch.full((batch,), cache_seqlens, dtype=torch.int64, device=device)
    if (not isinstance(cache_seqlens, Tensor) or cache_seqlens.shape != (batch,) or cache_seqlens.is_floating_point()
            or cache_seqlens.dtype == torch.bool):
        raise ValueError(f"{name}: expected an int or a ({batch},) integer tensor, got "
                         f"{tuple(cache_seqlens.shape) if isinstance(cache_seqlens, Tensor) else cache_seqlens!r}")
    # int32 (flash-attn's type) and int64 are read as they are: no conversion launched per step
    dtype = cache_seqlens.dtype if cache_seqlens.dtype in (torch.int32, torch.int64) else torch.int64
    return cache_seqlens.to(device=device, dtype=dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool) -> Tensor:
    """Rotary embedding of ``x (batch, seqlen, heads, headdim)`` at ``positions (batch, seqlen)``:
    its first ``rotary_dim = 2 * cos.shape[1]`` dims turn by the angles of ``cos``/``sin``
    ``(seqlen_ro, rotary_dim / 2)``, in pairs ``(0, 1), (2, 3), ...`` (``interleaved``, GPT-J) or
    ``(i, i + rotary_dim / 2)`` (GPT-NeoX); computed in float32 (float64 for float64 ``x``), returned
    in ``x``'s dtype."""
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        if not isinstance(t, Tensor) or t.dim() != 2 or t.shape != cos.shape or 2 * t.shape[1] > x.shape[-1]:
            raise ValueError(f"{name}: expected (seqlen_ro, rotary_dim / 2) with rotary_dim <= headdim "
                             f"{x.shape[-1]}, the same for rotary_cos and rotary_sin, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if not torch.compiler.is_compiling() and positions.numel() and int(positions.max()) >= cos.shape[0]:
        raise ValueError(f"rotary_cos: {cos.shape[0]} positions, expected at least {int(positions.max()) + 1} "
                         "(cache_seqlens plus the new tokens)")
    half, acc = cos.shape[1], accumulation_dtype(x.dtype)
    c = cos[positions][:, :, None].to(acc)  # (batch, seqlen, 1, rotary_dim / 2)
    s = sin[positions][:, :, None].to(acc)
    rot = x[..., :2 * half].to(acc)
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        rot = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    return torch.cat([rot.to(x.dtype), x[..., 2 * half:]], dim=-1)


def positions(lengths: Tensor, n: int) -> Tensor:
    """(batch, n): the cache positions of ``n`` new tokens per sequence."""
    return lengths[:, None] + torch.arange(n, device=lengths.device)


def append(cache: Tensor, new: Tensor, lengths: Tensor, batch_idx, block_table, name: str) -> None:
    """Writes ``new (batch, n, heads, dim)`` into ``cache`` in place after each sequence's filled part."""
    pos = positions(lengths, new.shape[1])
    capacity = cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
    if not torch.compiler.is_compiling() and new.shape[1] and int(pos.max()) >= capacity:
        raise ValueError(f"cache_seqlens: {name} of {new.shape[1]} new tokens after cache_seqlens="
                         f"{lengths.tolist()} overflows the cache of {capacity} tokens per sequence")
    if block_table is not None:
        page = cache.shape[1]
        blocks = torch.gather(block_table.long(), 1, pos // page)
        cache[blocks, pos % page] = new.to(cache.dtype)
        return
    rows = (torch.arange(new.shape[0], device=new.device) if batch_idx is None else batch_idx.long())[:, None]
    cache[rows, pos] = new.to(cache.dtype)


def check_cache(cache, batch_idx, block_table, batch: int, name: str) -> None:
    if not isinstance(cache, Tensor) or cache.dim() != 4:
        raise ValueError(f"{name}: expected (batch_cache, seqlen_cache, nheads_k, headdim) or paged (num_blocks, "
                         f"page_block_size, nheads_k, headdim), got "
                         f"{tuple(cache.shape) if isinstance(cache, Tensor) else type(cache).__name__}")
    if block_table is not None:
        if not isinstance(block_table, Tensor) or block_table.dim() != 2 or block_table.shape[0] != batch \
                or block_table.is_floating_point():
            raise ValueError(f"block_table: expected a ({batch}, max_blocks) integer tensor, got "
                             f"{tuple(block_table.shape) if isinstance(block_table, Tensor) else block_table!r}")
    elif batch_idx is not None:
        if not isinstance(batch_idx, Tensor) or batch_idx.shape != (batch,) or batch_idx.is_floating_point():
            raise ValueError(f"cache_batch_idx: expected a ({batch},) integer tensor, got "
                             f"{tuple(batch_idx.shape) if isinstance(batch_idx, Tensor) else batch_idx!r}")
    elif cache.shape[0] != batch:
        raise ValueError(f"{name}: expected batch {batch} (or cache_batch_idx), got {tuple(cache.shape)}")


def sequences(cache: Tensor, batch_idx, block_table) -> Tensor:
    """Each sequence's keys or values, ``(batch, seqlen_cache, heads, dim)`` (a checked cache): the
    cache itself, a copy of its rows ``batch_idx``, or a copy of the pages of ``block_table`` laid
    end to end."""
    if block_table is not None:
        return cache[block_table.long()].flatten(1, 2)
    if batch_idx is not None:
        return cache[batch_idx.long()]
    return cache
