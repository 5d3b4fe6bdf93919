"""The modules of SPEC §4 and their compat import paths: the seed documents' examples, each module
against a hand-written float64 computation from its own weights (forward and backward), the
flash/reference equivalence, nn.MultiheadAttention equivalence, invariance to bucket/chunk sizes,
batch independence, state_dict, .to(), train/eval and torch.compile.

Most calls here need gradients, so on CPU they take the memory-bounded path (no compilation); the
compiled path is covered by the no-grad tests, which share a few kernels."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import flexflash
from flexflash import reference
from flexflash.compat import chunked, flash_mha, zeta

from .helpers import randn


def _close(got, want, tol=1e-4):
    """fp32 module vs an fp64 computation of the same weights: a few fp32 ulps of accumulated
    rounding over the projections and the softmax (the fp32 reference's own error is ~1e-6)."""
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


def _grads(module_or_tensors, out, g):
    leaves = [p for p in module_or_tensors if p.requires_grad]
    return torch.autograd.grad(out, leaves, g)


def _close_to_float64(out, want, leaves, gen):
    """A module's output and the gradients of ``leaves`` against a float64 computation ``want``."""
    _close(out, want)
    g = torch.randn(out.shape, generator=gen)
    for a, b in zip(_grads(leaves, out, g), _grads(leaves, want, g.double())):
        _close(a, b)


# --- the examples of the seed documents, with only the import line changed --------------------

def test_seed_examples_zeta_flash_attention():
    from flexflash.compat.zeta import FlashAttention

    q = torch.randn(2, 4, 6, 8)
    k = torch.randn(2, 4, 10, 8)
    v = torch.randn(2, 4, 10, 8)
    attention = FlashAttention(causal=False, dropout=0.1, flash=False)
    assert attention(q, k, v).shape == torch.Size([2, 4, 6, 8])
    attention = FlashAttention(causal=True, dropout=0.1, flash=True)
    assert attention(q, k, v).shape == torch.Size([2, 4, 6, 8])
    mask = torch.ones(2, 4, 6, 10).bool()
    attention = FlashAttention(causal=False, dropout=0.1, flash=True)
    assert attention(q, k, v, mask=mask).shape == torch.Size([2, 4, 6, 8])
    # zeta.nn docs: basic usage and causal with dropout
    assert FlashAttention()(q, k, v).shape == (2, 4, 6, 8)
    assert FlashAttention(causal=True, dropout=0.1, flash=True)(q, k, v).shape == (2, 4, 6, 8)


def test_seed_example_get_mask_as_mask_is_refused_with_the_reason():
    """zeta's docs pass get_mask's 2-D result (True = NOT allowed) as mask: in zeta that failed, and
    its polarity is inverted. Here it is a clear error; causal=True or ~mask broadcast is the way."""
    from flexflash.compat.zeta import FlashAttention

    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 10, 8), torch.randn(2, 4, 10, 8)
    attn_module = FlashAttention(flash=True)
    mask = attn_module.get_mask(6, 10, q.device)
    with pytest.raises(ValueError, match="mask"):
        attn_module(q, k, v, mask=mask)
    with torch.no_grad():
        via_mask = attn_module(q, k, v, mask=~mask[None, None])
        via_causal = FlashAttention(causal=True)(q, k, v)
    torch.testing.assert_close(via_mask, via_causal)


def test_seed_example_flash_mha():
    from flexflash.compat.flash_mha import FlashMHA

    flash_mha = FlashMHA(embed_dim=512, num_heads=8, bias=True, batch_first=True, dropout=0.0, causal=False)
    query = torch.randn(10, 32, 512)
    key = torch.randn(10, 32, 512)
    value = torch.randn(10, 32, 512)
    output = flash_mha(query, key, value)
    assert output.shape == (10, 32, 512)


def test_seed_example_chunked():
    from flexflash.compat.chunked import FlashAttention

    embed_size, heads, chunk_size, seq_length = 128, 8, 10, 50
    dummy_input = torch.rand(1, seq_length, embed_size)
    attention_layer = FlashAttention(embed_size, heads, chunk_size)
    output = attention_layer(dummy_input, dummy_input, dummy_input)
    assert output.shape == torch.Size([1, seq_length, embed_size])


