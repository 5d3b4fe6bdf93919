"""flash_attn_with_kvcache's short decoding path (``flexflash.compat._decoding``: a step traced into
a caller's torch.compile, by default on CUDA alone, switched on for the CPU here) against flash-attn's
semantics: each sequence's one new query over its keys ``[cache_leftpad, cache_seqlens + 1)`` of a
contiguous or paged cache, with soft-capping, ALiBi, a scale and the log-sum-exp; its block mask
over the keys the kernel reads; and the calls it leaves to the general path. (The CPU graphs run
with the aot_eager backend: Inductor's CPU lowering of FlexAttention takes no log-sum-exp and no
pool of pages; the kernels themselves run in the GPU tests of tests/test_flash_attn_compat.py.)"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend

from flexflash.compat import _decoding
from flexflash.compat.flash_attn import flash_attn_with_kvcache

from .helpers import assert_close_to_golden, spied_short_path
from .test_flash_attn_compat import attention_ref

B, H, HK, D, PAGE = 3, 4, 2, 16, 128


@pytest.fixture
def short_path(monkeypatch):
    """The short path on for CPU calls traced into a caller's graph too (CUDA's by default); the
    list of its traced calls."""
    monkeypatch.setattr(_decoding, "TRACED_ON", {"cpu", "cuda"})
    return spied_short_path(monkeypatch)


def _cache(layout: str, gen: torch.Generator, device: str = "cpu"):
    """(k_cache, v_cache, block_table, the logical keys and values ``(B, 3 * PAGE, HK, D)`` read from
    them, on the CPU: call it after each step, as it writes in place)."""
    if layout == "contiguous":
        k, v = (torch.randn(B, 3 * PAGE, HK, D, generator=gen).to(device) for _ in range(2))
        return k, v, None, lambda: (k.cpu(), v.cpu())
    pages = 3 * B + 2  # two pages of the pool belong to no sequence
    k, v = (torch.randn(pages, PAGE, HK, D, generator=gen).to(device) for _ in range(2))
    table = torch.randperm(pages, generator=gen)[:3 * B].view(B, 3).to(torch.int32)
    return k, v, table.to(device), lambda: tuple(c.cpu()[table.long()].flatten(1, 2) for c in (k, v))


def _reference(q, keys, values, start, total, dtype, **kw):
    """flash-attn's reference per sequence over its keys ``[start, total)`` in ``dtype``: (out,
    lse); a sequence without keys gives 0 and -inf."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        s, n = max(int(start[b]), 0), int(total[b])
        slopes = kw.get("alibi_slopes")
        one = dict(kw, alibi_slopes=None if slopes is None else slopes[b:b + 1])
        if n <= s:
            outs.append(torch.zeros_like(q[b:b + 1], dtype=dtype))
            lses.append(torch.full((1, q.shape[2], 1), float("-inf"), dtype=torch.float64))
            continue
        out, lse = attention_ref(*(t[b:b + 1, lo:hi].to(dtype) for t, lo, hi in
                                   ((q, 0, 1), (keys, s, n), (values, s, n))), **one)
        outs.append(out)
        lses.append(lse.double())
    return torch.cat(outs), torch.cat(lses)


CASES = {
    "causal": dict(causal=True),
    "leftpad_softcap_scale": dict(cache_leftpad=torch.tensor([0, 130, 5], dtype=torch.int32), softcap=2.0,
                                  softmax_scale=0.3),
    "alibi_lse": dict(alibi_slopes=torch.rand(B, H, generator=torch.Generator().manual_seed(4)),
                      return_softmax_lse=True),
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["contiguous", "pages"])
def test_the_short_decoding_path_follows_flash_attns_semantics(layout, case, device, short_path):
    """Three steps (the new key and value appended in place, then attention) inside the caller's
    ``torch.compile(fullgraph=True)``: one graph, taken by the short path; each step's output (and
    log-sum-exp) within twice the float32 reference's error against float64, for a sequence from
    an empty cache on, one crossing a key block, one filling its cache; pages in a shuffled order
    in a pool with pages of no sequence. On the GPU compiled by Inductor: FlexAttention's decoding
    kernel over the block mask's lists."""
    gen = torch.Generator().manual_seed(30)
    kw = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in CASES[case].items()}
    lse = kw.get("return_softmax_lse", False)
    k_cache, v_cache, table, logical = _cache(layout, gen, device)
    counter = CompileCounterWithBackend("inductor" if device == "cuda" else "aot_eager")

    @torch.compile(backend=counter, fullgraph=True)
    def step(q, k, v, lengths):
        return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths, block_table=table, **kw)

    lengths = torch.tensor([0, 126, 381], dtype=torch.int32, device=device)
    start = CASES[case].get("cache_leftpad", torch.zeros(B, dtype=torch.int32))
    ref_kw = {name: value for name, value in CASES[case].items() if name not in ("cache_leftpad", "return_softmax_lse")}
    for i in range(3):
        q, k, v = (torch.randn(B, 1, h, D, generator=gen) for h in (H, HK, HK))
        with torch.no_grad():
            got = step(q.to(device), k.to(device), v.to(device), lengths)
        got = tuple(t.cpu() for t in got) if lse else got.cpu()
        keys, values = logical()
        total = lengths.cpu() + 1
        want, want_lse = _reference(q, keys, values, start, total, torch.float32, **ref_kw)
        gold, gold_lse = _reference(q, keys, values, start, total, torch.float64, **ref_kw)
        out = got[0] if lse else got
        assert_close_to_golden(f"{layout} {case} step {i}", out, want, gold, torch.float32)
        if lse:
            assert got[1].dtype == torch.float32 and got[1].shape == (B, H, 1)
            assert_close_to_golden(f"{layout} {case} step {i} lse", got[1], want_lse, gold_lse, torch.float32)
        lengths = lengths + 1
    assert short_path, "the step did not take the short path"
    assert counter.frame_count == 1, counter.frame_count


