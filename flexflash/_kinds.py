"""The kind of a call on the FlexAttention path: its structure, the kernel options chosen from
measurements (flexflash._tuning: generator and tiles) and the constants its kernel is compiled
with. A call's plan (flexflash.plan) holds its kind; flexflash._flex runs it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import _tuning, mods
from ._compiled import _MODE
from ._compose import Structure
from ._fingerprint import Modifier
from ._kernels import _Static, needs_main_kernel

# Masks and biases full along both sequence dimensions that are not split (_kernel_layout) compile
# with static shapes on CUDA: with symbolic sizes the boundary checks index them element by element,
# 3-4x slower (benchmarks/NOTES.md, "Key split").
_STATIC_SEQUENCE_BUFFERS = True


# How many shapes of such buffers compile statically per kind, before one kernel of symbolic
# shapes takes every further shape: the first shapes (a training run's one length, a few
# evaluation lengths) get the fast kernel, and many lengths still do not compile once per length.
_STATIC_BUFFER_SHAPES = 4
_STATIC_SHAPES: dict[Any, set] = {}


# On CUDA, each kind's first shape compiles with static shapes (see _run_flex).
_STATIC_FIRST_SHAPE = True
_FIRST_SHAPES: dict[Any, tuple] = {}


# On CUDA, calls of fewer queries than a query block (decoding) compile with a static batch, a
# kernel per batch (flexflash._flex._kernel):
# FlexAttention's decoding kernel (split over the keys, grouped query heads of a key/value head
# in one program) is chosen only for a static batch and head count (torch 2.11-2.13,
# _use_flex_decoding); with a symbolic batch such a call runs the main kernel, one program per
# query head and query block of one row.
_STATIC_DECODING_BATCH = True


def decoding_kernel(q: Tensor, k: Tensor, block: tuple[int, int]) -> bool:
    """Whether a CUDA call can run FlexAttention's decoding kernel, given a static batch (see
    _STATIC_DECODING_BATCH): fewer queries than a query block, query heads a power-of-two multiple
    G of the key/value heads, and the kernel's row tile (the queries of G grouped heads, rounded up
    to a power of two, at least 16) dividing the query block. Where the tile does not divide it
    the lowering finds no kernel configuration at all (torch 2.11-2.13: 97 queries with G = 2 make
    a 256-row tile over 128-row blocks, "NoValidChoicesError"), so such calls keep the main kernel.
    Nor past 65,535 batches of key/value heads: the decoding kernel's grid has one program per
    batch and key/value head in its second dimension, which CUDA bounds there (a dropout call of
    300 x 256 heads failed on an H100 with the static batch, and passed without it). Nor where an
    input is too large for 32-bit indices (:func:`flexflash._kernels.needs_main_kernel`).
    False inside a caller's torch.compile: the caller's graph decides its shapes, and reading its
    symbolic lengths here would add guards that recompile it when lengths cross the tile sizes."""
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        return False
    return decoding_shape(q, k, block)


def traced_decoding(q: Tensor, k: Tensor, block: tuple[int, int]) -> bool:
    """Whether a CUDA call traced into a caller's graph runs FlexAttention's decoding kernel there:
    :func:`decoding_shape`, which holds there for a static batch and query length alone (the
    lowering's condition is a static batch)."""
    return torch.compiler.is_compiling() and q.device.type == "cuda" and decoding_shape(q, k, block)


def decoding_shape(q: Tensor, k: Tensor, block: tuple[int, int], *, guarded: bool = False) -> bool:
    """:func:`decoding_kernel`'s conditions on the shapes of ``q`` and ``k`` alone (any device,
    traced or not). The decoding kernel's row tile holds a key/value head's grouped query rows,
    ``Nq * groups`` rounded up to a power of two of at least 16, and must divide the query block:
    with ``groups`` a power of two it does where ``Nq * groups`` is at most the largest power of two
    dividing the block (and that is at least 16).

    Traced with symbolic sizes, the batch and the query length are compared without a guard
    (``statically_known_true``: true only where it holds for every size the graph takes), so a
    symbolic batch or query length answers False and the caller's graph is not specialised to a
    range of sizes (a loop over the powers of two guarded on the length's range and recompiled the
    graph as lengths crossed them; ``type(n) is int`` cannot tell a symbolic size, Dynamo answers it
    with ``int``). ``guarded``: compared with guards instead, one comparison each, for a choice that
    must hold for the sizes the graph runs (whether a paged cache is read in place,
    :func:`flexflash._paged.kv_block`)."""
    B, Nq, Hq, Hkv = q.shape[0], q.shape[-2], q.shape[1], k.shape[1]
    groups = Hq // Hkv
    tile_limit = block[0] & -block[0]  # the largest power of two dividing the query block
    if Hq % Hkv or groups & (groups - 1) or tile_limit < 16:
        return False
    holds = bool if guarded else statically_known_true
    conditions = (0 < Nq, Nq < block[0], Nq * groups <= tile_limit, B * Hkv <= 65535)
    return all(holds(c) for c in conditions) and not needs_main_kernel(q, k, k)


def _signature(tensors) -> tuple:
    """The shapes, strides and storage offsets of a call's tensors: a kernel compiled with static
    shapes is used for these alone (views at other offsets, such as query chunks, take the
    symbolic kernel)."""
    return tuple(None if t is None else (t.shape, t.stride(), t.storage_offset()) for t in tensors)
_DIVISIBLE_TILE = 128  # the largest default FlexAttention tile, forward and backward


def _divisible(Nq: int, Nk: int, kernel_options: dict | None) -> bool:
    """Whether both lengths are multiples of every kernel tile (the default tiles are at most 128;
    tiles set in ``kernel_options`` count too), so the kernel needs no boundary checks."""
    tiles = [_DIVISIBLE_TILE] + [int(v) for key, v in (kernel_options or {}).items() if key.startswith("BLOCK_")]
    tile = max(tiles)
    return Nq % tile == 0 and Nk % tile == 0 and not (kernel_options or {}).get("BACKEND") == "FLASH"


def flash_case(st: Structure, q: Tensor, k: Tensor, *, mask_mod, score_mod, infos: tuple[Modifier, Modifier],
               dropout: bool, return_lse: bool) -> str | None:
    """The case of :func:`flexflash._tuning.flash_choice` this call is, or None where only Triton
    kernels are considered. The cases are the measured ones, made of flexflash's own parts alone:
    "dense", "causal", "gqa_causal" (grouped heads), "key_padding" (a ``(B, Nk)`` mask),
    "softcap" (:func:`flexflash.mods.tanh_softcap`), "alibi_causal" (:func:`flexflash.mods.alibi`
    with ``causal=True``) and "prefix_lm" (:func:`flexflash.mods.prefix_lm`). Never: the caller's
    own modifiers, biases, other masks, causal with ``Nq != Nk`` (its offset is a 0-d tensor, which
    FlashAttention-4 cannot read), modifiers reading a 0-d tensor or a tensor that requires grad
    (FLASH cannot differentiate captured tensors), dropout, ``return_lse`` (with gradients FLASH
    cannot differentiate it), CPU, or inside a caller's torch.compile."""
    if q.device.type != "cuda" or torch.compiler.is_compiling() or dropout or return_lse or st.single_query:
        return None
    if st.bias_full is not None or (st.causal and not st.causal_aligned):
        return None
    if any(t.dim() == 0 or t.requires_grad for info in infos for t in info.tensors):
        return None
    # (causal, mask dims, mask_mod family, score_mod family); "own" for the caller's functions
    parts = (st.causal, st.mask_full, (mods.family(mask_mod) or "own") if st.has_mask_mod else None,
             (mods.family(score_mod) or "own") if st.has_score_mod else None)
    case = _FLASH_CASES.get(parts)
    if q.shape[1] != k.shape[1]:  # grouped heads: measured for causal attention only
        return "gqa_causal" if case == "causal" else None
    return case
_FLASH_CASES = {
    (False, None, None, None): "dense",
    (True, None, None, None): "causal",
    (False, (True, False, False, True), None, None): "key_padding",
    (False, None, None, "tanh_softcap"): "softcap",
    (True, None, None, "alibi"): "alibi_causal",
    (False, None, "prefix_lm", None): "prefix_lm",
}


def structure(q: Tensor, k: Tensor, *, causal: bool, mask: Tensor | None, bias: Tensor | None, mask_mod,
              score_mod) -> Structure:
    """The :class:`Structure` of a validated call (4-D mask/bias)."""
    Nq, Nk = q.shape[-2], k.shape[-2]
    return Structure.of(
        causal=causal, mask=mask, bias=bias, mask_mod=mask_mod, score_mod=score_mod,
        single_query=q.device.type == "cpu" and Nq == 1,
        # On CUDA, causal self-attention lengths (Nq == Nk) are a kind of their own with the
        # constant offset 0: nothing to read per entry, and FlashAttention-4 can generate it (it
        # cannot read a captured 0-d tensor, and the lowering takes no size expression there).
        # Inside a caller's torch.compile too, on every device: there the offset would be a size
        # expression, and the constant 0 of equal lengths fails the CPU lowering (torch 2.13).
        causal_aligned=causal and Nq == Nk and (q.device.type == "cuda" or torch.compiler.is_compiling()),
    )


def measured_options(st: Structure, q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None, mask_mod, score_mod,
                     infos: tuple[Modifier, Modifier], block: tuple[int, int], kernel_options: dict | None,
                     dropout: bool, return_lse: bool, decoding: bool | None = None) -> tuple[dict | None, tuple]:
    """The kernel options of a call and those of its dropout passes: the caller's own, whole, or
    else those chosen from measurements (flexflash._tuning: the generator, tuned tiles).
    ``decoding``: :func:`decoding_kernel` of the call, where the caller has it already."""
    pass_options = ((), ())
    # Under max-autotune the autotuner chooses the tiles; inside a caller's torch.compile the
    # caller's mode applies, not flexflash's.
    # The tuned tiles were measured on the main kernel; the decoding kernel has an entry of its own
    # (FlexAttention's defaults where the table has none for the call).
    if decoding is None:
        decoding = decoding_kernel(q, k, block)
    if kernel_options is None and (decoding or traced_decoding(q, k, block)):
        options = _tuning.decoding_options(q.device, q.dtype, q.shape[-1], q.shape[0], k.shape[1], block)
        if options is not None:
            return options, pass_options
    tiles = (_MODE[0] == "default" or torch.compiler.is_compiling()) and not decoding
    if dropout and kernel_options is None and tiles:
        pass_options = _tuning.dropout_pass_options(q.device, q.dtype, q.shape[-1], block)
    if (kernel_options is None and q.device.type == "cuda" and q.element_size() < 4 and any(
            t.is_floating_point() and t.element_size() > q.element_size()
            for t in (bias, *infos[1].tensors) if t is not None)):
        # A score modifier reading a wider buffer (an fp32 bias with 16-bit q) overflows shared
        # memory with the default three-stage pipeline on an H100 (246-311 KB needed, 227 KB
        # there): two stages fit.
        return {"num_stages": 2}, ((), ())
    case = None
    if kernel_options is None:
        case = flash_case(st, q, k, mask_mod=mask_mod, score_mod=score_mod, infos=infos, dropout=dropout,
                          return_lse=return_lse)
    if case is not None:
        grad_needed = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        B, Hq, Nq, D = q.shape
        if _tuning.flash_choice(case, grad_needed, q.device, q.dtype, D, v.shape[-1],
                                _tuning.work(B, Hq, Nq, k.shape[-2], D)):
            return {"BACKEND": "FLASH"}, pass_options
    if kernel_options is None and tiles and not dropout:
        kernel_options = _tuning.triton_options(q.device, q.dtype, q.shape[-1], block,
                                                case=triton_case(st, score_mod))
    return kernel_options, pass_options


def triton_case(st: Structure, score_mod) -> str | None:
    """The case of a call for the tuned Triton tiles (flexflash._tuning.triton_options): "bias" (a
    bias tensor, any masks, no score function), "alibi" or "tanh_softcap" (a score function of
    flexflash.mods, any masks, no bias), "mask_mod", "dense_mask" (a mask tensor full along both
    sequence dimensions) or "mask" (masked, nothing scored beyond causal), or None (dense, causal
    alone, the caller's own score functions, a bias with a score function)."""
    if st.bias_full is not None:
        return None if st.has_score_mod else "bias"
    if st.has_score_mod:
        fam = mods.family(score_mod)
        return fam if fam in ("alibi", "tanh_softcap") else None
    if st.has_mask_mod:
        return "mask_mod"
    if st.mask_full is None:
        return None
    return "dense_mask" if st.mask_full[-2] and st.mask_full[-1] else "mask"


@dataclass(frozen=True)
class _KindPlan:
    """What a call's kind decides, before its tensors are read: its structure, its kernel's
    constants, the kind's key in _KERNELS (without the shape parts _run_flex adds) and whether
    FlexAttention's decoding kernel can run it (:func:`decoding_kernel`)."""

    structure: Structure
    static: _Static
    kind: tuple
    decoding: bool = False


def _cpu_bias_view(q: Tensor, k: Tensor, bias: Tensor | None) -> Tensor | None:
    """A per-key bias does not compile on CPU with a symbolic key length (_cpu_static_bias); its
    stride-0 expansion along the queries does. (The view gives its size-1 dimensions the strides
    that the first compilation's alias, a view too, saw: Dynamo guards on them.)"""
    Nq, Nk = q.shape[-2], k.shape[-2]
    if q.device.type == "cpu" and bias is not None and bias.shape[-2] == 1 < bias.shape[-1] and Nq > 1:
        return bias.expand(*bias.shape[:2], Nq, Nk).view(*bias.shape[:2], Nq, Nk)
    return bias


def _grad(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias))


