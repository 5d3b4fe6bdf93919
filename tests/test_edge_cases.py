"""Edge cases of layout and values: views and strides, partial gradients, broadcast (stride-0)
masks and biases, extreme biases, non-finite values confined to their batch entry, large logits in
half precision, single tokens. Each against the reference (the helpers compare to float64)."""

from __future__ import annotations

import pytest
import torch

import flexflash

from .helpers import check_against_reference, randn


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("grad", [False, True])
def test_transposed_and_sliced_views(grad):
    """q/k/v as (B, N, H, D) transposed to (B, H, N, D), and a slice with a stride in N."""
    g = _gen(1)
    q = torch.randn(2, 37, 4, 16, generator=g).transpose(1, 2)
    k = torch.randn(2, 106, 2, 16, generator=g).transpose(1, 2)[:, :, ::2]  # (2, 2, 53, 16), strided
    v = torch.randn(2, 53, 2, 16, generator=g).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    q, k, v = (t.requires_grad_(grad) for t in (q, k, v))
    with torch.set_grad_enabled(grad):
        check_against_reference(q, k, v, causal=True, grads=grad)


def test_gradients_for_only_some_inputs():
    g = _gen(2)
    q = randn(2, 4, 37, 16, gen=g, grad=True)
    k, v = randn(2, 2, 53, 16, gen=g), randn(2, 2, 53, 16, gen=g)
    check_against_reference(q, k, v, causal=True)
    out = flexflash.attention(q, k, v, causal=True)
    (dq,) = torch.autograd.grad(out.sum(), [q])
    assert dq.shape == q.shape and k.grad is None and v.grad is None


@pytest.mark.parametrize("grad", [False, True])
def test_expanded_masks_and_biases(grad):
    """Stride-0 (expanded) masks and biases behave as their materialised copies; a bias expanded from
    a smaller leaf gets its gradient summed back to the leaf's shape."""
    g = _gen(3)
    q, k, v = randn(2, 4, 37, 16, gen=g, grad=grad), randn(2, 2, 53, 16, gen=g, grad=grad), randn(2, 2, 53, 16, gen=g, grad=grad)
    mask = (torch.rand(2, 1, 1, 53, generator=g) > 0.3).expand(2, 4, 37, 53)
    leaf = torch.randn(1, 4, 1, 53, generator=g).requires_grad_(grad)
    bias = leaf.expand(2, 4, 37, 53)
    assert mask.stride()[1:3] == (0, 0) and bias.stride()[0] == 0
    with torch.set_grad_enabled(grad):
        check_against_reference(q, k, v, mask=mask, bias=bias, grads=grad)
        if grad:
            out = flexflash.attention(q, k, v, mask=mask, bias=bias)
            (got,) = torch.autograd.grad(out.sum(), [leaf])
            want_out = flexflash.reference.attention(q.double(), k.double(), v.double(), mask=mask,
                                                     bias=leaf.double().expand(2, 4, 37, 53))
            (want,) = torch.autograd.grad(want_out.sum(), [leaf])
            assert got.shape == leaf.shape
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # fp32 sums of 37 x 2 rows


@pytest.mark.parametrize("grad", [False, True])
def test_extreme_biases(grad):
    """-inf entries mask; very large finite biases dominate without overflow (softmax subtracts the
    row maximum): the row attends (almost) only to the key with the large bias."""
    g = _gen(4)
    q, k, v = randn(1, 2, 9, 16, gen=g, grad=grad), randn(1, 2, 12, 16, gen=g, grad=grad), randn(1, 2, 12, 16, gen=g, grad=grad)
    bias = torch.zeros(9, 12)
    bias[:, 5] = float("-inf")
    bias[3, 7] = 1e30
    bias[4, :6] = -1e30
    with torch.set_grad_enabled(grad):
        out = flexflash.attention(q, k, v, bias=bias)
        check_against_reference(q, k, v, bias=bias, grads=grad)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, 3], v[:, :, 7].detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("grad", [False, True])
