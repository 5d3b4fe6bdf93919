"""Attention dropout: the ``keep`` decision of every ``(b, h, q_idx, kv_idx)`` as a hash.

``dropout_p > 0`` multiplies the softmax probabilities by ``keep / (1 - p)`` with ``keep`` drawn
i.i.d. Bernoulli(1 - p) per ``(b, h, i, j)``. No ``(Nq, Nk)`` mask is ever stored:
``keep`` is a counter-based hash of the indices and a per-call seed, recomputed wherever it is
needed, the same function on every path:

* inside the compiled FlexAttention kernel (as part of the kept pass's score function, which sends
  dropped entries to ``-inf``, forward and backward),
* on the memory-bounded tiled path (per tile, eager),
* in the reference (over the whole index grid, eager),

so all three agree bit for bit on which entries are dropped for the same seed.

The seed is four int32 words drawn by :func:`draw_seed` from the default generator of the device
(``torch.manual_seed`` makes it reproducible; every call draws anew). The fourth word is the drop
threshold, so a new ``p`` is a new tensor value, not a recompilation.

The hash works on int32 with wrap-around multiplication and logical shifts, which PyTorch eager
(CPU, CUDA), Triton and the C++ kernels all compute identically. It has three parts, so that the
work per attention entry is small (inside the kernel it is the cost that matters: integer ALU
throughput, not the tensor cores, bounds a dropout pass):

* per row, :func:`row_words`: ``u = mix(seed0 ^ (b * H + h))`` (``b * H + h`` is unique for
  ``B * H < 2**32``), ``r1 = mix(u ^ mix(i ^ seed1))``, ``r2 = mix(r1 ^ u ^ seed2) + i``;
* per column, :func:`column_word`: ``c = mix(j ^ seed2)`` (a bijection of ``j``);
* per entry, :func:`entry_keep`: ``x = (r1 ^ c) * M1 + r2; x ^= x >>> 15; x *= M2``, and the entry is
  kept when ``x`` (as a signed int32) is at least the threshold ``round(p * 2**32) - 2**31``: seven
  integer operations. The keyed multiply-add makes rows that happen to share ``r1 ^ c`` values
  differ; the final multiply makes every bit of the decision depend on every input bit.

On the FlexAttention path the row and column words are computed once per call as ``(B, H, Nq)``
and ``(Nk,)`` tensors that the score function reads; only :func:`entry_keep` runs per entry (this
also keeps the score function's expression small, which matters for compilation time). The
reference and the memory-bounded path call :func:`keep`, the same composition over index grids.

Every index enters as a full 32-bit word (no 16-bit packing), so sequence lengths and ``B * H``
beyond 65,536 are as random as small ones; two rows repeat only if both 32-bit row words collide.
``mix`` is Chris Wellons' lowbias32. Statistical checks (dropped fraction, chi-square per row,
column, head and batch entry, neighbour correlations, runs, distinct rows) are in the tests.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Draw", "draw_seed", "draw_seed_for", "keep", "threshold", "row_words", "column_word", "entry_keep"]


class Draw(NamedTuple):
    """One call's attention dropout, as every path takes it: the probability ``p``, the drawn
    ``params`` (:func:`draw_seed`) and, for a shard of a larger call (flexflash.parallel),
    ``offsets = (b0, h0, q0, heads)``: the larger call's batch, query-head and query-row offsets of
    the shard and its number of query heads, so the shard draws the larger call's ``keep``."""

    p: float
    params: Tensor
    offsets: tuple[int, int, int, int] | None = None

_M1 = 0x7FEB352D
_M2 = 0x846CA68B - (1 << 32)  # the same 32-bit pattern as an int32
_LOW31 = 0x7FFFFFFF
_INT32_MIN = -(1 << 31)


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


def threshold(p: float) -> int:
    """The signed int32 drop threshold of probability ``p``: an entry is dropped when its hash, read
    as a signed int32 (uniform on ``[-2**31, 2**31)``), is below it, which happens with probability
    ``round(p * 2**32) / 2**32`` (``p`` to within ``2**-33``)."""
    return min(round(p * (1 << 32)) + _INT32_MIN, _LOW31)


def draw_seed(p: float, device: torch.device | str) -> Tensor:
    """The int32 ``(4,)`` dropout parameters of one call: three seed words from the default
    generator of ``device`` (so ``torch.manual_seed`` makes calls reproducible) and the threshold
    of ``p``. Asynchronous on CUDA (no host synchronisation)."""
    params = torch.randint(0, _LOW31, (4,), dtype=torch.int32, device=device)
    params[3:].fill_(threshold(p))  # a fill kernel with a scalar argument: no host-to-device copy
    return params


# The draw as an operator of flexflash's own, for calls traced into a caller's torch.compile: there
# torch.randint would become Inductor's random stream, and the compiled call would drop other
# entries than the eager one. As an opaque operator it draws from the device's default generator
# at run time, as the eager call does. ``like`` is a tensor of the call (its query), so that two
# calls of one graph are distinct operations to the graph passes that merge identical ones; the
# tag keeps them from being merged or folded as constants.
_LIB = torch.library.Library("flexflash", "FRAGMENT")
_LIB.define("draw_seed(Tensor like, float p) -> Tensor", tags=(torch.Tag.nondeterministic_seeded,))
_LIB.impl("draw_seed", lambda like, p: draw_seed(p, like.device), "CompositeExplicitAutograd")


@torch.library.register_fake("flexflash::draw_seed")
def _(like: Tensor, p: float) -> Tensor:
    return torch.empty(4, dtype=torch.int32, device=like.device)


def draw_seed_for(p: float, like: Tensor) -> Tensor:
    """:func:`draw_seed` for a call whose query is ``like``, also inside a caller's torch.compile."""
    if torch.compiler.is_compiling():
        return torch.ops.flexflash.draw_seed(like, p)
    return draw_seed(p, like.device)


def row_words(params: Tensor, num_heads: int, b: Tensor, h: Tensor, q_idx: Tensor) -> tuple[Tensor, Tensor]:
    """The two int32 words of each query row ``(b, h, q_idx)`` (broadcast over the index tensors).
    ``num_heads`` is the number of query heads (it makes ``b * num_heads + h`` unique per head)."""
    b, h, q_idx = (t.to(torch.int32) for t in (b, h, q_idx))
    u = _mix(params[0] ^ (b * num_heads + h))
    r1 = _mix(u ^ _mix(q_idx ^ params[1]))
    r2 = _mix(r1 ^ u ^ params[2]) + q_idx
    return r1, r2


def column_word(params: Tensor, kv_idx: Tensor) -> Tensor:
    """The int32 word of each key column (a bijection of ``kv_idx``)."""
    return _mix(kv_idx.to(torch.int32) ^ params[2])


def entry_keep(r1: Tensor, r2: Tensor, c: Tensor, thr: Tensor) -> Tensor:
    """Whether the entries with row words ``(r1, r2)`` and column word ``c`` are kept, for the
    threshold ``thr`` (``params[3]``): seven integer operations per entry."""
    x = (r1 ^ c) * _M1 + r2
    x = x ^ _shr(x, 15)
    return x * _M2 >= thr


def keep(params: Tensor, num_heads: int, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Whether entry ``(b, h, q_idx, kv_idx)`` is kept (bool, broadcast over the index tensors).

    ``params`` comes from :func:`draw_seed`; ``num_heads`` is the number of query heads; ``h`` is the
    query head. Works on scalar indices and on broadcast index grids alike."""
    r1, r2 = row_words(params, num_heads, b, h, q_idx)
    return entry_keep(r1, r2, column_word(params, kv_idx), params[3])
