"""Kernel options chosen from measurements, in one place.

Each entry names the GPU, the case and the figures that chose it. An entry applies only where the
caller passed no ``kernel_options`` (a caller's options always win, whole); elsewhere FlexAttention's
own defaults stand. Under ``flexflash.set_compile_mode("max-autotune")`` the tiles below are not
passed (Inductor's autotuner chooses them); the generator choice still applies.

Dropout passes (H100 SXM, torch 2.11, bf16, B=4 H=16 N=4096 D=128, causal; raw FlexAttention,
medians in ms; ``tools/gpu_dropout_breakdown.py`` measures the same passes):

=========================  ======================  =========  =====================================
pass                       direction               default    chosen
=========================  ======================  =========  =====================================
kept entries (hash score)  forward                 1.056      0.921  BLOCK 64x64, 4 warps, 3 stages
                                                              (128x64, 8 warps, 2 stages: 1.155)
kept entries               forward+backward        3.829      3.788  (forward options as above)
undropped lse (16-wide v)  forward                 0.459      0.444  BLOCK 64x64, 4 warps, 3 stages
undropped lse              forward+backward        1.968      1.847  64x64 blocks, 4 warps, 3 stages
=========================  ======================  =========  =====================================

The kept pass evaluates the hash in its score function on every visited tile (integer work per
entry); smaller tiles keep more warps busy with it. Other head dims and dtypes were not measured
and keep the defaults.

Masked calls (a mask tensor or a mask_mod, no bias or score_mod, Triton kernels; H200, torch
2.11, bf16, B=4 H=16 N=4096 D=128, through flexflash, GPU time per call in ms from the profiler;
every variant compiled before any was timed):

==================  =======  ==========  ==========  ==========  ==========================
forward             default  64x64 w4s3  128x128     128x64 w8   64x128 w4s3
                                         w8s2        s3
==================  =======  ==========  ==========  ==========  ==========================
key padding         0.863    0.763       0.875       0.864       does not fit shared memory
document + causal   0.335    0.299       0.329       0.334       0.414
sliding window 512  0.268    0.249       0.272       0.270       0.355
==================  =======  ==========  ==========  ==========  ==========================

==================  =======  ==================  ==================  ==================
forward+backward    default  bwd 64/128 w8 s2    bwd 64x64 w4 s3     bwd 32/128 w4 s3
==================  =======  ==================  ==================  ==================
key padding         3.221    3.369               4.129               6.301
document + causal   1.189    1.230               1.512               2.197
sliding window 512  0.988    1.018               1.268               1.754
==================  =======  ==================  ==================  ==================

So masked forward kernels take 64x64 tiles, 4 warps, 3 stages (7-12% faster); the backward keeps
FlexAttention's defaults.

The same forward kernels at D=64 (bf16, H=32) and in fp16 (D=128, H=16), GPU time per call in ms
from the profiler (H200, torch 2.11, N=4096 B=4, ``backend="flex"``; "default" is what flexflash
passed before these entries):

==========================  =======  ==========  ==========  ==========  ==========
forward                     default  64x64 w4s3  128x64      128x128     64x128
                                                 w4s3        w8s2        w4s3
==========================  =======  ==========  ==========  ==========  ==========
D=64  sliding window 512    0.300    0.296       0.289       0.387       0.332
D=64  document + causal     0.614    0.391       0.328       0.439       0.382
D=64  key padding           (FLASH)  0.924       0.951       1.293       1.563
fp16 sliding window 512     0.271    0.252       0.352       0.273       0.357
fp16 document + causal      0.337    0.301       0.603       0.332       0.414
fp16 key padding            0.869    0.782       1.001       0.882       does not compile
==========================  =======  ==========  ==========  ==========  ==========

The same tile choices at D=64 for every Triton case, with FlexAttention's sm90 defaults as the
baseline (forward 128x128 tiles, 4 warps, 3 stages; backward 64/128 tiles, 8 warps, 3 stages), and
at D=128 for a (B, H, N, N) bias with causal (H200, torch 2.11, N=4096 B=4, H=32 at D=64 and 16
at D=128, ``kernel_options={"BACKEND": "TRITON", ...}``, GPU time per call in ms from the
profiler, inputs without grad for the forward):

==========================  =======  ==========  ==========  ==========  ==========  ======
forward                     default  128x64      64x64       128x64      128x128     TMA
                                     w4s3        w4s3        w8s2        w8s2
==========================  =======  ==========  ==========  ==========  ==========  ======
D=64  bias + causal         1.525    0.987       1.017       1.946       1.467
D=64  key padding           1.370    0.920       0.982
D=64  ALiBi + causal        1.051    0.963       1.002
D=64  tanh soft-cap         4.377    4.154       2.824
D=64  dense                 1.369    1.435       1.343
D=64  causal                0.788    0.810       0.791
fp16 D=64 bias + causal     1.517    0.997       1.025
fp16 D=64 key padding       1.371    0.922       0.983
fp16 D=64 document          0.614    0.326       0.390
fp16 D=64 sliding window    0.298    0.289       0.296
fp16 D=64 causal            0.790    0.808       0.795
D=128 bias + causal         0.885    1.178       1.077       1.210       0.960       0.843
==========================  =======  ==========  ==========  ==========  ==========  ======

==========================  =======  ==========  ==========  ==========  ==========
forward+backward            default  bwd 64x64   bwd 64/128  bwd 64/128  bwd 32/128
                                     w4s3        w4s3        w8s2        w4s3
==========================  =======  ==========  ==========  ==========  ==========
D=64  bias + causal         5.099    4.659       17.213      5.622
D=64  document + causal     1.714    1.592       3.169       1.747
D=64  sliding window 512    1.274    1.181       2.789       1.361
D=128 bias + causal         3.658    5.606                   3.699       10.110
D=128 bias with its grad    9.629    11.684                  9.816       17.799
==========================  =======  ==========  ==========  ==========  ==========

(forward tiles: the defaults; the D=128 rows through ``.backward()``, whose accumulation into the
bias's ``.grad`` takes 1.6 ms of the last row.)

So at D=64 the forward of masks, mask_mods, biases and ALiBi takes 128x64 tiles, 4 warps, 3 stages
(up to 1.9x faster), soft-capping 64x64 tiles (1.55x), and bf16 mask_mods and biases also take
64x64 backward tiles, 4 warps, 3 stages (7-9% of forward+backward); dense and causal keep the
defaults, which tie or win. fp16 at D=128 takes the bf16 tiles. At D=128 a bias keeps the
defaults (TMA loads gain 5% forward; not taken: its layout limits are not the kernel's). Other
head dims, dtypes and GPUs were not measured and keep the defaults. A score function of
flexflash.mods keeps its tiles with masks added; a bias with a score function, or a caller's own
score function, keeps the defaults.

Dense masks, full along both sequence dimensions (a random (1, 1, N, N) bool mask allowing half
the entries, so every block is partial and every entry reads the mask; H200, torch 2.11, bf16,
B=4 H=16 N=4096 D=128, through flexflash with the mask's key dimension split in 16s, GPU time per
call in ms from the profiler, forward / forward+backward; SDPA cuDNN forward 1.535):

==================  ===============  ===============  ===============  ===============  ===============
tiles (forward)     64x64 w4s3       128x64 w4s3      128x64 w8s3      128x128 w8s2     64x128 w4s2
                    (the mask tiles)
==================  ===============  ===============  ===============  ===============  ===============
dense bool mask     2.058 / 7.123    2.700 / 7.642    1.689 / 6.605    2.058 / 6.984    2.214 / 7.130
==================  ===============  ===============  ===============  ===============  ===============

So at D=128 a dense bf16 mask takes 128x64 tiles, 8 warps, 3 stages forward (18% faster than the
tiles of padding masks, which read the mask only on the few partial blocks).
"""

