"""flexflash.compat.flash_attn against a reference written from flash-attn's documented semantics
(its test suite's ``attention_ref``: scores, soft-capping, the local window mask with bottom-right
alignment, ALiBi as a bias, softmax; rows without a key give 0), in flash-attn's (batch, seqlen,
nheads, headdim) layout: odd lengths, seqlen_q != seqlen_k both ways, grouped heads, forward and
backward; packed variable-length batches against the reference per sequence; the KV cache against
recomputing the whole sequence."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flexflash
import flexflash.compat.flash_attn as flash_attn_module
from flexflash import _paged
from flexflash.compat import _decoding
from flexflash.compat.flash_attn import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

from .helpers import assert_close_to_golden, seed_of, spied_short_path


def attention_ref(q, k, v, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, softmax_scale=None):
    """flash-attn's attention_ref in its layout; returns ``(out, lse)``, computed in float32 (float64
    for float64 inputs). ALiBi with ``causal`` is flash-attn's ``slope * (j - seqlen_k + 1)``, the
    same output as ``-slope * |i + seqlen_k - seqlen_q - j|`` (a constant per row)."""
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    k, v = k.repeat_interleave(H // Hk, dim=2).to(acc), v.repeat_interleave(H // Hk, dim=2).to(acc)
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    s = torch.einsum("bthd,bshd->bhts", q.to(acc), k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    row, col = torch.arange(Sq)[:, None], torch.arange(Sk)[None, :]
    left, right = window_size
    right = 0 if causal else right
    masked = torch.zeros(Sq, Sk, dtype=torch.bool)
    if right >= 0:
        masked |= col > row + Sk - Sq + right
    if left >= 0:
        masked |= col < row + Sk - Sq - left
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(acc)
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        s = s + (slopes * torch.arange(-Sk + 1, 1).to(acc) if causal else -slopes * (row + Sk - Sq - col).abs().to(acc))
    s = s.masked_fill(masked, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhts,bshd->bthd", p, v).to(q.dtype), torch.logsumexp(s, -1)


def _compare(name, run, ref, inputs, dtype, grad=True):
    """``run(*inputs)`` (the compat call) against ``ref(*inputs)`` in the test dtype and in float64,
    forward and, with ``grad``, the gradients of every input."""
    leaves = [t.detach().to(dtype).requires_grad_(grad) for t in inputs]
    gold_leaves = [t.detach().double().requires_grad_(grad) for t in inputs]
    got, want, gold = run(*leaves), ref(*leaves), ref(*gold_leaves)
    assert got.dtype == dtype and got.shape == gold.shape
    assert_close_to_golden(name, got, want, gold, dtype)
    if grad:
        g = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(got.device, dtype)
        got_g = torch.autograd.grad(got, leaves, g)
        want_g = torch.autograd.grad(want, leaves, g)
        gold_g = torch.autograd.grad(gold, gold_leaves, g.double())
        for i, (a, b, c) in enumerate(zip(got_g, want_g, gold_g)):
            assert_close_to_golden(f"{name} d{i}", a, b, c, dtype)
    return got


CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window": dict(window_size=(5, 3)),
    "window_right_only": dict(window_size=(-1, 4)),
    "window_left_causal": dict(window_size=(6, -1), causal=True),
    "softcap": dict(softcap=3.0),
    "alibi": dict(alibi_slopes=torch.rand(4, generator=torch.Generator().manual_seed(2))),
    "alibi_batched_causal_softcap": dict(alibi_slopes=torch.rand(2, 4, generator=torch.Generator().manual_seed(3)),
                                          causal=True, softcap=2.0),
    "scale": dict(softmax_scale=0.3, causal=True),
}


@pytest.mark.parametrize("Sq,Sk", [(17, 17), (13, 29), (29, 13)])
@pytest.mark.parametrize("case", list(CASES))
def test_flash_attn_func_matches_flash_attns_semantics(case, Sq, Sk):
    """Forward and backward (grouped heads 4/2, float32 and bfloat16), the log-sum-exp of
    ``return_attn_probs`` too (rows without a key: out 0, lse -inf)."""
    kw = CASES[case]
    gen = torch.Generator().manual_seed(seed_of(case, Sq, Sk))
    q, k, v = torch.randn(2, Sq, 4, 16, generator=gen), torch.randn(2, Sk, 2, 16, generator=gen), \
        torch.randn(2, Sk, 2, 16, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        _compare(case, lambda *t: flash_attn_func(*t, **kw), lambda *t: attention_ref(*t, **kw)[0], (q, k, v), dtype)
    # float64 inputs are computed in float64 throughout, ALiBi's slopes (float32 here) included
    q64, k64, v64 = q.double(), k.double(), v.double()
    torch.testing.assert_close(flash_attn_func(q64, k64, v64, **kw), attention_ref(q64, k64, v64, **kw)[0],
                               rtol=1e-12, atol=1e-12)  # float64 against float64: rounding alone
    # inputs that require grad: the CPU tiles (no kernel to compile per case); the compiled path is
    # covered by the variable-length and KV-cache tests
    out, lse, probs = flash_attn_func(q.requires_grad_(), k, v, return_attn_probs=True, **kw)
    ref_out, ref_lse = attention_ref(q.double(), k.double(), v.double(), **kw)
    assert probs is None and lse.shape == (2, 4, Sq) and lse.dtype == torch.float32
    torch.testing.assert_close(out.detach().double(), ref_out, rtol=1e-5, atol=1e-5)  # float32 against float64
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    if not (kw.get("causal") and kw.get("alibi_slopes") is not None):  # there the lse differs by a constant per row
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse.detach().double()[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)


def test_packed_functions_equal_the_unpacked_one():
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 21, 3, 4, 16, generator=gen)
    kw = dict(causal=True, window_size=(7, -1))
    want = flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], **kw)
    torch.testing.assert_close(flash_attn_qkvpacked_func(qkv, **kw), want, rtol=0, atol=0)
    torch.testing.assert_close(flash_attn_kvpacked_func(qkv[:, :, 0], qkv[:, :, 1:], **kw), want, rtol=0, atol=0)


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _varlen_ref(q, k, v, cu_q, cu_k, **kw):
    """The reference per sequence, packed again."""
    outs = [attention_ref(q[None, cu_q[i]:cu_q[i + 1]], k[None, cu_k[i]:cu_k[i + 1]], v[None, cu_k[i]:cu_k[i + 1]],
                          **kw)[0][0] for i in range(len(cu_q) - 1)]
    return torch.cat(outs)


VARLEN = {
    "causal": dict(causal=True),
    "window": dict(window_size=(4, 2)),
    "alibi_softcap": dict(alibi_slopes=torch.rand(4, generator=torch.Generator().manual_seed(5)), softcap=2.5),
}


@pytest.mark.parametrize("case", list(VARLEN))
def test_varlen_matches_the_reference_per_sequence(case):
    """Sequences of odd lengths, queries shorter and longer than their keys (bottom-right per
    sequence), an empty query sequence, grouped heads; forward and backward."""
    kw = VARLEN[case]
    lq, lk = [5, 1, 13, 0, 9], [5, 7, 4, 3, 9]
    cu_q, cu_k = _cu(lq), _cu(lk)
    gen = torch.Generator().manual_seed(seed_of("varlen", case))
    q, k, v = (torch.randn(n, h, 16, generator=gen) for n, h in ((sum(lq), 4), (sum(lk), 2), (sum(lk), 2)))
    for dtype in (torch.float32, torch.bfloat16):
        _compare(case, lambda *t: flash_attn_varlen_func(*t, cu_q, cu_k, max(lq), max(lk), **kw),
                 lambda *t: _varlen_ref(*t, cu_q.tolist(), cu_k.tolist(), **kw), (q, k, v), dtype)
    _, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), return_attn_probs=True, **kw)
    assert lse.shape == (4, sum(lq))
    kv = torch.stack([k, v], dim=1)
    torch.testing.assert_close(flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, max(lq), max(lk), **kw),
                               flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), **kw), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["causal_window", "alibi_per_sequence_softcap"])
def test_varlen_paged_keys_and_per_sequence_alibi(case):
    """block_table: each sequence's keys are the first cu_seqlens_k[i + 1] - cu_seqlens_k[i] of its
    pages laid end to end; ALiBi slopes per sequence ``(batch, nheads)``; forward and the gradients
    of q and of the paged caches against the reference per sequence."""
    gen = torch.Generator().manual_seed(seed_of("varlen-paged", case))
    lq, lk, page, blocks = [3, 9, 1], [10, 20, 5], 8, 3  # 24 keys of capacity per sequence
    H, Hk, D = 4, 2, 16
    table = torch.randperm(3 * blocks, generator=gen).view(3, blocks).to(torch.int32)
    kw = (dict(causal=True, window_size=(6, -1)) if case == "causal_window" else
          dict(alibi_slopes=torch.rand(3, H, generator=gen), softcap=2.5))
    q = torch.randn(sum(lq), H, D, generator=gen)
    k_cache, v_cache = torch.randn(3 * blocks, page, Hk, D, generator=gen), torch.randn(3 * blocks, page, Hk, D, generator=gen)
    cu_q, cu_k = _cu(lq), _cu(lk)

    def ref(q, kc, vc):
        outs = []
        for i in range(3):
            keys, values = (c[table[i].long()].flatten(0, 1)[None, :lk[i]] for c in (kc, vc))
            one = {**kw, "alibi_slopes": kw["alibi_slopes"][i:i + 1].to(q.dtype)} if "alibi_slopes" in kw else kw
            outs.append(attention_ref(q[None, int(cu_q[i]):int(cu_q[i + 1])], keys, values, **one)[0][0])
        return torch.cat(outs)

    _compare(case, lambda *t: flash_attn_varlen_func(t[0], t[1], t[2], cu_q, cu_k, max(lq), max(lk),
                                                     block_table=table, **kw),
             ref, (q, k_cache, v_cache), torch.float32)
    with pytest.raises(ValueError, match=r"cu_seqlens_k: sequences of \[10, 30, 5\] keys, expected at most the 24"):
        flash_attn_varlen_func(q, k_cache, v_cache, cu_q, _cu([10, 30, 5]), 9, 30, block_table=table)


def test_varlen_new_lengths_do_not_recompile():
    """Batches of new lengths and offsets (the inference path: compiled FlexAttention) reuse the
    kernel; the qkv-packed entry agrees."""
    gen = torch.Generator().manual_seed(6)
    compiles = None
    for lengths in ([7, 30, 12], [19, 3, 40, 2], [11, 11], [33, 1, 5, 20, 9]):
        cu = _cu(lengths)
        qkv = torch.randn(sum(lengths), 3, 2, 16, generator=gen)
        with torch.no_grad():
            out = flash_attn_varlen_qkvpacked_func(qkv, cu, max(lengths), causal=True)
        want = _varlen_ref(qkv[:, 0].double(), qkv[:, 1].double(), qkv[:, 2].double(), cu.tolist(), cu.tolist(),
                           causal=True)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)  # float32 against float64
        if compiles is None:
            compiles = flexflash.compile_stats()["compiles"]
    assert flexflash.compile_stats()["compiles"] == compiles


def test_varlen_training_inside_a_compiled_model_compiles_once():
    """A packed batch of a fixed token budget (how packed training runs), new sequence boundaries
    and numbers of sequences every step (one sequence included, whose offsets have 2 entries),
    through a small model under ``torch.compile(fullgraph=True)``: the graph compiles again once,
    when the number of sequences first changes (Dynamo's automatic dynamic shapes make it
    symbolic), and never after; each step's loss and gradients equal the eager model's."""
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend("inductor")
    gen = torch.Generator().manual_seed(12)
    total, heads, dim = 48, 2, 16

    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = torch.nn.Linear(heads * dim, 3 * heads * dim), torch.nn.Linear(heads * dim, 4)

        def forward(self, x, cu, max_len):
            q, k, v = self.qkv(x).unflatten(-1, (3, heads, dim)).unbind(1)
            return self.out(flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True).flatten(1))

    model = Packed()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for lengths in ([20, 28], [5, 30, 13], [48], [10, 10, 10, 18], [1, 47], [48]):
        cu = _cu(lengths)
        x = torch.randn(total, heads * dim, generator=gen)
        got = compiled(x, cu, max(lengths)).square().mean()
        got_grads = torch.autograd.grad(got, list(model.parameters()))
        want = model(x, cu, max(lengths)).square().mean()
        want_grads = torch.autograd.grad(want, list(model.parameters()))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # float32 both: summation order only
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 2, counter.frame_count


def _decode_ref(q, keys, values, lengths, **kw):
    """Each sequence's queries against its first ``lengths[b]`` keys (recomputed from scratch)."""
    return torch.cat([attention_ref(q[b:b + 1], keys[b:b + 1, :n], values[b:b + 1, :n], **kw)[0]
                      for b, n in enumerate(lengths)])


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_decoding_equals_recomputing_the_sequence(paged):
    """Prefill, then one token per step with keys and values appended in place: each step equals
    attention over the whole sequence so far, for sequences of different lengths, contiguous or
    paged caches, grouped heads, causal with a window; growing lengths do not recompile."""
    gen = torch.Generator().manual_seed(seed_of("kvcache", paged))
    B, H, Hk, D, S = 3, 4, 2, 16, 48
    full_k, full_v = torch.randn(B, S, Hk, D, generator=gen), torch.randn(B, S, Hk, D, generator=gen)
    start = torch.tensor([5, 17, 1])
    kw = dict(causal=True, window_size=(20, -1))
    if paged:
        page, blocks = 8, 3 * S // 8
        k_cache, v_cache = torch.zeros(blocks, page, Hk, D), torch.zeros(blocks, page, Hk, D)
        table = torch.randperm(blocks, generator=gen).view(B, S // page).to(torch.int32)
    else:
        k_cache, v_cache, table = torch.zeros(B, S, Hk, D), torch.zeros(B, S, Hk, D), None
    lengths = torch.zeros(B, dtype=torch.int32)
    # prefill: the first max(start) tokens of every sequence; decoding then continues each sequence from
    # its own start[b] (the cache beyond holds the same tokens, overwritten as it goes)
    n0 = int(start.max())
    q0 = torch.randn(B, n0, H, D, generator=gen)
    with torch.no_grad():  # several new tokens at once (a prefill): causal among themselves
        out = flash_attn_with_kvcache(q0, k_cache, v_cache, full_k[:, :n0], full_v[:, :n0], cache_seqlens=lengths,
                                      block_table=table, **kw)
    want = attention_ref(q0.double(), full_k[:, :n0].double(), full_v[:, :n0].double(), **kw)[0]
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)  # float32 against float64
    lengths = start.to(torch.int32)
    compiles = None
    for step in range(4):
        q = torch.randn(B, 1, H, D, generator=gen)
        pos = lengths.long()
        new_k = full_k[torch.arange(B), pos][:, None]
        new_v = full_v[torch.arange(B), pos][:, None]
        with torch.no_grad():
            out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, new_k, new_v, cache_seqlens=lengths,
                                               block_table=table, return_softmax_lse=True, **kw)
        lengths = lengths + 1
        want = _decode_ref(q.double(), full_k.double(), full_v.double(), lengths.tolist(), **kw)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)  # float32 against float64
        assert lse.shape == (B, H, 1)
        if compiles is None:
            compiles = flexflash.compile_stats()["compiles"]
    assert flexflash.compile_stats()["compiles"] == compiles
    if not paged:  # the steps of one shape evaluated their masks over the same kept index grids
        assert (1, S, q.device) in flash_attn_module._GRIDS
    cached = k_cache[table.long()].flatten(1, 2) if paged else k_cache
    for b in range(B):  # the cache holds every token appended
        n = int(lengths[b])
        torch.testing.assert_close(cached[b, :n], full_k[b, :n], rtol=0, atol=0)


