"""The same checks on CUDA (skipped without a GPU): compiled FlexAttention forward and backward
for fp32/fp16/bf16, odd and unequal lengths, head dims 64/80/128, GQA/MQA, bias gradients."""

from __future__ import annotations

import pytest
import torch

import flexflash
from flexflash import _blockmask, _flex, _kernels, _kinds, mods

from .helpers import assert_close_to_golden, check_against_reference, randn, seed_of
from .test_attention import case_kwargs

pytestmark = pytest.mark.gpu



def _inputs(B, Hq, Hkv, Nq, Nk, D, dtype, gen, grad=True):
    return (randn(B, Hq, Nq, D, dtype=dtype, device="cuda", gen=gen, grad=grad),
            randn(B, Hkv, Nk, D, dtype=dtype, device="cuda", gen=gen, grad=grad),
            randn(B, Hkv, Nk, D, dtype=dtype, device="cuda", gen=gen, grad=grad))


def _to_cuda(kw):
    out = {}
    for name, val in kw.items():
        if isinstance(val, torch.Tensor):
            out[name] = val.detach().cuda().requires_grad_(val.requires_grad)
        else:
            out[name] = val
    return out


# Each (dtype, head dim) is its own compiled kernel; lengths within one reuse it.
DTYPE_DIMS = [(torch.bfloat16, 64), (torch.bfloat16, 80), (torch.bfloat16, 128), (torch.float16, 128),
              (torch.float32, 64), (torch.float16, 80)]


@pytest.mark.parametrize("dtype,D", DTYPE_DIMS)
@pytest.mark.parametrize("Nq,Nk", [(97, 1025), (1025, 97), (300, 300)])
def test_causal_forward_backward(dtype, Nq, Nk, D):
    gen = torch.Generator().manual_seed(Nq * 7 + D)
    q, k, v = _inputs(2, 4, 2, Nq, Nk, D, dtype, gen)
    check_against_reference(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", ["dense", "key_padding", "mask_4d", "bias_3d", "causal_mask_bias", "sliding_window",
                                  "prefix_lm", "document", "alibi_causal", "softcap_bias", "window_or_prefix"])
def test_every_modifier_forward_backward(dtype, case):
    gen = torch.Generator().manual_seed(seed_of(case))
    q, k, v = _inputs(2, 4, 2, 97, 1025, 64, dtype, gen)
    kw = case_kwargs(case, 2, 4, 97, 1025, gen, grad=True)
    kw = _to_cuda(kw)
    for name in ("mask_mod", "score_mod"):  # rebuild modifiers that capture tensors on the GPU
        if name in kw:
            kw[name] = _cuda_mod(case, gen)
    check_against_reference(q, k, v, **kw)


def _cuda_mod(case, gen):
    if case == "prefix_lm":
        return mods.prefix_lm(torch.randint(0, 1026, (2,), generator=gen).cuda(), offset=1025 - 97)
    if case == "document":
        ids = torch.sort(torch.randint(0, 4, (2, 1025), generator=gen), dim=-1).values.cuda()
        return mods.document(ids[:, :97], ids)
    return case_kwargs(case, 2, 4, 97, 1025, gen).get("mask_mod") or case_kwargs(case, 2, 4, 97, 1025, gen).get("score_mod")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mqa_and_lse(dtype):
    gen = torch.Generator().manual_seed(3)
    q = randn(2, 8, 130, 64, dtype=dtype, device="cuda", gen=gen, grad=True)
    k = randn(2, 130, 64, dtype=dtype, device="cuda", gen=gen, grad=True)
    v = randn(2, 130, 64, dtype=dtype, device="cuda", gen=gen, grad=True)
    check_against_reference(q, k, v, causal=True)
    out, lse = flexflash.attention(q, k, v, causal=True, return_lse=True)
    _, rl = flexflash.reference.attention(q, k, v, causal=True, return_lse=True)
    torch.testing.assert_close(lse, rl, rtol=1e-3, atol=1e-3)


def test_fully_masked_rows_on_gpu():
    gen = torch.Generator().manual_seed(4)
    q, k, v = _inputs(1, 2, 2, 64, 64, 64, torch.bfloat16, gen)
    mask = torch.ones(1, 1, 64, 64, dtype=torch.bool, device="cuda")
    mask[:, :, :10] = False
    bias = torch.zeros(64, 64, device="cuda")
    bias[50:] = float("-inf")
    out, lse = flexflash.attention(q, k, v, mask=mask, bias=bias, return_lse=True)
    assert (out[:, :, :10] == 0).all() and (out[:, :, 50:] == 0).all()
    assert torch.isneginf(lse[:, :, :10]).all() and torch.isneginf(lse[:, :, 50:]).all()
    dq, dk, dv = torch.autograd.grad(out.float().sum(), [q, k, v])
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert (dq[:, :, :10] == 0).all() and (dq[:, :, 50:] == 0).all()


def test_lengths_do_not_recompile_on_gpu():
    """Eight lengths of one case: for multiples of 128 (no boundary checks) and for the rest, a
    kernel of static shapes for the first length and one of symbolic shapes for every other; each
    compiles once (the first symbolic length is 128 or more, so no size-1 or single-block
    specialisation follows)."""
    before = flexflash.compile_stats()
    for n in (256, 384, 1000, 513, 2048, 300, 128, 4096):
        q = torch.randn(2, 4, n, 96, device="cuda", dtype=torch.bfloat16)  # a head dim no other test uses
        flexflash.attention(q, q, q, causal=True, mask=torch.rand(2, n, device="cuda") > 0.2)
    after = flexflash.compile_stats()
    assert after["kernels"] - before["kernels"] == 4, (before, after)
    assert after["compiles"] - before["compiles"] <= 4, (before, after)


def _assert_bounded_compilations_over_lengths(call, split=True):
    """``call(n)`` (one flexflash call of one kind at length n, after _flex.reset()) at eight
    lengths that are multiples of the tiles compiles one kernel, once, where its mask or bias is
    split (_kernel_layout); otherwise, and at six other lengths, one kernel per shape for the kind's
    first _STATIC_BUFFER_SHAPES shapes, then one for the rest. The kernel that takes the rest
    compiles its first shape as a kernel of static shapes of its own (_STATIC_FIRST_SHAPE)."""
    bounded = _kinds._STATIC_BUFFER_SHAPES + 2
    for n in (256, 384, 512, 640, 768, 896, 1024, 1152):
        call(n)
    stats = flexflash.compile_stats()
    kernels = 2 if split else bounded
    assert stats["kernels"] == kernels and stats["compiles"] == kernels, stats
    for n in (200, 300, 400, 500, 600, 700):
        call(n)
    stats = flexflash.compile_stats()
    assert stats["kernels"] == kernels + bounded and stats["compiles"] <= stats["kernels"], stats


