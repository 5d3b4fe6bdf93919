"""Attention dropout: the ``keep`` decision of every ``(b, h, q_idx, kv_idx)`` as a hash.

``dropout_p > 0`` multiplies the softmax probabilities by ``keep / (1 - p)`` with ``keep`` drawn
i.i.d. Bernoulli(1 - p) per ``(b, h, i, j)`` (SPEC §2). No ``(Nq, Nk)`` mask is ever stored:
``keep`` is a counter-based hash of the indices and a per-call seed, recomputed wherever it is
needed, the same function on every path:

* inside the compiled FlexAttention kernel (as part of the mask function, forward and backward),
* on the memory-bounded tiled path (per tile, eager),
* in the reference (over the whole index grid, eager),

so all three agree bit for bit on which entries are dropped for the same seed.

The seed is four int32 words drawn by :func:`draw_seed` from the default generator of the device
(``torch.manual_seed`` makes it reproducible; every call draws anew). The fourth word is the drop
threshold, so a new ``p`` is a new tensor value, not a recompilation.

The hash works on int32 with wrap-around multiplication and logical shifts, which PyTorch eager
(CPU, CUDA), Triton and the C++ kernels all compute identically:

* per ``(b, h)``: ``u = mix(seed0 ^ (b * H + h))`` (``b * H + h`` is unique for ``B * H < 2**32``);
* per row: two words ``r1 = mix(u ^ mix(i ^ seed1))``, ``r2 = mix(r1 ^ u ^ seed2) + i``;
* per column: ``c = mix(j ^ seed2)`` (a bijection of ``j``);
* per entry: ``x = mix_keyed(r1 ^ c, r2)``, a full lowbias32 mix with ``r2`` added between its
  rounds; ``keep = (x & 0x7fffffff) >= threshold`` with ``threshold = round(p * 2**31)``.

Every index enters as a full 32-bit word (no 16-bit packing), so sequence lengths and ``B * H``
beyond 65,536 are as random as small ones; two rows repeat only if both 32-bit row words collide.
The per-row and per-column words are vectors in the kernel's tile, so the per-entry cost is about
fifteen integer operations. ``mix`` is Chris Wellons' lowbias32 (bias 0.17 per mille).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["draw_seed", "keep", "threshold"]

_M1 = 0x7FEB352D
_M2 = 0x846CA68B - (1 << 32)  # the same 32-bit pattern as an int32
_LOW31 = 0x7FFFFFFF


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of an int32 tensor (``>>`` on int32 shifts the sign in)."""
    return (x >> s) & ((1 << (32 - s)) - 1)


def _mix(x: Tensor) -> Tensor:
    """lowbias32: a bijection of 32-bit words with full avalanche."""
    x = x ^ _shr(x, 16)
    x = x * _M1
    x = x ^ _shr(x, 15)
    x = x * _M2
    return x ^ _shr(x, 16)


def _mix_keyed(x: Tensor, key: Tensor) -> Tensor:
    """lowbias32 with ``key`` added after the first multiplication (a bijection of ``x`` for
    every ``key``)."""
    x = x ^ _shr(x, 16)
    x = x * _M1 + key
    x = x ^ _shr(x, 15)
    x = x * _M2
    return x ^ _shr(x, 16)


def threshold(p: float) -> int:
    """The int32 drop threshold of probability ``p``: an entry is dropped when the low 31 bits of
    its hash are below it, which happens with probability ``threshold(p) / 2**31`` (``p`` to
    within ``2**-32``)."""
    return min(round(p * (1 << 31)), _LOW31)


def draw_seed(p: float, device: torch.device | str) -> Tensor:
    """The int32 ``(4,)`` dropout parameters of one call: three seed words from the default
    generator of ``device`` (so ``torch.manual_seed`` makes calls reproducible) and the threshold
    of ``p``. Asynchronous on CUDA (no host synchronisation)."""
    params = torch.randint(0, _LOW31, (4,), dtype=torch.int32, device=device)
    params[3] = threshold(p)
    return params


def keep(params: Tensor, num_heads: int, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Whether entry ``(b, h, q_idx, kv_idx)`` is kept (bool, broadcast over the index tensors).

    ``params`` comes from :func:`draw_seed`; ``num_heads`` is the number of query heads (it makes
    ``b * num_heads + h`` unique per head); ``h`` is the query head. Works on scalar indices (inside
    a FlexAttention mask function) and on broadcast index grids alike."""
    b, h, q_idx, kv_idx = (t.to(torch.int32) for t in (b, h, q_idx, kv_idx))
    s0, s1, s2, thr = params[0], params[1], params[2], params[3]
    u = _mix(s0 ^ (b * num_heads + h))
    r1 = _mix(u ^ _mix(q_idx ^ s1))
    r2 = _mix(r1 ^ u ^ s2) + q_idx
    c = _mix(kv_idx ^ s2)
    return (_mix_keyed(r1 ^ c, r2) & _LOW31) >= thr
