"""Packed-projection multi-head attention with ``nn.MultiheadAttention``'s conventions: :class:`FlashMHA`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .._checks import DtypeError
from ..functional import attention
from ._common import LOCAL, _flag, _positive_int, _probability, _tensor


class FlashMHA(nn.Module):
    r"""Multi-head attention with a packed input projection, a drop-in for kyegomez's ``FlashMHA``
    with ``nn.MultiheadAttention``'s conventions.

    Shapes (``batch_first=True``; ``False`` swaps the first two dimensions of inputs and output)::

        query             (B, Nq, E)
        key, value        (B, Nk, E); default: query (self-attention)
        key_padding_mask  (B, Nk): bool, True = padding (ignored), or float, added to the scores
        attn_mask         (Nq, Nk), (B * num_heads, Nq, Nk) or 4-D broadcastable to (B, num_heads, Nq, Nk):
                          bool, True = NOT allowed, or float, added to the scores
        out               (B, Nq, E)

    Both masks follow ``nn.MultiheadAttention`` (True = masked out), the opposite of
    :func:`flexflash.attention`'s ``mask``; with the same weights (``in_proj_weight = Wqkv.weight``,
    ``out_proj``) the two modules agree, except that a query with no allowed key returns 0 here
    (``nn.MultiheadAttention`` returns NaN).

    Layers: ``Wqkv = Linear(E, 3E)`` (q, then k, then v rows, each head-major) and
    ``out_proj = Linear(E, E)``. ``causal`` is bottom-right aligned. Unlike the original, ``key`` and
    ``value`` are used (cross-attention through the k and v slices of ``Wqkv``),
    ``batch_first=False`` works and any head size FlexAttention supports is accepted.
    """

    # How flexflash.parallel.parallelize shards it: (layer, "column" with the number of parts packed
    # in it, or "row"), and the attribute holding the head count.
    _parallel_plan = (("Wqkv", "column", 3), ("out_proj", "row", None))
    _parallel_heads = "num_heads"
    _parallel_inputs = ("query", "key", "value")  # the activations of forward's arguments
    _sharding = LOCAL  # how forward computes: on one device, or sharded (set by parallelize)

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, batch_first: bool = True,
                 dropout: float = 0.0, causal: bool = False, device=None, dtype=None):
        super().__init__()
        self.embed_dim = _positive_int("embed_dim", embed_dim)
        self.num_heads = _positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"num_heads: expected a divisor of embed_dim={embed_dim}, got {num_heads}")
        self.bias = _flag("bias", bias)
        self.batch_first = _flag("batch_first", batch_first)
        self.dropout = _probability("dropout", dropout)
        self.causal = _flag("causal", causal)
        self.head_dim = embed_dim // num_heads
        factory = dict(device=device, dtype=dtype)
        self.Wqkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    @property
    def _parallel_sequence_dim(self) -> int:
        return 1 if self.batch_first else 0

    def _project(self, x: Tensor, parts: str) -> Tensor:
        """``x`` through the rows of ``Wqkv`` for ``parts`` (a contiguous run of "qkv"). Under
        ``flexflash.parallel.parallelize(strategy="heads")`` these are the rank's rows of each part."""
        weight, bias = self._sharding.weights(self.Wqkv)
        third = weight.shape[0] // 3
        start, stop = "qkv".index(parts[0]) * third, ("qkv".index(parts[-1]) + 1) * third
        return F.linear(x, weight[start:stop], None if bias is None else bias[start:stop])

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None) -> Tensor:
        """``(B, Nq, E)`` (and ``(B, Nk, E)`` key/value) -> ``(B, Nq, E)``; see the class docstring."""
        E, H, d = self.embed_dim, self.num_heads, self.head_dim
        layout = "(B, N, E)" if self.batch_first else "(N, B, E)"
        query = _tensor("query", query, (3,), f"of shape {layout} with E={E}", floating=True)
        if key is None and value is not None:
            raise ValueError("key: expected a tensor when value is given (value defaults to key, key to query)")
        key = query if key is None else _tensor("key", key, (3,), f"of shape {layout} with E={E}", floating=True)
        value = key if value is None else _tensor("value", value, (3,), f"of shape {layout} with E={E}", floating=True)
        if not self.batch_first:  # (N, B, E) -> (B, N, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.shape[-1] != E:
                raise ValueError(f"{name}: expected last dimension embed_dim={E}, got shape {tuple(t.shape)}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise ValueError(f"key, value: expected the batch size of query and equal lengths, got query "
                             f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)} (batch first)")
        B, Nq, Nk = query.shape[0], query.shape[1], key.shape[1]

        query, key, value = self._sharding.inputs(query, key, value)

        # Heads are counted from the projection's width (all heads, or this rank's under "heads").
        if key is query and value is query:  # self-attention: one packed projection
            q, k, v = rearrange(self._project(query, "qkv"), "b n (three h d) -> three b h n d", three=3, d=d)
        else:
            q = rearrange(self._project(query, "q"), "b n (h d) -> b h n d", d=d)
            if value is key:
                k, v = rearrange(self._project(key, "kv"), "b n (two h d) -> two b h n d", two=2, d=d)
            else:
                k = rearrange(self._project(key, "k"), "b n (h d) -> b h n d", d=d)
                v = rearrange(self._project(value, "v"), "b n (h d) -> b h n d", d=d)

        mask, bias = _mha_masks(key_padding_mask, attn_mask, B, H, Nq, Nk)
        mask, bias = (self._sharding.heads(t, H) for t in (mask, bias))
        out = attention(q, k, v, causal=self.causal, mask=mask, bias=bias,
                        dropout_p=self.dropout if self.training else 0.0)  # (B, H, Nq, D)
        out = rearrange(out, "b h n d -> b n (h d)")
        out = self._sharding.output(self.out_proj, out)  # (B, Nq, E)
        return out if self.batch_first else out.transpose(0, 1)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, bias={self.bias}, "
                f"batch_first={self.batch_first}, dropout={self.dropout}, causal={self.causal}")


