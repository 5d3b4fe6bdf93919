"""What every compiled function of flexflash's shares: the compile mode (a user setting), the
recompile budget, a code object per compiled function, the ``flexflash`` operator library and
the statistics."""

from __future__ import annotations

import itertools
import os
import types
from typing import Any

import torch

from . import _torch_private

__all__ = ["set_compile_mode", "get_compile_mode", "compile_stats", "guard_filter"]

# Inductor settings per mode. "max-autotune" is torch's "max-autotune-no-cudagraphs": CUDA graphs
# replay into static output buffers, so a kernel called twice in one step (every layer of a model)
# would overwrite the output of its earlier call.
_COMPILE_MODES = {
    "default": {},
    "max-autotune": _torch_private.mode_options("max-autotune-no-cudagraphs"),
}
_COMPILE_MODE_ENV = "FLEXFLASH_COMPILE_MODE"


def _checked_mode(mode: Any, name: str) -> str:
    if not isinstance(mode, str) or mode not in _COMPILE_MODES:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, _COMPILE_MODES))}, got {mode!r}")
    return mode
_MODE = [_checked_mode(os.environ.get(_COMPILE_MODE_ENV, "default"), _COMPILE_MODE_ENV)]


def set_compile_mode(mode: str) -> str:
    """Sets how flexflash compiles its kernels from now on, process-wide; returns the previous mode.

    * ``"default"``: FlexAttention's default kernel configurations, with the tiles and generator
      flexflash chose from measurements (``flexflash._tuning``).
    * ``"max-autotune"``: Inductor benchmarks several kernel configurations the first time each
      kind of call compiles and keeps the fastest (torch's ``"max-autotune-no-cudagraphs"``). First
      calls take much longer (tens of seconds to minutes per kind). flexflash then passes none of
      its tuned tiles, so the autotuner chooses them; the generator choice, the two-stage pipeline
      a wide bias needs to fit shared memory and the caller's own ``kernel_options`` stand. It
      was not reliably faster than the default where measured (docs/backends.md has the figures).

    The initial mode comes from the ``FLEXFLASH_COMPILE_MODE`` environment variable (default
    ``"default"``). Kernels already compiled in another mode are kept for when it comes back.
    Inside a caller's ``torch.compile`` the caller's mode applies: flexflash's kernel is traced
    into the caller's graph."""
    previous, _MODE[0] = _MODE[0], _checked_mode(mode, "mode")
    return previous


def get_compile_mode() -> str:
    """The mode set by :func:`set_compile_mode` (or ``FLEXFLASH_COMPILE_MODE``)."""
    return _MODE[0]


# How Dynamo names the modules a traced function reads as globals (G['__import_flexflash_dot_plan']),
# the builtins it reads (G['__builtins_dict___0']['len']) and its own polyfills.
_DROPPED_GLOBALS = ("G['__import_flexflash", "G['__builtins_dict__", "G['__import_torch_dot__dynamo_dot_polyfills']")


def _own_function(value: Any) -> bool:
    return isinstance(value, types.FunctionType) and (value.__module__ or "").split(".")[0] == "flexflash"


def guard_filter(entries: list) -> list[bool]:
    """A ``guard_filter_fn`` for the caller's ``torch.compile``: keeps every guard but those on
    flexflash itself, which hold while flexflash's code and settings do not change.

    Traced into a caller's graph, a flexflash call makes Dynamo guard on each module-level value and
    function it reads (their code, defaults, settings, tables): a few hundred guards that every call
    of the compiled function checks before it runs. On an H100 host (torch 2.11) they took 24-29 µs
    of a compiled decoding step's 112 µs at batch 1, the whole difference from the same step with
    SDPA (benchmarks/NOTES.md). Dropped: the guards on flexflash's modules (what Dynamo names
    ``G['__import_flexflash...']``), on the code and defaults of flexflash's functions that the
    caller's code reads as globals, on Python's builtins (which nothing rebinds) and on Dynamo's own
    polyfills. Kept: every guard on the caller's own values, tensors, shapes
    and modules, on the identity of those flexflash functions (rebinding such a name to another
    function still recompiles), and every tensor guard. So a change to flexflash's settings
    (:func:`set_compile_mode`, its module attributes) after the caller's first compilation does not
    recompile it: set them first. Use::

        step = torch.compile(step, fullgraph=True,
                             options={"triton.cudagraphs": True, "guard_filter_fn": flexflash.guard_filter})

    (``mode="reduce-overhead"`` is ``options={"triton.cudagraphs": True}``: ``torch.compile`` takes a
    mode or options, not both.)"""
    own = [e.name for e in entries if e.has_value and _own_function(e.value)]

    def dropped(e) -> bool:
        if e.guard_type == "TENSOR_MATCH":
            return False
        if e.name.startswith(_DROPPED_GLOBALS):
            return True
        return any(e.name.startswith(name) and e.name[len(name):len(name) + 1] in (".", "[") for name in own)
    return [not dropped(e) for e in entries]


class _Counted:
    """A compiled function of flexflash's, counting the graphs it has compiled (``compiles``, set
    by its backend) against Dynamo's recompile limit, past which Dynamo runs new graphs eagerly."""

    compiles = 0
    _checked_at = None

    def _budget_spent(self) -> bool:
        # torch's setting is read only when the count has changed since the last check: reading a
        # config attribute costs microseconds, on every call of a warm kernel otherwise.
        if self.compiles == self._checked_at:
            return False
        if self.compiles >= _torch_private._recompile_limit():
            return True
        self._checked_at = self.compiles
        return False
_SERIAL = itertools.count()


def _own_code(fn, name: str):
    """A copy of ``fn`` with a code object of its own (so a ``torch.compile`` of it has its own
    Dynamo cache and recompile budget), named ``name``, with ``fn``'s defaults."""
    code = fn.__code__.replace(co_name=name)
    if hasattr(code, "co_qualname"):
        code = code.replace(co_qualname=name)
    copy = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy
_LIB = torch.library.Library("flexflash", "DEF")
_STATS = {"compiles": 0, "kernels": 0, "block_masks_built": 0, "block_mask_hits": 0}


def compile_stats() -> dict[str, int]:
    """Counters: ``compiles`` (graphs compiled by flexflash's kernels), ``kernels`` (kinds of call
    seen), ``block_masks_built`` and ``block_mask_hits`` (cache hits)."""
    return dict(_STATS)
