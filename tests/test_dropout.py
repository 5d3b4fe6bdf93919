"""Attention dropout (SPEC §2): exactness against the reference on the same seed, the identity-V
check of the dropped probabilities, dV = P'^T dO, hash statistics, determinism and freshness.

On CPU dropout runs on the memory-bounded path; the two-pass FlexAttention scheme used on CUDA
is checked here too, run eagerly (uncompiled FlexAttention, forward only: it has no CPU backward),
and compiled on the GPU in test_gpu.py."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import flexflash
from flexflash import _flex, _kernels, dropout, mods
from flexflash.reference import index_grids

from .helpers import check_against_reference, seed_of
from .test_attention import case_kwargs, inputs

DROP_CASES = ["dense", "causal", "key_padding", "bias_3d", "causal_mask_bias", "sliding_window", "document",
              "alibi_causal", "softcap_bias"]


def _probs(q, k, **kw):
    """The undropped attention probabilities (B, H, Nq, Nk), through an identity value."""
    Nk = k.shape[-2]
    eye = torch.eye(Nk, dtype=q.dtype).expand(*k.shape[:-1], Nk)
    with torch.no_grad():
        return flexflash.reference.attention(q, k, eye, **kw)


def _dropped_probs(q, k, p, seed, **kw):
    """flexflash's P' = P * keep / (1 - p) for seed ``seed``, through an identity value."""
    Nk = k.shape[-2]
    eye = torch.eye(Nk, dtype=q.dtype).expand(*k.shape[:-1], Nk)
    torch.manual_seed(seed)
    with torch.no_grad():
        return flexflash.attention(q, k, eye, dropout_p=p, **kw)


# --- exactness against the reference ---------------------------------------------------------

@pytest.mark.parametrize("case", DROP_CASES)
def test_matches_reference_on_the_same_seed(case):
    gen = torch.Generator().manual_seed(seed_of("drop", case))
    q, k, v = inputs(2, 4, 2, 97, 130, 32, 16, torch.float32, gen, grad=True)
    kw = case_kwargs(case, 2, 4, 97, 130, gen, grad=True)
    check_against_reference(q, k, v, dropout_p=0.25, dropout_seed=seed_of(case), block_size=(32, 64), **kw)


@given(
    case=st.sampled_from(DROP_CASES),
    B=st.integers(1, 3),
    heads=st.sampled_from([(2, 2), (4, 2), (4, 1), (2, "mqa")]),
    Nq=st.sampled_from([1, 17, 97, 130]),
    Nk=st.sampled_from([1, 17, 97, 130]),
    p=st.sampled_from([0.05, 0.3, 0.9]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    grad=st.booleans(),
    return_lse=st.booleans(),
    seed=st.integers(0, 2**16),
)
# Found by Hypothesis: one key, bf16, dropout scaling: the memory-bounded backward took its softmax
# term from the bf16-rounded output.
@example(case="dense", B=1, heads=(2, 2), Nq=17, Nk=1, p=0.05, dtype=torch.bfloat16, grad=True,
         return_lse=False, seed=0)
def test_property_against_reference(case, B, heads, Nq, Nk, p, dtype, grad, return_lse, seed):
    gen = torch.Generator().manual_seed(seed)
    Hq, Hkv = heads
    mqa = Hkv == "mqa"
    q, k, v = inputs(B, Hq, 1 if mqa else Hkv, Nq, Nk, 16, 16, dtype, gen, grad=grad, mqa=mqa)
    kw = case_kwargs(case, B, Hq, Nq, Nk, gen, grad=grad)
    if not return_lse:
        if grad:
            check_against_reference(q, k, v, dropout_p=p, dropout_seed=seed, block_size=(16, 32), **kw)
        else:
            with torch.no_grad():
                check_against_reference(q, k, v, grads=False, dropout_p=p, dropout_seed=seed, **kw)
        return
    # The lse is that of the undropped attention, whatever was dropped.
    torch.manual_seed(seed)
    with torch.no_grad():
        _, lse = flexflash.attention(q, k, v, dropout_p=p, return_lse=True, **kw)
        _, want = flexflash.reference.attention(q, k, v, return_lse=True, **kw)
    torch.testing.assert_close(lse, want)


def test_two_pass_flex_scheme_matches_reference():
    """The CUDA scheme (kept pass + log-sum-exp pass, out = out' exp(L' - L) / (1 - p)), run with
    uncompiled FlexAttention: same entries dropped, same output, same lse as the reference."""
    from flexflash._checks import normalize

    gen = torch.Generator().manual_seed(11)
    q, k, v = inputs(2, 4, 2, 97, 130, 32, 16, torch.float32, gen)
    cases = [dict(), dict(causal=True, bias=torch.randn(4, 97, 130, generator=gen)),
             dict(mask_mod=mods.sliding_window(24, offset=33), score_mod=mods.alibi(4)),
             dict(mask=torch.rand(2, 130, generator=gen) > 0.5)]
    eager = _kernels._Kernel._compile
    _kernels._Kernel._compile = lambda self: _kernels._flex_kernel  # run the body uncompiled
    try:
        for kw in cases:
            prob = normalize(q, k, v, mask=kw.get("mask"), bias=kw.get("bias"), scale=None, dropout_p=0.4,
                             block_size=None, backend="auto")
            torch.manual_seed(3)
            params = dropout.draw_seed(0.4, "cpu")
            with torch.no_grad():
                out, lse = _flex.run_flex(
                    prob.q, prob.k, prob.v, causal=kw.get("causal", False), mask=prob.mask, bias=prob.bias,
                    mask_mod=kw.get("mask_mod"), score_mod=kw.get("score_mod"), scale=prob.scale, block=(32, 64),
                    kernel_options=None, return_lse=True, dropout=dropout.Draw(0.4, params))
                torch.manual_seed(3)
                ref, ref_lse = flexflash.reference.attention(q, k, v, dropout_p=0.4, return_lse=True, **kw)
            # fp32 throughout: differences are summation order only.
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=5e-6)
            torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=5e-6)
    finally:
        _kernels._Kernel._compile = eager
        _flex.reset()


# --- the dropped probabilities themselves ----------------------------------------------------

@pytest.mark.parametrize("p", [0.1, 0.5])
def test_identity_value_rows_are_zero_or_scaled_probabilities(p):
    gen = torch.Generator().manual_seed(12)
    q, k, _ = inputs(2, 3, 3, 40, 64, 16, 16, torch.float64, gen)
    kw = dict(causal=True, mask=torch.rand(2, 64, generator=gen) > 0.2)
    P = _probs(q, k, **kw)
    dropped = _dropped_probs(q, k, p, seed=7, **kw)
    zero = dropped == 0
    # Every entry is either exactly 0 or P / (1 - p) (to fp64 rounding) ...
    torch.testing.assert_close(dropped[~zero], (P / (1 - p))[~zero], rtol=1e-12, atol=0)
    # ... the zeros are the masked entries plus a fraction p of the allowed ones ...
    allowed = P > 0
    dropped_fraction = (zero & allowed).sum().item() / allowed.sum().item()
    n = allowed.sum().item()
    assert abs(dropped_fraction - p) < 5 * math.sqrt(p * (1 - p) / n)
    # ... and they are exactly the entries that flexflash.dropout.keep rejects for this seed.
    torch.manual_seed(7)
    params = dropout.draw_seed(p, "cpu")
    keep = dropout.keep(params, 3, *index_grids(2, 3, 40, 64, "cpu"))
    assert torch.equal(zero & allowed, ~keep & allowed)


def test_value_gradient_is_dropped_probabilities_transposed_times_grad():
    gen = torch.Generator().manual_seed(13)
    q, k, v = inputs(2, 2, 2, 33, 48, 16, 8, torch.float64, gen)
    v.requires_grad_(True)
    kw = dict(causal=True, bias=torch.randn(33, 48, generator=gen, dtype=torch.float64))
    dropped = _dropped_probs(q, k, 0.3, seed=5, **kw)  # P' (B, H, Nq, Nk)
    torch.manual_seed(5)
    out = flexflash.attention(q, k, v, dropout_p=0.3, block_size=(16, 16), **kw)
    d_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (dv,) = torch.autograd.grad(out, v, d_out)
    torch.testing.assert_close(out, dropped @ v.detach())  # the forward pass uses that same P'
    torch.testing.assert_close(dv, dropped.transpose(-1, -2) @ d_out)


def test_mean_over_draws_is_the_undropped_attention():
    # 512 batch entries with identical inputs draw 512 independent masks: their mean output is the
    # undropped output within sampling error.
    gen = torch.Generator().manual_seed(14)
    q, k, v = inputs(1, 2, 2, 16, 24, 8, 8, torch.float64, gen)
    q, k, v = (t.expand(512, *t.shape[1:]) for t in (q, k, v))
    torch.manual_seed(0)
    with torch.no_grad():
        out = flexflash.attention(q, k, v, dropout_p=0.2)
        want = flexflash.reference.attention(q[:1], k[:1], v[:1])
    std = out.std(dim=0) / math.sqrt(512)
    assert ((out.mean(dim=0) - want[0]).abs() <= 5 * std + 1e-12).all()


# --- determinism and freshness ---------------------------------------------------------------

def test_seeded_calls_repeat_and_unseeded_calls_differ():
    gen = torch.Generator().manual_seed(15)
    q, k, _ = inputs(2, 2, 2, 32, 32, 8, 8, torch.float32, gen)
    a = _dropped_probs(q, k, 0.5, seed=1)
    b = _dropped_probs(q, k, 0.5, seed=1)
    assert torch.equal(a, b)
    torch.manual_seed(1)
    eye = torch.eye(32).expand(2, 2, 32, 32)
    with torch.no_grad():
        first = flexflash.attention(q, k, eye, dropout_p=0.5)
        second = flexflash.attention(q, k, eye, dropout_p=0.5)
    assert torch.equal(first, a)
    assert not torch.equal(first == 0, second == 0)


def test_masks_differ_across_heads_batch_entries_and_seeds():
    gen = torch.Generator().manual_seed(16)
    q, k, _ = inputs(1, 1, 1, 32, 32, 8, 8, torch.float32, gen)
    q, k = q.expand(3, 4, 32, 8), k.expand(3, 4, 32, 8)  # identical inputs in every (b, h)
    zero = _dropped_probs(q, k, 0.5, seed=2) == 0  # (3, 4, 32, 32)
    flat = zero.reshape(12, -1).float()
    agreement = (flat[:, None] == flat[None]).float().mean(-1)  # (12, 12)
    off_diagonal = agreement[~torch.eye(12, dtype=torch.bool)]
    # Independent masks at p = 0.5 agree on half of their 1024 entries (sd 1.6%).
    assert (off_diagonal - 0.5).abs().max() < 0.1
    other = _dropped_probs(q, k, 0.5, seed=3) == 0
    assert ((other == zero).float().mean() - 0.5).abs() < 0.05


def test_zero_dropout_draws_nothing():
    gen = torch.Generator().manual_seed(17)
    q, k, v = inputs(1, 2, 2, 8, 8, 8, 8, torch.float32, gen)
    state = torch.get_rng_state()
    with torch.no_grad():
        a = flexflash.attention(q, k, v, dropout_p=0.0)
    assert torch.equal(state, torch.get_rng_state())
    torch.testing.assert_close(a, flexflash.reference.attention(q, k, v))


def test_cpu_flex_backend_refuses_dropout():
    gen = torch.Generator().manual_seed(18)
    q, k, v = inputs(1, 2, 2, 8, 8, 8, 8, torch.float32, gen)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="dropout_p=0.1"):
        flexflash.attention(q, k, v, dropout_p=0.1, backend="flex")


# --- hash statistics -------------------------------------------------------------------------

def _keep(p, B, H, Nq, Nk, *, b0=0, h0=0, q0=0, k0=0, num_heads=None, seed=0):
    torch.manual_seed(seed)
    params = dropout.draw_seed(p, "cpu")
    b, h, i, j = index_grids(B, H, Nq, Nk, "cpu", q_start=q0, kv_start=k0)
    return dropout.keep(params, num_heads or H + h0, b + b0, h + h0, i, j)


def _z(count: float, n: int, prob: float) -> float:
    return (count - n * prob) / math.sqrt(n * prob * (1 - prob))


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.9])
def test_dropped_fraction_is_p(p):
    keep = _keep(p, 4, 8, 256, 256)
    n = keep.numel()  # 2M draws
    assert abs(_z((~keep).sum().item(), n, p)) < 5


def test_fraction_is_uniform_across_rows_columns_heads_and_batches():
    """Chi-square over groups: each row, column, head and batch entry drops a binomial share."""
    p = 0.3
    keep = _keep(p, 4, 8, 256, 256).float()  # (4, 8, 256, 256)
    for dims, name in [((0, 1, 3), "rows"), ((0, 1, 2), "columns"), ((0, 2, 3), "heads"), ((1, 2, 3), "batches")]:
        drops = (1 - keep).sum(dim=dims)
        per_group = keep.numel() // drops.numel()
        expected = per_group * p
        chi2 = (((drops - expected) ** 2) / (per_group * p * (1 - p))).sum().item()
        dof = drops.numel()
        # chi2 ~ dof +- sqrt(2 dof): 6 sigma either way.
        assert abs(chi2 - dof) < 6 * math.sqrt(2 * dof) + 6, (name, chi2, dof)


def _max_abs_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().flatten(), b.float().flatten()
    a, b = a - a.mean(), b - b.mean()
    return abs((a * b).mean().item() / math.sqrt((a * a).mean().item() * (b * b).mean().item()))


@pytest.mark.parametrize("where", ["small", "beyond 65536", "near int32 max"])
def test_no_correlation_between_neighbours(where):
    """Neighbouring rows, columns, heads and batch entries, and rows 65,536 apart (a 16-bit wrap
    would repeat them), are uncorrelated; also for indices past 65,536 and near 2**31 and for
    B * H past 65,536."""
    starts = {"small": dict(),
              "beyond 65536": dict(q0=70_000, k0=1 << 17, b0=300, h0=65_000, num_heads=70_000),
              "near int32 max": dict(q0=(1 << 31) - 300, k0=(1 << 31) - 300, b0=(1 << 15), h0=(1 << 15),
                                     num_heads=1 << 16)}[where]
    keep = _keep(0.5, 2, 4, 256, 256, **starts)  # 524k entries, correlation sd 0.0014-0.003
    bound = 6 / math.sqrt(keep[..., 1:, :].numel())
    assert _max_abs_correlation(keep[..., 1:, :], keep[..., :-1, :]) < bound  # rows
    assert _max_abs_correlation(keep[..., 1:], keep[..., :-1]) < bound  # columns
    assert _max_abs_correlation(keep[:, 1:], keep[:, :-1]) < 6 / math.sqrt(keep[:, 1:].numel())  # heads
    assert _max_abs_correlation(keep[1:], keep[:-1]) < 6 / math.sqrt(keep[1:].numel())  # batch
    if where != "near int32 max":
        far = _keep(0.5, 2, 4, 256, 256, **{**starts, "q0": starts.get("q0", 0) + 65_536})
        assert _max_abs_correlation(keep, far) < 6 / math.sqrt(keep.numel())


def test_runs_along_rows_match_independent_draws():
    """Wald-Wolfowitz: the number of runs of kept/dropped entries along each row is that of i.i.d.
    draws (too few runs = clumping, too many = alternation)."""
    p = 0.4
    keep = _keep(p, 2, 4, 128, 1024)
    changes = (keep[..., 1:] != keep[..., :-1]).sum().item()
    n = keep[..., 1:].numel()
    assert abs(_z(changes, n, 2 * p * (1 - p))) < 5


def test_no_repeated_rows_in_a_large_mask():
    # 2**16 rows of 256 keys (b * H + h and the query index both large): all distinct.
    keep = _keep(0.5, 2, 8, 4096, 256, q0=60_000)
    rows = keep.reshape(-1, 256)
    packed = (rows.reshape(-1, 4, 64).long() << torch.arange(64)).sum(-1)  # 4 x 64-bit words per row
    assert torch.unique(packed, dim=0).shape[0] == rows.shape[0]
