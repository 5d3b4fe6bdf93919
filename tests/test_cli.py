"""The command line: flexflash check / bench / mask, --version, --help and argument errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import flexflash
from flexflash import __version__, cli


def _run(*args):
    return subprocess.run([sys.executable, "-m", "flexflash", *args], capture_output=True, text=True, timeout=300)


def test_version_and_help_of_every_subcommand():
    r = _run("--version")
    assert r.returncode == 0 and __version__ in r.stdout
    for sub in ([], ["check"], ["bench"], ["mask"]):
        r = _run(*sub, "--help")
        assert r.returncode == 0 and "usage: flexflash" in r.stdout, sub


@pytest.mark.parametrize("args,message", [
    (["mask", "nope"], "invalid choice"),
    (["mask", "causal", "--q-len", "0"], "--q-len: expected a positive integer"),
    (["mask", "document", "--q-len", "4", "--kv-len", "6", "--docs", "2,2"], "--docs: expected document lengths summing"),
    (["bench", "--seq-lens", "12,x"], "--seq-lens: expected comma-separated positive integers"),
    (["check", "--cases", "causal,nothing"], "--cases: unknown case(s) ['nothing']"),
    (["bench", "--device", "tpu"], "invalid choice"),
    (["bench", "--compile-mode", "fast"], "invalid choice"),
    ([], "the following arguments are required"),
])
def test_bad_arguments_give_one_line_and_status_2(args, message):
    r = _run(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_mask_text(capsys):
    assert cli.main(["mask", "causal", "--q-len", "2", "--kv-len", "5"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert rows == ["   0 ####.", "   1 #####"]  # bottom-right: query i sees keys j <= i + 3
    assert cli.main(["mask", "sliding_window", "--q-len", "4", "--window", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["   0 #...", "   1 ##..", "   2 .##.", "   3 ..##"]
    assert cli.main(["mask", "prefix_lm", "--q-len", "3", "--prefix", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["   0 ##.", "   1 ##.", "   2 ###"]
    assert cli.main(["mask", "padding", "--q-len", "2", "--kv-len", "4", "--valid", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["   0 ###.", "   1 ###."]
    assert cli.main(["mask", "document", "--q-len", "3", "--kv-len", "5", "--docs", "3,2"]) == 0
    # queries are the last 3 positions (2, 3, 4): position 2 is in document 0, 3-4 in document 1
    assert capsys.readouterr().out.splitlines()[1:] == ["   0 ###..", "   1 ...##", "   2 ...##"]


def test_mask_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "m.png"
    assert cli.main(["mask", "sliding_window", "--q-len", "16", "--window", "4", "--png", str(path)]) == 0
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_check_passes_and_reports_a_failure(capsys, monkeypatch):
    args = ["check", "--device", "cpu", "--cases", "causal,FlashMHA,dropout"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "all 3 cases ok" in out and "FAIL" not in out
    assert "FlashMHA" in out and "d Wqkv.weight" in out and "dq (memory-bounded)" in out and "out (flex)" in out

    # A wrong fast path must be caught: perturb flexflash's output by a little more than rounding.
    real = cli.attention

    def wrong(*a, **kw):
        out = real(*a, **kw)
        return out + 1e-3 if isinstance(out, torch.Tensor) else out
    monkeypatch.setattr(cli, "attention", wrong)
    assert cli.main(["check", "--device", "cpu", "--cases", "causal"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bench_compile_mode_applies_to_the_run_only(tmp_path, capsys):
    path = tmp_path / "b.json"
    assert cli.main(["bench", "--device", "cpu", "--cases", "sliding_window", "--seq-lens", "32",
                     "--compile-mode", "max-autotune", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["meta"]["compile_mode"] == "max-autotune"
    assert "compile mode max-autotune" in capsys.readouterr().out
    assert flexflash.get_compile_mode() == "default"  # restored after the run


def test_bench_on_cpu_writes_json_and_plot(tmp_path, capsys):
    path, png = tmp_path / "b.json", tmp_path / "b.png"
    plot = ["--plot", str(png)] if _has_matplotlib() else []
    assert cli.main(["bench", "--device", "cpu", "--cases", "causal,key_padding", "--seq-lens", "32,64",
                     "--json", str(path), *plot]) == 0
    data = json.loads(path.read_text())
    assert data["meta"]["torch"] == torch.__version__
    assert [(r["case"], r["N"]) for r in data["rows"]] == [("causal", 32), ("causal", 64), ("key_padding", 32),
                                                           ("key_padding", 64)]
    for r in data["rows"]:
        assert set(r["ms"]) == {"flexflash", "sdpa", "reference"} and all(t > 0 for t in r["ms"].values())
        assert r["ratio"] == pytest.approx(r["ms"]["sdpa"] / r["ms"]["flexflash"])
        assert 0 < r["density"] <= 1 and r["tflops"]["flexflash"] > 0
    assert data["rows"][0]["density"] == pytest.approx((32 + 1) / 64)  # causal, 32 x 32
    out = capsys.readouterr().out
    assert "best SDPA / flexflash" in out
    if plot:
        assert png.read_bytes()[:4] == b"\x89PNG"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert cli.main(["mask", "causal", "--png", str(tmp_path / "x.png")]) == 2
    assert "pip install 'flexflash[plot]'" in capsys.readouterr().err
    assert cli.main(["bench", "--device", "cpu", "--seq-lens", "16", "--cases", "dense", "--plot",
                     str(tmp_path / "y.png")]) == 2
