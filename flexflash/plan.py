"""The plan of one call: the path that runs it, the kernel generator and options, and why each
other path was not taken. It is made once per call, here and nowhere else, and the call executes
it; :func:`explain` returns it without running the call.

Paths, in the order they are considered:

* ``"reference"``: the eager oracle (:mod:`flexflash.reference`), for ``backend="reference"`` and
  for empty problems (exact and free there).
* ``"sdpa"``: PyTorch's SDPA (cuDNN, else flash, else efficient on CUDA; its fused CPU kernel on
  CPU), under ``backend="auto"`` for the calls it computes exactly and faster (on CUDA fp16/bf16
  with no mask, bias or modifier, dropout included with SDPA's own random stream, and eager
  decoding steps whose one mask is a tensor: :func:`short_masked_call`; on CPU also one mask or
  bias tensor alone, without dropout).
* ``"flex"``: compiled FlexAttention, on FlashAttention-4 (``"flash"``) or Triton (``"triton"``,
  the CPU template on CPU) kernels, with tiles from :mod:`flexflash._tuning`.
* ``"memory-bounded"``: the exact tiled path (:mod:`flexflash._chunked`, on SDPA's CPU kernel where
  it can: :mod:`flexflash._sdpa_tiles`), for the CPU calls compiled FlexAttention cannot run
  (gradients, ``return_lse``, dropout, float64), CPU calls inside a caller's ``torch.compile``, and
  CPU bfloat16 calls, and float16 calls without a mask_mod, that have no score_mod (there SDPA's
  kernel in tiles is faster: ``TILES_FASTER``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import _flex, _kinds, _tuning
from ._chunked import _fused
from ._checks import Problem, describe
from ._fingerprint import Modifier

__all__ = ["Plan", "PATHS", "make_plan"]

PATHS = ("reference", "sdpa", "flex", "memory-bounded")


@dataclass(frozen=True)
class Plan:
    """How a call runs.

    Attributes:
        path: ``"sdpa"``, ``"flex"``, ``"memory-bounded"`` or ``"reference"``.
        generator: the kernel generator on the flex path, ``"flash"`` (FlashAttention-4 kernels)
            or ``"triton"`` (FlexAttention's Triton templates; its C++ template on CPU); None on
            the other paths.
        kernel_options: the options handed to FlexAttention on the flex path (the caller's own,
            or tiles and generator chosen from measurements); None elsewhere.
        reasons: for each path not taken, why (``{"sdpa": "a mask_mod is given", ...}``).
    """

    path: str
    generator: str | None
    kernel_options: dict[str, Any] | None
    reasons: dict[str, str]
    # The flex path's kind (structure, kernel constants), handed to flexflash._flex.run_flex.
    kind: Any = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        head = f"path: {self.path}"
        if self.generator is not None:
            head += f" ({self.generator}"
            head += f", kernel_options={self.kernel_options})" if self.kernel_options else ")"
        return "\n".join([head] + [f"  not {path}: {why}" for path, why in self.reasons.items()])


def needs_grad(p: Problem, captured: list[Tensor]) -> bool:
    """Whether the call's output needs a backward pass (grad mode on and an input requiring grad,
    the tensors its modifiers read included)."""
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (p.q, p.k, p.v, p.bias, *captured))


# A bias that needs its gradient sends an SDPA call on CPU to SDPA's math backend, which holds the
# (B, Hq, Nq, Nk) scores and probabilities: up to this many entries (1 GiB in float32) it is still
# faster than the memory-bounded path's eager tiles; beyond, those tiles keep memory bounded.
_CPU_MATH_ENTRIES = 2 ** 28


# At most this many queries (a decoding step, a few speculative tokens) with a mask tensor alone
# take SDPA on CUDA in eager calls: see short_masked_call.
SDPA_MASK_QUERIES = 16
# With grouped heads, SDPA's fused CUDA backends may not take a mask (torch 2.11: such calls fall
# back to its math backend, which holds the (B, Hq, Nq, Nk) scores in float32): grouped calls go to
# SDPA only up to this many scores (512 MiB in float32).
SDPA_MASK_GQA_SCORES = 2 ** 27


def short_masked_call(p: Problem, causal: bool, dropout_p: float) -> bool:
    """Whether a CUDA call is an eager decoding step whose one mask is a tensor (a key-padding or
    cache mask): at most ``SDPA_MASK_QUERIES`` queries, a mask, no bias, no causal flag, no
    dropout (a masked call keeps the exact dropout hash), no gradient; with grouped heads, at most
    ``SDPA_MASK_GQA_SCORES`` scores (SDPA may run them on its math backend). SDPA takes the mask as
    it is; FlexAttention would first build a block mask from it, a new one each step, and the call
    is bound by host time (H200, torch 2.11, one query, 32 query heads on 8 key/value heads,
    D = 128: 1.0-1.8 ms a call against SDPA's 0.08-0.19 ms at batch 1-8 and caches of 1k-8k,
    benchmarks/NOTES.md). Inside a caller's torch.compile the call stays on FlexAttention, whose
    block mask and kernel join the caller's graph. Rows the mask allows nothing in give 0, as on
    every path (flexflash._sdpa.sdpa)."""
    return (p.mask is not None and p.bias is None and not causal and not dropout_p
            and p.q_len <= SDPA_MASK_QUERIES and not torch.compiler.is_compiling() and not needs_grad(p, [])
            and (p.q_heads == p.kv_heads or p.batch * p.q_heads * p.q_len * p.kv_len <= SDPA_MASK_GQA_SCORES))


def _sdpa_refusal(p: Problem, *, causal, mask_mod, score_mod, dropout_p, kernel_options, return_lse,
                  block_size, shard: bool = False) -> str | None:
    """Why SDPA does not take a ``backend="auto"`` call, or None where it does: the calls SDPA
    computes exactly (on CUDA no mask, bias or modifiers, on CPU also one mask or bias tensor;
    causal only with ``Nq == Nk``, where its top-left causal mask is flexflash's bottom-right one;
    dropout on CUDA, drawn from SDPA's own random stream, except on a ``shard`` of a DTensor call)
    where its fused kernels are faster than FlexAttention's (docs/backends.md has the
    measurements), grouped heads included (SDPA's ``enable_gqa``)."""
    q = p.q
    if q.device.type not in ("cuda", "cpu"):
        return f"SDPA is taken on CUDA and CPU; q is on {q.device.type}"
    cpu = q.device.type == "cpu"
    if not cpu and q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}: SDPA's fused kernels take float16 and bfloat16"
    short = not cpu and short_masked_call(p, causal, dropout_p)
    given = [name for name, x in (("a mask", None if cpu or short else p.mask), ("a bias", None if cpu else p.bias),
                                  ("a mask_mod", mask_mod), ("a score_mod", score_mod)) if x is not None]
    if given:
        return f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} given"
    if dropout_p > 0:
        if cpu:
            return (f"dropout_p={dropout_p}: SDPA's CPU kernel has no dropout (its math backend would hold the "
                    "(Nq, Nk) probabilities); flexflash's exact dropout runs instead")
        if shard:
            return (f"dropout_p={dropout_p} on a shard of a DTensor call: it draws the unsharded call's entries "
                    "(flexflash's dropout hash), which SDPA's random stream cannot")
    if return_lse:
        return "return_lse=True: SDPA does not return the log-sum-exp"
    if kernel_options is not None:
        return "kernel_options are given (FlexAttention's)"
    if block_size is not None:
        return "block_size is given (FlexAttention's block mask)"
    if cpu:
        tensors = [name for name, x in (("causal", causal or None), ("a mask", p.mask), ("a bias", p.bias))
                   if x is not None]
        if len(tensors) > 1:
            return (f"{' and '.join(tensors)}: SDPA takes one of them (joined they would be a materialised "
                    "(Nq, Nk) mask)")
    if causal and p.q_len != p.kv_len:
        return f"causal with Nq={p.q_len} != Nk={p.kv_len}: SDPA's causal mask is top-left"
    D, Dv = q.shape[-1], p.v.shape[-1]
    if cpu:
        return _sdpa_cpu_refusal(p, D, Dv)
    if D != Dv or D % 8 or D > 256:
        return f"head dims D={D}, Dv={Dv}: SDPA's fused kernels need D == Dv, a multiple of 8, at most 256"
    cap = _tuning.capability(q.device)  # None inside a caller's torch.compile: SDPA is exact on every GPU
    if cap is not None and not causal and not dropout_p and p.q_heads == p.kv_heads and _tuning.flash_choice(
            "dense", needs_grad(p, []), q.device, q.dtype, D, Dv,
            _tuning.work(p.batch, p.q_heads, p.q_len, p.kv_len, D)):
        return "FlashAttention-4's kernels are faster for this case (measured: flexflash._tuning)"
    if cap is not None and cap < (8, 0):
        return f"compute capability {cap[0]}.{cap[1]}: SDPA's fused kernels need 8.0"
    return None


