"""Parallel mode on DTensor: 2 processes on CPU (gloo), each sharded configuration against the
unsharded call; the forward on the compiled path, training on the CPU training path. With two CUDA
devices, the same checks run with NCCL in bf16 (forward and backward)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flexflash
from flexflash import mods

WORLD = 2


def _close(a, b, what):
    # Sharding changes nothing but which rank computes a row (and, for sequence sharding, how the
    # gathered keys are laid out): fp32 results agree to rounding. That rounding is not bit-equal:
    # each rank multiplies matrices of other shapes (fewer batch entries, heads or rows), which the
    # CPU BLAS blocks and sums in another order; one CI run measured 4.4e-5 (1.4e-5 relative) in an
    # lse of about 3. A wrong shard (a key dropped or added) moves lse by more than 1e-2. In bf16 the
    # gradients of the keys and values are sums of per-rank partial gradients, each rounded to bf16
    # (2^-8 relative) before the sum: a few units in the last place.
    tol = 1e-4 if a.dtype == torch.float32 else 3e-2
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _cases(B, Hq, Hkv, Nq, Nk, gen, device="cpu", dtype=torch.float32):
    ids = torch.sort(torch.randint(0, 3, (B, Nk), generator=gen), dim=-1).values.to(device)
    yield "causal", dict(causal=True)
    yield "key padding + per-head bias", dict(mask=(torch.rand(B, Nk, generator=gen) > 0.3).to(device),
                                              bias=torch.randn(Hq, Nq, Nk, generator=gen).to(device, dtype))
    yield "alibi + causal", dict(score_mod=mods.alibi(Hq), causal=True)
    yield "document + causal", dict(mask_mod=mods.document(ids[:, Nk - Nq:], ids), causal=True)
    yield "4-D mask", dict(mask=(torch.rand(B, Hq, Nq, Nk, generator=gen) > 0.4).to(device))
    # Every call below starts from torch.manual_seed(0) on every rank: the shards drop exactly the
    # entries the unsharded call drops.
    yield "dropout + causal + key padding", dict(dropout_p=0.3, causal=True,
                                                 mask=(torch.rand(B, Nk, generator=gen) > 0.2).to(device))


def _check(placement, grads: bool, device: str = "cpu", dtype=torch.float32):
    from torch.distributed.tensor import distribute_tensor, init_device_mesh
    mesh = init_device_mesh(device, (WORLD,))
    gen = torch.Generator().manual_seed(7)
    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 37, 53, 16
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(device, dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=gen).to(device, dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=gen).to(device, dtype)
    for name, kw in _cases(B, Hq, Hkv, Nq, Nk, gen, device, dtype):
        what = f"{placement} {name} ({'training path' if grads else 'compiled forward'})"
        leaves = [t.clone().requires_grad_(grads) for t in (q, k, v)]
        dts = [distribute_tensor(t, mesh, [placement]) for t in leaves]
        if grads:
            dts = [d.detach().requires_grad_() for d in dts]
        def call(*args, **extra):
            torch.manual_seed(0)  # the dropout seed (the same on every rank)
            return flexflash.attention(*args, **kw, **extra)
        with torch.set_grad_enabled(grads):
            out = call(*dts)  # without grad and dropout: the compiled kernel on CPU
            want = call(*leaves)
            if not grads or device == "cuda":
                if not kw.get("dropout_p"):  # SDPA takes causal alone and a 4-D mask alone (on CPU)
                    assert flexflash.functional.route(*leaves, **kw) in ("flex", "sdpa")
                _, lse = call(*dts, return_lse=True)
                _, want_lse = call(*leaves, return_lse=True)
                assert lse.placements == dts[0].placements
                _close(lse.full_tensor(), want_lse, what + " lse")
        assert out.placements == dts[0].placements
        _close(out.full_tensor(), want, what + " out")
        if grads:
            g = torch.randn(want.shape, generator=gen).to(device, dtype)
            got = torch.autograd.grad(out.full_tensor(), dts, g)
            exp = torch.autograd.grad(want, leaves, g)
            for n, a, b in zip("qkv", got, exp):
                _close(a.full_tensor(), b, f"{what} d{n}")


def _check_mqa_heads():
    """One key/value head shared by all query heads, query heads sharded: every rank uses that head
    and its gradient sums over the ranks."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh
    mesh = init_device_mesh("cpu", (WORLD,))
    gen = torch.Generator().manual_seed(8)
    leaves = [torch.randn(2, h, 21, 16, generator=gen).requires_grad_() for h in (4, 1, 1)]
    dts = [distribute_tensor(t, mesh, [p]).detach().requires_grad_()
           for t, p in zip(leaves, (Shard(1), Replicate(), Replicate()))]
    out = flexflash.attention(*dts, causal=True, score_mod=mods.alibi(4))
    want = flexflash.attention(*leaves, causal=True, score_mod=mods.alibi(4))
    _close(out.full_tensor(), want, "MQA heads out")
    g = torch.randn(want.shape, generator=gen)
    for n, a, b in zip("qkv", torch.autograd.grad(out.full_tensor(), dts, g), torch.autograd.grad(want, leaves, g)):
        _close(a.full_tensor(), b, f"MQA heads d{n}")


