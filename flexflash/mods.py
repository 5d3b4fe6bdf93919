"""Mask and score modifiers: typed factories returning FlexAttention-signature functions.

A *mask mod* has the signature ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = may attend) and a
*score mod* ``score_mod(score, b, h, q_idx, kv_idx) -> score``, exactly as
``torch.nn.attention.flex_attention`` expects. Every factory validates its arguments when called and
names the function after its parameters (``sliding_window_128``), so compiled graphs and error
messages say what they are. The functions are written with plain tensor operations, so they also
evaluate over broadcast index grids (the reference path and the memory-bounded CPU path do that).

Alignment: index arithmetic uses an ``offset`` that shifts the diagonal: query ``i`` is aligned
with key ``i + offset``. For bottom-right alignment (FlashAttention's convention) with ``Nq`` queries
and ``Nk`` keys use ``offset = Nk - Nq``; :func:`flexflash.attention` does this itself for
``causal=True``. An ``offset`` given as a 0-d integer tensor is read at run time, so changing its
value does not recompile; a Python int is baked into the compiled kernel (one compilation per
distinct value).

Captured tensors (masks, biases, document ids, lengths) must live on the device of the attention
inputs; their values are read when the kernel runs, so new values of the same shape reuse the
compiled kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn.attention import flex_attention

from ._checks import DtypeError, accumulation_dtype

__all__ = [
    "MaskMod",
    "ScoreMod",
    "causal",
    "sliding_window",
    "prefix_lm",
    "document",
    "document_from_offsets",
    "key_padding",
    "dense_mask",
    "additive_bias",
    "alibi",
    "alibi_slopes",
    "tanh_softcap",
    "and_masks",
    "or_masks",
    "compose_scores",
]

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def _named(fn, name: str):
    fn.__name__ = name
    fn.__qualname__ = name
    return fn


def _check_scalar_tensor(name: str, t: Tensor, expected: str) -> Tensor:
    if t.dim() != 0 or t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected {expected} or a 0-d integer tensor, got a tensor of shape "
                         f"{tuple(t.shape)} and dtype {t.dtype}")
    return t


def _check_offset(offset: int | Tensor) -> int | Tensor:
    if isinstance(offset, Tensor):
        return _check_scalar_tensor("offset", offset, "an int")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset: expected an int or a 0-d integer tensor, got {type(offset).__name__} {offset!r}")
    return offset


def _offset_tag(offset: int | Tensor) -> str:
    if isinstance(offset, Tensor):
        return "_offset_t"
    return f"_offset{offset}" if offset else ""


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _index(t: Tensor, full: Sequence[bool], *idx: Tensor) -> Tensor:
    """``t[idx]`` where dimensions of size 1 broadcast (indexed at 0)."""
    return t[tuple(i if f else 0 for i, f in zip(idx, full))]


# --- masks -----------------------------------------------------------------------------------

def causal(offset: int | Tensor = 0) -> MaskMod:
    """Causal mask: query ``i`` may see key ``j`` iff ``j <= i + offset``.

    ``offset = Nk - Nq`` gives bottom-right alignment (the last query sees every key)."""
    offset = _check_offset(offset)

    def causal_mask(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    return _named(causal_mask, "causal" + _offset_tag(offset))


def sliding_window(window: int | Tensor, *, offset: int | Tensor = 0) -> MaskMod:
    """Causal sliding window of ``window`` keys: query ``i`` sees key ``j`` iff
    ``i + offset - window < j <= i + offset`` (the aligned key and the ``window - 1`` before it).

    ``window`` is an int (a constant of the compiled kernel: each distinct value compiles once, and
    blocks are skipped from a cached block mask) or a 0-d integer tensor (read at run time: every
    window size shares one compiled kernel, and the block mask is rebuilt per call), e.g. for
    many layers with different windows."""
    if isinstance(window, Tensor):
        _check_scalar_tensor("window", window, "a positive int")
        if not torch.compiler.is_compiling() and int(window) < 1:
            raise ValueError(f"window must be >= 1, got {int(window)}")
        tag = "sliding_window_t"
    else:
        window = _check_positive_int("window", window)
        tag = f"sliding_window_{window}"
    offset = _check_offset(offset)

    def sliding_window_mask(b, h, q_idx, kv_idx):
        d = q_idx + offset - kv_idx
        return (d >= 0) & (d < window)

    return _named(sliding_window_mask, tag + _offset_tag(offset))


def prefix_lm(prefix_len: int | Tensor, *, offset: int | Tensor = 0) -> MaskMod:
    """Prefix-LM: every query sees the first ``prefix_len`` keys (bidirectional prefix), and the
    rest causally. ``prefix_len`` is an int or a ``(B,)`` integer tensor (one prefix per sequence)."""
    offset = _check_offset(offset)
    if isinstance(prefix_len, Tensor):
        if prefix_len.dim() != 1 or prefix_len.is_floating_point() or prefix_len.dtype == torch.bool:
            raise ValueError(f"prefix_len: expected an int or a (B,) integer tensor, got shape "
                             f"{tuple(prefix_len.shape)} dtype {prefix_len.dtype}")
        lengths = prefix_len

        def prefix_lm_mask(b, h, q_idx, kv_idx):
            return (kv_idx < lengths[b]) | (kv_idx <= q_idx + offset)

        return _named(prefix_lm_mask, "prefix_lm_per_batch" + _offset_tag(offset))
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 0:
        raise ValueError(f"prefix_len: expected an int >= 0 or a (B,) integer tensor, got {prefix_len!r}")
    n = prefix_len

    def prefix_lm_mask(b, h, q_idx, kv_idx):
        return (kv_idx < n) | (kv_idx <= q_idx + offset)

    return _named(prefix_lm_mask, f"prefix_lm_{n}" + _offset_tag(offset))


def _check_ids(name: str, ids: Tensor) -> Tensor:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name}: expected an integer tensor of shape (N,) or (B, N), got {type(ids).__name__}")
    if ids.dim() not in (1, 2) or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor of shape (N,) or (B, N), got shape "
                         f"{tuple(ids.shape)} dtype {ids.dtype}")
    return ids if ids.dim() == 2 else ids[None]  # (N,) -> (1, N)


def document(doc_ids: Tensor, kv_doc_ids: Tensor | None = None) -> MaskMod:
    """Document (packed sequence) mask: a query sees a key iff both belong to the same document.

    ``doc_ids`` holds one document id per token, shape ``(N,)`` (shared by the batch) or ``(B, N)``;
    ``kv_doc_ids`` gives the keys' ids where keys and queries differ (default: ``doc_ids``). Combine
    with :func:`causal` for causal packed sequences."""
    q_ids = _check_ids("doc_ids", doc_ids)
    kv_ids = q_ids if kv_doc_ids is None else _check_ids("kv_doc_ids", kv_doc_ids)
    if kv_ids.device != q_ids.device:
        raise ValueError(f"kv_doc_ids: expected the device of doc_ids ({q_ids.device}), got {kv_ids.device}")
    q_batched, kv_batched = q_ids.shape[0] > 1, kv_ids.shape[0] > 1

    def document_mask(b, h, q_idx, kv_idx):
        return q_ids[b if q_batched else 0, q_idx] == kv_ids[b if kv_batched else 0, kv_idx]

    return _named(document_mask, "document")


def document_from_offsets(offsets: Tensor | Sequence[int]) -> MaskMod:
    """Document mask from cumulative offsets (``cu_seqlens``): ``[0, n0, n0 + n1, ..., N]``."""
    off = torch.as_tensor(offsets)
    if off.dim() != 1 or off.numel() < 2 or off.is_floating_point():
        raise ValueError(f"offsets: expected a 1-D integer sequence [0, ..., N] with at least two entries, got {offsets!r}")
    if int(off[0]) != 0 or bool((off[1:] < off[:-1]).any()):
        raise ValueError(f"offsets: expected non-decreasing offsets starting at 0, got {off.tolist()}")
    positions = torch.arange(int(off[-1]), device=off.device)
    ids = torch.searchsorted(off[1:], positions, right=True)  # (N,) document of each token
    return document(ids)


def key_padding(lengths: Tensor | None = None, *, mask: Tensor | None = None) -> MaskMod:
    """Key padding from per-sequence ``lengths`` ``(B,)`` (keys ``j < lengths[b]`` are real) or from a
    ``(B, Nk)`` bool ``mask`` (True = real key). Give exactly one."""
    if (lengths is None) == (mask is None):
        raise ValueError("key_padding: expected exactly one of lengths= or mask=, got "
                         f"{'both' if lengths is not None else 'neither'}")
    if lengths is not None:
        if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise ValueError(f"lengths: expected a (B,) integer tensor, got {lengths!r}")
        lens = lengths

        def key_padding_mask(b, h, q_idx, kv_idx):
            return kv_idx < lens[b]

        return _named(key_padding_mask, "key_padding_lengths")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask: expected a (B, Nk) bool tensor (True = real key), got "
                         f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}"
                         f"{' dtype ' + str(mask.dtype) if isinstance(mask, Tensor) else ''}")
    keep = mask

    def key_padding_mask(b, h, q_idx, kv_idx):
        return keep[b, kv_idx]

    return _named(key_padding_mask, "key_padding_mask")


def _as_4d(name: str, t: Tensor) -> Tensor:
    if t.dim() == 2:
        return t[None, None]  # (Nq, Nk) -> (1, 1, Nq, Nk)
    if t.dim() == 3:
        return t[None]  # (H, Nq, Nk) -> (1, H, Nq, Nk)
    if t.dim() == 4:
        return t
    raise ValueError(f"{name}: expected a 2-D (Nq, Nk), 3-D (H, Nq, Nk) or 4-D (B, H, Nq, Nk) tensor, "
                     f"got {t.dim()}-D shape {tuple(t.shape)}")


def dense_mask(mask: Tensor) -> MaskMod:
    """A dense bool mask (True = may attend) of shape ``(Nq, Nk)``, ``(H, Nq, Nk)`` or 4-D
    ``(B, H, Nq, Nk)``, where any dimension may be 1 to broadcast."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask: expected a bool tensor (True = may attend), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise DtypeError(f"mask: expected a bool tensor (True = may attend), got {mask.dtype}")
    m = _as_4d("mask", mask)
    full = tuple(s > 1 for s in m.shape)

    def dense_mask_mod(b, h, q_idx, kv_idx):
        return _index(m, full, b, h, q_idx, kv_idx)

    return _named(dense_mask_mod, "dense_mask")


