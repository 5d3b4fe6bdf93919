"""Draws the TFLOP/s of flexflash and of each SDPA backend per case from a benchmark-suite JSON
(``tools/run_benchmarks.py`` writes it): one panel per direction, one group of bars per case.

Usage: ``python tools/plot_results.py RESULTS.json OUT.png [--n 4096] [--d 128]`` (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

IMPLS = ["flexflash", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("json")
    parser.add_argument("png")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=128)
    args = parser.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(args.json))
    table = defaultdict(dict)
    meta = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if info.get("N") != args.n or info.get("D") != args.d or info["impl"] not in IMPLS:
            continue
        table[(info["direction"], info["case"])][info["impl"]] = info["tflops"]
        meta = info
    directions = ["fwd", "fwd+bwd"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, direction in zip(axes, directions):
        cases = sorted({c for d, c in table if d == direction})
        width = 0.8 / len(IMPLS)
        for i, impl in enumerate(IMPLS):
            heights = [table[(direction, c)].get(impl, 0.0) for c in cases]
            ax.bar([x + i * width for x in range(len(cases))], heights, width, label=impl)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))])
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
        ax.set_title(direction)
        ax.set_ylabel("TFLOP/s (allowed entries only)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{meta.get('gpu')}, torch {meta.get('torch')}, bf16, B·N = 16k, N = {args.n}, D = {args.d} "
                 f"({data.get('datetime', '')[:10]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.png, dpi=100)


if __name__ == "__main__":
    main()
