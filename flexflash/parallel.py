"""Parallel attention on DTensor: batch, heads and sequence sharding over a 1-D device mesh; the
module plans (:func:`parallelize`) are in flexflash._parallelize, re-exported here.

:func:`flexflash.attention` accepts DTensor ``q, k, v`` (4-D, on one 1-D mesh) and calls
:func:`attention` here. PyTorch has no DTensor sharding rule for FlexAttention (torch 2.11-2.13),
so each rank runs flexflash on its local shard with global index offsets; all communication is
DTensor's own (``redistribute``, differentiable), none is written here.

* ``Shard(0)`` (batch) and ``Shard(1)`` (heads): local computation. Modifiers see global batch and
  head indices (ALiBi slopes, per-sequence document ids, per-head masks); with grouped-query heads
  the query and key/value heads are sharded consistently (both head counts divisible by the mesh
  size, or key/value replicated). Mask/bias tensors are given with their global shapes (or
  broadcast dimensions of size 1) and are sliced to the local shard.
* ``Shard(2)`` (sequence, context parallel): each rank keeps its query rows; keys and values are
  gathered with ``redistribute(Replicate())`` (whose backward reduce-scatters their gradients).
  Masks, biases and modifiers see global query and key indices; ``causal`` keeps its global
  bottom-right alignment. The split is DTensor's contiguous one, so with ``causal`` the last rank
  has the most work (rank r's rows see about (r + 1/2)/P of the keys): balancing it would need a
  permuted (zigzag) sequence layout, which changes the caller's tensor layout and is left to a
  later version.
* ``Replicate()``: every rank computes everything.

The output is a DTensor with ``q``'s placements (the log-sum-exp too); it equals the unsharded
result, forward and backward. A bias that requires grad receives, on each rank, the gradient of
that rank's slice (the other entries 0): sum over ranks for the full gradient. Dropout drops the
entries the unsharded call would (its hash sees global indices) provided every rank draws the same
seed, i.e. the ranks' default generators are seeded alike (``torch.manual_seed`` with one value).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._parallelize import STRATEGIES, parallelize, world_mesh
from ._sharding import _chunk, _dtensor, _slice, is_dtensor

__all__ = ["attention", "is_dtensor", "parallelize", "world_mesh", "STRATEGIES"]


def _as_4d(name: str, t: Tensor | None, B: int, H: int, Nq: int, Nk: int) -> Tensor | None:
    """A global mask/bias in flexflash's accepted layouts as a 4-D broadcastable tensor."""
    if t is None:
        return None
    if is_dtensor(t):
        t = t.full_tensor()
    if name == "mask" and t.dim() == 2 and t.shape == (B, Nk):
        return t[:, None, None, :]
    if name == "bias" and t.dim() == 2:
        return t[None, None]
    if name == "bias" and t.dim() == 3:
        return t[None]
    return t


def _shift(fn, kind: str, b0: int, h0: int, q0: int, device):
    """``fn`` seeing global indices: local batch/head/query indices shifted by the shard offsets.
    The offsets enter as 0-d tensors, so new offsets (other lengths, other ranks) reuse the
    compiled kernel."""
    if fn is None or (b0 == 0 and h0 == 0 and q0 == 0):
        return fn
    from ._kernels import _scalar_tensor
    b0, h0, q0 = (_scalar_tensor(x, torch.int32, device) for x in (b0, h0, q0))
    if kind == "mask":
        def shifted_mask(b, h, q_idx, kv_idx):
            return fn(b + b0, h + h0, q_idx + q0, kv_idx)
        return shifted_mask

    def shifted_score(score, b, h, q_idx, kv_idx):
        return fn(score, b + b0, h + h0, q_idx + q0, kv_idx)
    return shifted_score


def _checked_mesh(q, k, v):
    """The 1-D device mesh of DTensor ``q, k, v`` (4-D, all on it)."""
    from torch.distributed.tensor import DTensor
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, DTensor):
            raise TypeError(f"{name}: expected a DTensor like q (q, k and v are all DTensors or none is), "
                            f"got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D DTensor (B, H, N, D), got shape {tuple(t.shape)}")
    mesh = q.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"q: expected a DTensor on a 1-D device mesh, got a {mesh.ndim}-D mesh")
    for name, t in (("k", k), ("v", v)):
        if t.device_mesh != mesh:
            raise ValueError(f"{name}: expected the device mesh of q, got another mesh")
    return mesh