from __future__ import annotations

from typing import Any

import torch

_SMALL_TILES_FWD = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3}
_WIDE_TILES_FWD = {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3}
_SMALL_TILES_BWD = {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                    "bwd_num_warps": 4, "bwd_num_stages": 3}

Options = tuple[tuple[str, Any], ...]


_CAPABILITIES: dict[torch.device, tuple[int, int]] = {}


def capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of a CUDA device (cached); None inside a caller's torch.compile,
    where device queries are not traced (callers then take their measurement-free choice)."""
    if torch.compiler.is_compiling():
        return None
    cap = _CAPABILITIES.get(device)
    if cap is None:
        cap = _CAPABILITIES[device] = torch.cuda.get_device_capability(device)
    return cap


def dropout_pass_options(device: torch.device, dtype: torch.dtype, head_dim: int,
                         block: tuple[int, int]) -> tuple[Options, Options]:
    """Extra kernel options of the two dropout passes: (kept pass, lse pass); empty where no
    measurement chose any. ``block`` is the block mask's block size (kernel tiles must divide it)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or head_dim != 128:
        return (), ()
    if block[0] % 64 or block[1] % 64:
        return (), ()
    if capability(device) != (9, 0):
        return (), ()
    return tuple(sorted(_SMALL_TILES_FWD.items())), tuple(sorted({**_SMALL_TILES_FWD, **_SMALL_TILES_BWD}.items()))


