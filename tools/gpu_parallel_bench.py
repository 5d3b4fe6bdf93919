"""Sequence-sharded attention on two GPUs against one: causal, B=1, H=16, D=128, bf16, forward and
forward+backward, N = 32k, 64k, 128k (medians; tokens/s and the scaling ratio one-GPU time /
two-GPU time).

Usage on a machine with two CUDA devices: ``python tools/gpu_parallel_bench.py [--json PATH]
[--seq-lens 32768,65536,131072]``. It spawns two processes (NCCL); rank 0 also times the unsharded
call on its GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flexflash

B, H, D = 1, 16, 128


def _time(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    dist.barrier()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _worker(rank: int, store: str, seq_lens: list[int], out_path: str | None):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=2)
    mesh = init_device_mesh("cuda", (2,))
    rows = []
    for N in seq_lens:
        gen = torch.Generator(device="cuda").manual_seed(N)
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        dts = [distribute_tensor(t, mesh, [Shard(2)]).requires_grad_() for t in (q, k, v)]
        d_out = distribute_tensor(torch.randn_like(q), mesh, [Shard(2)])
        row = dict(N=N)
        for direction in ("fwd", "fwd+bwd"):
            def sharded():
                out = flexflash.attention(*dts, causal=True)
                if direction == "fwd+bwd":
                    torch.autograd.grad(out, dts, d_out)
            row[f"two_{direction}_ms"] = _time(sharded)
            if rank == 0:
                leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
                g = torch.randn_like(q)

                def single():
                    out = flexflash.attention(*leaves, causal=True)
                    if direction == "fwd+bwd":
                        torch.autograd.grad(out, leaves, g)
                # The other rank waits at the barrier inside _time while rank 0 measures alone.
                row[f"one_{direction}_ms"] = _time_alone(single)
            else:
                _time_alone(None)
        if rank == 0:
            for direction in ("fwd", "fwd+bwd"):
                one, two = row[f"one_{direction}_ms"], row[f"two_{direction}_ms"]
                row[f"scaling_{direction}"] = one / two
                row[f"tokens_per_s_two_{direction}"] = N / (two * 1e-3)
            print(f"N={N:7d}  fwd one {row['one_fwd_ms']:8.2f} ms  two {row['two_fwd_ms']:8.2f} ms  "
                  f"x{row['scaling_fwd']:.2f}   fwd+bwd one {row['one_fwd+bwd_ms']:8.2f}  two "
                  f"{row['two_fwd+bwd_ms']:8.2f}  x{row['scaling_fwd+bwd']:.2f}", flush=True)
            rows.append(row)
    if rank == 0 and out_path:
        with open(out_path, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
    dist.destroy_process_group()


def _time_alone(fn) -> float | None:
    """Rank 0 times ``fn`` while the other rank waits (no collective inside ``fn``)."""
    dist.barrier()
    result = None
    if fn is not None:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        result = statistics.median(times) * 1e3
    dist.barrier()
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--seq-lens", default="32768,65536,131072")
    args = parser.parse_args()
    seq_lens = [int(x) for x in args.seq_lens.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "store"), seq_lens, args.json), nprocs=2, join=True)


if __name__ == "__main__":
    main()
