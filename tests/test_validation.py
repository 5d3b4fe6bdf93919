"""Bad input is an error naming the argument, the expected and the actual value, raised before
any compilation; never a crash inside torch.compile and never a wrong answer."""

from __future__ import annotations

import math

import pytest
import torch

import flexflash
from flexflash import compile_stats

q = torch.randn(2, 4, 9, 16)
k = torch.randn(2, 2, 11, 16)
v = torch.randn(2, 2, 11, 8)

BAD = [
    # (kwargs overriding q/k/v/options, exception, words the message must contain)
    (dict(q=q.to(torch.int64)), TypeError, ["q", "floating", "int64"]),
    (dict(k=k.double()), TypeError, ["k", "float32", "float64"]),
    (dict(q=q[0]), ValueError, ["q", "4 dimensions", "(4, 9, 16)"]),
    (dict(k=k[0, 0]), ValueError, ["k, v", "3-D", "2"]),
    (dict(k=torch.randn(3, 2, 11, 16)), ValueError, ["batch size 2", "3"]),
    (dict(k=torch.randn(2, 2, 11, 8)), ValueError, ["k", "D=16", "8"]),
    (dict(v=torch.randn(2, 2, 10, 8)), ValueError, ["v", "(2, 2, 11)", "(2, 2, 10)"]),
    (dict(k=torch.randn(2, 3, 11, 16), v=torch.randn(2, 3, 11, 8)), ValueError, ["multiple", "Hq=4", "Hkv=3"]),
    (dict(mask=torch.ones(2, 11)), TypeError, ["mask", "bool", "float32", "bias="]),
    (dict(mask=torch.ones(9, 11, dtype=torch.bool)), ValueError, ["mask", "(B, Nk) = (2, 11)", "(9, 11)"]),
    (dict(mask=torch.ones(2, 4, 9, dtype=torch.bool)), ValueError, ["mask", "3-D", "(2, 4, 9)"]),
    (dict(mask=torch.ones(2, 3, 9, 11, dtype=torch.bool)), ValueError, ["mask", "dimension 1", "size 3", "1 or 4"]),
    (dict(bias=torch.ones(9, 11, dtype=torch.int32)), TypeError, ["bias", "floating", "int32"]),
    (dict(bias=torch.ones(9, 12)), ValueError, ["bias", "(9, 11)", "(9, 12)"]),
    (dict(bias=torch.ones(3, 9, 11)), ValueError, ["bias", "size 3", "1 or 4"]),
    (dict(bias=torch.ones(11)), ValueError, ["bias", "1-D"]),
    (dict(scale=math.inf), ValueError, ["scale", "finite", "inf"]),
    (dict(scale="0.1"), TypeError, ["scale", "str"]),
    (dict(dropout_p=1.0), ValueError, ["dropout_p", "[0, 1)", "1.0"]),
    (dict(dropout_p=-0.1), ValueError, ["dropout_p", "-0.1"]),
    (dict(dropout_p=math.nan), ValueError, ["dropout_p", "nan"]),
    (dict(dropout_p="0.1"), TypeError, ["dropout_p", "str"]),
    (dict(backend="fast"), ValueError, ["backend", "'auto'", "'fast'"]),
    (dict(block_size=0), ValueError, ["block_size", "positive", "0"]),
    (dict(block_size=(16, 16, 16)), ValueError, ["block_size", "(16, 16, 16)"]),
    (dict(kernel_options={"NOT_AN_OPTION": 1}), ValueError, ["kernel_options", "NOT_AN_OPTION"]),
    (dict(mask_mod=3), TypeError, ["mask_mod", "callable", "int"]),
    (dict(causal=1), TypeError, ["causal", "bool", "int"]),
    (dict(q="q"), TypeError, ["q", "torch.Tensor", "str"]),
]


@pytest.mark.parametrize("override,exc,words", BAD, ids=[str(i) for i in range(len(BAD))])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_input_is_a_clear_error(override, exc, words, backend):
    args = dict(q=q, k=k, v=v, backend=backend)
    args.update(override)
    before = compile_stats()["compiles"]
    with pytest.raises(exc) as info:
        flexflash.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert compile_stats()["compiles"] == before  # raised before any compilation


def test_captured_tensor_on_wrong_device_is_named():
    meta = torch.ones(11, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="mask_mod.*meta"):
        flexflash.attention(q, k, v, mask_mod=lambda b, h, i, j: meta[j])


def test_tensor_devices_must_match():
    with pytest.raises(ValueError, match="mask: expected a tensor on q's device"):
        flexflash.attention(q, k, v, mask=torch.ones(2, 11, dtype=torch.bool, device="meta"))
