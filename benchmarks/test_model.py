"""Model-level benchmarks (GPU, pytest-benchmark): where users meet flexflash.

* ``test_training_step``: one training step (forward, loss, backward) of a small transformer
  (4 layers, E=1024, 16 heads of 64, B=8, N=2048: 16k tokens, bf16) with a causal, a document
  (causal, 8 documents per sequence, new boundaries every step) or a key-padding mask (new lengths
  every step), eager and under ``torch.compile(model)``, with its attention on flexflash, on SDPA
  (a materialised mask where it needs one) and on raw FlexAttention (``flex_attention`` compiled,
  its block mask built once per step with ``create_block_mask``, as one writes it by hand). The
  mask tensors of a step are made before the timed region; building raw FlexAttention's block mask
  and flexflash's own block mask are part of the step.
* ``test_host_time``: small eager calls (B=32, H=16, N=512, D=128, bf16, forward), where host
  time decides: flexflash against raw compiled ``flex_attention`` with a block mask built once.

Run: ``python3 -m pytest benchmarks/test_model.py --benchmark-json=model.json``; the summary is
``python3 tools/run_benchmarks.py --summarize-model model.json``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import flexflash
from flexflash import mods

LAYERS, E, H, B, N = 4, 1024, 16, 8, 2048
DTYPE = torch.bfloat16
_raw_flex = torch.compile(flex_attention)  # compiled once, as torchtitan does


def _documents(step: int) -> torch.Tensor:
    """(B, N) document ids: 8 documents per sequence with boundaries that change every step."""
    gen = torch.Generator().manual_seed(step)
    cuts = torch.sort(torch.randperm(N - 1, generator=gen)[:7] + 1).values
    ids = torch.zeros(N, dtype=torch.int32)
    ids[cuts] = 1
    return torch.stack([ids.cumsum(0).roll(int(s)) for s in torch.randint(0, 64, (B,), generator=gen)]).cuda()


def _lengths(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    return torch.randint(N // 2, N + 1, (B,), generator=gen).cuda()


def _inputs(case: str, impl: str, step: int) -> dict:
    """What the attention of every layer needs for this step's masks (built before the timed
    region, except block masks: those are the step's work)."""
    if case == "causal":
        return {}
    if case == "document":
        ids = _documents(step)
        if impl == "sdpa":
            same = ids[:, :, None] == ids[:, None, :]
            return dict(mask=(same & torch.ones(N, N, dtype=torch.bool, device="cuda").tril())[:, None])
        return dict(ids=ids)
    keep = torch.arange(N, device="cuda")[None, :] < _lengths(step)[:, None]  # (B, N)
    if impl == "sdpa":
        return dict(mask=keep[:, None, None, :])
    return dict(keep=keep)


def _step_masks(case: str, impl: str, inputs: dict) -> dict:
    """The per-step work before the layers: raw FlexAttention's block mask."""
    if impl != "flex":
        return inputs
    if case == "causal":
        fn = lambda b, h, q, kv: kv <= q  # noqa: E731
    elif case == "document":
        ids = inputs["ids"]
        fn = lambda b, h, q, kv: (ids[b, q] == ids[b, kv]) & (kv <= q)  # noqa: E731
    else:
        keep = inputs["keep"]
        fn = lambda b, h, q, kv: keep[b, kv]  # noqa: E731
    return dict(block_mask=create_block_mask(fn, B if case != "causal" else None, None, N, N, device="cuda"))


