"""The attention benchmark suite (pytest-benchmark): flexflash against PyTorch's SDPA backends
(flash, cuDNN, efficient, math), raw FlexAttention with a block mask built once (``flex-raw``) and
the eager reference, in one run; on a CUDA GPU, or on CPU with ``FLEXFLASH_BENCH_DEVICE=cpu``.

Shapes: B*N = 16k tokens, hidden 2048 (H = 32 for D = 64, H = 16 for D = 128), N from 512 to 16k,
bf16 (fp16 for the dense and causal cases). On CPU: B*N = 4096 tokens, hidden 512 (H = 8 at D = 64),
N from 1k to 4k, fp32 and bf16. Cases: dense, causal, key padding (lengths 100/75/50/25%
of N), a dense bool mask, sliding windows of 512 and 1024, packed documents (8 per sequence, causal),
prefix-LM, a (B, H, N, N) bias alone and with causal (with and without its gradient), ALiBi, tanh soft-capping,
grouped-query heads (Hq/Hkv = 4, causal), decoding (Nq = 1 against Nk = 2N) and dropout (p = 0.1;
causal, dense, and key padding). Every case runs forward and forward+backward (decoding: forward only).

Each baseline gets the case the way it accepts it: SDPA takes ``is_causal`` where the case is
plain causal and a materialised mask or bias otherwise; raw FlexAttention (``torch.compile`` of
``flex_attention``, as torchtitan runs it) gets the case's mask function as a block mask built
outside the timed rounds and its bias or score modifier as a ``score_mod`` (it has no dropout, and
no backward on CPU, where the forward rows are inference, under ``no_grad``); a backend that refuses the case is skipped
(SDPA's flash backend takes no mask, nothing in SDPA does soft-capping), and so are the math backend
and the reference where their ``(B, H, N, N)`` intermediates would not fit (``MAX_DENSE_GIB``).
Where the bias needs its gradient, SDPA gets the masked bias as a leaf tensor of its own (the
case's values, ``-inf`` where masked, filled once outside the timed rounds) and differentiates
that; the gradients of allowed entries are the same.

Compilation and warm-up run before the timed rounds; each round ends with a CUDA synchronisation;
pytest-benchmark reports medians. ``extra_info``: TFLOP/s (4*B*H*Nq*Nk*D times the fraction of
allowed entries; forward+backward counts 3.5x), the fraction, the path flexflash took, the first
call's time (compilation), the GPU, torch version, flexflash's compile mode (set it for a run with
``FLEXFLASH_COMPILE_MODE=max-autotune``) and the case parameters.

The full matrix is large; narrow it with ``-k`` or these environment variables (comma lists):
``FLEXFLASH_BENCH_N`` (default 512,1024,2048,4096,8192,16384; CPU 1024,2048,4096),
``FLEXFLASH_BENCH_D`` (64,128; CPU 64), ``FLEXFLASH_BENCH_CASES`` (all), ``FLEXFLASH_BENCH_IMPLS``
(all), ``FLEXFLASH_BENCH_DIRS`` (fwd,fwd+bwd), ``FLEXFLASH_BENCH_DTYPES`` (bfloat16,float16; CPU
float32,bfloat16). ``tools/run_benchmarks.py`` runs it
and writes the JSON and a markdown summary with ratios to the best SDPA backend.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import flexflash
from flexflash import mods
from flexflash._compiled import _own_code
from flexflash.functional import generator, route
from flexflash.reference import index_grids

DEVICE = os.environ.get("FLEXFLASH_BENCH_DEVICE", "cuda")
CPU = DEVICE == "cpu"
TOKENS, HIDDEN = (4096, 512) if CPU else (16 * 1024, 2048)
MAX_DENSE_GIB = 24.0  # the math backend and the reference materialise (B, H, Nq, Nk) fp32 tensors
MAX_BIAS_GIB = 4.0  # a (B, H, N, N) bias case (its gradient and SDPA's masked copy come on top; at 8 GiB,
# N = 16384, every implementation failed on an H200, SDPA included)
TIMED_SECONDS = 2.0 if CPU else 0.3  # per benchmark, after warm-up (the 2-core CPU machine is noisier)

CASES = ["dense", "causal", "key_padding", "bool_mask", "sliding_window_512", "sliding_window_1024", "document",
         "prefix_lm", "bias", "bias_causal", "bias_causal_grad", "alibi", "softcap", "gqa", "decode", "dropout",
         "dropout_dense", "dropout_key_padding"]
FP16_CASES = {"dense", "causal"}  # the fp16 subset
IMPLS = ["flexflash", "flexflash-flex", "flex-raw", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math",
         "reference"]


def _env(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    return [x.strip() for x in value.split(",") if x.strip()] if value else default


NS = [int(n) for n in _env("FLEXFLASH_BENCH_N", ["1024", "2048", "4096"] if CPU else
                                                  ["512", "1024", "2048", "4096", "8192", "16384"])]
DS = [int(d) for d in _env("FLEXFLASH_BENCH_D", ["64"] if CPU else ["64", "128"])]
SELECTED_CASES = _env("FLEXFLASH_BENCH_CASES", CASES)
SELECTED_IMPLS = _env("FLEXFLASH_BENCH_IMPLS", IMPLS)
DIRS = _env("FLEXFLASH_BENCH_DIRS", ["fwd", "fwd+bwd"])
DTYPES = _env("FLEXFLASH_BENCH_DTYPES", ["float32", "bfloat16"] if CPU else ["bfloat16", "float16"])


@dataclass
class Case:
    """One benchmark problem: inputs, flexflash's keywords, and what each baseline gets."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    flex: dict[str, Any]
    allowed: Callable | None  # mask function over index grids (None: everything allowed)
    causal_only: bool = False  # plain causal: SDPA's is_causal (Nq == Nk)
    bias: torch.Tensor | None = None  # additive bias a materialised SDPA mask must include
    score_bias: Callable | None = None  # a score modifier SDPA can take as a materialised bias
    sdpa_ok: bool = True  # False: SDPA cannot express the case (soft-capping)
    dropout_p: float = 0.0
    gqa: bool = False
    grads: list[torch.Tensor] = field(default_factory=list)
    density: float = 1.0
    sdpa_mask: torch.Tensor | None = None  # built on first use
    score_mod: Callable | None = None  # raw FlexAttention's score modifier (bias, ALiBi, soft-capping)
    name: str = ""