def _mha_masks(key_padding_mask: Tensor | None, attn_mask: Tensor | None, B: int, H: int, Nq: int,
               Nk: int) -> tuple[Tensor | None, Tensor | None]:
    """``nn.MultiheadAttention``'s masks (bool True = masked out, float = additive) as flexflash's
    ``(mask, bias)``, each 4-D broadcastable to ``(B, H, Nq, Nk)``."""
    masks, biases = [], []
    if key_padding_mask is not None:
        kpm = _tensor("key_padding_mask", key_padding_mask, (2,), f"of shape (B, Nk) = {(B, Nk)}")
        if tuple(kpm.shape) != (B, Nk):
            raise ValueError(f"key_padding_mask: expected shape (B, Nk) = {(B, Nk)}, got {tuple(kpm.shape)}")
        kpm = kpm[:, None, None, :]  # (B, 1, 1, Nk)
        (masks if kpm.dtype == torch.bool else biases).append(kpm)
    if attn_mask is not None:
        am = _tensor("attn_mask", attn_mask, (2, 3, 4),
                     f"of shape (Nq, Nk), (B * num_heads, Nq, Nk) or 4-D, with Nq={Nq}, Nk={Nk}")
        if am.dim() == 2:
            am = am[None, None]  # (1, 1, Nq, Nk)
        elif am.dim() == 3:
            if am.shape[0] != B * H:
                raise ValueError(f"attn_mask: a 3-D mask must have shape (B * num_heads, Nq, Nk) = "
                                 f"{(B * H, Nq, Nk)}, got {tuple(am.shape)}")
            am = am.view(B, H, *am.shape[1:])  # (B, H, Nq, Nk)
        (masks if am.dtype == torch.bool else biases).append(am)
    for t in biases:
        if not t.is_floating_point():
            raise DtypeError(f"key_padding_mask, attn_mask: expected bool or floating masks, got {t.dtype}")
    mask = None
    for m in masks:
        mask = ~m if mask is None else mask & ~m  # True = masked out -> True = may attend
    bias = None
    for b in biases:
        bias = b if bias is None else bias + b
    return mask, bias