def _rotary_ref(x, cos, sin, positions, interleaved):
    """Rotary embedding as a complex rotation: dims ``(2i, 2i + 1)`` (interleaved) or ``(i, i + r/2)``
    are the real and imaginary parts of a number multiplied by ``cos + i sin`` at each position."""
    half = cos.shape[1]
    rot = x[..., :2 * half].double()
    pairs = rot.unflatten(-1, (half, 2)) if interleaved else torch.stack([rot[..., :half], rot[..., half:]], -1)
    turned = torch.view_as_complex(pairs.contiguous()) * torch.complex(cos.double(), sin.double())[positions][:, :, None]
    out = torch.view_as_real(turned)
    out = out.flatten(-2) if interleaved else torch.cat([out[..., 0], out[..., 1]], -1)
    return torch.cat([out, x[..., 2 * half:].double()], -1)


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_rotary_and_left_padding_follow_flash_attns_semantics(paged):
    """flash-attn's documented rules: new keys rotated at cache_seqlens, cache_seqlens + 1, ...
    before they are written; q at the same positions when causal or local, else all at
    cache_seqlens; keys before cache_leftpad unseen, causal still aligned to the end. Both pair
    layouts, rotary_dim < headdim, causal and not."""
    gen = torch.Generator().manual_seed(seed_of("rotary", paged))
    B, H, Hk, D, S, new = 3, 4, 2, 16, 24, 2
    angles = torch.rand(S, 4, generator=gen) * 6.3  # rotary_dim 8 of headdim 16
    cos, sin = angles.cos(), angles.sin()
    seqlens, leftpad = torch.tensor([6, 10, 3], dtype=torch.int32), torch.tensor([0, 3, 2], dtype=torch.int32)
    for interleaved in (True, False):
        for causal in (True, False):
            k_init, v_init = torch.randn(B, S, Hk, D, generator=gen), torch.randn(B, S, Hk, D, generator=gen)
            q = torch.randn(B, new, H, D, generator=gen)
            k, v = torch.randn(B, new, Hk, D, generator=gen), torch.randn(B, new, Hk, D, generator=gen)
            if paged:
                page = 8
                table = torch.randperm(B * S // page, generator=gen).view(B, S // page).to(torch.int32)
                k_cache, v_cache = (torch.zeros(B * S // page, page, Hk, D) for _ in range(2))
                for c, init in ((k_cache, k_init), (v_cache, v_init)):
                    c[table.long()] = init.unflatten(1, (S // page, page))
            else:
                table, k_cache, v_cache = None, k_init.clone(), v_init.clone()
            with torch.no_grad():
                out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                              cache_seqlens=seqlens, cache_leftpad=leftpad, block_table=table,
                                              causal=causal, rotary_interleaved=interleaved)
            pos = seqlens.long()[:, None] + torch.arange(new)
            q_ro = _rotary_ref(q, cos, sin, pos if causal else seqlens.long()[:, None].expand(B, new), interleaved)
            k_ro = _rotary_ref(k, cos, sin, pos, interleaved)
            keys, values = k_init.double(), v_init.double()
            keys[torch.arange(B)[:, None], pos], values[torch.arange(B)[:, None], pos] = k_ro, v.double()
            want = torch.cat([attention_ref(q_ro[b:b + 1], keys[b:b + 1, lo:hi], values[b:b + 1, lo:hi],
                                            causal=causal)[0]
                              for b, (lo, hi) in enumerate(zip(leftpad.tolist(), (seqlens + new).tolist()))])
            what = f"interleaved={interleaved} causal={causal}"
            torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")
            cached = k_cache[table.long()].flatten(1, 2) if paged else k_cache
            torch.testing.assert_close(cached.double(), keys, rtol=1e-6, atol=1e-6)  # rotated keys, written in place
            if not paged:  # float64 inputs are rotated and attended in float64: rounding alone
                caches64 = k_init.double(), v_init.double()
                with torch.no_grad():
                    out64 = flash_attn_with_kvcache(q.double(), *caches64, k.double(), v.double(), rotary_cos=cos,
                                                    rotary_sin=sin, cache_seqlens=seqlens, cache_leftpad=leftpad,
                                                    causal=causal, rotary_interleaved=interleaved)
                torch.testing.assert_close(out64, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: {m}")
                torch.testing.assert_close(caches64[0], keys, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows", [0, 16])
def test_kvcache_masks_as_a_function_and_as_a_tensor(rows, monkeypatch):
    """A call with few new query tokens builds its mask as a tensor (``_TENSOR_MASK_ROWS``), one
    with more as a mask function; each way, with left padding, windows, causal, soft-capping and
    ALiBi, gives flash-attn's semantics (checked per sequence on its keys cache_leftpad to the end)."""
    from flexflash.compat import flash_attn as fa
    monkeypatch.setattr(fa, "_TENSOR_MASK_ROWS", rows)
    gen = torch.Generator().manual_seed(seed_of("cache-mask", rows))
    B, H, Hk, D, S = 3, 4, 2, 16, 20
    k_cache, v_cache = torch.randn(B, S, Hk, D, generator=gen), torch.randn(B, S, Hk, D, generator=gen)
    lens, leftpad = torch.tensor([20, 9, 4], dtype=torch.int32), torch.tensor([2, 0, 1], dtype=torch.int32)
    slopes = torch.rand(B, H, generator=gen)
    for Sq, kw in ((1, dict(causal=True, window_size=(5, -1))), (3, dict(causal=True, softcap=2.0)),
                   (2, dict(window_size=(2, 1), alibi_slopes=slopes))):
        q = torch.randn(B, Sq, H, D, generator=gen)
        with torch.no_grad():
            out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, cache_leftpad=leftpad, **kw)
        for b, (lo, hi) in enumerate(zip(leftpad.tolist(), lens.tolist())):
            one = {**kw, "alibi_slopes": slopes[b:b + 1].double()} if "alibi_slopes" in kw else kw
            want = attention_ref(q[b:b + 1].double(), k_cache[b:b + 1, lo:hi].double(),
                                 v_cache[b:b + 1, lo:hi].double(), **one)[0]
            torch.testing.assert_close(out[b:b + 1].double(), want, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"Sq={Sq} {sorted(kw)} sequence {b}: {m}")


def test_kvcache_batch_index_and_refusals():
    gen = torch.Generator().manual_seed(7)
    k_cache, v_cache = torch.randn(5, 12, 2, 16, generator=gen), torch.randn(5, 12, 2, 16, generator=gen)
    q = torch.randn(2, 1, 2, 16, generator=gen)
    idx = torch.tensor([3, 0])
    lengths = torch.tensor([7, 12])
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, cache_batch_idx=idx)
    want = _decode_ref(q.double(), k_cache[idx].double(), v_cache[idx].double(), lengths.tolist())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)  # float32 against float64
    cos = torch.ones(12, 4)
    with pytest.raises(ValueError, match="rotary_cos and rotary_sin: rotary embeddings apply to new keys"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, cache_batch_idx=idx, rotary_cos=cos,
                                rotary_sin=cos)
    with pytest.raises(ValueError, match="rotary_cos and rotary_sin: expected both"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, cache_batch_idx=idx, rotary_cos=cos)
    with pytest.raises(ValueError, match=r"rotary_cos: 12 positions, expected at least 13"):
        one = torch.randn(2, 1, 2, 16, generator=gen)
        flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), one, one, cache_seqlens=lengths,
                                cache_batch_idx=idx, rotary_cos=cos, rotary_sin=cos)
    with pytest.raises(ValueError, match=r"rotary_cos: expected \(seqlen_ro, rotary_dim / 2\) with rotary_dim <= headdim"):
        flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), one, one, cache_seqlens=lengths - 1,
                                cache_batch_idx=idx, rotary_cos=torch.ones(12, 9), rotary_sin=torch.ones(12, 9))
    with pytest.raises(ValueError, match=r"cache_leftpad: expected an int or a \(2,\) integer tensor"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, cache_batch_idx=idx,
                                cache_leftpad=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_batch_idx=idx)
    with pytest.raises(ValueError, match="overflows the cache of 12 tokens"):
        two = torch.randn(2, 2, 2, 16, generator=gen)  # two new tokens: the first sequence's 11 + 2 > 12
        flash_attn_with_kvcache(torch.randn(2, 2, 2, 16, generator=gen), k_cache, v_cache, two, two,
                                cache_seqlens=torch.tensor([11, 3]), cache_batch_idx=idx)
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(q, q, q, window_size=3)
    with pytest.raises(ValueError, match=r"q: expected a 4-D tensor \(batch, seqlen, nheads, headdim\)"):
        flash_attn_func(q[0], q, q)