@pytest.mark.parametrize("grad", [False, True])
def test_lengths_of_a_full_bias_compile_a_bounded_number_of_times_on_gpu(grad):
    """A (B, H, Nq, Nk) bias compiles once for all lengths that are multiples of the tiles (its key
    dimension reaches the kernel split in 16s, so symbolic lengths keep vector loads:
    _kernel_layout). At other lengths, and at every length where it needs its gradient (not split),
    it compiles with static shapes for the kind's first _STATIC_BUFFER_SHAPES shapes, then one
    kernel of symbolic shapes takes every further length. Every length agrees with the reference,
    the gradients too."""
    _flex.reset()
    gen = torch.Generator().manual_seed(seed_of("bias-lengths"))

    def call(n):
        q, k, v = (torch.randn(2, 2, n, 64, generator=gen).cuda().to(torch.bfloat16).requires_grad_(grad)
                   for _ in range(3))
        bias = torch.randn(2, 2, n, n, generator=gen).cuda().to(torch.bfloat16).requires_grad_(grad)
        out = flexflash.attention(q, k, v, causal=True, bias=bias)
        ref = flexflash.reference.attention(q, k, v, causal=True, bias=bias)
        inputs64 = [t.detach().double().requires_grad_(grad) for t in (q, k, v, bias)]
        golden = flexflash.reference.attention(*inputs64[:3], causal=True, bias=inputs64[3])
        assert_close_to_golden("out", out, ref, golden, torch.bfloat16)
        if grad:
            g = torch.randn(out.shape, generator=gen).cuda().to(torch.bfloat16)
            got = torch.autograd.grad(out, (q, k, v, bias), g)
            want = torch.autograd.grad(ref, (q, k, v, bias), g)
            gold = torch.autograd.grad(golden, inputs64, g.double())
            for name, a, b, c in zip(("dq", "dk", "dv", "dbias"), got, want, gold):
                assert_close_to_golden(name, a, b, c, torch.bfloat16)

    _assert_bounded_compilations_over_lengths(call, split=not grad)


def test_lengths_of_a_dense_bool_mask_compile_a_bounded_number_of_times_on_gpu():
    """A (1, 1, N, N) bool mask, like a bias: eight lengths that are multiples of the tiles share
    one kernel compiled once (its key dimension split in 16s); other lengths compile with static
    shapes for the kind's first shapes, then share one kernel of symbolic shapes."""
    _flex.reset()
    gen = torch.Generator().manual_seed(seed_of("mask-lengths"))

    def call(n):
        q = torch.randn(2, 2, n, 64, generator=gen).cuda().to(torch.bfloat16)
        mask = (torch.rand(1, 1, n, n, generator=gen) < 0.5).cuda()
        out = flexflash.attention(q, q, q, mask=mask)
        ref = flexflash.reference.attention(q, q, q, mask=mask)
        golden = flexflash.reference.attention(*(q.double(),) * 3, mask=mask)
        assert_close_to_golden("out", out, ref, golden, torch.bfloat16)

    _assert_bounded_compilations_over_lengths(call)


def _layout_kwargs(layout, B, H, Nq, Nk, gen):
    """Masks and biases of one layout each, full along the keys (those _kernel_layout splits); a
    bias requires grad unless the layout ends in "_nograd" (only those are split)."""
    grad = not layout.endswith("_nograd")
    layout = layout.removesuffix("_nograd")
    r = lambda *shape: torch.randn(*shape, generator=gen).cuda().to(torch.bfloat16).requires_grad_(grad)  # noqa: E731
    m = lambda *shape: (torch.rand(*shape, generator=gen) < 0.6).cuda()  # noqa: E731
    if layout == "bias_4d":
        return dict(bias=r(B, H, Nq, Nk))
    if layout == "bias_transposed":
        return dict(bias=r(B, H, Nk, Nq).transpose(-1, -2))
    if layout == "bias_sliced":  # rows of a wider tensor, starting 3 entries in
        return dict(causal=True, bias=r(B, H, Nq, Nk + 5)[..., 3:Nk + 3])
    if layout == "bias_per_key":
        return dict(bias=r(B, H, 1, Nk))
    if layout == "bias_2d_softcap":
        return dict(bias=r(Nq, Nk), score_mod=mods.tanh_softcap(2.0))
    if layout == "mask_4d":
        return dict(mask=m(B, 1, Nq, Nk))
    if layout == "mask_expanded":
        return dict(causal=True, mask=m(1, 1, Nq, Nk).expand(B, H, Nq, Nk))
    if layout == "mask_sliced":
        return dict(mask=m(B, 1, Nq, Nk + 5)[..., 3:Nk + 3])
    if layout == "key_padding_bias_per_query":
        return dict(mask=m(B, Nk), bias=r(B, H, Nq, 1))
    raise KeyError(layout)


_BIAS_LAYOUTS = ["bias_4d", "bias_transposed", "bias_sliced", "bias_per_key", "bias_2d_softcap"]


@pytest.mark.parametrize("layout", _BIAS_LAYOUTS + [f"{b}_nograd" for b in _BIAS_LAYOUTS] + [
    "mask_4d", "mask_expanded", "mask_sliced", "key_padding_bias_per_query"])
def test_masks_and_biases_of_every_layout_at_lengths_multiple_of_the_tiles(layout):
    """Lengths multiples of the tiles hand masks and biases full along the keys to the kernel with
    their key dimension split in 16s (flexflash._kernels._kernel_layout): strided, transposed,
    expanded and misaligned ones agree with the reference too, forward and backward (with and
    without the bias's gradient: a bias that needs it is not split), at two lengths of one kernel."""
    gen = torch.Generator().manual_seed(seed_of("split-keys", layout))
    for Nq, Nk in ((128, 256), (256, 384)):
        q, k, v = _inputs(2, 4, 4, Nq, Nk, 64, torch.bfloat16, gen)
        check_against_reference(q, k, v, **_layout_kwargs(layout, 2, 4, Nq, Nk, gen))