# (case, head dim, dtype) -> the Triton kernel options measured above. Cases: "mask" (a mask
# tensor), "dense_mask" (a mask tensor full along both sequence dimensions; where it has no entry
# of its own, it takes the "mask" entry), "mask_mod", "bias" (a bias tensor, any masks), "alibi"
# and "tanh_softcap" (the score functions of flexflash.mods, any masks); see
# flexflash._compile.triton_case.
_TRITON_TILES = {
    ("dense_mask", 128, torch.bfloat16): {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8,
                                          "fwd_num_stages": 3},
    ("mask", 128, torch.bfloat16): _SMALL_TILES_FWD,
    ("mask", 128, torch.float16): _SMALL_TILES_FWD,
    ("mask_mod", 128, torch.bfloat16): _SMALL_TILES_FWD,
    ("mask_mod", 128, torch.float16): _SMALL_TILES_FWD,
    ("mask", 64, torch.bfloat16): _WIDE_TILES_FWD,
    ("mask", 64, torch.float16): _WIDE_TILES_FWD,
    ("mask_mod", 64, torch.bfloat16): {**_WIDE_TILES_FWD, **_SMALL_TILES_BWD},
    ("mask_mod", 64, torch.float16): _WIDE_TILES_FWD,
    ("bias", 64, torch.bfloat16): {**_WIDE_TILES_FWD, **_SMALL_TILES_BWD},
    ("bias", 64, torch.float16): _WIDE_TILES_FWD,
    ("alibi", 64, torch.bfloat16): _WIDE_TILES_FWD,
    ("tanh_softcap", 64, torch.bfloat16): _SMALL_TILES_FWD,
}


def triton_options(device: torch.device, dtype: torch.dtype, head_dim: int, block: tuple[int, int], *,
                   case: str | None) -> dict | None:
    """Kernel options of a call of ``case`` (see ``_TRITON_TILES``) on the Triton kernels: the
    tiles measured above, or None where nothing was measured or the tiles do not divide the
    call's sparsity blocks ``block``."""
    if case is None or device.type != "cuda" or capability(device) != (9, 0):
        return None
    tiles = _TRITON_TILES.get((case, head_dim, dtype))
    if tiles is None and case == "dense_mask":
        tiles = _TRITON_TILES.get(("mask", head_dim, dtype))
    if tiles is None:
        return None
    for key, size in tiles.items():
        rows = key.startswith("fwd_BLOCK_M") or key.startswith("bwd_BLOCK_M")
        cols = key.startswith("fwd_BLOCK_N") or key.startswith("bwd_BLOCK_N")
        if (rows and block[0] % size) or (cols and block[1] % size):
            return None  # the tiles must divide the sparsity blocks
    return dict(tiles)