@pytest.fixture
def pages_in_place_on_cpu(monkeypatch):
    """Paged caches read in place on CPU too (by default on CUDA alone: flexflash._paged), and the
    eager calls that do so counted (not those a caller's torch.compile traces: the count would be
    state the caller's graph guards on)."""
    monkeypatch.setitem(_paged.IN_PLACE_MIN_BLOCK, "cpu", 8)
    calls = []
    real = flash_attn_module.paged_attention

    def counted(*args, **kwargs):
        if not torch.compiler.is_compiling():
            calls.append(args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(flash_attn_module, "paged_attention", counted)
    return calls


@pytest.mark.parametrize("layout", ["pages", "rows"])
def test_kvcache_read_in_place_equals_recomputing_the_sequence(layout, pages_in_place_on_cpu):
    """Decoding steps that read the cache in place (FlexAttention over the pool of pages, no copy of
    the sequences' keys): pages of a block table (in a pool with pages no sequence uses, left
    padding, per-sequence ALiBi, a causal window, grouped heads, one new token a step) or rows of
    ``cache_batch_idx`` (soft-capping, three new tokens a step); each step equals attention over
    the whole sequence so far, and growing lengths do not recompile."""
    gen = torch.Generator().manual_seed(seed_of("in-place", layout))
    B, H, Hk, D, S = 3, 4, 2, 16, 48
    full_k, full_v = torch.randn(B, S, Hk, D, generator=gen), torch.randn(B, S, Hk, D, generator=gen)
    start = torch.tensor([5, 17, 1], dtype=torch.int32)
    extra, lo = {}, torch.zeros(B, dtype=torch.int32)
    if layout == "pages":
        page, n = 8, 1
        pool = B * S // page + 2
        table = torch.randperm(pool, generator=gen)[:B * S // page].view(B, S // page).to(torch.int32)
        k_cache, v_cache = torch.randn(pool, page, Hk, D, generator=gen), torch.randn(pool, page, Hk, D, generator=gen)
        for c, full in ((k_cache, full_k), (v_cache, full_v)):
            c[table.long()] = full.unflatten(1, (S // page, page))
        lo = torch.tensor([2, 0, 1], dtype=torch.int32)
        extra = dict(block_table=table, cache_leftpad=lo)
        kw = dict(causal=True, window_size=(20, -1), alibi_slopes=torch.rand(B, H, generator=gen))
    else:
        n = 3
        idx = torch.tensor([4, 0, 2])
        k_cache, v_cache = torch.randn(5, S, Hk, D, generator=gen), torch.randn(5, S, Hk, D, generator=gen)
        k_cache[idx], v_cache[idx] = full_k, full_v
        extra = dict(cache_batch_idx=idx)
        kw = dict(causal=True, softcap=2.5)
    lengths, compiles = start, None
    for step in range(3):
        q = torch.randn(B, n, H, D, generator=gen)
        pos = lengths.long()[:, None] + torch.arange(n)
        rows = torch.arange(B)[:, None]
        with torch.no_grad():
            out = flash_attn_with_kvcache(q, k_cache, v_cache, full_k[rows, pos], full_v[rows, pos],
                                          cache_seqlens=lengths, **extra, **kw)
        lengths = lengths + n
        for b in range(B):
            one = {**kw, "alibi_slopes": kw["alibi_slopes"][b:b + 1].double()} if "alibi_slopes" in kw else kw
            keys = slice(int(lo[b]), int(lengths[b]))
            want = attention_ref(q[b:b + 1].double(), full_k[b:b + 1, keys].double(), full_v[b:b + 1, keys].double(),
                                 **one)[0]
            torch.testing.assert_close(out[b:b + 1].double(), want, rtol=1e-5, atol=1e-5)  # float32 against float64
        if compiles is None:
            compiles = flexflash.compile_stats()["compiles"]
    assert flexflash.compile_stats()["compiles"] == compiles
    assert len(pages_in_place_on_cpu) == 3


@pytest.mark.parametrize("queries", ["few", "blocks"])
def test_varlen_read_in_place_from_shared_pages(queries, pages_in_place_on_cpu):
    """Packed sequences whose keys are read in place from a block table where two sequences share
    their first page (a common prefix: one physical block listed for both, visited once per query),
    entries past a sequence's keys hold anything (a negative index), and one sequence has no
    queries; per-sequence ALiBi, against the reference per sequence. Fewer queries than a query
    block (as in decoding: no full blocks, see flexflash._paged), causal; or a query block of one
    sequence's queries, not causal (full blocks)."""
    gen = torch.Generator().manual_seed(seed_of("shared-pages", queries))
    H, Hk, D, page, L = 4, 2, 16, 8, 4
    lq, lk = ([3, 9, 0, 5] if queries == "few" else [3, 256, 0, 5]), [10, 20, 7, 16]
    causal = queries == "few"
    pool = len(lq) * L + 2
    table = torch.randperm(pool, generator=gen)[:len(lq) * L].view(len(lq), L).to(torch.int32)
    table[1, 0] = table[0, 0]
    table[0, 3] = -5  # sequence 0 has 10 keys: its third and fourth entries are not read
    k_cache, v_cache = torch.randn(pool, page, Hk, D, generator=gen), torch.randn(pool, page, Hk, D, generator=gen)
    q = torch.randn(sum(lq), H, D, generator=gen)
    cu_q, cu_k = _cu(lq), _cu(lk)
    kw = dict(causal=causal, alibi_slopes=torch.rand(len(lq), H, generator=gen))
    with torch.no_grad():
        out = flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max(lq), max(lk), block_table=table, **kw)
    assert len(pages_in_place_on_cpu) == 1
    for i in range(len(lq)):
        keys, values = (c[table[i].long()].flatten(0, 1)[None, :lk[i]].double() for c in (k_cache, v_cache))
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        want = attention_ref(q[None, rows].double(), keys, values, causal=causal,
                             alibi_slopes=kw["alibi_slopes"][i:i + 1].double())[0][0]
        torch.testing.assert_close(out[rows].double(), want, rtol=1e-5, atol=1e-5)  # float32 against float64


def test_compiled_paged_block_builder_equals_the_eager_build(pages_in_place_on_cpu, monkeypatch):
    """The compiled builder of paged block masks (CUDA's, compiled here on CPU: flexflash._paged)
    gives the kernel the blocks of the eager build, from the second build of a kind on: decoding
    steps of growing lengths (one compilation for all of them, no full blocks) and packed
    sequences sharing a page (full blocks); the outputs are bitwise equal."""
    from flexflash import _blockmask
    gen = torch.Generator().manual_seed(18)
    B, H, Hk, D, page, L = 3, 4, 2, 16, 8, 6
    pool = B * L + 2
    k_cache, v_cache = torch.randn(pool, page, Hk, D, generator=gen), torch.randn(pool, page, Hk, D, generator=gen)
    table = torch.randperm(pool, generator=gen)[:B * L].view(B, L).to(torch.int32)
    shared = table.flatten()[:16].view(4, 4).clone()  # four sequences of four pages
    shared[1, 0] = shared[0, 0]
    lq, lk = [3, 140, 0, 5], [10, 20, 7, 16]

    def both(call):
        monkeypatch.setattr(_paged, "COMPILED_BUILDS_ON", set())
        with torch.no_grad():
            eager = call()
        monkeypatch.setattr(_paged, "COMPILED_BUILDS_ON", {"cpu"})
        with torch.no_grad():
            compiled = call()
        assert torch.equal(eager, compiled)

    lengths = torch.tensor([3, 20, 40], dtype=torch.int32)
    for _ in range(4):
        q = torch.randn(B, 1, H, D, generator=gen)
        both(lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, block_table=table,
                                             causal=True, window_size=(9, -1)))
        lengths = lengths + 5
    for _ in range(2):
        q = torch.randn(sum(lq), H, D, generator=gen)
        both(lambda: flash_attn_varlen_func(q, k_cache, v_cache, _cu(lq), _cu(lk), max(lq), max(lk),
                                            block_table=shared))
    builders = [b for key, b in _blockmask._BUILDERS.items() if key[0] == "paged"]
    # decoding (its first build eager; the CPU kernel's retry with static shapes builds once more)
    # and packed sequences: each compiled once
    assert sorted((b.static.full_blocks, b.compiles) for b in builders) == [(False, 1), (True, 1)]


def test_varlen_reading_pages_in_place_compiles_once_under_the_callers_torch_compile(pages_in_place_on_cpu):
    """Packed batches of new lengths (a shared prefix page) read in place inside the caller's
    ``torch.compile(fullgraph=True)`` (aot_eager, as the decoding test above): the second batch's
    new lengths make them symbolic, and no batch after compiles again; each equals the eager call."""
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend("aot_eager")
    gen = torch.Generator().manual_seed(19)
    H, Hk, D, page = 4, 2, 16, 8
    k_cache, v_cache = torch.randn(18, page, Hk, D, generator=gen), torch.randn(18, page, Hk, D, generator=gen)
    table = torch.randperm(18, generator=gen)[:16].view(4, 4).to(torch.int32)
    table[1, 0] = table[0, 0]

    @torch.compile(backend=counter, fullgraph=True)
    def step(q, cu_q, cu_k):
        return flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 32, 32, block_table=table, causal=True)

    graphs = []
    for lq, lk in (([3, 9, 0, 5], [10, 20, 7, 16]), ([4, 2, 1, 6], [11, 12, 9, 30]), ([7, 1, 2, 2], [8, 32, 2, 5]),
                   ([1, 1, 1, 1], [3, 5, 7, 9])):
        q = torch.randn(sum(lq), H, D, generator=gen)
        with torch.no_grad():
            out = step(q, _cu(lq), _cu(lk))
            want = flash_attn_varlen_func(q, k_cache, v_cache, _cu(lq), _cu(lk), 32, 32, block_table=table, causal=True)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)  # float32 both: summation order only
        graphs.append(counter.frame_count)
    assert graphs == [1, 2, 2, 2], graphs
    assert len(pages_in_place_on_cpu) == 4  # the eager calls