def _sdpa_cpu_refusal(p: Problem, D: int, Dv: int) -> str | None:
    if D != Dv:
        return f"head dims D={D}, Dv={Dv}: SDPA's fused CPU kernel needs D == Dv (its math backend holds (Nq, Nk))"
    entries = p.batch * p.q_heads * p.q_len * p.kv_len
    if p.bias is not None and p.bias.requires_grad and torch.is_grad_enabled() and entries > _CPU_MATH_ENTRIES:
        return (f"a bias that needs its gradient: SDPA's fused CPU kernel has none, and its math backend would "
                f"hold B*Hq*Nq*Nk = {entries} scores (more than {_CPU_MATH_ENTRIES})")
    return None


def _cpu_flex_refusal(p: Problem, captured: list[Tensor], dropout_p: float, return_lse: bool) -> str | None:
    """Why compiled FlexAttention cannot run a CPU call (None: it can)."""
    if p.q.dtype == torch.float64:
        return "float64 inputs"
    if needs_grad(p, captured):
        return "inputs that require grad"
    if return_lse:
        return "return_lse=True"
    if dropout_p > 0:
        return f"dropout_p={dropout_p}"
    return None


def _flex_error(p: Problem, why: str, return_lse: bool) -> NotImplementedError:
    if why == "float64 inputs":
        return NotImplementedError(
            f"backend='flex': compiled FlexAttention's CPU kernel takes float32, float16 and bfloat16, got "
            f"q of dtype {p.q.dtype}; use backend='auto' (the exact memory-bounded path computes float64) or "
            f"backend='reference'\n{describe(q=p.q, k=p.k, v=p.v)}")
    needs = why.startswith("inputs")
    missing = "backward pass" if needs else "log-sum-exp output"
    if not (needs or return_lse):
        missing += " (exact dropout needs it)"
    return NotImplementedError(
        f"backend='flex': compiled FlexAttention has no {missing} on CPU in torch {torch.__version__} "
        f"({why}); use backend='auto' (exact memory-bounded path) or backend='reference'\n"
        f"{describe(q=p.q, k=p.k, v=p.v)}")


