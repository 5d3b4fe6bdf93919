"""Module benchmarks (GPU, pytest-benchmark): each flexflash module at B=4, N=4096, E=2048, 16 heads,
bf16, forward and forward+backward, against the same module built on
``torch.nn.functional.scaled_dot_product_attention`` (and ``nn.MultiheadAttention`` for FlashMHA),
in one run. Compilation and warm-up happen before the timed rounds; every round synchronises.

Run: ``python3 -m pytest benchmarks/test_modules.py --benchmark-json=modules.json``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import flexflash

B, N, E, H = 4, 4096, 2048, 16
DTYPE = torch.bfloat16


class _SDPAMHA(nn.Module):
    """FlashMHA's layers with SDPA as the attention (causal: top-left = bottom-right when Nq == Nk)."""

    def __init__(self, ours: flexflash.FlashMHA):
        super().__init__()
        self.Wqkv, self.out_proj, self.causal = ours.Wqkv, ours.out_proj, ours.causal

    def forward(self, x):
        q, k, v = rearrange(self.Wqkv(x), "b n (three h d) -> three b h n d", three=3, h=H)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))


class _SDPATwo(nn.Module):
    def __init__(self, ours: flexflash.FlashAttentionTwo):
        super().__init__()
        self.to_q, self.to_kv, self.to_out, self.causal = ours.to_q, ours.to_kv, ours.to_out, ours.causal

    def forward(self, x):
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=H)
        k, v = rearrange(self.to_kv(x), "b n (two h d) -> two b h n d", two=2, h=H)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class _SDPAChunked(nn.Module):
    def __init__(self, ours: flexflash.ChunkedAttention):
        super().__init__()
        self.ours = ours

    def forward(self, values, keys, queries):
        m = self.ours
        q, k, v = (rearrange(lin(x), "b n (h d) -> b h n d", h=H)
                   for lin, x in ((m.queries, queries), (m.keys, keys), (m.values, values)))
        return m.fc_out(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


class _TorchMHA(nn.Module):
    def __init__(self, ours: flexflash.FlashMHA):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, batch_first=True, device="cuda", dtype=DTYPE)
        self.causal = ours.causal
        self.register_buffer("tri", torch.ones(N, N, dtype=torch.bool, device="cuda").triu(1))

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False, attn_mask=self.tri if self.causal else None,
                        is_causal=self.causal)[0]


def _make(name: str, impl: str):
    torch.manual_seed(0)
    if name.startswith("FlashMHA"):
        ours = flexflash.FlashMHA(E, H, causal=name.endswith("causal"), device="cuda", dtype=DTYPE)
        return {"flexflash": ours, "sdpa": _SDPAMHA(ours), "nn.MultiheadAttention": _TorchMHA(ours)}[impl], 1
    if name.startswith("FlashAttentionTwo"):
        ours = flexflash.FlashAttentionTwo(dim=E, heads=H, dim_head=E // H, causal=name.endswith("causal"))
        ours = ours.to("cuda", DTYPE)
        return {"flexflash": ours, "sdpa": _SDPATwo(ours)}[impl], 1
    ours = flexflash.ChunkedAttention(E, H, chunk_size=N).to("cuda", DTYPE)
    return {"flexflash": ours, "sdpa": _SDPAChunked(ours)}[impl], 3


CASES = [("FlashMHA causal", "flexflash"), ("FlashMHA causal", "sdpa"), ("FlashMHA causal", "nn.MultiheadAttention"),
         ("FlashAttentionTwo causal", "flexflash"), ("FlashAttentionTwo causal", "sdpa"),
         ("ChunkedAttention", "flexflash"), ("ChunkedAttention", "sdpa")]


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name,impl", CASES)
def test_module(benchmark, name, impl, direction):
    module, n_inputs = _make(name, impl)
    x = torch.randn(B, N, E, device="cuda", dtype=DTYPE, requires_grad=direction != "fwd")
    args = (x,) * n_inputs

    def run():
        if direction == "fwd":
            with torch.no_grad():
                module(*args)
        else:
            module(*args).sum().backward()
        torch.cuda.synchronize()

    for _ in range(3):  # compile and warm up outside the timed rounds
        run()
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    causal = name.endswith("causal")
    flops = 4 * B * H * N * N * (E // H) * (0.5 if causal else 1.0) * (3.5 if direction != "fwd" else 1.0)
    benchmark.extra_info.update(
        module=name, impl=impl, direction=direction, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
        attention_tflops_at_median=flops / benchmark.stats.stats.median / 1e12)
