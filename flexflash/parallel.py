"""Parallel attention on DTensor: batch, heads and sequence sharding over a 1-D device mesh, and
module plans (:func:`parallelize`).

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

__all__ = ["attention", "is_dtensor", "parallelize", "world_mesh"]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor. Keeps no state (it runs inside callers' torch.compile, where
    Dynamo guards on module state it reads); plain tensors are told apart without the import."""
    if not isinstance(t, Tensor) or type(t) in (Tensor, torch.nn.Parameter):
        return False
    try:  # imported already wherever a DTensor exists
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def _chunk(size: int, parts: int, index: int) -> tuple[int, int]:
    """(offset, length) of shard ``index`` of ``size`` split in ``parts`` the way DTensor's
    ``Shard`` does (``torch.chunk``: ceil-sized chunks, the last ones possibly short or empty)."""
    step = -(-size // parts)
    start = min(size, index * step)
    return start, min(size, start + step) - start


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


def _slice(t: Tensor | None, dim: int, full: int, start: int, length: int) -> Tensor | None:
    if t is None or t.dim() != 4 or t.shape[dim] == 1 or t.shape[dim] != full:
        return t  # broadcast (or malformed: the local call reports it)
    return t.narrow(dim, start, length)


def _dtensor(local: Tensor, mesh, placements, shape) -> Tensor:
    """A DTensor of global ``shape`` (contiguous strides) from this rank's possibly uneven shard."""
    from torch.distributed.tensor import DTensor
    shape = torch.Size(shape)
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


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


def attention(q, k, v, *, local, causal: bool = False, mask=None, bias=None, mask_mod=None, score_mod=None,
              scale: float | None = None, dropout_p: float = 0.0, block_size=None, kernel_options=None,
              return_lse: bool = False, backend: str = "auto"):
    """:func:`flexflash.attention` on DTensor ``q, k, v`` (see the module docstring). ``local``
    runs each rank's share on plain tensors: flexflash.functional's entry, which passes itself (so
    that this module imports nothing above it); it takes attention()'s keywords and
    ``dropout_offsets``."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    from . import mods

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
        if dim == 0:
            b0, Bl = _chunk(B, world, rank)
            k, v = (t.redistribute(mesh, [Shard(0)]) for t in (k, v))
            local_k, local_v = k.to_local(), v.to_local()
            offsets = (b0, 0, 0)
            mask4, bias4 = _slice(mask4, 0, B, b0, Bl), _slice(bias4, 0, B, b0, Bl)
        elif dim == 1:
            h0, Hl = _chunk(Hq, world, rank)
            group = Hq // Hkv
            if Hkv == Hq or (Hkv % world == 0 and _chunk(Hkv, world, rank) == (h0 // group, Hl // group)):
                k, v = (t.redistribute(mesh, [Shard(1)]) for t in (k, v))
                local_k, local_v = k.to_local(), v.to_local()
            else:  # grouped heads that do not split evenly: every rank takes the key/value heads it needs
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
                local_k, local_v = (t.to_local(grad_placements=[Partial()]).narrow(1, first, kv_heads)
                                    for t in (k, v))
            offsets = (0, h0, 0)
            mask4, bias4 = _slice(mask4, 1, Hq, h0, Hl), _slice(bias4, 1, Hq, h0, Hl)
        else:
            q0, Nl = _chunk(Nq, world, rank)
            k, v = (t.redistribute(mesh, [Replicate()]) for t in (k, v))
            # Each rank's gradient of the gathered keys/values covers its own query rows only: a
            # partial sum, which the gather's backward reduce-scatters.
            local_k, local_v = (t.to_local(grad_placements=[Partial()]) for t in (k, v))
            offsets = (0, 0, q0)
            mask4, bias4 = _slice(mask4, 2, Nq, q0, Nl), _slice(bias4, 2, Nq, q0, Nl)
        b0, h0, q0 = offsets
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


# --- modules ---------------------------------------------------------------------------------

STRATEGIES = ("heads", "sequence")


def world_mesh(arg: str = "parallel"):
    """A 1-D device mesh over every rank of the initialised default process group, on this
    process's device type (CUDA with NCCL, else CPU)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{arg}=True: shards over the ranks of the default process group, and none is "
                           "initialised; call torch.distributed.init_process_group first (or pass "
                           f"{arg}=False)")
    from torch.distributed.device_mesh import init_device_mesh
    device = "cuda" if "nccl" in str(dist.get_backend()) and torch.cuda.is_available() else "cpu"
    return init_device_mesh(device, (dist.get_world_size(),))


