"""kyegomez's FlashMHA package: ``from flexflash.compat.flash_mha import FlashMHA, FlashAttention``."""

from .. import modules
from ..modules import FlashMHA

__all__ = ["FlashMHA", "FlashAttention"]


class FlashAttention(modules.FlashAttention):
    """:class:`flexflash.FlashAttention` with the FlashMHA package's default ``flash=False`` (the eager
    reference path)."""

    def __init__(self, causal: bool = False, dropout: float = 0.0, flash: bool = False):
        super().__init__(causal=causal, dropout=dropout, flash=flash)