# --- scores ----------------------------------------------------------------------------------

def additive_bias(bias: Tensor) -> ScoreMod:
    """Adds ``bias`` to the scores: shape ``(Nq, Nk)``, ``(H, Nq, Nk)`` or 4-D ``(B, H, Nq, Nk)``
    (size-1 dimensions broadcast). ``-inf`` entries act as a mask; gradients flow to ``bias``."""
    if not isinstance(bias, Tensor):
        raise TypeError(f"bias: expected a floating tensor, got {type(bias).__name__}")
    if not bias.is_floating_point():
        raise DtypeError(f"bias: expected a floating tensor, got {bias.dtype}")
    t = _as_4d("bias", bias)
    full = tuple(s > 1 for s in t.shape)

    def additive_bias_mod(score, b, h, q_idx, kv_idx):
        return score + _index(t, full, b, h, q_idx, kv_idx)

    return _named(additive_bias_mod, "additive_bias")


def alibi_slopes(num_heads: int) -> Tensor:
    """The ALiBi head slopes of Press et al. (geometric; interleaved for non-powers of two)."""
    num_heads = _check_positive_int("num_heads", num_heads)
    h = torch.arange(num_heads, dtype=torch.float64)
    return _alibi_slope(h, num_heads).float()


def _alibi_slope(h: Tensor, num_heads: int) -> Tensor:
    # Closed form so that no tensor is captured: for m = 2**floor(log2(num_heads)) the first m heads
    # get 2**(-8 (h + 1) / m); the rest take every other slope of the 2m-head sequence.
    m = 2 ** math.floor(math.log2(num_heads))
    first = torch.exp2(-(8.0 / m) * (h + 1))
    extra = torch.exp2(-(4.0 / m) * (2 * (h - m) + 1))
    return torch.where(h < m, first, extra)


