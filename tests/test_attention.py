"""flexflash.attention against the reference: every modifier, forward (compiled FlexAttention on
CPU) and backward (the memory-bounded path on CPU), odd lengths, GQA/MQA, fp32 and bf16, and the
invariants of SPEC §8."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flexflash
from flexflash import mods

from .helpers import check_against_reference, randn, seed_of

LENGTHS = [1, 17, 97, 130, 300]


def case_kwargs(case: str, B: int, H: int, Nq: int, Nk: int, gen: torch.Generator, grad: bool = False) -> dict:
    """Keyword arguments of flexflash.attention for a named case (fresh tensors every call)."""
    off = Nk - Nq
    if case == "dense":
        return {}
    if case == "causal":
        return dict(causal=True)
    if case == "key_padding":
        return dict(mask=torch.rand(B, Nk, generator=gen) > 0.3)
    if case == "mask_4d":
        return dict(mask=torch.rand(B, 1, Nq, Nk, generator=gen) > 0.5)
    if case == "bias_3d":
        return dict(bias=torch.randn(H, Nq, Nk, generator=gen).requires_grad_(grad))
    if case == "causal_mask_bias":
        return dict(causal=True, mask=torch.rand(B, Nk, generator=gen) > 0.2,
                    bias=torch.randn(B, H, Nq, Nk, generator=gen).requires_grad_(grad))
    if case == "sliding_window":
        return dict(mask_mod=mods.sliding_window(24, offset=off))
    if case == "prefix_lm":
        return dict(mask_mod=mods.prefix_lm(torch.randint(0, Nk + 1, (B,), generator=gen), offset=off))
    if case == "document":
        ids = torch.sort(torch.randint(0, 4, (B, max(Nq, Nk)), generator=gen), dim=-1).values
        return dict(mask_mod=mods.document(ids[:, :Nq], ids[:, :Nk]))
    if case == "alibi_causal":
        return dict(causal=True, score_mod=mods.alibi(H))
    if case == "softcap_bias":
        return dict(score_mod=mods.tanh_softcap(2.0), bias=torch.randn(Nq, Nk, generator=gen).requires_grad_(grad))
    if case == "window_or_prefix":
        return dict(mask_mod=mods.or_masks(mods.sliding_window(8, offset=off), mods.prefix_lm(5)))
    raise KeyError(case)


CASES = ["dense", "causal", "key_padding", "mask_4d", "bias_3d", "causal_mask_bias", "sliding_window",
         "prefix_lm", "document", "alibi_causal", "softcap_bias", "window_or_prefix"]


def inputs(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, gen, grad=False, mqa=False):
    q = randn(B, Hq, Nq, D, dtype=dtype, gen=gen, grad=grad)
    kv_shape = (B, Nk) if mqa else (B, Hkv, Nk)
    k = randn(*kv_shape, D, dtype=dtype, gen=gen, grad=grad)
    v = randn(*kv_shape, Dv, dtype=dtype, gen=gen, grad=grad)
    return q, k, v


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("Nq,Nk", [(97, 130), (130, 97)])
def test_forward_every_modifier(case, Nq, Nk):
    gen = torch.Generator().manual_seed(seed_of(case, Nq))
    q, k, v = inputs(2, 4, 2, Nq, Nk, 32, 32, torch.float32, gen)
    with torch.no_grad():
        check_against_reference(q, k, v, grads=False, **case_kwargs(case, 2, 4, Nq, Nk, gen))


@pytest.mark.parametrize("case", CASES)
def test_backward_every_modifier(case):
    gen = torch.Generator().manual_seed(seed_of(case))
    q, k, v = inputs(2, 4, 2, 97, 130, 32, 16, torch.float32, gen, grad=True)
    check_against_reference(q, k, v, block_size=(32, 64), **case_kwargs(case, 2, 4, 97, 130, gen, grad=True))


@given(
    case=st.sampled_from(["dense", "causal", "key_padding", "causal_mask_bias", "sliding_window", "alibi_causal"]),
    B=st.integers(1, 3),
    heads=st.sampled_from([(2, 2), (4, 2), (4, 1), (2, "mqa")]),
    Nq=st.sampled_from(LENGTHS),
    Nk=st.sampled_from(LENGTHS),
    D=st.sampled_from([16, 32, 64, 80]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_against_reference(case, B, heads, Nq, Nk, D, dtype, grad, seed):
    gen = torch.Generator().manual_seed(seed)
    Hq, Hkv = heads
    mqa = Hkv == "mqa"
    q, k, v = inputs(B, Hq, 1 if mqa else Hkv, Nq, Nk, D, D, dtype, gen, grad=grad, mqa=mqa)
    kw = case_kwargs(case, B, Hq, Nq, Nk, gen, grad=grad)
    if grad:
        check_against_reference(q, k, v, **kw)
    else:
        with torch.no_grad():
            check_against_reference(q, k, v, grads=False, **kw)


def test_bottom_right_causal_alignment():
    # Nq=2, Nk=5: query 0 sees keys 0..3, query 1 sees all five (FlashAttention >= 2.1).
    q = torch.zeros(1, 1, 2, 4)
    k = torch.zeros(1, 1, 5, 4)
    v = torch.eye(5)[None, None, :, :]  # out rows = attention probabilities
    with torch.no_grad():
        out = flexflash.attention(q, k, v, causal=True)
    expected = torch.tensor([[0.25, 0.25, 0.25, 0.25, 0.0], [0.2] * 5])
    torch.testing.assert_close(out[0, 0], expected)


@pytest.mark.parametrize("grad", [False, True])
def test_result_independent_of_block_size(grad):
    gen = torch.Generator().manual_seed(1)
    q, k, v = inputs(2, 2, 2, 130, 300, 32, 32, torch.float32, gen, grad=grad)
    kw = dict(causal=True, mask=torch.rand(2, 300, generator=gen) > 0.3)
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        outs = [flexflash.attention(q, k, v, block_size=bs, **kw) for bs in (None, 32, (16, 64))]
    for out in outs[1:]:
        # Same arithmetic up to summation order across tiles.
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=2e-6)


def test_batch_invariance():
    gen = torch.Generator().manual_seed(2)
    q, k, v = inputs(3, 4, 2, 97, 130, 32, 32, torch.float32, gen)
    mask = torch.rand(3, 130, generator=gen) > 0.3
    with torch.no_grad():
        whole = flexflash.attention(q, k, v, causal=True, mask=mask)
        parts = [flexflash.attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], causal=True, mask=mask[i:i + 1]) for i in range(3)]
    torch.testing.assert_close(whole, torch.cat(parts), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("grad", [False, True])
def test_masked_keys_have_no_influence(grad):
    gen = torch.Generator().manual_seed(3)
    q, k, v = inputs(2, 2, 2, 97, 130, 32, 32, torch.float32, gen)
    mask = torch.rand(2, 130, generator=gen) > 0.4
    padded = ~mask[:, None, :, None]  # (B, 1, Nk, 1)
    # Huge values at padded keys: any leak of their probability or value would dominate the output.
    k2, v2 = k.masked_fill(padded, 1e4), v.masked_fill(padded, -1e4)
    ctx = torch.enable_grad() if grad else torch.no_grad()
    q = q.requires_grad_(grad)
    with ctx:
        a = flexflash.attention(q, k, v, mask=mask)
        b = flexflash.attention(q, k2, v2, mask=mask)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("grad", [False, True])
def test_fully_masked_rows_are_zero_with_zero_grads(grad):
    gen = torch.Generator().manual_seed(4)
    q, k, v = inputs(2, 2, 2, 40, 50, 16, 16, torch.float32, gen, grad=grad)
    bias = torch.randn(40, 50, generator=gen)
    bias[:7] = float("-inf")  # rows 0..6 masked through the bias ...
    mask = torch.ones(2, 1, 40, 50, dtype=torch.bool)
    mask[:, :, 30:] = False  # ... rows 30..39 through the mask
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        out, lse = flexflash.attention(q, k, v, mask=mask, bias=bias, return_lse=True)
    assert torch.isfinite(out).all()
    assert (out[:, :, :7] == 0).all() and (out[:, :, 30:] == 0).all()
    assert torch.isneginf(lse[:, :, :7]).all() and torch.isneginf(lse[:, :, 30:]).all()
    assert torch.isfinite(lse[:, :, 7:30]).all()
    if grad:
        dq, dk, dv = torch.autograd.grad(out.sum(), [q, k, v])
        assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
        assert (dq[:, :, :7] == 0).all() and (dq[:, :, 30:] == 0).all()


def test_lse_matches_reference_and_gradient_flows_through_it():
    gen = torch.Generator().manual_seed(5)
    q, k, v = inputs(1, 2, 2, 33, 65, 16, 16, torch.float32, gen, grad=True)
    out, lse = flexflash.attention(q, k, v, causal=True, return_lse=True)
    ro, rl = flexflash.reference.attention(q, k, v, causal=True, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 33)
    torch.testing.assert_close(lse, rl)
    g1 = torch.autograd.grad(lse.sum(), q)[0]
    g2 = torch.autograd.grad(rl.sum(), q)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)


def test_backends_agree_and_flex_raises_where_it_cannot_run():
    gen = torch.Generator().manual_seed(6)
    q, k, v = inputs(1, 2, 2, 17, 33, 16, 16, torch.float32, gen)
    with torch.no_grad():
        a = flexflash.attention(q, k, v, causal=True, backend="flex")
        b = flexflash.attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(a, b)
    with pytest.raises(NotImplementedError, match="backend='flex'"):
        flexflash.attention(q.requires_grad_(), k, v, backend="flex")
    with pytest.raises(NotImplementedError, match="backend='flex'"):
        with torch.no_grad():
            flexflash.attention(q, k, v, backend="flex", return_lse=True)


def test_cpu_training_path_is_announced_once(recwarn):
    import flexflash.functional as fn
    fn._NOTED.discard("cpu-chunked")
    gen = torch.Generator().manual_seed(7)
    q, k, v = inputs(1, 1, 1, 8, 8, 8, 8, torch.float32, gen, grad=True)
    import warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        flexflash.attention(q, k, v, mask_mod=mods.sliding_window(3))  # training with a mask_mod: the tiles
        flexflash.attention(q, k, v, mask_mod=mods.sliding_window(3))
    notes = [w for w in seen if "memory-bounded" in str(w.message)]
    assert len(notes) == 1


def test_empty_problems():
    q = torch.randn(2, 2, 0, 8)
    k = torch.randn(2, 2, 5, 8)
    assert flexflash.attention(q, k, k).shape == (2, 2, 0, 8)
    q = torch.randn(2, 2, 3, 8, requires_grad=True)
    k0 = torch.randn(2, 2, 0, 8)
    out, lse = flexflash.attention(q, k0, k0, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    # Rows that see nothing have zero, finite gradients.
    (dq,) = torch.autograd.grad(out.sum(), [q])
    assert (dq == 0).all()
    # An empty batch: an empty output of the right shape, forward and backward.
    q = torch.randn(0, 2, 3, 8, requires_grad=True)
    out = flexflash.attention(q, torch.randn(0, 2, 5, 8), torch.randn(0, 2, 5, 8), causal=True)
    assert out.shape == (0, 2, 3, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape
