"""Kernel options chosen from measurements, in one place.

Each entry names the GPU, the case and the figures that chose it. An entry applies only where the
caller passed no ``kernel_options`` (a caller's options always win, whole); elsewhere FlexAttention's
own defaults stand.

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
"""

from __future__ import annotations

from typing import Any

import torch

_SMALL_TILES_FWD = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3}
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
