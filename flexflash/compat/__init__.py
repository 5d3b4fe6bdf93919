"""Drop-in import paths: each original module under its original class name and defaults.

* :mod:`flexflash.compat.zeta`: ``FlashAttention``, ``FlashAttentionTwo`` (zeta)
* :mod:`flexflash.compat.flash_mha`: ``FlashMHA`` and its ``FlashAttention`` (``flash=False`` default)
* :mod:`flexflash.compat.chunked`: ``FlashAttention`` = :class:`flexflash.ChunkedAttention`
* :mod:`flexflash.compat.flash_attn`: flash-attn 2's functions (``flash_attn_func``, the packed and
  variable-length variants, ``flash_attn_with_kvcache``) in its ``(batch, seqlen, nheads, headdim)`` layout
"""
