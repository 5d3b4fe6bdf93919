"""The CPU paths besides compiled FlexAttention: SDPA's CPU kernel for the calls it computes
exactly, and the memory-bounded path's tiles on that kernel for training with masks SDPA cannot take
whole (mask_mods, causal with a mask tensor). Each against the reference (the helpers compare to
float64, forward and backward), with the path checked, so that a change of route shows."""

from __future__ import annotations

import pytest
import torch

import flexflash
from flexflash import _torch_private, mods

from .helpers import check_against_reference, seed_of


def _inputs(B, Hq, Hkv, Nq, Nk, D, dtype, seed, grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g).to(dtype).requires_grad_(grad)
    k, v = (torch.randn(B, Hkv, Nk, D, generator=g).to(dtype).requires_grad_(grad) for _ in range(2))
    return q, k, v, g


SDPA_CASES = ["dense", "causal", "key_padding", "mask_4d", "bias_2d", "bias_3d_grad", "gqa_causal", "strided"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", SDPA_CASES)
def test_sdpa_on_cpu_matches_the_reference(case, dtype):
    """Calls SDPA's CPU kernel computes exactly take it under "auto", with gradients (a bias's
    too); a fully padded batch entry returns zeros and zero gradients."""
    B, Hq, N, D = 2, 4, 37, 16
    q, k, v, g = _inputs(B, Hq, 2 if case == "gqa_causal" else Hq, N, N, D, dtype, seed_of(case, str(dtype)))
    kw = {}
    if case == "causal" or case == "gqa_causal":
        kw = dict(causal=True)
    elif case == "key_padding":
        keep = torch.rand(B, N, generator=g) > 0.3
        keep[1] = False  # a fully padded sequence: its rows see no key
        kw = dict(mask=keep)
    elif case == "mask_4d":
        kw = dict(mask=torch.rand(B, 1, N, N, generator=g) > 0.5)
    elif case == "bias_2d":
        kw = dict(bias=torch.randn(N, N, generator=g).to(dtype))
    elif case == "bias_3d_grad":
        kw = dict(bias=torch.randn(Hq, N, N, generator=g).to(dtype).requires_grad_())
    elif case == "strided":  # the head dim strided: SDPA's fused kernel needs it contiguous
        q = torch.randn(B, Hq, N, 2 * D, generator=g).to(dtype)[..., ::2].requires_grad_()
    assert flexflash.explain(q, k, v, **kw).path == "sdpa"
    out = check_against_reference(q, k, v, **kw)
    if case == "key_padding":
        assert torch.equal(out[1], torch.zeros_like(out[1]))


def _counting(monkeypatch):
    calls = {"forward": 0, "backward": 0}
    for name in ("forward", "backward"):
        real = getattr(_torch_private, f"cpu_flash_{name}")

        def counted(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)
        monkeypatch.setattr(_torch_private, f"cpu_flash_{name}", counted)
    return calls


TILE_CASES = ["document", "sliding_window", "causal_key_padding", "causal_rows_without_keys", "mask_mod_and_bias",
              "gqa_prefix"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", TILE_CASES)
def test_training_tiles_on_sdpas_cpu_kernel_match_the_reference(case, dtype, monkeypatch):
    """CPU training with masks SDPA cannot take whole runs the memory-bounded path on SDPA's CPU
    kernel, tile by tile (small tiles here: several per call, some without any allowed key)."""
    B, Hq, Hkv, Nq, Nk, D = 2, 4, 4, 70, 70, 16
    if case == "causal_rows_without_keys":
        Nq, Nk = 70, 45  # bottom-right causal: the first 25 queries see no key
    if case == "gqa_prefix":
        Hkv = 2
    q, k, v, g = _inputs(B, Hq, Hkv, Nq, Nk, D, dtype, seed_of(case, str(dtype)))
    ids = torch.sort(torch.randint(0, 4, (B, Nk), generator=g), dim=-1).values
    kw = {
        "document": dict(mask_mod=mods.document(ids)),
        "sliding_window": dict(mask_mod=mods.sliding_window(9), causal=True),
        "causal_key_padding": dict(causal=True, mask=torch.rand(B, Nk, generator=g) > 0.3),
        "causal_rows_without_keys": dict(causal=True, mask=torch.rand(B, 1, 1, Nk, generator=g) > 0.2),
        "mask_mod_and_bias": dict(mask_mod=mods.sliding_window(20), bias=torch.randn(Nq, Nk, generator=g).to(dtype)),
        "gqa_prefix": dict(mask_mod=mods.prefix_lm(torch.tensor([5, 30])), causal=True),
    }[case]
    calls = _counting(monkeypatch)
    assert flexflash.explain(q, k, v, **kw).path == "memory-bounded"
    out = check_against_reference(q, k, v, block_size=16, **kw)
    assert calls["forward"] > 1 and calls["backward"] > 1, calls  # the fused kernel, tile by tile
    if case == "causal_rows_without_keys":
        assert torch.equal(out[:, :, :25], torch.zeros_like(out[:, :, :25]))


def test_tiles_give_the_reference_lse_and_do_not_depend_on_the_tile_size():
    """The tiles' log-sum-exp is the reference's (-inf for rows that see no key), and the result
    is the same for every tile size."""
    q, k, v, g = _inputs(2, 2, 2, 50, 30, 16, torch.float32, 3, grad=False)
    kw = dict(causal=True, mask=torch.rand(2, 30, generator=g) > 0.3)
    ref, ref_lse = flexflash.reference.attention(q, k, v, return_lse=True, **kw)
    assert torch.isneginf(ref_lse[:, :, :20]).all()
    for block in (None, 8, 16, 64):
        out, lse = flexflash.attention(q, k, v, return_lse=True, block_size=block, **kw)
        # float32 on both sides: the kernel and the reference sum in different orders
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(lse, ref_lse, rtol=2e-5, atol=2e-6)


def test_score_mods_and_gradients_of_a_bias_with_a_mask_take_the_eager_tiles(monkeypatch):
    """What SDPA's kernel has no place for (a score_mod, a bias's gradient beside a mask) runs the
    eager tiles, exactly."""
    calls = _counting(monkeypatch)
    q, k, v, g = _inputs(1, 2, 2, 40, 40, 16, torch.float32, 4)
    bias = torch.randn(40, 40, generator=g).requires_grad_()
    check_against_reference(q, k, v, score_mod=mods.tanh_softcap(5.0), causal=True, block_size=16)
    check_against_reference(q, k, v, bias=bias, causal=True, block_size=16)
    assert calls == {"forward": 0, "backward": 0}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_dtype_the_reference_takes_runs_on_every_cpu_path(dtype):
    """No CPU path crashes for a dtype the reference takes: SDPA, compiled FlexAttention (forward)
    and the memory-bounded tiles (training, dropout), each against the reference. (A bfloat16
    mask_mod runs the tiles forward too, faster there: its FlexAttention case has a score_mod.)"""
    q, k, v, g = _inputs(2, 2, 2, 33, 33, 16, dtype, seed_of("dtypes", str(dtype)))
    window = mods.sliding_window(7)
    seen = set()
    cases = [dict(causal=True), dict(mask_mod=window), dict(mask_mod=window, dropout_p=0.25)]
    if dtype == torch.bfloat16:
        cases.append(dict(mask_mod=window, score_mod=mods.tanh_softcap(4.0)))
    for kw in cases:
        for grad in (False, True):
            leaves = [t.detach().requires_grad_(grad) for t in (q, k, v)]
            with torch.set_grad_enabled(grad):
                seen.add(flexflash.explain(*leaves, **kw).path)
                check_against_reference(*leaves, grads=grad, **kw)
    assert seen == ({"sdpa", "memory-bounded"} if dtype == torch.float64 else {"sdpa", "flex", "memory-bounded"})


def test_tiles_take_views_of_any_strides():
    """Views whose head dim is strided (SDPA's CPU kernel reads it as contiguous: wrong results,
    before the tiles made such views contiguous), the (B, N, H, D) layout transposed, and strided
    masks and biases, each in training through the tiles and in one call with the lse alone."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 40, 4, 32, generator=g)[..., ::2].transpose(1, 2).requires_grad_()  # head dim stride 2
    k = torch.randn(2, 4, 16, 40, generator=g).transpose(-1, -2).requires_grad_()  # head dim stride 40
    v = torch.randn(2, 40, 4, 16, generator=g).transpose(1, 2).requires_grad_()
    bias = torch.randn(40, 40, generator=g).t()
    mask = (torch.rand(2, 1, 40, 40, generator=g) > 0.3).transpose(-1, -2)
    window = mods.sliding_window(5)
    for kw in (dict(mask_mod=window), dict(mask_mod=window, bias=bias), dict(causal=True, mask=mask)):
        assert flexflash.explain(q, k, v, **kw).path == "memory-bounded"
        check_against_reference(q, k, v, block_size=16, **kw)
    with torch.no_grad():  # a bias alone, with the lse: the tiles with the strided bias as the kernel's mask
        out, lse = flexflash.attention(q, k, v, bias=bias, return_lse=True)
        ref, ref_lse = flexflash.reference.attention(q, k, v, bias=bias, return_lse=True)
    # float32 on both sides: the kernel and the reference sum in different orders
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdpa_on_cpu_takes_biases_of_another_dtype(dtype):
    """A float32 or float64 bias beside half-precision inputs reaches SDPA's kernel in float32 (the
    precision the scores are summed in), with its gradient."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 4, 33, 16, generator=g).to(dtype).requires_grad_() for _ in range(3))
    for bias in (torch.randn(33, 33, generator=g), torch.randn(33, 33, generator=g).double(),
                 torch.randn(4, 33, 33, generator=g).requires_grad_()):
        assert flexflash.explain(q, k, v, bias=bias).path == "sdpa"
        check_against_reference(q, k, v, bias=bias)
