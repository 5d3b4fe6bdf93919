"""zeta's attention modules: ``from flexflash.compat.zeta import FlashAttention, FlashAttentionTwo``."""

from ..modules import FlashAttention, FlashAttentionTwo

__all__ = ["FlashAttention", "FlashAttentionTwo"]
