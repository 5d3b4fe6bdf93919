"""The FlexAttention path: runs one call through its compiled kernel and block mask.

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
import logging
import threading

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ._blockmask import _BLOCK_MASKS, _BUILDERS, _DEAD_KEYS, _block_tensors
from ._compiled import _MODE, _STATS
from .dropout import Draw
from ._fingerprint import Modifier, inspect_modifier
from ._flex_dropout import _dropout_words
from ._kernels import (_CPU_STATIC_KINDS, _KERNELS, _cpu_static_shapes, _flex_kernel, _Kernel, _kernel_layout,
                       needs_main_kernel,
                       _scalar_tensor, _static_sequence_buffers)
from ._kinds import (_FIRST_SHAPES, _STATIC_BUFFER_SHAPES, _STATIC_DECODING_BATCH, _STATIC_FIRST_SHAPE,
                     _STATIC_SEQUENCE_BUFFERS, _STATIC_SHAPES,
                     _KindPlan, _cpu_bias_view, _grad, _signature, flex_kind)
from ._torch_private import _is_cpp_compile_error

__all__ = ["run_flex", "reset"]

log = logging.getLogger("flexflash")

# Functions that forget what depends on the caches above (flexflash.plan's memoised plans).
_ON_RESET: list = []


def reset() -> None:
    """Forget every compiled kernel and cached block mask (for tests and benchmarks)."""
    _KERNELS.clear()
    _BUILDERS.clear()
    _BLOCK_MASKS.clear()
    _DEAD_KEYS.clear()
    _CPU_STATIC_KINDS.clear()
    _STATIC_SHAPES.clear()
    _FIRST_SHAPES.clear()
    for forget in _ON_RESET:
        forget()
    for key in _STATS:
        _STATS[key] = 0


class _StaticOnCpu(Exception):
    """A CPU kind with symbolic buffer sizes failed to compile: call again with static ones."""


# Serialises eager calls of compiled FlexAttention across threads: a call may compile (Dynamo's
# tracing, the process-wide duck-sizing setting switched for the call, shape marks set on aliases)
# and update the caches, none of which is safe from several threads at once. Held around the whole
# call, as whether it compiles is known only once Dynamo checks its guards; a CUDA call only
# launches kernels, and a CPU kernel runs on every core already. Not taken inside a caller's
# torch.compile (Dynamo holds its own lock there, and nothing of flexflash's compiles).
_LOCK = threading.RLock()

# Whether calls of fewer query rows than a query block pass FlexAttention the (empty) lists of full
# blocks (see _without_full_blocks); kept as a switch for measuring the two against each other.
_DECODING_FULL_BLOCKS = False


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
             return_lse: bool, dropout: Draw | None = None,
             mask_info: Modifier | None = None, score_info: Modifier | None = None,
             kind: _KindPlan | None = None, blocks=None) -> tuple[Tensor, Tensor | None]:
    """Runs one validated call (4-D q/k/v, 4-D broadcastable mask/bias) through compiled
    FlexAttention. Returns ``(out, lse or None)``; lse in natural log, fp32. ``dropout``: the call's
    drawn dropout (CUDA only: it needs the log-sum-exp, which the CPU kernel does not return). ``mask_info``, ``score_info``: the modifiers'
    :func:`inspect_modifier`, where the caller has them already; ``kind``: the call's
    :func:`flex_kind` (its plan's), computed here if not given; ``blocks(structure, q)``: the call's
    block-mask tensors for its (possibly padded) ``q``, where not built from its masks here
    (flexflash._paged)."""
    infos = (inspect_modifier(mask_mod) if mask_info is None else mask_info,
             inspect_modifier(score_mod) if score_info is None else score_info)
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        # A strided view of a mask or bias at a storage offset (rows of a larger tensor) got a
        # symbolic offset in the CPU kernel from its second offset on, whose C++ did not compile
        # (torch 2.13: "'cur_qSplitSize6' was not declared"); contiguous views at any offset
        # compile. contiguous() copies exactly the strided ones (the size of the buffer, which the
        # kernel reads whole anyway).
        mask, bias = (t.contiguous() if t is not None and t.storage_offset() else t for t in (mask, bias))
    bias = _cpu_bias_view(q, k, bias)
    if kind is None:
        kind = flex_kind(q, k, v, causal=causal, mask=mask, bias=bias, mask_mod=mask_mod, score_mod=score_mod,
                         infos=infos, scale=scale, block=block, kernel_options=kernel_options,
                         return_lse=return_lse, dropout=dropout is not None)
    st, q_len = kind.structure, q.shape[-2]
    if st.single_query:
        # The CPU FlexAttention template does not compile for a single query row: run two
        # identical rows (the modifiers see query 0 for both) and keep the first.
        q = q.expand(*q.shape[:2], 2, q.shape[-1])
    kernel, key, shapeless_key = _kernel(kind, q, k, v, mask, bias, infos, block,
                                         label=lambda: _label(causal, mask, bias, mask_mod, score_mod, dropout is not None))
    # (Inside a caller's torch.compile the modifiers' tensors are not walked: any grad mode counts.)
    backward = torch.is_grad_enabled() and (torch.compiler.is_compiling() or any(
        t is not None and t.requires_grad for t in (q, k, v, bias, *infos[0].tensors, *infos[1].tensors)))
    inputs = _kernel_inputs(kind, q, k, v, mask, bias, mask_mod, score_mod, infos[0], block, causal=causal,
                            q_len=q_len, dropout=dropout, blocks=blocks, backward=backward)
    try:
        out, lse = kernel(*inputs)
    except Exception as e:
        if q.device.type != "cpu" or torch.compiler.is_compiling() or kernel.every_buffer_static \
                or not _is_cpp_compile_error(e):
            raise
        # The CPU kernel template generated C++ that does not compile for some buffer of symbolic
        # size (see _cpu_static_shapes): this kind compiles with static shapes from now on.
        log.info("flexflash: the CPU kernel for %s compiles with static buffer shapes (%s)", kernel.label,
                 str(e).splitlines()[0][:200])
        _CPU_STATIC_KINDS.add(shapeless_key)
        _KERNELS.pop(key, None)
        raise _StaticOnCpu from e
    if st.single_query:
        out = out[:, :, :1]
        lse = None if lse is None else lse[:, :, :1]
    return out, lse


def _label(causal: bool, mask, bias, mask_mod, score_mod, dropout: bool) -> str:
    """A kernel's name: what its kind is made of (compiled graphs and logs say it)."""
    label = "_".join(filter(None, [
        "causal" if causal else "", "mask" if mask is not None else "", "bias" if bias is not None else "",
        getattr(mask_mod, "__name__", "mask_mod") if mask_mod is not None else "",
        getattr(score_mod, "__name__", "score_mod") if score_mod is not None else "",
        "dropout" if dropout else "",
    ])) or "dense"
    return "".join(c if c.isalnum() else "_" for c in label)[:60]


def _kernel(kind: _KindPlan, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None,
            infos: tuple[Modifier, Modifier], block: tuple[int, int], *, label):
    """The compiled kernel of a call: its kind's, with the shape parts that decide static shapes
    (see the module docstring); ``(kernel, key in _KERNELS, key without the CPU shape part)``;
    ``label()`` names a new kernel.
    Inside a caller's torch.compile, the kernel body itself (traced into the caller's graph)."""
    st, static, key = kind.structure, kind.static, kind.kind
    if torch.compiler.is_compiling():
        if q.device.type == "cuda" and needs_main_kernel(q, k, v, mask, bias):
            # Traced into a caller's graph (static shapes), such a call gave wrong outputs for
            # every sequence but the first (H100, torch 2.11: 16 x 131,072 keys of 8 x 128
            # heads, key-padded; with the lists of full blocks, an illegal memory access), where
            # flexflash's own compiled kernels compute it exactly.
            raise NotImplementedError(
                f"flexflash: a CUDA call of fewer than 128 queries with an input past 2**31 - 1 elements (q "
                f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}) is not supported inside torch.compile: "
                "traced into a compiled graph it gave wrong results; call flexflash.attention outside "
                "torch.compile for it (torch.compiler.disable), where it is computed exactly")
        return functools.partial(_flex_kernel, static=static), key, key
    static_mask_bias = (False, False)
    if q.device.type == "cuda" and _STATIC_SEQUENCE_BUFFERS:
        static_mask, static_bias = _static_sequence_buffers(st, static.split_keys)
        if static_mask or static_bias:
            # Such buffers compile with static shapes (see _STATIC_SEQUENCE_BUFFERS): a kind per
            # shape, for the first _STATIC_BUFFER_SHAPES shapes of the kind; further shapes share
            # one kernel of symbolic shapes.
            shape = (tuple(mask.shape) if static_mask else None, tuple(bias.shape) if static_bias else None)
            shapes = _STATIC_SHAPES.setdefault(key, set())
            if shape in shapes or len(shapes) < _STATIC_BUFFER_SHAPES:
                shapes.add(shape)
                key += (shape,)
                static_mask_bias = (static_mask, static_bias)
    if (q.device.type == "cuda" and _STATIC_FIRST_SHAPE and q.shape[-2] > block[0]
            and k.shape[-2] > block[1]):
        # The kind's first shape compiles with static shapes, as torch.compile does by default:
        # a symbolic kernel's call reads each symbolic size through Dynamo before launching
        # (H200, torch 2.11, B=32 H=16 N=512 D=128 bf16, document mask: 27 sizes, about 150 µs a
        # call on the host, more than the kernel's own time). Every other shape takes the kind's
        # one symbolic kernel. Not for lengths of one block: their block masks are padded to two
        # blocks (_at_least_two), which FlexAttention's lowering of static shapes rejects
        # (torch 2.11: "NoValidChoicesError" at 97 queries).
        signature = _signature((q, k, v, mask, bias, *infos[0].tensors, *infos[1].tensors))
        if _FIRST_SHAPES.setdefault(key, signature) == signature:
            key += ("first shape",)
    static_batch = _STATIC_DECODING_BATCH and kind.decoding
    if static_batch:
        # A kernel per batch, its batch static (see _STATIC_DECODING_BATCH). In one kernel, a
        # recompilation for a new batch would make the batch symbolic (Dynamo makes the sizes that
        # changed symbolic), and FlexAttention's lowering then runs its main kernel: an H100
        # decoding step of batch 8 after one of batch 1 took 1.2 ms in it, against 0.1 ms in the
        # decoding kernel. A kernel of its own per batch also keeps each batch's graphs within
        # Dynamo's recompile limit of one code object.
        key += ("decoding", q.shape[0])
    shapeless_key = key
    # The emptiness test spares hashing the key on every CPU call.
    cpu_static = q.device.type == "cpu" and bool(_CPU_STATIC_KINDS) and shapeless_key in _CPU_STATIC_KINDS
    if q.device.type == "cpu":
        key += (_cpu_static_shapes(st, mask, bias, infos[0], infos[1], every=cpu_static),)
    kernel = _KERNELS.get(key)
    if kernel is None:
        kernel = _KERNELS[key] = _Kernel(static, label(), static_mask_bias=static_mask_bias,
                                         every_buffer_static=cpu_static, mode=_MODE[0],
                                         static_shapes=key[-1] == "first shape", static_batch=static_batch)
        _STATS["kernels"] += 1
    return kernel, key, shapeless_key


