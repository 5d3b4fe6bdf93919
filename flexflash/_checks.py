"""Argument validation and normalisation shared by every path (fast, memory-bounded, reference).

Everything a caller can get wrong is checked here, before any compilation, and reported as a
``ValueError``/``TypeError`` that names the argument, what was expected and what was given,
followed by the shapes of all tensors of the call (one per line, as xformers does). A tensor of the
wrong dtype raises :class:`DtypeError`, which is both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._fingerprint import NO_MODIFIER, Modifier, inspect_modifier

__all__ = ["DtypeError", "Problem", "accumulation_dtype", "normalize", "describe", "validate", "KEYWORDS"]


class DtypeError(TypeError, ValueError):
    """A tensor argument of the wrong dtype (a float mask, an integer bias, q in int64, ...).

    It is a ``ValueError``, as a mask of non-bool dtype must be, and a ``TypeError``, so callers
    may catch either.
    """


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "flex", "reference")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a call of inputs in ``dtype`` computes its scores and statistics in: float64 for
    float64 inputs, else float32 (§2 of the spec)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def describe(**tensors: Tensor | None) -> str:
    """One line per tensor: name, shape, dtype, device (absent tensors are skipped)."""
    text = ""  # concatenation rather than str.join, which Dynamo cannot trace
    for name, t in tensors.items():
        if isinstance(t, Tensor):
            text += ("\n" if text else "") + f"  {name}: shape={tuple(t.shape)} dtype={t.dtype} device={t.device}"
    return text


@dataclass(frozen=True)
class Problem:
    """A validated attention call in the canonical ``[B, H, N, D]`` layout.

    ``k``/``v`` are always 4-D here (a 3-D input becomes one shared head). ``mask`` and ``bias``
    are 4-D with every dimension either 1 (broadcast) or full size: ``(B|1, Hq|1, Nq|1, Nk|1)``.
    """

    q: Tensor  # (B, Hq, Nq, D)
    k: Tensor  # (B, Hkv, Nk, D)
    v: Tensor  # (B, Hkv, Nk, Dv)
    mask: Tensor | None  # bool, True = may attend
    bias: Tensor | None  # floating, added to the scores
    scale: float
    # The block mask's sparsity block on the FlexAttention path, and the tiles of the memory-bounded
    # path, from block_size (parsed once).
    block: tuple[int, int] = (128, 128)
    chunks: tuple[int, int] = (512, 1024)

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def q_heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def q_len(self) -> int:
        return self.q.shape[2]

    @property
    def kv_len(self) -> int:
        return self.k.shape[2]


def _check_tensor(name: str, t: object, ctx) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}\n{ctx()}")
    return t


def _broadcast_pattern(name: str, t: Tensor, full: tuple[int, ...], ctx, what: str) -> None:
    for dim, (got, want) in enumerate(zip(t.shape, full)):
        if got not in (1, want):
            raise ValueError(
                f"{name}: expected a tensor broadcastable to {what} = {full}; dimension {dim} has "
                f"size {got}, expected {'1' if want == 1 else f'1 or {want}'}; got shape {tuple(t.shape)}\n{ctx()}"
            )


def normalize(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None,
    bias: Tensor | None,
    scale: float | None,
    dropout_p: float,
    block_size: int | tuple[int, int] | None = None,
    backend: str = "auto",
) -> Problem:
    """Validate one call of :func:`flexflash.attention` and bring it to canonical form."""
    # The description of the call's tensors is built only when an error is raised (off the hot
    # path, and traceable inside a caller's torch.compile).
    given = dict(q=q, k=k, v=v, mask=mask, bias=bias)  # as passed, before any reshaping

    def ctx() -> str:
        return describe(**{name: t for name, t in given.items() if isinstance(t, Tensor)})

    q = _check_tensor("q", q, ctx)
    k = _check_tensor("k", k, ctx)
    v = _check_tensor("v", v, ctx)
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    q, k, v = _checked_qkv(q, k, v, mask, bias, ctx)
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    mask = None if mask is None else _promoted_mask(mask, B, Hq, Nq, Nk, ctx)
    bias = None if bias is None else _promoted_bias(bias, B, Hq, Nq, Nk, ctx)
    scale = _checked_scale(scale, D)
    _check_dropout_p(dropout_p)
    return Problem(q=q, k=k, v=v, mask=mask, bias=bias, scale=float(scale),
                   block=block_sizes(block_size), chunks=block_sizes(block_size, DEFAULT_CHUNKS))


def _checked_qkv(q, k, v, mask, bias, ctx) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (tensors) checked: dtypes, devices, ranks, shapes; 3-D k, v as one shared head."""

    # --- dtypes -------------------------------------------------------------------------------
    if q.dtype not in _FLOAT_DTYPES:
        raise DtypeError(f"q: expected a floating dtype (float16, bfloat16, float32, float64), "
                         f"got {q.dtype}\n{ctx()}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise DtypeError(f"{name}: expected the dtype of q ({q.dtype}), got {t.dtype}\n{ctx()}")

    # --- devices ------------------------------------------------------------------------------
    for name, t in (("k", k), ("v", v), ("mask", mask), ("bias", bias)):
        if isinstance(t, Tensor) and t.device != q.device:
            raise ValueError(f"{name}: expected a tensor on q's device ({q.device}), got {t.device}\n{ctx()}")

    # --- ranks and shapes ---------------------------------------------------------------------
    if q.dim() != 4:
        raise ValueError(f"q: expected 4 dimensions (B, Hq, Nq, D), got {q.dim()}: shape {tuple(q.shape)}\n{ctx()}")
    if k.dim() != v.dim() or k.dim() not in (3, 4):
        raise ValueError(
            f"k, v: expected both 4-D (B, Hkv, Nk, D) or both 3-D (B, Nk, D) (one head shared by all "
            f"query heads), got k with {k.dim()} and v with {v.dim()} dimensions\n{ctx()}")
    if k.dim() == 3:
        k, v = k.unsqueeze(1), v.unsqueeze(1)  # (B, Nk, D) -> (B, 1, Nk, D)
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    if Bk != B or v.shape[0] != B:
        raise ValueError(f"k, v: expected batch size {B} (that of q), got {Bk} and {v.shape[0]}\n{ctx()}")
    if Dk != D:
        raise ValueError(f"k: expected head dim D={D} (that of q), got {Dk}\n{ctx()}")
    if v.shape[1] != Hkv or v.shape[2] != Nk:
        raise ValueError(f"v: expected (B, Hkv, Nk) = {(B, Hkv, Nk)} like k, got {tuple(v.shape[:3])}\n{ctx()}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"k, v: the number of query heads ({Hq}) must be a multiple of the number of key/value "
            f"heads (grouped-query attention), got Hq={Hq}, Hkv={Hkv}\n{ctx()}")
    if D == 0 or v.shape[-1] == 0:
        raise ValueError(f"q, v: head dims must be positive, got D={D}, Dv={v.shape[-1]}\n{ctx()}")
    return q, k, v


def _promoted_mask(mask, B: int, Hq: int, Nq: int, Nk: int, ctx) -> Tensor:
    """A checked bool mask as a 4-D tensor broadcastable to ``(B, Hq, Nq, Nk)``."""
    full = (B, Hq, Nq, Nk)
    mask = _check_tensor("mask", mask, ctx)
    if mask.dtype != torch.bool:
        raise DtypeError(
            f"mask: expected a bool tensor (True = may attend), got dtype {mask.dtype}; for an "
            f"additive float mask pass it as bias=\n{ctx()}")
    if mask.dim() == 2:
        if mask.shape[1] != Nk or mask.shape[0] not in (1, B):
            raise ValueError(
                f"mask: a 2-D mask is key padding of shape (B, Nk) = {(B, Nk)}, got shape "
                f"{tuple(mask.shape)} (for a (Nq, Nk) mask use a 4-D mask of shape (1, 1, Nq, Nk))\n{ctx()}")
        mask = mask.view(mask.shape[0], 1, 1, Nk)  # (B, Nk) -> (B, 1, 1, Nk)
    elif mask.dim() == 4:
        _broadcast_pattern("mask", mask, full, ctx, "(B, H, Nq, Nk)")
    else:
        raise ValueError(
            f"mask: expected a 2-D key-padding mask (B, Nk) or a 4-D mask broadcastable to "
            f"(B, H, Nq, Nk) = {full}, got {mask.dim()}-D shape {tuple(mask.shape)}\n{ctx()}")
    return mask


def _promoted_bias(bias, B: int, Hq: int, Nq: int, Nk: int, ctx) -> Tensor:
    """A checked floating bias as a 4-D tensor broadcastable to ``(B, Hq, Nq, Nk)``."""
    full = (B, Hq, Nq, Nk)
    bias = _check_tensor("bias", bias, ctx)
    if not bias.is_floating_point():
        raise DtypeError(f"bias: expected a floating tensor added to the scores, got dtype {bias.dtype}"
                         f" (for a boolean mask use mask=)\n{ctx()}")
    if bias.dim() == 2:
        if tuple(bias.shape) != (Nq, Nk):
            raise ValueError(f"bias: a 2-D bias must have shape (Nq, Nk) = {(Nq, Nk)}, got "
                             f"{tuple(bias.shape)}\n{ctx()}")
        bias = bias[None, None]  # (Nq, Nk) -> (1, 1, Nq, Nk)
    elif bias.dim() == 3:
        _broadcast_pattern("bias", bias, (Hq, Nq, Nk), ctx, "(H, Nq, Nk)")
        bias = bias[None]  # (H, Nq, Nk) -> (1, H, Nq, Nk)
    elif bias.dim() == 4:
        _broadcast_pattern("bias", bias, full, ctx, "(B, H, Nq, Nk)")
    else:
        raise ValueError(
            f"bias: expected (Nq, Nk), (H, Nq, Nk) or 4-D broadcastable to (B, H, Nq, Nk) = "
            f"{full}, got {bias.dim()}-D shape {tuple(bias.shape)}\n{ctx()}")
    return bias


def _checked_scale(scale, D: int) -> float:
    if scale is None:
        scale = D ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a finite float or None, got {type(scale).__name__} {scale!r}")
    elif not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale!r}")
    return scale