def _check_modules(strategy: str):
    """FlashMHA and FlashAttentionTwo under parallelize(strategy) against the unsharded module with
    the same weights: outputs, input gradients and weight gradients (training path)."""
    import copy

    from torch.distributed.tensor import init_device_mesh
    from flexflash.parallel import parallelize
    mesh = init_device_mesh("cpu", (WORLD,))
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(11)
    B, N, Nk, E = 2, 13, 17, 32
    torch.manual_seed(0)
    mha = flexflash.FlashMHA(E, 4, causal=True)
    two = flexflash.FlashAttentionTwo(dim=E, heads=4, dim_head=8, causal=True)
    x, ctx = torch.randn(B, N, E, generator=gen), torch.randn(B, Nk, E, generator=gen)
    pad = torch.rand(B, Nk, generator=gen) > 0.3
    pad[:, 0] = True
    cases = [("FlashMHA self", mha, (x,), dict(key_padding_mask=torch.rand(B, N, generator=gen) > 0.8)),
             ("FlashAttentionTwo cross", two, (x,), dict(context=ctx, mask=pad))]
    if strategy == "heads":
        cases.append(("FlashMHA cross", mha, (x, ctx, ctx), dict(key_padding_mask=~pad)))
    for name, module, args, kw in cases:
        what = f"{strategy} {name}"
        ref = copy.deepcopy(module)
        par = parallelize(copy.deepcopy(module), mesh, strategy)
        inputs = [a.clone().requires_grad_() for a in args]
        ref_inputs = [a.clone().requires_grad_() for a in args]
        ref_kw = {k: (v.clone().requires_grad_() if k == "context" else v) for k, v in kw.items()}
        par_kw = {k: (v.clone().requires_grad_() if k == "context" else v) for k, v in kw.items()}
        want = ref(*ref_inputs, **ref_kw)
        if strategy == "sequence":  # each rank passes its contiguous sequence shard (dimension 1)
            def shard(t):
                size = -(-t.shape[1] // WORLD)
                return t[:, rank * size:(rank + 1) * size]
            local_in = [shard(a) for a in inputs]
            local_kw = {k: (shard(v) if k == "context" else v) for k, v in par_kw.items()}
            got = par(*local_in, **local_kw)
            _close(got, shard(want), what + " out")
            g = torch.randn(want.shape, generator=gen)
            want.backward(g)
            got.backward(shard(g))
            # every rank's input gradient covers its shard (other rows 0): sum over the ranks
            grads = [a.grad.clone() for a in inputs] + ([par_kw["context"].grad.clone()] if "context" in par_kw else [])
            for t in grads:
                dist.all_reduce(t)
        else:
            got = par(*inputs, **par_kw)
            _close(got, want, what + " out")
            g = torch.randn(want.shape, generator=gen)
            want.backward(g)
            got.backward(g)
            grads = [a.grad for a in inputs] + ([par_kw["context"].grad] if "context" in par_kw else [])
        ref_grads = [a.grad for a in ref_inputs] + ([ref_kw["context"].grad] if "context" in ref_kw else [])
        for i, (a, b) in enumerate(zip(grads, ref_grads)):
            _close(a, b, f"{what} input {i} grad")
        for (pname, p), (_, rp) in zip(par.named_parameters(), ref.named_parameters()):
            _close(p.grad.full_tensor(), rp.grad, f"{what} {pname}.grad")
            _close(p.full_tensor(), rp, f"{what} {pname} (unchanged layout)")


def _check_parallel_flag():
    torch.manual_seed(0)
    two = flexflash.FlashAttentionTwo(dim=32, heads=4, dim_head=8, parallel=True)
    torch.manual_seed(0)
    ref = flexflash.FlashAttentionTwo(dim=32, heads=4, dim_head=8)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    _close(two(x), ref(x), "FlashAttentionTwo(parallel=True)")


def _worker(rank: int, store_file: str):
    from torch.distributed.tensor import Replicate, Shard
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=WORLD)
    try:
        for placement in (Shard(0), Shard(1), Shard(2), Replicate()):
            _check(placement, grads=False)
            _check(placement, grads=True)
        _check_mqa_heads()
        _check_modules("heads")
        _check_modules("sequence")
        _check_parallel_flag()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sharded_equals_unsharded_on_two_cpu_processes():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "store"),), nprocs=WORLD, join=True)


def _gpu_worker(rank: int, store_file: str):
    from torch.distributed.tensor import Replicate, Shard
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store_file}", rank=rank, world_size=WORLD)
    try:
        for placement in (Shard(0), Shard(1), Shard(2), Replicate()):
            _check(placement, grads=True, device="cuda", dtype=torch.bfloat16)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason="needs two CUDA devices")
def test_sharded_equals_unsharded_on_two_gpus():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_gpu_worker, args=(os.path.join(tmp, "store"),), nprocs=WORLD, join=True)