def _check_visited(total: torch.Tensor, start: torch.Tensor | None, table: torch.Tensor | None, rows: int,
                   pages: int) -> None:
    """:func:`flexflash.compat._decoding.visited` against its contract: the mask allows exactly the
    keys of the kernel's input that hold a sequence's keys ``[max(start, 0), min(total, capacity))``
    (for a pool, of its own pages alone: on every key, visited or not), ``position`` maps each of
    them back to its logical index, and the listed blocks are exactly the blocks those keys lie in."""
    n = total.shape[0]
    keys = rows if table is None else pages * rows
    capacity = rows if table is None else table.shape[1] * rows
    kv_num, kv_idx, mask, position = _decoding.visited(total, start, table, rows, pages)
    assert kv_num.shape == (n, 1, 1) and kv_idx.shape[:3] == (n, 1, 1)
    kv = torch.arange(keys)
    b = torch.arange(n)[:, None]
    allowed = mask(b, 0, 0, kv[None, :]).expand(n, keys)
    at = position(b, kv[None, :]).expand(n, keys)
    for s in range(n):
        lo, hi = (0 if start is None else max(int(start[s]), 0)), min(int(total[s]), capacity)
        keys_of = kv[allowed[s]]
        assert sorted(at[s, keys_of].tolist()) == list(range(lo, hi)), s  # each of its keys once, no other
        if table is not None:  # a key of the pool maps to its logical index through the table
            logical_page = at[s, keys_of] // rows
            assert torch.equal(table[s].long()[logical_page] * rows + at[s, keys_of] % rows, keys_of), s
        blocks = kv_idx[s, 0, 0, :int(kv_num[s])].tolist()
        assert sorted(blocks) == sorted(set((keys_of // _decoding.KEY_BLOCK).tolist())), s


@pytest.mark.parametrize("leftpad", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "pages"])
def test_the_visited_blocks_and_the_mask_hold_each_sequences_keys_alone(layout, leftpad):
    """:func:`flexflash.compat._decoding.visited` (see :func:`_check_visited`) for lengths of 0,
    within a block, on a block's edge, past a page, the whole cache, and past it (read as the whole
    cache), pages of one key block in a pool with pages of no sequence."""
    gen = torch.Generator().manual_seed(31)
    total = torch.tensor([0, 1, 128, 129, 300, 384, 400])
    start = torch.tensor([0, 0, 5, 128, 200, 0, 10]) if leftpad else None
    n = total.shape[0]
    if layout == "contiguous":
        _check_visited(total, start, None, 3 * PAGE, 0)
    else:
        pages = 3 * n + 2
        table = torch.randperm(pages, generator=gen)[:3 * n].view(n, 3).to(torch.int32)
        _check_visited(total, start, table, PAGE, pages)


@given(data=st.data(), n=st.integers(1, 4), paged=st.booleans(), leftpad=st.booleans())
def test_property_visited_blocks_and_mask(data, n, paged, leftpad):
    """The same contract for drawn caches: contiguous rows of 129-520 keys, or pages of 128-384 keys
    (one to three key blocks) with 1-4 pages a sequence in a shuffled pool with spare pages;
    lengths from 0 to past the capacity, left padding from below 0 to past the length."""
    if paged:
        rows = data.draw(st.sampled_from([128, 256, 384]), label="page")
        per_seq = data.draw(st.integers(1, 4), label="pages a sequence")
        pages = n * per_seq + data.draw(st.integers(0, 3), label="spare pages")
        order = data.draw(st.permutations(range(pages)), label="pool order")
        table = torch.tensor(order[:n * per_seq], dtype=torch.int32).view(n, per_seq)
        capacity = per_seq * rows
    else:
        rows = data.draw(st.integers(129, 520), label="cache length")
        table, pages, capacity = None, 0, rows
    total = torch.tensor(data.draw(st.lists(st.integers(0, capacity + 40), min_size=n, max_size=n), label="total"))
    start = None
    if leftpad:
        start = torch.tensor([data.draw(st.integers(-3, t + 5), label="start") for t in total.tolist()])
    _check_visited(total, start, table, rows, pages)


@pytest.mark.parametrize("reason", ["left_window", "two_queries", "cache_batch_idx", "float64", "grad",
                                    "one_key_block"])
def test_calls_outside_the_short_path_take_the_general_one(reason, short_path):
    """Traced decoding calls the short path does not cover run flexflash's general path, with the
    same result as the eager call: a left window, more than one new query, ``cache_batch_idx``,
    float64 inputs, a query that needs its gradient, a cache of one key block."""
    gen = torch.Generator().manual_seed(32)
    dtype = torch.float64 if reason == "float64" else torch.float32
    S = PAGE if reason == "one_key_block" else 2 * PAGE
    k_cache, v_cache = (torch.randn(B, S, HK, D, generator=gen, dtype=dtype) for _ in range(2))
    q = torch.randn(B, 2 if reason == "two_queries" else 1, H, D, generator=gen, dtype=dtype)
    lengths = torch.tensor([3, 100, S - 2], dtype=torch.int32)
    kw = dict(causal=True)
    if reason == "left_window":
        kw["window_size"] = (40, -1)
    if reason == "cache_batch_idx":
        kw["cache_batch_idx"] = torch.tensor([2, 0, 1], dtype=torch.int32)
    if reason == "grad":
        q.requires_grad_(True)

    def call(q, lengths):
        return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, **kw)
    got = torch.compile(call, backend="aot_eager", fullgraph=True)(q, lengths)
    want = call(q, lengths)
    assert not short_path, reason
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if reason == "grad":
        assert got.requires_grad