def _check_dropout_p(dropout_p) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p: expected a float in [0, 1), got {type(dropout_p).__name__} {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")


# The memory-bounded path's tiles when no block_size is given (zeta's bucket sizes).
DEFAULT_CHUNKS = (512, 1024)


def block_sizes(block_size: int | tuple[int, int] | None, default: tuple[int, int] = (128, 128)) -> tuple[int, int]:
    """``block_size`` as a ``(q_block, kv_block)`` pair of positive ints."""
    if block_size is None:
        return default
    pair = (block_size, block_size) if isinstance(block_size, int) and not isinstance(block_size, bool) else block_size
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in pair)):
        raise ValueError(f"block_size: expected a positive int or a (q_block, kv_block) pair of positive ints, "
                         f"got {block_size!r}")
    return int(pair[0]), int(pair[1])


# attention()'s keywords and their defaults.
KEYWORDS = dict(causal=False, mask=None, bias=None, mask_mod=None, score_mod=None, scale=None, dropout_p=0.0,
                 block_size=None, kernel_options=None, return_lse=False, backend="auto")


def known_kernel_options() -> set[str] | None:
    try:
        from torch.nn.attention.flex_attention import FlexKernelOptions
    except ImportError:  # pragma: no cover - older torch
        return None
    return set(getattr(FlexKernelOptions, "__annotations__", {})) or None


