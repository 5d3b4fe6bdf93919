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
    (dict(q=q.to(torch.int64)), flexflash.DtypeError, ["q", "floating", "int64"]),
    (dict(k=k.double()), flexflash.DtypeError, ["k", "float32", "float64"]),
    (dict(q=q[0]), ValueError, ["q", "4 dimensions", "(4, 9, 16)"]),
    (dict(k=k[0, 0]), ValueError, ["k, v", "3-D", "2"]),
    (dict(k=torch.randn(3, 2, 11, 16)), ValueError, ["batch size 2", "3"]),
    (dict(k=torch.randn(2, 2, 11, 8)), ValueError, ["k", "D=16", "8"]),
    (dict(v=torch.randn(2, 2, 10, 8)), ValueError, ["v", "(2, 2, 11)", "(2, 2, 10)"]),
    (dict(k=torch.randn(2, 3, 11, 16), v=torch.randn(2, 3, 11, 8)), ValueError, ["multiple", "Hq=4", "Hkv=3"]),
    (dict(mask=torch.ones(2, 11)), ValueError, ["mask", "bool", "float32", "bias="]),  # SPEC §2: a ValueError
    (dict(mask=torch.ones(1, 1, 9, 11, dtype=torch.int8)), ValueError, ["mask", "bool", "int8", "bias="]),
    (dict(mask=torch.ones(9, 11, dtype=torch.bool)), ValueError, ["mask", "(B, Nk) = (2, 11)", "(9, 11)"]),
    (dict(mask=torch.ones(2, 4, 9, dtype=torch.bool)), ValueError, ["mask", "3-D", "(2, 4, 9)"]),
    (dict(mask=torch.ones(2, 3, 9, 11, dtype=torch.bool)), ValueError, ["mask", "dimension 1", "size 3", "1 or 4"]),
    (dict(bias=torch.ones(9, 11, dtype=torch.int32)), flexflash.DtypeError, ["bias", "floating", "int32"]),
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
    (dict(kernel_options={"fwd_NOT_AN_OPTION": 1}), ValueError, ["kernel_options", "fwd_NOT_AN_OPTION"]),
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


def test_a_wrong_dtype_is_both_a_value_error_and_a_type_error():
    with pytest.raises(flexflash.DtypeError) as info:
        flexflash.attention(q, k, v, mask=torch.ones(2, 11))
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_captured_tensor_on_wrong_device_is_named():
    meta = torch.ones(11, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="mask_mod.*meta"):
        flexflash.attention(q, k, v, mask_mod=lambda b, h, i, j: meta[j])


def test_tensor_devices_must_match():
    with pytest.raises(ValueError, match="mask: expected a tensor on q's device"):
        flexflash.attention(q, k, v, mask=torch.ones(2, 11, dtype=torch.bool, device="meta"))


# --- modules: constructor and forward arguments ----------------------------------------------

def _fa():
    return flexflash.FlashAttention()


def _mha():
    return flexflash.FlashMHA(8, 2)


def _two():
    return flexflash.FlashAttentionTwo(dim=8, heads=2, dim_head=4)


def _chunked():
    return flexflash.ChunkedAttention(8, 2, 4)


x8 = torch.randn(2, 5, 8)
q4 = torch.randn(2, 1, 5, 8)

