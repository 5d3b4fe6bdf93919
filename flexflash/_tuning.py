"""Kernel options chosen from measurements, in one place.

The tables are data, ``flexflash/tuning.json`` (read once at import); the GPU, the case and the
figures that chose each entry are in ``benchmarks/NOTES_TUNING.md``. An entry applies only where
the caller passed no ``kernel_options`` (a caller's options always win, whole); elsewhere
FlexAttention's own defaults stand, as they do for every GPU, head dim and dtype not measured.
Under ``flexflash.set_compile_mode("max-autotune")`` the tiles are not passed (Inductor's
autotuner chooses them); the generator choice still applies.
"""

from __future__ import annotations

import importlib.resources
import json
from typing import Any, NamedTuple

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import _torch_private

Options = tuple[tuple[str, Any], ...]

_DATA = json.loads(importlib.resources.files(__package__).joinpath("tuning.json").read_text(encoding="utf-8"))
_MEASURED_ON = tuple(_DATA["capability"])  # the compute capability every entry was measured on


def _tiles(names: list[str]) -> dict[str, int]:
    """The kernel options of named tile sets of the data file, merged in order."""
    return {key: size for name in names for key, size in _DATA["tiles"][name].items()}


def _dtypes(names: list[str]) -> tuple[torch.dtype, ...]:
    return tuple(getattr(torch, name) for name in names)


_DROPOUT_DTYPES = _dtypes(_DATA["dropout"]["dtypes"])
_DROPOUT_HEAD_DIMS = tuple(_DATA["dropout"]["head_dims"])
_DROPOUT_KEPT = _tiles(_DATA["dropout"]["kept"])
_DROPOUT_LSE = _tiles(_DATA["dropout"]["lse"])

# (case, head dim, dtype) -> Triton kernel options; cases: flexflash._kinds.triton_case.
_TRITON_TILES = {(entry["case"], entry["head_dim"], getattr(torch, entry["dtype"])): _tiles(entry["tiles"])
                 for entry in _DATA["triton"]}

# (case, needs grad, head dim) -> the least work at which FLASH is taken; (case, head dim) -> the
# work from which Triton is taken again (FLASH ties there).
_FLASH_DTYPES = _dtypes(_DATA["flash"]["dtypes"])
_FLASH_MIN_WORK = {(entry["case"], entry["grad"], entry["head_dim"]): float(entry["work"])
                   for entry in _DATA["flash"]["min_work"]}
_FLASH_MAX_WORK = {(entry["case"], entry["head_dim"]): float(entry["work"]) for entry in _DATA["flash"]["max_work"]}

_CAPABILITIES: dict[torch.device, tuple[int, int]] = {}


def capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of a CUDA device (cached); None inside a caller's torch.compile,
    where device queries are not traced (callers then take their measurement-free choice)."""
    if torch.compiler.is_compiling():
        return None
    cap = _CAPABILITIES.get(device)
    if cap is None:
        cap = _CAPABILITIES[device] = torch.cuda.get_device_capability(device)
    return cap


@torch.compiler.assume_constant_result
def _device_traits(index: int | None) -> tuple[tuple[int, int], int]:
    """(compute capability, SM count) of CUDA device ``index`` (None: the current one); a constant
    to a caller's torch.compile (read when its graph is traced: the choices below are made inside
    the graph too)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
    return (props.major, props.minor), props.multi_processor_count


# FlexAttention's decoding kernel (fewer queries than a query block: one program per batch, key/
# value head and split of the keys, the grouped query heads in its rows): its options, measured
# for some dtypes and head dims (benchmarks/NOTES_TUNING.md); ``wide_tiles``: those of batches
# with at least as many (batch, key/value head) pairs as the GPU has streaming multiprocessors
# (where FlexAttention no longer splits the keys: about one program a pair), ``tiles`` below;
# ``split_factor``: SPLIT_KV as a multiple of FlexAttention's own (two splits a streaming
# multiprocessor over the batch's heads).
# Read into a tuple of constants at import (:func:`decoding_entry`): a decoding step traced into a
# caller's graph reads it, and each value read there is a guard of the caller's graph (a few for
# tuples of constants; the data file's nested dicts and lists, and the functions reading them, were
# about sixty).
class DecodingEntry(NamedTuple):
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, ...]
    tiles: tuple[tuple[str, int], ...]  # the kernel options, (name, value) pairs
    split_factor: int | None
    wide_tiles: tuple[tuple[str, int], ...] | None = None  # from one (batch, kv head) pair an SM on


def decoding_entry(entry: dict | None) -> DecodingEntry | None:
    """The decoding entry of the data file (``{"dtypes": [...], "head_dims": [...], "tiles": [tile
    set names], "wide_tiles": [tile set names], "split_factor": k}``, the last two optional) as
    constants; None for none."""
    if entry is None:
        return None
    wide = entry.get("wide_tiles")
    return DecodingEntry(_dtypes(entry["dtypes"]), tuple(entry["head_dims"]), tuple(_tiles(entry["tiles"]).items()),
                         entry.get("split_factor"), None if wide is None else tuple(_tiles(wide).items()))


_DECODING = decoding_entry(_DATA.get("decoding"))


