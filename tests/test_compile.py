"""The compile cache: no recompilation storms, never the unfused eager fallback."""

from __future__ import annotations

import warnings

import pytest

import torch

import flexflash
from flexflash import _blockmask, _fingerprint, _flex, _kernels, _kinds, _torch_private, mods
from flexflash._kernels import _KERNELS
from flexflash._torch_private import _recompile_limit
from flexflash._compiled import compile_stats

from .helpers import as64, assert_close_to_golden


def _kernel_for(label_part):
    return [kern for kern in _KERNELS.values() if label_part in kern.label]


def test_eight_sequence_lengths_and_new_values_do_not_recompile_each_time():
    torch._dynamo.utils.counters.clear()
    gen = torch.Generator().manual_seed(0)
    q0 = torch.randn(2, 2, 8, 16)
    with torch.no_grad():
        flexflash.attention(q0, q0, q0, causal=True, block_size=64)  # the kind's first compilation
        before = compile_stats()["compiles"]
        for n in (17, 33, 97, 130, 200, 300, 257, 64):
            q = torch.randn(2, 2, n, 16, generator=gen)
            k = torch.randn(2, 2, n + 7, 16, generator=gen)
            out = flexflash.attention(q, k, k, causal=True, block_size=64)
            torch.testing.assert_close(out, flexflash.reference.attention(q, k, k, causal=True))
    # Dynamic shapes: at most one more graph (the size-1 specialisations are already behind).
    assert compile_stats()["compiles"] - before <= 1


def test_new_mask_and_bias_values_of_one_shape_reuse_the_kernel():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 40, 16, generator=gen)
    with torch.no_grad():
        flexflash.attention(q, q, q, mask=torch.rand(2, 40, generator=gen) > 0.5, bias=torch.randn(40, 40, generator=gen))
        before = compile_stats()["compiles"]
        for _ in range(5):
            mask = torch.rand(2, 40, generator=gen) > 0.5
            bias = torch.randn(40, 40, generator=gen)
            out = flexflash.attention(q, q, q, mask=mask, bias=bias)
            torch.testing.assert_close(out, flexflash.reference.attention(q, q, q, mask=mask, bias=bias))
    assert compile_stats()["compiles"] == before


