"""Modifier fingerprints: what a ``mask_mod`` or ``score_mod`` is made of, matching what Dynamo
guards on (its code, the Python values it captures, the dtype, device, rank and grad flag of the
tensors it reads), so that calls of one kind share a compiled kernel and new tensor values do not
recompile."""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Modifier", "NO_MODIFIER", "inspect_modifier", "captured_tensors"]

@dataclass(frozen=True)
class Modifier:
    """What a call needs to know of a ``mask_mod`` or ``score_mod``, from one walk over it (see
    :func:`inspect_modifier`)."""

    fp: Any  # a hashable summary matching what Dynamo guards on (None inside a caller's compile)
    tensors: tuple[Tensor, ...]  # the tensors it reads
    pure: bool  # a function of its indices alone: no tensors, no objects whose state may change
    tensors_only: bool  # its only run-time state is tensors (no other objects)
NO_MODIFIER = Modifier(None, (), True, True)
_PLAIN = (bool, int, float, str, complex, torch.dtype, torch.device)


def inspect_modifier(fn: Any) -> Modifier:
    """One walk over a modifier: its fingerprint and the tensors it reads. The fingerprint holds
    code objects and Python constants by value, tensors by (dtype, device, rank, requires_grad),
    other objects by id; tensors are found in its closure (recursively, through nested functions,
    partials, tuples and lists) and in the module globals it names. Inside a caller's
    torch.compile, Dynamo cannot walk closures and guards on them itself: nothing is walked."""
    if fn is None:
        return NO_MODIFIER
    if torch.compiler.is_compiling():
        return Modifier(None, (), False, False)
    tensors: dict[int, Tensor] = {}
    state = {"objects": False}
    fp = _walk(fn, 0, tensors, state)
    return Modifier(fp, tuple(tensors.values()), not tensors and not state["objects"], not state["objects"])


def _walk(obj: Any, depth: int, tensors: dict[int, Tensor], state: dict) -> Any:
    if depth > 8:
        state["objects"] = True
        return ("deep", id(obj))
    if isinstance(obj, Tensor):
        tensors.setdefault(id(obj), obj)
        return ("tensor", obj.dtype, obj.device, obj.dim(), obj.requires_grad)
    if obj is None or isinstance(obj, _PLAIN):
        return (type(obj), obj)
    if isinstance(obj, (tuple, list)):
        return (type(obj), tuple(_walk(x, depth + 1, tensors, state) for x in obj))
    if isinstance(obj, functools.partial):
        return ("partial", _walk(obj.func, depth + 1, tensors, state), _walk(obj.args, depth + 1, tensors, state),
                _walk(tuple(sorted(obj.keywords.items())), depth + 1, tensors, state))
    if isinstance(obj, types.FunctionType):
        cells = []
        for cell in obj.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # empty cell
                cells.append(("empty",))
                continue
            cells.append(_walk(contents, depth + 1, tensors, state))
        globs = []
        for name in obj.__code__.co_names:
            value = obj.__globals__.get(name)
            if isinstance(value, Tensor):
                globs.append((name, _walk(value, depth + 1, tensors, state)))
        return ("fn", obj.__code__, tuple(cells), tuple(globs), _walk(obj.__defaults__, depth + 1, tensors, state))
    state["objects"] = True
    return ("obj", id(obj))


def captured_tensors(fn: Any) -> list[Tensor]:
    """The tensors a modifier reads (see :func:`inspect_modifier`)."""
    return list(inspect_modifier(fn).tensors)