def decoding_options(device: torch.device, dtype: torch.dtype, head_dim: int, batch, kv_heads,
                     block: tuple[int, int]) -> dict | None:
    """Kernel options of a call that runs FlexAttention's decoding kernel, or None where none were
    measured or the measured tiles do not divide the call's sparsity blocks ``block`` (FlexAttention's
    defaults then). ``batch``: the call's batch (a static one: the decoding kernel runs for static
    batches alone). The entry's ``wide_tiles`` are taken where ``batch * kv_heads`` is at least the
    number of streaming multiprocessors for every size the call takes (a static batch) and they
    divide ``block``; its ``tiles`` elsewhere.
    A ``split_factor`` multiplies FlexAttention's own ``SPLIT_KV`` (``get_split_k``: twice the
    streaming multiprocessors a (batch, kv head) pair, at least 1)."""
    entry = _DECODING
    if entry is None or device.type != "cuda" or head_dim not in entry.head_dims or dtype not in entry.dtypes:
        return None
    cap, sms = _device_traits(device.index)
    if tuple(cap) != _MEASURED_ON:  # (a new tuple: torch 2.11's Dynamo cannot compare the constant itself)
        return None
    # (compared without a guard: a symbolic batch answers False, as flexflash._kinds.decoding_shape's)
    wide = entry.wide_tiles is not None and statically_known_true(batch * kv_heads >= sms)
    for tiles in (entry.wide_tiles, entry.tiles) if wide else (entry.tiles,):  # the first that fits
        options = {name: value for name, value in tiles}
        if _fits(options, block):
            break
    else:
        return None
    if entry.split_factor and isinstance(batch, int):
        options["SPLIT_KV"] = max(1, sms // max(1, batch * kv_heads) * 2) * entry.split_factor
    return options


def _fits(tiles: dict[str, int], block: tuple[int, int]) -> bool:
    """Whether kernel tiles divide a block mask's sparsity blocks ``block`` (rows, columns)."""
    for key, size in tiles.items():
        rows = key.startswith("fwd_BLOCK_M") or key.startswith("bwd_BLOCK_M")
        cols = key.startswith("fwd_BLOCK_N") or key.startswith("bwd_BLOCK_N")
        if (rows and block[0] % size) or (cols and block[1] % size):
            return False
    return True


def dropout_pass_options(device: torch.device, dtype: torch.dtype, head_dim: int,
                         block: tuple[int, int]) -> tuple[Options, Options]:
    """Extra kernel options of the two dropout passes: (kept pass, lse pass); empty where no
    measurement chose any. ``block`` is the block mask's block size (kernel tiles must divide it).
    Why: the kept pass hashes in its score function on every tile, and smaller tiles keep more
    warps busy with it (benchmarks/NOTES_TUNING.md)."""
    if device.type != "cuda" or dtype not in _DROPOUT_DTYPES or head_dim not in _DROPOUT_HEAD_DIMS:
        return (), ()
    if not (_fits(_DROPOUT_KEPT, block) and _fits(_DROPOUT_LSE, block)):
        return (), ()
    if capability(device) != _MEASURED_ON:
        return (), ()
    return tuple(sorted(_DROPOUT_KEPT.items())), tuple(sorted(_DROPOUT_LSE.items()))


def triton_options(device: torch.device, dtype: torch.dtype, head_dim: int, block: tuple[int, int], *,
                   case: str | None) -> dict | None:
    """Kernel options of a call of ``case`` (see ``_TRITON_TILES``) on the Triton kernels: the
    measured tiles, or None where nothing was measured or the tiles do not divide the call's
    sparsity blocks ``block``. A "dense_mask" without an entry of its own takes the "mask" entry."""
    if case is None or device.type != "cuda" or capability(device) != _MEASURED_ON:
        return None
    tiles = _TRITON_TILES.get((case, head_dim, dtype))
    if tiles is None and case == "dense_mask":
        tiles = _TRITON_TILES.get(("mask", head_dim, dtype))
    if tiles is None or not _fits(tiles, block):
        return None
    return dict(tiles)


# --- the kernel generator: FlexAttention's Triton templates or FlashAttention-4 ----------------
#
# BACKEND="FLASH" kernels (the optional ``flash-attn-4`` package, ``pip install flexflash[fa4]``)
# are faster on the GPU but cost 0.3-0.5 ms more host time per call, so FLASH is taken only from
# the least work at which it was measured faster, for the cases measured, and nowhere else (why
# each case stays on Triton: benchmarks/NOTES_TUNING.md).

_FLASH_AVAILABLE: list[bool] = []


def work(B: int, Hq: int, Nq: int, Nk: int, D: int) -> float:
    """The work of a call as the table counts it: 4*B*Hq*Nq*Nk*D flops."""
    return 4.0 * B * Hq * Nq * Nk * D


def flash_available() -> bool:
    """Whether FlexAttention can generate FlashAttention-4 kernels here (the ``flash-attn-4``
    package and its CuTe DSL runtime import); checked once per process."""
    if not _FLASH_AVAILABLE:
        _FLASH_AVAILABLE.append(_torch_private.flash_generator_available())
    return _FLASH_AVAILABLE[0]


def flash_choice(case: str | None, grad: bool, device: torch.device, dtype: torch.dtype, head_dim: int,
                 v_head_dim: int, work: float) -> bool:
    """Whether a call of ``case`` (one of the table's: see flexflash._kinds.flash_case) runs on
    FlashAttention-4 kernels: only where the table says it is faster on this GPU, and only where
    the package is installed. Deterministic mode stays on Triton (FLASH's backward with a block
    mask is not deterministic on Hopper)."""
    if case is None or device.type != "cuda" or dtype not in _FLASH_DTYPES or head_dim != v_head_dim:
        return False
    least = _FLASH_MIN_WORK.get((case, grad, head_dim))
    if least is None or work < least or work >= _FLASH_MAX_WORK.get((case, head_dim), float("inf")):
        return False
    if torch.are_deterministic_algorithms_enabled() or capability(device) != _MEASURED_ON:
        return False
    return flash_available()