def _without_full_blocks(kind: _KindPlan, q: Tensor, rows, block: tuple[int, int]) -> bool:
    """Whether a call's block mask goes to the kernel without its lists of full blocks (empty for
    fewer rows than a query block): eager calls that run FlexAttention's decoding kernel
    (``kind.decoding``), and CUDA calls traced into a caller's graph with a static query length
    below a query block, which FlexAttention's lowering gives its decoding kernel where their batch
    is static (compared without a guard, ``statically_known_true``: a symbolic length answers False)."""
    if _DECODING_FULL_BLOCKS:
        return False
    return kind.decoding or (torch.compiler.is_compiling() and q.device.type == "cuda"
                             and statically_known_true(rows < block[0]))


def _kernel_inputs(kind: _KindPlan, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None,
                   mask_mod, score_mod, mask_info: Modifier, block: tuple[int, int], *, causal: bool,
                   q_len: int, dropout: Draw | None, blocks=None, backward: bool = True) -> tuple:
    """The compiled kernel's arguments: ``(q, k, v, blocks, offset, mask, bias, mask_mod,
    score_mod, drop)``, masks and biases in the kernel's layout, the block mask (cached), the causal
    offset and dropout's seed, hash words and scale. ``q_len``: the call's query length (``q`` may
    have a padded second row: Structure.single_query); ``blocks``: see :func:`_run_flex`;
    ``backward``: whether the call may be differentiated (else the block mask is forward-only)."""
    st, split_keys = kind.structure, kind.static.split_keys
    tracing = torch.compiler.is_compiling()
    B, Hq, Nq, Nk = q.shape[0], q.shape[1], q_len, k.shape[-2]
    rows = q.shape[-2]
    offset = None
    if causal and tracing and not st.causal_aligned:
        offset = Nk - Nq  # a size expression, inside the caller's graph
    elif causal and not st.causal_aligned:
        offset = _scalar_tensor(Nk - Nq, torch.int32, q.device)
    if blocks is not None:
        blocks = blocks(st, q)
    elif st.masked:
        blocks = _block_tensors(st, Nk - Nq, mask, mask_mod, mask_info, B, Hq, rows, Nk, block, q.device,
                                q=q, k=k, offset_tensor=offset)
    if blocks is not None and _without_full_blocks(kind, q, rows, block):
        # Fewer query rows than a query block: no block is fully allowed (the query block is
        # incomplete), and the empty lists of full blocks, given at all, make FlexAttention's
        # decoding kernel split the whole key length over its programs (HAS_FULL_BLOCKS) rather
        # than each sequence's own key blocks (torch 2.11-2.13, flex_decode's TILE_KV): without
        # them a shorter sequence's programs walk fewer blocks. (flexflash._paged does the same.)
        blocks = (blocks[0], blocks[1], None, None, blocks[4], blocks[5], None, None)
    if blocks is not None and not backward:
        # Without a backward pass the kernel reads the key-block lists alone: the query-block lists
        # stay out (FlexAttention's forward-only block masks), fewer inputs whose sizes a call of
        # the symbolic kernel reads through Dynamo.
        blocks = (*blocks[:4], None, None, None, None)
    if q.device.type == "cuda" or tracing:
        # The compiled kernels index masks and biases by their full dimensions only (no constant
        # indices, which FlashAttention-4 cannot generate code for); traced into a caller's graph,
        # the call indexes them the same way.
        mask = _kernel_layout(mask, st.mask_full, split_keys[0])
        bias = _kernel_layout(bias, st.bias_full, split_keys[1])
    drop = None
    if dropout is not None:
        words = _dropout_words(dropout.params, B, Hq, rows, Nk, q.device, dropout.offsets)
        drop = (dropout.params, words, _scalar_tensor(1.0 / (1.0 - dropout.p), torch.float32, q.device))
    if tracing and q.device.type == "cpu" and not _grad(q, k, v, bias):
        # FlexAttention's CPU lowering rejects a query, key and value that are views of one buffer
        # (torch 2.11: "Unsupported for now if query, key, value are the same buffer", for a fused
        # qkv projection or attention(x, x, x)) or views of a 2-D projection (torch 2.13: "not
        # enough values to unpack (expected 4, got 2)", FlashAttentionTwo's key and value): inside
        # a caller's graph they get buffers of their own (copies of O(N * D); the attention is
        # O(N^2 * D)). All three: the lowering reads the query's buffer as 4-D.
        # Outside a caller's graph they are distinct inputs of the compiled kernel already. (CPU
        # calls that need gradients do not come here: they take the tiled path.)
        q, k, v = (torch.ops.flexflash.copy_apart(t, i) for i, t in enumerate((q, k, v)))
    return q, k, v, blocks, offset, mask, bias, mask_mod, score_mod, drop
