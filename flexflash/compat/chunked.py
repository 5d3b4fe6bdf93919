"""The chunked attention tutorial module: ``from flexflash.compat.chunked import FlashAttention``
(:class:`flexflash.ChunkedAttention`, ``FlashAttention(embed_size, heads, chunk_size)``)."""

from ..modules import ChunkedAttention

FlashAttention = ChunkedAttention

__all__ = ["FlashAttention"]
