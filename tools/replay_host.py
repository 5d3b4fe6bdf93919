"""Where a compiled decoding step's time goes between the host and the GPU: the steps of
``benchmarks/test_decode.py`` (``flash_attn_with_kvcache`` against SDPA on the padded cache with a
key padding mask), compiled with ``mode="reduce-overhead"`` (CUDA graphs) and their tensors at
static addresses as the benchmark compiles them.

Per case and step it prints, in µs (the least median of ``--rounds`` rounds of 50 steps, the
compiled steps timed in turn in each round): the step as the benchmark times it (CUDA events around the
call, then a synchronisation: the host's work before the graph's launch plus the graph's GPU
time), the host's time in the call alone (the call returns once the graph is queued; the GPU is
idle before it), the GPU time of the step's kernels (the profiler, default-mode compile of the
same step), and with ``--profile K`` the K functions with the most own host time over 200 calls
(cProfile): Dynamo's guards, the AOT wrappers, CUDA graph trees' checks of the inputs and outputs.
``--guard-filters``: flexflash's step also compiled with each guard filter
(``torch.compile(options={"guard_filter_fn": ...})``: :func:`flexflash.guard_filter` drops those on
flexflash itself; torch's ``globals`` skips the guards on all global state, ``tensors`` keeps those
on tensors alone, ``none dropped`` keeps every guard), to see what the compiled frame's guards cost.
``--general``: flexflash's steps through its general path (:func:`flexflash.attention`) rather than
the short decoding path that traced steps on CUDA take (``flexflash.compat._decoding``).

Usage on a CUDA machine::

    python tools/replay_host.py [--batch 1,64] [--cache 8192] [--lengths spread] [--layout contiguous,paged]
                                [--profile 15]
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import pstats
import re
import statistics
import sys
import time
import types
from pathlib import Path

import torch

import flexflash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_decode as bench  # noqa: E402  (the benchmark's shapes and static closures)
from decode_profile import case, kernels  # noqa: E402  (the benchmark's steps, the kernels' GPU time)


# the guard filters compared: flexflash's and torch's own (torch.compiler, torch 2.11 and 2.13)
FILTERS = {"flexflash.guard_filter": flexflash.guard_filter,
           "globals": getattr(torch.compiler, "skip_guard_on_globals_unsafe", None),
           "tensors": getattr(torch.compiler, "keep_tensor_guards_unsafe", None)}
FILTERS = {name: f for name, f in FILTERS.items() if f is not None}
FILTERS["none dropped"] = lambda entries: [True] * len(entries)  # (the options' path, every guard kept)


def _sync():
    if not bench.CPU:
        torch.cuda.synchronize()


def _own_code(fn, name: str):
    """``fn`` with a code object of its own, so that each variant keeps its compiled graph."""
    return types.FunctionType(fn.__code__.replace(co_name=re.sub(r"\W+", "_", name)), fn.__globals__, name,
                              fn.__defaults__, fn.__closure__)


def guard_check(own, name: str, folder: Path | None) -> tuple[int, float]:
    """(lines of the guard tree, µs of one check of it) of the compiled step ``own``, its tree
    written under ``folder``."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    entries = _debug_get_cache_entry_list(own.__code__)
    if len(entries) != 1:
        raise RuntimeError(f"{name}: {len(entries)} compiled entries, expected 1")
    manager = entries[0].guard_manager
    frame = {n: c.cell_contents for n, c in zip(own.__code__.co_freevars, own.__closure__ or ())}
    with torch.no_grad():  # (the steps were compiled without grad: a guard of the global state)
        if not manager.check(frame):
            raise RuntimeError(f"{name}: its guards fail on its own closure")
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            for _ in range(100):
                manager.check(frame)
            times.append((time.perf_counter() - t0) / 100 * 1e6)
    tree = str(manager)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / (re.sub(r"\W+", "_", name) + ".txt")).write_text(tree)
    return tree.count("\n"), statistics.median(times)