# --- the kernel generator: FlexAttention's Triton templates or FlashAttention-4 ----------------
#
# FlexAttention generates its kernels with Triton unless kernel_options say BACKEND="FLASH", which
# instantiates FlashAttention-4 (CuTe DSL; the optional ``flash-attn-4`` package, ``pip install
# flexflash[fa4]``). Measured through flexflash (B*N = 16k tokens, hidden 2048, bf16, inputs
# requiring grad, one CUDA synchronisation per call: kernel and host time; H200, torch 2.11.0,
# flash-attn-4 4.0.0b36; ms, Triton / FLASH / SDPA cuDNN):
#
#   case                        N      D    direction  Triton   FLASH    cuDNN
#   dense                       4096   128  fwd        1.706    1.472    0.957
#   dense                       4096   128  fwd+bwd    5.299    3.696    3.672
#   dense                       4096    64  fwd+bwd    6.636    4.392    4.571
#   dense                       16384  128  fwd        5.249    3.805    3.688
#   dense                       16384  128  fwd+bwd   19.447   12.847   13.931
#   key padding (B, Nk) mask    4096   128  fwd        1.215    1.452    1.386
#   key padding                 4096   128  fwd+bwd    3.854    3.029    5.317
#   key padding                 4096    64  fwd        2.023    1.695    2.216
#   key padding                 4096    64  fwd+bwd    5.183    3.569    6.996
#   key padding                 16384  128  fwd        5.796    4.102    5.539
#   key padding                 16384  128  fwd+bwd   19.719   13.555   20.780
#   (1, 1, N, N) bool mask      4096   128  fwd+bwd    7.039   13.705    6.482
#   sliding window 512          4096   128  fwd+bwd    1.576    1.908    6.405
#   document (8 per row)        4096   128  fwd+bwd    1.912    2.566    6.430
#   causal (Nq == Nk)           4096   128  fwd        1.047    0.954    0.541
#   causal                      4096   128  fwd+bwd    3.121    2.714    2.077
#   causal, GQA Hq/Hkv = 4      4096   128  fwd        0.998    1.230    0.593
#   causal, GQA                 4096   128  fwd+bwd    3.481    2.864    2.114
#   tanh soft-cap 30            4096   128  fwd        3.058    2.101    (SDPA cannot)
#   tanh soft-cap               4096   128  fwd+bwd   10.581    8.555    (SDPA cannot)
#   ALiBi + causal              4096   128  fwd        1.135    1.205    1.655
#   ALiBi + causal              4096   128  fwd+bwd    3.330    2.816    6.613
#   prefix-LM (B,) lengths      4096   128  fwd        1.350    1.472    1.824
#   prefix-LM                   4096   128  fwd+bwd    3.446    3.239    6.543
#   causal                      4096    64  fwd        1.353    1.276    0.750
#   causal                      4096    64  fwd+bwd    4.076    3.286    2.598
#   tanh soft-cap               4096    64  fwd        5.038    3.664    (SDPA cannot)
#   tanh soft-cap               4096    64  fwd+bwd   16.642    9.008    (SDPA cannot)
#   ALiBi + causal              4096    64  fwd        1.719    1.621    2.335
#   ALiBi + causal              4096    64  fwd+bwd    4.812    3.419    7.766
#   prefix-LM                   4096    64  fwd        1.527    1.615    2.370
#   prefix-LM                   4096    64  fwd+bwd    4.318    3.524    7.837
#   causal                      16384  128  fwd        2.599    2.540    1.893
#   causal                      16384  128  fwd+bwd    7.269    7.311    7.343
#   causal, GQA                 16384  128  fwd        2.725    2.688    2.015
#   causal, GQA                 16384  128  fwd+bwd    7.440    7.395    7.319
#
# FLASH's kernels are faster (GPU time: dense 0.77 vs 1.19 ms forward), but each call costs about
# 0.3-0.5 ms more host time than a Triton call (its launcher converts every tensor argument), so
# it wins where the kernels are long: the choice below takes FLASH where the work of the call
# (4*B*Hq*Nq*Nk*D) is at least the smallest measured work at which it won, and nowhere else.
# (Causal and GQA attention run on SDPA under backend="auto", which is faster than both; the
# causal entries apply to backend="flex".) Soft-capping, ALiBi and prefix-LM are cases only when
# made by flexflash.mods (whose generated code was measured; flexflash._compile.flash_case).
# Cases left on Triton: every mask or score function of the caller's own (their generated code is
# not known in advance; pass kernel_options={"BACKEND": "FLASH"} to ask for it), biases (FLASH
# reads captured tensors element by element and cannot differentiate them), dense masks (slower,
# above), sliding windows and documents (slower, above), dropout (FLASH has no gradient through
# the log-sum-exp), causal with Nq != Nk (its offset is a 0-d tensor, which FLASH cannot read),
# deterministic mode (FLASH's backward with a block mask is not deterministic on Hopper), GPUs
# other than sm90, and every case and head dim not in the table (not measured).

