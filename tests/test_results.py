"""tools/results.py: benchmarks/RESULTS.md is what the pytest-benchmark JSON under benchmarks/runs/
gives, and the generator's tables (the attention suite, the model-level training step and host
time) carry the medians and the ratios against the baselines of the same run."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _results():
    spec = importlib.util.spec_from_file_location("results", ROOT / "tools" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(test: str, param: str, median_s: float, source: str, **info) -> dict:
    return {"group": None, "name": f"{test}[{param}]", "fullname": f"{source}::{test}[{param}]", "param": param,
            "extra_info": info, "stats": {"median": median_s, "min": median_s, "max": median_s, "rounds": 5}}


def _suite(case: str, direction: str, impl: str, ms: float) -> dict:
    return _bench("test_attention", f"{case}-N1024-D64-bfloat16-{direction}-{impl}", ms / 1e3,
                  "benchmarks/test_attention.py", case=case, N=1024, D=64, dtype="bfloat16", direction=direction,
                  impl=impl, path="flex (triton)" if impl == "flexflash" else impl, tflops=50.0 if impl == "flexflash"
                  else 20.0, first_call_s=2.5, gpu="Test GPU", torch="9.9.0")


def _step(case: str, impl: str, mode: str, ms: float) -> dict:
    return _bench("test_training_step", f"{case}-{impl}-{mode}", ms / 1e3, "benchmarks/test_model.py",
                  model_case=case, impl=impl, mode=mode, gpu="Test GPU", torch="9.9.0", tokens=16384,
                  graphs_compiled_while_timed=0)


def _host(case: str, impl: str, us_per_call: float) -> dict:
    return _bench("test_host_time", f"{case}-{impl}", us_per_call * 20 / 1e6, "benchmarks/test_model.py",
                  host_case=case, impl=impl, calls_per_round=20, gpu="Test GPU", torch="9.9.0")


def _write(folder: Path, name: str, benchmarks: list, **top) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps({"benchmarks": benchmarks, **top}))


def _sections(text: str) -> dict[str, str]:
    return {part.split("\n", 1)[0]: part for part in text.split("\n## ")[1:]}


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| mask") and not line.startswith("| case")]


def test_committed_results_are_what_the_runs_give():
    """Regenerate with ``python tools/results.py`` after adding or changing a JSON under benchmarks/runs/."""
    results = _results()
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == results.generate(ROOT / "benchmarks" / "runs")
    assert (ROOT / "benchmarks" / "NOTES.md").is_file()


def test_attention_suite_run(tmp_path):
    runs = tmp_path / "runs"
    _write(runs, "suite.json", [
        _suite("document", "fwd", "flexflash", 1.0), _suite("document", "fwd", "flexflash-flex", 1.2),
        _suite("document", "fwd", "sdpa-cudnn", 1.5), _suite("document", "fwd", "sdpa-efficient", 3.0),
        _suite("document", "fwd+bwd", "flexflash", 4.0), _suite("document", "fwd+bwd", "sdpa-efficient", 3.0),
        _suite("softcap", "fwd", "flexflash", 2.0),  # SDPA cannot express it: no ratio
        _suite("document", "fwd", "flex-raw", 0.9),
    ], datetime="2026-03-04T10:00:00+00:00", machine_info={"node": "x"},
        commit_info={"id": "0123456789abcdef", "time": "2026-03-01T00:00:00+00:00", "dirty": False})
    text = _results().generate(runs)
    section = _sections(text)["suite.json"]
    assert "GPU: Test GPU, torch 9.9.0, 2026-03-04; commit 0123456; 8 benchmarks of `benchmarks/test_attention.py`." \
        in section
    rows = {(r[0], r[4]): r for r in _rows(section)}
    fwd = rows["document", "fwd"]
    assert fwd[5:9] == ["flex (triton)", "1.000", "50", "2.5"]
    assert fwd[9:13] == ["1.200", "0.900", "—", "1.500"]  # flexflash-flex, flex-raw, sdpa-flash (not run), sdpa-cudnn
    assert fwd[-2] == "1.50"  # the best SDPA backend (cuDNN 1.5 ms) over flexflash (1.0 ms)
    assert fwd[-1] == "0.90"  # raw FlexAttention (0.9 ms) over flexflash
    assert rows["document", "fwd+bwd"][-2] == "0.75" and rows["document", "fwd+bwd"][-1] == "—"
    assert rows["softcap", "fwd"][-2] == "—"
    assert text.rstrip().endswith("[NOTES.md](NOTES.md).")


def test_model_training_step_and_host_time_runs(tmp_path):
    runs = tmp_path / "runs"
    # as the kept training-step run: no machine_info, commit_info nor datetime; the date is the file name's
    _write(runs, "2026-01-02-gpu-model-training-step.json", [
        _step("causal", "flexflash", "eager", 10.0), _step("causal", "flex", "eager", 12.5),
        _step("causal", "sdpa", "eager", 8.0), _step("document", "flexflash", "compiled", 9.0),
        _step("document", "flex", "compiled", 18.0)])
    _write(runs, "2026-01-03-gpu-model-host-time.json", [
        _host("document", "flexflash", 100.0), _host("document", "flex", 150.0), _host("causal", "flexflash", 90.0)],
        datetime="2026-01-03T12:00:00+00:00", commit_info={"id": "fedcba9876543210", "dirty": True})
    text = _results().generate(runs)
    sections = _sections(text)
    assert list(sections) == ["2026-01-03-gpu-model-host-time.json", "2026-01-02-gpu-model-training-step.json"]

    step = sections["2026-01-02-gpu-model-training-step.json"]
    assert "GPU: Test GPU, torch 9.9.0, 2026-01-02; 5 benchmarks of `benchmarks/test_model.py`." in step
    rows = {(r[0], r[1]): r for r in _rows(step)}
    assert rows["causal", "eager"][2:8] == ["10.00", "12.50", "8.00", "0.800", "1.250", "0"]
    assert rows["document", "compiled"][2:7] == ["9.00", "18.00", "—", "0.500", "—"]

    host = sections["2026-01-03-gpu-model-host-time.json"]
    assert "2026-01-03; commit fedcba9 with uncommitted changes; 3 benchmarks" in host
    rows = {r[0]: r for r in _rows(host)}
    assert rows["document"][1:] == ["100", "150", "-50"]
    assert rows["causal"][1:] == ["90", "—", "—"]  # no raw FlexAttention measured: no figure made up


def test_other_benchmarks_are_named_not_dropped(tmp_path):
    runs = tmp_path / "runs"
    _write(runs, "modules.json", [_bench("test_module", "FlashMHA-fwd", 0.001, "benchmarks/test_modules.py",
                                         module="FlashMHA", impl="flexflash", direction="fwd")],
           datetime="2026-01-01T00:00:00")
    section = _sections(_results().generate(runs))["modules.json"]
    assert "GPU: not recorded, torch not recorded, 2026-01-01" in section
    assert "Not tabulated here: test_module (1)." in section


def test_check_and_write(tmp_path, capsys):
    results = _results()
    runs, out = tmp_path / "runs", tmp_path / "RESULTS.md"
    _write(runs, "2026-01-01-x.json", [_host("document", "flexflash", 100.0), _host("document", "flex", 90.0)])
    assert results.main(["--runs", str(runs), "--out", str(out), "--check"]) == 1  # no file yet
    assert results.main(["--runs", str(runs), "--out", str(out)]) == 0
    assert out.read_text() == results.generate(runs)
    assert results.main(["--runs", str(runs), "--out", str(out), "--check"]) == 0
    out.write_text(out.read_text().replace("| +10 |", "| +11 |"))
    assert results.main(["--runs", str(runs), "--out", str(out), "--check"]) == 1
    assert "+| document | 100 | 90 | +10 |" in capsys.readouterr().out


def test_a_json_that_is_not_a_benchmark_run_is_refused(tmp_path):
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(ValueError, match="not pytest-benchmark JSON"):
        _results().generate(tmp_path)