def split(fn, reps: int = 100) -> tuple[float, float]:
    """(median µs of a step between CUDA events with a synchronisation after it, median µs until
    the call returns), the GPU idle before each call."""
    steps, host = [], []
    for _ in range(reps):
        _sync()
        if bench.CPU:
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e6)
            steps.append(host[-1])
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        end.record()
        torch.cuda.synchronize()
        host.append((t1 - t0) * 1e6)
        steps.append(start.elapsed_time(end) * 1e3)
    return statistics.median(steps), statistics.median(host)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", default="1,64")
    p.add_argument("--cache", default="8192")
    p.add_argument("--lengths", default="spread")
    p.add_argument("--layout", default="contiguous,paged")
    p.add_argument("--profile", type=int, default=0, help="functions listed per step by own host time (0: none)")
    p.add_argument("--guard-filters", action="store_true", help="flexflash's step also with guard filters")
    p.add_argument("--general", action="store_true",
                   help="flexflash's steps through its general path, not the short decoding path "
                        "(flexflash.compat._decoding.TRACED_ON emptied)")
    p.add_argument("--guards", type=Path, default=None, metavar="DIR",
                   help="each step's guard tree written to DIR, and one check of its guards timed")
    p.add_argument("--rounds", type=int, default=5, help="rounds of 50 steps of each compiled step in turn")
    a = p.parse_args()
    if a.general:
        from flexflash.compat import _decoding
        _decoding.TRACED_ON.clear()
    if not bench.CPU:
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    sizes = lambda arg: [int(x) for x in arg.split(",")]  # noqa: E731
    for B, S, lengths, layout in itertools.product(sizes(a.batch), sizes(a.cache), a.lengths.split(","),
                                                   a.layout.split(",")):
        flex, sdpa = case(B, S, lengths == "spread", layout == "paged")
        steps = [("flexflash", flex, None), ("sdpa", sdpa, None)]
        if a.guard_filters:
            steps += [(f"flexflash, guards: {g}", flex, f) for g, f in FILTERS.items()]
        steps = [x for x in steps if not (x[0] == "sdpa" and layout == "paged")]
        torch._dynamo.reset()
        compiled = {}
        for name, step, guard_filter in steps:
            # (the same kernels with a guard filter: not profiled again)
            gpu = sum(us for _, _, us in kernels(step, 1000)) if guard_filter is None else float("nan")
            own = _own_code(bench.static_closure(step), name)  # (a Dynamo cache of its own)
            if guard_filter is None:
                fn = torch.compile(own, mode="default" if bench.CPU else "reduce-overhead", fullgraph=True)
            else:  # (reduce-overhead is the option triton.cudagraphs: a mode excludes options)
                fn = torch.compile(own, fullgraph=True, options={
                    "guard_filter_fn": guard_filter, "triton.cudagraphs": not bench.CPU})
            with torch.no_grad():
                for _ in range(5):
                    fn()
            _sync()
            if a.guards is not None:
                lines, us = guard_check(own, f"{B}-{S}-{lengths}-{layout}-{name}", a.guards)
                print(f"guards: {name}: {lines} lines in the tree, one check {us:.1f} µs", flush=True)
            compiled[name] = (fn, gpu)
        # rounds over the steps in turn, the least median of each: the host's noise
        # (other processes, clocks) falls on every step alike
        times = {name: [] for name in compiled}
        with torch.no_grad():
            for _ in range(a.rounds):
                for name, (fn, _) in compiled.items():
                    times[name].append(split(fn, 50))
        for name, (fn, gpu) in compiled.items():
            wall, host = min(w for w, _ in times[name]), min(h for _, h in times[name])
            row = dict(B=B, S=S, lengths=lengths, layout=layout, step=name,
                       wall_us=wall, host_us=host, kernels_us=gpu)
            rows.append(row)
            print(row, flush=True)
            if a.profile:
                prof = cProfile.Profile()
                prof.enable()
                with torch.no_grad():
                    for _ in range(200):
                        fn()
                        _sync()
                prof.disable()
                stats = pstats.Stats(prof)
                stats.sort_stats("tottime").print_stats(a.profile)
        del compiled
        torch._dynamo.reset()
        if not bench.CPU:
            torch.cuda.empty_cache()
    print("\n| batch | cache | lengths | layout | step | step µs | host µs in the call | kernels' GPU µs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['B']} | {r['S']} | {r['lengths']} | {r['layout']} | {r['step']} | {r['wall_us']:.0f} | "
              f"{r['host_us']:.0f} | {r['kernels_us']:.0f} |")


if __name__ == "__main__":
    main()