def replicated_inputs(mesh, *xs: Tensor) -> list[Tensor]:
    """Inputs (the same on every rank) for local computation whose gradients are partial sums per
    rank: the backward sums them over the ranks (DTensor's Partial -> Replicate). The same tensor
    passed twice (self-attention) stays one tensor."""
    from torch.distributed.tensor import DTensor, Partial, Replicate
    seen: dict[int, Tensor] = {}
    for x in xs:
        if id(x) not in seen:
            seen[id(x)] = DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(
                grad_placements=[Partial()])
    return [seen[id(x)] for x in xs]


def local_heads(mesh, t: Tensor | None, heads: int) -> Tensor | None:
    """This rank's heads of a 4-D mask/bias whose head dimension is full (others unchanged)."""
    return _slice(t, 1, heads, *_chunk(heads, mesh.size(), mesh.get_local_rank()))


def row_parallel(mesh, linear, x: Tensor) -> Tensor:
    """``linear`` (weight sharded by input features) on this rank's features ``x``: DTensor computes
    the partial products and their sum over the ranks (and the adjoint in the backward pass)."""
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor, Replicate, Shard
    x = DTensor.from_local(x, mesh, [Shard(x.dim() - 1)], run_check=False)
    return F.linear(x, linear.weight, linear.bias).redistribute(mesh, [Replicate()]).to_local()


class _HeadsSharding:
    """The "heads" strategy's steps of a module's forward (the counterpart of flexflash.modules'
    one-device steps): inputs replicated with gradients summed over the ranks, the rank's rows of
    the input projections, the rank's heads of masks and biases, the row-wise output projection."""

    def __init__(self, mesh):
        self.mesh = mesh

    def inputs(self, *xs: Tensor) -> list[Tensor]:
        return replicated_inputs(self.mesh, *xs)

    @staticmethod
    def weights(linear) -> tuple[Tensor, Tensor | None]:
        return linear.weight.to_local(), None if linear.bias is None else linear.bias.to_local()

    def heads(self, t: Tensor | None, heads: int) -> Tensor | None:
        return local_heads(self.mesh, t, heads)

    def output(self, linear, x: Tensor) -> Tensor:
        return row_parallel(self.mesh, linear, x)