# Why a CPU call FlexAttention could run takes the memory-bounded path instead (a choice of speed,
# not announced): forward, SDPA's CPU kernel tile by tile over each tile's key span is faster there
# than FlexAttention's CPU template (2 cores, B*N = 4096, H = 8, D = 64, ms; docs/backends.md):
# bfloat16 with any mask (sliding window of 512 at N = 1024/2048/4096: 46/60/82 against 69/78/83;
# documents at N = 1024/4096: 37/75 against 55/77), float16 with mask and bias tensors (causal
# with a bias at N = 1024/2048/4096: 96/172/327 against 125/232/442) but not with a mask_mod (a
# window of 512 at N = 4096: 137 against 112); float32 keeps the template (causal with a bias:
# 74/126/244 against 67/116/208).
TILES_FASTER = ("bfloat16, or float16 without a mask_mod, without a score_mod on CPU: SDPA's CPU kernel tile by tile "
                "(the memory-bounded path) is faster than FlexAttention's CPU template")


def _tiles_faster(p: Problem, mask_mod, score_mod, kernel_options) -> bool:
    """For a CPU call compiled FlexAttention can run (no gradients, lse or dropout): whether its
    dtype is one where the fused tiles were measured faster and the fused tiles take it."""
    dtype_ok = p.q.dtype == torch.bfloat16 or (p.q.dtype == torch.float16 and mask_mod is None)
    return (dtype_ok and kernel_options is None
            and _fused(p.q, p.v, p.bias, score_mod, dropout=None, grad=False, return_lse=False))


_NOT_REFERENCE = "the eager oracle runs only with backend='reference' or an empty problem"
_NOT_MEMORY_BOUNDED = ("it runs only the CPU calls compiled FlexAttention cannot run, and those where it is faster "
                       "(bfloat16, float16 without a mask_mod)")


def _path_and_reasons(p: Problem, captured: list[Tensor], *, backend, causal, mask_mod, score_mod, dropout_p,
                      kernel_options, return_lse, block_size, shard) -> tuple[str, dict[str, str]]:
    if backend == "reference" or 0 in (p.batch, p.q_len, p.kv_len):
        why = "backend='reference'" if backend == "reference" else "an empty problem is exact and free on the reference path"
        return "reference", {"sdpa": why, "flex": why, "memory-bounded": why}
    sdpa_why = (_sdpa_refusal(p, causal=causal, mask_mod=mask_mod, score_mod=score_mod, dropout_p=dropout_p,
                              kernel_options=kernel_options, return_lse=return_lse, block_size=block_size,
                              shard=shard)
                if backend == "auto" else f"backend={backend!r}")
    if sdpa_why is None:
        short = p.q.device.type == "cuda" and p.mask is not None
        return "sdpa", {"reference": _NOT_REFERENCE,
                        "flex": (f"an eager call of at most {SDPA_MASK_QUERIES} queries with a mask tensor alone: SDPA "
                                 "takes the mask as it is, FlexAttention would first build a block mask from it"
                                 if short else "SDPA computes this call exactly and faster"),
                        "memory-bounded": _NOT_MEMORY_BOUNDED}
    reasons = {"reference": _NOT_REFERENCE, "sdpa": sdpa_why}
    cpu = p.q.device.type == "cpu"
    why = _cpu_flex_refusal(p, captured, dropout_p, return_lse) if cpu else None
    if why is None and backend == "auto" and cpu and torch.compiler.is_compiling():
        # FlexAttention's CPU lowering generates C++ that does not compile once the caller's graph
        # makes lengths symbolic (torch 2.13: broadcast masks and biases, tensors a mask_mod
        # reads); the tiled path is plain tensor code, which Inductor compiles for any length.
        why = "inside a caller's torch.compile on CPU (the CPU kernel's lowering fails for symbolic lengths)"
    if why is None and backend == "auto" and cpu and _tiles_faster(p, mask_mod, score_mod, kernel_options):
        reasons["flex"] = TILES_FASTER
        return "memory-bounded", reasons
    if why is None:
        reasons["memory-bounded"] = _NOT_MEMORY_BOUNDED
        return "flex", reasons
    if backend == "flex":
        raise _flex_error(p, why, return_lse)
    reasons["flex"] = f"compiled FlexAttention cannot run this CPU call in torch {torch.__version__}: {why}"
    return "memory-bounded", reasons


