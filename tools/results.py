"""Writes ``benchmarks/RESULTS.md`` from the raw pytest-benchmark JSON kept under ``benchmarks/runs/``:
one section per run file, newest first, with the run's GPU, torch version, date and commit and its
table of medians and ratios (the summaries of ``tools/run_benchmarks.py``: ``summarize`` for the
attention suite, ``benchmarks/test_attention.py``; ``summarize_model`` for the training step and
the host time of ``benchmarks/test_model.py``; ``summarize_decode`` for decoding and
variable-length training, ``benchmarks/test_decode.py``). The measured analyses and profiles behind the
figures are kept by hand in ``benchmarks/NOTES.md``.

Usage::

    python tools/results.py            # writes benchmarks/RESULTS.md
    python tools/results.py --check    # exits 1 if benchmarks/RESULTS.md is not what the JSON gives
    python tools/results.py --runs DIR --out FILE

To add a run, save its JSON under ``benchmarks/runs/`` as ``DATE-GPU-WHAT.json`` (pytest's
``--benchmark-json=...``; ``tools/run_benchmarks.py --out DIR`` writes ``DIR/attention.json``) and
regenerate.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "benchmarks" / "runs"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def _run_benchmarks():
    """tools/run_benchmarks.py (tools/ is not a package), whose summaries make the tables."""
    module = sys.modules.get("run_benchmarks")
    if module is None:
        path = Path(__file__).resolve().parent / "run_benchmarks.py"
        spec = importlib.util.spec_from_file_location("run_benchmarks", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def _test_name(bench: dict) -> str:
    return bench.get("name", "").split("[")[0]


def _load(path: Path) -> dict:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path}: not pytest-benchmark JSON (no 'benchmarks' list)")
    return data


def _section(name: str, data: dict) -> str:
    tools = _run_benchmarks()
    benches = data["benchmarks"]
    suite = any("case" in b.get("extra_info", {}) for b in benches)
    model = any({"model_case", "host_case"} & set(b.get("extra_info", {})) for b in benches)
    decode = any(b.get("extra_info", {}).get("bench") in ("decode", "varlen") for b in benches)
    other = Counter(_test_name(b) for b in benches
                    if not {"case", "model_case", "host_case", "bench"} & set(b.get("extra_info", {})))
    sources = sorted({b.get("fullname", "").split("::")[0] for b in benches} - {""})
    commit = data.get("commit_info") or {}
    about = [tools.run_line(data, name)[:-1]]
    if commit.get("id"):
        about.append(f"commit {commit['id'][:7]}" + (" with uncommitted changes" if commit.get("dirty") else ""))
    about.append(f"{len(benches)} benchmark{'s' if len(benches) != 1 else ''}"
                 + (" of " + ", ".join(f"`{s}`" for s in sources) if sources else ""))
    parts = [f"## {name}", "", "; ".join(about) + "."]
    if suite:
        parts += ["", tools.summarize(data, header=False, name=name).rstrip("\n")]
    if model:
        parts += ["", tools.summarize_model(data, header=False, name=name).rstrip("\n")]
    if decode:
        parts += ["", tools.summarize_decode(data, header=False, name=name).rstrip("\n")]
    if other:
        parts += ["", "Not tabulated here: " + ", ".join(f"{test} ({n})" for test, n in sorted(other.items())) + "."]
    return "\n".join(parts) + "\n"


def generate(runs: Path = RUNS) -> str:
    """The markdown of RESULTS.md from every ``*.json`` under ``runs`` (newest run first)."""
    runs = Path(runs)
    loaded = [(path.relative_to(runs).as_posix(), _load(path)) for path in sorted(runs.rglob("*.json"))]
    tools = _run_benchmarks()

    def newest_first(item):
        name, data = item
        return (data.get("datetime") or tools.run_date(data, name), name)
    loaded.sort(key=newest_first, reverse=True)
    lines = ["# Benchmark results", "",
             "Medians of the raw pytest-benchmark runs kept under [`runs/`](runs/), one section per run file,",
             "newest first; ratios only between implementations measured in the same run. Generated from those",
             "files by `python tools/results.py` (do not edit by hand; `python tools/results.py --check` fails",
             "when this file is out of date).", ""]
    if not loaded:
        lines += ["No run is kept under `runs/`.", ""]
    for name, data in loaded:
        lines += [_section(name, data)]
    lines += ["The measured analyses and profiles behind these figures, and the earlier runs whose raw JSON",
              "was not kept: [NOTES.md](NOTES.md)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=RUNS, help="the folder of pytest-benchmark JSON runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the markdown file written or checked")
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from what would be written")
    args = parser.parse_args(argv)
    text = generate(args.runs)
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current == text:
            return 0
        sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                   str(args.out), "generated"))
        print(f"{args.out} is out of date: run python tools/results.py", file=sys.stderr)
        return 1
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
