"""Runs the benchmark suite on a CUDA machine (or on CPU with ``--device cpu``) and writes the pytest-benchmark JSON and a markdown
summary (ms, TFLOP/s, the ratio best SDPA / flexflash per case).

Usage::

    python tools/run_benchmarks.py --out results/ [--n 4096] [--d 128] [--cases causal,document]
                                   [--impls ...] [--dirs fwd] [--dtypes bfloat16] [--device cpu]
                                   [--compile-mode max-autotune] [-- extra pytest args]
    python tools/run_benchmarks.py --summarize results/attention.json   # only the markdown
    python tools/run_benchmarks.py --summarize-model model.json         # benchmarks/test_model.py
    python tools/run_benchmarks.py --summarize-decode decode.json       # benchmarks/test_decode.py

Runs worth keeping go to ``benchmarks/runs/`` (``DATE-GPU-WHAT.json``); ``python tools/results.py``
then regenerates ``benchmarks/RESULTS.md`` from every JSON there.

The JSON is pytest-benchmark's own (``pytest-benchmark compare`` reads it; save a baseline with
``--benchmark-save``). Ratios above 1 mean flexflash is faster than every SDPA backend that accepts
the case.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

SDPA = ["sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math"]
COLUMNS = ["flexflash", "flexflash-flex", "flex-raw", *SDPA, "reference"]


def run_date(data: dict, name: str = "") -> str:
    """The day of a run: the JSON's ``datetime``, else its ``commit_info`` time, else a YYYY-MM-DD at
    the start of the file's ``name``; empty when none has one."""
    stamp = data.get("datetime") or (data.get("commit_info") or {}).get("time") or ""
    found = re.match(r"\d{4}-\d{2}-\d{2}", stamp) or re.match(r"\d{4}-\d{2}-\d{2}", Path(name).name)
    return found.group(0) if found else ""


def run_line(data: dict, name: str = "") -> str:
    """``GPU: ..., torch ..., date.`` (``CPU, torch ...`` for a CPU run) of a run: the GPU and torch version its benchmarks recorded in
    ``extra_info`` (each distinct value once; ``machine_info`` where no benchmark has one), the date
    from ``run_date``."""
    machine_info = data.get("machine_info") or {}

    def values(key):
        seen = [b.get("extra_info", {}).get(key) for b in data.get("benchmarks", [])]
        seen = [str(v) for v in dict.fromkeys(seen) if v is not None] or \
            ([str(machine_info[key])] if machine_info.get(key) is not None else [])
        return " / ".join(seen) or "not recorded"
    date = run_date(data, name) or "date not recorded"
    device = values("gpu")
    return f"{'CPU' if device == 'cpu' else 'GPU: ' + device}, torch {values('torch')}, {date}."


def summarize(data: dict, header: bool = True, name: str = "") -> str:
    """A markdown table from pytest-benchmark JSON produced by benchmarks/test_attention.py (with
    ``header``, led by ``run_line`` of the run; ``name``: its file's name)."""
    rows: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "case" not in info:
            continue
        key = (info["case"], info["dtype"], info["N"], info["D"], info["direction"])
        rows[key][info["impl"]] = dict(ms=bench["stats"]["median"] * 1e3, tflops=info.get("tflops"),
                                       path=info.get("path"), first=info.get("first_call_s"))
    lead = f"{run_line(data, name)} " if header else ""
    lines = [f"{lead}Median ms (TFLOP/s of flexflash); ratios = the other's time / flexflash's time "
             "(> 1: flexflash faster).", "",
             "| case | dtype | N | D | dir | flexflash path | flexflash ms | TFLOP/s | first call s | "
             + " | ".join(c for c in COLUMNS[1:]) + " | best SDPA / flexflash | flex-raw / flexflash |",
             "|" + "---|" * (10 + len(COLUMNS))]
    for key in sorted(rows, key=lambda k: (k[0], k[1], k[2], k[3], k[4])):
        r = rows[key]
        ours = r.get("flexflash")
        sdpa_times = [r[s]["ms"] for s in SDPA if s in r]
        ratio = f"{min(sdpa_times) / ours['ms']:.2f}" if ours and sdpa_times else "—"
        raw = f"{r['flex-raw']['ms'] / ours['ms']:.2f}" if ours and "flex-raw" in r else "—"

        def cell(impl):
            return f"{r[impl]['ms']:.3f}" if impl in r else "—"
        lines.append("| " + " | ".join([
            key[0], key[1], str(key[2]), str(key[3]), key[4],
            ours["path"] if ours else "—", cell("flexflash"),
            _tflops(ours["tflops"]) if ours and ours.get("tflops") is not None else "—",
            f"{ours['first']:.1f}" if ours and ours.get("first") is not None else "—",
            *[cell(c) for c in COLUMNS[1:]], ratio, raw]) + " |")
    return "\n".join(lines) + "\n"