def test_seed_examples_flash_attention_two():
    from flexflash.compat.zeta import FlashAttentionTwo

    model = FlashAttentionTwo(dim=512)
    x = torch.randn(1, 10, 512)
    assert model(x).shape == (1, 10, 512)
    mask = torch.ones(1, 10)  # zeta's docs pass a float mask of ones
    assert model(x, mask=mask).shape == (1, 10, 512)
    context = torch.randn(1, 10, 512)
    assert model(x, context=context).shape == (1, 10, 512)


def test_compat_paths_and_defaults():
    assert zeta.FlashAttention is flexflash.FlashAttention
    assert zeta.FlashAttentionTwo is flexflash.FlashAttentionTwo
    assert flash_mha.FlashMHA is flexflash.FlashMHA
    assert flash_mha.FlashAttention().flash is False and zeta.FlashAttention().flash is True
    assert chunked.FlashAttention is flexflash.ChunkedAttention
    two = zeta.FlashAttentionTwo(dim=16)
    assert (two.heads, two.dim_head, two.causal, two.q_bucket_size, two.k_bucket_size, two.parallel,
            two.mixed_precision) == (8, 64, False, 512, 1024, False, False)


# --- FlashAttention (zeta) -------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kv3", [False, True])
def test_flash_attention_flash_and_reference_paths_agree(causal, mask, bias, kv3):
    gen = torch.Generator().manual_seed(causal + 2 * mask + 4 * bias + 8 * kv3)
    B, H, Nq, Nk, D = 2, 4, 17, 33, 8
    q = randn(B, H, Nq, D, gen=gen, grad=True)
    kv_shape = (B, Nk, D) if kv3 else (B, H, Nk, D)
    k, v = randn(*kv_shape, gen=gen, grad=True), randn(*kv_shape, gen=gen, grad=True)
    kw = {}
    if mask:
        kw["mask"] = torch.rand(B, 1, Nq, Nk, generator=gen) > 0.3
    if bias:
        kw["attn_bias"] = randn(H, Nq, Nk, gen=gen, grad=True)  # zeta's (h, i, j)
    leaves = [t for t in (q, k, v, kw.get("attn_bias")) if t is not None]
    fast, slow = flexflash.FlashAttention(causal=causal, dropout=0.2), flexflash.FlashAttention(
        causal=causal, dropout=0.2, flash=False)
    for training in (False, True):
        fast.train(training)
        slow.train(training)
        torch.manual_seed(7)
        out = fast(q, k, v, **kw)
        torch.manual_seed(7)
        want = slow(q, k, v, **kw)
        _close(out, want, 1e-5)  # both fp32, same dropped entries: summation order only
        g = torch.randn(out.shape, generator=gen)
        for a, b in zip(_grads(leaves, out, g), _grads(leaves, want, g)):
            _close(a, b, 1e-5)


def test_flash_attention_get_mask_polarity_and_train_eval():
    fa = flexflash.FlashAttention()
    m = fa.get_mask(2, 5, "cpu")
    assert m.dtype == torch.bool and m.tolist() == [[False] * 4 + [True], [False] * 5]  # True = NOT allowed
    gen = torch.Generator().manual_seed(1)
    q, k, v = randn(1, 2, 8, 8, gen=gen), randn(1, 2, 8, 8, gen=gen), randn(1, 2, 8, 8, gen=gen)
    drop = flexflash.FlashAttention(dropout=0.5).eval()
    with torch.no_grad():
        torch.testing.assert_close(drop(q, k, v), reference.attention(q, k, v))  # eval: no dropout
        drop.train()
        torch.manual_seed(3)
        got = drop(q, k, v)
        torch.manual_seed(3)
        torch.testing.assert_close(got, reference.attention(q, k, v, dropout_p=0.5))
    assert not torch.allclose(got, reference.attention(q, k, v))
    assert fa.flash_attn(q, k, v).shape == (1, 2, 8, 8)


# --- FlashMHA --------------------------------------------------------------------------------

def _mha_pair(E=32, H=4, bias=True, batch_first=True, causal=False, seed=0):
    torch.manual_seed(seed)
    ours = flexflash.FlashMHA(E, H, bias=bias, batch_first=batch_first, causal=causal)
    theirs = nn.MultiheadAttention(E, H, bias=bias, batch_first=batch_first)
    with torch.no_grad():
        theirs.in_proj_weight.copy_(ours.Wqkv.weight)
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        if bias:
            theirs.in_proj_bias.copy_(ours.Wqkv.bias)
            theirs.out_proj.bias.copy_(ours.out_proj.bias)
    return ours, theirs


