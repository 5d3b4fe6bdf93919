"""Every use of a private PyTorch API in the compilation of flexflash's kernels, each with why,
checked on torch 2.11 and 2.13 (the versions the test suite runs on)."""

from __future__ import annotations

import torch
from torch import Tensor
# Dynamo's duck sizing switch: no public setting (torch 2.11, 2.13).
from torch.fx.experimental import _config as _fx_config

def _recompile_limit() -> int:
    cfg = torch._dynamo.config
    return int(getattr(cfg, "recompile_limit", getattr(cfg, "cache_size_limit", 8)))


def _is_cpp_compile_error(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it was raised from) is Inductor's C++ compile error."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ == "CppCompileError" or "CppCompileError" in str(e).split("\n", 1)[0]:
            return True
        e = e.__cause__ or e.__context__
    return False


# Where torch._dynamo.maybe_mark_dynamic keeps its marks on a tensor (the second since torch 2.12:
# a flag that any marking happened, which Dynamo's guards check).
_MARK_ATTRIBUTES = ("_dynamo_weak_dynamic_indices", "_has_dynamo_dim_marking")
_ABSENT = object()


def _with_dynamic_sizes(tensors, fn, *args):
    """Calls ``fn(*args)`` with every dimension larger than 1 of ``tensors`` (the caller's own
    tensors a mask_mod reads) marked dynamic, and restores the tensors' marks afterwards, so they do
    not leak into the caller's own ``torch.compile`` of code using those tensors (there a mark left
    behind fails Dynamo's guards: "_has_dynamo_dim_marking is present on runtime tensor but was
    absent at compile time"). The marks only matter while Dynamo traces (a first compilation):
    with them, a mask_mod's tensors of a new length (document ids, prefix lengths of a new batch
    size) reuse the kernel instead of compiling it a second time with the sizes that changed made
    dynamic."""
    saved = []
    for t in tensors:
        if any(size > 1 for size in t.shape):
            before = tuple(getattr(t, name, _ABSENT) for name in _MARK_ATTRIBUTES)
            saved.append((t, before))
            if isinstance(before[0], set):
                setattr(t, _MARK_ATTRIBUTES[0], set(before[0]))  # a copy: the caller's set stays as it was
            for dim, size in enumerate(t.shape):
                if size > 1:
                    torch._dynamo.maybe_mark_dynamic(t, dim)
    try:
        return fn(*args)
    finally:
        for t, before in saved:
            for name, value in zip(_MARK_ATTRIBUTES, before):
                if value is _ABSENT:
                    if hasattr(t, name):
                        delattr(t, name)
                else:
                    setattr(t, name, value)


def _without_duck_sizing(fn, *args):
    """Calls the compiled ``fn`` with Dynamo's duck sizing off. Duck sizing gives sizes that are
    equal at the first compilation one symbol, and the graph then guards on the equality: a batch of
    2 and a 256-long sequence of 2 blocks, or ``Nq == Nk`` of a first self-attention call, would
    recompile at the first call where they differ. Sizes stay independent symbols instead. (The
    setting is read when Dynamo starts tracing, so it is set for the call and restored after.)"""
    duck = _fx_config.use_duck_shape
    _fx_config.use_duck_shape = False
    try:
        return fn(*args)
    finally:
        _fx_config.use_duck_shape = duck


def _mark_squeezed_dynamic(t: Tensor | None, full: tuple[bool, ...] | None) -> None:
    """Marks the batch and length dimensions of a CUDA mask or bias dynamic (heads stay static);
    ``t`` is squeezed to its full dimensions (see run_flex), ``full`` says which those are. A
    tensor whose key dimension is split (_kernel_layout) has one more, trailing dimension of 16,
    which stays static."""
    if t is None:
        return
    for i, dim in enumerate(d for d, f in enumerate(full) if f):
        if dim != 1 and t.shape[i] > 1:
            torch._dynamo.maybe_mark_dynamic(t, i)


# SDPA's backend priority order, read and set directly: torch.nn.attention.sdpa_kernel(...,
# set_priority=True) does the same through a context manager that costs ~30 µs of host time per
# call on an H200 machine (torch 2.11, 2.13).
def sdp_priority_order() -> list[int]:
    return torch._C._get_sdp_priority_order()