def _tflops(t: float) -> str:
    """TFLOP/s to show: whole numbers on a GPU, two decimals for the small figures of a CPU."""
    return f"{t:.0f}" if t >= 10 else f"{t:.2f}"


def summarize_model(data: dict, header: bool = True, name: str = "") -> str:
    """Markdown tables from pytest-benchmark JSON of benchmarks/test_model.py: the training step
    per mask, mode and implementation (with flexflash's ratios against raw FlexAttention and SDPA,
    and the graphs compiled while timed), and the host time of small eager calls (with ``header``,
    led by ``run_line`` of the run; ``name``: its file's name)."""
    steps: dict[tuple, dict[str, dict]] = defaultdict(dict)
    host: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "model_case" in info:
            steps[(info["model_case"], info["mode"])][info["impl"]] = dict(
                ms=bench["stats"]["median"] * 1e3, graphs=info.get("graphs_compiled_while_timed"))
        elif "host_case" in info:
            host[info["host_case"]][info["impl"]] = bench["stats"]["median"] / info["calls_per_round"] * 1e6
    lines = [run_line(data, name), ""] if header else []
    if steps:
        lines += ["Training step (4 layers, E=1024, 16 heads, B=8, N=2048, bf16), median ms; ratios are "
                  "flexflash's time over the other's (< 1: flexflash faster).", "",
                  "| mask | mode | flexflash | raw FlexAttention | SDPA | flexflash / raw | flexflash / SDPA "
                  "| graphs compiled while timed (flexflash) |", "|---|---|---|---|---|---|---|---|"]
        for (case, mode), r in sorted(steps.items()):
            ms = {impl: r[impl]["ms"] for impl in r}
            ours = ms.get("flexflash")
            ratio = lambda other: f"{ours / ms[other]:.3f}" if ours and other in ms else "—"  # noqa: E731
            cell = lambda impl: f"{ms[impl]:.2f}" if impl in ms else "—"  # noqa: E731
            lines.append(f"| {case} | {mode} | {cell('flexflash')} | {cell('flex')} | {cell('sdpa')} | "
                         f"{ratio('flex')} | {ratio('sdpa')} | {r.get('flexflash', {}).get('graphs', '—')} |")
        lines.append("")
    if host:
        lines += ["Host time of small eager calls (B=32, H=16, N=512, D=128, bf16, forward), µs per call.", "",
                  "| mask | flexflash | raw FlexAttention | difference |", "|---|---|---|---|"]
        for case, r in sorted(host.items()):
            diff = f"{r['flexflash'] - r['flex']:+.0f}" if "flexflash" in r and "flex" in r else "—"
            ours, raw = (f"{r[impl]:.0f}" if impl in r else "—" for impl in ("flexflash", "flex"))
            lines.append(f"| {case} | {ours} | {raw} | {diff} |")
    return "\n".join(lines) + "\n"