def make_plan(p: Problem, infos: tuple[Modifier, Modifier], *, causal: bool, mask_mod, score_mod,
              dropout_p: float, block_size, kernel_options: dict | None, return_lse: bool,
              backend: str, shard: bool = False) -> Plan:
    """The plan of a validated call (``p``, ``infos``: from flexflash.functional's validation).
    ``shard``: the call is one rank's share of a DTensor call (flexflash.parallel)."""
    captured = [*infos[0].tensors, *infos[1].tensors]
    path, reasons = _path_and_reasons(p, captured, backend=backend, causal=causal, mask_mod=mask_mod,
                                      score_mod=score_mod, dropout_p=dropout_p, kernel_options=kernel_options,
                                      return_lse=return_lse, block_size=block_size, shard=shard)
    if path != "flex":
        return Plan(path, None, None, reasons)
    kind = _kinds.flex_kind(p.q, p.k, p.v, causal=causal, mask=p.mask, bias=p.bias, mask_mod=mask_mod,
                              score_mod=score_mod, infos=infos, scale=p.scale, block=p.block,
                              kernel_options=kernel_options, return_lse=return_lse, dropout=dropout_p > 0)
    options = dict(kind.static.kernel_options) or None
    generator = "flash" if (options or {}).get("BACKEND") == "FLASH" else "triton"
    return Plan(path, generator, options, reasons, kind)


# Plans of eager calls, by everything that decides them (see plan_call).
_PLANS: dict[Any, Plan] = {}
_PLANS_SIZE = 512


def memo_key(p: Problem, infos: tuple[Modifier, Modifier], *, causal: bool, dropout_p: float, block_size,
             kernel_options: dict | None, return_lse: bool, backend: str, shard: bool = False) -> tuple | None:
    """Everything that decides a call's plan, as a key (None where it cannot be hashed): shapes,
    dtypes, device, flags, options and the modifiers' fingerprints."""
    key = _kinds.kind_key(p.q, p.k, p.v, causal, p.mask, p.bias, infos, p.scale, p.block,
                            kernel_options, return_lse, dropout_p > 0,
                            needs_grad(p, [*infos[0].tensors, *infos[1].tensors]))
    return None if key is None else key + (backend, block_size is None, shard)


def plan_call(p: Problem, infos: tuple[Modifier, Modifier], *, causal: bool, mask_mod, score_mod,
              dropout_p: float, block_size, kernel_options: dict | None, return_lse: bool, backend: str,
              shard: bool = False) -> Plan:
    """:func:`make_plan`, memoised for eager calls: a call like an earlier one (the same shapes,
    dtypes, flags, options and modifier fingerprints, which include what the modifiers capture)
    gets the same plan without deciding it again (host time of small calls). Inside a caller's
    torch.compile every call is planned (nothing is cached while tracing)."""
    key = None
    if not torch.compiler.is_compiling():
        key = memo_key(p, infos, causal=causal, dropout_p=dropout_p, block_size=block_size,
                       kernel_options=kernel_options, return_lse=return_lse, backend=backend, shard=shard)
        plan = _PLANS.get(key) if key is not None else None
        if plan is not None:
            return plan
    plan = make_plan(p, infos, causal=causal, mask_mod=mask_mod, score_mod=score_mod, dropout_p=dropout_p,
                     block_size=block_size, kernel_options=kernel_options, return_lse=return_lse, backend=backend,
                     shard=shard)
    if key is not None:
        if len(_PLANS) >= _PLANS_SIZE:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def forget() -> None:
    """Forgets every memoised plan (flexflash._flex.reset calls it)."""
    _PLANS.clear()


_flex._ON_RESET.append(forget)
