"""The command line: flexflash check / bench / mask, --version, --help and argument errors."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
import warnings

import pytest
import torch

import flexflash
from flexflash import __version__, cli
from flexflash.cli import bench, check  # noqa: F401  (cli.bench, cli.check)


def _run(*args):
    return subprocess.run([sys.executable, "-m", "flexflash", *args], capture_output=True, text=True, timeout=300)


def _main(capsys, *args) -> tuple[int, str, str]:
    """``flexflash ARGS`` in this process: (exit status, stdout, stderr)."""
    try:
        code = cli.main(list(args))
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_module_runs_as_a_command():
    """``python -m flexflash``: the version, and a bad argument's status 2 and one-line error."""
    r = _run("--version")
    assert r.returncode == 0 and __version__ in r.stdout
    r = _run("mask", "causal", "--q-len", "0")
    assert r.returncode == 2 and "--q-len: expected a positive integer" in r.stderr and "Traceback" not in r.stderr


def test_help_of_every_subcommand(capsys):
    for sub in ([], ["check"], ["bench"], ["mask"]):
        code, out, _ = _main(capsys, *sub, "--help")
        assert code == 0 and "usage: flexflash" in out, sub


@pytest.mark.parametrize("args,message", [
    (["mask", "nope"], "invalid choice"),
    (["mask", "causal", "--q-len", "0"], "--q-len: expected a positive integer"),
    (["mask", "document", "--q-len", "4", "--kv-len", "6", "--docs", "2,2"], "--docs: expected document lengths summing"),
    (["bench", "--seq-lens", "12,x"], "--seq-lens: expected comma-separated positive integers"),
    (["check", "--cases", "causal,nothing"], "--cases: unknown case(s) ['nothing']"),
    (["bench", "--device", "tpu"], "invalid choice"),
    (["bench", "--compile-mode", "fast"], "invalid choice"),
    ([], "flexflash: error: expected a command: one of check, bench, mask"),
    (["check", "--bogus"], "flexflash check: error: unrecognized arguments: --bogus"),
])
def test_bad_arguments_give_one_line_and_status_2(args, message, capsys):
    code, _, err = _main(capsys, *args)
    assert code == 2
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("args,usage,message", [
    ([], "usage: flexflash [-h]", "flexflash: error: expected a command: one of check, bench, mask"),
    (["--bogus"], "usage: flexflash [-h]", "flexflash: error: unrecognized arguments: --bogus"),
    (["check", "--bogus"], "usage: flexflash check [-h]", "flexflash check: error: unrecognized arguments: --bogus"),
    (["mask", "causal", "--bogus", "1"], "usage: flexflash mask [-h]",
     "flexflash mask: error: unrecognized arguments: --bogus 1"),
])
def test_a_missing_command_or_an_unknown_flag_prints_the_usage(args, usage, message, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(args)
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(usage) and captured.err.endswith(message + "\n")


def test_a_bad_value_still_gets_one_line(capsys):
    with pytest.raises(SystemExit):
        cli.main(["mask", "causal", "--q-len", "x"])
    assert capsys.readouterr().err.splitlines() == [
        "flexflash mask: error: argument --q-len: expected a positive integer, got 'x'"]


def test_check_help_lists_the_cases(capsys):
    gen = torch.Generator().manual_seed(0)
    built = list(cli.check._modifier_cases(2, 4, 2, 37, 53, gen, "cpu")) + list(cli.check._module_cases("cpu", gen)) + ["dropout"]
    assert cli.check.CHECK_CASES == built
    with pytest.raises(SystemExit) as stop:
        cli.main(["check", "--help"])
    assert stop.value.code == 0
    words = capsys.readouterr().out.replace(",", " ").split()
    assert all(name in words for name in built)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _screen(text: str) -> str:
    """What a terminal line shows after ``text``: each carriage return goes back to the start."""
    line: list[str] = []
    col = 0
    for ch in text:
        if ch == "\r":
            col = 0
        else:
            line[col:col + 1] = [ch]
            col += 1
    return "".join(line)


def test_progress_is_written_to_a_terminal_only_and_erased():
    pipe, tty = io.StringIO(), _Terminal()
    for stream in (pipe, tty):
        progress = cli._common._Progress(stream)
        progress.show("[1/2] causal_mask_bias ...")
        progress.show("[2/2] dense ...")
        assert _screen(stream.getvalue()).rstrip() == ("[2/2] dense ..." if stream is tty else "")
        progress.clear()
        progress.clear()  # nothing shown: nothing written
    assert pipe.getvalue() == ""
    assert _screen(tty.getvalue()).strip() == "" and tty.getvalue().endswith("\r")


def test_check_shows_progress_on_a_terminal_and_summarises_warnings_after_the_table(monkeypatch, capsys):
    def rows(device):  # instead of the dropout run (no compilation): warnings as a library gives them
        warnings.warn("flexflash: a note", UserWarning)
        warnings.warn("flexflash:   a\n note", UserWarning)  # the same text, another line
        warnings.warn("flexflash: recompiled", RuntimeWarning)
        return [("dropout", "dropped fraction - p", 0.0, 1.0, True)]
    monkeypatch.setattr(cli.check, "_dropout_rows", rows)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    with warnings.catch_warnings(record=True) as leaked:
        assert cli.main(["check", "--device", "cpu", "--cases", "dropout"]) == 0
    assert leaked == []
    out, err = capsys.readouterr().out, sys.stderr.getvalue()
    assert "dropped fraction - p" in out and "note" not in out and "[1/1]" not in out
    assert "\r[1/1] dropout ..." in err
    assert err.splitlines()[-3:] == ["flexflash check: 3 warnings during the run:",
                                     "  UserWarning (x2): flexflash: a note",
                                     "  RuntimeWarning: flexflash: recompiled"]


def test_spread_is_the_interquartile_range_over_the_median():
    assert cli.bench._spread([2.0]) == 0.0
    assert cli.bench._spread([1.0, 1.0, 1.0]) == 0.0
    assert cli.bench._spread([1.0, 2.0, 3.0]) == pytest.approx(0.5)  # quartiles 1.5 and 2.5
    assert cli.bench._spread([1.0] * 9 + [5.0]) == 0.0  # one descheduled repeat does not make a row noisy


def test_bench_warns_about_noisy_rows_and_writes_no_progress_into_a_pipe(monkeypatch, tmp_path, capsys):
    # In the order _impls gives them on CPU: flexflash, sdpa, reference; nothing is run or compiled.
    timings = itertools.cycle([cli.bench._Timing(1.0, 0.02, 12), cli.bench._Timing(2.0, 0.25, 8), cli.bench._Timing(3.0, 0.0, 3)])
    monkeypatch.setattr(cli.bench, "_timer", lambda device: lambda fn: next(timings))
    path = tmp_path / "b.json"
    assert cli.main(["bench", "--device", "cpu", "--cases", "causal,dense", "--seq-lens", "16",
                     "--json", str(path)]) == 0
    captured = capsys.readouterr()
    noisy = [line for line in captured.err.splitlines() if "too noisy" in line]
    assert len(noisy) == 2 and noisy[0].startswith("flexflash bench: warning: ")
    assert noisy[0].endswith(": causal N=16: sdpa 25% of 8") and noisy[1].endswith(": dense N=16: sdpa 25% of 8")
    assert "[1/2]" not in captured.err and "\r" not in captured.err  # stderr is not a terminal here
    rows = json.loads(path.read_text())["rows"]
    assert rows[0]["ms"] == {"flexflash": 1.0, "sdpa": 2.0, "reference": 3.0}
    assert rows[0]["spread"] == {"flexflash": 0.02, "sdpa": 0.25, "reference": 0.0}
    assert rows[0]["ratio"] == 2.0


def test_mask_title_is_wrapped_to_the_figure():
    title = "documents [3, 3, 3] (queries: the last 6 rows)"
    narrow = cli._common._wrap_title(title, 3, 9).splitlines()
    assert len(narrow) > 1 and all(len(line) <= 36 for line in narrow)  # (3 - 0.3) in * 72 / 5.4 pt
    assert " ".join(narrow) == title
    assert cli._common._wrap_title(title, 8, 9) == title


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
    captured = capsys.readouterr()
    out = captured.out
    assert "[1/3]" not in captured.err  # no progress line: stderr is not a terminal here
    assert "all 3 cases ok" in out and "FAIL" not in out
    assert "FlashMHA" in out and "d Wqkv.weight" in out and "dq (memory-bounded)" in out and "out (flex)" in out

    # A wrong fast path must be caught: perturb flexflash's output by a little more than rounding.
    real = cli.check.attention

    def wrong(*a, **kw):
        out = real(*a, **kw)
        return out + 1e-3 if isinstance(out, torch.Tensor) else out
    monkeypatch.setattr(cli.check, "attention", wrong)
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
        assert set(r["spread"]) == set(r["ms"]) and all(s >= 0 for s in r["spread"].values())
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
