"""flexflash traced inside a caller's torch.compile, as users run it: every kind of call and every
module compiles once for one shape and at most once more for new lengths (the recompile that
makes them symbolic), never breaks the graph (``fullgraph=True``), and equals the eager call; and
first calls from several threads at once."""

from __future__ import annotations

import threading
import types

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import flexflash
from flexflash import _blockmask, _kinds, mods
from flexflash._fingerprint import inspect_modifier

from .helpers import FLOOR, as64, guard_trees, seed_of



def _skip_cpu_training_where_it_raises():
    if flexflash.functional._TRACED_CPU_TRAINING_FAILS:
        pytest.skip(f"CPU training inside torch.compile raises on torch {torch.__version__} (tests/test_modules.py)")

B, H, D = 2, 4, 16
LENGTHS = (40, 40, 56, 72)  # one length twice (new mask values), then two new ones


def _kind(name: str, N: int, gen: torch.Generator, device: str = "cpu") -> tuple[dict, int]:
    """The keywords of one kind of call at length N on ``device`` (new tensor values at every
    call), and the key/value head count."""
    kw, Hkv = _kind_on_cpu(name, N, gen)
    if name == "document":  # a mask_mod reading tensors
        kw = dict(mask_mod=mods.document(kw["ids"].to(device)))
    return {key: value.detach().to(device).requires_grad_(value.requires_grad) if isinstance(value, torch.Tensor)
            else value for key, value in kw.items()}, Hkv


def _kind_on_cpu(name: str, N: int, gen: torch.Generator) -> tuple[dict, int]:
    if name == "causal":
        return dict(causal=True), H
    if name == "key_padding":
        return dict(mask=torch.rand(B, N, generator=gen) > 0.3), H
    if name == "sliced_mask":  # a view of a larger mask, offset along both lengths
        big = torch.rand(B, 1, N + 5, N + 3, generator=gen) > 0.3
        return dict(mask=big[..., 5:, 3:], causal=True), H
    if name == "bias":
        return dict(bias=torch.randn(H, N, N, generator=gen)), H
    if name == "bias_grad":
        return dict(bias=torch.randn(1, H, N, N, generator=gen).requires_grad_(), causal=True), H
    if name == "document":
        return dict(ids=torch.sort(torch.randint(0, 3, (B, N), generator=gen), dim=-1).values), H
    if name == "sliding_window":
        return dict(mask_mod=mods.sliding_window(8), causal=True), H
    if name == "alibi":
        return dict(score_mod=mods.alibi(H), causal=True), H
    if name == "dropout":
        return dict(dropout_p=0.25, causal=True), H
    if name == "gqa":
        return dict(causal=True, mask=torch.rand(B, N, generator=gen) > 0.2), 2
    raise AssertionError(name)


KINDS = ["causal", "key_padding", "sliced_mask", "bias", "bias_grad", "document", "sliding_window", "alibi",
         "dropout", "gqa"]


def _close(name, got, eager, golden, dtype=torch.float32):
    """``got`` (compiled) at most twice as far from the fp64 ``golden`` as the eager call is, plus
    a few ulps (the compiled and eager calls may take different kernels: the compiled one sums in
    another order, but must be as accurate)."""
    got, eager, golden = got.double(), eager.double(), golden.double()
    err = (got - golden).abs().max().item()
    bound = 2 * (eager - golden).abs().max().item() + FLOOR[dtype] * max(1.0, golden.abs().max().item())
    assert err <= bound, f"{name}: compiled error {err:.3g} > {bound:.3g}"


def _call(q, k, v, kw):
    return flexflash.attention(q, k, v, **kw)


def _reference(q, k, v, kw):
    return flexflash.attention(q, k, v, backend="reference", **kw)


def _fresh_code(fn, name: str):
    """``fn`` with a code object of its own: Dynamo keeps its graphs (and its recompile budget) per
    code object, so each test counts only its own."""
    return types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name)