@pytest.mark.parametrize("case", ["bool_mask_and_key_bias", "key_padding_and_full_bias", "document"])
def test_new_lengths_with_masks_biases_and_captured_tensors_do_not_recompile_each_time(case):
    """Masks, biases and the tensors a mask_mod reads take new sequence lengths without a
    compilation per length, on CPU too (where some of their dimensions stay static: see
    flexflash._kernels._cpu_static_shapes). Covered: a (1, 1, Nq, Nk) bool mask with a per-key bias,
    a (B, Nk) padding mask with a (B, H, Nq, Nk) bias, document ids of shape (B, N)."""
    gen = torch.Generator().manual_seed(12)
    _flex.reset()
    for n in (40, 57, 96, 130):
        q, k, v = (torch.randn(2, 2, n, 16, generator=gen) for _ in range(3))
        if case == "bool_mask_and_key_bias":
            kw = dict(mask=torch.rand(1, 1, n, n, generator=gen) > 0.4, bias=torch.randn(1, 1, 1, n, generator=gen))
        elif case == "key_padding_and_full_bias":
            pad = torch.arange(n) < torch.tensor([[n], [n // 2]])
            kw = dict(mask=pad, bias=torch.randn(2, 2, n, n, generator=gen))
        else:
            kw = dict(mask_mod=mods.document(torch.arange(n).expand(2, n) // 23))
        with torch.no_grad():
            out = flexflash.attention(q, k, v, backend="flex", **kw)
        ref = flexflash.reference.attention(q, k, v, **kw)
        golden = flexflash.reference.attention(as64(q), as64(k), as64(v), **kw)
        assert_close_to_golden("out", out, ref, golden, torch.float32)
    assert compile_stats()["compiles"] == 1  # the first length compiles, the others reuse it


def test_a_cpu_kind_that_fails_to_compile_with_symbolic_buffers_compiles_static(monkeypatch):
    """Where Inductor's CPU template generates C++ that does not compile for a buffer of symbolic
    size, the kind compiles again with static shapes (and stays static) instead of failing."""
    class CppCompileError(RuntimeError):
        pass

    original = _kernels._Kernel.__call__
    dynamic_tries = []

    def failing_when_symbolic(self, *args):
        if not self.every_buffer_static:
            dynamic_tries.append(self.label)
            raise CppCompileError("C++ compile error")
        return original(self, *args)

    monkeypatch.setattr(_kernels._Kernel, "__call__", failing_when_symbolic)
    _flex.reset()
    gen = torch.Generator().manual_seed(13)
    for n in (40, 57):
        q, k, v = (torch.randn(2, 2, n, 16, generator=gen) for _ in range(3))
        ids = torch.sort(torch.randint(0, 3, (2, n), generator=gen), dim=-1).values
        with torch.no_grad():
            out = flexflash.attention(q, k, v, mask_mod=mods.document(ids), backend="flex")
        kw = dict(mask_mod=mods.document(ids))
        ref = flexflash.reference.attention(q, k, v, **kw)
        golden = flexflash.reference.attention(as64(q), as64(k), as64(v), **kw)
        assert_close_to_golden("out", out, ref, golden, torch.float32)
    assert len(dynamic_tries) == 1 and len(_kernels._CPU_STATIC_KINDS) == 1  # static from then on
    assert len(_KERNELS) == 2 and all(kern.every_buffer_static for kern in _KERNELS.values())  # one per shape

    def failing_otherwise(self, *args):
        raise RuntimeError("another error")

    monkeypatch.setattr(_kernels._Kernel, "__call__", failing_otherwise)
    with pytest.raises(RuntimeError, match="another error"), torch.no_grad():  # other errors propagate
        flexflash.attention(q, k, v, causal=True, backend="flex")
    _flex.reset()


def test_many_distinct_modifiers_never_fall_back_to_the_unfused_path():
    # Ten window sizes (more than Dynamo's recompile limit of 8 for one code object): each is its
    # own kind with its own compiled kernel; none runs FlexAttention's unfused eager path.
    q = torch.randn(1, 2, 64, 16)
    with torch.no_grad(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for w in range(1, 11):
            out = flexflash.attention(q, q, q, mask_mod=mods.sliding_window(w))
            torch.testing.assert_close(out, flexflash.reference.attention(q, q, q, mask_mod=mods.sliding_window(w)))
    assert not [x for x in seen if "without torch.compile" in str(x.message)]
    assert not [x for x in seen if "recompile" in str(x.message).lower()]
    assert torch._dynamo.utils.counters["stats"].get("unique_graphs", 0) > 0
    for kern in _KERNELS.values():
        assert kern.compiles <= 3, (kern.label, kern.compiles)


def test_fifty_window_sizes_as_tensors_share_one_kernel():
    # A window given as a 0-d tensor is read at run time: fifty sizes are one kind, compiled once
    # (plus at most one graph for the captured tensor), never the unfused path, each exact.
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 2, 48, 16, generator=gen), torch.randn(1, 2, 64, 16, generator=gen)
    before = compile_stats()
    with torch.no_grad(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for w in range(1, 51):
            fn = mods.sliding_window(torch.tensor(w), offset=16)
            out = flexflash.attention(q, k, k, mask_mod=fn)
            want = flexflash.reference.attention(q, k, k, mask_mod=mods.sliding_window(w, offset=16))
            torch.testing.assert_close(out, want)
    after = compile_stats()
    assert after["kernels"] - before["kernels"] == 1
    assert after["compiles"] - before["compiles"] <= 2
    assert not [x for x in seen if "without torch.compile" in str(x.message)]
    assert not [x for x in seen if "recompile" in str(x.message).lower()]


def test_a_kind_that_exhausts_its_budget_starts_a_fresh_cache():
    q = torch.randn(1, 1, 16, 8)
    with torch.no_grad():
        flexflash.attention(q, q, q, causal=True, block_size=16)
        (kern,) = [x for x in _KERNELS.values() if x.static.block == (16, 16)]
        kern.compiles = _recompile_limit()  # pretend the budget is spent
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = flexflash.attention(q, q, q, causal=True, block_size=16)
    assert kern.generation == 1 and kern.compiles == 1
    assert any("fresh compilation cache" in str(x.message) for x in seen)
    torch.testing.assert_close(out, flexflash.reference.attention(q, q, q, causal=True))


def test_index_only_block_masks_are_cached():
    q = torch.randn(1, 2, 50, 16)
    with torch.no_grad():
        flexflash.attention(q, q, q, mask_mod=mods.sliding_window(5), block_size=32)
        hits = compile_stats()["block_mask_hits"]
        flexflash.attention(q, q, q, mask_mod=mods.sliding_window(5), block_size=32)
    assert compile_stats()["block_mask_hits"] == hits + 1


def test_block_masks_reading_tensors_are_cached_by_identity_and_version():
    """Calls with the same mask tensors (the layers of a model) build the block mask once; a tensor
    written in place, or another tensor with other values, builds it anew, and the result follows
    the new values."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 2, 96, 16, generator=gen)
    pad = torch.arange(96)[None] < torch.tensor([[96], [40]])
    ids = torch.tensor([[0] * 50 + [1] * 46, [0] * 20 + [1] * 76])
    doc = mods.document(ids)
    with torch.no_grad():
        for kw in (dict(mask=pad), dict(mask_mod=doc)):
            built = compile_stats()["block_masks_built"]
            first = flexflash.attention(q, q, q, block_size=32, **kw)
            second = flexflash.attention(q, q, q, block_size=32, **kw)
            assert compile_stats()["block_masks_built"] == built + 1
            assert torch.equal(first, second)
        pad[1, 40:80] = True  # in place: a new version
        ids[0, 30:50] = 1
        for kw in (dict(mask=pad), dict(mask_mod=doc)):
            built = compile_stats()["block_masks_built"]
            out = flexflash.attention(q, q, q, block_size=32, **kw)
            assert compile_stats()["block_masks_built"] == built + 1
            ref = flexflash.attention(q, q, q, backend="reference", **kw)
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        other = pad.clone()  # equal values, another tensor: built again (identity, not values)
        built = compile_stats()["block_masks_built"]
        flexflash.attention(q, q, q, block_size=32, mask=other)
        assert compile_stats()["block_masks_built"] == built + 1


def test_block_masks_of_freed_tensors_do_not_stay_cached():
    """An entry keyed by a tensor's identity goes once the tensor is freed (new masks every step
    would otherwise keep their block masks until evicted)."""
    import gc

    from flexflash._blockmask import _BLOCK_MASKS
    q = torch.randn(2, 2, 64, 16)
    with torch.no_grad():
        pad = torch.arange(64)[None] < torch.tensor([[64], [30]])
        flexflash.attention(q, q, q, mask=pad, block_size=32)
        entries = len(_BLOCK_MASKS)
        del pad
        gc.collect()
        flexflash.attention(q, q, q, mask=torch.arange(64)[None] < torch.tensor([[20], [64]]), block_size=32)
        gc.collect()
        flexflash.attention(q, q, q, mask=torch.arange(64)[None] < torch.tensor([[10], [50]]), block_size=32)
    assert len(_BLOCK_MASKS) <= entries


def test_block_masks_reading_other_objects_are_never_cached():
    """A mask_mod reading state the fingerprint cannot see (an attribute of an object) builds its
    block mask on every call."""
    class Lengths:
        def __init__(self, n):
            self.n = n

    state = Lengths(torch.tensor([30, 60]))

    def prefix(b, h, q_idx, kv_idx):
        return kv_idx < state.n[b]

    q = torch.randn(2, 2, 64, 16)
    with torch.no_grad():
        flexflash.attention(q, q, q, mask_mod=prefix, block_size=32)
        built = compile_stats()["block_masks_built"]
        state.n = torch.tensor([64, 10])
        out = flexflash.attention(q, q, q, mask_mod=prefix, block_size=32)
    assert compile_stats()["block_masks_built"] == built + 1
    torch.testing.assert_close(out, flexflash.attention(q, q, q, mask_mod=prefix, backend="reference"),
                               atol=2e-5, rtol=2e-5)


def _dense(num, idx, nkb):
    """BlockMask (counts, indices) back to dense block flags (B, H, rows, nkb)."""
    cols = torch.arange(idx.shape[-1])
    flags = torch.zeros(*idx.shape[:-1], max(nkb, idx.shape[-1]), dtype=torch.bool)
    flags.scatter_(-1, idx.long(), cols < num[..., None])
    return flags[..., :nkb]


def test_block_mask_of_tensor_mask_and_causal_is_safe():
    """Flags built from the mask tensor's reduction and-ed with the causal flags: every block with an
    allowed entry is visited and exactly the fully allowed blocks skip the mask function, also at
    incomplete edge blocks and for broadcast masks."""
    from flexflash._fingerprint import NO_MODIFIER
    from flexflash._blockmask import _block_tensors, _mask_flags
    from flexflash._compose import Structure, compose_mask
    gen = torch.Generator().manual_seed(3)
    Nq, Nk, block = 70, 100, (16, 32)
    for shape in [(2, 1, Nq, Nk), (2, 1, 1, Nk), (1, 3, Nq, 1)]:
        mask = torch.rand(*shape, generator=gen) > 0.3
        mask[..., :1, :] = True  # some blocks fully allowed
        st = Structure(causal=True, mask_full=tuple(s > 1 for s in shape), bias_full=None, has_mask_mod=False,
                       has_score_mod=False)
        t = _block_tensors(st, Nk - Nq, mask, None, NO_MODIFIER, 2, 3, Nq, Nk, block, torch.device("cpu"))
        some, every = _mask_flags(compose_mask(st, Nk - Nq, mask, None), 2, 3, Nq, Nk, block, torch.device("cpu"))
        nqb, nkb = some.shape[-2:]
        partial = _dense(t[0], t[1], nkb)[..., :nqb, :]
        full = _dense(t[2], t[3], nkb)[..., :nqb, :]
        assert torch.equal((full.expand_as(every)), every)
        visited = (partial | full).expand_as(some)
        assert (visited | ~some).all()  # no block with an allowed entry is skipped


def test_divisible_lengths_are_multiples_of_every_tile():
    from flexflash._kinds import _divisible
    assert _divisible(128, 4096, None)
    assert not _divisible(128, 4000, None) and not _divisible(100, 128, None)
    assert not _divisible(128, 128, {"BLOCK_M": 256})  # a larger tile set by the caller counts
    assert _divisible(256, 512, {"BLOCK_N": 256, "num_warps": 4})
    assert not _divisible(128, 128, {"BACKEND": "FLASH"})


def test_tuned_dropout_options_only_where_measured():
    from flexflash._tuning import dropout_pass_options
    assert dropout_pass_options(torch.device("cpu"), torch.bfloat16, 128, (128, 128)) == ((), ())


def _mask_cases(gen, B, H, Nq, Nk):
    from flexflash import mods
    ids = torch.sort(torch.randint(0, 3, (B, max(Nq, Nk)), generator=gen), dim=-1).values
    yield "causal", dict(causal=True), None, None
    yield "key padding + causal", dict(causal=True, mask=(1, 0, 0, 1)), torch.rand(B, 1, 1, Nk, generator=gen) > 0.3, None
    yield "4-D mask", dict(mask=(1, 1, 1, 1)), torch.rand(B, H, Nq, Nk, generator=gen) > 0.2, None
    yield "document", dict(mask_mod=True), None, mods.document(ids[:, :Nq], ids[:, :Nk])
    yield "window + mask", dict(mask=(0, 0, 1, 1), mask_mod=True), torch.rand(1, 1, Nq, Nk, generator=gen) > 0.1, \
        mods.sliding_window(9, offset=Nk - Nq)


def _structure(parts):
    from flexflash._compose import Structure
    full = parts.get("mask")
    return Structure(causal=parts.get("causal", False), mask_full=None if full is None else tuple(bool(f) for f in full),
                     bias_full=None, has_mask_mod=bool(parts.get("mask_mod")), has_score_mod=False)


@pytest.mark.parametrize("Nq,Nk,block", [(70, 100, (16, 32)), (33, 33, (16, 16)), (5, 130, (8, 64)),
                                           (40, 20, (16, 32))])
def test_fused_flags_match_the_chunked_flags(Nq, Nk, block):
    """The 6-D one-pass evaluation used by the compiled builder gives the same block flags as the
    chunked evaluation, including incomplete edge blocks and masks that broadcast over b or h; a
    dimension of one block gets a second, empty one."""
    from flexflash._blockmask import _fused_flags, _mask_flags
    from flexflash._compose import compose_mask
    gen = torch.Generator().manual_seed(Nq)
    B, H = 2, 3
    for name, parts, mask, mask_mod in _mask_cases(gen, B, H, Nq, Nk):
        fn = compose_mask(_structure(parts), Nk - Nq, mask, mask_mod)
        want = _mask_flags(fn, B, H, Nq, Nk, block, torch.device("cpu"))
        got = _fused_flags(fn, B, H, Nq, Nk, block, torch.device("cpu"))
        nqb, nkb = want[0].shape[-2:]
        for a, b in zip(got, want):
            assert a.shape[-2:] == (max(2, nqb), max(2, nkb)), (name, a.shape)
            assert not a[..., nqb:, :].any() and not a[..., nkb:].any(), name
            a = a[..., :nqb, :nkb]
            shape = torch.broadcast_shapes(a.shape, b.shape)
            assert torch.equal(a.expand(shape), b.expand(shape)), name


def test_fused_flags_compile_with_static_sizes():
    """The fused evaluation traces where Dynamo keeps the sizes static (Python ints: a builder
    compiled at a size-1 dimension, or a static length), as well as with symbolic ones (torch
    2.11's Dynamo does not trace ``torch.sym_max`` of ints)."""
    from flexflash._blockmask import _fused_flags
    fn = lambda b, h, i, j: (j <= i) & (i - j < 20)  # noqa: E731
    compiled = torch.compile(lambda q, k: _fused_flags(fn, q.shape[0], q.shape[1], q.shape[2], k.shape[2], (16, 16),
                                                       q.device), fullgraph=True, dynamic=False)
    got = compiled(torch.zeros(1, 1, 40, 8), torch.zeros(1, 1, 70, 8))
    want = _fused_flags(fn, 1, 1, 40, 70, (16, 16), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("depends_on", ["nothing", "batch", "head"])
def test_mask_chunks_are_sized_by_the_dimensions_the_mask_depends_on(monkeypatch, depends_on):
    """The chunked evaluation bounds its memory by the mask's own batch and head sizes: a mask of
    the indices alone is evaluated in few large chunks however large B*H is, one depending on b or h
    in smaller ones; the flags are those of the materialised mask either way."""
    monkeypatch.setattr(_blockmask, "_MASK_CHUNK_ELEMENTS", 1 << 16)
    B, H, N, block = 4, 8, 512, (64, 64)  # one query block row of every (b, h): 32 * 64 * 512 = 2^20

    def mask_fn(b, h, i, j):
        m = (j <= i) & (i - j < 200)
        if depends_on == "batch":
            m = m & (j < 512 - 64 * b)
        elif depends_on == "head":
            m = m & ((j + h) % 3 != 0)
        return m

    calls = []

    def counted(b, h, i, j):
        calls.append(i.shape)
        return mask_fn(b, h, i, j)

    some, every = _blockmask._mask_flags(counted, B, H, N, N, block, torch.device("cpu"))
    from flexflash.reference import index_grids
    full = mask_fn(*index_grids(B, H, N, N, "cpu")).expand(B, H, N, N)
    want_some, want_every = _blockmask._tensor_flags(full, N, N, block)
    assert torch.equal(some.expand(B, H, 8, 8), want_some) and torch.equal(every.expand(B, H, 8, 8), want_every)
    # nothing: 1 query block row first (sized for B*H), then 2 per chunk; batch: 1 row of 4*2^15
    # entries fits 0 times, so 1 row per chunk; head likewise
    assert len(calls) == {"nothing": 1 + 4, "batch": 8, "head": 8}[depends_on]


@pytest.mark.skipif(torch.__version__ < "2.13", reason=(
    "Inductor's C++ backend in torch 2.11 generates code that does not compile for the fused flags "
    "('tmp1' was not declared). flexflash builds block masks eagerly on CPU and compiles the builder "
    "only on CUDA, where tests/test_gpu.py covers it on torch 2.11; this test compiles it on CPU"))
def test_compiled_block_mask_builder():
    """The compiled builder (the CUDA path, compiled here on CPU) returns FlexAttention's block-mask
    tensors equal to those of the eager builder, and compiles once for all sizes: the tensors a
    mask_mod captures have dynamic sizes from the first compilation, and a length of one block
    (padded to two) needs no graph of its own."""
    block = (16, 16)
    # A hit in Inductor's and AOTAutograd's caches installs the guards of the graph cached there
    # (another builder's, compiled at other sizes earlier in the process): the count of graphs
    # would depend on the tests that ran before.
    # (Patched through the configs' own patch(): monkeypatch's undo deletes an attribute missing
    # from the module's __dict__, which torch's config modules take as removing the setting.)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        _check_compiled_block_mask_builder(block)


def _check_compiled_block_mask_builder(block):
    from flexflash._blockmask import _block_mask_tensors, _mask_builder, _mask_flags
    from flexflash._compose import compose_mask, squeeze_broadcast
    from flexflash import mods
    parts = dict(causal=True, mask=(1, 0, 0, 1), mask_mod=True)
    st = _structure(parts)
    builder = _mask_builder(st, ("test-builder",), block, torch.zeros(2, 1, 1, 8, dtype=torch.bool))

    def check(B, Nq, Nk):
        gen = torch.Generator().manual_seed(Nk)
        mask = torch.rand(B, 1, 1, Nk, generator=gen) > 0.3
        ids = torch.sort(torch.randint(0, 3, (B, Nk), generator=gen), dim=-1).values
        mask_mod = mods.document(ids[:, Nk - Nq:].contiguous(), ids)
        q, k = torch.zeros(B, 2, Nq, 8), torch.zeros(B, 2, Nk, 8)
        # the mask by its full dimensions, as _block_tensors passes it
        got = builder(q, k, torch.tensor(Nk - Nq, dtype=torch.int32), squeeze_broadcast(mask, st.mask_full), mask_mod)
        fn = compose_mask(st, Nk - Nq, mask, mask_mod)
        want = _block_mask_tensors(*_mask_flags(fn, B, 2, Nq, Nk, block, torch.device("cpu")))
        nkb = -(-Nk // 16)
        for num, idx, name in ((0, 1, "partial"), (2, 3, "full")):
            a = _dense(got[num], got[idx], nkb)
            b = _dense(want[num], want[idx], nkb)
            shape = torch.broadcast_shapes(a.shape, b.shape)
            assert torch.equal(a.expand(shape), b.expand(shape)), (name, B, Nq, Nk)

    # (Nq = 10: fewer queries than a block, evaluated over the queries alone)
    for B, Nq, Nk in [(2, 40, 70), (3, 70, 100), (2, 64, 64), (4, 20, 200), (3, 10, 12), (2, 16, 40)]:
        check(B, Nq, Nk)
    assert builder.compiles == 1  # graphs compiled, counted by the builder's own backend
    # Decoding steps, one query: a size Dynamo specialises on (one more graph), then growing caches
    # compile nothing more.
    for Nk in (33, 70, 71):
        check(2, 1, Nk)
    assert builder.compiles == 2


def test_block_mask_builder_never_runs_past_the_recompile_limit(monkeypatch):
    """A builder that has compiled as many graphs as Dynamo allows starts a fresh cache (eager
    evaluation of the fused flags would hold the whole (B, H, Nq, Nk) grid)."""
    from flexflash._blockmask import _mask_builder
    st = _structure(dict(causal=True, mask=(1, 0, 0, 1)))
    builder = _mask_builder(st, ("limit-test",), (16, 16), torch.zeros(2, 1, 1, 8, dtype=torch.bool))
    monkeypatch.setattr(_torch_private, "_recompile_limit", lambda: 1)
    first = builder._fn
    q, k = torch.zeros(2, 1, 20, 4), torch.zeros(2, 1, 20, 4)
    mask = torch.ones(2, 1, 1, 20, dtype=torch.bool)
    offset = torch.tensor(0, dtype=torch.int32)
    builder(q, k, offset, mask, None)
    assert builder.compiles == 1 and builder._fn is first
    builder(q, k, offset, mask, None)  # at the limit: a fresh code object and cache
    assert builder._fn is not first and builder.compiles == 1


def test_compile_mode_setting_is_checked_and_returns_the_previous_mode():
    assert flexflash.get_compile_mode() == "default"
    for bad in ("fast", "max-autotune-no-cudagraphs", "reduce-overhead", None, 1):
        with pytest.raises(ValueError, match=r"mode: expected one of 'default', 'max-autotune', got"):
            flexflash.set_compile_mode(bad)
    assert flexflash.get_compile_mode() == "default"  # a refused mode changes nothing
    assert flexflash.set_compile_mode("max-autotune") == "default"
    try:
        assert flexflash.get_compile_mode() == "max-autotune"
    finally:
        assert flexflash.set_compile_mode("default") == "max-autotune"


@pytest.mark.parametrize("value, ok", [("max-autotune", True), ("fastest", False)])
def test_compile_mode_from_the_environment(value, ok):
    import os
    import subprocess
    import sys
    env = {**os.environ, "FLEXFLASH_COMPILE_MODE": value}
    run = subprocess.run([sys.executable, "-c", "import flexflash; print(flexflash.get_compile_mode())"],
                         env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == value
    else:
        assert run.returncode != 0
        assert "FLEXFLASH_COMPILE_MODE: expected one of 'default', 'max-autotune', got 'fastest'" in run.stderr


def test_max_autotune_leaves_the_tiles_to_the_autotuner(monkeypatch):
    from flexflash import _tuning
    tiles = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64}
    monkeypatch.setattr(_tuning, "triton_options", lambda *args, **kwargs: dict(tiles))
    q = torch.randn(1, 2, 64, 16)
    window = mods.sliding_window(8)
    st = _kinds.structure(q, q, causal=False, mask=None, bias=None, mask_mod=window, score_mod=None)
    infos = (_fingerprint.inspect_modifier(window), _fingerprint.inspect_modifier(None))

    def options(kernel_options=None):
        return _kinds.measured_options(st, q, q, q, bias=None, mask_mod=window, score_mod=None, infos=infos,
                                         block=(128, 128), kernel_options=kernel_options, dropout=False,
                                         return_lse=False)[0]

    assert options() == tiles
    monkeypatch.setattr(_kinds, "_MODE", ["max-autotune"])  # the mode measured_options reads
    assert options() is None
    assert options({"BLOCK_M": 32}) == {"BLOCK_M": 32}  # the caller's own options stand
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert options() == tiles  # traced into a caller's torch.compile: the caller's mode applies


def test_each_compile_mode_has_its_own_kernels(monkeypatch):
    """A mode is part of the kind: switching compiles the kernel anew under that mode (once), with
    Inductor's max-autotune settings, both agree with the reference, and switching back reuses the
    first kernel."""
    import torch._inductor.compile_fx as compile_fx_module
    patches_seen = []
    compile_fx = compile_fx_module.compile_fx

    def recording_compile_fx(gm, example_inputs, **kwargs):
        patches_seen.append(kwargs.get("config_patches"))
        return compile_fx(gm, example_inputs, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", recording_compile_fx)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 48, 16, generator=gen) for _ in range(3))
    window = mods.sliding_window(5)
    expected = flexflash.reference.attention(q, k, v, mask_mod=window)
    with torch.no_grad():
        torch.testing.assert_close(flexflash.attention(q, k, v, mask_mod=window), expected)
        before = compile_stats()
        default_compiles = len(patches_seen)
        flexflash.set_compile_mode("max-autotune")
        try:
            torch.testing.assert_close(flexflash.attention(q, k, v, mask_mod=window), expected)
            tuned = compile_stats()
            assert (tuned["kernels"], tuned["compiles"]) == (before["kernels"] + 1, before["compiles"] + 1)
            assert [kern.mode for kern in _kernel_for("sliding_window")][-1] == "max-autotune"
            # the default kernel compiled without patches, the new one with max-autotune's
            assert all(p is None for p in patches_seen[:default_compiles])
            assert {"max_autotune": True, "coordinate_descent_tuning": True} in patches_seen[default_compiles:]
            torch.testing.assert_close(flexflash.attention(q, k, v, mask_mod=window), expected)
        finally:
            flexflash.set_compile_mode("default")
        torch.testing.assert_close(flexflash.attention(q, k, v, mask_mod=window), expected)
    after = compile_stats()
    assert (after["kernels"], after["compiles"]) == (tuned["kernels"], tuned["compiles"])


def test_dynamic_marks_on_a_mask_mods_tensors_last_for_the_call_only():
    """The caller's tensors read by a mask_mod are marked dynamic while the kernel or the block-mask
    builder compiles (so a new length reuses it) and unmarked afterwards, marks the caller set
    included, so nothing leaks into the caller's own torch.compile."""
    from flexflash._torch_private import _MARK_ATTRIBUTES, _with_dynamic_sizes
    _WEAK_DYNAMIC = _MARK_ATTRIBUTES[0]
    ids, lengths, scalar = torch.zeros(2, 64), torch.zeros(1, 8), torch.zeros(())
    torch._dynamo.maybe_mark_dynamic(lengths, 1)  # the caller's own mark
    seen = {}

    def traced(x):
        seen.update((name, set(getattr(t, _WEAK_DYNAMIC, ()))) for name, t in
                    (("ids", ids), ("lengths", lengths), ("scalar", scalar)))
        return x + 1

    assert _with_dynamic_sizes([ids, lengths, scalar], traced, 1) == 2
    assert seen == {"ids": {0, 1}, "lengths": {1}, "scalar": set()}  # sizes of 1 stay static
    assert not any(hasattr(ids, name) for name in _MARK_ATTRIBUTES) and getattr(lengths, _WEAK_DYNAMIC) == {1}

    def failing(x):
        raise RuntimeError("compilation failed")

    with pytest.raises(RuntimeError, match="compilation failed"):
        _with_dynamic_sizes([ids], failing, 1)
    assert not any(hasattr(ids, name) for name in _MARK_ATTRIBUTES)


def test_a_compiled_kernel_marks_no_sizes_on_later_calls(monkeypatch):
    """Once a kind has compiled (with symbolic sizes), its calls go straight to the compiled kernel:
    no shape marks (each costs host time on every call), on CPU too; a new length reuses it."""
    gen = torch.Generator().manual_seed(11)
    pad = torch.rand(2, 96, generator=gen) > 0.3
    q, k, v = (torch.randn(2, 2, n, 16, generator=gen) for n in (80, 96, 96))
    flexflash.attention(q, k, v, mask=pad, backend="flex")  # compiles the kind
    compiles = flexflash.compile_stats()["compiles"]
    calls = []
    original = torch._dynamo.maybe_mark_dynamic

    def recording(t, dim):
        calls.append(dim)
        return original(t, dim)

    # (torch._dynamo.mark_static is left alone: FlexAttention's traced code reads it, so replacing
    # it would fail a guard and compile again)
    monkeypatch.setattr(torch._dynamo, "maybe_mark_dynamic", recording)
    out = flexflash.attention(q, k, v, mask=pad, backend="flex")
    q2 = torch.randn(2, 2, 70, 16, generator=gen)
    out2 = flexflash.attention(q2, k, v, mask=pad, backend="flex")  # a new query length
    assert calls == [] and flexflash.compile_stats()["compiles"] == compiles
    for got, qq in ((out, q), (out2, q2)):
        ref = flexflash.reference.attention(qq, k, v, mask=pad)
        golden = flexflash.reference.attention(as64(qq), as64(k), as64(v), mask=pad)
        assert_close_to_golden("out", got, ref, golden, torch.float32)


def test_the_plan_of_a_call_is_memoised_by_everything_that_decides_it():
    """A call's plan (path, kernel options, the flex path's kind) is memoised by a key of its
    shapes, dtypes, flags, options and modifier fingerprints: calls whose keys are equal must have
    equal plans, so each argument that changes the plan changes the key (a bias that starts
    requiring grad, a broadcast mask, another scale or block size, a new captured value...).
    Checked on CPU and on CUDA (where the path and the kernel options depend on more of the call),
    without compiling anything."""
    from flexflash import _checks, plan as plans
    gen = torch.Generator().manual_seed(13)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        q = torch.randn(2, 4, 256, 64, generator=gen).to(device)
        kv = torch.randn(2, 2, 256, 64, generator=gen).to(device)
        q16, kv16 = q.to(torch.bfloat16), kv.to(torch.bfloat16)
        pad = (torch.rand(2, 256, generator=gen) > 0.3).to(device)
        bias = torch.randn(2, 4, 256, 256, generator=gen).to(device)
        ids = torch.arange(256, device=device).expand(2, 256) // 100
        variants = [
            {}, dict(causal=True), dict(scale=0.2), dict(block_size=(64, 128)), dict(block_size=128),
            dict(return_lse=True), dict(backend="flex"), dict(backend="reference"), dict(dropout_p=0.1),
            dict(kernel_options={"BLOCK_M": 64, "BLOCK_N": 64}), dict(kernel_options={"num_stages": 2}),
            dict(mask=pad), dict(mask=pad[:1]), dict(mask=pad[:, None, None, :].expand(2, 4, 256, 256)),
            dict(bias=bias), dict(bias=bias[:, :1]), dict(bias=bias.to(torch.bfloat16)),
            dict(bias=bias.clone().requires_grad_(True)), dict(q=q.clone().requires_grad_(True)),
            dict(q=q16, k=kv16, v=kv16), dict(q=q16, k=kv16, v=kv16, mask=pad), dict(q=q16, k=kv16, v=kv16, causal=True),
            dict(q=q16, k=kv16, v=kv16, bias=bias.to(torch.bfloat16)), dict(q=q16, k=kv16, v=kv16, dropout_p=0.1),
            dict(q=q16, k=kv16, v=kv16, dropout_p=0.1, shard=True), dict(q=q16[:, :, :255], k=kv16, v=kv16, causal=True), dict(q=q[:, :, :1]), dict(k=kv[:, :, :200], v=kv[:, :, :200]),
            dict(k=q, v=q), dict(v=kv[..., :32]), dict(q=q16[:, :, :0], k=kv16, v=kv16),
            dict(mask_mod=mods.sliding_window(16)), dict(mask_mod=mods.sliding_window(32)),
            dict(mask_mod=mods.document(ids)), dict(score_mod=mods.tanh_softcap(5.0)),
            dict(score_mod=mods.alibi(4), causal=True),
        ]
        seen = {}
        for change in variants:
            call = {**_checks.KEYWORDS, "q": q, "k": kv, "v": kv, **change}
            qq, kk, vv, shard = call.pop("q"), call.pop("k"), call.pop("v"), call.pop("shard", False)
            p, infos, dropout_p = _checks.validate(qq, kk, vv, **call)
            named = dict(causal=call["causal"], dropout_p=dropout_p, block_size=call["block_size"],
                         kernel_options=call["kernel_options"], return_lse=call["return_lse"], backend=call["backend"],
                         shard=shard)
            key = plans.memo_key(p, infos, **named)
            assert key is not None
            plan = plans.make_plan(p, infos, mask_mod=call["mask_mod"], score_mod=call["score_mod"], **named)
            if key in seen:
                assert (seen[key], seen[key].kind) == (plan, plan.kind), (device, change)
            seen[key] = plan
        assert len(seen) == len(variants)  # the variants do differ
    # kernel options that cannot be hashed are not memoised (the call still runs)
    q = torch.randn(1, 1, 8, 16)
    p, infos, _ = _checks.validate(q, q, q, **{**_checks.KEYWORDS, "kernel_options": {"BLOCK_M": [64]}})
    assert plans.memo_key(p, infos, causal=False, dropout_p=0.0, block_size=None, kernel_options={"BLOCK_M": [64]},
                          return_lse=False, backend="auto") is None
