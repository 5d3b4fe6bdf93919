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

``--options``: ``;``-separated sets of kernel options, each ``,``-separated ``NAME=int``
(``default``: none); ``SPLITxK`` multiplies FlexAttention's own ``SPLIT_KV``
(``SMs // (batch * kv_heads) * 2``, at least 1).
"""

from __future__ import annotations

import argparse
import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from decode_profile import bench, graphed_ms, kernels  # this folder's: the benchmark's shapes, compiled steps timed

BLOCK = 128


def parse_options(text: str) -> list[tuple[str, dict]]:
    sets = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        opts = {} if part == "default" else {k: int(v) for k, v in (x.split("=") for x in part.split(","))}
        sets.append((part, opts))
    return sets


def case(B: int, S: int, spread: bool, gen: torch.Generator):
    """q, k, v as flexflash reads flash-attn's layout (views), and the cache lengths."""
    lens = bench._lengths(B, S, spread, gen).cuda()
    k_cache, v_cache = (torch.randn(B, S, bench.HKV, bench.D, generator=gen).cuda().to(bench.DTYPE) for _ in range(2))
    q = torch.randn(B, 1, bench.HQ, bench.D, generator=gen).cuda().to(bench.DTYPE)
    return q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), lens


def block_mask(lens: torch.Tensor, S: int) -> BlockMask:
    """The step's block mask: each sequence's blocks up to its length, all partial (no full blocks)."""
    nkb = -(-S // BLOCK)
    num = ((lens + BLOCK - 1) // BLOCK).to(torch.int32).view(-1, 1, 1)
    idx = torch.arange(nkb, device=lens.device, dtype=torch.int32).expand(lens.shape[0], 1, 1, nkb).contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < lens[b]
    return BlockMask.from_kv_blocks(num, idx, None, None, BLOCK_SIZE=(BLOCK, BLOCK), mask_mod=mask_mod,
                                    seq_lengths=(1, S))


def gpu_us(step) -> float:
    """µs of GPU time a step's kernels take (all of them, summed), compiled in the default mode."""
    return sum(us for _, _, us in kernels(step, top=1000))


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
                bm = block_mask(lens, S)
                for name, opts in option_sets:
                    opts = dict(opts)
                    mult = opts.pop("SPLITx", None)
                    if mult:
                        opts["SPLIT_KV"] = max(1, sms // (B * bench.HKV) * 2) * mult
                    try:
                        def step(opts=opts):
                            return flex_attention(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=opts or None)
                        ms, out = graphed_ms(step)
                        err = (out.float() - ref.float()).abs().max().item()
                        row.append(f"{ms:.4f}" + (f" [{gpu_us(step):.0f}]" if args.kernel_time else "")
                                   + ("" if err < 0.02 else f" (err {err:.3f})"))
                    except Exception as e:  # a configuration the lowering rejects
                        row.append(f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                print(f"{B:>5} {S:>6} {lengths:>7} {sdpa_text:>8}  " + "  ".join(row), flush=True)

if __name__ == "__main__":
    main()
