"""The seed attention modules as thin ``nn.Module`` shells over :func:`flexflash.attention`.

Each module stores its constructor arguments as attributes of the same names and its layers under
the original names (``Wqkv``, ``out_proj``, ``to_q``, ``to_kv``, ``to_out``, ``values``, ``keys``,
``queries``, ``fc_out``), so checkpoints of the originals load. Dropout is applied only in training
mode. What each original did differently is listed in the class docstrings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ._checks import DtypeError
from .functional import attention

__all__ = ["FlashAttention", "FlashMHA", "FlashAttentionTwo", "ChunkedAttention"]


# --- argument checks -------------------------------------------------------------------------

def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return value


def _probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a float in [0, 1), got {value!r}")
    return float(value)


def _tensor(name: str, x, dims: tuple[int, ...], what: str, floating: bool = False) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {what}, got {type(x).__name__}")
    if x.dim() not in dims:
        raise ValueError(f"{name}: expected {what}, got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise DtypeError(f"{name}: expected a floating-point tensor {what}, got dtype {x.dtype} "
                         f"(shape {tuple(x.shape)})")
    return x


# --- zeta FlashAttention ---------------------------------------------------------------------

class _Local:
    """How the modules' forward computes on one device: its inputs, a linear layer's weights, the
    heads of a mask or bias and the output projection as they are. flexflash.parallel.parallelize
    gives a module a sharded counterpart with the same four steps; forward does not know which it
    runs."""

    @staticmethod
    def inputs(*xs: Tensor) -> list[Tensor]:
        return list(xs)

    @staticmethod
    def weights(linear: nn.Linear) -> tuple[Tensor, Tensor | None]:
        return linear.weight, linear.bias

    @staticmethod
    def heads(t: Tensor | None, heads: int) -> Tensor | None:
        return t

    @staticmethod
    def output(linear: nn.Linear, x: Tensor) -> Tensor:
        return linear(x)


LOCAL = _Local()


class FlashAttention(nn.Module):
    r"""zeta's inner attention: ``softmax(q k^T / sqrt(D) + attn_bias) v`` on ``[B, H, N, D]`` tensors.

    Shapes::

        q          (B, H, Nq, D)
        k, v       (B, Hkv, Nk, D) / (B, Hkv, Nk, Dv), Hkv dividing H, or (B, Nk, D): one shared head
        mask       bool, True = may attend: (B, Nk) key padding or 4-D broadcastable to (B, H, Nq, Nk)
        attn_bias  float, added to the scores: (H, Nq, Nk) (zeta's shape), (Nq, Nk) or 4-D
        out        (B, H, Nq, Dv)

    Args:
        causal: bottom-right causal masking (query ``i`` sees key ``j <= i + Nk - Nq``) on both
            paths.
        dropout: attention dropout probability, applied in training mode only (exact, see
            :func:`flexflash.attention`).
        flash: ``True`` runs the compiled FlexAttention path, ``False`` the eager reference path
            (:mod:`flexflash.reference`); both give the same results.

    Unlike zeta's module, ``mask`` and ``causal`` (and ``attn_bias``) work together, ``mask`` is
    never ignored, the causal alignment is the same on both paths, 3-D k/v work for any ``Nk``
    and every float dtype works.

    :meth:`get_mask` returns zeta's causal mask, whose polarity is the **opposite** of ``mask``:
    True where attention is *not* allowed. Pass ``causal=True`` instead, or ``~get_mask(...)``
    broadcast to 4-D (``[None, None]``) as ``mask``.
    """

    def __init__(self, causal: bool = False, dropout: float = 0.0, flash: bool = True):
        super().__init__()
        self.causal = _flag("causal", causal)
        self.dropout = _probability("dropout", dropout)
        self.flash = _flag("flash", flash)

    def get_mask(self, i: int, j: int, device: torch.device | str | None = None) -> Tensor:
        """zeta's ``(i, j)`` bool mask, **True where bottom-right causal attention is NOT allowed**
        (``ones(i, j).triu(j - i + 1)``); the opposite polarity of ``mask``."""
        return torch.ones((i, j), device=device, dtype=torch.bool).triu(j - i + 1)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, attn_bias: Tensor | None,
                backend: str) -> Tensor:
        return attention(q, k, v, causal=self.causal, mask=mask, bias=attn_bias,
                         dropout_p=self.dropout if self.training else 0.0, backend=backend)

    def flash_attn(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                   attn_bias: Tensor | None = None) -> Tensor:
        """The compiled path, whatever ``flash`` says (zeta's method of the same name)."""
        return self._attend(q, k, v, mask, attn_bias, "auto")

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                attn_bias: Tensor | None = None) -> Tensor:
        """``(B, H, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv) -> (B, H, Nq, Dv)``."""
        return self._attend(q, k, v, mask, attn_bias, "auto" if self.flash else "reference")

    def extra_repr(self) -> str:
        return f"causal={self.causal}, dropout={self.dropout}, flash={self.flash}"


# --- FlashMHA --------------------------------------------------------------------------------

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


# --- zeta FlashAttentionTwo ------------------------------------------------------------------

class FlashAttentionTwo(nn.Module):
    r"""zeta's ``FlashAttentionTwo``: a bias-free attention layer with separate q and packed kv
    projections.

    Shapes::

        x        (B, N, dim)
        context  (B, Nk, dim); default: x
        mask     (B, Nk) key padding, True = keep, or 4-D broadcastable to (B, heads, N, Nk);
                 bool, or a float/int mask of 0/1 values (as zeta's docs pass ``torch.ones(1, 10)``)
        out      (B, N, dim)

    Layers: ``to_q = Linear(dim, heads * dim_head)``, ``to_kv = Linear(dim, 2 * heads * dim_head)``
    (k then v), ``to_out = Linear(heads * dim_head, dim)``, all without bias. Scale ``dim_head ** -0.5``.

    ``q_bucket_size`` / ``k_bucket_size`` (constructor defaults, overridable per call) are the block
    size of the attention call: the sparsity block of the compiled kernel and the tile size of the
    memory-bounded path. Results do not depend on them. On CUDA they must be multiples of the
    kernel's tile (powers of two >= 128 are safe).

    ``mixed_precision=True`` computes the attention in bf16 (fp16 where the GPU has no bf16), with
    fp32 softmax statistics, and returns the input dtype; the projections run in the input dtype.

    ``causal`` is bottom-right aligned (query ``i`` sees key ``j <= i + Nk - N``); zeta's module
    used ``j <= i + max(Nk - N, 0)``, which differs when ``N > Nk``.

    ``parallel=True`` shards the heads over the world's device mesh (one rank per process of the
    initialised default process group, on this process's device): ``flexflash.parallel.parallelize``
    with ``strategy="heads"``; without an initialised process group it raises ``RuntimeError``
    (zeta wrapped the module in ``DataParallel`` inside itself, which could not work).
    """

    # How flexflash.parallel.parallelize shards it (see FlashMHA).
    _parallel_plan = (("to_q", "column", 1), ("to_kv", "column", 2), ("to_out", "row", None))
    _parallel_heads = "heads"
    _parallel_inputs = ("x", "context")
    _parallel_sequence_dim = 1
    _sharding = LOCAL

    def __init__(self, *, dim: int, heads: int = 8, dim_head: int = 64, causal: bool = False,
                 q_bucket_size: int = 512, k_bucket_size: int = 1024, parallel: bool = False,
                 mixed_precision: bool = False):
        super().__init__()
        self.dim = _positive_int("dim", dim)
        self.heads = _positive_int("heads", heads)
        self.dim_head = _positive_int("dim_head", dim_head)
        self.causal = _flag("causal", causal)
        self.q_bucket_size = _positive_int("q_bucket_size", q_bucket_size)
        self.k_bucket_size = _positive_int("k_bucket_size", k_bucket_size)
        self.parallel = _flag("parallel", parallel)
        self.mixed_precision = _flag("mixed_precision", mixed_precision)
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        if parallel:
            from .parallel import parallelize, world_mesh
            parallelize(self, world_mesh("parallel"), strategy="heads")

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                q_bucket_size: int | None = None, k_bucket_size: int | None = None) -> Tensor:
        """``(B, N, dim)`` (and context ``(B, Nk, dim)``) -> ``(B, N, dim)``."""
        x = _tensor("x", x, (3,), f"of shape (B, N, dim={self.dim})", floating=True)
        context = x if context is None else _tensor("context", context, (3,), f"of shape (B, Nk, dim={self.dim})",
                                                    floating=True)
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"context: expected batch size {x.shape[0]} (that of x), got shape {tuple(context.shape)}")
        for name, t in (("x", x), ("context", context)):
            if t.shape[-1] != self.dim:
                raise ValueError(f"{name}: expected last dimension dim={self.dim}, got shape {tuple(t.shape)}")
        block = (_positive_int("q_bucket_size", self.q_bucket_size if q_bucket_size is None else q_bucket_size),
                 _positive_int("k_bucket_size", self.k_bucket_size if k_bucket_size is None else k_bucket_size))
        x, context = self._sharding.inputs(x, context)
        d = self.dim_head  # heads from the projection's width (this rank's under "heads")
        wq, _ = self._sharding.weights(self.to_q)
        wkv, _ = self._sharding.weights(self.to_kv)
        q = rearrange(F.linear(x, wq), "b n (h d) -> b h n d", d=d)
        k, v = rearrange(F.linear(context, wkv), "b n (two h d) -> two b h n d", two=2, d=d)
        if mask is not None and isinstance(mask, Tensor) and mask.dtype != torch.bool:
            mask = _keep_flags("mask", mask)
        mask = self._sharding.heads(mask, self.heads)
        if self.mixed_precision:
            compute = _half_dtype(x.device)
            out = attention(q.to(compute), k.to(compute), v.to(compute), causal=self.causal, mask=mask,
                            block_size=block).to(x.dtype)
        else:
            out = attention(q, k, v, causal=self.causal, mask=mask, block_size=block)  # (B, h, N, d)
        out = rearrange(out, "b h n d -> b n (h d)")
        return self._sharding.output(self.to_out, out)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, causal={self.causal}, "
                f"q_bucket_size={self.q_bucket_size}, k_bucket_size={self.k_bucket_size}, "
                f"parallel={self.parallel}, mixed_precision={self.mixed_precision}")


def _keep_flags(name: str, mask: Tensor) -> Tensor:
    """A float/int 0/1 mask (True = keep) as bool; other values are an error (for additive masks
    use a module that takes a bias)."""
    flags = mask != 0
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name}: expected a bool mask (True = keep) or a {mask.dtype} mask of 0/1 values, got "
                         f"other values; for an additive mask use flexflash.attention(bias=...)")
    return flags


def _half_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


# --- chunked attention -----------------------------------------------------------------------

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
