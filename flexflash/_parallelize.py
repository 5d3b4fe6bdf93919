"""Module plans: :func:`parallelize` shards a FlashMHA or FlashAttentionTwo over a 1-D device mesh
with a ``parallelize_module`` plan. The modules declare their layers (``_parallel_plan``) and run
their forward through a sharding object; this module supplies the sharded steps ("heads") or
hooks around forward ("sequence"). Nothing here imports the modules."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._sharding import _chunk, _dtensor, _slice, is_dtensor

__all__ = ["STRATEGIES", "parallelize", "world_mesh"]

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
