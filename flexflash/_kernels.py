"""Compiled FlexAttention kernels: the kernel body (masks, biases, modifiers, dropout's two
passes), the layout masks and biases reach it in, and :class:`_Kernel`, one compiled copy of the
body per kind of call with its own Dynamo cache (see flexflash._flex for why)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from . import _torch_private, dropout
from ._compiled import _COMPILE_MODES, _LIB, _SERIAL, _STATS, _Counted, _own_code
from ._compose import Structure, compose_mask, compose_score
from ._fingerprint import Modifier, captured_tensors
from ._torch_private import _mark_squeezed_dynamic, _with_dynamic_sizes, _without_duck_sizing

try:  # torch >= 2.9; the return_lse flag is deprecated there
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - older torch
    AuxRequest = None

log = logging.getLogger("flexflash")

@dataclass(frozen=True)
class _Static:
    """Constants of one kind of call, passed to the compiled kernel (guarded by identity)."""

    structure: Structure
    block: tuple[int, int]
    scale: float
    gqa: bool
    return_lse: bool
    kernel_options: tuple[tuple[str, Any], ...]
    dropout: bool = False
    # Extra options of the dropout passes (kept entries, undropped lse), from flexflash._tuning.
    pass_options: tuple[tuple[tuple[str, Any], ...], tuple[tuple[str, Any], ...]] = ((), ())
    # Whether the mask and the bias (in this order) arrive with their key dimension split in two,
    # (..., Nk // 16, 16) (_kernel_layout): the kernel joins it again.
    split_keys: tuple[bool, bool] = (False, False)


_INT32_MAX = 2**31 - 1


def _elements(t: Tensor):
    """How many elements of its storage ``t`` spans from its first (its strides counted, as
    Inductor sizes a kernel input to choose 32- or 64-bit indices; not its storage offset, which
    Dynamo does not trace)."""
    if 0 in t.shape:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


def needs_main_kernel(q: Tensor, k: Tensor, v: Tensor, *buffers: Tensor | None) -> bool:
    """Whether a CUDA call of fewer queries than 128 must be kept off FlexAttention's decoding
    kernel: where one of its inputs (``q``, ``k``, ``v`` and the ``buffers`` the modifiers read) or
    its output spans more than 2**31 - 1 elements, Inductor indexes in 64 bits, and the decoding
    template then fails to compile (torch 2.11-2.13, flex_decode: "Ternary expression with dynamic
    condition has inconsistent types int64 and int32"; an H200 decoding batch of 64 sequences of
    32,768 cached keys, 8 key/value heads of 128, did). The main kernel compiles 64-bit indices.
    Traced with symbolic sizes, the comparisons guard on what FlexAttention's lowering guards on
    anyway (fewer than 128 queries; 32-bit indices), so they add no recompilation. (The callers ask
    only for CUDA calls: other devices have no decoding kernel.)"""
    if not 0 < q.shape[-2] < 128:
        return False
    sizes = [q.shape[:-1].numel() * v.shape[-1]] + [_elements(t) for t in (q, k, v, *buffers) if t is not None]
    return any(n > _INT32_MAX for n in sizes)


def _flex(q, k, v, score_fn, block_mask, static: _Static, return_lse: bool, extra=(), main_kernel=False):
    options = {**dict(static.kernel_options), **dict(extra)}
    # (membership tests, not a set operation on the keys: Dynamo traces this function, and torch
    # 2.11's Dynamo does not take ``set & dict_keys``)
    if main_kernel and "BACKEND" not in options and "FORCE_USE_FLEX_ATTENTION" not in options:
        options["FORCE_USE_FLEX_ATTENTION"] = True  # see needs_main_kernel
    options = options or None
    kw = dict(score_mod=score_fn, block_mask=block_mask, scale=static.scale, enable_gqa=static.gqa,
              kernel_options=options)
    if not return_lse:
        return flex_attention(q, k, v, **kw), None
    if AuxRequest is not None:
        out, aux = flex_attention(q, k, v, return_aux=AuxRequest(lse=True), **kw)
        return out, aux.lse
    return flex_attention(q, k, v, return_lse=True, **kw)


# Value head dim of the pass that only computes the undropped log-sum-exp (its output is unused;
# 16 is the smallest head dim the kernels take).
_LSE_ONLY_DV = 16


def _flex_kernel(q, k, v, blocks, offset, mask, bias, mask_mod, score_mod, drop, static: _Static):
    """The compiled body: FlexAttention with the call's composed mask and score functions.

    With dropout (``drop = (params, (row1, row2, col), keep_scale)``: the seed, the hash's row and
    column words and ``1 / (1 - p)``), two passes over the same block mask compute it exactly: one
    whose score function also sends the dropped entries to ``-inf`` (it asks
    :func:`flexflash.dropout.entry_keep`) gives ``out'`` over the kept entries and its log-sum-exp
    ``L'``; one over every allowed entry, with a 16-wide zero value, gives the undropped ``L``. Then
    ``out = out' * exp(L' - L) / (1 - p)``, differentiable through both passes (FlexAttention's
    backward takes the gradient of its log-sum-exp). Dropping in the score function rather than in
    the mask function keeps the blocks that are fully allowed without dropout on the kernel's
    full-block path (no mask evaluation, no per-entry select), forward and backward."""
    st = static.structure
    Nq, Nk = q.shape[-2], k.shape[-2]
    if static.split_keys[0]:
        mask = _join_keys(mask, st.mask_full)
    if static.split_keys[1]:
        bias = _join_keys(bias, st.bias_full)
    mask_fn = compose_mask(st, offset, mask, mask_mod)
    score_fn = compose_score(st, bias, score_mod)
    block_mask = None
    if blocks is not None:
        block_mask = BlockMask((Nq, Nk), *blocks, static.block, mask_fn)
    main = q.device.type == "cuda" and needs_main_kernel(q, k, v, mask, bias)
    if drop is None:
        return _flex(q, k, v, score_fn, block_mask, static, static.return_lse, main_kernel=main)

    params, (row1, row2, col), keep_scale = drop
    thr = params[3]

    def kept_score(score, b, h, q_idx, kv_idx):
        if score_fn is not None:
            score = score_fn(score, b, h, q_idx, kv_idx)
        # Only the short per-entry step of the hash runs here (see flexflash.dropout).
        kept = dropout.entry_keep(row1[b, h, q_idx], row2[b, h, q_idx], col[kv_idx], thr)
        return torch.where(kept, score, -float("inf"))

    v_zero = v.new_zeros(v.shape[0], v.shape[1], Nk, _LSE_ONLY_DV)
    kept_options, lse_options = static.pass_options
    out_zero, lse = _flex(q, k, v_zero, score_fn, block_mask, static, True, lse_options, main_kernel=main)
    # FlexAttention's backward lowering fails on an output without gradient (torch 2.11-2.13):
    # give the unused zero output a part in lse with weight 0, so its gradient is a zero tensor.
    lse = lse + out_zero[..., 0].float() * 0.0
    out_kept, lse_kept = _flex(q, k, v, kept_score, block_mask, static, True, kept_options, main_kernel=main)
    # Rows with nothing allowed have lse = lse_kept = -inf and out_kept = 0: factor 0, no NaN.
    lse_safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    factor = torch.exp(lse_kept - lse_safe) * keep_scale
    out = (out_kept.float() * factor.unsqueeze(-1)).to(q.dtype)
    return out, (lse if static.return_lse else None)


# Masks and biases full along the keys reach the kernels of lengths multiples of the tiles as
# (..., Nk // 16, 16) views, joined again inside: with a row stride of 16 times a symbol, kernels of
# symbolic lengths load them in vectors, as fast as static ones (benchmarks/NOTES.md, "Key split").
# Not for a bias that needs its gradient: FlexAttention's backward does not lower the gradient of
# a view made inside the graph (torch 2.11).
_KEY_SPLIT = 16


def _static_sequence_buffers(st: Structure, split_keys: tuple[bool, bool]) -> tuple[bool, bool]:
    """Whether the mask and the bias (in this order) are full along both sequence dimensions and
    not split (_kernel_layout): the buffers that compile with static shapes on CUDA for the first
    shapes of their kind (_STATIC_SEQUENCE_BUFFERS)."""
    full = lambda f: f is not None and f[2] and f[3]  # noqa: E731
    return full(st.mask_full) and not split_keys[0], full(st.bias_full) and not split_keys[1]


def _kernel_layout(t: Tensor | None, full: tuple[bool, ...] | None, split: bool) -> Tensor | None:
    """``t`` (4-D) as the compiled kernel takes it, in one reshape (a view: dropping size-1
    dimensions and splitting one never copies): without its broadcast dimensions
    (:func:`squeeze_broadcast`) and, with ``split`` where ``t`` is full along the keys, its key
    dimension split as ``(Nk // 16, 16)``."""
    if t is None:
        return None
    shape = [n for n, f in zip(t.shape, full) if f]
    if split and full[3]:
        shape[-1:] = (shape[-1] // _KEY_SPLIT, _KEY_SPLIT)
    return t.reshape(shape)


def _join_keys(t: Tensor | None, full: tuple[bool, ...] | None) -> Tensor | None:
    """The inverse of :func:`_kernel_layout`, inside the compiled kernel."""
    if t is None or not full[3]:
        return t
    return t.flatten(-2)


def _cpu_static_bias(st: Structure) -> bool:
    """Whether a CPU call's bias keeps static shapes: one full along the keys but broadcast along
    the queries (a per-key bias) does not compile with a symbolic key length (torch 2.13: the
    generated C++ names an undeclared variable)."""
    return st.bias_full is not None and st.bias_full[3] and not st.bias_full[2]


def _cpu_static_shapes(st: Structure, mask: Tensor | None, bias: Tensor | None, mask_info: Modifier,
                       score_info: Modifier, every: bool = False) -> tuple:
    """The static sizes of a CPU call's kind (see _Kernel.__call__). The CPU kernel template
    compiles some buffers of symbolic size into C++ that names undeclared variables (torch 2.13,
    found by compiling every broadcast pattern): a mask's or bias's batch dimension indexed by a
    symbolic batch, a per-key bias, and (not knowing their layout) the tensors a score_mod reads.
    Those stay static: their sizes are part of the kind, and a new size compiles once more. The
    sequence dimensions of masks and biases, and the tensors a mask_mod reads (document ids,
    lengths), are symbolic, so new lengths reuse the kernel. Where that still fails to compile (a
    mask_mod reading a strided slice of a tensor, say), the kind is kept in ``_CPU_STATIC_KINDS``
    and every shape is static (``every``): one compilation per shape, as for any new shape."""
    if every:
        return ("static",) + tuple(tuple(t.shape) for t in (mask, bias, *mask_info.tensors, *score_info.tensors)
                                   if t is not None)
    bias_shape = None
    if bias is not None:
        bias_shape = tuple(bias.shape) if _cpu_static_bias(st) else bias.shape[0]
    return (None if mask is None else mask.shape[0], bias_shape,
            tuple(tuple(t.shape) for t in score_info.tensors))


# A contiguous copy, as an operator of flexflash's own: Inductor removes a clone whose result has
# its input's layout, and merges identical clones of one tensor (attention(x, x, x)), so clones do
# not reach FlexAttention's lowering as distinct buffers; calls with distinct ``tag`` values do.
_LIB.define("copy_apart(Tensor t, int tag) -> Tensor")
_LIB.impl("copy_apart", lambda t, tag: t.clone(memory_format=torch.contiguous_format), "CompositeExplicitAutograd")


@torch.library.register_fake("flexflash::copy_apart")
def _(t: Tensor, tag: int) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# CPU kinds (without their shapes) whose kernel failed to compile with symbolic buffer sizes.
_CPU_STATIC_KINDS: set = set()


class _Kernel(_Counted):
    """A compiled copy of :func:`_flex_kernel` with a code object (and a Dynamo cache) of its own.

    ``static_mask_bias``: on CUDA, whether the mask and the bias (in this order) compile with
    static shapes (_STATIC_SEQUENCE_BUFFERS). ``every_buffer_static``: on CPU, whether every mask,
    bias and captured tensor does (a kind whose C++ failed to compile otherwise: _cpu_static_shapes).
    """

    def __init__(self, static: _Static, label: str, *, static_mask_bias: tuple[bool, bool] = (False, False),
                 every_buffer_static: bool = False, mode: str = "default", static_shapes: bool = False,
                 static_batch: bool = False):
        self.static = static
        self.static_shapes = static_shapes
        self.static_batch = static_batch
        self.label = label
        self.static_mask_bias = static_mask_bias
        self.every_buffer_static = every_buffer_static
        self.mode = mode
        self.compiles = 0
        self.generation = 0
        self._fn = self._compile()

    def _compile(self):
        fn = _own_code(_flex_kernel, f"flexflash_{self.label}_{next(_SERIAL)}")
        inductor = _torch_private.inductor_backend()
        patches = _COMPILE_MODES[self.mode]

        def counting_backend(gm, example_inputs):
            self.compiles += 1
            _STATS["compiles"] += 1
            log.debug("flexflash: compiling %s (graph %d, mode %s)", fn.__name__, self.compiles, self.mode)
            if patches:  # applied to the forward and the (later) backward compilation
                return _torch_private.compile_fx_with(gm, example_inputs, patches)
            return inductor(gm, example_inputs)

        # dynamic=None: sizes marked dynamic in __call__ are symbolic from the first compilation;
        # Python values captured by modifiers stay constants (they are part of the kind, and the
        # CPU kernel template cannot compile symbolic scalars).
        # static_shapes: every size a constant (a kind's first shape on CUDA, see _run_flex).
        return torch.compile(fn, backend=counting_backend, fullgraph=True,
                             dynamic=False if self.static_shapes else None)

    def __call__(self, *args):
        if self._budget_spent():
            # Dynamo would run the next new graph eagerly (the unfused path): start a fresh cache.
            warnings.warn(
                f"flexflash: the kernel for {self.label} was compiled {self.compiles} times; starting a "
                "fresh compilation cache. A modifier that captures a different Python value on every "
                "call causes this: capture a tensor instead (its values are read at run time).",
                RuntimeWarning, stacklevel=3)
            self.compiles = 0
            self.generation += 1
            self._fn = self._compile()
        if self.compiles or self.static_shapes:
            # Compiled already with symbolic sizes, or static shapes throughout: the marks below
            # only matter for a first compilation with symbolic sizes (a later one makes sizes that
            # changed dynamic by itself; on CPU the sizes that stay static are part of the kind:
            # _cpu_static_shapes).
            q, k, v = args[:3]
            if q is k or k is v or q is v:
                # attention(x, x, x): the first compilation saw distinct aliases (below), and Dynamo
                # guards that its inputs are not the same object.
                args = (q.view(q.shape), k.view(k.shape), v.view(v.shape), *args[3:])
            if self.static_shapes:  # no size is a symbol: duck sizing does not matter
                return self._fn(*args, self.static)
            return _without_duck_sizing(self._fn, *args, self.static)
        args = self._marked_for_a_first_compilation(args)
        if args[0].device.type == "cpu" and self.every_buffer_static:  # (_cpu_static_shapes)
            return _without_duck_sizing(self._fn, *args, self.static)
        # A mask_mod's tensors are read on partial blocks only, and from a second length on Dynamo
        # compiles them with symbolic sizes anyway (the document rows at N = 2048 and 8192 of
        # benchmarks/NOTES.md ran such kernels). A score_mod's tensors keep static shapes until a
        # size changes on CUDA (they are read on every entry, where symbolic strides slowed biases
        # several times: _STATIC_SEQUENCE_BUFFERS), and always on CPU (_cpu_static_shapes).
        return _with_dynamic_sizes(captured_tensors(args[7]), _without_duck_sizing, self._fn, *args, self.static)

    def _marked_for_a_first_compilation(self, args: tuple) -> tuple:
        """The kernel's arguments with the sizes that are symbolic from the first compilation marked
        dynamic and those that must stay static marked static. The marks go on aliases: marking
        the caller's tensors would leak into the caller's own torch.compile of code using them."""
        q, k, v, blocks, offset, mask, bias = args[:7]
        q, k, v, mask, bias = (None if t is None else t.view(t.shape) for t in (q, k, v, mask, bias))
        args = (q, k, v, blocks, offset, mask, bias, *args[7:])
        for t in (q, k, v):  # batch and sequence lengths
            if self.static_batch:  # (flexflash._kinds._STATIC_DECODING_BATCH)
                _torch_private.mark_static(t, 0)
            else:
                _torch_private.maybe_mark_dynamic(t, 0)
            _torch_private.maybe_mark_dynamic(t, 2)
        st = self.static.structure
        if q.device.type == "cpu" and self.every_buffer_static:  # (_cpu_static_shapes)
            for t in (mask, bias, *captured_tensors(args[7]), *captured_tensors(args[8])):
                if t is not None:
                    _torch_private.mark_static(t)
            return args
        if q.device.type == "cpu":
            # The CPU kernel template compiles some buffers of symbolic size into C++ that names
            # undeclared variables (torch 2.13): see _cpu_static_shapes for what stays static.
            buffers = [(mask, st.mask_full)]
            if _cpu_static_bias(st):
                _torch_private.mark_static(bias)
            else:
                buffers.append((bias, st.bias_full))
            for t, full in buffers:
                if t is not None:
                    _torch_private.mark_static(t, 0)
                    for dim in (2, 3):
                        if full[dim]:
                            _torch_private.maybe_mark_dynamic(t, dim)
            for t in captured_tensors(args[8]):
                _torch_private.mark_static(t)
        else:
            static_mask, static_bias = self.static_mask_bias
            for t, full, static in ((mask, st.mask_full, static_mask), (bias, st.bias_full, static_bias)):
                if t is not None and static:
                    _torch_private.mark_static(t)
                else:
                    _mark_squeezed_dynamic(t, full)
        for t in blocks or ():
            if t is None:  # absent lists: forward-only block masks, paged decoding's full blocks
                continue
            for dim in range(t.dim()):
                if dim == 0 and self.static_batch:
                    _torch_private.mark_static(t, 0)
                elif dim != 1:
                    _torch_private.maybe_mark_dynamic(t, dim)
        drop = args[9]
        if drop is not None:  # the hash words: (B, H, Nq) twice and (Nk,)
            for t in drop[1]:
                for dim in range(t.dim()):
                    if dim != 1 or t.dim() == 1:
                        _torch_private.maybe_mark_dynamic(t, dim)
        return args


_KERNELS: dict[Any, _Kernel] = {}
_SCALARS: dict[tuple[Any, torch.dtype, torch.device], Tensor] = {}


def _scalar_tensor(value, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached 0-d tensor (the causal offset, the dropout scale): a new value is a new tensor
    value, not a recompilation, and repeated values cost no host-to-device copy."""
    if torch.compiler.is_compiling():
        return torch.tensor(value, dtype=dtype, device=device)
    key = (value, dtype, device)
    t = _SCALARS.get(key)
    if t is None:
        if len(_SCALARS) > 4096:
            _SCALARS.clear()
        t = _SCALARS[key] = torch.tensor(value, dtype=dtype, device=device)
    return t
