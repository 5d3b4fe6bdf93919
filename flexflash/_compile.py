"""The one place that owns compilation: compiled FlexAttention kernels and block masks.

Why it looks like this:

* ``torch.compile`` keeps its cache of graphs per *code object*, and after ``recompile_limit``
  (8) graphs for one code object it silently runs the function eagerly, which for FlexAttention
  means the unfused path that materialises the scores (20-50x slower, N^2 memory). One compiled
  function shared by every kind of call (dtypes, grad modes, masks, user modifiers) reaches 8
  quickly. So every *kind* of call gets its own copy of the kernel function with its own code
  object, hence its own cache and budget; within a kind only shapes vary, compiled with dynamic
  shapes (one graph, a few more for size-1 specialisations). On CUDA a kind's first shape gets a
  kernel of static shapes of its own, as ``torch.compile`` does by default: a call of a symbolic
  kernel reads every symbolic size through Dynamo first, host time that small calls feel. Should a kind still exhaust its budget
  (a user modifier whose captured Python values change on every call), it starts a fresh code
  object and says so in a warning, so the kernel never degrades to the unfused path.
* The kind of a call is fingerprinted like Dynamo guards it: code objects of user modifiers, the
  Python values they capture, and the dtype/device/rank/grad flag of captured tensors, not their
  values or shapes. New tensor values of the same kind reuse the compiled kernel.
* Sequence-length dependent values enter the kernel as tensors (the causal offset; the constant 0
  for causal self-attention on CUDA, a kind of its own) or as tensor shapes, never as Python ints,
  so a new length does not recompile. On CUDA, lengths that are multiples of 128 (every kernel
  tile) are a kind of their own, compiled without the per-tile boundary checks (``IS_DIVISIBLE``):
  a case compiles at most twice over all its lengths (twice more on CUDA, for the static first shapes). Masks and biases full along the keys reach
  those kernels with their key dimension split in 16s (``_kernel_layout``), so symbolic lengths read
  them in vectors. The exception is a ``(..., Nq, Nk)`` mask or bias that is not split (other
  lengths, a bias that needs its gradient) on CUDA: static shapes for its kind's first few shapes,
  then one symbolic kernel (``_STATIC_SEQUENCE_BUFFERS``).
* Block masks are built on CUDA by one compiled builder per kind of mask, elsewhere eagerly in
  query chunks (memory bounded by ``_MASK_CHUNK_ELEMENTS``), and padded to at least two blocks per
  dimension, which keeps Dynamo from specialising on 1-block masks. Masks that depend only on
  indices are cached by shape, masks that read tensors by those tensors' identity and version.
* Kernel options without the caller's own come from ``flexflash._tuning``: the generator
  (FlexAttention's Triton templates or FlashAttention-4) and tuned tiles, from measurements.
* The compile mode (:func:`set_compile_mode`) is part of every kind: switching it compiles anew
  and keeps the kernels of the other mode.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import types
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental import _config as _fx_config
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from . import _tuning, dropout, mods
from ._compose import Structure, compose_mask, compose_score, squeeze_broadcast, tile_grids

try:  # torch >= 2.9; the return_lse flag is deprecated there
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - older torch
    AuxRequest = None

__all__ = ["run_flex", "Modifier", "inspect_modifier", "captured_tensors", "compile_stats", "reset",
           "set_compile_mode", "get_compile_mode"]

log = logging.getLogger("flexflash")

# --- the compile mode (a user setting) ---------------------------------------------------------

# Inductor settings per mode. "max-autotune" is torch's "max-autotune-no-cudagraphs": CUDA graphs
# replay into static output buffers, so a kernel called twice in one step (every layer of a model)
# would overwrite the output of its earlier call.
_COMPILE_MODES = {
    "default": {},
    "max-autotune": torch._inductor.list_mode_options("max-autotune-no-cudagraphs"),
}
_COMPILE_MODE_ENV = "FLEXFLASH_COMPILE_MODE"


def _checked_mode(mode: Any, name: str) -> str:
    if not isinstance(mode, str) or mode not in _COMPILE_MODES:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, _COMPILE_MODES))}, got {mode!r}")
    return mode


_MODE = [_checked_mode(os.environ.get(_COMPILE_MODE_ENV, "default"), _COMPILE_MODE_ENV)]


def set_compile_mode(mode: str) -> str:
    """Sets how flexflash compiles its kernels from now on, process-wide; returns the previous mode.

    * ``"default"``: FlexAttention's default kernel configurations, with the tiles and generator
      flexflash chose from measurements (``flexflash._tuning``).
    * ``"max-autotune"``: Inductor benchmarks several kernel configurations the first time each
      kind of call compiles and keeps the fastest (torch's ``"max-autotune-no-cudagraphs"``). First
      calls take much longer (tens of seconds to minutes per kind). flexflash then passes none of
      its tuned tiles, so the autotuner chooses them; the generator choice, the two-stage pipeline
      a wide bias needs to fit shared memory and the caller's own ``kernel_options`` stand. It
      was not reliably faster than the default where measured (the README has the figures).

    The initial mode comes from the ``FLEXFLASH_COMPILE_MODE`` environment variable (default
    ``"default"``). Kernels already compiled in another mode are kept for when it comes back.
    Inside a caller's ``torch.compile`` the caller's mode applies: flexflash's kernel is traced
    into the caller's graph."""
    previous, _MODE[0] = _MODE[0], _checked_mode(mode, "mode")
    return previous


def get_compile_mode() -> str:
    """The mode set by :func:`set_compile_mode` (or ``FLEXFLASH_COMPILE_MODE``)."""
    return _MODE[0]

_MASK_CHUNK_ELEMENTS = 1 << 24  # mask entries evaluated at once when building a block mask
_BLOCK_MASK_CACHE_SIZE = 64


def _recompile_limit() -> int:
    cfg = torch._dynamo.config
    return int(getattr(cfg, "recompile_limit", getattr(cfg, "cache_size_limit", 8)))


class _Counted:
    """A compiled function of flexflash's, counting the graphs it has compiled (``compiles``, set
    by its backend) against Dynamo's recompile limit, past which Dynamo runs new graphs eagerly."""

    compiles = 0
    _checked_at = None

    def _budget_spent(self) -> bool:
        # torch's setting is read only when the count has changed since the last check: reading a
        # config attribute costs microseconds, on every call of a warm kernel otherwise.
        if self.compiles == self._checked_at:
            return False
        if self.compiles >= _recompile_limit():
            return True
        self._checked_at = self.compiles
        return False


# --- fingerprints ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Modifier:
    """What a call needs to know of a ``mask_mod`` or ``score_mod``, from one walk over it (see
    :func:`inspect_modifier`)."""

    fp: Any  # a hashable summary matching what Dynamo guards on (None inside a caller's compile)
    tensors: tuple[Tensor, ...]  # the tensors it reads
    pure: bool  # a function of its indices alone: no tensors, no objects whose state may change
    tensors_only: bool  # its only run-time state is tensors (no other objects)


NO_MODIFIER = Modifier(None, (), True, True)
_PLAIN = (bool, int, float, str, complex, torch.dtype, torch.device)


def inspect_modifier(fn: Any) -> Modifier:
    """One walk over a modifier: its fingerprint and the tensors it reads. The fingerprint holds
    code objects and Python constants by value, tensors by (dtype, device, rank, requires_grad),
    other objects by id; tensors are found in its closure (recursively, through nested functions,
    partials, tuples and lists) and in the module globals it names. Inside a caller's
    torch.compile, Dynamo cannot walk closures and guards on them itself: nothing is walked."""
    if fn is None:
        return NO_MODIFIER
    if torch.compiler.is_compiling():
        return Modifier(None, (), False, False)
    tensors: dict[int, Tensor] = {}
    state = {"objects": False}
    fp = _walk(fn, 0, tensors, state)
    return Modifier(fp, tuple(tensors.values()), not tensors and not state["objects"], not state["objects"])


def _walk(obj: Any, depth: int, tensors: dict[int, Tensor], state: dict) -> Any:
    if depth > 8:
        state["objects"] = True
        return ("deep", id(obj))
    if isinstance(obj, Tensor):
        tensors.setdefault(id(obj), obj)
        return ("tensor", obj.dtype, obj.device, obj.dim(), obj.requires_grad)
    if obj is None or isinstance(obj, _PLAIN):
        return (type(obj), obj)
    if isinstance(obj, (tuple, list)):
        return (type(obj), tuple(_walk(x, depth + 1, tensors, state) for x in obj))
    if isinstance(obj, functools.partial):
        return ("partial", _walk(obj.func, depth + 1, tensors, state), _walk(obj.args, depth + 1, tensors, state),
                _walk(tuple(sorted(obj.keywords.items())), depth + 1, tensors, state))
    if isinstance(obj, types.FunctionType):
        cells = []
        for cell in obj.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # empty cell
                cells.append(("empty",))
                continue
            cells.append(_walk(contents, depth + 1, tensors, state))
        globs = []
        for name in obj.__code__.co_names:
            value = obj.__globals__.get(name)
            if isinstance(value, Tensor):
                globs.append((name, _walk(value, depth + 1, tensors, state)))
        return ("fn", obj.__code__, tuple(cells), tuple(globs), _walk(obj.__defaults__, depth + 1, tensors, state))
    state["objects"] = True
    return ("obj", id(obj))


def captured_tensors(fn: Any) -> list[Tensor]:
    """The tensors a modifier reads (see :func:`inspect_modifier`)."""
    return list(inspect_modifier(fn).tensors)


# --- the kernel ------------------------------------------------------------------------------

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


def _flex(q, k, v, score_fn, block_mask, static: _Static, return_lse: bool, extra=()):
    options = {**dict(static.kernel_options), **dict(extra)} or None
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
    if drop is None:
        return _flex(q, k, v, score_fn, block_mask, static, static.return_lse)

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
    out_zero, lse = _flex(q, k, v_zero, score_fn, block_mask, static, True, lse_options)
    # FlexAttention's backward lowering fails on an output without gradient (torch 2.11-2.13):
    # give the unused zero output a part in lse with weight 0, so its gradient is a zero tensor.
    lse = lse + out_zero[..., 0].float() * 0.0
    out_kept, lse_kept = _flex(q, k, v, kept_score, block_mask, static, True, kept_options)
    # Rows with nothing allowed have lse = lse_kept = -inf and out_kept = 0: factor 0, no NaN.
    lse_safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    factor = torch.exp(lse_kept - lse_safe) * keep_scale
    out = (out_kept.float() * factor.unsqueeze(-1)).to(q.dtype)
    return out, (lse if static.return_lse else None)


_SERIAL = itertools.count()

# Masks and biases full along the keys are read on every entry of a tile (on partial blocks for
# masks, everywhere for biases): Triton loads a row of such a buffer in vectors only where it can
# prove the row's start aligned. With symbolic lengths the row stride is a symbol of unknown
# divisibility, and every entry was loaded alone: a (B, H, N, N) bias + causal forward took 5.2 ms
# against 0.88 ms with static shapes, a dense (N, N) bool mask 6.1 ms against 1.7 ms (H200, torch
# 2.11, bf16, B = 4, H = 16, N = 4096, D = 128, lengths multiples of the tiles). Passed as a view
# of shape (..., Nk // 16, 16) and joined again inside the kernel, the row stride is 16 times a
# symbol, and the symbolic kernels run at the static ones' speed (0.88 and 1.72 ms): one
# compilation for every length. Only where the lengths are multiples of the tiles: otherwise the
# kernel's boundary checks index modulo the symbolic length, which no layout makes vectorisable.
# Not for a bias that needs its gradient: FlexAttention's backward does not lower the gradient of
# a captured tensor that is a view made inside the graph (torch 2.11: "int() argument must be ...
# not 'tuple'"); the bias's own gradient dominates that backward anyway.
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


_LIB = torch.library.Library("flexflash", "DEF")
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


def _is_cpp_compile_error(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it was raised from) is Inductor's C++ compile error."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ == "CppCompileError" or "CppCompileError" in str(e).split("\n", 1)[0]:
            return True
        e = e.__cause__ or e.__context__
    return False


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


def _own_code(fn, name: str):
    """A copy of ``fn`` with a code object of its own (so a ``torch.compile`` of it has its own
    Dynamo cache and recompile budget), named ``name``."""
    code = fn.__code__.replace(co_name=name)
    if hasattr(code, "co_qualname"):
        code = code.replace(co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name)


class _Kernel(_Counted):
    """A compiled copy of :func:`_flex_kernel` with a code object (and a Dynamo cache) of its own.

    ``static_mask_bias``: on CUDA, whether the mask and the bias (in this order) compile with
    static shapes (_STATIC_SEQUENCE_BUFFERS). ``every_buffer_static``: on CPU, whether every mask,
    bias and captured tensor does (a kind whose C++ failed to compile otherwise: _cpu_static_shapes).
    """

    def __init__(self, static: _Static, label: str, *, static_mask_bias: tuple[bool, bool] = (False, False),
                 every_buffer_static: bool = False, mode: str = "default", static_shapes: bool = False):
        self.static = static
        self.static_shapes = static_shapes
        self.label = label
        self.static_mask_bias = static_mask_bias
        self.every_buffer_static = every_buffer_static
        self.mode = mode
        self.compiles = 0
        self.generation = 0
        self._fn = self._compile()

    def _compile(self):
        fn = _own_code(_flex_kernel, f"flexflash_{self.label}_{next(_SERIAL)}")
        inductor = torch._dynamo.lookup_backend("inductor")
        patches = _COMPILE_MODES[self.mode]

        def counting_backend(gm, example_inputs):
            self.compiles += 1
            _STATS["compiles"] += 1
            log.debug("flexflash: compiling %s (graph %d, mode %s)", fn.__name__, self.compiles, self.mode)
            if patches:  # compile_fx applies them to the forward and the (later) backward compilation
                from torch._inductor.compile_fx import compile_fx
                return compile_fx(gm, example_inputs, config_patches=patches)
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
        # Shape marks go on aliases: marking the caller's tensors would leak into the caller's own
        # torch.compile of code that uses them.
        q, k, v, blocks, offset, mask, bias = args[:7]
        q, k, v, mask, bias = (None if t is None else t.view(t.shape) for t in (q, k, v, mask, bias))
        args = (q, k, v, blocks, offset, mask, bias, *args[7:])
        for t in (q, k, v):  # batch and sequence lengths
            torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(t, 2)
        if q.device.type == "cpu" and self.every_buffer_static:  # (_cpu_static_shapes)
            for t in (mask, bias, *captured_tensors(args[7]), *captured_tensors(args[8])):
                if t is not None:
                    torch._dynamo.mark_static(t)
            return _without_duck_sizing(self._fn, *args, self.static)
        if q.device.type == "cpu":
            # The CPU kernel template compiles some buffers of symbolic size into C++ that names
            # undeclared variables (torch 2.13): see _cpu_static_shapes for what stays static.
            st = self.static.structure
            buffers = [(mask, st.mask_full)]
            if _cpu_static_bias(st):
                torch._dynamo.mark_static(bias)
            else:
                buffers.append((bias, st.bias_full))
            for t, full in buffers:
                if t is not None:
                    torch._dynamo.mark_static(t, 0)
                    for dim in (2, 3):
                        if full[dim]:
                            torch._dynamo.maybe_mark_dynamic(t, dim)
            for t in captured_tensors(args[8]):
                torch._dynamo.mark_static(t)
        else:
            st = self.static.structure
            static_mask, static_bias = self.static_mask_bias
            for t, full, static in ((mask, st.mask_full, static_mask), (bias, st.bias_full, static_bias)):
                if t is not None and static:
                    torch._dynamo.mark_static(t)
                else:
                    _mark_squeezed_dynamic(t, full)
        drop = args[9]
        for t in blocks or ():
            for dim in range(t.dim()):
                if dim != 1:
                    torch._dynamo.maybe_mark_dynamic(t, dim)
        if drop is not None:  # the hash words: (B, H, Nq) twice and (Nk,)
            for t in drop[1]:
                for dim in range(t.dim()):
                    if dim != 1 or t.dim() == 1:
                        torch._dynamo.maybe_mark_dynamic(t, dim)
        # A mask_mod's tensors are read on partial blocks only, and from a second length on Dynamo
        # compiles them with symbolic sizes anyway (the document rows at N = 2048 and 8192 of
        # benchmarks/RESULTS.md ran such kernels). A score_mod's tensors keep static shapes until a
        # size changes on CUDA (they are read on every entry, where symbolic strides slowed biases
        # several times: _STATIC_SEQUENCE_BUFFERS), and always on CPU (_cpu_static_shapes).
        return _with_dynamic_sizes(captured_tensors(args[7]), _without_duck_sizing, self._fn, *args, self.static)


_KERNELS: dict[Any, _Kernel] = {}
_STATS = {"compiles": 0, "kernels": 0, "block_masks_built": 0, "block_mask_hits": 0}


def compile_stats() -> dict[str, int]:
    """Counters: ``compiles`` (graphs compiled by flexflash's kernels), ``kernels`` (kinds of call
    seen), ``block_masks_built`` and ``block_mask_hits`` (cache hits)."""
    return dict(_STATS)


def reset() -> None:
    """Forget every compiled kernel and cached block mask (for tests and benchmarks)."""
    _KERNELS.clear()
    _BUILDERS.clear()
    _BLOCK_MASKS.clear()
    _DEAD_KEYS.clear()
    _CPU_STATIC_KINDS.clear()
    _STATIC_SHAPES.clear()
    _FIRST_SHAPES.clear()
    _KINDS.clear()
    for key in _STATS:
        _STATS[key] = 0


# --- block masks -----------------------------------------------------------------------------

_BLOCK_MASKS: OrderedDict[Any, tuple[Tensor, ...]] = OrderedDict()


# Inclusive prefix sums of int32 flags along the last dimension, as an operator of flexflash's own
# so that a compiled block-mask builder calls ATen's scan: for long rows of few masks (a causal
# mask at N = 128k has 1024 blocks per row) inductor picks a split scan, which torch 2.11 fails to
# generate code for. Defined through torch.library directly (a call costs a few microseconds;
# torch.library.custom_op's autograd wrapper costs three times as much) with a fake kernel for
# tracing.
_LIB.define("row_prefix_count(Tensor flags) -> Tensor")
_LIB.impl("row_prefix_count", lambda flags: flags.cumsum(-1, dtype=torch.int32), "CompositeExplicitAutograd")


@torch.library.register_fake("flexflash::row_prefix_count")
def _(flags: Tensor) -> Tensor:
    return torch.empty_like(flags, dtype=torch.int32, memory_format=torch.contiguous_format)


_row_prefix_count = torch.ops.flexflash.row_prefix_count.default


def _ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """Dense block flags ``(B, H, R, C)`` -> (count per row ``(B, H, R)``, column indices of the set
    flags first ``(B, H, R, C)``), FlexAttention's BlockMask format."""
    # A stable partition by prefix sums and one scatter (cheaper than a sort, and it fuses when
    # compiled): set flag c goes to position (set flags before c), unset flag c after all set ones.
    flags = dense.to(torch.int32).contiguous()  # (a transposed view otherwise: strides would vary)
    before = _row_prefix_count(flags)  # set flags up to and including c
    num = before[..., -1]
    col = torch.arange(flags.shape[-1], device=dense.device, dtype=torch.int32).expand_as(flags)
    pos = torch.where(dense, before - 1, num.unsqueeze(-1) + col - before)
    idx = torch.empty_like(flags).scatter_(-1, pos.long(), col)
    return num.contiguous(), idx.contiguous()


def _mask_flags(mask_fn, B: int, H: int, Nq: int, Nk: int, block: tuple[int, int],
                device: torch.device) -> tuple[Tensor, Tensor]:
    """Block flags of a mask function: (some allowed, all allowed), each ``(B, H, nqb, nkb)``,
    evaluated in query chunks of bounded memory. Entries past the sequence ends count as masked."""
    qb, kb = block
    nqb, nkb = -(-Nq // qb), -(-Nk // kb)
    some = every = None
    per_block_row = qb * nkb * kb  # mask entries of one query block, per batch and head
    rows = max(1, _MASK_CHUNK_ELEMENTS // max(1, B * H * per_block_row))  # query blocks per chunk
    r0 = 0
    while r0 < nqb:
        r1 = min(nqb, r0 + rows)
        q0, q1 = r0 * qb, min(Nq, r1 * qb)

        # Evaluated over broadcast index grids (as the memory-bounded path does), which also
        # traces inside a caller's torch.compile. Batch and head dimensions the mask does not
        # depend on stay of size 1 (FlexAttention broadcasts block masks).
        m = mask_fn(*tile_grids(B, H, q0, q1, 0, Nk, device))
        m = m.expand(m.shape[0], m.shape[1], q1 - q0, Nk)
        m = F.pad(m, (0, nkb * kb - Nk, 0, (r1 - r0) * qb - (q1 - q0)))  # pad with False
        m = m.reshape(m.shape[0], m.shape[1], r1 - r0, qb, nkb, kb)
        if some is None:
            some = torch.zeros(m.shape[0], m.shape[1], nqb, nkb, dtype=torch.bool, device=device)
            every = torch.zeros_like(some)
            # The first chunk shows which of batch and head the mask depends on: later chunks are
            # sized by those alone (a causal mask at N = 128k: 2 chunks, not one per query block).
            rows = max(1, _MASK_CHUNK_ELEMENTS // max(1, m.shape[0] * m.shape[1] * per_block_row))
        some[:, :, r0:r1] = m.any(dim=5).any(dim=3)
        every[:, :, r0:r1] = m.all(dim=5).all(dim=3)
        r0 = r1
    return some, every


def _at_least_two(n):
    """``max(2, n)`` for a number of blocks: ``torch.sym_max`` where ``n`` is symbolic (no guard
    on ``n`` being 1 or not), Python's ``max`` where it is an int (Dynamo does not trace
    ``torch.sym_max`` of ints: a builder compiled with a static length)."""
    return max(2, n) if isinstance(n, int) else torch.sym_max(2, n)


def _fused_flags(mask_fn, B: int, H: int, Nq: int, Nk: int, block: tuple[int, int],
                 device: torch.device) -> tuple[Tensor, Tensor]:
    """The same flags as :func:`_mask_flags`, from one evaluation of the mask function over 6-D
    index grids ``(b, h, query block, row, key block, column)``: compiled, the evaluation fuses into
    the block reductions and nothing of size ``Nq x Nk`` is stored (evaluated eagerly it would be:
    use it compiled). Indices past the ends are clamped to the last row/column for the evaluation
    (so captured tensors are never read out of bounds) and count as masked.

    The flags have at least two blocks per dimension, the extra ones empty (the padding
    :func:`_block_mask_tensors` gives the flags of a one-block mask), through ``sym_max`` sizes of
    the grids: compiled with symbolic sizes, padding or slicing the flags after the evaluation would
    guard on the number of blocks being 1 or not (through the operands' strides), and a builder
    compiled at one length would compile again at a length of one block."""
    qb, kb = block
    rq, rk = _at_least_two((Nq + qb - 1) // qb), _at_least_two((Nk + kb - 1) // kb)

    def ar(n):
        return torch.arange(n, device=device, dtype=torch.int32)

    i = ar(rq * qb).view(1, 1, rq, qb, 1, 1)
    j = ar(rk * kb).view(1, 1, 1, 1, rk, kb)
    m = mask_fn(ar(B).view(B, 1, 1, 1, 1, 1), ar(H).view(1, H, 1, 1, 1, 1),
                torch.clamp(i, max=Nq - 1), torch.clamp(j, max=Nk - 1))
    m = m & (i < Nq) & (j < Nk)
    return m.any(dim=5).any(dim=3), m.all(dim=5).all(dim=3)


def _tensor_flags(mask: Tensor, Nq: int, Nk: int, block: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Block flags of a 4-D bool ``mask`` (size-1 dimensions broadcast) by a reduction over the
    tensor itself: ``(B|1, H|1, nqb|1, nkb|1)`` each. Incomplete edge blocks are never "all"."""
    qb, kb = block
    nqb, nkb = -(-Nq // qb), -(-Nk // kb)
    Bm, Hm, Mq, Mk = mask.shape
    m = F.pad(mask, (0, nkb * kb - Nk if Mk > 1 else 0, 0, nqb * qb - Nq if Mq > 1 else 0))
    m = m.reshape(Bm, Hm, nqb if Mq > 1 else 1, qb if Mq > 1 else 1, nkb if Mk > 1 else 1, kb if Mk > 1 else 1)
    some, every = m.any(dim=5).any(dim=3), m.all(dim=5).all(dim=3)
    complete_q = torch.arange(1, nqb + 1, device=mask.device) * qb <= Nq
    complete_k = torch.arange(1, nkb + 1, device=mask.device) * kb <= Nk
    return some, every & complete_q[:, None] & complete_k[None, :]


def _block_mask_tensors(some: Tensor, every: Tensor, padded: bool = False) -> tuple[Tensor, ...]:
    """FlexAttention's eight BlockMask tensors from block flags; ``padded``: the flags have one
    shape and at least two blocks per dimension already (:func:`_fused_flags`, compiled), so
    neither the broadcast nor the padding runs (each would compare symbolic sizes, which is where
    guards on a one-block length come from)."""
    if padded:
        partial, full = some & ~every, every
    else:
        partial, full = torch.broadcast_tensors(some & ~every, every)
        nqb, nkb = partial.shape[-2:]
        # At least two blocks per dimension: the extra rows are empty and never visited by the
        # kernel, and Dynamo then never specialises the kernel on a 1-block mask.
        pad = (0, max(0, 2 - nkb), 0, max(0, 2 - nqb))
        partial, full = F.pad(partial, pad), F.pad(full, pad)
    kv_num, kv_idx = _ordered(partial)
    full_kv_num, full_kv_idx = _ordered(full)
    q_num, q_idx = _ordered(partial.transpose(-1, -2))
    full_q_num, full_q_idx = _ordered(full.transpose(-1, -2))
    return kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num, full_q_idx


@dataclass(frozen=True)
class _BuildStatic:
    structure: Structure
    block: tuple[int, int]


def _build_blocks(q, k, offset, mask, mask_mod, static: _BuildStatic):
    """The compiled body of a block-mask builder: see :func:`_block_tensors`."""
    B, H, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    fn = compose_mask(static.structure, offset, mask, mask_mod)
    some, every = _fused_flags(fn, B, H, Nq, Nk, static.block, q.device)
    return _block_mask_tensors(some, every, padded=True)


# The block mask of a kind of mask is built by its compiled builder from this build on; earlier
# ones eagerly. Compiling a builder takes several seconds (on an H200, the first call of a
# prefix-LM case took 14.7 s against 4.8 s for soft-capping, which has no block mask), while the
# eager build of one block mask takes milliseconds at N = 4096 (query chunks of a few kernels
# each): a mask that is built once (a causal or sliding-window mask for one length, the same
# document ids in every layer) never pays for the compilation, and one rebuilt on every step
# (new padding or document ids per batch) compiles at its second build.
_COMPILED_BUILDS_FROM = 2


class _MaskBuilder(_Counted):
    """A compiled copy of :func:`_build_blocks` with a code object (and a Dynamo cache) of its own,
    for one kind of mask; sizes are dynamic."""

    def __init__(self, static: _BuildStatic, label: str):
        self.static = static
        self.label = label
        self.builds = 0  # block masks of this kind built so far (see _COMPILED_BUILDS_FROM)
        self._fresh()

    def _fresh(self):
        self.compiled = False
        self.compiles = 0
        inductor = torch._dynamo.lookup_backend("inductor")

        def counting_backend(gm, example_inputs):
            self.compiles += 1
            return inductor(gm, example_inputs)
        self._fn = torch.compile(_own_code(_build_blocks, f"flexflash_blocks_{self.label}_{next(_SERIAL)}"),
                                 backend=counting_backend, fullgraph=True, dynamic=None)

    def __call__(self, q, k, offset, mask, mask_mod):
        q, k = q.detach(), k.detach()  # only their sizes are read: no autograd wrapper
        if self._budget_spent():
            # Past the limit Dynamo would evaluate the mask eagerly over the whole (B, H, Nq, Nk)
            # grid: start a fresh cache instead (as the kernels do).
            self._fresh()
        if self.compiled:
            return _without_duck_sizing(self._fn, q, k, offset, mask, mask_mod, self.static)
        q, k, mask = (None if t is None else t.view(t.shape) for t in (q, k, mask))
        for t, dims in ((q, (0, 2)), (k, (0, 2))):
            for dim in dims:
                if t.shape[dim] > 1:
                    torch._dynamo.maybe_mark_dynamic(t, dim)
        _mark_squeezed_dynamic(mask, self.static.structure.mask_full)
        tensors = _with_dynamic_sizes(captured_tensors(mask_mod), _without_duck_sizing, self._fn, q, k, offset,
                                      mask, mask_mod, self.static)
        self.compiled = True  # compiled with symbolic sizes: later calls need no marks
        return tensors


_BUILDERS: dict[Any, _MaskBuilder] = {}


def _mask_builder(st: Structure, mask_fp, block, mask) -> _MaskBuilder:
    key = (st, mask_fp, block, None if mask is None else (mask.dtype, mask.device))
    builder = _BUILDERS.get(key)
    if builder is None:
        builder = _BUILDERS[key] = _MaskBuilder(_BuildStatic(st, block), str(len(_BUILDERS)))
    return builder


# Keys of entries whose tensors were freed (weak-reference callbacks add them; the next cache
# operation drops the entries, so block masks of tensors that are gone do not stay on the device).
_DEAD_KEYS: list = []


def _drop_dead() -> None:
    while _DEAD_KEYS:
        _BLOCK_MASKS.pop(_DEAD_KEYS.pop(), None)


def _cache_get(key):
    # The caches hold real tensors of eager calls; inside a caller's torch.compile they are
    # bypassed (the caller's graph computes its own).
    if torch.compiler.is_compiling():
        return None
    _drop_dead()
    entry = _BLOCK_MASKS.get(key)
    if entry is None:
        return None
    value, refs = entry
    if any(ref() is None for ref in refs):
        # A tensor the mask read is gone (its id may now name another tensor): a stale entry.
        del _BLOCK_MASKS[key]
        return None
    _BLOCK_MASKS.move_to_end(key)
    _STATS["block_mask_hits"] += 1
    return value


def _cache_put(key, value, roots=()):
    """Caches ``value`` under ``key``; ``roots`` are the tensors whose identity the key holds: the
    entry holds weak references to them and is dropped once one of them is freed."""
    if torch.compiler.is_compiling():
        return value
    _drop_dead()
    refs = tuple(weakref.ref(root, lambda _, key=key, dead=_DEAD_KEYS: dead.append(key)) for root in roots)
    _BLOCK_MASKS[key] = (value, refs)
    if len(_BLOCK_MASKS) > _BLOCK_MASK_CACHE_SIZE:
        _BLOCK_MASKS.popitem(last=False)
    return value


def _tensor_identity(tensors: list[Tensor]) -> tuple[tuple, tuple] | None:
    """Identity of the values of ``tensors``: (key, roots) where key holds, per tensor, the object
    that owns its memory (a view's base: ``roots``), its version counter (every in-place write
    through any view of that memory advances it), and the view's geometry. While the owning objects
    live (the cache keeps weak references to them: an id is reused only after its object is gone),
    an equal key means equal values, except after writes that bypass the version counter (through
    ``.data``, a NumPy view, DLPack), which PyTorch's autograd does not see either. None where a
    tensor keeps no version counter (inference tensors)."""
    key, roots = [], []
    for t in tensors:
        root = t if t._base is None else t._base
        try:
            version = root._version
        except RuntimeError:  # inference tensors
            return None
        key.append((id(root), version, t.dtype, tuple(t.shape), t.stride(), t.storage_offset()))
        roots.append(root)
    return tuple(key), tuple(roots)


def _block_tensors(st: Structure, offset: int, mask: Tensor | None, mask_mod, info: Modifier, B: int, H: int,
                   Nq: int, Nk: int, block: tuple[int, int], device: torch.device,
                   q: Tensor | None = None, k: Tensor | None = None,
                   offset_tensor: Tensor | None = None) -> tuple[Tensor, ...]:
    """The block mask of a call, cached: by fingerprint and shape when the mask reads no tensors,
    and also by the identity and version of the tensors it reads (the ``mask`` tensor, tensors the
    mask_mod captures), so that calls with the same mask tensors (the layers of a model, repeated
    steps on one batch) build it once. A tensor written in place has a new version and rebuilds it.

    On CUDA, from the second block mask of a kind of mask on (``_COMPILED_BUILDS_FROM``), one
    compiled builder per kind evaluates the whole mask (causal, the ``mask`` tensor, the mask_mod)
    and reduces it to block flags and FlexAttention's index tensors in a few fused kernels (``q``,
    ``k`` give it the sizes and the causal offset). The first block mask of a kind, and every one
    elsewhere (CPU, and inside a caller's torch.compile), is built eagerly from up to two parts
    whose flags are and-ed: the mask functions (evaluated in query chunks) and the ``mask`` tensor
    (a reduction over the tensor). "Some allowed" of a conjunction is bounded by the conjunction of
    the parts' flags, so a block may be visited and found empty, never skipped wrongly; "all
    allowed" is exact."""
    mask_fp = info.fp
    pure = mask is None and info.pure  # index-only: cached by shape
    key, roots = (mask_fp, st, offset, B, H, Nq, Nk, block, device), ()
    cacheable = pure
    if not cacheable and not torch.compiler.is_compiling() and info.tensors_only:
        ident = _tensor_identity(([] if mask is None else [mask]) + list(info.tensors))
        if ident is not None:
            key, roots, cacheable = key + ident[0], ident[1], True
    if cacheable:
        hit = _cache_get(key)
        if hit is not None:
            return hit
    tracing = torch.compiler.is_compiling()
    if not tracing:  # (Dynamo would guard on the count: a recompilation per call)
        _STATS["block_masks_built"] += 1
    if device.type == "cuda" and not tracing:
        mask_st = replace(st, bias_full=None, has_score_mod=False)  # the mask's part of the call
        builder = _mask_builder(mask_st, mask_fp, block, mask)
        builder.builds += 1
        if builder.builds >= _COMPILED_BUILDS_FROM:
            # The compiled builder indexes the mask by its full dimensions only (see run_flex).
            squeezed = None if mask is None else squeeze_broadcast(mask, st.mask_full)
            tensors = builder(q, k, offset_tensor, squeezed, mask_mod)
            return _cache_put(key, tensors, roots) if cacheable else tensors
    some = every = None
    # the mask functions' part (causal, mask_mod), evaluated with the offset as a Python int
    fn_st = replace(st, mask_full=None, bias_full=None, has_score_mod=False, causal_aligned=False)
    if fn_st.masked:
        # A mask_mod may depend on batch and head: its flags are (B, H); causal alone is (1, 1).
        Bm, Hm = (B, H) if st.has_mask_mod else (1, 1)
        fn_key = ("flags", mask_fp, fn_st, offset, Bm, Hm, Nq, Nk, block, device)
        flags = _cache_get(fn_key) if pure else None
        if flags is None:
            flags = _mask_flags(compose_mask(fn_st, offset, None, mask_mod), Bm, Hm, Nq, Nk, block, device)
            if pure:
                _cache_put(fn_key, flags)
        some, every = flags
    if mask is not None:
        t_some, t_every = _tensor_flags(mask, Nq, Nk, block)
        some = t_some if some is None else some & t_some
        every = t_every if every is None else every & t_every
    tensors = _block_mask_tensors(some, every)
    return _cache_put(key, tensors, roots) if cacheable else tensors


# --- entry point -----------------------------------------------------------------------------

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


def _words_flat(params: Tensor, rows: Tensor, q_len: Tensor, cols: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The dropout hash's row words of flat rows ``r = (b * H + h) * Nq + i`` and column words."""
    bh, i = rows // q_len, rows % q_len  # b * H + h is what row_words needs of (b, h)
    r1, r2 = dropout.row_words(params, 1, bh, torch.zeros_like(bh), i)
    return r1, r2, dropout.column_word(params, cols)


# The hash words are computed by one small compiled kernel per call (dynamic 1-D shapes, a handful
# of graphs in all), outside the attention kernel: computed inside it, the torch 2.11 flex lowering
# can meet their intermediate buffers unfrozen, and inlined into the mask function their expression
# tree makes compilation take minutes.
_words_compiled = torch.compile(_words_flat, dynamic=True, fullgraph=True)


def _words(fn, params: Tensor, B: int, H: int, Nq: int, Nk: int, q_len: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The row words ``(B, H, Nq)`` (two) and column words ``(Nk,)`` of one call, by ``fn``
    (:func:`_words_flat`, compiled or not); ``q_len`` is ``Nq`` as a 0-d int32 tensor."""
    rows = torch.arange(B * H * Nq, device=params.device, dtype=torch.int32)
    cols = torch.arange(Nk, device=params.device, dtype=torch.int32)
    r1, r2, c = fn(params, rows, q_len, cols)
    return r1.view(B, H, Nq), r2.view(B, H, Nq), c


_LIB.define("dropout_words(Tensor params, SymInt B, SymInt H, SymInt Nq, SymInt Nk) -> (Tensor, Tensor, Tensor)")
_LIB.impl("dropout_words", lambda params, B, H, Nq, Nk: _words(
    _words_flat, params, B, H, Nq, Nk, torch.tensor(Nq, dtype=torch.int32, device=params.device)),
    "CompositeExplicitAutograd")


@torch.library.register_fake("flexflash::dropout_words")
def _(params: Tensor, B, H, Nq, Nk) -> tuple[Tensor, Tensor, Tensor]:
    row = params.new_empty((B, H, Nq))
    return row, params.new_empty((B, H, Nq)), params.new_empty((Nk,))


def _dropout_words(params: Tensor, B: int, H: int, Nq: int, Nk: int, device: torch.device,
                   offsets: tuple[int, int, int, int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Row words ``(B, H, Nq)`` (two) and column words ``(Nk,)`` of the dropout hash for one call.
    With ``offsets = (b0, h0, q0, heads)`` the call is a shard of a larger one (flexflash.parallel):
    the rows are those of the larger call's global indices."""
    if offsets is not None:
        b0, h0, q0, heads = offsets
        b, h, i, _ = tile_grids(B, H, q0, q0 + Nq, 0, 1, device)
        r1, r2 = dropout.row_words(params, heads, b[..., 0] + b0, h[..., 0] + h0, i[..., 0])
        c = dropout.column_word(params, torch.arange(Nk, device=device, dtype=torch.int32))
        shape = (B, H, Nq)
        return r1.expand(shape).contiguous(), r2.expand(shape).contiguous(), c
    if torch.compiler.is_compiling():
        # In a caller's graph, as an operator of flexflash's own: computed in the graph, torch
        # 2.11's FlexAttention lowering met the words' buffers unfrozen ("convert FlexibleLayout
        # to FixedLayout first"); an operator's outputs are buffers of fixed layout.
        return torch.ops.flexflash.dropout_words(params, B, H, Nq, Nk)
    fn = _words_compiled if device.type == "cuda" else _words_flat
    return _words(fn, params, B, H, Nq, Nk, _scalar_tensor(Nq, torch.int32, device))


# Masks and biases full along both sequence dimensions ((..., Nq, Nk) tensors) that are not split
# (_kernel_layout: lengths that are not multiples of the tiles, a bias that needs its gradient)
# compile with static shapes on CUDA: with symbolic sizes the kernel's boundary checks index them
# modulo a symbolic length, element by element (H200, torch 2.11, bf16, B=4 H=16 N=4000 D=128,
# forward GPU time of raw FlexAttention, static / symbolic: causal + (B, H, N, N) bias 0.98 /
# 3.93 ms, a dense (N, N) bool mask 1.91 / 5.81 ms).
_STATIC_SEQUENCE_BUFFERS = True
# How many shapes of such buffers compile statically per kind, before one kernel of symbolic
# shapes takes every further shape: the first shapes (a training run's one length, a few
# evaluation lengths) get the fast kernel, and many lengths still do not compile once per length.
_STATIC_BUFFER_SHAPES = 4
_STATIC_SHAPES: dict[Any, set] = {}
# On CUDA, each kind's first shape compiles with static shapes (see _run_flex).
_STATIC_FIRST_SHAPE = True
_FIRST_SHAPES: dict[Any, tuple] = {}


def _signature(tensors) -> tuple:
    """The shapes, strides and storage offsets of a call's tensors: a kernel compiled with static
    shapes is used for these alone (views at other offsets, such as query chunks, take the
    symbolic kernel)."""
    return tuple(None if t is None else (t.shape, t.stride(), t.storage_offset()) for t in tensors)

_DIVISIBLE_TILE = 128  # the largest default FlexAttention tile, forward and backward


def _divisible(Nq: int, Nk: int, kernel_options: dict | None) -> bool:
    """Whether both lengths are multiples of every kernel tile (the default tiles are at most 128;
    tiles set in ``kernel_options`` count too), so the kernel needs no boundary checks."""
    tiles = [_DIVISIBLE_TILE] + [int(v) for key, v in (kernel_options or {}).items() if key.startswith("BLOCK_")]
    tile = max(tiles)
    return Nq % tile == 0 and Nk % tile == 0 and not (kernel_options or {}).get("BACKEND") == "FLASH"


def flash_case(st: Structure, q: Tensor, k: Tensor, *, mask_mod, score_mod, infos: tuple[Modifier, Modifier],
               dropout: bool, return_lse: bool) -> str | None:
    """The case of :func:`flexflash._tuning.flash_choice` this call is, or None where only Triton
    kernels are considered. The cases are the measured ones, made of flexflash's own parts alone:
    "dense", "causal", "gqa_causal" (grouped heads), "key_padding" (a ``(B, Nk)`` mask),
    "softcap" (:func:`flexflash.mods.tanh_softcap`), "alibi_causal" (:func:`flexflash.mods.alibi`
    with ``causal=True``) and "prefix_lm" (:func:`flexflash.mods.prefix_lm`). Never: the caller's
    own modifiers, biases, other masks, causal with ``Nq != Nk`` (its offset is a 0-d tensor, which
    FlashAttention-4 cannot read), modifiers reading a 0-d tensor or a tensor that requires grad
    (FLASH cannot differentiate captured tensors), dropout, ``return_lse`` (with gradients FLASH
    cannot differentiate it), CPU, or inside a caller's torch.compile."""
    if q.device.type != "cuda" or torch.compiler.is_compiling() or dropout or return_lse or st.single_query:
        return None
    if st.bias_full is not None or (st.causal and not st.causal_aligned):
        return None
    if any(t.dim() == 0 or t.requires_grad for info in infos for t in info.tensors):
        return None
    # (causal, mask dims, mask_mod family, score_mod family); "own" for the caller's functions
    parts = (st.causal, st.mask_full, (mods.family(mask_mod) or "own") if st.has_mask_mod else None,
             (mods.family(score_mod) or "own") if st.has_score_mod else None)
    case = _FLASH_CASES.get(parts)
    if q.shape[1] != k.shape[1]:  # grouped heads: measured for causal attention only
        return "gqa_causal" if case == "causal" else None
    return case


_FLASH_CASES = {
    (False, None, None, None): "dense",
    (True, None, None, None): "causal",
    (False, (True, False, False, True), None, None): "key_padding",
    (False, None, None, "tanh_softcap"): "softcap",
    (True, None, None, "alibi"): "alibi_causal",
    (False, None, "prefix_lm", None): "prefix_lm",
}


def structure(q: Tensor, k: Tensor, *, causal: bool, mask: Tensor | None, bias: Tensor | None, mask_mod,
              score_mod) -> Structure:
    """The :class:`Structure` of a validated call (4-D mask/bias)."""
    Nq, Nk = q.shape[-2], k.shape[-2]
    return Structure.of(
        causal=causal, mask=mask, bias=bias, mask_mod=mask_mod, score_mod=score_mod,
        single_query=q.device.type == "cpu" and Nq == 1,
        # On CUDA, causal self-attention lengths (Nq == Nk) are a kind of their own with the
        # constant offset 0: nothing to read per entry, and FlashAttention-4 can generate it (it
        # cannot read a captured 0-d tensor, and the lowering takes no size expression there).
        # Inside a caller's torch.compile too, on every device: there the offset would be a size
        # expression, and the constant 0 of equal lengths fails the CPU lowering (torch 2.13).
        causal_aligned=causal and Nq == Nk and (q.device.type == "cuda" or torch.compiler.is_compiling()),
    )


def measured_options(st: Structure, q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None, mask_mod, score_mod,
                     infos: tuple[Modifier, Modifier], block: tuple[int, int], kernel_options: dict | None,
                     dropout: bool, return_lse: bool) -> tuple[dict | None, tuple]:
    """The kernel options of a call and those of its dropout passes: the caller's own, whole, or
    else those chosen from measurements (flexflash._tuning: the generator, tuned tiles)."""
    pass_options = ((), ())
    # Under max-autotune the autotuner chooses the tiles; inside a caller's torch.compile the
    # caller's mode applies, not flexflash's.
    tiles = _MODE[0] == "default" or torch.compiler.is_compiling()
    if dropout and kernel_options is None and tiles:
        pass_options = _tuning.dropout_pass_options(q.device, q.dtype, q.shape[-1], block)
    if (kernel_options is None and q.device.type == "cuda" and q.element_size() < 4 and any(
            t.is_floating_point() and t.element_size() > q.element_size()
            for t in (bias, *infos[1].tensors) if t is not None)):
        # A score modifier reading a wider buffer (an fp32 bias with 16-bit q) overflows shared
        # memory with the default three-stage pipeline on an H100 (246-311 KB needed, 227 KB
        # there): two stages fit.
        return {"num_stages": 2}, ((), ())
    case = None
    if kernel_options is None:
        case = flash_case(st, q, k, mask_mod=mask_mod, score_mod=score_mod, infos=infos, dropout=dropout,
                          return_lse=return_lse)
    if case is not None:
        grad_needed = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        B, Hq, Nq, D = q.shape
        if _tuning.flash_choice(case, grad_needed, q.device, q.dtype, D, v.shape[-1],
                                _tuning.work(B, Hq, Nq, k.shape[-2], D)):
            return {"BACKEND": "FLASH"}, pass_options
    if kernel_options is None and tiles and not dropout:
        kernel_options = _tuning.triton_options(q.device, q.dtype, q.shape[-1], block,
                                                case=triton_case(st, score_mod))
    return kernel_options, pass_options


def triton_case(st: Structure, score_mod) -> str | None:
    """The case of a call for the tuned Triton tiles (flexflash._tuning.triton_options): "bias" (a
    bias tensor, any masks, no score function), "alibi" or "tanh_softcap" (a score function of
    flexflash.mods, any masks, no bias), "mask_mod", "dense_mask" (a mask tensor full along both
    sequence dimensions) or "mask" (masked, nothing scored beyond causal), or None (dense, causal
    alone, the caller's own score functions, a bias with a score function)."""
    if st.bias_full is not None:
        return None if st.has_score_mod else "bias"
    if st.has_score_mod:
        fam = mods.family(score_mod)
        return fam if fam in ("alibi", "tanh_softcap") else None
    if st.has_mask_mod:
        return "mask_mod"
    if st.mask_full is None:
        return None
    return "dense_mask" if st.mask_full[-2] and st.mask_full[-1] else "mask"


@dataclass(frozen=True)
class _KindPlan:
    """What a call's kind decides, before its tensors are read: its structure, its kernel's
    constants and the kind's key in _KERNELS (without the shape parts _run_flex adds)."""

    structure: Structure
    static: _Static
    kind: tuple


# Kind plans of eager calls by _kind_key: a call like an earlier one (the same shapes, flags,
# modifier fingerprints and options) skips the structure, the kernel options and the key's
# construction; the key's tuple then holds the same _Static object, compared by identity.
_KINDS: dict[Any, _KindPlan] = {}
_KINDS_SIZE = 512


def _kind_key(q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Tensor | None, bias: Tensor | None,
              infos: tuple[Modifier, Modifier], scale: float, block: tuple[int, int], kernel_options: dict | None,
              return_lse: bool, dropout: bool, grad: bool) -> tuple | None:
    """Everything :func:`_kind_plan` reads of a call, as a key (None where kernel_options are not
    hashable). Shapes stand for lengths: the plan of one shape says whether its lengths are
    multiples of the tiles."""
    try:
        options = None if kernel_options is None else tuple(sorted(kernel_options.items()))
        key = (q.device, q.dtype, q.shape, k.shape, v.shape[-1], None if mask is None else mask.shape,
               None if bias is None else (bias.shape, bias.dtype, bias.requires_grad), causal, infos[0].fp,
               infos[1].fp, scale, block, options, return_lse, dropout, grad,
               q.requires_grad or k.requires_grad or v.requires_grad, _MODE[0])
        hash(key)
    except TypeError:
        return None
    return key


def _kind_plan(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, mask: Tensor | None, bias: Tensor | None,
               mask_mod, score_mod, infos: tuple[Modifier, Modifier], scale: float, block: tuple[int, int],
               kernel_options: dict | None, return_lse: bool, dropout: bool, grad: bool,
               tracing: bool) -> _KindPlan:
    """The structure, kernel constants and kind of a call (see :func:`_run_flex`)."""
    B, Hq = q.shape[:2]
    Nk = k.shape[-2]
    st = structure(q, k, causal=causal, mask=mask, bias=bias, mask_mod=mask_mod, score_mod=score_mod)
    if st.single_query:
        q = q.expand(B, Hq, 2, q.shape[-1])
    kernel_options, pass_options = measured_options(st, q, k, v, bias=bias, mask_mod=mask_mod, score_mod=score_mod,
                                                    infos=infos, block=block, kernel_options=kernel_options,
                                                    dropout=dropout, return_lse=return_lse)
    divisible = q.device.type == "cuda" and _divisible(q.shape[-2], Nk, kernel_options)
    if divisible:
        # Lengths are symbolic in the compiled kernel, so FlexAttention cannot prove them multiples
        # of its tiles and compiles boundary checks into every tile (measured on an H100: +10%
        # forward, +25% forward+backward, 2x a dropout pass). Where the lengths are multiples of
        # every tile, say so: a kind of its own, so other lengths keep the checked kernel.
        kernel_options = {**(kernel_options or {}), "IS_DIVISIBLE": True}
    options = tuple(sorted((kernel_options or {}).items()))
    # Lengths multiples of the tiles: masks and biases full along the keys reach the kernel with
    # their key dimension split (_kernel_layout), so symbolic lengths read them in vectors; not a
    # bias whose gradient is needed.
    split = divisible and not tracing
    split_keys = (split, split and not (grad and bias is not None and bias.requires_grad))
    static = _Static(st, block, scale, Hq != k.shape[1], return_lse, options, dropout=dropout,
                     pass_options=pass_options, split_keys=split_keys)
    # Head counts and head dims are static in FlexAttention's kernels: part of the kind.
    heads_dims = (Hq, k.shape[1], q.shape[-1], v.shape[-1])
    kind = (static, heads_dims, q.device.type, q.dtype, grad, infos[0].fp, infos[1].fp, _MODE[0])
    return _KindPlan(st, static, kind)


class _StaticOnCpu(Exception):
    """A CPU kind with symbolic buffer sizes failed to compile: call again with static ones."""


# Serialises eager calls of compiled FlexAttention across threads: a call may compile (Dynamo's
# tracing, the process-wide duck-sizing setting switched for the call, shape marks set on aliases)
# and update the caches, none of which is safe from several threads at once. Held around the whole
# call, as whether it compiles is known only once Dynamo checks its guards; a CUDA call only
# launches kernels, and a CPU kernel runs on every core already. Not taken inside a caller's
# torch.compile (Dynamo holds its own lock there, and nothing of flexflash's compiles).
_LOCK = threading.RLock()


def run_flex(*args, **kwargs) -> tuple[Tensor, Tensor | None]:
    """Runs one validated call through compiled FlexAttention (see :func:`_run_flex`)."""
    if torch.compiler.is_compiling():
        return _run_flex(*args, **kwargs)
    with _LOCK:
        try:
            return _run_flex(*args, **kwargs)
        except _StaticOnCpu:
            return _run_flex(*args, **kwargs)


def _run_flex(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, mask: Tensor | None, bias: Tensor | None,
             mask_mod, score_mod, scale: float, block: tuple[int, int], kernel_options: dict | None,
             return_lse: bool, dropout_p: float = 0.0,
             dropout_params: Tensor | None = None,
             dropout_offsets: tuple[int, int, int, int] | None = None,
             mask_info: Modifier | None = None, score_info: Modifier | None = None) -> tuple[Tensor, Tensor | None]:
    """Runs one validated call (4-D q/k/v, 4-D broadcastable mask/bias) through compiled
    FlexAttention. Returns ``(out, lse or None)``; lse in natural log, fp32. With ``dropout_p > 0``
    (CUDA only: it needs the log-sum-exp, which the CPU kernel does not return), ``dropout_params``
    come from :func:`flexflash.dropout.draw_seed`. ``mask_info``, ``score_info``: the modifiers'
    :func:`inspect_modifier`, where the caller has them already."""
    mask_info = inspect_modifier(mask_mod) if mask_info is None else mask_info
    score_info = inspect_modifier(score_mod) if score_info is None else score_info
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[-2]
    if q.device.type == "cpu" and bias is not None and bias.shape[-2] == 1 < bias.shape[-1] and Nq > 1:
        # A per-key bias does not compile on CPU with a symbolic key length (_cpu_static_bias); its
        # stride-0 expansion along the queries does.
        # (The view gives its size-1 dimensions the strides that the first compilation's alias,
        # a view too, saw: Dynamo guards on them.)
        bias = bias.expand(*bias.shape[:2], Nq, Nk).view(*bias.shape[:2], Nq, Nk)
    tracing = torch.compiler.is_compiling()
    use_dropout = dropout_p > 0
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias))
    key = None if tracing else _kind_key(q, k, v, causal, mask, bias, (mask_info, score_info), scale, block,
                                         kernel_options, return_lse, use_dropout, grad)
    kp = _KINDS.get(key) if key is not None else None
    if kp is None:
        kp = _kind_plan(q, k, v, causal=causal, mask=mask, bias=bias, mask_mod=mask_mod, score_mod=score_mod,
                        infos=(mask_info, score_info), scale=scale, block=block, kernel_options=kernel_options,
                        return_lse=return_lse, dropout=use_dropout, grad=grad, tracing=tracing)
        if key is not None:
            if len(_KINDS) >= _KINDS_SIZE:
                _KINDS.clear()
            _KINDS[key] = kp
    st, static, kind = kp.structure, kp.static, kp.kind
    split_keys = static.split_keys
    single_query = st.single_query
    if single_query:
        # The CPU FlexAttention template does not compile for a single query row: run two
        # identical rows (the modifiers see query 0 for both) and keep the first.
        q = q.expand(B, Hq, 2, q.shape[-1])
    static_mask_bias = (False, False)
    if q.device.type == "cuda" and not tracing and _STATIC_SEQUENCE_BUFFERS:
        static_mask, static_bias = _static_sequence_buffers(st, split_keys)
        if static_mask or static_bias:
            # Such buffers compile with static shapes (see _STATIC_SEQUENCE_BUFFERS): a kind per
            # shape, for the first _STATIC_BUFFER_SHAPES shapes of the kind; further shapes share
            # one kernel of symbolic shapes.
            shape = (tuple(mask.shape) if static_mask else None, tuple(bias.shape) if static_bias else None)
            shapes = _STATIC_SHAPES.setdefault(kind, set())
            if shape in shapes or len(shapes) < _STATIC_BUFFER_SHAPES:
                shapes.add(shape)
                kind += (shape,)
                static_mask_bias = (static_mask, static_bias)
    if (q.device.type == "cuda" and not tracing and _STATIC_FIRST_SHAPE and q.shape[-2] > block[0]
            and Nk > block[1]):
        # The kind's first shape compiles with static shapes, as torch.compile does by default:
        # a symbolic kernel's call reads each symbolic size through Dynamo before launching
        # (H200, torch 2.11, B=32 H=16 N=512 D=128 bf16, document mask: 27 sizes, about 150 µs a
        # call on the host, more than the kernel's own time). Every other shape takes the kind's
        # one symbolic kernel. Not for lengths of one block: their block masks are padded to two
        # blocks (_at_least_two), which FlexAttention's lowering of static shapes rejects
        # (torch 2.11: "NoValidChoicesError" at 97 queries).
        signature = _signature((q, k, v, mask, bias, *mask_info.tensors, *score_info.tensors))
        if _FIRST_SHAPES.setdefault(kind, signature) == signature:
            kind += ("first shape",)
    shapeless_kind = kind
    # Not while tracing (no kernel of flexflash's is used then; Dynamo 2.11 cannot trace bool() of
    # a set); the emptiness test spares hashing the kind on every CPU call.
    cpu_static = (q.device.type == "cpu" and not tracing and bool(_CPU_STATIC_KINDS)
                  and shapeless_kind in _CPU_STATIC_KINDS)
    if q.device.type == "cpu":
        kind += (_cpu_static_shapes(st, mask, bias, mask_info, score_info, every=cpu_static),)
    kernel = _KERNELS.get(kind) if not tracing else functools.partial(_flex_kernel, static=static)
    if kernel is None:
        label = "_".join(filter(None, [
            "causal" if causal else "", "mask" if mask is not None else "", "bias" if bias is not None else "",
            getattr(mask_mod, "__name__", "mask_mod") if mask_mod is not None else "",
            getattr(score_mod, "__name__", "score_mod") if score_mod is not None else "",
            "dropout" if use_dropout else "",
        ])) or "dense"
        label = "".join(c if c.isalnum() else "_" for c in label)[:60]
        kernel = _KERNELS[kind] = _Kernel(static, label, static_mask_bias=static_mask_bias,
                                          every_buffer_static=cpu_static, mode=_MODE[0],
                                          static_shapes=kind[-1] == "first shape")
        _STATS["kernels"] += 1

    offset = None
    if causal and tracing and not st.causal_aligned:
        offset = Nk - Nq  # a size expression, inside the caller's graph
    elif causal and not st.causal_aligned:
        offset = _scalar_tensor(Nk - Nq, torch.int32, q.device)
    blocks = None
    if st.masked:
        blocks = _block_tensors(st, Nk - Nq, mask, mask_mod, mask_info, B, Hq, q.shape[-2], Nk, block, q.device,
                                q=q, k=k, offset_tensor=offset)
    if q.device.type == "cuda" or tracing:
        # The compiled kernels index masks and biases by their full dimensions only (no constant
        # indices, which FlashAttention-4 cannot generate code for); traced into a caller's graph,
        # the call indexes them the same way.
        mask = _kernel_layout(mask, st.mask_full, split_keys[0])
        bias = _kernel_layout(bias, st.bias_full, split_keys[1])
    drop = None
    if use_dropout:
        words = _dropout_words(dropout_params, q.shape[0], Hq, q.shape[-2], Nk, q.device, dropout_offsets)
        drop = (dropout_params, words, _scalar_tensor(1.0 / (1.0 - dropout_p), torch.float32, q.device))
    if tracing and q.device.type == "cpu" and not grad:
        # FlexAttention's CPU lowering rejects a query, key and value that are views of one buffer
        # (torch 2.11: "Unsupported for now if query, key, value are the same buffer", for a fused
        # qkv projection or attention(x, x, x)) or views of a 2-D projection (torch 2.13: "not
        # enough values to unpack (expected 4, got 2)", FlashAttentionTwo's key and value): inside
        # a caller's graph they get buffers of their own (copies of O(N * D); the attention is
        # O(N^2 * D)). All three: the lowering reads the query's buffer as 4-D.
        # Outside a caller's graph they are distinct inputs of the compiled kernel already. (CPU
        # calls that need gradients do not come here: they take the tiled path.)
        q, k, v = (torch.ops.flexflash.copy_apart(t, i) for i, t in enumerate((q, k, v)))
    try:
        out, lse = kernel(q, k, v, blocks, offset, mask, bias, mask_mod, score_mod, drop)
    except Exception as e:
        if q.device.type != "cpu" or tracing or kernel.every_buffer_static or not _is_cpp_compile_error(e):
            raise
        # The CPU kernel template generated C++ that does not compile for some buffer of symbolic
        # size (see _cpu_static_shapes): this kind compiles with static shapes from now on.
        log.info("flexflash: the CPU kernel for %s compiles with static buffer shapes (%s)", kernel.label,
                 str(e).splitlines()[0][:200])
        _CPU_STATIC_KINDS.add(shapeless_kind)
        _KERNELS.pop(kind, None)
        raise _StaticOnCpu from e
    if single_query:
        out = out[:, :, :1]
        lse = None if lse is None else lse[:, :, :1]
    return out, lse
