"""Every code block of README.md runs: python blocks are executed, bash blocks' commands are run
(blocks marked ``<!-- no-test ... -->`` need a GPU, several processes or the network, and the test
command block is what runs this file; the install-command block is what CI installs with)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"(?:<!--\s*([\w-]+)[^>]*-->\s*\n)?```(python|bash)\n(.*?)```", re.S)


def _blocks():
    text = README.read_text()
    for n, m in enumerate(_BLOCK.finditer(text)):
        marker, lang, body = m.groups()
        line = text[:m.start()].count("\n") + 1
        if marker in ("no-test", "test-command", "install-command"):
            continue
        yield pytest.param(lang, body, id=f"{lang}-line{line}")


@pytest.mark.parametrize("lang,body", list(_blocks()))
def test_readme_block_runs(lang, body, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if lang == "python":
        exec(compile(body, str(README), "exec"), {"__name__": "readme"})
        return
    for command in body.splitlines():
        command = command.split("#", 1)[0].strip()
        if not command:
            continue
        assert command.startswith(("flexflash ", "python")), command
        if command.startswith("flexflash "):
            command = f"{sys.executable} -m flexflash {command[len('flexflash '):]}"
        r = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{command}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def test_the_blocks_are_found():
    assert len(list(_blocks())) >= 4
