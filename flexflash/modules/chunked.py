"""Multi-head attention over query chunks: :class:`ChunkedAttention`."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from ..functional import attention
from ._common import _positive_int, _tensor


class ChunkedAttention(nn.Module):
    r"""Multi-head attention that processes the queries ``chunk_size`` at a time against all keys
    (the chunked ``FlashAttention`` of the tutorial module, done right).

    Shapes::

        values, keys  (B, Nk, E)
        queries       (B, Nq, E)    Nk may differ from Nq
        mask          bool, True = keep: (B, Nk) key padding or 4-D broadcastable to (B, heads, Nq, Nk);
                      or float: added to the scores, (Nq, Nk), (heads, Nq, Nk) or 4-D
        out           (B, Nq, E)

    Layers: ``values``, ``keys``, ``queries``, ``fc_out``, each ``Linear(E, E)`` with bias; scale
    ``head_dim ** -0.5``. Each chunk of queries is one :func:`flexflash.attention` call over all keys,
    so peak memory is bounded by ``chunk_size x Nk`` scores on the eager paths (and is ``O(N)`` on the
    compiled kernel, which never stores scores); results do not depend on ``chunk_size``.

    The original contracted the scores over the batch axis (a position attended only to the same
    position in other batch elements), never scaled, required ``Nk == Nq`` and failed to broadcast
    an additive mask for batch 1: none of that is copied.
    """

    def __init__(self, embed_size: int, heads: int, chunk_size: int):
        super().__init__()
        self.embed_size = _positive_int("embed_size", embed_size)
        self.heads = _positive_int("heads", heads)
        self.chunk_size = _positive_int("chunk_size", chunk_size)
        if embed_size % heads:
            raise ValueError(f"heads: expected a divisor of embed_size={embed_size}, got {heads}")
        self.head_dim = embed_size // heads
        self.values = nn.Linear(embed_size, embed_size)
        self.keys = nn.Linear(embed_size, embed_size)
        self.queries = nn.Linear(embed_size, embed_size)
        self.fc_out = nn.Linear(embed_size, embed_size)

    def forward(self, values: Tensor, keys: Tensor, queries: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(B, Nk, E), (B, Nk, E), (B, Nq, E) -> (B, Nq, E)``."""
        E, h = self.embed_size, self.heads
        for name, t in (("values", values), ("keys", keys), ("queries", queries)):
            _tensor(name, t, (3,), f"of shape (B, N, E={E})", floating=True)
            if t.shape[-1] != E:
                raise ValueError(f"{name}: expected last dimension embed_size={E}, got shape {tuple(t.shape)}")
        if values.shape[:2] != keys.shape[:2] or queries.shape[0] != keys.shape[0]:
            raise ValueError(f"values, keys, queries: expected values and keys of one shape and one batch size, got "
                             f"values {tuple(values.shape)}, keys {tuple(keys.shape)}, queries {tuple(queries.shape)}")
        q = rearrange(self.queries(queries), "b n (h d) -> b h n d", h=h)  # (B, h, Nq, d)
        k = rearrange(self.keys(keys), "b n (h d) -> b h n d", h=h)  # (B, h, Nk, d)
        v = rearrange(self.values(values), "b n (h d) -> b h n d", h=h)
        kw = {}
        if mask is not None:
            if not isinstance(mask, Tensor):
                raise TypeError(f"mask: expected a bool or floating tensor, got {type(mask).__name__}")
            kw = dict(mask=mask) if mask.dtype == torch.bool else dict(bias=mask)
        Nq = q.shape[2]
        if torch.compiler.is_compiling():
            # Inside a caller's torch.compile, one call: a loop over query chunks (a range over the
            # symbolic length) would compile the caller's graph anew for every length. Memory stays
            # bounded by the path the call takes (FlexAttention's kernel, or the tiled path on CPU).
            out = attention(q, k, v, **kw)  # (B, h, Nq, d)
        else:
            chunks = []
            for q0 in range(0, Nq, self.chunk_size):
                q1 = min(Nq, q0 + self.chunk_size)
                chunks.append(attention(q[:, :, q0:q1], k, v, **_query_rows(kw, q0, q1, Nq)))  # (B, h, rows, d)
            out = torch.cat(chunks, dim=2) if len(chunks) != 1 else chunks[0]  # (B, h, Nq, d)
        return self.fc_out(rearrange(out, "b h n d -> b n (h d)"))

    def extra_repr(self) -> str:
        return f"embed_size={self.embed_size}, heads={self.heads}, chunk_size={self.chunk_size}"


def _query_rows(kw: dict, q0: int, q1: int, Nq: int) -> dict:
    """The rows ``q0:q1`` of a mask/bias with a query dimension (the second-to-last, when its size
    is Nq); key padding masks and broadcast rows pass unchanged."""
    out = {}
    for name, t in kw.items():
        if t.dim() >= 2 and not (name == "mask" and t.dim() == 2) and t.shape[-2] == Nq and Nq > 1:
            t = t[..., q0:q1, :]
        out[name] = t
    return out
