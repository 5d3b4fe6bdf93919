"""FlexAttention's decoding kernel under other tiles: a decoding step (one query token, the cases
of ``benchmarks/test_decode.py``: GQA 32/8, D = 128, bf16, the key/value cache read through
flash-attn's ``(batch, seqlen, nheads_k, headdim)`` layout) of raw ``flex_attention`` for each
kernel option set given, against SDPA's step on the padded cache with a key padding mask.

Each step gets a block mask of its lengths that lists no full blocks (as flexflash's decoding calls
do) and is timed as ``tools/decode_profile.py`` times compiled steps (``graphed_ms``:
``mode="reduce-overhead"``, CUDA graphs, the step's tensors at static addresses), then, with
``--kernel-time``, also by the GPU time of its kernels (the profiler's device time per step, after
``[``): at batch 1 a step's time is mostly the host's replay of its graph, and the kernels' time
is what tile options change. It also prints Inductor's default decoding configuration for this
torch (``get_flex_decode_configs``).

Usage on a CUDA machine::

    python tools/decode_tiles.py [--batch 1,8,64] [--cache 8192,32768] [--lengths spread,full]
                                 [--options "default;BLOCK_N=128,num_stages=3,num_warps=4;..."]

``--options``: ``;``-separated sets of kernel options, each ``,``-separated ``NAME=VALUE``
(``default``: none), a value an int or a word (``BACKEND=FLASH``: FlashAttention-4's kernels, which
need the optional ``flash-attn-4`` package); ``SPLITx=K`` multiplies FlexAttention's own ``SPLIT_KV``
(``SMs // (batch * kv_heads) * 2``, at least 1); ``FULL=1`` lists the blocks wholly below each
length as full blocks (which ``BACKEND=FLASH`` requires; on torch 2.11 its kernels fail under CUDA
graphs, so only their GPU time is measured: ``--kernel-time``).
"""

from __future__ import annotations

import argparse
import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from decode_profile import bench, graphed_ms, kernels  # this folder's: the benchmark's shapes, compiled steps timed

BLOCK = 128


def _value(text: str) -> int | str:
    """An option's value: an int, or a word (``BACKEND=FLASH``)."""
    return int(text) if text.lstrip("-").isdigit() else text


def parse_options(text: str) -> list[tuple[str, dict]]:
    sets = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        opts = {} if part == "default" else {k: _value(v) for k, v in (x.split("=") for x in part.split(","))}
        sets.append((part, opts))
    return sets


def case(B: int, S: int, spread: bool, gen: torch.Generator):
    """q, k, v as flexflash reads flash-attn's layout (views), and the cache lengths."""
    lens = bench._lengths(B, S, spread, gen).cuda()
    k_cache, v_cache = (torch.randn(B, S, bench.HKV, bench.D, generator=gen).cuda().to(bench.DTYPE) for _ in range(2))
    q = torch.randn(B, 1, bench.HQ, bench.D, generator=gen).cuda().to(bench.DTYPE)
    return q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), lens