def test_lengths_of_a_mask_mod_reading_tensors_do_not_recompile_on_gpu():
    """Eight lengths and two batch sizes of a document mask whose ids are tensors: for multiples
    of 128 and for the rest, a kernel of static shapes for the first shape and one of symbolic
    shapes for the others, each compiled once (the ids' sizes are dynamic from the first symbolic
    compilation), and the kind's block-mask builder compiled once, at its second build."""
    _flex.reset()
    gen = torch.Generator().manual_seed(seed_of("document-lengths"))
    for i, n in enumerate((256, 384, 1000, 513, 2048, 300, 128, 4096)):
        B = 2 + i % 2
        q = torch.randn(B, 4, n, 64, device="cuda", dtype=torch.bfloat16)
        ids = torch.sort(torch.randint(0, 4, (B, n), generator=gen), dim=-1).values.cuda()
        flexflash.attention(q, q, q, causal=True, mask_mod=mods.document(ids, ids))
    stats = flexflash.compile_stats()
    assert stats["kernels"] == 4 and stats["compiles"] <= 4, stats
    builders = list(_blockmask._BUILDERS.values())
    assert [(b.builds, b.compiles) for b in builders] == [(8, 1)]


@pytest.mark.parametrize("case,dropout_p", [("causal", 0.0), ("key_padding", 0.0), ("document", 0.0),
                                            ("causal_mask_bias", 0.0), ("causal", 0.2), ("key_padding", 0.2)])
@pytest.mark.parametrize("Nq,Nk", [(256, 256), (128, 384)])
def test_lengths_multiple_of_the_tiles(case, dropout_p, Nq, Nk):
    """Multiples of 128 run the kernel compiled without boundary checks (a kind of its own)."""
    gen = torch.Generator().manual_seed(seed_of("divisible", case, Nq))
    q, k, v = _inputs(2, 4, 2, Nq, Nk, 64, torch.bfloat16, gen)
    # with dropout, backend="flex": a causal call would take SDPA's own dropout under "auto"
    # (another random stream than the reference's hash)
    backend = dict(backend="flex") if dropout_p else {}
    check_against_reference(q, k, v, dropout_p=dropout_p, dropout_seed=seed_of(case), **backend,
                            **_gpu_kwargs(case, Nq, Nk, gen))


def _gpu_kwargs(case, Nq, Nk, gen):
    """case_kwargs on the GPU (B=2, H=4), with document ids built there."""
    kw = _to_cuda(case_kwargs(case, 2, 4, Nq, Nk, gen, grad=True))
    if case == "document":
        ids = torch.sort(torch.randint(0, 4, (2, Nk), generator=gen), dim=-1).values.cuda()
        kw["mask_mod"] = mods.document(ids[:, Nk - Nq:], ids)
    return kw


# --- dropout: the two-pass FlexAttention scheme, compiled ------------------------------------

@pytest.mark.parametrize("dtype,case", [
    (torch.bfloat16, "causal"), (torch.bfloat16, "causal_mask_bias"), (torch.bfloat16, "sliding_window"),
    (torch.bfloat16, "document"), (torch.float16, "key_padding"), (torch.float32, "alibi_causal")])
def test_dropout_matches_reference_on_the_same_seed(dtype, case):
    gen = torch.Generator().manual_seed(seed_of("dropout", case))
    q, k, v = _inputs(2, 4, 2, 97, 1025, 64, dtype, gen)
    kw = _to_cuda(case_kwargs(case, 2, 4, 97, 1025, gen, grad=True))
    for name in ("mask_mod", "score_mod"):
        if name in kw:
            kw[name] = _cuda_mod(case, gen)
    check_against_reference(q, k, v, dropout_p=0.2, dropout_seed=seed_of(case), **kw)


@pytest.mark.parametrize("B,H,Nq,q_start", [(1, 2, 70_000, 0), (300, 256, 32, 0)])
def test_dropout_keep_bits_match_the_eager_hash(B, H, Nq, q_start):
    """The kernel's dropped entries are exactly flexflash.dropout.keep's, also for a query index
    past 65,536 and B * H past 65,536; the lse is the undropped one."""
    from flexflash import dropout
    from flexflash.reference import index_grids
    Nk = 32
    gen = torch.Generator().manual_seed(B)
    q = randn(B, H, Nq, 16, device="cuda", gen=gen)
    k = randn(B, H, Nk, 16, device="cuda", gen=gen)
    eye = torch.eye(Nk, device="cuda").expand(B, H, Nk, Nk)
    torch.manual_seed(9)
    with torch.no_grad():
        dropped, lse = flexflash.attention(q, k, eye, dropout_p=0.3, return_lse=True)
        probs, want_lse = flexflash.reference.attention(q, k, eye, return_lse=True)
    torch.manual_seed(9)
    params = dropout.draw_seed(0.3, "cuda")
    keep = dropout.keep(params, H, *index_grids(B, H, Nq, Nk, "cuda"))
    assert torch.equal(dropped != 0, keep)  # every probability is positive here
    torch.testing.assert_close(dropped[keep], (probs / 0.7)[keep], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    assert abs((~keep).float().mean().item() - 0.3) < 0.01


def test_dropout_mqa_with_lse_and_fully_masked_rows():
    gen = torch.Generator().manual_seed(5)
    q = randn(2, 8, 130, 64, dtype=torch.bfloat16, device="cuda", gen=gen, grad=True)
    k = randn(2, 130, 64, dtype=torch.bfloat16, device="cuda", gen=gen, grad=True)
    v = randn(2, 130, 64, dtype=torch.bfloat16, device="cuda", gen=gen, grad=True)
    mask = torch.ones(2, 1, 130, 130, dtype=torch.bool, device="cuda")
    mask[:, :, :9] = False  # rows with nothing allowed: zeros, lse -inf, zero finite gradients
    check_against_reference(q, k, v, mask=mask, causal=True, dropout_p=0.5, dropout_seed=1)
    torch.manual_seed(1)
    out, lse = flexflash.attention(q, k, v, mask=mask, causal=True, dropout_p=0.5, return_lse=True)
    _, want = flexflash.reference.attention(q, k, v, mask=mask, causal=True, return_lse=True)
    torch.testing.assert_close(lse, want, rtol=1e-3, atol=1e-3)
    assert (out[:, :, :9] == 0).all() and torch.isneginf(lse[:, :, :9]).all()
    dq, dk, dv = torch.autograd.grad(out.float().sum() + lse[:, :, 9:].sum(), [q, k, v])
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv)) and (dq[:, :, :9] == 0).all()


# --- dropout on SDPA (backend="auto", no mask, bias or modifier) ------------------------------

