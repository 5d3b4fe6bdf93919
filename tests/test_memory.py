"""Memory bounds: the CPU forward at N = 16k and CPU training at N = 8k never hold an N x N score
matrix, on each CPU path: SDPA's CPU kernel (causal, key padding), its tiles on the memory-bounded
path (causal with key padding) and compiled FlexAttention (a mask_mod, forward). Peak resident memory is measured
in a fresh process, after a small call has paid for compilation; the reference path, which does
materialise the scores, is the control that shows the measurement can fail."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = r"""
import sys, torch, flexflash
mode, N, backend, case = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def peak():
    # VmHWM, the peak resident memory of this process's own address space. (ru_maxrss would not
    # do: Linux carries it across exec from the parent, so under a large test process it starts
    # at the parent's peak and hides the growth measured here.)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))  # kB
def run(n):
    g = torch.Generator().manual_seed(0)
    grad = mode == "train"
    q, k, v = (torch.randn(1, 1, n, 64, generator=g).requires_grad_(grad) for _ in range(3))
    keep = torch.arange(n)[None, :] < n - n // 8  # (1, n): the last eighth of the keys padded
    kw = {"causal": dict(causal=True), "key_padding": dict(mask=keep),
          "causal_key_padding": dict(causal=True, mask=keep),
          "sliding_window": dict(mask_mod=flexflash.mods.sliding_window(n // 4), causal=True)}[case]
    with torch.set_grad_enabled(grad):
        out = flexflash.attention(q, k, v, backend=backend, **kw)
        if grad:
            out.backward(torch.ones_like(out))
run(256)  # compilation and first-call allocations
before = peak()
run(N)
print(peak() - before)
"""


def _growth(mode: str, N: int, backend: str = "auto", case: str = "causal") -> int:
    r = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(N), backend, case], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return int(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
@pytest.mark.parametrize("mode,N,case", [
    *[("forward", 16384, case) for case in ("causal", "key_padding", "causal_key_padding", "sliding_window")],
    # Training with a mask_mod runs the tiles that causal_key_padding runs.
    *[("train", 8192, case) for case in ("causal", "key_padding", "causal_key_padding")]])
def test_no_n_squared_scores(mode, N, case):
    scores = N * N * 4  # one fp32 N x N matrix
    grown = _growth(mode, N, case=case)
    assert grown < scores // 2, f"{mode} at N={N}: peak memory grew by {grown / 2**20:.0f} MiB"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_the_measurement_sees_materialised_scores():
    N = 8192
    grown = _growth("forward", N, backend="reference")
    assert grown > N * N * 4, f"the reference's peak memory grew by {grown / 2**20:.0f} MiB only"  # the control
