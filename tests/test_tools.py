"""tools/run_benchmarks.py and pytest-benchmark on a saved run of the benchmark suite
(``tests/data/benchmark_run.json``: eight benchmarks of an H200 run of
``benchmarks/test_attention.py``, each with its first five timings): the markdown summary with the
ratio to the best SDPA backend, and ``pytest-benchmark compare`` against a second run."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "tests" / "data" / "benchmark_run.json"


def _tool():
    spec = importlib.util.spec_from_file_location("run_benchmarks", ROOT / "tools" / "run_benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _medians(data):
    return {(b["extra_info"]["case"], b["extra_info"]["direction"], b["extra_info"]["impl"]): b["stats"]["median"]
            for b in data["benchmarks"]}


def _row(table: str, case: str, direction: str) -> list[str]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    found = [r for r in rows if r[0] == case and r[4] == direction]
    assert len(found) == 1, (case, direction, table)
    return found[0]


def test_summary_gives_the_ratio_to_the_best_sdpa_backend_that_ran():
    data = json.loads(RUN.read_text())
    table = _tool().summarize(data)
    m = _medians(data)
    assert "NVIDIA H200" in table.splitlines()[0] and "2.11.0+cu130" in table.splitlines()[0]
    for direction in ("fwd", "fwd+bwd"):
        row = _row(table, "document", direction)
        best = min(m["document", direction, "sdpa-cudnn"], m["document", direction, "sdpa-efficient"])
        assert row[-2] == f"{best / m['document', direction, 'flexflash']:.2f}"
        assert row[-1] == "—"  # this run has no raw FlexAttention baseline
        assert row[6] == f"{m['document', direction, 'flexflash'] * 1e3:.3f}"
        assert row[5] == "flex (triton)"
    # soft-capping has no SDPA baseline (SDPA cannot express it): no ratio, not a made-up one
    assert _row(table, "softcap", "fwd")[-2] == "—"


def test_run_benchmarks_summarize_prints_the_table():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "run_benchmarks.py"), "--summarize", str(RUN)],
                         capture_output=True, text=True, check=True).stdout
    assert _row(out, "document", "fwd")[-2] == _row(_tool().summarize(json.loads(RUN.read_text())), "document", "fwd")[-2]


def test_pytest_benchmark_compare_reads_saved_runs(tmp_path):
    """A regression run is compared with ``pytest-benchmark compare`` against a saved one."""
    data = json.loads(RUN.read_text())
    for bench in data["benchmarks"]:  # a second run, 10% slower
        for key in ("min", "max", "mean", "median", "q1", "q3"):
            bench["stats"][key] *= 1.1
    later = tmp_path / "later.json"
    later.write_text(json.dumps(data))
    cli = "import sys; from pytest_benchmark.cli import main; sys.argv[0] = 'pytest-benchmark'; main()"
    result = subprocess.run([sys.executable, "-c", cli, "compare", str(RUN), str(later), "--columns=median",
                             "--group-by=name", "--time-unit=us"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    flex_fwd = _medians(json.loads(RUN.read_text()))["document", "fwd", "flexflash"] * 1e6
    lines = [line for line in result.stdout.splitlines()
             if line.startswith("test_attention[document-N1024-D64-bfloat16-fwd-flexflash]")]
    assert len(lines) == 2, result.stdout  # one per run, side by side, the later one relative to the first
    assert f"{flex_fwd:.4f} (1.0)" in lines[0] and f"{flex_fwd * 1.1:.4f} (1.10)" in lines[1]


def test_model_summary_of_a_saved_run():
    """The summary of benchmarks/test_model.py's JSON (an H200 run kept under benchmarks/runs/):
    one row per mask and mode with each implementation's median step and flexflash's ratios."""
    runs = ROOT / "benchmarks" / "runs"
    data = json.loads((runs / "2026-12-04-h200-model-training-step.json").read_text())
    table = _tool().summarize_model(data)
    medians = {(b["extra_info"]["model_case"], b["extra_info"]["mode"], b["extra_info"]["impl"]): b["stats"]["median"]
               for b in data["benchmarks"]}
    rows = {(r[0], r[1]): r for r in ([c.strip() for c in line.strip("|").split("|")]
                                      for line in table.splitlines() if line.startswith("| "))}
    for case, mode in {(c, m) for c, m, _ in medians}:
        row = rows[(case, mode)]
        ours, raw, sdpa = (medians[(case, mode, impl)] for impl in ("flexflash", "flex", "sdpa"))
        assert row[2:5] == [f"{ours * 1e3:.2f}", f"{raw * 1e3:.2f}", f"{sdpa * 1e3:.2f}"]
        assert row[5:7] == [f"{ours / raw:.3f}", f"{ours / sdpa:.3f}"]
    host = _tool().summarize_model(json.loads((runs / "2026-12-04-h200-model-host-time.json").read_text()))
    assert "| document |" in host and "| key_padding |" in host


def test_decode_summary_pairs_each_cache_with_sdpa():
    """The summary of benchmarks/test_decode.py's JSON: one row per batch, cache and length spread
    with SDPA's and flexflash's medians (contiguous and paged) and SDPA / flexflash, and flexflash's
    kept on FlexAttention (or, in earlier runs, with a symbolic batch) beside them; one row per
    variable-length run."""
    def bench(ms, **info):
        return {"name": "x", "stats": {"median": ms / 1e3}, "extra_info": info}

    decode = dict(bench="decode", mode="compiled", B=8, S=8192)
    data = {"benchmarks": [
        bench(2.0, impl="sdpa", layout="contiguous", lengths="spread", **decode),
        bench(1.0, impl="flexflash", layout="contiguous", lengths="spread", **decode),
        bench(4.0, impl="flexflash", layout="paged", lengths="spread", **decode),
        bench(3.0, impl="flexflash", layout="contiguous", lengths="full", **decode),
        bench(5.0, impl="flexflash-symbolic-batch", layout="paged", lengths="full", **decode),
        bench(9.0, impl="sdpa", N=4096, B=8, H=16, tokens=20000, bench="varlen"),
        bench(3.0, impl="flexflash", N=4096, B=8, H=16, tokens=20000, bench="varlen"),
    ]}
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in _tool().summarize_decode(data, header=False).splitlines() if line.startswith("| ")]
    assert ["compiled", "8", "8192", "spread", "2.000", "1.000", "4.000", "2.00", "0.50", "1.5", "—", "—"] in rows
    assert ["compiled", "8", "8192", "full", "—", "3.000", "—", "—", "—", "1.0", "—", "5.000"] in rows
    assert ["4096", "8", "16", "20000", "9.000", "3.000", "3.00"] in rows
    assert "symbolic batch: contiguous" in _tool().summarize_decode(data, header=False)
    # calls kept on FlexAttention (flexflash-flex) take the same columns, named for them
    data["benchmarks"][4]["extra_info"]["impl"] = "flexflash-flex"
    table = _tool().summarize_decode(data, header=False)
    assert "on FlexAttention: contiguous" in table and "symbolic" not in table
    assert "| compiled | 8 | 8192 | full | — | 3.000 | — | — | — | 1.0 | — | 5.000 |" in table
    # compiled steps with flexflash.guard_filter (flexflash-guards) likewise
    data["benchmarks"][4]["extra_info"]["impl"] = "flexflash-guards"
    assert "with guard_filter: contiguous" in _tool().summarize_decode(data, header=False)
    assert "SDPA's dispatch chose" not in table
    # the backend SDPA's dispatch chose, where the rows recorded it
    data["benchmarks"][0]["extra_info"]["sdpa_backend"] = "CUDNN_ATTENTION"
    assert "SDPA's dispatch chose (rows): CUDNN_ATTENTION (1)" in _tool().summarize_decode(data, header=False)