def _attention_step(kw, q, k, v, train, fn):
    """One call (and its backward when training); returns the output and the gradients."""
    leaves = [t for t in (q, k, v, kw.get("bias")) if t is not None and t.requires_grad]
    torch.manual_seed(7)  # dropout: the compiled and eager calls draw the same entries
    with torch.set_grad_enabled(train):
        out = fn(q, k, v, kw)
        if not train:
            return out, []
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    return out, list(grads)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name", KINDS)
def test_functional_call_compiles_once_per_shape_and_once_more_for_new_lengths(name, train, device):
    if name == "bias_grad" and not train:
        pytest.skip("the same as 'bias' without gradients")
    if train and device == "cpu":
        _skip_cpu_training_where_it_raises()
    call = _fresh_code(_call, f"call_{name}_{train}_{device}")
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(call, backend=counter, fullgraph=True)
    graphs = []
    for step, N in enumerate(LENGTHS):
        gen = torch.Generator().manual_seed(seed_of(name, N, step))
        kw, Hkv = _kind(name, N, gen, device)
        q = torch.randn(B, H, N, D, generator=gen).to(device).requires_grad_(train)
        k, v = (torch.randn(B, Hkv, N, D, generator=gen).to(device).requires_grad_(train) for _ in range(2))
        out, grads = _attention_step(kw, q, k, v, train, compiled)
        # The eager call to compare with; on CPU without gradients that is FlexAttention's CPU
        # kernel, which tests/test_attention.py holds to the reference: here the reference stands
        # in for it (compiling that kernel for every kind would double this test's time in CI).
        eager = call if train or device == "cuda" else _reference
        want, want_grads = _attention_step(kw, q, k, v, train, eager)
        kw64 = {key: as64(value) for key, value in kw.items()}
        gold, gold_grads = _attention_step(kw64, as64(q), as64(k), as64(v), train, _reference)
        _close(f"{name} out N={N}", out, want, gold)
        for i, (a, b, c) in enumerate(zip(grads, want_grads, gold_grads)):
            _close(f"{name} grad {i} N={N}", a, b, c)
        graphs.append(counter.frame_count)
    # one graph for the first length (the second call with new values reuses it), at most one
    # more with symbolic lengths for both new ones
    assert graphs[0] == graphs[1] == 1, graphs
    assert graphs[-1] <= 2, graphs