def alibi(num_heads: int, *, offset: int | Tensor = 0) -> ScoreMod:
    """ALiBi: adds ``-slope[h] * |i + offset - j|`` to the scores (for causal attention this is the
    paper's ``slope * (j - i)``). ``h`` is the query head index, so GQA sees per-query-head slopes.
    Computed in float32, or in float64 for float64 scores. (Not in the scores' own dtype:
    FlexAttention traces a modifier with scores of the inputs' dtype, bfloat16 for bfloat16 inputs,
    while its kernels hold them in float32.)"""
    num_heads = _check_positive_int("num_heads", num_heads)
    offset = _check_offset(offset)

    def alibi_mod(score, b, h, q_idx, kv_idx):
        dtype = accumulation_dtype(score.dtype)
        distance = (q_idx + offset - kv_idx).abs().to(dtype)
        return score - _alibi_slope(h.to(dtype), num_heads) * distance

    return _named(alibi_mod, f"alibi_{num_heads}" + _offset_tag(offset))


def tanh_softcap(cap: float) -> ScoreMod:
    """Soft-capping: ``cap * tanh(score / cap)`` (Gemma 2, Grok)."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
        raise ValueError(f"cap: expected a finite float > 0, got {cap!r}")
    cap = float(cap)

    def tanh_softcap_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return _named(tanh_softcap_mod, f"tanh_softcap_{cap:g}")


# --- composition -----------------------------------------------------------------------------

def _check_callables(name: str, fns: Sequence[object]) -> None:
    if not fns:
        raise ValueError(f"{name}: expected at least one function")
    for fn in fns:
        if not callable(fn):
            raise TypeError(f"{name}: expected callables, got {type(fn).__name__}")


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """A mask allowing what every one of ``mask_mods`` allows."""
    _check_callables("and_masks", mask_mods)
    return _named(flex_attention.and_masks(*mask_mods), "and(" + ",".join(getattr(m, "__name__", "mask") for m in mask_mods) + ")")


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """A mask allowing what any one of ``mask_mods`` allows."""
    _check_callables("or_masks", mask_mods)
    return _named(flex_attention.or_masks(*mask_mods), "or(" + ",".join(getattr(m, "__name__", "mask") for m in mask_mods) + ")")


def compose_scores(*score_mods: ScoreMod) -> ScoreMod:
    """Applies ``score_mods`` in order: ``compose_scores(f, g)(s, ...) = g(f(s, ...), ...)``."""
    _check_callables("compose_scores", score_mods)

    def composed_score(score, b, h, q_idx, kv_idx):
        for mod in score_mods:
            score = mod(score, b, h, q_idx, kv_idx)
        return score

    return _named(composed_score, "then(" + ",".join(getattr(m, "__name__", "score") for m in score_mods) + ")")


# --- families of this module's modifiers -------------------------------------------------------

# Code objects of the functions the factories above return, by family: a function with one of these
# code objects was made here, so its generated kernel code is known (flexflash._tuning measured it).
_FAMILIES = tuple((name, fn.__code__) for name, fns in (
    ("tanh_softcap", (tanh_softcap(1.0),)),
    ("alibi", (alibi(1),)),
    ("prefix_lm", (prefix_lm(0), prefix_lm(torch.zeros(1, dtype=torch.int64)))),
) for fn in fns)


def family(fn: object) -> str | None:
    """The factory of this module that made ``fn``, for the modifiers flexflash's kernel choice
    knows ("tanh_softcap", "alibi", "prefix_lm"; see flexflash._kinds.flash_case), recognised by
    its code object; None for any other function. (Compared by identity, not looked up in a dict
    keyed by code objects: Dynamo cannot guard on such a lookup inside a caller's torch.compile.)"""
    code = getattr(fn, "__code__", None)
    for name, family_code in _FAMILIES:
        if code is family_code:
            return name
    return None
