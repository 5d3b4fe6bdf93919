"""flexflash: attention modules for PyTorch written as FlexAttention mask/score functions.

Every variant (causal, padding masks, additive bias, sliding windows, documents, ...) is a
FlexAttention mask or score function compiled by ``torch.compile`` into a fused kernel; an eager
reference (:mod:`flexflash.reference`) defines the semantics and checks every path.
"""

from . import mods, reference
from ._checks import DtypeError
from ._compiled import compile_stats, get_compile_mode, guard_filter, set_compile_mode
from .functional import attention, explain
from .modules import ChunkedAttention, FlashAttention, FlashAttentionTwo, FlashMHA
from .plan import Plan

__version__ = "0.1.0"

__all__ = ["attention", "explain", "Plan", "mods", "reference", "compile_stats", "set_compile_mode", "get_compile_mode",
           "guard_filter",
           "FlashAttention", "FlashMHA", "FlashAttentionTwo", "ChunkedAttention", "DtypeError",
           "__version__"]