MODULE_BAD = [
    # (call, exception, words the message must contain)
    (lambda: flexflash.FlashAttention(causal=1), TypeError, ["causal", "bool", "int"]),
    (lambda: flexflash.FlashAttention(dropout=1.5), ValueError, ["dropout", "[0, 1)", "1.5"]),
    (lambda: flexflash.FlashAttention(flash="yes"), TypeError, ["flash", "bool", "'yes'"]),
    (lambda: flexflash.FlashMHA(0, 2), ValueError, ["embed_dim", "positive", "0"]),
    (lambda: flexflash.FlashMHA(8, -1), ValueError, ["num_heads", "positive", "-1"]),
    (lambda: flexflash.FlashMHA(8, 3), ValueError, ["num_heads", "divisor of embed_dim=8", "3"]),
    (lambda: flexflash.FlashMHA(8.0, 2), ValueError, ["embed_dim", "positive int", "8.0"]),
    (lambda: flexflash.FlashMHA(8, 2, dropout=-0.1), ValueError, ["dropout", "-0.1"]),
    (lambda: flexflash.FlashMHA(8, 2, batch_first="no"), TypeError, ["batch_first", "bool", "'no'"]),
    (lambda: flexflash.FlashAttentionTwo(dim=0), ValueError, ["dim", "positive", "0"]),
    (lambda: flexflash.FlashAttentionTwo(dim=8, heads=0), ValueError, ["heads", "positive", "0"]),
    (lambda: flexflash.FlashAttentionTwo(dim=8, dim_head=-4), ValueError, ["dim_head", "-4"]),
    (lambda: flexflash.FlashAttentionTwo(dim=8, q_bucket_size=0), ValueError, ["q_bucket_size", "0"]),
    (lambda: flexflash.FlashAttentionTwo(dim=8, mixed_precision=1), TypeError, ["mixed_precision", "bool"]),
    (lambda: flexflash.ChunkedAttention(8, 2, 0), ValueError, ["chunk_size", "positive", "0"]),
    (lambda: flexflash.ChunkedAttention(8, 3, 4), ValueError, ["heads", "divisor of embed_size=8", "3"]),
    (lambda: _fa()(torch.randn(2, 5, 8), q4, q4), ValueError, ["q", "4 dimensions", "(2, 5, 8)"]),
    (lambda: _fa()(q4.long(), q4, q4), TypeError, ["q", "floating", "int64"]),
    (lambda: _fa()(q4, q4, q4, attn_bias=torch.randn(3, 5, 5)), ValueError, ["bias", "(1, 5, 5)", "size 3"]),
    (lambda: _fa()(q4, q4, q4, mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, ["mask", "(2, 5)", "(2, 4)"]),
    (lambda: _mha()(torch.randn(5, 8)), ValueError, ["query", "(B, N, E)", "(5, 8)"]),
    (lambda: _mha()(torch.randn(2, 5, 6)), ValueError, ["query", "embed_dim=8", "(2, 5, 6)"]),
    (lambda: _mha()(x8.long()), TypeError, ["query", "floating", "int64"]),
    (lambda: _mha()(x8, value=x8), ValueError, ["key", "value is given"]),
    (lambda: _mha()(x8, torch.randn(3, 5, 8), torch.randn(3, 5, 8)), ValueError, ["key, value", "batch size"]),
    (lambda: _mha()(x8, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError,
     ["key_padding_mask", "(2, 5)", "(2, 4)"]),
    (lambda: _mha()(x8, attn_mask=torch.zeros(4, 5, dtype=torch.bool)), ValueError, ["mask", "size 4", "(1, 1, 4, 5)"]),
    (lambda: _two()(torch.randn(2, 5, 6)), ValueError, ["x", "dim=8", "(2, 5, 6)"]),
    (lambda: _two()(x8.int()), TypeError, ["x", "floating", "int32"]),
    (lambda: _two()(x8, context=torch.randn(3, 5, 8)), ValueError, ["context", "batch size 2", "(3, 5, 8)"]),
    (lambda: _two()(x8, mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, ["mask", "(2, 5)", "(2, 4)"]),
    (lambda: _two()(x8, mask=torch.full((2, 5), 0.5)), ValueError, ["mask", "0/1"]),
    (lambda: _two()(x8, q_bucket_size=-1), ValueError, ["q_bucket_size", "-1"]),
    (lambda: _chunked()(x8, torch.randn(2, 6, 8), x8), ValueError, ["values, keys", "(2, 5, 8)", "(2, 6, 8)"]),
    (lambda: _chunked()(torch.randn(2, 5, 6), torch.randn(2, 5, 6), torch.randn(2, 5, 6)), ValueError,
     ["values", "embed_size=8", "(2, 5, 6)"]),
    (lambda: _chunked()(x8.long(), x8, x8), TypeError, ["values", "floating", "int64"]),
    (lambda: _chunked()(x8, x8, x8, mask=torch.ones(3, 5, dtype=torch.bool)), ValueError, ["mask", "(2, 5)", "(3, 5)"]),
]


@pytest.mark.parametrize("call,exc,words", MODULE_BAD, ids=[str(i) for i in range(len(MODULE_BAD))])
def test_module_bad_arguments_are_clear_errors(call, exc, words):
    before = compile_stats()["compiles"]
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert compile_stats()["compiles"] == before  # raised before any compilation


def test_kernel_options_for_one_direction_are_accepted():
    """FlexAttention takes "fwd_"/"bwd_" + an option's name for one direction alone."""
    options = {"fwd_num_warps": 4, "bwd_num_stages": 2, "BLOCK_M": 64}
    assert flexflash.functional.route(q, k, v, kernel_options=options) == "flex"
