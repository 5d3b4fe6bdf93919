"""Block masks: FlexAttention's block-sparsity tensors of a call, built on CUDA by one compiled
builder per kind of mask, elsewhere eagerly in query chunks, and cached (by shape for masks of
indices alone, by the identity and version of the tensors a mask reads otherwise)."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _torch_private
from ._compiled import _LIB, _SERIAL, _STATS, _Counted, _own_code
from ._compose import Structure, compose_mask, squeeze_broadcast, tile_grids
from ._fingerprint import Modifier, captured_tensors
from ._torch_private import _mark_squeezed_dynamic, _with_dynamic_sizes, _without_duck_sizing

_MASK_CHUNK_ELEMENTS = 1 << 24  # mask entries evaluated at once when building a block mask
_BLOCK_MASK_CACHE_SIZE = 64
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


def _at_most(limit: int, n):
    """``min(limit, n)``: ``torch.sym_min`` where ``n`` is symbolic (no guard on which is smaller),
    Python's ``min`` where it is an int."""
    return min(limit, n) if isinstance(n, int) else torch.sym_min(limit, n)


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
    # Rows evaluated per query block: all of a block, or where there are fewer queries, those (at
    # least two, so that no size is 1, a size Dynamo would specialise on) rather than the whole
    # block: a decoding step's one query evaluates 2 rows a block, not 128. Such a block is
    # incomplete, never "all allowed", as in the eager flags.
    rows = _at_least_two(_at_most(qb, Nq)) if qb >= 2 else qb

    def ar(n):
        return torch.arange(n, device=device, dtype=torch.int32)

    i = (ar(rq).view(rq, 1) * qb + ar(rows).view(1, rows)).view(1, 1, rq, rows, 1, 1)
    j = ar(rk * kb).view(1, 1, 1, 1, rk, kb)
    m = mask_fn(ar(B).view(B, 1, 1, 1, 1, 1), ar(H).view(1, H, 1, 1, 1, 1),
                torch.clamp(i, max=Nq - 1), torch.clamp(j, max=Nk - 1))
    m = m & (i < Nq) & (j < Nk)
    complete = ((ar(rq) + 1) * qb <= Nq).view(rq, 1)
    return m.any(dim=5).any(dim=3), m.all(dim=5).all(dim=3) & complete


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


def _block_mask_tensors(some: Tensor, every: Tensor | None, padded: bool = False, q_lists: bool = True) -> tuple:
    """FlexAttention's eight BlockMask tensors from block flags; ``padded``: the flags have one
    shape and at least two blocks per dimension already (:func:`_fused_flags`, compiled), so
    neither the broadcast nor the padding runs (each would compare symbolic sizes, which is where
    guards on a one-block length come from). ``every`` None: no block is listed as full (every
    visited block partial), and the lists of full blocks are None. Without ``q_lists`` the tensors
    that only the backward pass reads (the query blocks of each key block) are None, as in a
    BlockMask made with ``compute_q_blocks=False``: for block masks of forward-only calls."""
    full = None
    if every is None:
        partial = some
    elif padded:
        partial, full = some & ~every, every
    else:
        partial, full = torch.broadcast_tensors(some & ~every, every)
    if not padded:
        nqb, nkb = partial.shape[-2:]
        # At least two blocks per dimension: the extra rows are empty and never visited by the
        # kernel, and Dynamo then never specialises the kernel on a 1-block mask.
        pad = (0, max(0, 2 - nkb), 0, max(0, 2 - nqb))
        partial = F.pad(partial, pad)
        full = None if full is None else F.pad(full, pad)
    kv_num, kv_idx = _ordered(partial)
    full_kv_num, full_kv_idx = (None, None) if full is None else _ordered(full)
    if not q_lists:
        return kv_num, kv_idx, full_kv_num, full_kv_idx, None, None, None, None
    q_num, q_idx = _ordered(partial.transpose(-1, -2))
    full_q_num, full_q_idx = (None, None) if full is None else _ordered(full.transpose(-1, -2))
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


