"""The dropout hash's row and column words of one call on the FlexAttention path (see
flexflash.dropout for the hash): the kernel reads them per entry."""

from __future__ import annotations

import torch
from torch import Tensor

from . import dropout
from ._compiled import _LIB
from ._compose import tile_grids
from ._kernels import _scalar_tensor

def _words_flat(params: Tensor, rows: Tensor, q_len: Tensor, cols: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The dropout hash's row words of flat rows ``r = (b * H + h) * Nq + i`` and column words."""
    bh, i = rows // q_len, rows % q_len  # b * H + h is what row_words needs of (b, h)
    r1, r2 = dropout.row_words(params, 1, bh, torch.zeros_like(bh), i)
    return r1, r2, dropout.column_word(params, cols)


# The hash words are computed by one small compiled kernel per call (dynamic 1-D shapes, a handful
# of graphs in all), outside the attention kernel: computed inside it, the torch 2.11 flex lowering
# can meet their intermediate buffers unfrozen, and inlined into the mask function their expression
# tree makes compilation take minutes.
_words_compiled = torch.compile(_words_flat, dynamic=True, fullgraph=True)


def _words(fn, params: Tensor, B: int, H: int, Nq: int, Nk: int, q_len: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The row words ``(B, H, Nq)`` (two) and column words ``(Nk,)`` of one call, by ``fn``
    (:func:`_words_flat`, compiled or not); ``q_len`` is ``Nq`` as a 0-d int32 tensor."""
    rows = torch.arange(B * H * Nq, device=params.device, dtype=torch.int32)
    cols = torch.arange(Nk, device=params.device, dtype=torch.int32)
    r1, r2, c = fn(params, rows, q_len, cols)
    return r1.view(B, H, Nq), r2.view(B, H, Nq), c
_LIB.define("dropout_words(Tensor params, SymInt B, SymInt H, SymInt Nq, SymInt Nk) -> (Tensor, Tensor, Tensor)")
_LIB.impl("dropout_words", lambda params, B, H, Nq, Nk: _words(
    _words_flat, params, B, H, Nq, Nk, torch.tensor(Nq, dtype=torch.int32, device=params.device)),
    "CompositeExplicitAutograd")


@torch.library.register_fake("flexflash::dropout_words")
def _(params: Tensor, B, H, Nq, Nk) -> tuple[Tensor, Tensor, Tensor]:
    row = params.new_empty((B, H, Nq))
    return row, params.new_empty((B, H, Nq)), params.new_empty((Nk,))


def _dropout_words(params: Tensor, B: int, H: int, Nq: int, Nk: int, device: torch.device,
                   offsets: tuple[int, int, int, int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Row words ``(B, H, Nq)`` (two) and column words ``(Nk,)`` of the dropout hash for one call.
    With ``offsets = (b0, h0, q0, heads)`` the call is a shard of a larger one (flexflash.parallel):
    the rows are those of the larger call's global indices."""
    if offsets is not None:
        b0, h0, q0, heads = offsets
        b, h, i, _ = tile_grids(B, H, q0, q0 + Nq, 0, 1, device)
        r1, r2 = dropout.row_words(params, heads, b[..., 0] + b0, h[..., 0] + h0, i[..., 0])
        c = dropout.column_word(params, torch.arange(Nk, device=device, dtype=torch.int32))
        shape = (B, H, Nq)
        return r1.expand(shape).contiguous(), r2.expand(shape).contiguous(), c
    if torch.compiler.is_compiling():
        # In a caller's graph, as an operator of flexflash's own: computed in the graph, torch
        # 2.11's FlexAttention lowering met the words' buffers unfrozen ("convert FlexibleLayout
        # to FixedLayout first"); an operator's outputs are buffers of fixed layout.
        return torch.ops.flexflash.dropout_words(params, B, H, Nq, Nk)
    fn = _words_compiled if device.type == "cuda" else _words_flat
    return _words(fn, params, B, H, Nq, Nk, _scalar_tensor(Nq, torch.int32, device))
