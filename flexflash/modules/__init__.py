"""The seed attention modules as thin ``nn.Module`` shells over :func:`flexflash.attention`.

Each module stores its constructor arguments as attributes of the same names and its layers under
the original names (``Wqkv``, ``out_proj``, ``to_q``, ``to_kv``, ``to_out``, ``values``, ``keys``,
``queries``, ``fc_out``), so checkpoints of the originals load. Dropout is applied only in training
mode. What each original did differently is listed in the class docstrings.
"""

from .chunked import ChunkedAttention
from .flash_attention import FlashAttention
from .flash_attention_two import FlashAttentionTwo
from .flash_mha import FlashMHA

__all__ = ["FlashAttention", "FlashMHA", "FlashAttentionTwo", "ChunkedAttention"]
