"""What the commands share: argument parsing helpers, the progress line, the warning summary."""

from __future__ import annotations

import sys
import textwrap
import warnings
from typing import TextIO

import torch


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class UsageError(Exception):
    """A bad command-line argument: reported in one line, exit status 2."""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    return torch.device(name)


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{name}: expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{name}: expected comma-separated positive integers, got {text!r}")
    return values


def _choices(text: str | None, known: list[str], name: str) -> list[str]:
    if text is None:
        return known
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in known]
    if unknown or not chosen:
        raise UsageError(f"{name}: unknown case(s) {unknown or text!r}; expected some of {', '.join(known)}")
    return chosen


class _Progress:
    """A status line on stderr (``[3/17] causal ...``), rewritten in place and erased before each
    result is printed, so that it never ends up between the rows of the stdout table. Written only
    when the stream is a terminal: in a pipe or a log file the carriage returns would leave every
    state behind, one after the other, in the middle of the output."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = sys.stderr if stream is None else stream  # read now: tests and callers swap sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        try:
            self.enabled = bool(isatty and isatty())
        except ValueError:  # a closed stream
            self.enabled = False
        self.width = 0

    def show(self, text: str) -> None:
        if self.enabled:
            self.stream.write("\r" + text + " " * max(0, self.width - len(text)))
            self.stream.flush()
            self.width = len(text)

    def clear(self) -> None:
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


def _warning_summary(caught: list[warnings.WarningMessage], command: str) -> list[str]:
    """The warnings recorded during a run, one line per distinct (category, message) with how often it
    came, printed after the table instead of in the middle of it."""
    counts: dict[tuple[str, str], int] = {}
    for w in caught:
        key = (w.category.__name__, " ".join(str(w.message).split()))
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        return []
    total = sum(counts.values())
    lines = [f"{command}: {total} warning{'s' * (total != 1)} during the run:"]
    lines += [f"  {category}{f' (x{n})' if n > 1 else ''}: {message}" for (category, message), n in counts.items()]
    return lines


def _require_matplotlib(option: str):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"{option}: drawing needs matplotlib, which is not installed; "
                         "install it with: pip install 'flexflash[plot]'") from None


def _wrap_title(title: str, width_in: float, fontsize: float) -> str:
    """The title broken into lines that fit a figure ``width_in`` inches wide: one line is centred over
    the axes and cut off at the figure's edges, which a narrow mask (3 inches) reached at about 40
    characters. A character is taken as 0.6 em wide, with a margin of 0.3 inch."""
    chars = max(10, int((width_in - 0.3) * 72 / (0.6 * fontsize)))
    return textwrap.fill(title, width=chars, break_long_words=False, break_on_hyphens=False)


def _split(n: int, parts: int) -> list[int]:
    parts = min(parts, n)
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]