def _lengths(B: int, N: int) -> torch.Tensor:
    fractions = [1.0, 0.75, 0.5, 0.25]
    return torch.tensor([max(1, int(N * fractions[b % 4])) for b in range(B)], device=DEVICE)


def _density(allowed: Callable | None, B: int, Nq: int, Nk: int) -> float:
    """The exact fraction of allowed entries (the mask functions used here do not depend on the head)."""
    if allowed is None:
        return 1.0
    count, rows = 0, max(1, (1 << 26) // max(1, B * Nk))
    for q0 in range(0, Nq, rows):
        n = min(rows, Nq - q0)
        b, h, i, j = index_grids(B, 1, n, Nk, DEVICE, q_start=q0)
        count += int(allowed(b, h, i, j).expand(B, 1, n, Nk).sum())
    return count / (B * Nq * Nk)


def make_case(name: str, N: int, D: int, dtype: torch.dtype) -> Case:
    H = HIDDEN // D
    B = max(1, TOKENS // N)
    Nq, Nk, Hkv = N, N, H
    if name == "decode":
        B, Nq, Nk = 8, 1, 2 * N
    if name == "gqa":
        Hkv = H // 4
    gen = torch.Generator(device=DEVICE).manual_seed(N * 1000 + D)
    grad = name != "decode"

    def rnd(*shape, requires_grad=grad):
        return torch.randn(*shape, device=DEVICE, dtype=dtype, generator=gen).requires_grad_(requires_grad)

    q, k, v = rnd(B, H, Nq, D), rnd(B, Hkv, Nk, D), rnd(B, Hkv, Nk, D)
    c = Case(q, k, v, {}, None, name=name)
    causal_fn = mods.causal(Nk - Nq)
    if name == "causal" or name == "gqa" or name == "dropout":
        c.flex, c.allowed, c.causal_only = dict(causal=True), causal_fn, True
        c.gqa = name == "gqa"
    elif name in ("key_padding", "dropout_key_padding"):
        pad = torch.arange(Nk, device=DEVICE)[None] < _lengths(B, Nk)[:, None]
        c.flex = dict(mask=pad)
        c.allowed = mods.key_padding(mask=pad)
    elif name == "bool_mask":
        dense = torch.rand(1, 1, Nq, Nk, device=DEVICE, generator=gen) < 0.5
        c.flex, c.allowed = dict(mask=dense), mods.dense_mask(dense)
    elif name.startswith("sliding_window"):
        fn = mods.sliding_window(int(name.rsplit("_", 1)[1]), offset=Nk - Nq)
        c.flex, c.allowed = dict(mask_mod=fn), fn
    elif name == "document":
        cuts = torch.sort(torch.randperm(Nk - 1, device=DEVICE, generator=gen)[:7] + 1).values
        ids = torch.bucketize(torch.arange(Nk, device=DEVICE), cuts, right=True).expand(B, Nk).contiguous()
        fn = mods.and_masks(mods.document(ids[:, Nk - Nq:], ids), causal_fn)
        c.flex, c.allowed = dict(mask_mod=fn), fn
    elif name == "prefix_lm":
        fn = mods.prefix_lm(_lengths(B, Nk) // 4, offset=Nk - Nq)
        c.flex, c.allowed = dict(mask_mod=fn), fn
    elif name in ("bias", "bias_causal", "bias_causal_grad"):
        c.bias = rnd(B, H, Nq, Nk, requires_grad=name.endswith("grad"))
        c.flex, c.allowed = dict(bias=c.bias), None
        if name != "bias":
            c.flex["causal"], c.allowed = True, causal_fn
        bias = c.bias.detach() if CPU else c.bias  # CPU: raw FlexAttention runs forward only
        c.score_mod = lambda s, b, h, i, j: s + bias[b, h, i, j]
    elif name == "alibi":
        fn = mods.alibi(H, offset=Nk - Nq)
        c.flex, c.allowed, c.score_bias, c.score_mod = dict(score_mod=fn, causal=True), causal_fn, fn, fn
    elif name == "softcap":
        c.flex, c.sdpa_ok = dict(score_mod=mods.tanh_softcap(30.0)), False
        c.score_mod = c.flex["score_mod"]
    elif name not in ("dense", "decode", "dropout_dense"):
        raise KeyError(name)
    if name.startswith("dropout"):
        c.flex["dropout_p"] = c.dropout_p = 0.1
    c.grads = [t for t in (q, k, v, c.bias) if t is not None and t.requires_grad]
    c.density = _density(c.allowed, B, Nq, Nk)
    return c


def _sdpa_mask(c: Case) -> torch.Tensor | None:
    """The materialised mask/bias SDPA gets: bool where the case is a mask, float (with -inf for
    masked entries) where there is a bias."""
    if c.sdpa_mask is not None or (c.allowed is None and c.bias is None and c.score_bias is None):
        return c.sdpa_mask
    B, H, Nq, _ = c.q.shape
    Nk = c.k.shape[-2]
    grids = index_grids(B, H, Nq, Nk, DEVICE)
    allowed = None if c.allowed is None else c.allowed(*grids)
    if c.bias is None and c.score_bias is None:
        c.sdpa_mask = allowed
        return c.sdpa_mask
    bias = c.bias if c.bias is not None else c.score_bias(torch.zeros((), device=DEVICE, dtype=torch.float32), *grids).to(c.q.dtype)
    if allowed is not None:
        bias = bias.detach().masked_fill(~allowed, float("-inf")).requires_grad_(bias.requires_grad)
    c.sdpa_mask = bias
    return c.sdpa_mask


def _grads(impl: str, c: Case) -> list[torch.Tensor]:
    """The tensors ``impl``'s forward+backward differentiates: the case's, with SDPA's own leaf
    copy of a masked bias in place of the bias (see the module docstring)."""
    if not impl.startswith("sdpa") or c.bias is None or not c.bias.requires_grad:
        return c.grads
    return [c.sdpa_mask if t is c.bias else t for t in c.grads]


def _dense_gib(c: Case, direction: str) -> float:
    B, H, Nq, _ = c.q.shape
    return B * H * Nq * c.k.shape[-2] * 4 * (3 if direction == "fwd" else 8) / 2**30


SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}


def attention_fn(impl: str, c: Case) -> Callable[[], torch.Tensor]:
    """A zero-argument forward of ``impl`` on case ``c`` (raises pytest.skip where it cannot run)."""
    if impl == "flexflash":
        return lambda: flexflash.attention(c.q, c.k, c.v, **c.flex)
    if impl == "flexflash-flex":
        return lambda: flexflash.attention(c.q, c.k, c.v, backend="flex", **c.flex)
    if impl == "reference":
        return lambda: flexflash.reference.attention(c.q, c.k, c.v, **c.flex)
    if impl == "flex-raw":
        return _raw_flex_fn(c)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if not c.sdpa_ok:
        pytest.skip("SDPA cannot express this case")
    backend = getattr(SDPBackend, SDPA_BACKENDS[impl])
    kw: dict[str, Any] = dict(dropout_p=c.dropout_p)
    if c.gqa:
        kw["enable_gqa"] = True
    if c.causal_only:
        kw["is_causal"] = True
    else:
        mask = _sdpa_mask(c)
        if mask is not None:
            kw["attn_mask"] = mask

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(c.q, c.k, c.v, **kw)
    return run


_RAW_FLEX: dict[str, Callable] = {}


def _raw_flex_for(name: str) -> Callable:
    """``torch.compile(flex_attention)`` for the case ``name``, as a model with that one mask compiles
    it (torchtitan's way): a copy of ``flex_attention`` with a code object of its own, so that each
    case has its own Dynamo cache and recompile budget. One compiled function shared by every case
    of a run would reach Dynamo's recompile limit (8) and fall back to the unfused eager path,
    a baseline no user runs."""
    if name not in _RAW_FLEX:
        _RAW_FLEX[name] = torch.compile(_own_code(flex_attention, f"flex_attention_{len(_RAW_FLEX)}"))
    return _RAW_FLEX[name]


def _raw_flex_fn(c: Case) -> Callable[[], torch.Tensor]:
    """Raw FlexAttention on case ``c``: its block mask built here, once, outside the timed rounds."""
    if c.dropout_p > 0:
        pytest.skip("FlexAttention has no dropout")
    if c.allowed is None and c.score_mod is None:
        pytest.skip("no mask or modifier: SDPA is the baseline")
    B, H, Nq, _ = c.q.shape
    Nk = c.k.shape[-2]
    block_mask = None if c.allowed is None else create_block_mask(c.allowed, B, None, Nq, Nk, device=DEVICE)
    # FlexAttention's CPU entry refuses inputs that require grad, whatever the grad mode.
    q, k, v = (t.detach() for t in (c.q, c.k, c.v)) if CPU else (c.q, c.k, c.v)
    raw = _raw_flex_for(c.name)
    return lambda: raw(q, k, v, score_mod=c.score_mod, block_mask=block_mask, enable_gqa=c.gqa)


_CASES: dict[tuple, Case] = {}


def _case(name: str, N: int, D: int, dtype: torch.dtype) -> Case:
    key = (name, N, D, dtype)
    if key not in _CASES:
        _CASES.clear()  # one case's tensors at a time
        if not CPU:
            torch.cuda.empty_cache()
        _CASES[key] = make_case(name, N, D, dtype)
    return _CASES[key]


def _params():
    for dtype in DTYPES:
        for name in SELECTED_CASES:
            if dtype == "float16" and name not in FP16_CASES:
                continue
            for N in NS:
                for D in DS:
                    for direction in DIRS:
                        if name == "decode" and direction != "fwd":
                            continue
                        for impl in SELECTED_IMPLS:
                            yield pytest.param(name, N, D, dtype, direction, impl,
                                               id=f"{name}-N{N}-D{D}-{dtype}-{direction}-{impl}")


@pytest.mark.parametrize("name,N,D,dtype,direction,impl", list(_params()))
def test_attention(benchmark, name, N, D, dtype, direction, impl):
    bias_gib = max(1, TOKENS // N) * (HIDDEN // D) * N * N * 2 / 2**30
    if name.startswith("bias") and bias_gib > MAX_BIAS_GIB:
        pytest.skip(f"the (B, H, N, N) bias takes {bias_gib:.0f} GiB (limit {MAX_BIAS_GIB:.0f})")
    c = _case(name, N, D, getattr(torch, dtype))
    if impl == "flexflash-flex" and route(c.q, c.k, c.v, **c.flex) == "flex":
        pytest.skip("flexflash takes the flex path here already (see the flexflash row)")
    if impl == "flex-raw" and CPU and direction != "fwd":
        pytest.skip("FlexAttention has no backward on CPU")
    if impl in ("sdpa-math", "reference") and _dense_gib(c, direction) > MAX_DENSE_GIB:
        pytest.skip(f"{impl} would materialise about {_dense_gib(c, direction):.0f} GiB")
    forward = attention_fn(impl, c)
    grads = _grads(impl, c)
    if direction == "fwd":
        def step():
            # On CPU the forward rows are inference: there a forward that records gradients is the
            # training path's (FlexAttention's CPU kernel has no backward), timed in fwd+bwd.
            with torch.no_grad() if CPU or not grads else torch.enable_grad():
                forward()
    else:
        d_out = torch.randn(c.q.shape[:-1] + (c.v.shape[-1],), device=DEVICE, dtype=c.q.dtype)

        def step():
            torch.autograd.grad(forward(), grads, d_out)

    sync = (lambda: None) if CPU else torch.cuda.synchronize

    def timed():
        step()
        sync()

    start = time.perf_counter()
    try:
        timed()  # compilation and first-call work, outside the timed rounds
    except RuntimeError as e:
        if impl.startswith("sdpa") and "No available kernel" in str(e):
            pytest.skip(f"{impl} does not accept this case")
        raise
    first = time.perf_counter() - start
    for _ in range(2):
        timed()
    start = time.perf_counter()
    timed()
    estimate = time.perf_counter() - start
    rounds = max(5, min(200, int(TIMED_SECONDS / max(estimate, 1e-6))))
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)

    B, H, Nq, Dq = c.q.shape
    flops = 4 * B * H * Nq * c.k.shape[-2] * Dq * c.density * (3.5 if direction == "fwd+bwd" else 1.0)
    median = benchmark.stats["median"]
    with torch.no_grad() if CPU and direction == "fwd" else torch.enable_grad():  # as step() ran
        path = route(c.q, c.k, c.v, **c.flex) if impl == "flexflash" else impl
        if path == "flex":
            path = f"flex ({generator(c.q, c.k, c.v, **c.flex)})"  # the kernel generator: triton or flash
    benchmark.extra_info.update(
        case=name, N=N, D=D, dtype=dtype, direction=direction, impl=impl, path=path, B=B, H=H,
        Nq=Nq, Nk=c.k.shape[-2], density=c.density, tflops=flops / median / 1e12 if median > 0 else math.nan,
        first_call_s=first, gpu="cpu" if CPU else torch.cuda.get_device_name(), torch=torch.__version__,
        compile_mode=flexflash.get_compile_mode())