@pytest.mark.parametrize("case", ["self", "cross", "cross_kv_differ", "seq_first", "key_padding", "attn_mask_bool",
                                  "attn_mask_float", "attn_mask_per_head", "causal", "no_bias"])
def test_flash_mha_matches_nn_multihead_attention(case):
    B, Nq, Nk, E, H = 3, 11, 11 if case in ("self", "causal", "seq_first", "no_bias") else 7, 32, 4
    ours, theirs = _mha_pair(E, H, bias=case != "no_bias", batch_first=case != "seq_first", causal=case == "causal")
    gen = torch.Generator().manual_seed(5)
    shape = (lambda n: (n, B, E)) if case == "seq_first" else (lambda n: (B, n, E))
    x = randn(*shape(Nq), gen=gen, grad=True)
    ctx = randn(*shape(Nk), gen=gen, grad=True)
    val = randn(*shape(Nk), gen=gen, grad=True)
    args_ours, args_theirs, kw_ours, kw_theirs = (x,), (x, x, x), {}, {}
    if case.startswith("cross") or case.startswith("attn_mask") or case == "key_padding":
        v_in = val if case == "cross_kv_differ" else ctx
        args_ours, args_theirs = (x, ctx, v_in), (x, ctx, v_in)
    if case == "key_padding":
        kpm = torch.rand(B, Nk, generator=gen) < 0.3
        kpm[:, 0] = False  # every row keeps a key (nn.MultiheadAttention returns NaN for empty rows)
        kw_ours = kw_theirs = dict(key_padding_mask=kpm)
    if case == "attn_mask_bool":
        am = torch.rand(Nq, Nk, generator=gen) < 0.3
        am[:, 0] = False
        kw_ours = kw_theirs = dict(attn_mask=am)
    if case == "attn_mask_float":
        kw_ours = kw_theirs = dict(attn_mask=torch.randn(Nq, Nk, generator=gen))
    if case == "attn_mask_per_head":
        kw_ours = kw_theirs = dict(attn_mask=torch.randn(B * H, Nq, Nk, generator=gen))
    if case == "causal":
        kw_theirs = dict(attn_mask=torch.ones(Nq, Nk, dtype=torch.bool).triu(1))  # Nq == Nk here
    out = ours(*args_ours, **kw_ours)
    want, _ = theirs(*args_theirs, need_weights=False, **kw_theirs)
    _close(out, want, 1e-5)  # both fp32
    g = torch.randn(out.shape, generator=gen)
    inputs = [t for t in (x, ctx, val) if any(t is a for a in args_ours)]
    got_g = _grads(inputs + [ours.Wqkv.weight, ours.out_proj.weight], out, g)
    want_g = _grads(inputs + [theirs.in_proj_weight, theirs.out_proj.weight], want, g)
    for a, b in zip(got_g, want_g):
        _close(a, b, 1e-5)