def test_pages_are_gathered_where_they_cannot_be_read_in_place(pages_in_place_on_cpu):
    """Gradients, float64, the log-sum-exp on CPU (FlexAttention's CPU kernel returns none), pages
    of a size the key blocks do not divide and pages that do not lie end to end in memory take a
    gathered copy, with the same results."""
    B, H, Hk, D = 2, 2, 1, 16
    lengths = torch.tensor([9, 30], dtype=torch.int32)

    def call(page, dtype=torch.float32, grad=False, lse=False, strided=False):
        pool, L = 16, 32 // page
        table = torch.randperm(pool, generator=torch.Generator().manual_seed(page))[:B * L].view(B, L).int()
        caches = [torch.randn(pool, page, Hk, D, generator=torch.Generator().manual_seed(i)).to(dtype) for i in (1, 2)]
        if strided:  # the same values, pages interleaved in memory
            caches = [c.transpose(0, 1).contiguous().transpose(0, 1) for c in caches]
        q = torch.randn(B, 1, H, D, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_(grad)
        result = flash_attn_with_kvcache(q, *caches, cache_seqlens=lengths, block_table=table, causal=True,
                                         return_softmax_lse=lse)
        out = result[0] if lse else result
        keys, values = (c[table.long()].flatten(1, 2).double() for c in caches)
        torch.testing.assert_close(out.detach().double(), _decode_ref(q.detach().double(), keys, values,
                                                                      lengths.tolist(), causal=True),
                                   rtol=1e-5, atol=1e-5)  # float32 (or float64) against float64

    for kwargs in (dict(page=8, grad=True), dict(page=8, dtype=torch.float64), dict(page=8, lse=True),
                   dict(page=4), dict(page=8, strided=True)):
        with torch.no_grad() if not kwargs.get("grad") else torch.enable_grad():
            call(**kwargs)
    assert pages_in_place_on_cpu == []
    meta = torch.zeros(1, 1, 1, 1, device="meta")
    assert _paged.kv_block(256, meta, False, meta, meta) is None  # no device of that type (meta: any cache)


def test_16_bit_pages_are_read_in_place_by_compiled_or_large_decoding_calls_alone(monkeypatch):
    """The rule of flexflash._paged for 16-bit pages on CUDA (IN_PLACE_DECODING_DTYPES), set up for
    the CPU here: a call with the shape of FlexAttention's decoding kernel (few queries, power-of-two
    groups of query heads) reads them in place where it is traced into a caller's torch.compile, or
    where its gather would copy at least IN_PLACE_EAGER_ELEMENTS elements of each cache (the pages
    of its table, whatever their lengths); smaller eager calls and other shapes gather them; float32
    pages are read in place by every call."""
    monkeypatch.setitem(_paged.IN_PLACE_MIN_BLOCK, "cpu", 128)
    monkeypatch.setitem(_paged.IN_PLACE_DTYPES, "cpu", (torch.float32,))
    monkeypatch.setitem(_paged.IN_PLACE_DECODING_DTYPES, "cpu", (torch.bfloat16,))
    pages = torch.zeros(6, 256, 2, 16, dtype=torch.bfloat16)
    per_page = 256 * 2 * 16
    traced = torch.compile(lambda q, k, t: _paged.reads_in_place(q, k, k, False, t), backend="eager", fullgraph=True)

    def in_place(batch, heads, queries, dtype=torch.bfloat16, compiled=True, width=2):
        q = torch.zeros(batch, heads, queries, 16, dtype=dtype)
        table = torch.zeros(batch, width, dtype=torch.int32)  # every row reads page 0: the gather copies it each time
        reads = (traced if compiled else lambda q, k, t: _paged.reads_in_place(q, k, k, False, t))(
            q, pages.to(dtype), table)
        if not compiled:  # paged_attention's own check (kv_block) accepts the calls read in place
            assert reads == (_paged.kv_block(256, q, False, pages.to(dtype), table) is not None)
        return reads

    assert in_place(3, 8, 1) and in_place(3, 8, 2) and in_place(1, 4, 64)  # groups 4 and 2
    assert not in_place(3, 8, 1, compiled=False) and not in_place(1, 4, 64, compiled=False)  # eager: gathered
    assert not in_place(3, 6, 1)  # groups of 3: not the decoding kernel's
    assert not in_place(3, 8, 40)  # 160 grouped rows round to 256: wider than the 128-row block
    assert not in_place(1, 8, 340)  # a packed call of 340 queries: the main kernel
    assert in_place(1, 8, 340, torch.float32) and in_place(3, 6, 1, torch.float32, compiled=False)
    assert not in_place(3, 8, 1, torch.float16)  # a dtype in neither table
    # Eager calls whose gather copies 3 x 4 pages (3 sequences of 4 table entries) and more: read in place
    monkeypatch.setitem(_paged.IN_PLACE_EAGER_ELEMENTS, "cpu", 12 * per_page)
    assert in_place(3, 8, 1, compiled=False, width=4) and in_place(4, 8, 1, compiled=False, width=3)
    assert not in_place(3, 8, 1, compiled=False, width=3) and not in_place(11, 8, 1, compiled=False, width=1)
    assert not in_place(3, 6, 1, compiled=False, width=8)  # groups of 3: gathered, however large
    assert not in_place(1, 8, 340, compiled=False, width=24)  # a packed call: the main kernel


def test_keywords_of_other_apis_name_flexflashs():
    """Habits from SDPA and flash-attn meet an error naming flexflash's argument, not a bare TypeError."""
    q = torch.randn(1, 2, 8, 16)
    for name, value, hint in (("is_causal", True, "causal=True"), ("attn_mask", None, "mask="),
                              ("softmax_scale", 0.5, "scale="), ("window_size", (4, 0), "sliding_window")):
        with pytest.raises(TypeError, match=f"{name}: flexflash.attention uses .*{hint}"):
            flexflash.attention(q, q, q, **{name: value})
        with pytest.raises(TypeError, match=f"explain: unknown keyword.*\n  {name}: flexflash.attention uses"):
            flexflash.explain(q, q, q, **{name: value})
    with pytest.raises(TypeError, match="casual: not a keyword of flexflash.attention"):
        flexflash.attention(q, q, q, casual=True)


@pytest.mark.parametrize("layout", ["contiguous", "pages_in_place", "pages_in_place_fused",
                                    "bf16_pages_in_place_when_traced"])
def test_a_decoding_step_compiles_once_under_the_callers_torch_compile(layout, request, monkeypatch):
    """A decoding step (append the new token's key and value in place, attend to the cache) inside
    the caller's ``torch.compile(fullgraph=True)``: the growing cache lengths compile no new graph,
    and each step equals the eager call on the updated cache. With a paged cache read in place, the
    block mask over the logical keys, its mapping to the pool's blocks and the kernel trace into
    the caller's graph (for the aot_eager backend: Inductor's CPU code generation fails on that
    graph, see flexflash._paged; Inductor compiles it on the GPU, in the reduce-overhead test).
    bfloat16 pages under CUDA's rule (IN_PLACE_DECODING_DTYPES, set up for the CPU): read in place
    inside the graph, gathered by the eager calls; the rule's shape test adds no recompilation.
    ``pages_in_place_fused``: the paged block mask built by its compiled builder's body inside the
    graph (``_paged.TRACED_BUILDS_ON``), and by the compiled builder in eager calls."""
    from torch._dynamo.testing import CompileCounterWithBackend
    gen = torch.Generator().manual_seed(8)
    B, H, Hk, D, S = 2, 4, 2, 16, 32
    dtype = torch.bfloat16 if layout.startswith("bf16") else torch.float32
    if layout == "contiguous":
        counter, table = CompileCounterWithBackend("inductor"), None
        k_cache, v_cache = torch.zeros(B, S, Hk, D), torch.zeros(B, S, Hk, D)
    else:
        counted = request.getfixturevalue("pages_in_place_on_cpu")
        if layout == "pages_in_place_fused":
            monkeypatch.setattr(_paged, "COMPILED_BUILDS_ON", {"cpu"})
            monkeypatch.setattr(_paged, "TRACED_BUILDS_ON", {"cpu"})
        if dtype == torch.bfloat16:
            monkeypatch.setitem(_paged.IN_PLACE_DTYPES, "cpu", (torch.float32,))
            monkeypatch.setitem(_paged.IN_PLACE_DECODING_DTYPES, "cpu", (torch.bfloat16,))
        counter = CompileCounterWithBackend("aot_eager")
        k_cache, v_cache = torch.zeros(10, 8, Hk, D, dtype=dtype), torch.zeros(10, 8, Hk, D, dtype=dtype)
        table = torch.tensor([[7, 2, 9, 0], [4, 1, 8, 3]], dtype=torch.int32)

    @torch.compile(backend=counter, fullgraph=True)
    def step(q, k, v, k_cache, v_cache, lengths):
        return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths, block_table=table,
                                       causal=True)

    lengths = torch.tensor([3, 9], dtype=torch.int32)
    graphs = []
    # float32: summation order only; bfloat16: outputs rounded apart by at most a unit (2^-8 relative)
    # by the two kernels (and the reference's own rounding), atol for those near 0
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    for _ in range(4):
        q, k, v = (torch.randn(B, 1, h, D, generator=gen, dtype=dtype) for h in (H, Hk, Hk))
        with torch.no_grad():
            out = step(q, k, v, k_cache, v_cache, lengths)
            want = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths + 1, block_table=table,
                                           causal=True)
        torch.testing.assert_close(out, want, **tol)
        if table is not None:  # and the reference, over the gathered pages
            keys, values = (c[table.long()].flatten(1, 2).double() for c in (k_cache, v_cache))
            ref = _decode_ref(q.double(), keys, values, (lengths + 1).tolist(), causal=True)
            torch.testing.assert_close(out.double(), ref.to(dtype).double() if dtype != torch.float32 else ref,
                                       **(tol if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5)))
        lengths = lengths + 1
        graphs.append(counter.frame_count)
    assert graphs == [1, 1, 1, 1], graphs
    if table is not None:  # the eager calls read float32 pages in place too, and gather bfloat16 ones
        assert len(counted) == (4 if dtype == torch.float32 else 0)
        # the graph reads the pool in place: a (1, nheads_k, num_blocks * page_block_size, headdim) view of
        # it (the gathered keys would be (batch, nheads_k, keys, headdim))
        shapes = [tuple(str(d) for d in v.shape) for n in counter.graphs[0].graph.nodes
                  if isinstance(v := n.meta.get("example_value"), torch.Tensor) and v.dim() == 4]
        assert any(s[:2] == ("1", str(Hk)) and s[3] == str(D) for s in shapes), shapes


