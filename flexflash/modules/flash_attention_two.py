"""zeta's ``FlashAttentionTwo``, done right: :class:`FlashAttentionTwo`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..functional import attention
from ._common import LOCAL, _flag, _positive_int, _tensor


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
            from ..parallel import parallelize, world_mesh
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