def check_modifier(name: str, fn: Any, device: torch.device) -> Modifier:
    if fn is None:
        return NO_MODIFIER
    if not callable(fn):
        raise TypeError(f"{name}: expected a callable with FlexAttention's signature, got {type(fn).__name__}")
    info = inspect_modifier(fn)
    for t in info.tensors:
        if t.device != device:
            raise ValueError(
                f"{name}: {getattr(fn, '__name__', name)} reads a tensor on {t.device} (shape "
                f"{tuple(t.shape)}), expected the device of q ({device}); move it with .to({str(device)!r})")
    return info


def validate(q, k, v, *, causal, mask, bias, mask_mod, score_mod, scale, dropout_p, block_size, kernel_options,
              return_lse, backend) -> tuple[Problem, tuple[Modifier, Modifier], float]:
    """Validates a call of :func:`flexflash.attention` (its keywords, all given): ``(problem,
    (mask_mod's fingerprint, score_mod's), dropout_p as a float)``."""
    p = normalize(q, k, v, mask=mask, bias=bias, scale=scale, dropout_p=dropout_p,
                  block_size=block_size, backend=backend)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__} {causal!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__} {return_lse!r}")
    infos = check_modifier("mask_mod", mask_mod, p.q.device), check_modifier("score_mod", score_mod, p.q.device)
    if kernel_options is not None:
        if not isinstance(kernel_options, dict) or not all(isinstance(key, str) for key in kernel_options):
            raise TypeError(f"kernel_options: expected a dict with str keys, got {kernel_options!r}")
        known = known_kernel_options()
        # FlexAttention also takes any option for one direction alone: "fwd_" or "bwd_" + its name.
        unknown = sorted(key for key in kernel_options
                         if key not in known and key.removeprefix("fwd_").removeprefix("bwd_") not in known) if known else []
        if unknown:
            raise ValueError(f"kernel_options: unknown option(s) {unknown}; expected keys among {sorted(known)}")
    return p, infos, float(dropout_p)