def test_a_rotary_left_padded_decoding_step_compiles_once_under_the_callers_torch_compile():
    """The same with rotary embeddings and a left-padded cache: one graph over the steps, each
    step's output and written cache equal to the eager call's on a copy of the cache."""
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend("inductor")
    gen = torch.Generator().manual_seed(18)
    B, H, Hk, D, S = 2, 4, 2, 16, 32
    angles = torch.rand(S, 4, generator=gen) * 6.3
    kw = dict(rotary_cos=angles.cos(), rotary_sin=angles.sin(), cache_leftpad=torch.tensor([0, 4], dtype=torch.int32),
              causal=True, window_size=(6, -1))
    k_cache, v_cache = torch.randn(B, S, Hk, D, generator=gen), torch.randn(B, S, Hk, D, generator=gen)

    @torch.compile(backend=counter, fullgraph=True)
    def step(q, k, v, k_cache, v_cache, lengths):
        return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths, **kw)

    lengths = torch.tensor([3, 9], dtype=torch.int32)
    graphs = []
    for _ in range(4):
        q, k, v = (torch.randn(B, 1, h, D, generator=gen) for h in (H, Hk, Hk))
        eager_k, eager_v = k_cache.clone(), v_cache.clone()
        with torch.no_grad():
            want = flash_attn_with_kvcache(q, eager_k, eager_v, k, v, cache_seqlens=lengths, **kw)
            out = step(q, k, v, k_cache, v_cache, lengths)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)  # float32 both: summation order only
        torch.testing.assert_close(k_cache, eager_k, rtol=1e-6, atol=1e-6)  # the rotated keys written alike
        lengths = lengths + 1
        graphs.append(counter.frame_count)
    assert graphs == [1, 1, 1, 1], graphs