def kind_key(q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Tensor | None, bias: Tensor | None,
              infos: tuple[Modifier, Modifier], scale: float, block: tuple[int, int], kernel_options: dict | None,
              return_lse: bool, dropout: bool, grad: bool) -> tuple | None:
    """Everything :func:`flex_kind` reads of a call, as a key (None where kernel_options are not
    hashable), for memoising plans (flexflash.plan). Shapes stand for lengths: the kind of one shape
    says whether its lengths are multiples of the tiles."""
    try:
        options = None if kernel_options is None else tuple(sorted(kernel_options.items()))
        key = (q.device, q.dtype, q.shape, k.shape, v.shape[-1], None if mask is None else mask.shape,
               None if bias is None else (bias.shape, bias.dtype, bias.requires_grad), causal, infos[0].fp,
               infos[1].fp, scale, block, options, return_lse, dropout, grad,
               q.requires_grad or k.requires_grad or v.requires_grad, _MODE[0])
        hash(key)
    except TypeError:
        return None
    return key


def flex_kind(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, mask: Tensor | None, bias: Tensor | None,
              mask_mod, score_mod, infos: tuple[Modifier, Modifier], scale: float, block: tuple[int, int],
              kernel_options: dict | None, return_lse: bool, dropout: bool) -> _KindPlan:
    """The structure, kernel constants (the kernel options chosen from measurements among them)
    and kind of a validated call on the flex path (see :func:`_run_flex`)."""
    bias = _cpu_bias_view(q, k, bias)
    grad = _grad(q, k, v, bias)
    tracing = torch.compiler.is_compiling()
    B, Hq = q.shape[:2]
    Nk = k.shape[-2]
    st = structure(q, k, causal=causal, mask=mask, bias=bias, mask_mod=mask_mod, score_mod=score_mod)
    if st.single_query:
        q = q.expand(B, Hq, 2, q.shape[-1])
    decoding = decoding_kernel(q, k, block)
    kernel_options, pass_options = measured_options(st, q, k, v, bias=bias, mask_mod=mask_mod, score_mod=score_mod,
                                                    infos=infos, block=block, kernel_options=kernel_options,
                                                    dropout=dropout, return_lse=return_lse, decoding=decoding)
    divisible = q.device.type == "cuda" and _divisible(q.shape[-2], Nk, kernel_options)
    if divisible:
        # Lengths are symbolic in the compiled kernel, so FlexAttention cannot prove them multiples
        # of its tiles and compiles boundary checks into every tile (measured on an H100: +10%
        # forward, +25% forward+backward, 2x a dropout pass). Where the lengths are multiples of
        # every tile, say so: a kind of its own, so other lengths keep the checked kernel.
        kernel_options = {**(kernel_options or {}), "IS_DIVISIBLE": True}
    options = tuple(sorted((kernel_options or {}).items()))
    # Lengths multiples of the tiles: masks and biases full along the keys reach the kernel with
    # their key dimension split (_kernel_layout), so symbolic lengths read them in vectors; not a
    # bias whose gradient is needed.
    split = divisible and not tracing
    split_keys = (split, split and not (grad and bias is not None and bias.requires_grad))
    static = _Static(st, block, scale, Hq != k.shape[1], return_lse, options, dropout=dropout,
                     pass_options=pass_options, split_keys=split_keys)
    # Head counts and head dims are static in FlexAttention's kernels: part of the kind.
    heads_dims = (Hq, k.shape[1], q.shape[-1], v.shape[-1])
    kind = (static, heads_dims, q.device.type, q.dtype, grad, infos[0].fp, infos[1].fp, _MODE[0])
    return _KindPlan(st, static, kind, decoding)
