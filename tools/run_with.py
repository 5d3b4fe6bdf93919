"""Run pytest (a benchmark or a test file) in this process with flexflash's GPU switches changed
first, to measure a setting before it becomes the default:

    python tools/run_with.py [--traced] [--decoding "fwd_num_stages=3,..."] [--split-factor K] \\
        -- benchmarks/test_decode.py -k "compiled and 8192" --benchmark-json=out.json

``--traced``: inside a caller's torch.compile, block masks built by the builders' body traced into
the graph on CUDA (``flexflash._blockmask.TRACED_FUSED_ON``, ``flexflash._paged.TRACED_BUILDS_ON``);
``--no-traced``: by the chunked evaluation. ``--decoding``: a decoding entry of the tuning table
(``tuning.json``'s ``decoding``, bf16 and fp16, head dim 128, these kernel options; ``none``: no
entry), and ``--split-factor`` its multiple of FlexAttention's ``SPLIT_KV``. The settings are printed
first, so a run's log says what it measured.
"""

from __future__ import annotations

import argparse
import sys

import pytest

from flexflash import _blockmask, _paged, _tuning


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traced", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--decoding", default=None, help="NAME=int,... kernel options, or none")
    ap.add_argument("--split-factor", type=int, default=None)
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    if a.traced is not None:
        devices = {"cuda"} if a.traced else set()
        _blockmask.TRACED_FUSED_ON, _paged.TRACED_BUILDS_ON = set(devices), set(devices)
    if a.decoding is not None:
        if a.decoding == "none":
            _tuning._DECODING = None
        else:
            options = {k: int(v) for k, v in (x.split("=") for x in a.decoding.split(","))}
            _tuning._DATA["tiles"]["run_with"] = options
            _tuning._DECODING = _tuning.decoding_entry({"dtypes": ["bfloat16", "float16"], "head_dims": [128],
                                                        "tiles": ["run_with"], "split_factor": a.split_factor})
    print(f"run_with: traced block masks on {sorted(_blockmask.TRACED_FUSED_ON)} / {sorted(_paged.TRACED_BUILDS_ON)}, "
          f"decoding entry {_tuning._DECODING}", flush=True)
    args = a.pytest_args[1:] if a.pytest_args[:1] == ["--"] else a.pytest_args
    return pytest.main(args)


if __name__ == "__main__":
    sys.exit(main())