def test_flash_mha_matches_hand_written_float64_with_bottom_right_causal_and_odd_head_size():
    """Cross-attention with Nq != Nk, causal (bottom-right) and head size 12 (not a multiple of 8)."""
    B, Nq, Nk, E, H = 2, 5, 9, 36, 3
    torch.manual_seed(2)
    m = flexflash.FlashMHA(E, H, causal=True)
    gen = torch.Generator().manual_seed(2)
    x, ctx = randn(B, Nq, E, gen=gen, grad=True), randn(B, Nk, E, gen=gen, grad=True)
    out = m(x, ctx)
    W, b = m.Wqkv.weight.double(), m.Wqkv.bias.double()
    q = rearrange(F.linear(x.double(), W[:E], b[:E]), "b n (h d) -> b h n d", h=H)
    k = rearrange(F.linear(ctx.double(), W[E:2 * E], b[E:2 * E]), "b n (h d) -> b h n d", h=H)
    v = rearrange(F.linear(ctx.double(), W[2 * E:], b[2 * E:]), "b n (h d) -> b h n d", h=H)
    s = q @ k.transpose(-1, -2) / (E // H) ** 0.5
    allowed = torch.arange(Nk)[None, :] <= torch.arange(Nq)[:, None] + (Nk - Nq)
    att = s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    want = F.linear(rearrange(att, "b h n d -> b n (h d)"), m.out_proj.weight.double(), m.out_proj.bias.double())
    _close(out, want)
    g = torch.randn(out.shape, generator=gen)
    for a, c in zip(_grads([x, ctx], out, g), _grads([x, ctx], want, g.double())):
        _close(a, c)


def test_flash_mha_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        flexflash.FlashMHA(30, 4)
    with pytest.raises(ValueError, match="embed_dim"):
        flexflash.FlashMHA(0, 1)
    with pytest.raises(ValueError, match="dropout"):
        flexflash.FlashMHA(8, 2, dropout=1.0)
    m = flexflash.FlashMHA(8, 2)
    with pytest.raises(ValueError, match="query"):
        m(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(torch.randn(2, 3, 8), key_padding_mask=torch.ones(2, 4, dtype=torch.bool))


# --- FlashAttentionTwo -----------------------------------------------------------------------

def _two_reference(m, x, context=None, mask=None):
    """FlashAttentionTwo by hand in float64 from the module's weights."""
    context = x if context is None else context
    h = m.heads
    q = rearrange(F.linear(x.double(), m.to_q.weight.double()), "b n (h d) -> b h n d", h=h)
    kv = F.linear(context.double(), m.to_kv.weight.double())
    k, v = (rearrange(t, "b n (h d) -> b h n d", h=h) for t in kv.chunk(2, dim=-1))
    out = reference.attention(q, k, v, causal=m.causal, mask=mask)
    return F.linear(rearrange(out, "b h n d -> b n (h d)"), m.to_out.weight.double())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "padding", "4d"])
def test_flash_attention_two_matches_hand_written_float64(causal, mask):
    torch.manual_seed(4)
    m = flexflash.FlashAttentionTwo(dim=24, heads=3, dim_head=8, causal=causal, q_bucket_size=16, k_bucket_size=32)
    gen = torch.Generator().manual_seed(4)
    x, ctx = randn(2, 19, 24, gen=gen, grad=True), randn(2, 45, 24, gen=gen, grad=True)
    msk = {None: None, "padding": torch.rand(2, 45, generator=gen) > 0.3,
           "4d": torch.rand(2, 3, 19, 45, generator=gen) > 0.3}[mask]
    out = m(x, context=ctx, mask=msk)
    want = _two_reference(m, x, ctx, msk)
    _close_to_float64(out, want, [x, ctx, m.to_q.weight, m.to_kv.weight, m.to_out.weight], gen)


def test_flash_attention_two_bucket_sizes_do_not_change_results():
    torch.manual_seed(5)
    m = flexflash.FlashAttentionTwo(dim=16, heads=2, dim_head=8, causal=True)
    x = torch.randn(2, 70, 16, requires_grad=True)
    base = m(x)
    for qb, kb in [(16, 16), (32, 64), (7, 13), (128, 256)]:
        torch.testing.assert_close(m(x, q_bucket_size=qb, k_bucket_size=kb), base, rtol=1e-5, atol=1e-6)


def test_flash_attention_two_mixed_precision_and_flags():
    torch.manual_seed(6)
    m = flexflash.FlashAttentionTwo(dim=16, heads=2, dim_head=8, mixed_precision=True)
    x = torch.randn(2, 9, 16, requires_grad=True)
    out = m(x)
    assert out.dtype == torch.float32
    # bf16 attention: error ~ a few bf16 ulps (2**-8) of the output's scale
    _close(out, _two_reference(m, x), 3e-2)
    out.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    with pytest.raises(TypeError):
        flexflash.FlashAttentionTwo(16)  # keyword-only
    with pytest.raises(RuntimeError, match="parallel=True.*init_process_group"):
        flexflash.FlashAttentionTwo(dim=16, parallel=True)  # no process group: nothing to shard over
    with pytest.raises(ValueError, match="mask"):
        m(x, mask=torch.full((2, 9), 0.5))  # not a 0/1 mask
    with pytest.raises(ValueError, match="dim_head"):
        flexflash.FlashAttentionTwo(dim=16, dim_head=0)


# --- ChunkedAttention ------------------------------------------------------------------------

def _chunked_reference(m, values, keys, queries, **kw):
    h = m.heads
    q, k, v = (rearrange(F.linear(t.double(), lin.weight.double(), lin.bias.double()), "b n (h d) -> b h n d", h=h)
               for t, lin in ((queries, m.queries), (keys, m.keys), (values, m.values)))
    out = reference.attention(q, k, v, **kw)  # scale head_dim ** -0.5
    return F.linear(rearrange(out, "b h n d -> b n (h d)"), m.fc_out.weight.double(), m.fc_out.bias.double())


