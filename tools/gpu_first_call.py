"""The first call of one benchmark case in this process: compilation included.

Runs ``benchmarks/test_attention.py``'s case (B*N = 16k tokens, hidden 2048, bf16, inputs requiring
grad) through ``flexflash.attention``: the first forward (which also compiles the backward), the
first backward, and a second forward with the same mask (a block-mask cache hit). Run it in a fresh
process per case, with empty compile caches, for the cold first call::

    python tools/gpu_first_call.py sliding_window_512 [--n 4096] [--d 128]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import flexflash  # noqa: E402
from flexflash import _blockmask  # noqa: E402
from test_attention import make_case  # noqa: E402


def _timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=128)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_first_call: needs a CUDA GPU", file=sys.stderr)
        return 2
    c = make_case(args.case, args.n, args.d, torch.bfloat16)
    result = {}
    fwd = _timed(lambda: result.setdefault("out", flexflash.attention(c.q, c.k, c.v, **c.flex)))
    bwd = _timed(lambda: result["out"].float().sum().backward())
    again = _timed(lambda: flexflash.attention(c.q, c.k, c.v, **c.flex))
    builders = [(b.builds, b.compiles) for b in _blockmask._BUILDERS.values()]
    print(f"{args.case} N={args.n} D={args.d} ({torch.cuda.get_device_name()}, torch {torch.__version__}): "
          f"first forward {fwd:.1f} s, first backward {bwd:.1f} s, second forward {again * 1e3:.1f} ms; "
          f"block-mask builders (builds, compilations): {builders}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