def test_non_finite_values_stay_in_their_batch_entry(grad):
    g = _gen(5)
    q, k, v = randn(3, 2, 17, 16, gen=g), randn(3, 2, 19, 16, gen=g), randn(3, 2, 19, 16, gen=g)
    q[1, 0, 4] = float("nan")
    k[1, 1, 2] = float("inf")
    v[1, 0, 0] = float("nan")
    q, k, v = (t.requires_grad_(grad) for t in (q, k, v))
    with torch.set_grad_enabled(grad):
        out = flexflash.attention(q, k, v, causal=True)
        clean = flexflash.attention(q[[0, 2]], k[[0, 2]], v[[0, 2]], causal=True)
    torch.testing.assert_close(out[[0, 2]], clean)
    assert torch.isfinite(out[[0, 2]]).all()
    if grad:
        dq, dk, dv = torch.autograd.grad(out[[0, 2]].sum(), [q, k, v])
        assert all(torch.isfinite(t[[0, 2]]).all() for t in (dq, dk, dv))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_logits_in_half_precision(dtype):
    """Scores far beyond exp's range (here up to about 4e3) stay finite: the kernel works with
    scores minus their row maximum, in fp32."""
    g = _gen(6)
    q = (torch.randn(1, 2, 33, 16, generator=g) * 30).to(dtype)
    k = (torch.randn(1, 2, 41, 16, generator=g) * 30).to(dtype)
    v = torch.randn(1, 2, 41, 16, generator=g).to(dtype)
    with torch.no_grad():
        out = flexflash.attention(q, k, v, causal=True)
        check_against_reference(q, k, v, causal=True, grads=False)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("Nq,Nk", [(1, 1), (1, 100), (100, 1)])
@pytest.mark.parametrize("grad", [False, True])
def test_single_tokens(Nq, Nk, grad):
    g = _gen(Nq * 1000 + Nk)
    q, k, v = randn(2, 4, Nq, 16, gen=g, grad=grad), randn(2, 2, Nk, 16, gen=g, grad=grad), randn(2, 2, Nk, 16, gen=g, grad=grad)
    with torch.set_grad_enabled(grad):
        check_against_reference(q, k, v, causal=True, grads=grad)
        check_against_reference(q, k, v, mask=torch.rand(2, Nk, generator=g) > 0.2, grads=grad)


def test_float64_on_cpu_runs_an_exact_path_and_flex_says_why():
    """float64 CPU calls under "auto" (no gradients) take the exact memory-bounded path, which
    computes in float64 (FlexAttention's CPU kernel takes float32/16 and bfloat16: calling it
    raised Inductor's LoweringException); backend="flex" refuses with the dtype named; a module
    converted with .double() runs in eval mode."""
    g = _gen(21)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for n in (19, 23, 23))
    mask = torch.rand(2, 23, generator=g) > 0.3
    plan = flexflash.explain(q, k, v, mask=mask, causal=True)
    assert plan.path == "memory-bounded" and "float64" in plan.reasons["flex"]
    out = flexflash.attention(q, k, v, mask=mask, causal=True)
    assert out.dtype == torch.float64
    # both compute in float64: only the summation order differs
    torch.testing.assert_close(out, flexflash.reference.attention(q, k, v, mask=mask, causal=True), rtol=1e-12, atol=1e-12)
    with pytest.raises(NotImplementedError, match="backend='flex'.*float64"):
        flexflash.attention(q, k, v, backend="flex")
    mha = flexflash.FlashMHA(embed_dim=16, num_heads=2).double().eval()
    x = torch.randn(2, 11, 16, generator=g, dtype=torch.float64)
    assert mha(x).dtype == torch.float64


def test_masks_and_biases_that_are_rows_of_a_larger_tensor_on_cpu():
    """Biases and masks sliced along the queries at successive offsets (views at growing storage
    offsets) agree with the reference on the compiled CPU path: their third offset used to fail
    to compile ("'cur_qSplitSize6' was not declared"), also through compat.chunked's
    FlashAttention with a 4-D float mask in eval mode."""
    g = _gen(22)
    q, k = torch.randn(2, 1, 13, 8, generator=g), torch.randn(2, 1, 9, 8, generator=g)
    big_bias = torch.randn(2, 1, 18, 9, generator=g)
    big_mask = torch.rand(2, 1, 18, 9, generator=g) > 0.3
    # float32 on both sides: differences are summation order only
    with torch.no_grad():
        for i in range(4):
            for kw in (dict(bias=big_bias[..., i:i + 13, :]), dict(mask=big_mask[..., i:i + 13, :])):
                for backend in ("flex", "auto"):  # "auto": SDPA's CPU kernel takes one mask or bias alone
                    torch.testing.assert_close(flexflash.attention(q, k, k, backend=backend, **kw),
                                               flexflash.reference.attention(q, k, k, **kw), rtol=2e-5, atol=2e-6)
        from flexflash.compat.chunked import FlashAttention as Chunked
        m = Chunked(16, 2, 4).eval()
        x, ctx = torch.randn(2, 13, 16, generator=g), torch.randn(2, 9, 16, generator=g)
        float_mask = torch.randn(2, 2, 13, 9, generator=g)  # added to the scores
        out = m(ctx, ctx, x, mask=float_mask)
        ref_chunks = flexflash.ChunkedAttention(16, 2, 13)  # one chunk: no slicing
        ref_chunks.load_state_dict(m.state_dict())
        torch.testing.assert_close(out, ref_chunks.eval()(ctx, ctx, x, mask=float_mask), rtol=2e-5, atol=2e-6)
