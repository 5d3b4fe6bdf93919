"""flexflash.mods: argument validation, names, and each modifier's semantics on an index grid."""

from __future__ import annotations

import pytest
import torch

import flexflash
from flexflash import mods
from flexflash.reference import index_grids


def grid_mask(mod, B=2, H=3, Nq=6, Nk=9):
    return mod(*index_grids(B, H, Nq, Nk, torch.device("cpu"))).expand(B, H, Nq, Nk)


def test_causal_offsets():
    i, j = torch.arange(6)[:, None], torch.arange(9)[None]
    assert torch.equal(grid_mask(mods.causal())[0, 0], j <= i)
    assert torch.equal(grid_mask(mods.causal(offset=3))[0, 0], j <= i + 3)
    assert torch.equal(grid_mask(mods.causal(offset=torch.tensor(3)))[0, 0], j <= i + 3)
    assert mods.causal(offset=3).__name__ == "causal_offset3"


def test_sliding_window_and_prefix():
    i, j = torch.arange(6)[:, None], torch.arange(9)[None]
    m = grid_mask(mods.sliding_window(3, offset=3))[0, 0]
    assert torch.equal(m, (j <= i + 3) & (j > i + 3 - 3))
    assert m.sum(-1).tolist() == [3] * 6
    assert mods.sliding_window(128).__name__ == "sliding_window_128"
    assert torch.equal(grid_mask(mods.sliding_window(torch.tensor(3), offset=3)), grid_mask(mods.sliding_window(3, offset=3)))
    p = grid_mask(mods.prefix_lm(4))[0, 0]
    assert torch.equal(p, (j < 4) | (j <= i))
    per_batch = grid_mask(mods.prefix_lm(torch.tensor([0, 5])))
    assert torch.equal(per_batch[0, 0], j <= i) and torch.equal(per_batch[1, 0], (j < 5) | (j <= i))


def test_document_and_offsets():
    ids = torch.tensor([0, 0, 1, 1, 1, 2])
    m = grid_mask(mods.document(ids), Nq=6, Nk=6)[0, 0]
    assert torch.equal(m, ids[:, None] == ids[None])
    m2 = grid_mask(mods.document_from_offsets([0, 2, 5, 6]), Nq=6, Nk=6)[0, 0]
    assert torch.equal(m, m2)
    batched = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 2, 2]])
    mb = grid_mask(mods.document(batched), Nq=6, Nk=6)
    assert torch.equal(mb[1, 2], batched[1, :, None] == batched[1][None])


def test_key_padding_and_dense_mask():
    lengths = torch.tensor([3, 9])
    m = grid_mask(mods.key_padding(lengths))
    assert m[0].sum().item() == 3 * 3 * 6 and m[1].all()
    keep = torch.rand(2, 9) > 0.5
    assert torch.equal(grid_mask(mods.key_padding(mask=keep))[:, 0, 0], keep)
    dense = torch.rand(3, 6, 9) > 0.5
    assert torch.equal(grid_mask(mods.dense_mask(dense))[1], dense)


def test_scores():
    b, h, i, j = index_grids(1, 4, 5, 7, torch.device("cpu"))
    s = torch.zeros(1, 4, 5, 7)
    bias = torch.randn(4, 5, 7)
    assert torch.equal(mods.additive_bias(bias)(s, b, h, i, j)[0], bias)
    slopes = mods.alibi_slopes(4)
    torch.testing.assert_close(slopes, torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]))
    # Non-power of two (6 heads): the 4 geometric slopes, then every other slope of the 8-head set.
    torch.testing.assert_close(mods.alibi_slopes(6), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]))
    out = mods.alibi(4)(s, b, h, i, j)
    torch.testing.assert_close(out[0], -slopes[:, None, None] * (i - j).abs()[0, 0].float())
    # float64 scores take the bias in float64: with 16 heads the slopes 2**(-(h + 1) / 2) are not
    # float32 numbers (rounded to float32 they are 3e-8 off, relatively)
    b16, h16, i16, j16 = index_grids(1, 16, 5, 7, torch.device("cpu"))
    out64 = mods.alibi(16, offset=3)(torch.zeros(1, 16, 5, 7, dtype=torch.float64), b16, h16, i16, j16)
    exact = torch.tensor([2.0 ** (-(h + 1) / 2) for h in range(16)], dtype=torch.float64)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64[0], -exact[:, None, None] * (i16 + 3 - j16).abs()[0, 0].double(),
                               rtol=1e-15, atol=0)
    capped = mods.tanh_softcap(2.0)(torch.full((1, 4, 5, 7), 100.0), b, h, i, j)
    assert capped.max() <= 2.0