class _Attention(nn.Module):
    def __init__(self, case: str, impl: str):
        super().__init__()
        self.case, self.impl = case, impl
        self.qkv = nn.Linear(E, 3 * E)
        self.out = nn.Linear(E, E)

    def forward(self, x, masks):
        q, k, v = (t.unflatten(-1, (H, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, N, D)
        if self.impl == "flexflash":
            if self.case == "causal":
                o = flexflash.attention(q, k, v, causal=True)
            elif self.case == "document":
                o = flexflash.attention(q, k, v, causal=True, mask_mod=mods.document(masks["ids"]))
            else:
                o = flexflash.attention(q, k, v, mask=masks["keep"])
        elif self.impl == "sdpa":
            if self.case == "causal":
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=masks["mask"])
        else:
            o = (_raw_flex if not torch.compiler.is_compiling() else flex_attention)(
                q, k, v, block_mask=masks["block_mask"])
        return self.out(o.transpose(1, 2).flatten(2))  # (B, N, E)


class _Model(nn.Module):
    def __init__(self, case: str, impl: str):
        super().__init__()
        self.attn = nn.ModuleList(_Attention(case, impl) for _ in range(LAYERS))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(E, 4 * E), nn.GELU(), nn.Linear(4 * E, E))
                                 for _ in range(LAYERS))
        self.norms = nn.ModuleList(nn.LayerNorm(E) for _ in range(2 * LAYERS))

    def forward(self, x, masks):
        for i, (attn, mlp) in enumerate(zip(self.attn, self.mlp)):
            x = x + attn(self.norms[2 * i](x), masks)
            x = x + mlp(self.norms[2 * i + 1](x))
        return x


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("impl", ["flexflash", "flex", "sdpa"])
@pytest.mark.parametrize("case", ["causal", "document", "key_padding"])
def test_training_step(benchmark, case, impl, mode):
    torch.manual_seed(0)
    model = _Model(case, impl).to("cuda", DTYPE)
    run_model = torch.compile(model) if mode == "compiled" else model
    steps = [(torch.randn(B, N, E, device="cuda", dtype=DTYPE), _inputs(case, impl, s)) for s in range(4)]
    counter = iter(range(10 ** 9))

    def step():
        x, inputs = steps[next(counter) % len(steps)]
        masks = _step_masks(case, impl, inputs)
        run_model(x, masks).float().pow(2).mean().backward()
        torch.cuda.synchronize()

    for _ in range(len(steps) + 1):  # compile (every new mask value included) and warm up
        step()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    benchmark.pedantic(step, rounds=12, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        model_case=case, impl=impl, mode=mode, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
        tokens=B * N, graphs_compiled_while_timed=torch._dynamo.utils.counters["stats"]["unique_graphs"] - before)


@pytest.mark.parametrize("impl", ["flexflash", "flex"])
@pytest.mark.parametrize("case", ["causal", "document", "sliding_window", "key_padding"])
def test_host_time(benchmark, case, impl):
    Bs, Ns, D = 32, 512, 128
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(Bs, H, Ns, D, generator=gen).to("cuda", DTYPE) for _ in range(3))
    ids = torch.sort(torch.randint(0, 4, (Bs, Ns), generator=gen), dim=-1).values.cuda()
    keep = (torch.arange(Ns)[None, :] < torch.randint(Ns // 2, Ns + 1, (Bs, 1), generator=gen)).cuda()
    kw, fn, batch = {
        "causal": (dict(causal=True), lambda b, h, i, j: j <= i, None),
        "document": (dict(mask_mod=mods.document(ids)), mods.document(ids), Bs),
        "sliding_window": (dict(mask_mod=mods.sliding_window(128), causal=True),
                           lambda b, h, i, j: (j <= i) & (i - j < 128), None),
        "key_padding": (dict(mask=keep), lambda b, h, i, j: keep[b, j], Bs),
    }[case]
    if impl == "flexflash":
        def call():
            flexflash.attention(q, k, v, **kw)
    else:
        block_mask = create_block_mask(fn, batch, None, Ns, Ns, device="cuda")  # once, outside the timing

        def call():
            _raw_flex(q, k, v, block_mask=block_mask)

    with torch.no_grad():
        for _ in range(5):
            call()
        torch.cuda.synchronize()

        def run():
            for _ in range(20):
                call()
            torch.cuda.synchronize()

        benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update(host_case=case, impl=impl, calls_per_round=20, gpu=torch.cuda.get_device_name(),
                                torch=torch.__version__)
