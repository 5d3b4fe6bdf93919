"""Cost breakdown of the dropout scheme on raw FlexAttention (static shapes), H100-sized causal case.

Kernels timed, forward and forward+backward (medians of ``triton.testing.do_bench``):

* the plain causal kernel (what a dropout-free call runs on the FlexAttention path);
* the kept pass with the drop decision in the *mask* function: every visited block must then be
  partial (dropout reaches into every block), so the mask runs on every tile;
* the kept pass with the drop decision in the *score* function (dropped entries to ``-inf``) over
  the ordinary block mask: fully allowed blocks stay on the kernel's full-block path;
* the undropped log-sum-exp pass (16-wide zero value);

each with FlexAttention's default tiles and with the options in ``flexflash._tuning``.
Usage on a CUDA machine: ``python tools/gpu_dropout_breakdown.py [--n 4096]``.
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, flex_attention
from triton.testing import do_bench

from flexflash import _tuning, dropout


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4096)
    args = parser.parse_args()
    B, H, N, D, dev = 4, 16, args.n, 128, "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
               for _ in range(3))
    d_out = torch.randn_like(q)

    def causal(b, h, i, j):
        return j <= i

    normal = create_block_mask(causal, None, None, N, N, device=dev)
    nb = N // 128
    visited = torch.ones(nb, nb, dtype=torch.bool, device=dev).tril()[None, None]
    num = visited.sum(-1, dtype=torch.int32)
    idx = torch.argsort(visited.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)

    params = dropout.draw_seed(0.1, dev)
    rows = torch.arange(B * H * N, device=dev, dtype=torch.int32)
    r1, r2 = dropout.row_words(params, 1, rows // N, torch.zeros_like(rows), rows % N)
    r1, r2 = r1.view(B, H, N), r2.view(B, H, N)
    col = dropout.column_word(params, torch.arange(N, device=dev, dtype=torch.int32))
    thr = params[3]

    def keep(b, h, i, j):
        return dropout.entry_keep(r1[b, h, i], r2[b, h, i], col[j], thr)

    def keep_mask(b, h, i, j):
        return (j <= i) & keep(b, h, i, j)

    def keep_score(score, b, h, i, j):
        return torch.where(keep(b, h, i, j), score, -float("inf"))

    all_partial = BlockMask.from_kv_blocks(num, idx, None, None, BLOCK_SIZE=128, mask_mod=keep_mask, seq_lengths=(N, N))
    all_partial_causal = BlockMask.from_kv_blocks(num, idx, None, None, BLOCK_SIZE=128, mask_mod=causal,
                                                  seq_lengths=(N, N))
    kept_opts, lse_opts = (dict(o) for o in _tuning.dropout_pass_options(q.device, q.dtype, D, (128, 128)))
    zero_v = torch.zeros(B, H, N, 16, device=dev, dtype=torch.bfloat16)

    variants = [
        ("causal, normal block mask", v, normal, None, None),
        ("causal, every block partial", v, all_partial_causal, None, None),
        ("kept pass: mask fn, default", v, all_partial, None, None),
        ("kept pass: mask fn, tuned", v, all_partial, None, kept_opts),
        ("kept pass: score fn, default", v, normal, keep_score, None),
        ("kept pass: score fn, tuned", v, normal, keep_score, kept_opts),
        ("kept pass: score fn, 128x64 w8", v, normal, keep_score,
         {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 2}),
        ("lse pass, default", zero_v, normal, None, None),
        ("lse pass, tuned", zero_v, normal, None, lse_opts),
    ]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, B={B} H={H} N={N} D={D} bf16, ms")
    for name, val, bm, score, opts in variants:
        # The variants share one lambda's code object: start each from an empty Dynamo cache, or the
        # ninth graph would run FlexAttention's unfused fallback.
        torch._dynamo.reset()
        fn = torch.compile(lambda q, k, val=val, bm=bm, score=score, opts=opts: flex_attention(
            q, k, val, block_mask=bm, score_mod=score, kernel_options=opts, return_aux=AuxRequest(lse=True)))

        def fwd():
            return fn(q, k)

        def fwd_bwd():
            out, aux = fn(q, k)
            if val is zero_v:  # the lse pass: its gradient comes through the log-sum-exp
                torch.autograd.backward([aux.lse, out], [torch.ones_like(aux.lse), torch.zeros_like(out)])
            else:
                torch.autograd.backward([out, aux.lse], [d_out, torch.zeros_like(aux.lse)])

        try:
            fwd(), fwd_bwd()
            torch.cuda.synchronize()
            a = do_bench(fwd, warmup=20, rep=100, return_mode="median")
            b = do_bench(fwd_bwd, warmup=10, rep=60, return_mode="median")
            print(f"{name:34} fwd {a:7.3f}  fwd+bwd {b:7.3f}", flush=True)
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is reported, not fatal
            print(f"{name:34} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)


if __name__ == "__main__":
    main()