def set_sdp_priority_order(order: list[int]) -> None:
    torch._C._set_sdp_priority_order(order)


def settle_sdp_priority_order(q: Tensor) -> None:
    """Lets SDPA's CUDA dispatch install its default priority order before the order is read.
    torch installs it lazily, at a process's first CUDA dispatch (torch 2.11-2.13, sdp_utils.cpp
    ``priority_order``: cuDNN first on sm90/sm100 with a recent cuDNN, over the static flash,
    efficient, math, cuDNN). An order read before that and restored after a call is the static
    one, kept for good: the caller's own SDPA calls would then rank math above cuDNN (an H100 and
    an H200 ran masked grouped-head decoding steps on math, 25x slower). Asking the dispatch which
    backend it would choose for ``q`` against itself (``torch._fused_sdp_choice``, no kernel)
    installs it: the dispatch reads the order before it checks any backend."""
    try:
        torch._fused_sdp_choice(q, q, q)
    except RuntimeError:  # no backend for q itself: the order was read (installed) all the same
        pass


# Dynamo's shape marks (documented with torch.compile's dynamic shapes, in the private namespace):
# which sizes of a compiled function's inputs are symbolic from its first compilation, which stay
# static (torch 2.11, 2.13).
def maybe_mark_dynamic(t: Tensor, dim: int) -> None:
    torch._dynamo.maybe_mark_dynamic(t, dim)


def mark_static(t: Tensor, dim: int | None = None) -> None:
    if dim is None:
        torch._dynamo.mark_static(t)
    else:
        torch._dynamo.mark_static(t, dim)


# Inductor as a backend function: flexflash's backends wrap it to count the graphs each compiled
# function compiles (the "inductor" string cannot be wrapped) (torch 2.11, 2.13).
def inductor_backend():
    return torch._dynamo.lookup_backend("inductor")


# Inductor with config patches for one compilation (the compile mode: set_compile_mode), applied
# to the forward and the later backward graph alike (torch 2.11, 2.13).
def compile_fx_with(gm, example_inputs, patches: dict):
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(gm, example_inputs, config_patches=patches)


# The Inductor options of a torch.compile mode, to apply as config patches (torch 2.11, 2.13).
def mode_options(mode: str) -> dict:
    return torch._inductor.list_mode_options(mode)


# The tensor that owns a tensor's memory and autograd's version counter of it, which every
# in-place write through any view advances: the identity of a mask's values for the block-mask
# cache (no public API; torch 2.11, 2.13). None for inference tensors, which keep no counter.
def version_of(t: Tensor) -> tuple[Tensor, int] | None:
    root = t if t._base is None else t._base
    try:
        return root, root._version
    except RuntimeError:  # inference tensors
        return None


# Whether FlexAttention's FLASH backend (FlashAttention-4 kernels through CuTe DSL) can run here:
# its own check, in Inductor's private modules (torch 2.11; absent from older torch).
def flash_generator_available() -> bool:
    try:
        from torch._inductor.kernel.flex.flex_flash_attention import ensure_flash_available
        return bool(ensure_flash_available())
    except Exception:  # older torch without the FLASH backend, or a broken install
        return False


# SDPA's fused CPU kernel called directly, for the memory-bounded path's tiles: the public
# scaled_dot_product_attention returns no log-sum-exp and has no backward taking one, which a
# tile's backward needs to recompute its probabilities (torch 2.11, 2.13). Both take an additive
# float mask broadcastable to (B, H, rows, cols), in float32 also for bfloat16/float16 inputs.
def cpu_flash_forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float):
    """``(out, lse)`` of SDPA's CPU flash kernel (a fully masked row: out 0, lse 0)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=attn_mask,
                                                                      scale=scale)


def cpu_flash_backward(d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       attn_mask: Tensor | None, scale: float):
    """``(dq, dk, dv)`` of :func:`cpu_flash_forward`."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        d_out, q, k, v, out, lse, 0.0, False, attn_mask=attn_mask, scale=scale)