# (case, needs grad, head dim) -> the least work (flops of 4*B*Hq*Nq*Nk*D) at which FLASH is taken.
_FLASH_MIN_WORK = {
    ("dense", True, 64): 5.0e11,    # N=4096 B=4 H=32: 4.392 vs cuDNN 4.571 ms
    ("dense", True, 128): 2.0e12,   # N=16384 B=1 H=16 (2.2e12): 12.847 vs 13.931; N=4096 ties (3.696/3.672)
    ("key_padding", True, 64): 5.0e11,
    ("key_padding", True, 128): 5.0e11,   # N=4096 B=4 H=16 (5.5e11): 3.029 vs Triton 3.854
    ("key_padding", False, 64): 5.0e11,   # N=4096: 1.695 vs 2.023
    ("key_padding", False, 128): 2.0e12,  # N=16384: 4.102 vs 5.796; N=4096 loses (1.452 vs 1.215)
    ("causal", True, 128): 5.0e11,        # N=4096 B=4 H=16 (5.5e11): 2.714 vs Triton 3.121
    ("causal", False, 128): 5.0e11,       # 0.954 vs 1.047
    ("causal", True, 64): 5.0e11,         # N=4096 B=4 H=32 (5.5e11): 3.286 vs 4.076
    ("causal", False, 64): 5.0e11,        # 1.276 vs 1.353
    ("gqa_causal", True, 128): 5.0e11,    # 2.864 vs 3.481; the forward loses (1.230 vs 0.998)
    ("gqa_causal", True, 64): 5.0e11,     # N=4096 B=4 H=32 Hkv=8: 3.433 vs 4.139; the forward loses (1.495 vs 1.091)
    ("softcap", True, 128): 5.0e11,       # 8.555 vs 10.581
    ("softcap", False, 128): 5.0e11,      # 2.101 vs 3.058
    ("softcap", True, 64): 5.0e11,        # 9.008 vs 16.642
    ("softcap", False, 64): 5.0e11,       # 3.664 vs 5.038
    ("alibi_causal", True, 128): 5.0e11,  # 2.816 vs 3.330; the forward loses (1.205 vs 1.135)
    ("alibi_causal", True, 64): 5.0e11,   # 3.419 vs 4.812
    ("alibi_causal", False, 64): 5.0e11,  # 1.621 vs 1.719
    ("prefix_lm", True, 128): 5.0e11,     # 3.239 vs 3.446; the forward loses (1.472 vs 1.350)
    ("prefix_lm", True, 64): 5.0e11,      # 3.524 vs 4.318; the forward loses (1.615 vs 1.527)
}

# Cases whose FLASH kernels stop winning at larger work: (case, head dim) -> the work from which
# Triton is taken again. Causal at N=16384 B=1 H=16 D=128 (2.2e12): FLASH 7.311 vs Triton 7.269 ms
# forward+backward, 2.540 vs 2.599 forward, the same GPU time (1.01x); grouped heads alike (7.395
# vs 7.440, 2.688 vs 2.725): a tie, so Triton. D=64 was not measured there and keeps the same bound.
_FLASH_MAX_WORK = {
    ("causal", 128): 2.0e12,
    ("gqa_causal", 128): 2.0e12,
    ("causal", 64): 2.0e12,
    ("gqa_causal", 64): 2.0e12,
}

_FLASH_AVAILABLE: list[bool] = []


def work(B: int, Hq: int, Nq: int, Nk: int, D: int) -> float:
    """The work of a call as the table above counts it: 4*B*Hq*Nq*Nk*D flops."""
    return 4.0 * B * Hq * Nq * Nk * D


def flash_available() -> bool:
    """Whether FlexAttention can generate FlashAttention-4 kernels here (the ``flash-attn-4``
    package and its CuTe DSL runtime import); checked once per process."""
    if not _FLASH_AVAILABLE:
        try:
            from torch._inductor.kernel.flex.flex_flash_attention import ensure_flash_available
            ok = bool(ensure_flash_available())
        except Exception:  # older torch without the FLASH backend, or a broken install
            ok = False
        _FLASH_AVAILABLE.append(ok)
    return _FLASH_AVAILABLE[0]


def flash_choice(case: str | None, grad: bool, device: torch.device, dtype: torch.dtype, head_dim: int,
                 v_head_dim: int, work: float) -> bool:
    """Whether a call of ``case`` (one of the table's: see flexflash._compile.flash_case) runs on
    FlashAttention-4 kernels: only where the table above says it is faster on this GPU, and only
    where the package is installed."""
    if case is None or device.type != "cuda" or dtype != torch.bfloat16 or head_dim != v_head_dim:
        return False
    least = _FLASH_MIN_WORK.get((case, grad, head_dim))
    if least is None or work < least or work >= _FLASH_MAX_WORK.get((case, head_dim), float("inf")):
        return False
    if torch.are_deterministic_algorithms_enabled() or capability(device) != (9, 0):
        return False
    return flash_available()