def block_mask(lens: torch.Tensor, S: int, full: bool = False) -> BlockMask:
    """The step's block mask: each sequence's blocks up to its length, all partial (no full blocks),
    or with ``full`` the blocks wholly below the length listed as full and only the last one, where
    the length ends inside it, as partial (FlashAttention-4's kernels take only block masks that
    list full blocks)."""
    nkb = -(-S // BLOCK)
    idx = torch.arange(nkb, device=lens.device, dtype=torch.int32).expand(lens.shape[0], 1, 1, nkb).contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < lens[b]
    if not full:
        num = ((lens + BLOCK - 1) // BLOCK).to(torch.int32).view(-1, 1, 1)
        return BlockMask.from_kv_blocks(num, idx, None, None, BLOCK_SIZE=(BLOCK, BLOCK), mask_mod=mask_mod,
                                        seq_lengths=(1, S))
    full_num = (lens // BLOCK).to(torch.int32).view(-1, 1, 1)
    num = (lens % BLOCK != 0).to(torch.int32).view(-1, 1, 1)
    partial_idx = (idx + full_num[..., None]).clamp(max=nkb - 1)  # the block the length ends in, first
    return BlockMask.from_kv_blocks(num, partial_idx, full_num, idx, BLOCK_SIZE=(BLOCK, BLOCK),
                                    mask_mod=mask_mod, seq_lengths=(1, S))


def gpu_us(step) -> float:
    """µs of GPU time a step's kernels take (all of them, summed), compiled in the default mode."""
    return sum(us for _, _, us in kernels(step, top=1000))


def _failed(e: Exception) -> str:
    return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"


def measure(step, ref: torch.Tensor, kernel_time: bool) -> str:
    """A step's cell: its graphed time (ms), with ``kernel_time`` its kernels' GPU time (µs, in
    brackets), and its largest difference from SDPA's output where that is 0.02 or more. The two
    are measured apart: a configuration may compile in one mode and fail in the other (torch
    2.11's FLASH kernels under CUDA graphs: "NameError: name 'arg5_1' is not defined"); then the
    output is the default mode's."""
    try:
        ms, out = graphed_ms(step)
        text = f"{ms:.4f}"
    except Exception as e:  # a configuration the lowering rejects
        text, out = "graphed " + _failed(e), None
    if kernel_time:
        try:
            text += f" [{gpu_us(step):.0f}]"
            if out is None:
                with torch.no_grad():
                    out = torch.compile(step, fullgraph=True)()
        except Exception as e:
            text += f" [{_failed(e)}]"
    if out is not None:
        err = (out.float() - ref.float()).abs().max().item()
        text += "" if err < 0.02 else f" (err {err:.3f})"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,8,64")
    ap.add_argument("--cache", default="8192,32768")
    ap.add_argument("--lengths", default="spread,full")
    ap.add_argument("--options", default="default")
    ap.add_argument("--kernel-time", action="store_true", help="also the kernels' GPU time per step (µs)")
    ap.add_argument("--max-elements", type=float, default=2**31 - 1, help="skip caches past this many elements")
    args = ap.parse_args()
    print("torch", torch.__version__, torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
    try:
        from torch._inductor.template_heuristics import triton as heuristics
        src = inspect.getsource(heuristics.CUDAConfigHeuristic.get_flex_decode_configs)
        print("Inductor's decoding configuration:\n" + "\n".join("  " + x for x in src.splitlines()[:30]))
    except Exception as e:  # (where the heuristics live moved between releases)
        print("Inductor's decoding configuration not found:", type(e).__name__, e)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    option_sets = parse_options(args.options)
    gen = torch.Generator().manual_seed(0)
    print(f"{'batch':>5} {'cache':>6} {'lengths':>7} {'SDPA':>8}  " + "  ".join(name for name, _ in option_sets))
    for B in map(int, args.batch.split(",")):
        for S in map(int, args.cache.split(",")):
            if B * S * bench.HKV * bench.D > args.max_elements:
                continue
            for lengths in args.lengths.split(","):
                q, k, v, lens = case(B, S, lengths == "spread", gen)
                positions = torch.arange(S, device="cuda")

                def sdpa():
                    mask = (positions[None, :] < lens[:, None])[:, None, None, :]
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
                sdpa_ms, ref = graphed_ms(sdpa)
                sdpa_text = f"{sdpa_ms:.4f}" + (f" [{gpu_us(sdpa):.0f}]" if args.kernel_time else "")
                row = []
                masks = {False: block_mask(lens, S), True: block_mask(lens, S, full=True)}
                for name, opts in option_sets:
                    opts = dict(opts)
                    bm = masks[bool(opts.pop("FULL", 0))]
                    mult = opts.pop("SPLITx", None)
                    if mult:
                        opts["SPLIT_KV"] = max(1, sms // (B * bench.HKV) * 2) * mult
                    def step(opts=opts, bm=bm):
                        return flex_attention(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=opts or None)
                    row.append(measure(step, ref, args.kernel_time))
                print(f"{B:>5} {S:>6} {lengths:>7} {sdpa_text:>8}  " + "  ".join(row), flush=True)

if __name__ == "__main__":
    main()
