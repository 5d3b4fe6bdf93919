"""The ``flexflash`` command line (also ``python -m flexflash``): ``check``, ``bench`` and ``mask``.

* ``flexflash check`` runs every modifier, every module and the dropout statistics against the eager
  reference on a device and prints a table (case, max error, tolerance, ok); it exits 1 when a case
  fails. Warnings raised during the run are summarised on stderr after the table.
* ``flexflash bench`` times flexflash against SDPA's backends (and the reference where it fits) on a
  table of shapes, printing ms, TFLOP/s and the ratio; ``--json`` and ``--plot`` save them. It warns
  on stderr about rows whose repeats are too far apart to compare.
* ``flexflash mask`` draws a mask as text or, with ``--png``, as an image.

Both long commands show a progress line on stderr, only when stderr is a terminal (stdout, the
table, never gets it). A missing command or an unknown flag prints the usage and an error naming it;
a bad value prints a one-line error naming the argument and the values expected. Neither prints a
traceback; both exit 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

import torch

from .. import __version__
from ._common import DTYPES, UsageError
from .bench import BENCH_CASES, cmd_bench
from .check import CHECK_CASES, cmd_check
from .mask import MASK_KINDS, cmd_mask


class _Parser(argparse.ArgumentParser):
    commands: dict[str, argparse.ArgumentParser]  # the top-level parser's subcommands (build_parser)

    def error(self, message):  # one line, exit status 2, no traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _device_and_dtype(parser: argparse.ArgumentParser) -> None:
    """The --device and --dtype options that check and bench share."""
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flexflash", description="flexflash: attention as FlexAttention mask/score functions.")
    parser.add_argument("--version", action="version", version=f"flexflash {__version__} (torch {torch.__version__})")
    # Not required=True: argparse would then say "the following arguments are required: command"
    # without the usage; main() prints the usage itself.
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    parser.commands = sub.choices

    check = sub.add_parser("check", help="check every modifier, module and dropout against the reference",
                           description="Runs every modifier (forward and backward), every module and the dropout "
                                       "statistics against the eager reference; exits 1 on any failure.")
    _device_and_dtype(check)
    check.add_argument("--cases", help=f"comma-separated subset of {', '.join(CHECK_CASES)} (default: all)")
    check.add_argument("-v", "--verbose", action="store_true", help="print the time of each case")
    check.set_defaults(func=cmd_check)

    bench = sub.add_parser("bench", help="time flexflash against SDPA's backends",
                           description="Times flexflash, SDPA's backends and (where it fits) the reference; prints "
                                       "ms, TFLOP/s and the ratio best SDPA / flexflash. Small shapes on CPU.")
    _device_and_dtype(bench)
    bench.add_argument("--cases", help=f"comma-separated subset of {', '.join(BENCH_CASES)}")
    bench.add_argument("--seq-lens", help="comma-separated sequence lengths (default 1024,2048,4096 on CUDA, "
                                          "128,256,512 on CPU)")
    bench.add_argument("--compile-mode", choices=["default", "max-autotune"],
                       help="flexflash's compile mode for this run (default: the current one, see "
                            "flexflash.set_compile_mode)")
    bench.add_argument("--json", metavar="PATH", help="write the results as JSON")
    bench.add_argument("--plot", metavar="PNG", help="draw TFLOP/s against sequence length (needs matplotlib)")
    bench.set_defaults(func=cmd_bench)

    mask = sub.add_parser("mask", help="draw a mask as text or PNG",
                          description="Draws which keys each query may attend to.")
    mask.add_argument("kind", choices=MASK_KINDS)
    mask.add_argument("--q-len", type=_positive, default=8)
    mask.add_argument("--kv-len", type=_positive, default=None, help="default: --q-len")
    mask.add_argument("--window", type=_positive, default=3, help="sliding_window: keys per query")
    mask.add_argument("--prefix", type=_positive, default=2, help="prefix_lm: prefix length")
    mask.add_argument("--docs", help="document: comma-separated document lengths summing to --kv-len")
    mask.add_argument("--valid", type=_positive, help="padding: number of valid keys (default: all)")
    mask.add_argument("--png", metavar="PATH", help="write a PNG instead of text (needs matplotlib)")
    mask.set_defaults(func=cmd_mask)
    return parser


def _usage_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """The usage, then the error: for a missing command or an unknown flag, where the user needs to
    see what there is (a bad value gets _Parser.error's one line, which names the values expected)."""
    parser.print_usage(sys.stderr)
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        where = parser.commands[args.command] if args.command else parser
        _usage_error(where, f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        _usage_error(parser, f"expected a command: one of {', '.join(parser.commands)}")
    if getattr(args, "kv_len", 0) is None:
        args.kv_len = args.q_len
    try:
        return args.func(args)
    except UsageError as e:
        print(f"flexflash {args.command}: error: {e}", file=sys.stderr)
        return 2
