"""Every code block of README.md and of docs/*.md runs: python blocks are executed, bash blocks'
commands are run (blocks marked ``<!-- no-test ... -->`` need a GPU, several processes or the
network, and the test command block is what runs this file; the install-command block is what CI
installs with). Relative links of these files point at files that exist, and every docs/*.md is
linked from the README."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
_BLOCK = re.compile(r"(?:<!--\s*([\w-]+)[^>]*-->\s*\n)?```(python|bash)\n(.*?)```", re.S)
_FENCE = re.compile(r"^```(python|bash)$", re.M)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _blocks(path: Path):
    text = path.read_text()
    for m in _BLOCK.finditer(text):
        marker, lang, body = m.groups()
        line = text[:m.start()].count("\n") + 1
        if marker in ("no-test", "test-command", "install-command"):
            continue
        yield pytest.param(path, lang, body, id=f"{path.name}-{lang}-line{line}")


@pytest.mark.parametrize("path,lang,body", [b for path in _documents() for b in _blocks(path)])
def test_readme_block_runs(path, lang, body, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if lang == "python":
        exec(compile(body, str(path), "exec"), {"__name__": "readme"})
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
    assert len(list(_blocks(README))) >= 4
    for path in _documents():
        # every python/bash fence is a block the pattern sees (tested or marked), none slips past it
        text = path.read_text()
        assert len(_FENCE.findall(text)) == len(_BLOCK.findall(text)), path.name


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings (lower case, punctuation dropped, spaces to -)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("path", _documents(), ids=lambda p: p.name)
def test_links_resolve(path):
    for target in _LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        file = (path.parent / file).resolve() if file else path
        assert file.exists(), f"{path.name}: {target}"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file), f"{path.name}: {target}: no such heading"


def test_every_doc_is_linked_from_the_readme():
    docs = sorted(DOCS.glob("*.md"))
    assert docs, "no docs/*.md"
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _LINK.findall(README.read_text())}
    for doc in docs:
        assert doc.resolve() in linked, f"{doc.name} is not linked from README.md"
