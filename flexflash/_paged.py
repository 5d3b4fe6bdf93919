"""Keys and values read in place from a pool of pages (a paged KV cache): FlexAttention over the
whole pool as a batch of one, with a block mask whose key blocks are each sequence's pages.

A call describes its keys logically. Sequence ``s`` (a row of the page table) has the keys
``0 .. L * page - 1``, its logical page ``j`` stored in physical page ``table[s, j]`` of the pool
``(num_pages * page, ...)``. Either each sequence is a batch element of the call (decoding: query
batch ``b`` is sequence ``b``), or the sequences are laid end to end along the keys of a batch of
one (``flat``: packed variable-length sequences, sequence ``s`` at keys ``s * L * page`` on,
each query reading the pages of its own sequence, ``row(b, q_idx)``). The call's masks and
modifiers are written over logical key indices.

The block mask's flags are evaluated over the logical keys (on CUDA from a kind's second call by a
compiled builder of its own, :class:`_PagedBuilder`; otherwise eagerly, in query chunks), then
mapped to the physical blocks that hold them and listed (:func:`physical_blocks`); the kernel reads
the pool in place (FlexAttention broadcasts a key/value batch of one over the queries' batch) and evaluates
the masks and modifiers at the logical index of each physical key, through the inverse of the
table. Nothing of the size of the keys is copied, where a gather of every sequence's pages
copies the whole cache per call.

Only the entries of the table marked ``valid`` are read (the rest may hold anything, as
flash-attn allows); a page appears at most once among a sequence's valid entries (pages may be
shared between sequences). Forward only: the callers gather the pages where gradients are needed
(FlexAttention's backward for a key/value batch of one writes the gradient of the whole pool for
every query batch element before summing, torch 2.13's lowering: larger than the gathered copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import _torch_private
from ._blockmask import (_BUILDERS, _COMPILED_BUILDS_FROM, _at_least_two, _block_mask_tensors, _fused_flags,
                         _mask_flags, _MaskBuilder)
from ._checks import validate
from ._compose import Structure, compose_mask
from ._fingerprint import inspect_modifier
from ._flex import run_flex
from ._kinds import decoding_shape, flex_kind

__all__ = ["Pages", "kv_block", "paged_attention", "reads_in_place"]

# The smallest key block of the block mask for which a device reads pages in place (a key block
# lies within one page: its size divides the page). On CUDA the tuned kernels' tiles are up to
# 128 wide (flexflash._tuning). CPU calls are not paged in place by default: the caller's gather
# and SDPA's CPU kernel need no compilation. (Tests switch it on; traced into a caller's graph there,
# Inductor's CPU code generation failed on the block flags and captured buffers, torch 2.13: those
# tests trace with the aot_eager backend.)
IN_PLACE_MIN_BLOCK: dict[str, int] = {"cuda": 128}
_MAX_KV_BLOCK = 128
# The dtypes read in place, per device, by every call; IN_PLACE_DECODING_DTYPES, by decoding calls
# traced into a caller's torch.compile and by eager ones whose gather would copy at least
# IN_PLACE_EAGER_ELEMENTS elements of each cache (see kv_block). On CUDA, bfloat16 pages are read in
# place by those calls only:
# - a packed bfloat16 call of 340 queries read in place (FlexAttention's main kernel over the pool,
#   D = 64) found no kernel configuration within the H100's shared memory ("No valid triton configs
#   ... Required: 264192 Hardware limit: 232448", torch 2.11), where the decoding calls agree with
#   the reference as closely as gathered ones (tests/test_flash_attn_compat.py::
#   test_pages_read_in_place_on_gpu);
# - traced into a caller's graph (test_a_decoding_step_under_reduce_overhead_on_gpu; within 2.5e-4
#   of the eager call at batch 8 and 64, cache 8k, H100) a decoding step read in place took 0.480 /
#   2.358 ms at batch 8 / 64 against 0.603 / 3.755 ms gathered (tools/decode_profile.py, one process;
#   both steps then also copied the cache into the CUDA graph's memory, benchmarks/NOTES.md);
# - an eager decoding call read in place pays host time for a block-mask build and a second compiled
#   call that the gather does not, about 0.5 ms a step on an H100's host, where the gather's copy
#   grows with the cache: eager steps (GQA 32/8, D = 128, cache 8k, spread lengths; one process,
#   tools/eager_host_profile.py --paged-batches) took 0.67 / 0.82 / 1.33 ms in place at batch
#   1 / 8 / 64, against 0.17 / 0.35 / 2.23 ms gathered (the gather's copy alone: 0.02 / 0.18 / 1.46
#   ms). Eager decoding calls read in place where the gather would copy at least
#   IN_PLACE_EAGER_ELEMENTS elements of each cache (2**28: batch 32 at cache 8k, heads 8 x 128;
#   the two lines of those figures cross near batch 24), and gather smaller caches;
# - float16 pages have not been read in place on a GPU.
# Those calls gather their pages.
IN_PLACE_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "cuda": (torch.float32,), "cpu": (torch.float16, torch.bfloat16, torch.float32)}
IN_PLACE_DECODING_DTYPES: dict[str, tuple[torch.dtype, ...]] = {"cuda": (torch.bfloat16,)}
IN_PLACE_EAGER_ELEMENTS: dict[str, int] = {"cuda": 2**28}


def _pool(cache: Tensor) -> Tensor:
    """A paged cache ``(num_pages, page, Hkv, D)`` as the key/value batch of one that the kernel
    reads, ``(1, Hkv, num_pages * page, D)`` (a view)."""
    return cache.flatten(0, 1).transpose(0, 1).unsqueeze(0)


def kv_block(page: int, q: Tensor, return_lse: bool, k_cache: Tensor, table: Tensor) -> int | None:
    """The key block of a call with pages of ``page`` tokens, or None where its device does not read
    such pages in place (see ``IN_PLACE_MIN_BLOCK``), its dtype is not read in place there
    (``IN_PLACE_DTYPES``; ``IN_PLACE_DECODING_DTYPES`` where a call over the pool of ``k_cache`` has
    the shape of FlexAttention's decoding kernel, :func:`flexflash._kinds.decoding_shape`, and is
    traced into a caller's torch.compile or its gather would copy at least ``IN_PLACE_EAGER_ELEMENTS``
    elements of each cache: the pages of ``table``) or it asks for the log-sum-exp on CPU (which
    FlexAttention's CPU kernel does not return)."""
    device = q.device.type
    least = IN_PLACE_MIN_BLOCK.get(device)
    # The largest power of two up to 128 dividing the page (the block must divide it; blocks are
    # powers of two). A loop of comparisons rather than math.gcd: traced by a caller's torch.compile
    # with a symbolic page size (its graph compiled for caches of several shapes), each comparison is
    # a guard, where Dynamo cannot trace math.gcd of a symbolic size.
    block = _MAX_KV_BLOCK
    while page % block:
        block //= 2
    dtype_read = q.dtype in IN_PLACE_DTYPES.get(device, ()) or (
        q.dtype in IN_PLACE_DECODING_DTYPES.get(device, ())
        and (torch.compiler.is_compiling()
             or table.numel() * k_cache.shape[1:].numel() >= IN_PLACE_EAGER_ELEMENTS.get(device, 2**63))
        and decoding_shape(q, _pool(k_cache), (_MAX_KV_BLOCK, block), guarded=True))
    if least is None or block < least or not dtype_read or (return_lse and device == "cpu"):
        return None
    return block


def reads_in_place(q: Tensor, k_cache: Tensor, v_cache: Tensor, return_lse: bool, table: Tensor) -> bool:
    """Whether a call of ``q (B, Hq, Nq, D)`` reads paged caches ``(num_pages, page, Hkv, D)`` at the
    pages of ``table`` in place (else its caller gathers those pages): pages whose size the device's
    key block divides (:func:`kv_block`), caches of q's dtype whose pages lie end to end in memory,
    no gradients (see the module docstring)."""
    page = k_cache.shape[1]
    if kv_block(page, q, return_lse, k_cache, table) is None:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        return False
    return all(c.dtype == q.dtype and c.stride(0) == page * c.stride(1) for c in (k_cache, v_cache))


@dataclass(frozen=True)
class Pages:
    """Where each sequence's keys are (see the module docstring): ``table (S, L)`` integer,
    physical page of logical page ``j`` of sequence ``s``; ``page`` tokens a page; ``valid (S, L)``
    bool, the entries that are read; ``flat``: the sequences laid end to end along the keys of a
    batch of one, query ``q_idx`` reading sequence ``row(b, q_idx)``'s pages (else sequence ``b``)."""

    table: Tensor
    page: int
    valid: Tensor
    flat: bool = False
    row: Callable | None = None

    @classmethod
    def of(cls, table: Tensor, page: int, lengths: Tensor, *, flat: bool = False, row: Callable | None = None) -> Pages:
        """The pages of ``table`` holding each sequence's ``lengths`` keys (the entries read)."""
        valid = torch.arange(table.shape[1], device=table.device) * page < lengths[:, None]
        return cls(table, page, valid, flat, row)

    @property
    def keys(self) -> int:
        """The logical keys of a batch element."""
        S, L = self.table.shape
        return (S if self.flat else 1) * L * self.page

    def per_batch(self) -> tuple[Tensor, Tensor]:
        """``table`` and ``valid`` as rows per batch element of the call: ``(B, keys / page)``."""
        if self.flat:
            return self.table.reshape(1, -1), self.valid.reshape(1, -1)
        return self.table, self.valid


def _inverse(pages: Pages, num_pages: int) -> Tensor:
    """``(S, num_pages)`` int32: the logical page of each physical page in each sequence, -1 for
    pages a sequence does not use."""
    S, L = pages.table.shape
    j = torch.arange(L, device=pages.table.device)
    dest = torch.where(pages.valid, pages.table.long(), num_pages)  # entries not read: a spare column
    inv = torch.full((S, num_pages + 1), -1, dtype=torch.int32, device=pages.table.device)
    inv.scatter_(1, dest, j.to(torch.int32).expand(S, L).contiguous())
    return inv[:, :num_pages]


def _physical_mods(pages: Pages, inv: Tensor, mask_mod, score_mod):
    """The call's mask and score functions over physical key indices: each evaluated at the key's
    logical index (a key of a page its sequence does not use: masked, and evaluated at a clamped
    index that stays within the logical functions' tensors)."""
    # (Plain values and tensors alone are captured: the functions' fingerprints hold them, as
    # Dynamo's guards do; an object would make each call a kind of its own.)
    page, row, flat, per_row = pages.page, pages.row, pages.flat, pages.table.shape[1] * pages.page

    def logical(b, q_idx, kv_idx):
        s = b if row is None else row(b, q_idx)
        lp = inv[s, kv_idx // page]
        j = lp.clamp(min=0) * page + kv_idx % page
        return lp, (s * per_row + j if flat else j)

    def paged_mask(b, h, q_idx, kv_idx):
        lp, j = logical(b, q_idx, kv_idx)
        return (lp >= 0) & mask_mod(b, h, q_idx, j)

    paged_score = None
    if score_mod is not None:
        def paged_score(score, b, h, q_idx, kv_idx):
            return score_mod(score, b, h, q_idx, logical(b, q_idx, kv_idx)[1])
    return paged_mask, paged_score


def physical_blocks(table: Tensor, valid: Tensor, page: int, kvb: int, num_blocks, flags: tuple[Tensor, Tensor], *,
                    full_blocks: bool = True) -> tuple[Tensor | None, ...]:
    """FlexAttention's eight block-mask tensors over the physical key blocks (``num_blocks`` of the
    pool) from the ``flags`` (some allowed, all allowed; ``(B|1, H|1, R, C)``) of the logical block
    mask of a call whose batch element ``b`` reads the pages ``table[b]`` (``valid[b]`` of them;
    :meth:`Pages.per_batch`): the flags mapped through the table to the physical blocks, merged (a
    page shared by sequences in one query block is one physical block, visited once; partial for
    one and full for another: partial), and listed. Without ``full_blocks`` every visited block is
    partial (its mask evaluated) and the four tensors of full blocks are None: FlexAttention's
    decoding kernel, given full blocks, splits the work over the length of the whole key tensor
    (the pool) rather than over the blocks a query visits (torch 2.13's flex_decode template),
    which would leave all but the first of its splits without work. The lists of the backward
    pass (query blocks per key block) are None: paged calls are forward only, and over the pool
    those lists have a row per physical block of every batch element (at batch 64, cache 8k, an
    H100 took 1.5 ms a step to list them). (Traceable with symbolic sizes: the compiled builder,
    :class:`_PagedBuilder`.)"""
    some, every = flags
    table = table.long()
    B, L = table.shape
    per_page = page // kvb
    Hm, R, C = some.shape[1], some.shape[2], some.shape[3]
    c = torch.arange(C, device=table.device)
    lp = (c // per_page).clamp(max=L - 1)
    # Physical blocks, at least two as in flexflash's block masks (_block_mask_tensors): the lists
    # of key blocks are as wide (FlexAttention's CPU lowering asserts they cover the keys).
    width = _at_least_two(num_blocks)
    # A column of an entry that is not read may hold anything: never allowed (the logical mask
    # allows nothing there), mapped to a spare column all the same.
    used = valid[:, lp] & (c < L * per_page)
    phys = torch.where(used, table[:, lp] * per_page + c % per_page, width)
    phys = torch.where((phys >= 0) & (phys < num_blocks), phys, width)
    shape = (B, Hm, R, C)
    cols = phys[:, None, None, :].expand(shape)

    def scattered(on: Tensor) -> Tensor:  # (B, Hm, R, width): any set flag of a column
        dense = torch.zeros(B, Hm, R, width + 1, dtype=torch.int32, device=table.device)
        return dense.scatter_add_(3, cols, on.expand(shape).to(torch.int32))[..., :width] > 0

    padded = R >= 2 if isinstance(R, int) else True  # (symbolic: the compiled builder's flags, at least two rows)
    if not full_blocks:  # every visited block: those with some allowed entry (a full block has some)
        return _block_mask_tensors(scattered(some), None, padded, q_lists=False)
    partial = scattered(some & ~every)
    full = scattered(every) & ~partial
    return _block_mask_tensors(partial | full, full, padded, q_lists=False)


@dataclass(frozen=True)
class _PagedStatic:
    """Constants of a compiled paged block-mask builder: the logical mask's structure (for
    :func:`compose_mask`), the block sizes, the page and key-block sizes, whether full blocks are
    listed."""

    structure: Structure
    block: tuple[int, int]
    page: int
    kvb: int
    full_blocks: bool


def _build_paged_blocks(q, pool, table, valid, mask_mod, static: _PagedStatic):
    """The compiled body of a paged block-mask builder: the logical mask's flags over ``table``'s
    keys (one fused evaluation, :func:`_fused_flags`) mapped to the blocks of the ``pool`` (read
    for its length) and listed (:func:`physical_blocks`)."""
    B, H, rows = q.shape[0], q.shape[1], q.shape[2]
    keys = table.shape[1] * static.page
    fn = compose_mask(static.structure, None, None, mask_mod)
    flags = _fused_flags(fn, B, H, rows, keys, static.block, q.device)
    return physical_blocks(table, valid, static.page, static.kvb, pool.shape[2] // static.kvb, flags,
                           full_blocks=static.full_blocks)


class _PagedBuilder(_MaskBuilder):
    """A compiled copy of :func:`_build_paged_blocks` per kind of paged call, sizes dynamic (as
    flexflash's block-mask builders: :class:`flexflash._blockmask._MaskBuilder`)."""

    body, prefix = staticmethod(_build_paged_blocks), "flexflash_paged_blocks"

    @staticmethod
    def _sizes_only(q, pool, table, valid, mask_mod):
        return q.detach(), pool.detach(), table, valid, mask_mod

    def _marked(self, q, pool, table, valid, mask_mod):
        # Marks on aliases, except ``valid``, which the mask function reads too: the same tensor
        # twice, as in every later call (Dynamo guards on which inputs are the same tensor); it is
        # marked as the mask function's tensors are.
        q, pool, table = (t.view(t.shape) for t in (q, pool, table))
        for t, dims in ((q, (0, 2)), (pool, (2,)), (table, (0, 1))):
            for dim in dims:
                if t.shape[dim] > 1:
                    _torch_private.maybe_mark_dynamic(t, dim)
        return q, pool, table, valid, mask_mod


def _paged_builder(static: _PagedStatic, mask_fp) -> _PagedBuilder:
    key = ("paged", static, mask_fp)  # beside flexflash's block-mask builders (forgotten with them)
    builder = _BUILDERS.get(key)
    if builder is None:
        builder = _BUILDERS[key] = _PagedBuilder(static, f"{len(_BUILDERS)}")
    return builder


# Devices on which paged block masks are built by a compiled builder (from a kind's second build
# on, as flexflash's block masks: _COMPILED_BUILDS_FROM): CUDA, where a decoding step's eager build
# is a hundred small kernels. (Tests add the CPU.) Inside a caller's torch.compile, on the devices
# of TRACED_BUILDS_ON, the builder's body is traced into the caller's graph (as
# flexflash._blockmask.TRACED_FUSED_ON says for flexflash's block masks): CUDA.
COMPILED_BUILDS_ON = {"cuda"}
TRACED_BUILDS_ON: set[str] = {"cuda"}


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, pages: Pages, *, mask_mod, score_mod, scale,
                    return_lse: bool) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of ``q (B, Hq, Nq, D)`` to keys and values read in place from the paged caches
    ``k_cache``/``v_cache`` ``(num_pages, page, Hkv, D)`` at the pages of ``pages`` (a call
    :func:`reads_in_place` accepts); ``mask_mod`` (or None) and ``score_mod`` over logical key
    indices (``kv_idx < pages.keys``). Returns as :func:`flexflash.attention`: ``out``, or
    ``(out, lse)`` with ``return_lse``."""
    kvb = kv_block(pages.page, q, return_lse, k_cache, pages.table)
    if kvb is None:
        raise ValueError(f"page: {pages.page} tokens a page are not read in place on {q.device.type} "
                         f"({q.dtype}); expected a call reads_in_place accepts")
    k_pool, v_pool = _pool(k_cache), _pool(v_cache)
    B, Hq = q.shape[:2]
    num_pages, keys, page = k_cache.shape[0], pages.keys, pages.page
    table, valid = pages.per_batch()

    def logical_mask(b, h, q_idx, kv_idx):  # keys of valid entries alone (never another sequence's pages)
        ok = valid[b, kv_idx // page]
        return ok if mask_mod is None else ok & mask_mod(b, h, q_idx, kv_idx)

    paged_mask, paged_score = _physical_mods(pages, _inverse(pages, num_pages), logical_mask, score_mod)
    # Checked as a call of flexflash.attention with the pool broadcast over the batch (views).
    p, infos, _ = validate(q, k_pool.expand(B, *k_pool.shape[1:]), v_pool.expand(B, *v_pool.shape[1:]),
                           causal=False, mask=None, bias=None, mask_mod=paged_mask, score_mod=paged_score,
                           scale=scale, dropout_p=0.0, block_size=(_MAX_KV_BLOCK, kvb), kernel_options=None,
                           return_lse=return_lse, backend="flex")
    q, k_pool, v_pool = (t.detach() for t in (q, k_pool, v_pool))

    def blocks(st, q_rows: Tensor):
        rows, st = q_rows.shape[2], st.without_score_mod()
        # Calls of fewer queries than a query block (decoding) run FlexAttention's decoding kernel
        # (on CUDA, with a static batch): no full blocks for it (see physical_blocks).
        full_blocks = rows >= p.block[0]
        tracing = torch.compiler.is_compiling()
        if q.device.type in (TRACED_BUILDS_ON if tracing else COMPILED_BUILDS_ON):
            static = _PagedStatic(st, p.block, page, kvb, full_blocks)
            if tracing:
                # Inside a caller's graph, the builder's body itself: the mask evaluated over the
                # query rows there are, fused into the block reductions (the chunked evaluation
                # below pads a decoding step's one query to a whole query block of rows).
                return _build_paged_blocks(q_rows, k_pool, table, valid, logical_mask, static)
            builder = _paged_builder(static, inspect_modifier(logical_mask).fp)
            builder.builds += 1
            if builder.builds >= _COMPILED_BUILDS_FROM:
                return builder(q_rows, k_pool, table, valid, logical_mask)  # valid: the mask's own
        # The flags of the logical mask, evaluated in query chunks (its tensors are new at every
        # decoding step: nothing to cache), mapped to the pool's blocks and listed once.
        flags = _mask_flags(compose_mask(st, None, None, logical_mask), B, Hq, rows, keys, p.block, q.device)
        return physical_blocks(table, valid, page, kvb, num_pages * page // kvb, flags, full_blocks=full_blocks)

    kind = flex_kind(q, k_pool, v_pool, causal=False, mask=None, bias=None, mask_mod=paged_mask,
                     score_mod=paged_score, infos=infos, scale=p.scale, block=p.block, kernel_options=None,
                     return_lse=return_lse, dropout=False)
    out, lse = run_flex(q, k_pool, v_pool, causal=False, mask=None, bias=None, mask_mod=paged_mask,
                        score_mod=paged_score, scale=p.scale, block=p.block, kernel_options=None, return_lse=return_lse,
                        mask_info=infos[0], score_info=infos[1], kind=kind, blocks=blocks)
    return (out, lse) if return_lse else out
