"""The same checks on CUDA (skipped without a GPU): compiled FlexAttention forward and backward
for fp32/fp16/bf16, odd and unequal lengths, head dims 64/80/128, GQA/MQA, bias gradients."""

from __future__ import annotations

import pytest
import torch

import flexflash
from flexflash import mods

from .helpers import check_against_reference, randn
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
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
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
    before = flexflash.compile_stats()["compiles"]
    for n in (128, 256, 97, 1000, 513, 2048, 17, 300):
        q = torch.randn(2, 4, n, 64, device="cuda", dtype=torch.bfloat16)
        flexflash.attention(q, q, q, causal=True, mask=torch.rand(2, n, device="cuda") > 0.2)
    assert flexflash.compile_stats()["compiles"] - before <= 3