def _sequence_hooks(module, mesh) -> None:
    """The "sequence" strategy as hooks around a module's forward: local sequence shards of its
    activations (``_parallel_inputs``) become DTensors sharded on ``_parallel_sequence_dim`` (keys
    and values are gathered inside the attention call), and the output is this rank's shard again.
    Masks are given with global shapes. Activations that are DTensors already pass unchanged."""
    import inspect

    from torch.distributed.tensor import Shard
    names = type(module)._parallel_inputs
    signature = inspect.signature(module.forward)
    converted_calls: list[bool] = []

    def before(mod, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        local = not is_dtensor(bound.arguments.get(names[0]))
        converted_calls.append(local)
        if not local:
            return None
        given = [n for n in names if n in bound.arguments]
        for name, t in zip(given, _sequence_inputs(mesh, mod._parallel_sequence_dim,
                                                   [bound.arguments[n] for n in given])):
            bound.arguments[name] = t
        return bound.args, bound.kwargs

    def after(mod, args, kwargs, out):
        if converted_calls.pop():
            return out.redistribute(mesh, [Shard(mod._parallel_sequence_dim)]).to_local()
        return out

    module.register_forward_pre_hook(before, with_kwargs=True)
    module.register_forward_hook(after, with_kwargs=True)


def _sequence_inputs(mesh, seq_dim: int, tensors: list) -> list:
    """Local sequence shards (split as torch.chunk splits) as DTensors sharded on ``seq_dim``; the
    same tensor twice (self-attention) stays one DTensor; non-tensors pass unchanged."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard
    place = [Shard(seq_dim)]
    converted: dict[int, Any] = {}
    world = mesh.size()

    def as_dt(t):
        if t is None or not isinstance(t, Tensor):
            return t
        if id(t) not in converted:  # the same tensor twice (self-attention) stays one DTensor
            # The global length: the shards may be uneven (as torch.chunk splits), so ask the ranks.
            lengths = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(world)]
            dist.all_gather(lengths, torch.tensor([t.shape[seq_dim]], device=t.device), group=mesh.get_group())
            lengths = [int(n) for n in lengths]
            total = sum(lengths)
            if lengths != [_chunk(total, world, r)[1] for r in range(world)]:
                raise ValueError(f"input: expected sequence shards split as torch.chunk splits {total} rows over "
                                 f"{world} ranks (dimension {seq_dim}), got shard lengths {lengths}")
            shape = list(t.shape)
            shape[seq_dim] = total
            converted[id(t)] = _dtensor(t.contiguous(), mesh, place, shape)
        return converted[id(t)]
    return [as_dt(t) for t in tensors]


def _plan(module, strategy: str):
    """(linear name, placements of weight, of bias) for each layer of a module that declares its
    ``_parallel_plan`` (flexflash's FlashMHA and FlashAttentionTwo)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    layers = type(module)._parallel_plan
    if strategy == "sequence":
        return [(name, [Replicate()], [Replicate()]) for name, _, _ in layers]
    # Column-wise input projections, row-wise output. A packed projection (q|k|v, k|v) is sharded
    # within each part: rank r holds the rows of its heads of q, of k and of v (a strided shard),
    # so the full weight keeps its layout (checkpoints and full_tensor() are unchanged).
    plan = []
    for name, kind, parts in layers:
        if kind == "column":
            place = [Shard(0)] if parts == 1 else [_StridedShard(0, split_factor=parts)]
            plan.append((name, place, place))
        else:
            plan.append((name, [Shard(1)], [Replicate()]))
    return plan


def _make_style():
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.parallel import ParallelStyle

    class AttentionParallel(ParallelStyle):
        """Distributes a FlashMHA / FlashAttentionTwo's layers for ``strategy`` and gives the module
        the strategy's steps: the sharded counterpart of its one-device steps ("heads"), or hooks
        around its forward ("sequence"); see :func:`parallelize`."""

        def __init__(self, strategy: str):
            super().__init__()
            self.strategy = strategy

        def _apply(self, module, device_mesh):
            for name, w_place, b_place in _plan(module, self.strategy):
                linear = getattr(module, name)
                for attr, place in (("weight", w_place), ("bias", b_place)):
                    param = getattr(linear, attr)
                    if param is not None and place is not None:
                        dt = distribute_tensor(param.data, device_mesh, place, src_data_rank=self.src_data_rank)
                        linear.register_parameter(attr, torch.nn.Parameter(dt, requires_grad=param.requires_grad))
            module._flexflash_parallel = (self.strategy, device_mesh)
            if self.strategy == "heads":
                module._sharding = _HeadsSharding(device_mesh)
            else:
                _sequence_hooks(module, device_mesh)
            return module
    return AttentionParallel


def parallelize(module, mesh, strategy: str = "heads"):
    """Shards a :class:`~flexflash.FlashMHA` or :class:`~flexflash.FlashAttentionTwo` over a 1-D
    device mesh with a ``parallelize_module`` plan; returns the module (changed in place).

    * ``"heads"`` (tensor parallel): column-wise q/k/v projections (each rank holds its heads' rows
      of q, of k and of v; the packed ``Wqkv`` / ``to_kv`` layouts are sharded within each part),
      attention on the local heads, row-wise output projection whose partial products DTensor sums.
      Inputs and output are ordinary tensors, the same on every rank; the head count must be a
      multiple of the mesh size.
    * ``"sequence"`` (context parallel): weights replicated; inputs are each rank's contiguous
      sequence shard (dimension 1, or 0 for ``FlashMHA(batch_first=False)``), keys and values are
      gathered inside the attention call, the output is the rank's shard. Masks keep their global
      shapes.

    Parameters become DTensors (``full_tensor()`` gives the unsharded weight); their gradients are
    those of the unsharded module.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    if getattr(type(module), "_parallel_plan", None) is None:
        raise TypeError(f"module: expected a flexflash FlashMHA or FlashAttentionTwo, got {type(module).__name__}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    if getattr(mesh, "ndim", None) != 1:
        raise ValueError(f"mesh: expected a 1-D DeviceMesh, got {mesh!r}")
    if getattr(module, "_flexflash_parallel", None) is not None:
        raise ValueError("module: already parallelized")
    heads = getattr(module, type(module)._parallel_heads)
    if strategy == "heads" and heads % mesh.size():
        raise ValueError(f"strategy='heads': expected a head count divisible by the mesh size {mesh.size()}, "
                         f"got {heads} heads")
    return parallelize_module(module, mesh, _make_style()(strategy))