def test_dropout_without_masks_routes_to_sdpa_and_everything_else_keeps_the_hash():
    from flexflash.functional import explain, route
    q = torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(2, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
    assert route(q, q, q, dropout_p=0.1) == "sdpa" and route(q, q, q, causal=True, dropout_p=0.1) == "sdpa"
    assert route(q, kv, kv, causal=True, dropout_p=0.1) == "sdpa"  # grouped heads
    pad = torch.ones(2, 256, dtype=torch.bool, device="cuda")
    for kw in (dict(mask=pad), dict(bias=torch.zeros(256, 256, device="cuda")), dict(return_lse=True),
               dict(mask_mod=mods.sliding_window(16)), dict(backend="flex")):
        assert route(q, q, q, causal=True, dropout_p=0.1, **kw) == "flex", kw
    assert route(q, q[:, :, :128], q[:, :, :128], causal=True, dropout_p=0.1) == "flex"  # causal, Nq != Nk
    assert explain(q, q, q, dropout_p=0.1).reasons["flex"] == "SDPA computes this call exactly and faster"
    # a shard of a DTensor call keeps the hash: the shards drop the unsharded call's entries
    from flexflash import _checks
    from flexflash import plan as plans
    p, infos, dropout_p = _checks.validate(q, q, q, **{**_checks.KEYWORDS, "causal": True, "dropout_p": 0.1})
    shard = plans.make_plan(p, infos, causal=True, mask_mod=None, score_mod=None, dropout_p=dropout_p, block_size=None,
                            kernel_options=None, return_lse=False, backend="auto", shard=True)
    assert shard.path == "flex" and "shard of a DTensor call" in shard.reasons["sdpa"]


def _sdpa_dropout_probe(p, B=64, H=8, N=64, seed=0):
    """Dropout on SDPA's route with the identity as values: the output is the dropped
    probabilities themselves, ``P * keep / (1 - p)``; also the undropped ``P``."""
    gen = torch.Generator().manual_seed(seed)
    q = randn(1, 1, N, N, dtype=torch.float16, device="cuda", gen=gen).expand(B, H, N, N).contiguous()
    k = randn(1, 1, N, N, dtype=torch.float16, device="cuda", gen=gen).expand(B, H, N, N).contiguous()
    eye = torch.eye(N, device="cuda", dtype=torch.float16).expand(B, H, N, N).contiguous()
    assert flexflash.functional.route(q, k, eye, causal=True, dropout_p=p) == "sdpa"
    with torch.no_grad():
        dropped = flexflash.attention(q, k, eye, causal=True, dropout_p=p).float()
        probs = flexflash.reference.attention(q[:1, :1].double(), k[:1, :1].double(), eye[:1, :1].double(),
                                              causal=True)[0, 0]
    return dropped, probs


def test_sdpa_dropout_drops_the_fraction_p_and_is_unbiased():
    """Over 512 draws of the same (i, j) entries: the fraction dropped is p (overall and per
    entry), the kept entries are P / (1 - p), so the output's mean is the undropped output."""
    p, N = 0.2, 64
    torch.manual_seed(3)
    dropped, probs = _sdpa_dropout_probe(p, N=N)
    allowed = probs > 0                                   # causal: the upper triangle is never seen
    draws = dropped.flatten(0, 1)                         # (512, N, N)
    assert (draws[:, ~allowed] == 0).all()
    kept = draws != 0
    frac = 1 - kept[:, allowed].double().mean().item()
    n = draws.shape[0] * int(allowed.sum())
    assert abs(frac - p) < 5 * (p * (1 - p) / n) ** 0.5, frac
    rate = kept.double().mean(0)[allowed]                 # per entry, over 512 draws
    z = (rate - (1 - p)) / (p * (1 - p) / draws.shape[0]) ** 0.5
    assert z.abs().max() < 6, z.abs().max()
    want = (probs / (1 - p)).float().expand_as(draws)
    torch.testing.assert_close(draws[kept], want[kept], rtol=2e-3, atol=1e-5)  # fp16 output
    mean = draws.double().mean(0)
    sd = probs * (p / (1 - p) / draws.shape[0]) ** 0.5
    assert ((mean - probs).abs() <= 6 * sd + 2e-3 * probs).all()


def test_sdpa_dropout_is_reproducible_with_manual_seed_forward_and_backward():
    """The same seed gives the same output and gradients, another seed other ones (grouped heads,
    bf16, training)."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = _inputs(2, 8, 2, 256, 256, 64, torch.bfloat16, gen)
    g = randn(2, 8, 256, 64, dtype=torch.bfloat16, device="cuda", gen=gen)

    def run(seed):
        torch.manual_seed(seed)
        out = flexflash.attention(q, k, v, causal=True, dropout_p=0.3)
        return (out, *torch.autograd.grad(out, [q, k, v], g))

    assert flexflash.functional.route(q, k, v, causal=True, dropout_p=0.3) == "sdpa"
    first, again, other = run(1), run(1), run(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))


def test_sdpa_dropout_backward_applies_the_forward_entries():
    """With the identity as values the output is the dropped probabilities ``P'``; the value
    gradient must then be ``P'^T @ grad``: the backward pass drops what the forward dropped."""
    gen = torch.Generator().manual_seed(9)
    N = 64
    q = randn(2, 4, N, N, dtype=torch.float16, device="cuda", gen=gen)
    k = randn(2, 4, N, N, dtype=torch.float16, device="cuda", gen=gen)
    eye = torch.eye(N, device="cuda", dtype=torch.float16).expand(2, 4, N, N).contiguous().requires_grad_()
    g = randn(2, 4, N, N, dtype=torch.float16, device="cuda", gen=gen)
    torch.manual_seed(4)
    dropped = flexflash.attention(q, k, eye, dropout_p=0.4)
    dv, = torch.autograd.grad(dropped, [eye], g)
    assert 0.3 < (dropped == 0).float().mean().item() < 0.5
    want = dropped.detach().float().transpose(-2, -1) @ g.float()
    torch.testing.assert_close(dv.float(), want, rtol=1e-2, atol=1e-2)


# --- modules on CUDA -------------------------------------------------------------------------

def _module_case(name, dtype):
    """(module, inputs, fp64 reference from the module's own weights) for one module on CUDA."""
    from einops import rearrange
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed_of("module", name))
    torch.manual_seed(seed_of("module", name))
    B, Nq, Nk, E, H = 2, 97, 130, 128, 2  # head dim 64
    x = randn(B, Nq, E, dtype=dtype, device="cuda", gen=gen, grad=True)
    ctx = randn(B, Nk, E, dtype=dtype, device="cuda", gen=gen, grad=True)
    pad = (torch.rand(B, Nk, generator=gen) > 0.3).cuda()

    def heads(t):
        return rearrange(t, "b n (h d) -> b h n d", h=H)

    if name == "FlashMHA":
        m = flexflash.FlashMHA(E, H, causal=True, device="cuda", dtype=dtype)
        W, b = m.Wqkv.weight.double(), m.Wqkv.bias.double()

        def ref():
            q = heads(F.linear(x.double(), W[:E], b[:E]))
            k, v = heads(F.linear(ctx.double(), W[E:2 * E], b[E:2 * E])), heads(F.linear(ctx.double(), W[2 * E:], b[2 * E:]))
            o = flexflash.reference.attention(q, k, v, causal=True, mask=pad)
            return F.linear(rearrange(o, "b h n d -> b n (h d)"), m.out_proj.weight.double(), m.out_proj.bias.double())
        return m, (x, ctx), dict(key_padding_mask=~pad), ref
    if name == "FlashAttentionTwo":
        m = flexflash.FlashAttentionTwo(dim=E, heads=H, dim_head=64, causal=True).to("cuda", dtype)

        def ref():
            q = heads(F.linear(x.double(), m.to_q.weight.double()))
            k, v = (heads(t) for t in F.linear(ctx.double(), m.to_kv.weight.double()).chunk(2, -1))
            o = flexflash.reference.attention(q, k, v, causal=True, mask=pad)
            return F.linear(rearrange(o, "b h n d -> b n (h d)"), m.to_out.weight.double())
        return m, (x,), dict(context=ctx, mask=pad), ref
    m = flexflash.ChunkedAttention(E, H, chunk_size=32).to("cuda", dtype)

    def ref():
        q = heads(F.linear(x.double(), m.queries.weight.double(), m.queries.bias.double()))
        k = heads(F.linear(ctx.double(), m.keys.weight.double(), m.keys.bias.double()))
        v = heads(F.linear(ctx.double(), m.values.weight.double(), m.values.bias.double()))
        o = flexflash.reference.attention(q, k, v, mask=pad)
        return F.linear(rearrange(o, "b h n d -> b n (h d)"), m.fc_out.weight.double(), m.fc_out.bias.double())
    return m, (ctx, ctx, x), dict(mask=pad), ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["FlashMHA", "FlashAttentionTwo", "ChunkedAttention"])
