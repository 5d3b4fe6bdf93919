"""Fuzzing whole calls: Hypothesis draws shapes, dtypes, head layouts and every option together
(causal, mask tensors of every accepted layout, biases with and without gradient, mask and score
modifiers and their combinations, scale, block size, return_lse, dropout) and compares the call with
the reference (and the float64 reference). Profiles: "ci" (few examples, derandomised), "dev" and
"nightly" (tests/conftest.py). Failures found are kept below as explicit examples."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import flexflash
from flexflash import mods

from .helpers import check_against_reference

LENGTHS = [1, 2, 17, 64, 97, 130]


@st.composite
def calls(draw):
    B = draw(st.integers(1, 3))
    Hq, Hkv = draw(st.sampled_from([(2, 2), (4, 2), (4, 1), (3, 3)]))
    Nq, Nk = draw(st.sampled_from(LENGTHS)), draw(st.sampled_from(LENGTHS))
    D = draw(st.sampled_from([8, 16, 32]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    grad = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    kw = {}
    if draw(st.booleans()):
        kw["causal"] = True
    mask_kind = draw(st.sampled_from(["none", "padding", "4d", "4d-broadcast"]))
    if mask_kind == "padding":
        kw["mask"] = torch.rand(B, Nk, generator=gen) > 0.3
    elif mask_kind == "4d":
        kw["mask"] = torch.rand(B, Hq, Nq, Nk, generator=gen) > 0.3
    elif mask_kind == "4d-broadcast":
        kw["mask"] = torch.rand(1, 1, Nq, Nk, generator=gen) > 0.3
    bias_kind = draw(st.sampled_from(["none", "2d", "3d", "4d"]))
    shape = {"2d": (Nq, Nk), "3d": (Hq, Nq, Nk), "4d": (B, 1, Nq, Nk)}.get(bias_kind)
    if shape:
        kw["bias"] = torch.randn(*shape, generator=gen).requires_grad_(grad and draw(st.booleans()))
    mm = draw(st.sampled_from(["none", "window", "prefix", "document", "window|prefix"]))
    off = Nk - Nq
    ids = torch.sort(torch.randint(0, 3, (B, max(Nq, Nk)), generator=gen), dim=-1).values
    kw["mask_mod"] = {"none": None, "window": mods.sliding_window(5, offset=off),
                      "prefix": mods.prefix_lm(torch.randint(0, Nk + 1, (B,), generator=gen), offset=off),
                      "document": mods.document(ids[:, :Nq], ids[:, :Nk]),
                      "window|prefix": mods.or_masks(mods.sliding_window(3, offset=off), mods.prefix_lm(2))}[mm]
    sm = draw(st.sampled_from(["none", "alibi", "softcap", "alibi+softcap"]))
    kw["score_mod"] = {"none": None, "alibi": mods.alibi(Hq), "softcap": mods.tanh_softcap(3.0),
                       "alibi+softcap": mods.compose_scores(mods.alibi(Hq), mods.tanh_softcap(3.0))}[sm]
    if draw(st.booleans()):
        kw["scale"] = draw(st.floats(0.05, 1.0))
    if draw(st.booleans()):
        kw["block_size"] = draw(st.sampled_from([16, 32, (16, 64), 128]))
    if grad and draw(st.booleans()):
        kw["dropout_p"] = draw(st.sampled_from([0.1, 0.5]))
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(dtype).requires_grad_(grad)
    k = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype).requires_grad_(grad)
    v = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype).requires_grad_(grad)
    if "bias" in kw:
        kw["bias"] = kw["bias"].detach().to(dtype).requires_grad_(kw["bias"].requires_grad)
    return q, k, v, {n: x for n, x in kw.items() if x is not None}, grad, seed


@given(calls())
def test_whole_calls_against_the_reference(call):
    q, k, v, kw, grad, seed = call
    with torch.set_grad_enabled(grad):
        check_against_reference(q, k, v, grads=grad, dropout_seed=seed, **kw)
        if not kw.get("dropout_p"):
            _, lse = flexflash.attention(q, k, v, return_lse=True, **kw)
            _, want = flexflash.reference.attention(q, k, v, return_lse=True,
                                                    **{n: x for n, x in kw.items() if n != "block_size"})
            finite = torch.isfinite(want)
            assert torch.equal(finite, torch.isfinite(lse))
            torch.testing.assert_close(lse[finite], want[finite], rtol=1e-4, atol=1e-4)