@given(
    Sq=st.integers(1, 40), Sk=st.integers(1, 40), heads=st.sampled_from([(2, 2), (4, 2), (4, 1)]),
    D=st.sampled_from([8, 16, 24]), causal=st.booleans(), left=st.integers(-1, 12), right=st.integers(-1, 12),
    softcap=st.sampled_from([0.0, 2.5]), alibi=st.booleans(), seed=st.integers(0, 2**16),
)
def test_property_flash_attn_func_against_flash_attns_semantics(Sq, Sk, heads, D, causal, left, right, softcap, alibi,
                                                                 seed):
    """Random lengths, heads, windows, soft-capping and ALiBi: forward and backward against the
    reference (inputs that require grad: the CPU tiles, no compilation per example)."""
    H, Hk = heads
    gen = torch.Generator().manual_seed(seed)
    kw = dict(causal=causal, window_size=(left, right), softcap=softcap,
              alibi_slopes=torch.rand(H, generator=gen) if alibi else None)
    q, k, v = torch.randn(2, Sq, H, D, generator=gen), torch.randn(2, Sk, Hk, D, generator=gen), \
        torch.randn(2, Sk, Hk, D, generator=gen)
    _compare("property", lambda *t: flash_attn_func(*t, **kw), lambda *t: attention_ref(*t, **kw)[0], (q, k, v),
             torch.float32)


@given(
    B=st.integers(1, 3), S=st.sampled_from([8, 16, 24, 40]), Sq=st.integers(1, 20),
    heads=st.sampled_from([(2, 2), (4, 2), (4, 1)]), causal=st.booleans(), left=st.integers(-1, 9),
    right=st.integers(-1, 9), softcap=st.sampled_from([0.0, 2.5]), alibi=st.booleans(), leftpad=st.booleans(),
    paged=st.booleans(), seed=st.integers(0, 2**16),
)
def test_property_kvcache_against_flash_attns_semantics(B, S, Sq, heads, causal, left, right, softcap, alibi, leftpad,
                                                        paged, seed):
    """Random caches (contiguous or paged, left-padded or not, filled to random lengths), new tokens
    appended in place, windows, soft-capping, ALiBi, grouped heads, up to 20 new query tokens (both
    mask constructions): each sequence against the reference over its keys, cache_leftpad to the end
    of the new tokens. (q requires grad: the CPU tiles, no compilation per example.)"""
    H, Hk = heads
    D, page = 16, 8
    Sq = min(Sq, S)
    gen = torch.Generator().manual_seed(seed)
    seqlens = torch.randint(0, S - Sq + 1, (B,), generator=gen, dtype=torch.int32)
    start = (torch.rand(B, generator=gen) * (seqlens + 1)).long().clamp(max=seqlens.long()).to(torch.int32)
    kw = dict(causal=causal, window_size=(left, right), softcap=softcap,
              alibi_slopes=torch.rand(B, H, generator=gen) if alibi else None)
    k_init, v_init = torch.randn(B, S, Hk, D, generator=gen), torch.randn(B, S, Hk, D, generator=gen)
    q = torch.randn(B, Sq, H, D, generator=gen, requires_grad=True)
    k, v = torch.randn(B, Sq, Hk, D, generator=gen), torch.randn(B, Sq, Hk, D, generator=gen)
    table = None
    if paged:
        table = torch.randperm(B * S // page, generator=gen).view(B, S // page).to(torch.int32)
        k_cache, v_cache = (torch.zeros(B * S // page, page, Hk, D) for _ in range(2))
        for c, init in ((k_cache, k_init), (v_cache, v_init)):
            c[table.long()] = init.unflatten(1, (S // page, page))
    else:
        k_cache, v_cache = k_init.clone(), v_init.clone()
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table,
                                  cache_leftpad=start if leftpad else None, **kw)
    pos = seqlens.long()[:, None] + torch.arange(Sq)
    keys, values = k_init.double(), v_init.double()
    keys[torch.arange(B)[:, None], pos], values[torch.arange(B)[:, None], pos] = k.double(), v.double()
    for b in range(B):
        lo, hi = (int(start[b]) if leftpad else 0), int(seqlens[b]) + Sq
        one = {**kw, "alibi_slopes": kw["alibi_slopes"][b:b + 1].double()} if alibi else kw
        want = attention_ref(q[b:b + 1].detach().double(), keys[b:b + 1, lo:hi], values[b:b + 1, lo:hi], **one)[0]
        torch.testing.assert_close(out[b:b + 1].detach().double(), want, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"sequence {b} of keys {lo}:{hi}: {m}")


def test_one_new_token_under_every_window_and_causal_flag():
    """One query per sequence (a decoding step) is aligned with its sequence's last key: causal and
    right windows allow every key up to it, left windows bound it from below, left padding from the
    start. Each combination, eagerly with the mask as a tensor, against the reference."""
    gen = torch.Generator().manual_seed(seed_of("one token"))
    B, S, H, Hk, D = 3, 40, 4, 2, 16
    seqlens = torch.tensor([0, 17, 39], dtype=torch.int32)
    start = torch.tensor([0, 5, 30], dtype=torch.int32)
    k_init, v_init = torch.randn(B, S, Hk, D, generator=gen), torch.randn(B, S, Hk, D, generator=gen)
    q = torch.randn(B, 1, H, D, generator=gen)
    for causal in (False, True):
        for window in ((-1, -1), (-1, 0), (-1, 3), (4, -1), (4, 0), (0, 2)):
            for leftpad in (False, True):
                kw = dict(causal=causal, window_size=window)
                with torch.no_grad():
                    out = flash_attn_with_kvcache(q, k_init, v_init, cache_seqlens=seqlens + 1,
                                                  cache_leftpad=start if leftpad else None, **kw)
                for b in range(B):
                    lo, hi = (int(start[b]) if leftpad else 0), int(seqlens[b]) + 1
                    want = attention_ref(q[b:b + 1].double(), k_init[b:b + 1, lo:hi].double(),
                                         v_init[b:b + 1, lo:hi].double(), **kw)[0]
                    torch.testing.assert_close(out[b:b + 1].double(), want, rtol=1e-5, atol=1e-5,
                                               msg=lambda m: f"{kw}, left padding {leftpad}, sequence {b}: {m}")


def test_dropout_is_flexflashs_exact_dropout():
    """``dropout_p`` is flexflash's dropout: reproducible with ``torch.manual_seed``, unbiased on
    average, and off at 0."""
    gen = torch.Generator().manual_seed(10)
    q, k, v = torch.randn(1, 64, 2, 16, generator=gen), torch.randn(1, 64, 2, 16, generator=gen), \
        torch.ones(1, 64, 2, 16)
    plain = flash_attn_func(q, k, v, causal=True)
    torch.manual_seed(0)
    a = flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
    torch.manual_seed(0)
    b = flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
    assert torch.equal(a, b) and not torch.equal(a, plain)
    # v = 1: each output is sum_j P_ij keep_ij / 0.7, 1 on average over the keep flags
    assert abs(a[0, 32:].mean().item() - 1.0) < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["causal", "window", "alibi_batched_causal_softcap"])
def test_flash_attn_func_on_gpu(case):
    """bf16 on CUDA (compiled FlexAttention), forward and backward, Nq != Nk, grouped heads."""
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in CASES[case].items()}
    gen = torch.Generator().manual_seed(seed_of("gpu", case))
    # 4 query heads on 2 key/value heads (the batched ALiBi slopes of CASES are (2, 4))
    q, k, v = (torch.randn(2, n, h, 64, generator=gen).cuda() for n, h in ((200, 4), (333, 2), (333, 2)))
    ref_kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}

    def ref(*t):
        out = attention_ref(*(x.cpu() for x in t), **ref_kw)[0]
        return out.to(t[0].device)
    _compare(case, lambda *t: flash_attn_func(*t, **kw), ref, (q, k, v), torch.bfloat16)


@pytest.mark.gpu
def test_varlen_and_kvcache_on_gpu():
    """Variable-length training and paged KV-cache decoding in bf16 on CUDA against the reference."""
    gen = torch.Generator().manual_seed(11)
    lengths = [300, 17, 129, 64]
    cu = _cu(lengths).cuda()
    q, k, v = (torch.randn(sum(lengths), h, 64, generator=gen).cuda() for h in (8, 2, 2))

    def ref(*t):
        return _varlen_ref(*(x.cpu() for x in t), cu.tolist(), cu.tolist(), causal=True).to(t[0].device)
    _compare("varlen", lambda *t: flash_attn_varlen_func(*t, cu, cu, max(lengths), max(lengths), causal=True), ref,
             (q, k, v), torch.bfloat16)
    B, page, blocks = 3, 16, 24
    k_cache = torch.randn(blocks, page, 2, 64, generator=gen).cuda()
    v_cache = torch.randn(blocks, page, 2, 64, generator=gen).cuda()
    table = torch.randperm(blocks, generator=gen).view(B, -1).to(torch.int32).cuda()
    cache_lengths = torch.tensor([5, 120, 77], dtype=torch.int32).cuda()
    qd = torch.randn(B, 1, 8, 64, generator=gen).cuda()
    with torch.no_grad():
        out = flash_attn_with_kvcache(qd, k_cache, v_cache, cache_seqlens=cache_lengths, block_table=table,
                                      causal=True)
    keys = k_cache[table.long()].flatten(1, 2).cpu().double()
    values = v_cache[table.long()].flatten(1, 2).cpu().double()
    want = _decode_ref(qd.cpu().double(), keys, values, cache_lengths.tolist(), causal=True)
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-4, atol=1e-4)  # float32 on the GPU against float64