def test_modules_forward_backward_on_gpu(name, dtype):
    m, args, kw, ref = _module_case(name, dtype)
    out = m(*args, **kw)
    want = ref()
    # Relative to the output scale: bf16 keeps 8 bits (a few ulps through projections and softmax);
    # fp32 differs from fp64 by accumulated rounding only.
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    g = torch.randn(out.shape, device="cuda", dtype=torch.float64)
    leaves = [t for t in (*args, *kw.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    leaves = list({id(t): t for t in leaves}.values())
    got = torch.autograd.grad(out, leaves, g.to(dtype))
    exp = torch.autograd.grad(want, leaves, g)
    for a, b in zip(got, exp):
        b = b.double()  # autograd returns the leaf's dtype
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * b.abs().max().item())


def test_modules_under_torch_compile_on_gpu():
    m, args, kw, _ = _module_case("FlashMHA", torch.bfloat16)
    m.eval()
    with torch.no_grad():
        want = m(*args, **kw)
        got = torch.compile(m, fullgraph=True)(*args, **kw)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    m.train()
    out = torch.compile(m)(*args, **kw)
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


# --- backend="auto": the SDPA route ----------------------------------------------------------

def test_auto_routes_plain_dense_and_causal_to_sdpa():
    from flexflash.functional import route
    q = torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16)
    kv4 = torch.randn(2, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
    assert route(q, q, q) == "sdpa" and route(q, q, q, causal=True) == "sdpa"
    assert route(q.half(), q.half(), q.half(), causal=True) == "sdpa"
    # Everything SDPA cannot do exactly, or that was not measured faster there, stays on FlexAttention.
    assert route(q, q[:, :, :128], q[:, :, :128], causal=True) == "flex"  # causal with Nq != Nk
    assert route(q, q[:, :, :128], q[:, :, :128]) == "sdpa"  # dense with Nq != Nk is exact
    for kw in (dict(mask=torch.ones(2, 256, dtype=torch.bool, device="cuda")), dict(bias=torch.zeros(256, 256, device="cuda")),
               dict(return_lse=True), dict(kernel_options={"num_warps": 4}), dict(block_size=64),
               dict(backend="flex"), dict(score_mod=flexflash.mods.tanh_softcap(5.0))):
        assert route(q, q, q, causal=True, **kw) == "flex", kw
    assert route(q, kv4, kv4, causal=True) == "sdpa" and route(q, kv4, kv4) == "sdpa"  # grouped heads
    assert route(q, kv4[:, 0], kv4[:, 0], causal=True) == "sdpa"  # 3-D k/v: one shared head
    assert route(q, kv4, kv4, causal=True, backend="flex") == "flex"
    assert route(q.float(), q.float(), q.float(), causal=True) == "flex"


def _short_mask(layout, B, Hq, Nq, Nk, gen):
    """A mask of a short (decoding) call whose last batch entry allows nothing: key padding (B, Nk),
    a random (B, Hq, Nq, Nk) mask, or each query's cache prefix (B, 1, Nq, Nk)."""
    lengths = torch.tensor([Nk, Nk // 3, 0])[:B]
    if layout == "key_padding":
        return (torch.arange(Nk)[None] < lengths[:, None]).cuda()
    if layout == "full":
        mask = torch.rand(B, Hq, Nq, Nk, generator=gen) < 0.5
        mask[-1] = False
        return mask.cuda()
    ends = lengths[:, None] - Nq + 1 + torch.arange(Nq)[None]  # bottom-right causal over each prefix
    return (torch.arange(Nk)[None, None] < ends[:, :, None])[:, None].cuda()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Nq,Hkv,layout", [(1, 2, "key_padding"), (16, 8, "full"), (5, 1, "prefix")])
def test_eager_short_calls_with_a_mask_tensor_take_sdpa(dtype, Nq, Hkv, layout):
    """Eager calls of at most 16 queries whose one mask is a tensor (decoding steps) take SDPA, one
    fused kernel rather than a block mask built from the tensor on every step, and match the
    reference, rows the mask allows nothing in included (0, as on every path)."""
    from flexflash.functional import explain, route
    gen = torch.Generator().manual_seed(seed_of("short mask", Nq, Hkv, layout))
    B, Hq, Nk = 3, 8, 1000
    q, k, v = _inputs(B, Hq, Hkv, Nq, Nk, 128, dtype, gen, grad=False)
    mask = _short_mask(layout, B, Hq, Nq, Nk, gen)
    assert route(q, k, v, mask=mask) == "sdpa"
    assert "takes the mask as it is" in str(explain(q, k, v, mask=mask))
    check_against_reference(q, k, v, mask=mask)
    assert (flexflash.attention(q, k, v, mask=mask)[-1] == 0).all()


_FIRST_CALL = """
import sys, torch, torch.nn.functional as F
import flexflash
q = torch.randn(2, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(2, 2, 512, 128, device="cuda", dtype=torch.bfloat16)
mask = (torch.arange(512, device="cuda")[None] < torch.tensor([[512], [100]], device="cuda"))[:, None, None]
with torch.no_grad():
    if sys.argv[1] == "flexflash":
        assert flexflash.explain(q, k, k, mask=mask).path == "sdpa"
        flexflash.attention(q, k, k, mask=mask)
    else:
        F.scaled_dot_product_attention(q, k, k, attn_mask=mask, enable_gqa=True)
print(torch._C._get_sdp_priority_order(), torch._fused_sdp_choice(q, k, k, attn_mask=mask, enable_gqa=True))
"""


def test_sdpa_route_as_a_processs_first_sdpa_call_keeps_sdpas_own_order():
    """torch installs SDPA's default priority order at a process's first CUDA dispatch (cuDNN first
    on recent GPUs). With flexflash's SDPA route as that first call, the order afterwards, and the
    backend SDPA then picks for the caller's own masked grouped-head call, are those of a process
    whose first call was SDPA's own (fresh processes each: the order is process state). Before, an
    H100 and an H200 kept the static order, math above cuDNN, and ran such calls on math."""
    import subprocess
    import sys
    runs = {who: subprocess.run([sys.executable, "-c", _FIRST_CALL, who], capture_output=True, text=True,
                                timeout=300) for who in ("flexflash", "sdpa")}
    for who, run in runs.items():
        assert run.returncode == 0, f"{who}: {run.stderr[-2000:]}"
    assert runs["flexflash"].stdout.splitlines()[-1] == runs["sdpa"].stdout.splitlines()[-1]


def test_short_calls_stay_on_flexattention_where_sdpa_does_not_fit():
    """17 queries, a causal flag beside the mask, gradients, float32, a bias, modifiers, dropout
    (the exact hash), the log-sum-exp, backend="flex" and grouped heads past SDPA_MASK_GQA_SCORES
    scores keep such calls on FlexAttention; inside a caller's torch.compile too (its block mask
    and kernel join the caller's graph), where steps with new masks match the reference and
    compile one graph."""
    from flexflash.functional import route
    gen = torch.Generator().manual_seed(seed_of("short mask stays"))
    q, k, v = _inputs(3, 8, 2, 17, 1000, 128, torch.bfloat16, gen, grad=False)
    mask = _short_mask("key_padding", 3, 8, 17, 1000, gen)
    q16 = q[:, :, :16]
    assert route(q, k, v, mask=mask) == "flex"
    for kw in (dict(causal=True), dict(bias=torch.zeros(3, 8, 16, 1000, device="cuda")), dict(backend="flex"),
               dict(score_mod=flexflash.mods.tanh_softcap(5.0)), dict(mask_mod=flexflash.mods.sliding_window(64)),
               dict(return_lse=True), dict(dropout_p=0.1)):
        assert route(q16, k, v, mask=mask, **kw) == "flex", kw
    assert route(q16.float(), k.float(), v.float(), mask=mask) == "flex"
    # grouped heads past SDPA_MASK_GQA_SCORES scores (SDPA's math backend would hold them)
    from flexflash import plan
    most = plan.SDPA_MASK_GQA_SCORES // (3 * 8 * 16)  # keys: 3 x 8 x 16 x keys scores
    kb = torch.zeros(3, 2, most + 1, 128, device="cuda", dtype=torch.bfloat16)
    wide = torch.ones(3, most + 1, device="cuda", dtype=torch.bool)
    assert route(q16, kb, kb, mask=wide) == "flex"
    assert route(q16, kb[:, :, :most], kb[:, :, :most], mask=wide[:, :most]) == "sdpa"
    q_mha = torch.zeros(3, 2, 16, 128, device="cuda", dtype=torch.bfloat16)  # no grouping: no bound
    assert route(q_mha, kb, kb, mask=wide) == "sdpa"
    assert route(q16.detach().requires_grad_(), k, v, mask=mask) == "flex"
    with torch.no_grad():
        assert route(q16.detach().requires_grad_(), k, v, mask=mask) == "sdpa"
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(lambda q, k, v, mask: flexflash.attention(q, k, v, mask=mask), backend=counter,
                         fullgraph=True)
    for cut in (0, 100, 400):  # three decoding steps, each with lengths of its own
        step_mask = mask & (torch.arange(1000, device="cuda") >= cut)
        ref = flexflash.reference.attention(q16, k, v, mask=step_mask)
        gold = flexflash.reference.attention(q16.double(), k.double(), v.double(), mask=step_mask)
        assert_close_to_golden(f"compiled step {cut}", step(q16, k, v, step_mask), ref, gold, torch.bfloat16)
    assert counter.frame_count == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal,Nq,Nk,Hkv", [(True, 300, 300, 4), (False, 97, 1025, 4), (True, 1, 1, 4),
                                             (True, 300, 300, 2), (False, 97, 1025, 1)])
def test_sdpa_route_matches_reference(dtype, causal, Nq, Nk, Hkv):
    """The SDPA route computes the reference's attention, grouped heads included (query head h
    uses key/value head h // (Hq // Hkv))."""
    gen = torch.Generator().manual_seed(seed_of("sdpa", causal, Nq, Hkv))
    q, k, v = _inputs(2, 4, Hkv, Nq, Nk, 128, dtype, gen)
    assert flexflash.functional.route(q, k, v, causal=causal) == "sdpa"
    check_against_reference(q, k, v, causal=causal)
    check_against_reference(q, k, v, causal=causal, scale=0.3)


# --- long sequences --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["flex", "auto"])
def test_causal_training_at_128k_tokens_holds_no_n_squared_scores(backend):
    """B=1, H=16, D=128 bf16 causal forward+backward at N = 131,072 on one GPU. One head's N x N
    scores would take 32 GiB in bf16 (64 GiB in fp32); the peak memory of the call stays a small
    multiple of the inputs. The last 256 query rows (bottom-right causal: they see every key, with
    query and key indices past 65,536) and their query gradients match the reference, which can
    afford that slice."""
    N, H, D = 1 << 17, 16, 128
    gen = torch.Generator(device="cuda").manual_seed(17)
    q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for _ in range(3))
    g = torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = flexflash.attention(q, k, v, causal=True, backend=backend)
    dq, = torch.autograd.grad(out, [q], g)
    torch.cuda.synchronize()
    grown = torch.cuda.max_memory_allocated() - before
    inputs = 4 * q.numel() * q.element_size()  # q, k, v and the output gradient: 2 GiB
    assert grown < 2 * inputs, f"peak memory grew by {grown / 2**30:.1f} GiB"
    rows = slice(N - 256, N)
    out_tail = out[:, :, rows].detach().clone()
    del out  # the reference's scores for those 256 rows take 2 GiB (4 GiB in fp64)
    tail = q[:, :, rows].detach().requires_grad_()
    tail64 = tail.detach().double().requires_grad_()
    ref = flexflash.reference.attention(tail, k.detach(), v.detach(), causal=True)
    gold = flexflash.reference.attention(tail64, k.detach().double(), v.detach().double(), causal=True)
    assert_close_to_golden("out[-256:]", out_tail, ref, gold, torch.bfloat16)
    ref_dq, = torch.autograd.grad(ref, [tail], g[:, :, rows])
    gold_dq, = torch.autograd.grad(gold, [tail64], g[:, :, rows].double())
    assert_close_to_golden("dq[-256:]", dq[:, :, rows], ref_dq, gold_dq, torch.bfloat16)


