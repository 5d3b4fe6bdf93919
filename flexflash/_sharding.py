"""What flexflash's DTensor code shares: recognising DTensors, the contiguous split of a dimension
over ranks, and local views and DTensors of a shard."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["is_dtensor"]


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
