"""Runs the benchmark suite on a CUDA machine and writes the pytest-benchmark JSON and a markdown
summary (ms, TFLOP/s, the ratio best SDPA / flexflash per case).

Usage::

    python tools/run_benchmarks.py --out results/ [--n 4096] [--d 128] [--cases causal,document]
                                   [--impls ...] [--dirs fwd] [--dtypes bfloat16]
                                   [--compile-mode max-autotune] [-- extra pytest args]
    python tools/run_benchmarks.py --summarize results/attention.json   # only the markdown

The JSON is pytest-benchmark's own (``pytest-benchmark compare`` reads it; save a baseline with
``--benchmark-save``). Ratios above 1 mean flexflash is faster than every SDPA backend that accepts
the case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

SDPA = ["sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math"]
COLUMNS = ["flexflash", "flexflash-flex", *SDPA, "reference"]


def summarize(data: dict) -> str:
    """A markdown table from pytest-benchmark JSON produced by benchmarks/test_attention.py."""
    rows: dict[tuple, dict[str, dict]] = defaultdict(dict)
    machine = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "case" not in info:
            continue
        key = (info["case"], info["dtype"], info["N"], info["D"], info["direction"])
        rows[key][info["impl"]] = dict(ms=bench["stats"]["median"] * 1e3, tflops=info.get("tflops"),
                                       path=info.get("path"), first=info.get("first_call_s"))
        machine = dict(gpu=info.get("gpu"), torch=info.get("torch"))
    date = data.get("datetime", "")[:10]
    lines = [f"GPU: {machine.get('gpu')}, torch {machine.get('torch')}, {date}. Median ms "
             "(TFLOP/s of flexflash); ratio = best SDPA time / flexflash time (> 1: flexflash faster).", "",
             "| case | dtype | N | D | dir | flexflash path | flexflash ms | TFLOP/s | first call s | "
             + " | ".join(c for c in COLUMNS[1:]) + " | best SDPA / flexflash |",
             "|" + "---|" * (9 + len(COLUMNS))]
    for key in sorted(rows, key=lambda k: (k[0], k[1], k[2], k[3], k[4])):
        r = rows[key]
        ours = r.get("flexflash")
        sdpa_times = [r[s]["ms"] for s in SDPA if s in r]
        ratio = f"{min(sdpa_times) / ours['ms']:.2f}" if ours and sdpa_times else "—"

        def cell(impl):
            return f"{r[impl]['ms']:.3f}" if impl in r else "—"
        lines.append("| " + " | ".join([
            key[0], key[1], str(key[2]), str(key[3]), key[4],
            ours["path"] if ours else "—", cell("flexflash"),
            f"{ours['tflops']:.0f}" if ours and ours.get("tflops") is not None else "—",
            f"{ours['first']:.1f}" if ours and ours.get("first") is not None else "—",
            *[cell(c) for c in COLUMNS[1:]], ratio]) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmark-results")
    parser.add_argument("--summarize", help="only write the markdown summary of this JSON file")
    for name in ("n", "d", "cases", "impls", "dirs", "dtypes"):
        parser.add_argument(f"--{name}", help=f"comma list (FLEXFLASH_BENCH_{name.upper()})")
    parser.add_argument("--compile-mode", choices=("default", "max-autotune"),
                        help="flexflash's compile mode for the run (FLEXFLASH_COMPILE_MODE)")
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args()
    if args.summarize:
        print(summarize(json.loads(Path(args.summarize).read_text())))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for name in ("n", "d", "cases", "impls", "dirs", "dtypes"):
        if getattr(args, name):
            env[f"FLEXFLASH_BENCH_{name.upper()}"] = getattr(args, name)
    if args.compile_mode:
        env["FLEXFLASH_COMPILE_MODE"] = args.compile_mode
    json_path = out / "attention.json"
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "benchmarks" / "test_attention.py"),
           f"--benchmark-json={json_path}", "--benchmark-columns=median,rounds", *args.pytest_args]
    code = subprocess.call(cmd, env=env)
    if json_path.exists():
        table = summarize(json.loads(json_path.read_text()))
        (out / "summary.md").write_text(table)
        print(table)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