# Devices on which block masks are built by flexflash's compiled builders (from a kind's
# _COMPILED_BUILDS_FROM-th block mask on): CUDA. Elsewhere (and before) the masks are evaluated in
# query chunks, which needs no compilation.
FUSED_ON = {"cuda"}
# Devices on which, inside a caller's torch.compile, the builders' body is traced into the caller's
# graph: the mask evaluated once over the query rows there are, fused into the block reductions,
# where the chunked evaluation pads a decoding step's one query to a whole query block of rows
# (128 times the work): CUDA (its GPU tests are the reduce-overhead steps of
# tests/test_flash_attn_compat.py; on an H100 a compiled batch-64 decoding step took 0.662 ms
# against 0.696 by the chunked evaluation, benchmarks/NOTES.md). Tests add the CPU (aot_eager).
TRACED_FUSED_ON: set[str] = {"cuda"}

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

    body, prefix = staticmethod(_build_blocks), "flexflash_blocks"  # (flexflash._paged builds its own)

    def __init__(self, static, label: str):
        self.static = static
        self.label = label
        self.builds = 0  # block masks of this kind built so far (see _COMPILED_BUILDS_FROM)
        self._fresh()

    def _fresh(self):
        self.compiled = False
        self.compiles = 0
        inductor = _torch_private.inductor_backend()

        def counting_backend(gm, example_inputs):
            self.compiles += 1
            return inductor(gm, example_inputs)
        self._fn = torch.compile(_own_code(self.body, f"{self.prefix}_{self.label}_{next(_SERIAL)}"),
                                 backend=counting_backend, fullgraph=True, dynamic=None)

    def __call__(self, *args):
        """The block tensors of a call: ``args`` are the body's inputs but its constants."""
        if self._budget_spent():
            # Past the limit Dynamo would evaluate the mask eagerly over the whole (B, H, Nq, Nk)
            # grid: start a fresh cache instead (as the kernels do).
            self._fresh()
        args = self._sizes_only(*args)
        if self.compiled:
            return _without_duck_sizing(self._fn, *args, self.static)
        args = self._marked(*args)
        tensors = _with_dynamic_sizes(captured_tensors(args[-1]), _without_duck_sizing, self._fn, *args, self.static)
        self.compiled = True  # compiled with symbolic sizes: later calls need no marks
        return tensors

    @staticmethod
    def _sizes_only(q, k, offset, mask, mask_mod):
        """The inputs, with those whose sizes alone are read detached (no autograd wrapper)."""
        return q.detach(), k.detach(), offset, mask, mask_mod

    def _marked(self, q, k, offset, mask, mask_mod):
        """The inputs of a first compilation, sizes marked dynamic on aliases (the marks must not
        leak into the caller's own compilations); the mask function last (its tensors are marked
        for the call by _with_dynamic_sizes)."""
        q, k, mask = (None if t is None else t.view(t.shape) for t in (q, k, mask))
        for t, dims in ((q, (0, 2)), (k, (0, 2))):
            for dim in dims:
                if t.shape[dim] > 1:
                    _torch_private.maybe_mark_dynamic(t, dim)
        _mark_squeezed_dynamic(mask, self.static.structure.mask_full)
        return q, k, offset, mask, mask_mod


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
        owned = _torch_private.version_of(t)
        if owned is None:
            return None
        root, version = owned
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
    ``k`` give it the sizes and the causal offset); inside a caller's torch.compile on the devices
    of ``TRACED_FUSED_ON`` the builder's body is traced into the caller's graph. Every other block
    mask (a kind's first outside a caller's graph, on CPU every one) is built eagerly from up to two parts
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
    if device.type in (TRACED_FUSED_ON if tracing else FUSED_ON):
        mask_st = st.mask_part()
        # (the builder's body indexes the mask by its full dimensions only, see run_flex)
        squeezed = None if mask is None else squeeze_broadcast(mask, st.mask_full)
        if tracing:
            # Inside a caller's graph, the compiled builder's body itself: the mask evaluated once,
            # fused into the block reductions, over the query rows there are (a decoding step's one
            # query: 2 rows a block, where the chunked evaluation below pads every block to its 128).
            return _build_blocks(q, k, offset_tensor, squeezed, mask_mod, _BuildStatic(mask_st, block))
        builder = _mask_builder(mask_st, mask_fp, block, mask)
        builder.builds += 1
        if builder.builds >= _COMPILED_BUILDS_FROM:
            tensors = builder(q, k, offset_tensor, squeezed, mask_mod)
            return _cache_put(key, tensors, roots) if cacheable else tensors
    some = every = None
    # the mask functions' part (causal, mask_mod), evaluated with the offset as a Python int
    fn_st = st.function_part()
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