_BF16_PACKED_IN_PLACE = pytest.mark.xfail(strict=True, reason=(
    "a packed bfloat16 call read in place (FlexAttention's main kernel over the pool) found no kernel "
    "configuration within an H100's shared memory (torch 2.11): flexflash._paged gathers such pages; this "
    "test forces in-place reading on"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,part", [
    (torch.float32, "decoding"), (torch.bfloat16, "decoding"), (torch.bfloat16, "decoding_by_size"),
    (torch.float32, "packed"), (torch.bfloat16, "packed")])
def test_pages_read_in_place_on_gpu(dtype, part, monkeypatch, request):
    """Pages of 256 tokens (flash-attn's multiple) are read in place on CUDA: decoding with a block
    table (grouped heads, ALiBi, left padding), in float32 and bfloat16 (forced eagerly here: by
    default compiled decoding steps read bfloat16 pages in place, and eager ones whose gather would
    copy IN_PLACE_EAGER_ELEMENTS, lowered to this table's size for ``decoding_by_size``), and packed
    sequences sharing a prefix page (float32; bfloat16 forced, a strict expected failure), against
    the reference over the gathered keys."""
    if part == "packed" and dtype == torch.bfloat16:
        request.applymarker(_BF16_PACKED_IN_PLACE)
    if part == "decoding_by_size":  # the gather of 3 x 3 pages of 256 tokens, 2 heads of 64
        monkeypatch.setitem(_paged.IN_PLACE_EAGER_ELEMENTS, "cuda", 9 * 256 * 2 * 64)
        part = "decoding"
    elif dtype == torch.bfloat16:
        monkeypatch.setitem(_paged.IN_PLACE_DTYPES, "cuda", (torch.float32, torch.bfloat16))
    calls = []
    real = flash_attn_module.paged_attention
    monkeypatch.setattr(flash_attn_module, "paged_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    gen = torch.Generator().manual_seed(16)
    def check(got, ref, *inputs, **kwargs):
        """``got`` within twice the reference's own error against float64 (the reference in float32,
        its output rounded to ``dtype``), plus float32's summation-order slack."""
        want = ref(*(t.double() for t in inputs), **kwargs)
        own = ref(*(t.float() for t in inputs), **{k: v.float() if isinstance(v, torch.Tensor) else v
                                                  for k, v in kwargs.items()}).to(dtype).double()
        if want.numel() == 0:  # a sequence without queries
            assert got.numel() == 0
            return
        bound = 2 * float((own - want).abs().max()) + 1e-5
        assert float((got.cpu().double() - want).abs().max()) <= bound, bound

    page, pool, H, Hk, D = 256, 12, 8, 2, 64
    k_cache, v_cache = (torch.randn(pool, page, Hk, D, generator=gen).to("cuda", dtype) for _ in range(2))
    table = torch.randperm(pool, generator=gen)[:9].view(3, 3).to(torch.int32)
    if part == "decoding":
        lengths = torch.tensor([5, 700, 300], dtype=torch.int32)
        leftpad = torch.tensor([0, 100, 3], dtype=torch.int32)
        slopes = torch.rand(H, generator=gen)
        q = torch.randn(3, 2, H, D, generator=gen).to("cuda", dtype)
        with torch.no_grad():
            out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths.cuda(), block_table=table.cuda(),
                                          cache_leftpad=leftpad.cuda(), causal=True, alibi_slopes=slopes.cuda())
        keys, values = (c.cpu()[table.long()].flatten(1, 2) for c in (k_cache, v_cache))
        for b in range(3):
            rows = slice(int(leftpad[b]), int(lengths[b]))
            check(out[b:b + 1], lambda *a, **kw: attention_ref(*a, **kw)[0], q[b:b + 1].cpu(), keys[b:b + 1, rows],
                  values[b:b + 1, rows], causal=True, alibi_slopes=slopes)
    else:  # packed sequences: the first two share their first page; 0 queries for the third
        vt = table.clone()
        vt[1, 0] = vt[0, 0]
        lq, lk = [40, 300, 0], [256 + 9, 700, 17]
        qv = torch.randn(sum(lq), H, D, generator=gen).to("cuda", dtype)
        with torch.no_grad():
            out = flash_attn_varlen_func(qv, k_cache, v_cache, _cu(lq).cuda(), _cu(lk).cuda(), max(lq), max(lk),
                                         block_table=vt.cuda(), causal=True)
        cu_q = _cu(lq).tolist()
        for i in range(3):
            keys, values = (c.cpu()[vt[i].long()].flatten(0, 1)[None, :lk[i]] for c in (k_cache, v_cache))
            rows = slice(cu_q[i], cu_q[i + 1])
            check(out[rows], lambda *a, **kw: attention_ref(*a, **kw)[0][0], qv[None, rows].cpu(), keys, values,
                  causal=True)
    assert len(calls) == 1


def _spied_flex_options(monkeypatch) -> list[dict]:
    """A list that collects the kernel options of each FlexAttention call of the graphs Inductor
    compiles from now on (a pass over the graph Inductor lowers: nothing Dynamo traces or guards on)."""
    options = []

    def spy(graph):
        options.extend(node.args[6] for node in graph.nodes
                       if node.op == "call_function" and node.target is torch.ops.higher_order.flex_attention)
    monkeypatch.setattr(torch._inductor.config, "post_grad_custom_post_pass", spy)
    return options