@pytest.mark.parametrize("mask", [None, "bool", "float_2d", "float_4d"])
def test_chunked_attention_matches_hand_written_float64(mask):
    torch.manual_seed(7)
    m = flexflash.ChunkedAttention(embed_size=32, heads=4, chunk_size=6)
    gen = torch.Generator().manual_seed(7)
    Nq, Nk = 23, 14  # keys shorter than queries
    values, keys, queries = randn(2, Nk, 32, gen=gen, grad=True), randn(2, Nk, 32, gen=gen), randn(2, Nq, 32, gen=gen, grad=True)
    kw = {}
    if mask == "bool":
        kw = dict(mask=torch.rand(2, Nk, generator=gen) > 0.3)
    elif mask == "float_2d":
        kw = dict(bias=torch.randn(Nq, Nk, generator=gen))
    elif mask == "float_4d":
        kw = dict(bias=torch.randn(1, 4, Nq, Nk, generator=gen))
    out = m(values, keys, queries, mask=kw.get("mask", kw.get("bias")))
    want = _chunked_reference(m, values, keys, queries, **{a: (b.double() if b.is_floating_point() else b)
                                                           for a, b in kw.items()})
    _close_to_float64(out, want, [values, queries, m.queries.weight, m.keys.bias, m.fc_out.weight], gen)


def test_chunked_attention_chunk_size_and_batch_independence():
    torch.manual_seed(8)
    m = flexflash.ChunkedAttention(16, 2, chunk_size=5)
    x, y = torch.randn(3, 21, 16), torch.randn(3, 30, 16)
    base = m(y, y, x)
    for chunk in (1, 7, 21, 64):
        m2 = copy.deepcopy(m)
        m2.chunk_size = chunk
        torch.testing.assert_close(m2(y, y, x), base, rtol=1e-5, atol=1e-6)
    for i in range(3):  # each batch entry on its own gives its row of the batched result
        torch.testing.assert_close(m(y[i:i + 1], y[i:i + 1], x[i:i + 1]), base[i:i + 1], rtol=1e-5, atol=1e-6)


# --- every module: state_dict, .to(), names, torch.compile -----------------------------------

# name: (module, inputs of one x, state_dict keys, constructor arguments)
def _modules():
    torch.manual_seed(9)
    return {
        "FlashMHA": (flexflash.FlashMHA(16, 2), lambda x: (x,),
                     {"Wqkv.weight", "Wqkv.bias", "out_proj.weight", "out_proj.bias"},
                     ("embed_dim", "num_heads", "bias", "batch_first", "dropout", "causal")),
        "FlashAttentionTwo": (flexflash.FlashAttentionTwo(dim=16, heads=2, dim_head=8), lambda x: (x,),
                              {"to_q.weight", "to_kv.weight", "to_out.weight"},
                              ("dim", "heads", "dim_head", "causal", "q_bucket_size", "k_bucket_size", "parallel",
                               "mixed_precision")),
        "ChunkedAttention": (flexflash.ChunkedAttention(16, 2, 4), lambda x: (x, x, x),
                             {f"{n}.{p}" for n in ("values", "keys", "queries", "fc_out") for p in ("weight", "bias")},
                             ("embed_size", "heads", "chunk_size")),
    }


@pytest.mark.parametrize("name", ["FlashMHA", "FlashAttentionTwo", "ChunkedAttention"])
def test_state_dict_round_trip_names_and_to_dtype(name):
    module, args, keys, ctor_args = _modules()[name]
    assert set(module.state_dict()) == keys
    x = torch.randn(2, 9, 16, requires_grad=True)
    fresh = type(module)(**{a: getattr(module, a) for a in ctor_args})
    fresh.load_state_dict(module.state_dict())
    torch.testing.assert_close(fresh(*args(x)), module(*args(x)))
    as64 = copy.deepcopy(module).to(torch.float64)
    out64 = as64(*args(x.double()))
    assert out64.dtype == torch.float64
    _close(module(*args(x)), out64)