def _local_keys_values(dim: int, k, v, B: int, Hq: int, Nq: int, world: int, rank: int):
    """This rank's key and value tensors for q sharded on ``dim`` (0 batch, 1 heads, 2 sequence),
    and its global offsets ``(b0, h0, q0)``."""
    from torch.distributed.tensor import Partial, Replicate, Shard
    mesh, Hkv = k.device_mesh, k.shape[1]
    if dim == 0:
        k, v = (t.redistribute(mesh, [Shard(0)]) for t in (k, v))
        return (k.to_local(), v.to_local()), (_chunk(B, world, rank)[0], 0, 0)
    if dim == 2:
        k, v = (t.redistribute(mesh, [Replicate()]) for t in (k, v))
        # Each rank's gradient of the gathered keys/values covers its own query rows only: a
        # partial sum, which the gather's backward reduce-scatters.
        return tuple(t.to_local(grad_placements=[Partial()]) for t in (k, v)), (0, 0, _chunk(Nq, world, rank)[0])
    h0, Hl = _chunk(Hq, world, rank)
    group = Hq // Hkv
    if Hkv == Hq or (Hkv % world == 0 and _chunk(Hkv, world, rank) == (h0 // group, Hl // group)):
        k, v = (t.redistribute(mesh, [Shard(1)]) for t in (k, v))
        return (k.to_local(), v.to_local()), (0, h0, 0)
    # Grouped heads that do not split evenly: every rank takes the key/value heads it needs.
    first, last = h0 // group, (h0 + max(Hl, 1) - 1) // group
    if first == last:  # the local query heads share one key/value head
        kv_heads = 1
    elif h0 % group == 0 and Hl % group == 0:
        kv_heads = Hl // group
    else:
        raise ValueError(f"q: its {Hq} heads split over {world} ranks cut a group of {group} query heads "
                         f"sharing one key/value head; use a number of ranks that keeps groups whole")
    k, v = (t.redistribute(mesh, [Replicate()]) for t in (k, v))
    # Each rank's gradient covers the key/value heads it used: a partial sum.
    return tuple(t.to_local(grad_placements=[Partial()]).narrow(1, first, kv_heads) for t in (k, v)), (0, h0, 0)


def attention(q, k, v, *, local, causal: bool = False, mask=None, bias=None, mask_mod=None, score_mod=None,
              scale: float | None = None, dropout_p: float = 0.0, block_size=None, kernel_options=None,
              return_lse: bool = False, backend: str = "auto"):
    """:func:`flexflash.attention` on DTensor ``q, k, v`` (see the module docstring). ``local``
    runs each rank's share on plain tensors: flexflash.functional's entry, which passes itself (so
    that this module imports nothing above it); it takes attention()'s keywords and
    ``dropout_offsets``."""
    from torch.distributed.tensor import Replicate, Shard

    from . import mods

    mesh = _checked_mesh(q, k, v)
    (placement,) = q.placements
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"k: expected a number of heads dividing q's {Hq}, got {Hkv}")
    world, rank = mesh.size(), mesh.get_local_rank()
    mask4 = _as_4d("mask", mask, B, Hq, Nq, Nk)
    bias4 = _as_4d("bias", bias, B, Hq, Nq, Nk)
    kw: dict[str, Any] = dict(scale=scale, block_size=block_size, kernel_options=kernel_options,
                              return_lse=return_lse, backend=backend, dropout_p=dropout_p)

    if isinstance(placement, Replicate):
        k, v = (t.redistribute(mesh, [Replicate()]) for t in (k, v))
        out = local(q.to_local(), k.to_local(), v.to_local(), causal=causal, mask=mask4, bias=bias4,
                         mask_mod=mask_mod, score_mod=score_mod, **kw)
    elif isinstance(placement, Shard) and placement.dim in (0, 1, 2):
        dim = placement.dim
        (local_k, local_v), (b0, h0, q0) = _local_keys_values(dim, k, v, B, Hq, Nq, world, rank)
        start, length = _chunk((B, Hq, Nq)[dim], world, rank)
        mask4, bias4 = (_slice(t, dim, (B, Hq, Nq)[dim], start, length) for t in (mask4, bias4))
        device = q.device
        mask_mod = _shift(mask_mod, "mask", b0, h0, q0, device)
        score_mod = _shift(score_mod, "score", b0, h0, q0, device)
        if causal and dim == 2:
            # Local query rows, global bottom-right alignment: key j <= (q0 + i) + Nk - Nq (a 0-d
            # tensor offset: one compiled kernel for every rank and length).
            from ._kernels import _scalar_tensor
            causal_mod = mods.causal(offset=_scalar_tensor(Nk - Nq + q0, torch.int32, device))
            mask_mod = causal_mod if mask_mod is None else mods.and_masks(causal_mod, mask_mod)
            causal = False
        # Dropout draws the unsharded call's keep: the hash sees global (b, h, i), and every rank
        # draws the same seed when the ranks' generators are seeded alike.
        out = local(q.to_local(), local_k, local_v, causal=causal, mask=mask4, bias=bias4,
                         mask_mod=mask_mod, score_mod=score_mod, dropout_offsets=(b0, h0, q0, Hq), **kw)
    else:
        raise ValueError(f"q: expected a placement Shard(0), Shard(1), Shard(2) or Replicate(), got {placement}")

    if return_lse:
        out, lse = out
        return _dtensor(out, mesh, q.placements, (B, Hq, Nq, v.shape[-1])), _dtensor(lse, mesh, q.placements, (B, Hq, Nq))
    return _dtensor(out, mesh, q.placements, (B, Hq, Nq, v.shape[-1]))