def test_composition():
    a, c = mods.causal(), mods.sliding_window(2)
    both = mods.and_masks(a, c)
    either = mods.or_masks(mods.prefix_lm(2), c)
    assert torch.equal(grid_mask(both), grid_mask(a) & grid_mask(c))
    assert torch.equal(grid_mask(either), grid_mask(mods.prefix_lm(2)) | grid_mask(c))
    assert both.__name__ == "and(causal,sliding_window_2)"
    b, h, i, j = index_grids(1, 2, 3, 3, torch.device("cpu"))
    f = mods.compose_scores(mods.additive_bias(torch.ones(3, 3)), mods.tanh_softcap(1.0))
    torch.testing.assert_close(f(torch.zeros(1, 2, 3, 3), b, h, i, j), torch.full((1, 2, 3, 3), torch.tanh(torch.tensor(1.0)).item()))


@pytest.mark.parametrize("call,exc,words", [
    (lambda: mods.sliding_window(0), ValueError, ["window", ">= 1", "0"]),
    (lambda: mods.sliding_window(2.5), TypeError, ["window", "float"]),
    (lambda: mods.sliding_window(torch.tensor(0)), ValueError, ["window", ">= 1", "0"]),
    (lambda: mods.sliding_window(torch.tensor([3, 4])), ValueError, ["window", "0-d", "(2,)"]),
    (lambda: mods.sliding_window(torch.tensor(3.0)), ValueError, ["window", "float32"]),
    (lambda: mods.causal(offset=1.5), TypeError, ["offset", "float"]),
    (lambda: mods.causal(offset=torch.tensor([1, 2])), ValueError, ["offset", "0-d"]),
    (lambda: mods.prefix_lm(-1), ValueError, ["prefix_len", "-1"]),
    (lambda: mods.document(torch.zeros(2, 2, 2, dtype=torch.long)), ValueError, ["doc_ids", "(2, 2, 2)"]),
    (lambda: mods.document(torch.zeros(4)), ValueError, ["doc_ids", "float32"]),
    (lambda: mods.document_from_offsets([1, 3]), ValueError, ["offsets", "starting at 0"]),
    (lambda: mods.key_padding(), ValueError, ["exactly one", "neither"]),
    (lambda: mods.key_padding(mask=torch.ones(2, 3)), ValueError, ["mask", "bool"]),
    (lambda: mods.dense_mask(torch.ones(2, 2)), ValueError, ["mask", "bool", "float32"]),
    (lambda: mods.additive_bias(torch.ones(2, 2, dtype=torch.long)), flexflash.DtypeError, ["bias", "int64"]),
    (lambda: mods.alibi(0), ValueError, ["num_heads", "0"]),
    (lambda: mods.tanh_softcap(0.0), ValueError, ["cap", "0.0"]),
    (lambda: mods.and_masks(), ValueError, ["and_masks", "at least one"]),
])
def test_factories_validate_arguments(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (2, 1, 1, 7), (1, 3, 5, 1), (1, 1, 5, 7), (1, 1, 1, 1)])
def test_squeezed_masks_and_biases_index_like_the_broadcast_tensor(shape):
    """The compiled CUDA kernels index a mask or bias by its full dimensions only (its broadcast
    dimensions squeezed out): the same entries as indexing the 4-D tensor with 0 in those."""
    from flexflash._compose import index_broadcast, squeeze_broadcast
    t = torch.randn(*shape)
    full = tuple(s > 1 for s in shape)
    grids = index_grids(2, 3, 5, 7, "cpu")
    want = index_broadcast(t, full, *grids)
    got = index_broadcast(squeeze_broadcast(t, full), full, *grids)
    assert torch.equal(got.expand(2, 3, 5, 7), want.expand(2, 3, 5, 7))
