"""Drop-in import paths: each original module under its original class name and defaults.

* :mod:`flexflash.compat.zeta`: ``FlashAttention``, ``FlashAttentionTwo`` (zeta)
* :mod:`flexflash.compat.flash_mha`: ``FlashMHA`` and its ``FlashAttention`` (``flash=False`` default)
* :mod:`flexflash.compat.chunked`: ``FlashAttention`` = :class:`flexflash.ChunkedAttention`
"""