def summarize_decode(data: dict, header: bool = True, name: str = "") -> str:
    """Markdown tables from pytest-benchmark JSON of benchmarks/test_decode.py: decoding per mode
    (eager calls, or a compiled step), batch, cache length and length spread (SDPA on the padded cache with a mask against flexflash's
    ``flash_attn_with_kvcache`` on a contiguous and a paged cache, and eagerly the same kept on
    FlexAttention, ``flexflash-flex``, compiled with ``flexflash.guard_filter``,
    ``flexflash-guards``, or in earlier runs with its kernels compiled with a symbolic batch,
    ``flexflash-symbolic-batch``), and variable-length training
    (SDPA on the padded batch against ``flash_attn_varlen_func``). Ratios are SDPA's time over
    flexflash's (> 1: flexflash faster), beside the issue's targets."""
    decode: dict[tuple, dict[str, float]] = defaultdict(dict)
    varlen: dict[tuple, dict[str, float]] = defaultdict(dict)
    others: set[str] = set()
    sdpa_backends: dict[str, int] = defaultdict(int)  # SDPA's own choice of backend per row, where recorded
    skipped: list[str] = []  # compiled rows run without CUDA graphs, where recorded
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        ms = bench["stats"]["median"] * 1e3
        if info.get("bench") == "decode":
            impl = info["impl"]  # flexflash-flex / -symbolic-batch: the second group of columns (eager)
            column = "sdpa" if impl == "sdpa" else f"{'flexflash' if impl == 'flexflash' else 'other'}-{info['layout']}"
            if impl not in ("flexflash", "sdpa"):
                others.add(impl)
            if impl == "sdpa" and info.get("sdpa_backend"):
                sdpa_backends[info["sdpa_backend"]] += 1
            if info.get("cudagraph_skips"):
                skipped.append(bench["name"])
            decode[(info.get("mode", "eager"), info["B"], info["S"], info["lengths"])][column] = ms
        elif info.get("bench") == "varlen":
            varlen[(info["N"], info["B"], info["H"], info["tokens"])][info["impl"]] = ms
    lines = [run_line(data, name), ""] if header else []
    cell = lambda r, key: f"{r[key]:.3f}" if key in r else "—"  # noqa: E731
    ratio = lambda r, key: f"{r['sdpa'] / r[key]:.2f}" if key in r and "sdpa" in r else "—"  # noqa: E731
    if decode:
        names = {"flexflash-flex": "on FlexAttention", "flexflash-guards": "with guard_filter",
                 "flexflash-symbolic-batch": "symbolic batch"}
        other = " / ".join(names.get(o, o) for o in sorted(others)) or "symbolic batch"
        lines += ["Decoding: one query token per sequence, median ms; ratio = SDPA (padded cache, mask) / "
                  "flexflash; targets 1.0 (full) and 1.5 (lengths spread over 4x).", "",
                  "| mode | batch | cache | lengths | SDPA | flexflash contiguous | flexflash paged | ratio contiguous "
                  f"| ratio paged | target | {other}: contiguous | paged |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for (mode, B, S, spread), r in sorted(decode.items()):
            lines.append(f"| {mode} | {B} | {S} | {spread} | {cell(r, 'sdpa')} | {cell(r, 'flexflash-contiguous')} | "
                         f"{cell(r, 'flexflash-paged')} | {ratio(r, 'flexflash-contiguous')} | "
                         f"{ratio(r, 'flexflash-paged')} | {'1.5' if spread == 'spread' else '1.0'} | "
                         f"{cell(r, 'other-contiguous')} | {cell(r, 'other-paged')} |")
        if sdpa_backends:
            lines += ["", "SDPA's dispatch chose (rows): " + ", ".join(f"{b} ({n})" for b, n in sorted(sdpa_backends.items()))]
        if skipped:
            lines += ["", "Compiled without CUDA graphs (Inductor skipped them): " + ", ".join(skipped)]
        lines.append("")
    if varlen:
        lines += ["Variable-length training (causal, forward+backward), median ms; ratio = SDPA (padded batch, "
                  "mask) / flexflash; target 1.5.", "",
                  "| N | sequences | heads | tokens | SDPA | flexflash | ratio |", "|---|---|---|---|---|---|---|"]
        for (N, B, H, tokens), r in sorted(varlen.items()):
            lines.append(f"| {N} | {B} | {H} | {tokens} | {cell(r, 'sdpa')} | {cell(r, 'flexflash')} | "
                         f"{ratio(r, 'flexflash')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmark-results")
    parser.add_argument("--summarize", help="only write the markdown summary of this JSON file")
    parser.add_argument("--summarize-model", help="only write the summary of benchmarks/test_model.py's JSON")
    parser.add_argument("--summarize-decode", help="only write the summary of benchmarks/test_decode.py's JSON")
    for name in ("n", "d", "cases", "impls", "dirs", "dtypes", "device"):
        parser.add_argument(f"--{name}", help=f"comma list (FLEXFLASH_BENCH_{name.upper()})")
    parser.add_argument("--compile-mode", choices=("default", "max-autotune"),
                        help="flexflash's compile mode for the run (FLEXFLASH_COMPILE_MODE)")
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args()
    if args.summarize_decode:
        print(summarize_decode(json.loads(Path(args.summarize_decode).read_text()), name=args.summarize_decode))
        return 0
    if args.summarize_model:
        print(summarize_model(json.loads(Path(args.summarize_model).read_text()), name=args.summarize_model))
        return 0
    if args.summarize:
        print(summarize(json.loads(Path(args.summarize).read_text()), name=args.summarize))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for name in ("n", "d", "cases", "impls", "dirs", "dtypes", "device"):
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