def test_flash_mha_dropout_only_in_training():
    torch.manual_seed(10)
    m = flexflash.FlashMHA(16, 2, dropout=0.5)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        m.eval()
        a, b = m(x), m(x)
        m.train()
        c = m(x)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("case", ["fused_qkv", "same_tensor", "kv_projection"])
def test_query_key_value_in_a_callers_graph_reach_the_kernel_in_buffers_of_their_own(case):
    """backend="flex" inside a caller's graph on CPU (where "auto" takes the tiled path):
    FlexAttention's CPU lowering needs the query, key and value in buffers of their own: torch 2.11
    rejects views of one buffer (a fused qkv projection, attention(x, x, x)), torch 2.13 views of a
    2-D projection (FlashAttentionTwo's key and value). flexflash copies all three: the compiled
    call agrees with the eager one, and three copies survive Inductor's graph passes (which remove
    clones with their input's layout and merge identical ones) up to the lowering."""
    from torch._inductor import config as inductor_config

    copies = []

    def count_copies(graph):  # each graph the lowering receives (the modifiers' subgraphs too)
        copies.append(sum(n.target is torch.ops.flexflash.copy_apart.default for n in graph.nodes))

    torch.manual_seed(12)
    B, N, H, D = 2, 9, 2, 8
    w = torch.randn(H * D, 3 * H * D)
    heads = lambda t: t.unflatten(-1, (H, D)).transpose(1, 2)  # noqa: E731  (B, N, H*D) -> (B, H, N, D)
    if case == "same_tensor":
        fn = lambda x: flexflash.attention(x, x, x, causal=True, backend="flex")  # noqa: E731
        x = torch.randn(1, H, 7, D)
    elif case == "fused_qkv":
        fn = lambda x: flexflash.attention(*map(heads, (x @ w).chunk(3, dim=-1)), causal=True,  # noqa: E731
                                           backend="flex")
        x = torch.randn(B, N, H * D)
    else:  # a query projection and a key/value projection whose halves are views
        def fn(x):
            k, v = (x @ w[:, H * D:]).chunk(2, dim=-1)
            return flexflash.attention(heads(x @ w[:, :H * D]), heads(k), heads(v), backend="flex")
        x = torch.randn(B, N, H * D)
    with torch.no_grad(), inductor_config.patch(post_grad_custom_post_pass=count_copies):
        # (torch settings are patched through their own patch(): pytest's monkeypatch undoes with
        # delattr, which torch's config modules take as removing the setting for the process)
        want = fn(x)
        got = torch.compile(fn, fullgraph=True, dynamic=False)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert sum(copies) == 3, copies


def test_cpu_training_inside_torch_compile_raises_where_torch_fails_it(monkeypatch):
    """On torch < 2.13 (_TRACED_CPU_TRAINING_FAILS) a CPU call that needs gradients inside a
    caller's torch.compile raises, naming the torch version expected, instead of returning the
    wrong gradients torch 2.11 computed there."""
    from flexflash import functional
    monkeypatch.setattr(functional, "_TRACED_CPU_TRAINING_FAILS", True)
    two = flexflash.FlashAttentionTwo(dim=16, heads=2, dim_head=8)
    xg = torch.randn(2, 9, 16, requires_grad=True)
    with pytest.raises(Exception, match="expected torch >= 2.13"):
        torch.compile(two, fullgraph=True)(xg)


@pytest.mark.skipif(flexflash.functional._TRACED_CPU_TRAINING_FAILS,
                    reason=f"CPU training inside torch.compile raises on torch {torch.__version__} (tested above)")
def test_cpu_training_under_torch_compile_fullgraph():
    """Training under torch.compile with fullgraph=True: on CPU the memory-bounded path (forward
    and its custom backward) traces into the caller's graph, and the gradients match the eager
    module's. (A graph break there, at the note of the path taken, made the projection's key and
    value views outputs of a graph, whose cache entry torch 2.11 crashed saving and torch 2.13 saved
    corrupt.) More kinds of call and modules: tests/test_traced.py."""
    torch.manual_seed(11)
    two = flexflash.FlashAttentionTwo(dim=16, heads=2, dim_head=8)
    xg = torch.randn(2, 9, 16, requires_grad=True)
    torch.compile(two, fullgraph=True)(xg).sum().backward()
    g_compiled = xg.grad.clone()
    xg.grad = None
    two(xg).sum().backward()
    torch.testing.assert_close(g_compiled, xg.grad, rtol=1e-5, atol=1e-6)