@pytest.mark.parametrize("where", ["eager", "compiled"])
def test_decoding_at_128k_tokens_past_32_bit_indices(where):
    """A decoding step (one query per sequence) over a key/value cache of 2**31 elements, 16
    sequences of 131,072 keys with 8 key/value heads of 128 (bf16: 4 GiB each), key-padded to
    lengths of 32k-128k. Inputs that large are indexed in 64 bits, which FlexAttention's decoding
    kernel does not compile (torch 2.11-2.13), so the main kernel runs them: eagerly, the first and
    last sequences match the reference. Inside a caller's torch.compile the call raises (traced
    there, it gave wrong outputs for every sequence but the first: H100, torch 2.11)."""
    B, Hq, Hkv, N, D = 16, 32, 8, 1 << 17, 128
    gen = torch.Generator(device="cuda").manual_seed(31)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    assert k.numel() == 2**31
    lengths = torch.randint(N // 4, N + 1, (B,), device="cuda", generator=gen)
    mask = torch.arange(N, device="cuda")[None] < lengths[:, None]

    def step(q, k, v, mask):
        return flexflash.attention(q, k, v, mask=mask, backend="flex")

    if where == "compiled":
        # Traced into a caller's graph such a call gave wrong outputs for every sequence but the
        # first (H100, torch 2.11): it raises there (and is checked below outside the graph).
        with torch.no_grad(), pytest.raises(Exception, match="past 2\\*\\*31 - 1 elements"):
            torch.compile(step, fullgraph=True)(q, k, v, mask)
    with torch.no_grad():
        out = step(q, k, v, mask)
    for b in (0, B - 1):
        one = slice(b, b + 1)
        ref = flexflash.reference.attention(q[one], k[one], v[one], mask=mask[one])
        gold = flexflash.reference.attention(q[one].double(), k[one].double(), v[one].double(), mask=mask[one])
        assert_close_to_golden(f"out[{b}]", out[one], ref, gold, torch.bfloat16)


# --- FlashAttention-4 kernels (FlexAttention's FLASH generator; needs flash-attn-4) ---------------

def _flash_or_skip():
    from flexflash import _tuning
    if not _tuning.flash_available():
        pytest.skip("flash-attn-4 is not installed (pip install flexflash[fa4])")


@pytest.mark.parametrize("case", ["dense", "causal", "key_padding", "sliding_window", "document", "softcap",
                                  "prefix_lm", "gqa", "alibi"])
@pytest.mark.parametrize("D", [128, 64])
def test_flash_generator_matches_reference(case, D):
    """Asked for explicitly (kernel_options={"BACKEND": "FLASH"}), the FlashAttention-4 kernels
    agree with the reference, forward and backward, through flexflash's dynamic-shape kernels."""
    _flash_or_skip()
    gen = torch.Generator().manual_seed(seed_of("flash", case, D))
    B, H, N = 2, 4, 512
    q, k, v = _inputs(B, H, 1 if case == "gqa" else H, N, N, D, torch.bfloat16, gen)
    kw = {}
    if case in ("causal", "gqa"):
        kw = dict(causal=True)
    elif case == "softcap":
        kw = dict(score_mod=mods.tanh_softcap(5.0))
    elif case == "prefix_lm":
        kw = dict(mask_mod=mods.prefix_lm(torch.tensor([N // 3, 2 * N // 3]).cuda()))
    elif case == "alibi":
        kw = dict(score_mod=mods.alibi(H), causal=True)
    elif case == "key_padding":
        kw = dict(mask=(torch.arange(N)[None] < torch.tensor([[N], [N // 3]])).cuda())
    elif case == "sliding_window":
        kw = dict(mask_mod=mods.sliding_window(100))
    elif case == "document":
        ids = torch.sort(torch.randint(0, 4, (B, N), generator=gen), dim=-1).values.cuda()
        kw = dict(mask_mod=mods.document(ids))
    check_against_reference(q, k, v, backend="flex", kernel_options={"BACKEND": "FLASH"}, **kw)


@pytest.mark.parametrize("case", ["key_padding", "softcap"])
def test_auto_takes_flash_where_the_table_says_so(case):
    """Key padding and soft-capping with gradients at B=4 H=16 N=4096 D=128 (bf16): FLASH by the
    measured table (flexflash._tuning); the result agrees with the Triton kernel's."""
    _flash_or_skip()
    from flexflash import _tuning
    if _tuning.capability(torch.device("cuda")) != (9, 0):
        pytest.skip("the table is measured on sm90")
    gen = torch.Generator().manual_seed(seed_of("flash-auto", case))
    q, k, v = _inputs(4, 16, 16, 4096, 4096, 128, torch.bfloat16, gen)
    if case == "key_padding":
        kw = dict(mask=(torch.arange(4096)[None] < torch.tensor([[4096], [3072], [2048], [1024]])).cuda())
    else:
        kw = dict(score_mod=mods.tanh_softcap(30.0))
    assert flexflash.functional.generator(q, k, v, **kw) == "flash"
    with torch.no_grad():  # the forward-only choice differs (soft-capping: FLASH too; key padding: Triton)
        assert flexflash.functional.generator(q, k, v, **kw) == ("flash" if case == "softcap" else "triton")
    _flex.reset()
    out = flexflash.attention(q, k, v, **kw)
    ran = [dict(kind[0].kernel_options).get("BACKEND") for kind in _kernels._KERNELS]
    assert ran == ["FLASH"], ran  # the call itself ran on FLASH
    ref = flexflash.attention(q, k, v, kernel_options={"BACKEND": "TRITON"}, **kw)
    # Two bf16 kernels of the same attention (outputs of magnitude below 1): they differ by
    # rounding, 2-3e-3 relative as measured between the two generators; a wrong mask would differ by O(1).
    assert (out.float() - ref.float()).abs().max().item() < 2e-2
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("case", ["key_padding", "mask_4d", "document"])
def test_first_block_mask_eager_then_compiled_builder(case):
    """The first block mask of a kind of mask is built eagerly, later ones (here: equal mask values
    in new tensors, so the cache misses) by the kind's compiled builder; both give the kernel the
    same block mask, so the outputs are bitwise equal, and the first matches the reference."""
    _flex.reset()
    gen = torch.Generator().manual_seed(seed_of("eager-builder", case))
    Nq, Nk = 300, 520
    q, k, v = _inputs(2, 4, 4, Nq, Nk, 64, torch.bfloat16, gen)
    if case == "key_padding":
        data = (torch.arange(Nk)[None] < torch.tensor([[Nk], [333]])).cuda()
        make = lambda t: dict(mask=t)  # noqa: E731
    elif case == "mask_4d":
        data = (torch.rand(1, 4, Nq, Nk, generator=gen) < 0.7).cuda()
        make = lambda t: dict(mask=t)  # noqa: E731
    else:
        data = torch.sort(torch.randint(0, 4, (2, Nk), generator=gen), dim=-1).values.cuda()
        make = lambda t: dict(mask_mod=mods.document(t[:, Nk - Nq:], t), causal=True)  # noqa: E731
    out = check_against_reference(q, k, v, **make(data))
    builders = list(_blockmask._BUILDERS.values())
    assert len(builders) == 1 and builders[0].builds == 1 and builders[0].compiles == 0
    second = flexflash.attention(q, k, v, **make(data.clone()))  # equal values, a new tensor
    assert builders[0].builds == 2 and builders[0].compiles == 1
    assert torch.equal(out, second)


@pytest.mark.parametrize("case", ["key_padding", "mask_4d", "sliding_window", "document"])
@pytest.mark.parametrize("Nq,Nk", [(97, 1025), (256, 256)])
def test_masked_calls_with_tuned_tiles(case, Nq, Nk):
    """Masked calls at D=128 bf16 run with the tuned forward tiles of flexflash._tuning on sm90
    (64x64; 128x64 for a mask full along both lengths; also with lengths that are multiples of
    128): forward and backward against the reference. 97 queries (one head per key/value head) run
    FlexAttention's decoding kernel instead, without the main kernel's tiles."""
    from flexflash import _tuning
    gen = torch.Generator().manual_seed(seed_of("tuned", case, Nq))
    q, k, v = _inputs(2, 4, 4, Nq, Nk, 128, torch.bfloat16, gen)
    check_against_reference(q, k, v, **_gpu_kwargs(case, Nq, Nk, gen))
    if _tuning.capability(torch.device("cuda")) == (9, 0):
        kinds = [kind for kind in _kernels._KERNELS if kind[1] == (4, 4, 128, 128) and kind[3] == torch.bfloat16]
        if Nq < 128:  # FlexAttention's decoding kernel (flexflash._kinds.decoding_kernel), not the tiles'
            assert any(kind[-2:] == ("decoding", q.shape[0]) and "fwd_BLOCK_M" not in dict(kind[0].kernel_options or ())
                       for kind in kinds), kinds
            return
        tuned = [kind for kind in kinds
                 if dict(kind[0].kernel_options or ()).get("fwd_BLOCK_M") == (128 if case == "mask_4d" else 64)]
        assert tuned, "the tuned forward tiles were not used"


@pytest.mark.parametrize("dtype,D,case,block_m,block_m_bwd", [
    (torch.float16, 128, "key_padding", 64, None), (torch.float16, 128, "document", 64, None),
    (torch.bfloat16, 64, "sliding_window", 128, 64), (torch.bfloat16, 64, "document", 128, 64),
    (torch.bfloat16, 64, "key_padding", 128, None), (torch.float16, 64, "key_padding", 128, None),
    (torch.bfloat16, 64, "causal_mask_bias", 128, 64), (torch.float16, 64, "bias_3d", 128, None),
    (torch.bfloat16, 64, "alibi_causal", 128, None), (torch.bfloat16, 64, "softcap", 64, None)])
def test_tuned_tiles_fp16_and_d64(dtype, D, case, block_m, block_m_bwd):
    """The tiles measured for fp16 at D=128 (64x64) and at D=64 (128x64 forward tiles for masks,
    biases and ALiBi, 64x64 for soft-capping; 64x64 backward tiles for bf16 mask_mods and biases)
    on sm90: forward and backward against the reference, lengths multiples of 128 and not."""
    from flexflash import _tuning
    _flex.reset()  # only this test's kernels below
    gen = torch.Generator().manual_seed(seed_of("tuned", case, D, str(dtype)))
    for Nq, Nk in ((97, 1025), (256, 256)):
        q, k, v = _inputs(2, 4, 4, Nq, Nk, D, dtype, gen)
        kw = dict(score_mod=mods.tanh_softcap(2.0)) if case == "softcap" else _gpu_kwargs(case, Nq, Nk, gen)
        if "bias" in kw:  # in q's dtype (a wider bias takes two pipeline stages instead of tiles)
            kw["bias"] = kw["bias"].detach().to(dtype).requires_grad_(kw["bias"].requires_grad)
        check_against_reference(q, k, v, **kw)
    if _tuning.capability(torch.device("cuda")) == (9, 0):
        options = [dict(kind[0].kernel_options) for kind in _kernels._KERNELS
                   if kind[1] == (4, 4, D, D) and kind[3] == dtype]
        tuned = [o for o in options if o.get("fwd_BLOCK_M") == block_m and o.get("bwd_BLOCK_M1") == block_m_bwd]
        assert tuned, f"the tuned tiles were not used: {options}"


@pytest.mark.parametrize("case", ["sliding_window", "key_padding"])
def test_max_autotune_mode_matches_reference(case):
    """Under set_compile_mode("max-autotune") Inductor autotunes the kernels' tiles, forward and
    backward, instead of flexflash's tuned ones; the results agree with the reference."""
    gen = torch.Generator().manual_seed(seed_of("autotune", case))
    q, k, v = _inputs(2, 4, 4, 256, 256, 128, torch.bfloat16, gen)
    kw = _gpu_kwargs(case, 256, 256, gen)
    previous = flexflash.set_compile_mode("max-autotune")
    try:
        check_against_reference(q, k, v, **kw)
    finally:
        flexflash.set_compile_mode(previous)
    tuned = [kern for kern in _kernels._KERNELS.values() if kern.mode == "max-autotune"]
    assert tuned and not any("fwd_BLOCK_M" in dict(kern.static.kernel_options) for kern in tuned)
