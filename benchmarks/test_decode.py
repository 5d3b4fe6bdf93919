"""Benchmarks of flash-attn's functions (flexflash.compat.flash_attn) against SDPA, in one run:

* decoding: one query token per sequence against a KV cache (``flash_attn_with_kvcache``), batch
  1-64, cache 1k-32k, 32 query heads on 8 key/value heads, D = 128, bf16, contiguous and paged
  (pages of 256) caches, all sequences at the cache's length ("full") or lengths spread over 4x
  ("spread": N/4 to N); SDPA gets the padded cache and a key padding mask of the step's lengths
  (built in the step, as each step of a generation loop has new lengths); each called eagerly
  ("eager") and as a step under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs, as a
  generation loop runs it, the step's tensors at static addresses as a model's buffers are:
  :func:`static_closure`; ``"default"`` mode on CPU); eagerly also as ``flexflash-flex``, the
  same calls kept on FlexAttention (eager steps whose one mask is a tensor otherwise run on SDPA:
  ``flexflash.plan.short_masked_call``), with the static decoding batch that lets FlexAttention
  choose its decoding kernel (``flexflash._kinds._STATIC_DECODING_BATCH``); compiled also as
  ``flexflash-guards``, the same step compiled with ``flexflash.guard_filter`` as its
  ``guard_filter_fn`` (Dynamo's guards on flexflash's own state dropped, docs/flash_attn.md);
* variable-length training: sequences of lengths uniform in [N/4, N] (N = 4096, 8 of them, causal,
  16 heads, D = 128, bf16, forward+backward) packed (``flash_attn_varlen_func``); SDPA gets the
  padded batch with a materialised causal and padding mask.

pytest-benchmark medians; each round ends with a synchronisation. ``FLEXFLASH_BENCH_DEVICE=cpu``
runs a small version on CPU (a smoke run of the code, not a measurement to keep).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import flexflash
from flexflash import plan
from flexflash.compat.flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

DEVICE = os.environ.get("FLEXFLASH_BENCH_DEVICE", "cuda")
CPU = DEVICE == "cpu"
DTYPE = torch.bfloat16
HQ, HKV, D = (4, 2, 16) if CPU else (32, 8, 128)
BATCHES = [1, 4] if CPU else [1, 8, 64]
CACHES = [256] if CPU else [1024, 8192, 32768]
PAGE = 64 if CPU else 256
MAX_CACHE_GIB = 8.0


def _sync():
    if not CPU:
        torch.cuda.synchronize()


def static_closure(step):
    """``step`` with the tensors it closes over marked as static addresses
    (``torch._dynamo.mark_static_address``), as a model's buffers and parameters are: CUDA graphs
    (``mode="reduce-overhead"``) copy every other input into their own memory at each replay, a
    copy of the whole KV cache per step that neither a generation loop holding its cache in a
    module nor the attention itself would pay."""
    for cell in step.__closure__ or ():
        if isinstance(cell.cell_contents, torch.Tensor):
            torch._dynamo.mark_static_address(cell.cell_contents)
    return step


def _lengths(B: int, S: int, spread: bool, gen: torch.Generator) -> torch.Tensor:
    if not spread:
        return torch.full((B,), S, dtype=torch.int32)
    return torch.randint(S // 4, S + 1, (B,), generator=gen, dtype=torch.int32)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("impl", ["flexflash", "flexflash-flex", "flexflash-guards", "sdpa"])
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("lengths", ["full", "spread"])
@pytest.mark.parametrize("S", CACHES)
@pytest.mark.parametrize("B", BATCHES)
def test_decode(benchmark, B, S, lengths, layout, impl, mode, monkeypatch):
    if layout == "paged" and impl == "sdpa":
        pytest.skip("SDPA reads a contiguous padded cache (the contiguous row is its baseline)")
    if impl == "flexflash-flex" and (mode == "compiled" or CPU):
        pytest.skip("compiled steps and CPU calls run FlexAttention or SDPA's CPU kernel either way")
    if impl == "flexflash-guards" and mode != "compiled":
        pytest.skip("a guard filter is an option of the caller's torch.compile")
    if impl == "flexflash-flex":  # eager steps with a mask tensor stay on FlexAttention
        monkeypatch.setattr(plan, "SDPA_MASK_QUERIES", 0)
        monkeypatch.setattr(plan, "_PLANS", {})  # (plans are memoised by the calls' shapes)
    gib = 2 * B * S * HKV * D * 2 / 2**30
    if gib > MAX_CACHE_GIB:
        pytest.skip(f"the cache would take {gib:.0f} GiB")
    if mode == "compiled" and impl.startswith("flexflash") and B * S * HKV * D > 2**31 - 1:
        pytest.skip("a decoding step past 2**31 - 1 elements raises inside torch.compile (docs/compilation.md)")
    gen = torch.Generator().manual_seed(B * 100003 + S)
    lens = _lengths(B, S, lengths == "spread", gen).to(DEVICE)
    k_cache, v_cache = (torch.randn(B, S, HKV, D, generator=gen).to(DEVICE, DTYPE) for _ in range(2))
    q = torch.randn(B, 1, HQ, D, generator=gen).to(DEVICE, DTYPE)
    if impl.startswith("flexflash"):
        table = None
        if layout == "paged":
            with torch.no_grad():
                contiguous = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True)
            pages = torch.randperm(B * S // PAGE, generator=gen)
            table = pages.view(B, S // PAGE).to(DEVICE, torch.int32)
            order = torch.argsort(pages)  # page p of the paged cache holds the contiguous cache's page order[p]
            k_cache, v_cache = (c.view(B * S // PAGE, PAGE, HKV, D)[order].contiguous() for c in (k_cache, v_cache))
            with torch.no_grad():  # the same problem: the same output
                paged = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, block_table=table, causal=True)
            # within two units of rounding of the largest output: on CUDA the two calls may run
            # different kernels (eager bf16 steps: SDPA over the contiguous cache, FlexAttention's
            # decoding kernel over the pages in place), whose sums round apart; a misread page
            # would be off by the outputs' own size
            eps = torch.finfo(DTYPE).eps
            torch.testing.assert_close(paged, contiguous, rtol=2 * eps, atol=2 * eps * float(contiguous.abs().max()))

        def step():
            return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, block_table=table, causal=True)
    else:
        qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
        positions = torch.arange(S, device=DEVICE)

        def step():  # the mask of this step's lengths, as a generation loop builds it each step
            mask = (positions[None, :] < lens[:, None])[:, None, None, :]
            return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)

        if not CPU:  # which of SDPA's backends its dispatch chooses for the step (recorded with the row)
            mask = (positions[None, :] < lens[:, None])[:, None, None, :]
            choice = torch._fused_sdp_choice(qt, kt, vt, mask, 0.0, False, scale=None, enable_gqa=True)
            benchmark.extra_info["sdpa_backend"] = torch.nn.attention.SDPBackend(choice).name
            benchmark.extra_info["sdpa_priority"] = [torch.nn.attention.SDPBackend(b).name
                                                     for b in torch._C._get_sdp_priority_order()]

    if mode == "compiled":
        torch._dynamo.reset()  # one step's graph at a time (CUDA graphs of earlier cases freed)
        if impl == "flexflash-guards":  # (mode="reduce-overhead" is the option triton.cudagraphs)
            step = torch.compile(static_closure(step), fullgraph=True, options={
                "triton.cudagraphs": not CPU, "guard_filter_fn": flexflash.guard_filter})
        else:
            step = torch.compile(static_closure(step), mode="default" if CPU else "reduce-overhead", fullgraph=True)

    def timed():
        with torch.no_grad():
            step()
        _sync()

    skips = counters["inductor"]["cudagraph_skips"]
    for _ in range(3):
        timed()  # compilation, CUDA graph capture and warm-up
    if mode == "compiled" and not CPU:  # graphs Inductor ran without CUDA graphs (it logs why)
        benchmark.extra_info["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
    benchmark.pedantic(timed, rounds=20 if CPU else 100, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update(bench="decode", mode=mode, B=B, S=S, lengths=lengths, layout=layout, impl=impl,
                                tokens=int(lens.sum()), gpu="cpu" if CPU else torch.cuda.get_device_name(),
                                torch=torch.__version__)


@pytest.mark.parametrize("impl", ["flexflash", "sdpa"])
def test_varlen_training(benchmark, impl):
    N, B, H = (256, 4, 4) if CPU else (4096, 8, 16)
    gen = torch.Generator().manual_seed(N)
    lens = torch.randint(N // 4, N + 1, (B,), generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(DEVICE, torch.int32)
    total = int(lens.sum())
    q, k, v = (torch.randn(total, H, D, generator=gen).to(DEVICE, DTYPE).requires_grad_() for _ in range(3))
    if impl == "flexflash":
        def forward():
            return flash_attn_varlen_func(q, k, v, cu, cu, N, N, causal=True)
        leaves = [q, k, v]
    else:  # the padded batch: (B, H, N, D), keys past each length masked, causal
        pad = torch.zeros(B, N, H, D, device=DEVICE, dtype=DTYPE)
        idx = [torch.arange(int(n)) for n in lens]
        padded = []
        for t in (q, k, v):
            p = pad.clone()
            for b, i in enumerate(idx):
                p[b, : len(i)] = t[int(cu[b]): int(cu[b + 1])].detach()
            padded.append(p.transpose(1, 2).requires_grad_())
        ar = torch.arange(N, device=DEVICE)
        mask = (ar[None, :] <= ar[:, None])[None, None] & (ar[None, :] < lens.to(DEVICE)[:, None])[:, None, None, :]

        def forward():
            return F.scaled_dot_product_attention(*padded, attn_mask=mask)
        leaves = padded
    out = forward()
    d_out = torch.randn(out.shape, generator=gen).to(DEVICE, DTYPE)

    def timed():
        torch.autograd.grad(forward(), leaves, d_out)
        _sync()

    for _ in range(3):
        timed()
    benchmark.pedantic(timed, rounds=5 if CPU else 30, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(bench="varlen", N=N, B=B, H=H, impl=impl, tokens=total,
                                gpu="cpu" if CPU else torch.cuda.get_device_name(), torch=torch.__version__)