@pytest.mark.gpu
@pytest.mark.parametrize("blocks", ["short", "chunked", "traced_builder"])
@pytest.mark.parametrize("layout", ["contiguous", "pages"])
@pytest.mark.parametrize("dtype, D", [(torch.float32, 64), (torch.bfloat16, 64), (torch.bfloat16, 128)])
def test_a_decoding_step_under_reduce_overhead_on_gpu(dtype, D, layout, blocks, monkeypatch):
    """A decoding step compiled with mode="reduce-overhead" (CUDA graphs), with the cache a buffer
    of a module, contiguous or a pool of pages (read in place inside the step, float32 and bfloat16
    alike; the eager bfloat16 call gathers them, flexflash._paged.kv_block): the growing lengths compile no new
    graph and each step equals the eager call (contiguous, eager: FlexAttention with the mask as a
    tensor; in the graph: with the mask function). Only
    the graphs compiled during the steps count: the eager calls compile flexflash's own kernels and,
    from their second block mask on, its compiled block-mask builder. ``traced_builder``: the step's
    block mask built inside the graph by the builders' body (``_blockmask.TRACED_FUSED_ON``,
    ``_paged.TRACED_BUILDS_ON``), not by the chunked evaluation; those two through flexflash's
    general path, ``short`` (the default) through the short decoding path
    (``flexflash.compat._decoding``, its block mask written from the lengths). At head dim 128 in bfloat16 on the
    GPU the decoding kernel options were measured on (``tuning.json``'s ``decoding`` entry), the
    step's kernel runs with those options."""
    from torch._dynamo.utils import counters

    from flexflash import _blockmask, _tuning
    # Each case's graphs from scratch: the Decoder's forward is one code object for every case, and
    # Dynamo would otherwise compile a later case with the sizes that differ from an earlier one's
    # (head dims) made symbolic. (Then specialised, such a size fails torch 2.11's Dynamo in
    # paged steps: docs/compilation.md.)
    torch._dynamo.reset()
    traced = {"cuda"} if blocks == "traced_builder" else set()  # (the default on CUDA: traced)
    monkeypatch.setattr(_blockmask, "TRACED_FUSED_ON", traced)
    monkeypatch.setattr(_paged, "TRACED_BUILDS_ON", traced)
    if blocks != "short":
        monkeypatch.setattr(_decoding, "TRACED_ON", set())
    short_path = spied_short_path(monkeypatch)
    compiled_options = _spied_flex_options(monkeypatch)

    # pages: a pool of 256-token pages read in place (two per sequence, in a shuffled order)
    table = (torch.randperm(8, generator=torch.Generator().manual_seed(17)).view(4, 2).to("cuda", torch.int32)
             if layout == "pages" else None)

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            shape = (4, 256, 2, D) if table is None else (8, 256, 2, D)
            self.register_buffer("k_cache", torch.zeros(shape, device="cuda", dtype=dtype))
            self.register_buffer("v_cache", torch.zeros(shape, device="cuda", dtype=dtype))

        def forward(self, q, k, v, lengths):
            return flash_attn_with_kvcache(q, self.k_cache, self.v_cache, k, v, cache_seqlens=lengths,
                                           block_table=table, causal=True)

    model = Decoder()
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    gen = torch.Generator().manual_seed(12)
    lengths = torch.tensor([3, 40, 7, 100], dtype=torch.int32, device="cuda")
    graphs, skips = [], counters["inductor"]["cudagraph_skips"]
    for _ in range(5):
        q, k, v = (torch.randn(4, 1, h, D, generator=gen).to("cuda", dtype) for h in (8, 2, 2))
        with torch.no_grad():
            before, seen = counters["stats"]["unique_graphs"], len(compiled_options)
            out = step(q, k, v, lengths).clone()
            graphs.append(counters["stats"]["unique_graphs"] - before)
            in_graph = compiled_options[seen:]  # (the first step's graph)
            want = flash_attn_with_kvcache(q, model.k_cache, model.v_cache, cache_seqlens=lengths + 1,
                                           block_table=table, causal=True)
        # the two kernels differ in summation order only: float32 agrees to 1e-5; bfloat16 outputs
        # may round to neighbouring values, one ulp apart (2^-7 relative; atol for those near 0)
        tol = 1e-5 if dtype == torch.float32 else 8e-3
        torch.testing.assert_close(out, want, rtol=tol, atol=tol)
        if graphs[-1]:
            measured = (dtype, D) == (torch.bfloat16, 128) and _tuning.capability(q.device) == _tuning._MEASURED_ON
            entry = dict(_tuning._DECODING.tiles)
            # the table's options where they were measured, FlexAttention's own (none of them) elsewhere
            assert in_graph and all(all((o.get(key) == value) == measured for key, value in entry.items())
                                    for o in in_graph), (in_graph, entry)
        lengths = lengths + 1
    assert graphs[0] >= 1 and graphs[1:] == [0, 0, 0, 0], graphs  # graphs compiled by each step
    assert bool(short_path) == (blocks == "short"), short_path
    # each graph ran as a CUDA graph (Inductor skips CUDA graphs for a graph with a CPU tensor or
    # another reason it logs, and the step then runs kernel by kernel from the host)
    assert counters["inductor"]["cudagraph_skips"] == skips


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "pages"])
def test_a_decoding_batch_of_a_pair_an_sm_takes_the_wide_tiles_on_gpu(layout, monkeypatch):
    """A decoding step inside a caller's torch.compile (``mode="reduce-overhead"``) with at least as
    many (batch, kv head) pairs as the GPU has streaming multiprocessors runs the decoding entry's
    ``wide_tiles`` (128-key tiles of four warps, on the GPU they were measured on), a batch one
    smaller (fewer pairs than SMs) its ``tiles``. Over three steps of growing lengths each batch
    compiles its graphs in the first step alone (through the short decoding path), run as CUDA graphs; each step, and the eager call,
    agree with flash-attn's reference over each sequence's filled keys (within twice the bf16
    reference's own error against float64)."""
    from torch._dynamo.utils import counters

    from flexflash import _tuning
    compiled_options = _spied_flex_options(monkeypatch)
    short_path = spied_short_path(monkeypatch)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    measured = _tuning.capability(torch.device("cuda")) == _tuning._MEASURED_ON and _tuning._DECODING is not None
    gen = torch.Generator().manual_seed(21)
    hkv, page, D, steps = 8, 256, 128, 3
    least = -(-sms // hkv)  # the least batch of a pair an SM
    for B, wide in ((least, True), (least - 1, False)):
        torch._dynamo.reset()
        cache = (torch.randn(B, 2 * page, hkv, D, generator=gen) if layout == "contiguous"
                 else torch.randn(2 * B, page, hkv, D, generator=gen))
        k_cache, v_cache = cache.to("cuda", torch.bfloat16), (cache * 0.5).to("cuda", torch.bfloat16)
        table = (None if layout == "contiguous"
                 else torch.randperm(2 * B, generator=gen).view(B, 2).to("cuda", torch.int32))
        lengths = torch.randint(1, 2 * page + 2 - steps, (B,), generator=gen, dtype=torch.int32).to("cuda")
        q = torch.randn(B, 1, 4 * hkv, D, generator=gen).to("cuda", torch.bfloat16)
        keys, values = ((c if table is None else c[table.long()].flatten(1, 2)).cpu() for c in (k_cache, v_cache))

        def step(q, lengths):
            return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, block_table=table)

        def ref(lengths, dtype):  # each sequence over its filled keys, in flash-attn's layout
            return torch.cat([attention_ref(*(t[b:b + 1].to(dtype) for t in (q.cpu(), keys[:, :n], values[:, :n])))[0]
                              for b, n in enumerate(lengths.tolist())])
        compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
        graphs, seen, skips = [], len(compiled_options), counters["inductor"]["cudagraph_skips"]
        for i in range(steps):
            with torch.no_grad():
                before = counters["stats"]["unique_graphs"]
                outs = {"compiled": compiled(q, lengths).clone()}
                graphs.append(counters["stats"]["unique_graphs"] - before)
                if i == 0:
                    outs["eager"] = step(q, lengths)
            want, gold = ref(lengths, torch.bfloat16), ref(lengths, torch.float64)
            for name, got in outs.items():
                assert_close_to_golden(f"{layout} batch {B} step {i} {name}", got.cpu(), want, gold, torch.bfloat16)
            lengths = lengths + 1
        assert graphs[0] >= 1 and graphs[1:] == [0] * (steps - 1), (B, graphs)  # graphs compiled by each step
        assert counters["inductor"]["cudagraph_skips"] == skips, B  # (each graph ran as a CUDA graph)
        in_graph = compiled_options[seen:]
        assert in_graph, "no FlexAttention call in the step's graph"
        assert short_path, "the step did not take the short decoding path (flexflash.compat._decoding)"
        if measured:
            tiles = dict(_tuning._DECODING.wide_tiles if wide else _tuning._DECODING.tiles)
            assert all(all(o.get(key) == value for key, value in tiles.items()) for o in in_graph), (B, in_graph)
            assert all((o.get("fwd_BLOCK_N") == 128) == wide for o in in_graph), (B, in_graph)