class _Block(torch.nn.Module):
    """A small pre-norm transformer block around one flexflash module, as a model would use it
    (heads of 16: FlexAttention's CUDA kernels take no smaller head dim)."""

    def __init__(self, module: str, dim: int = 64):
        super().__init__()
        self.kind = module
        self.norm = torch.nn.LayerNorm(dim)
        if module == "FlashMHA":
            self.attn = flexflash.FlashMHA(dim, 4, causal=True, dropout=0.1)
        elif module == "FlashAttentionTwo":
            self.attn = flexflash.FlashAttentionTwo(dim=dim, heads=4, dim_head=16, causal=True)
        elif module == "ChunkedAttention":
            self.attn = flexflash.ChunkedAttention(dim, 4, chunk_size=16)
        else:  # FlashAttention: the inner attention, with the block's own projections
            self.attn = flexflash.FlashAttention(causal=True, dropout=0.1)
            self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x, padding):
        h = self.norm(x)
        if self.kind == "FlashMHA":
            a = self.attn(h, key_padding_mask=padding)
        elif self.kind == "FlashAttentionTwo":
            a = self.attn(h, mask=padding)
        elif self.kind == "ChunkedAttention":
            a = self.attn(h, h, h, mask=padding[:, None, None, :])
        else:
            q, k, v = (t.unflatten(-1, (4, -1)).transpose(1, 2) for t in self.qkv(h).chunk(3, dim=-1))
            a = self.attn(q, k, v, mask=padding[:, None, None, :]).transpose(1, 2).flatten(2)
        return x + self.out(a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("module", ["FlashAttention", "FlashMHA", "FlashAttentionTwo", "ChunkedAttention"])
def test_module_in_a_compiled_model_trains_and_evaluates_without_recompiling(module, device):
    """Each module inside a model under torch.compile(fullgraph=True): training steps (with an
    optimizer; dropout on where the module has it) and evaluation steps over three lengths, with new
    padding every step. Losses and gradients equal those of the same model run eagerly."""
    if device == "cpu":
        _skip_cpu_training_where_it_raises()
    torch.manual_seed(seed_of(module))
    block = type(f"Block_{module}", (_Block,), {"forward": _fresh_code(_Block.forward, f"forward_{module}_{device}")})
    model = block(module).to(device)
    eager = block(module).to(device)
    eager.load_state_dict(model.state_dict())
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager)]
    graphs = {True: [], False: []}
    for step, N in enumerate(LENGTHS):
        gen = torch.Generator().manual_seed(seed_of(module, step))
        x = torch.randn(2, N, 64, generator=gen).to(device)
        padding = (torch.arange(N)[None, :] < torch.tensor([N, N - 5])[:, None]).to(device)  # (B, N), True = real
        for train in (True, False):
            before = counter.frame_count
            losses = []
            for m, net, opt in ((compiled, model, optimizers[0]), (eager, eager, optimizers[1])):
                net.train(train)
                torch.manual_seed(step)  # the same dropout draws in both
                with torch.set_grad_enabled(train):
                    loss = m(x, padding).pow(2).mean()
                if train:
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                losses.append(loss.detach())
            # 10 ulps of the loss: the two models hold equal weights, the compiled one sums in
            # another order (and the drift of earlier optimizer steps stays that small)
            torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
            graphs[train].append(counter.frame_count - before)
    for train, new in graphs.items():
        # per mode: a graph at the first length, none for new values, at most one more after
        assert new[0] == 1 and new[1] == 0 and sum(new) <= 2, (train, new)
    for a, b in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_first_calls_from_several_threads_at_once():
    """Four threads make the first call of four kinds at once (each compiles); every result equals
    the reference, and nothing raises."""
    gen = torch.Generator().manual_seed(3)
    N = 48
    q, k, v = (torch.randn(B, H, N, D, generator=gen) for _ in range(3))
    kinds = [dict(causal=True), dict(mask_mod=mods.sliding_window(6), causal=True),
             dict(bias=torch.randn(H, N, N, generator=gen)), dict(mask=torch.rand(B, N, generator=gen) > 0.3)]
    results, errors = {}, []
    start = threading.Barrier(len(kinds))

    def run(i, kw):
        try:
            start.wait()
            results[i] = flexflash.attention(q, k, v, **kw)
        except Exception as e:  # reported below, with the kind
            errors.append((kw, e))

    threads = [threading.Thread(target=run, args=(i, kw)) for i, kw in enumerate(kinds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, kw in enumerate(kinds):
        want = flexflash.attention(q, k, v, backend="reference", **kw)
        torch.testing.assert_close(results[i], want, rtol=1e-5, atol=2e-5)


def test_the_callers_own_compile_of_a_mask_mods_tensors_after_a_call():
    """flexflash marks the tensors a mask_mod reads dynamic while its kernel compiles, and leaves
    no mark behind: the caller's own torch.compile of FlexAttention with the same mask_mod (a
    block mask built from the same document ids) compiles and runs (a mark left behind fails its
    guards on the frame that made them)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    gen = torch.Generator().manual_seed(5)
    N = 64
    q, k, v = (torch.randn(1, 2, N, D, generator=gen) for _ in range(3))
    doc = mods.document(torch.sort(torch.randint(0, 3, (1, N), generator=gen), dim=-1).values)
    with torch.no_grad():
        ours = flexflash.attention(q, k, v, mask_mod=doc)
        block_mask = create_block_mask(doc, 1, 2, N, N, device="cpu")
        theirs = torch.compile(flex_attention)(q, k, v, block_mask=block_mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=2e-5)


def test_dropout_words_in_a_callers_graph_equal_the_eager_ones():
    """Inside a caller's graph the dropout hash's row and column words come from flexflash's
    operator (its outputs reach FlexAttention's CUDA lowering as buffers of fixed layout): the
    same words as the eager computation."""
    from flexflash._flex_dropout import _dropout_words
    from flexflash.dropout import draw_seed

    torch.manual_seed(2)
    params = draw_seed(0.3, "cpu")
    cpu = torch.device("cpu")
    want = _dropout_words(params, 2, 3, 5, 7, cpu)
    got = torch.compile(lambda p: _dropout_words(p, 2, 3, 5, 7, cpu), fullgraph=True)(params)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_a_score_mod_reading_a_tensor_that_needs_grad_raises_inside_compile_on_cpu():
    """The traced tiled path differentiates score modifiers with torch.func.vjp, which cannot reach
    a tensor a closure reads: such a call raises, naming what to do, instead of dropping its
    gradient (a bias passed as bias= gets its gradient)."""
    _skip_cpu_training_where_it_raises()
    table = torch.randn(H, requires_grad=True)

    def per_head(score, b, h, q_idx, kv_idx):
        return score + table[h]

    q, k, v = (torch.randn(1, H, 8, D, requires_grad=True) for _ in range(3))
    call = torch.compile(_fresh_code(_call, "call_grad_score_mod"), fullgraph=True)
    with pytest.raises(Exception, match="score_mod that reads a tensor requiring grad"):
        call(q, k, v, dict(score_mod=per_head))


_TRACED_BLOCK = (16, 16)


def _build_block_tensors(q, k, mask, mask_mod, causal):
    """A call's block-mask tensors, as flexflash's kernel inputs build them."""
    Nq, Nk = q.shape[-2], k.shape[-2]
    st = _kinds.structure(q, k, causal=causal, mask=mask, bias=None, mask_mod=mask_mod, score_mod=None)
    offset = None
    if causal and not st.causal_aligned:
        offset = Nk - Nq if torch.compiler.is_compiling() else torch.tensor(Nk - Nq)
    return _blockmask._block_tensors(st, Nk - Nq, mask, mask_mod, inspect_modifier(mask_mod), q.shape[0],
                                     q.shape[1], Nq, Nk, _TRACED_BLOCK, q.device, q=q, k=k, offset_tensor=offset)


def _listed(tensors, shape):
    """The blocks a block mask's kernel visits, per (batch, head, query block) of ``shape``: (the
    partial key blocks, the full ones), each a set; from FlexAttention's lists (counts and indices,
    broadcast over batch and head)."""
    def rows(num, idx):
        if num is None:
            return None
        # (the lists have at least two rows: a query block past the queries lists nothing)
        num, idx = num[..., :shape[2]].expand(*shape[:3]), idx[..., :shape[2], :].expand(*shape[:3], idx.shape[-1])
        return [[[frozenset(idx[b, h, r, :int(num[b, h, r])].tolist()) for r in range(shape[2])]
                 for h in range(shape[1])] for b in range(shape[0])]
    return rows(tensors[0], tensors[1]), rows(tensors[2], tensors[3])


@pytest.mark.parametrize("case", ["causal_offset", "key_padding", "document", "window_decoding",
                                  "lengths_decoding", "lengths_three_rows"])
def test_block_masks_traced_into_the_callers_graph_equal_the_eager_ones(case, monkeypatch):
    """Inside a caller's torch.compile, a call's block mask can be built by the compiled builder's
    body traced into the caller's graph (``flexflash._blockmask.TRACED_FUSED_ON``): the mask
    evaluated over the rows there are (a decoding step's one query: two rows a block, not the
    block's 128). Set up here for the CPU (the aot_eager backend: the graph's block tensors are
    its outputs), the lists it makes equal those of the eager build in query chunks, over lengths
    that change (no recompilation after the second, which makes them symbolic)."""
    gen = torch.Generator().manual_seed(seed_of("traced-blocks", case))
    block, Hq = _TRACED_BLOCK, 4

    def problem(step):
        Nq, Nk = {"causal_offset": (20 + step, 45 + 3 * step), "key_padding": (33, 33 + step),
                  "document": (40 + step, 40 + step), "window_decoding": (1, 70 + 9 * step),
                  "lengths_decoding": (1, 64 + 7 * step), "lengths_three_rows": (3, 50 + step)}[case]
        lens = torch.randint(0, Nk + 1, (B,), generator=gen)
        kw = dict(causal=case in ("causal_offset", "document", "lengths_three_rows"), mask=None, mask_mod=None)
        if case == "key_padding":
            kw["mask"] = (torch.rand(B, 1, 1, Nk, generator=gen) > 0.5)
        elif case == "document":
            ids = torch.sort(torch.randint(0, 3, (B, Nk), generator=gen), dim=-1).values
            kw["mask_mod"] = mods.document(ids)
        elif case == "window_decoding":
            kw["mask_mod"] = mods.and_masks(mods.sliding_window(20), lambda b, h, q, kv: kv < lens[b])
        else:
            kw["mask_mod"] = lambda b, h, q_idx, kv_idx: kv_idx < lens[b]
        return torch.randn(B, Hq, Nq, D), torch.randn(B, Hq, Nk, D), kw

    build, fused, real = _build_block_tensors, {}, _blockmask._fused_flags

    def spied(*args):  # the builder's body evaluates the mask: it ran inside the graph
        fused["traced" if torch.compiler.is_compiling() else "eager"] = True
        return real(*args)
    monkeypatch.setattr(_blockmask, "_fused_flags", spied)
    counter = CompileCounterWithBackend("aot_eager")
    fresh = _fresh_code(build, f"traced_blocks_{case}")
    traced = torch.compile(fresh, backend=counter, fullgraph=True)
    graphs = []
    for step in range(4):
        q, k, kw = problem(step)
        monkeypatch.setattr(_blockmask, "TRACED_FUSED_ON", set())
        eager = build(q, k, kw["mask"], kw["mask_mod"], kw["causal"])
        monkeypatch.setattr(_blockmask, "TRACED_FUSED_ON", {"cpu"})
        got = traced(q, k, kw["mask"], kw["mask_mod"], kw["causal"])
        rows = -(-q.shape[-2] // block[0])
        shape = (B, Hq, rows)
        want_partial, want_full = _listed(eager, shape)
        got_partial, got_full = _listed(got, shape)
        assert got_partial == want_partial, (case, step)
        assert got_full == want_full, (case, step)
        graphs.append(counter.frame_count)
    assert graphs[-1] <= 2 and graphs[-1] == graphs[1], graphs
    assert fused == {"traced": True}, fused
    # the call's structure reaches the builder without a guard on each of its dataclass fields
    # (dataclasses.replace, traced, reads them all: some seventy lines of every call's guards)
    trees = guard_trees(fresh)
    assert trees and not any("__dataclass_fields__" in tree for tree in trees)


def _row_tile_fits(Nq: int, groups: int, block_rows: int) -> bool:
    """FlexAttention's decoding kernel as its lowering sizes it: the grouped query rows of a
    key/value head, ``Nq * groups``, in a tile of the next power of two of at least 16 rows, which
    must divide the query block; groups a power of two."""
    tile = 16
    while tile < Nq * groups:
        tile *= 2
    return 0 < Nq < block_rows and groups & (groups - 1) == 0 and block_rows % tile == 0


def test_decoding_shape_is_flexattentions_row_tile_rule():
    for block_rows in (8, 16, 32, 48, 64, 96, 128, 256):
        for groups in (1, 2, 3, 4, 8, 16):
            for Nq in range(1, 140):
                q = torch.empty(2, 2 * groups, Nq, 64, device="meta")
                k = torch.empty(2, 2, 512, 64, device="meta")
                assert _kinds.decoding_shape(q, k, (block_rows, 128)) == _row_tile_fits(Nq, groups, block_rows), \
                    (block_rows, groups, Nq)


@pytest.mark.parametrize("symbolic", ["length", "batch"])
def test_decoding_shape_traced_with_symbolic_sizes_adds_no_guard(symbolic):
    """Traced into a caller's graph, the decoding-kernel check holds for a static batch and query
    length alone (FlexAttention's lowering takes its decoding kernel for a static batch) and reads
    symbolic ones without a guard: query lengths 40, 56, 72, 100 (across powers of two), or batches
    1, 3, 5, 9, compile the caller's graph twice (the static first size, then symbolic), not once per
    range of sizes; the symbolic graph answers False."""
    counter = CompileCounterWithBackend("eager")

    def check(q, k):
        return q * 2, _kinds.decoding_shape(q, k, (128, 128))

    compiled = torch.compile(_fresh_code(check, f"decoding_shape_{symbolic}"), backend=counter, fullgraph=True)
    sizes = (40, 40, 56, 72, 100) if symbolic == "length" else (1, 1, 3, 5, 9)
    answers = []
    for n in sizes:
        q = torch.ones(1, 4, n, 8) if symbolic == "length" else torch.ones(n, 4, 16, 8)
        k = torch.ones(q.shape[0], 2, 256, 8)
        answers.append(compiled(q, k)[1])
    assert answers == [True, True, False, False, False], answers
    assert counter.frame_count == 2, counter.frame_count


SHIFT = 0.0  # a global of the caller's own, read by the step below


def _step_reading_a_global(q, k, v, mask):
    return flexflash.attention(q, k, v, mask=mask) + SHIFT


def test_guard_filter_drops_the_guards_on_flexflash_and_keeps_the_callers(monkeypatch):
    """``flexflash.guard_filter`` as the caller's ``guard_filter_fn``: the compiled call equals the
    eager one; the guards left are the caller's (none on flexflash's modules or on the code and
    defaults of its functions but tensor guards); a change of the caller's own global, or of the
    function its name is bound to, still recompiles; new mask values do not."""
    kept, counter = [], CompileCounterWithBackend("eager")

    def recording(entries):
        keep = flexflash.guard_filter(entries)
        kept.append((len(entries), [e for e, k in zip(entries, keep) if k]))
        return keep

    compiled = torch.compile(_fresh_code(_step_reading_a_global, "step_reading_a_global"), backend=counter,
                             fullgraph=True, options={"guard_filter_fn": recording})
    gen = torch.Generator().manual_seed(seed_of("guard_filter"))
    q, k, v = (torch.randn(B, H, 40, D, generator=gen) for _ in range(3))
    for _ in range(2):  # new mask values: no recompilation
        mask = torch.rand(B, 40, generator=gen) > 0.3
        with torch.no_grad():
            torch.testing.assert_close(compiled(q, k, v, mask), flexflash.attention(q, k, v, mask=mask))
    assert counter.frame_count == 1
    total, left = kept[0]
    assert len(left) < total / 2, (len(left), total)
    own = [e.name for e in left if e.guard_type != "TENSOR_MATCH" and (
        "__import_flexflash" in e.name or ".__code__" in e.name or "defaults__" in e.name)]
    assert not own, own
    monkeypatch.setattr(__import__(__name__, fromlist=["SHIFT"]), "SHIFT", 1.0)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v, mask), flexflash.attention(q, k, v, mask=mask) + 1.0)
    assert counter.frame_count == 2  # the caller's global is still guarded
    monkeypatch.setattr(flexflash, "attention", lambda q, k, v, mask: q * 0)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v, mask), q * 0 + 1.0)
    assert counter.frame_count == 3  # so is the function the caller's name is bound to


def test_decoding_shape_guarded_compares_a_symbolic_length_once():
    """``decoding_shape(..., guarded=True)`` (whether a paged cache is read in place): a symbolic
    query length is compared with guards, one threshold of the row tile: lengths 8, then 16, 24, 40
    (grouped rows 32-80, within the 128-row block) share one symbolic graph, where a loop over the
    powers of two compiled one per range; 72 (144 grouped rows) compiles another and answers False."""
    counter = CompileCounterWithBackend("eager")

    def check(q, k):
        return q * 2, _kinds.decoding_shape(q, k, (128, 128), guarded=True)

    compiled = torch.compile(_fresh_code(check, "decoding_shape_guarded"), backend=counter, fullgraph=True)
    answers, frames = [], []
    for n in (8, 8, 16, 24, 40, 72):
        answers.append(compiled(torch.ones(1, 4, n, 8), torch.ones(1, 2, 256, 8))[1])
        frames.append(counter.frame_count)
    assert answers == [True] * 5 + [False], answers
    assert frames == [1, 1, 2, 2, 2, 3], frames
