"""``flexflash mask``: which keys each query may attend to, as text or an image."""

from __future__ import annotations


import torch

from .. import mods, reference
from ._common import UsageError, _int_list, _require_matplotlib, _split, _wrap_title


MASK_KINDS = ["causal", "sliding_window", "prefix_lm", "document", "padding"]


def _mask_fn(args):
    off = args.kv_len - args.q_len
    if args.kind == "causal":
        return mods.causal(off), f"causal, bottom-right (offset Nk - Nq = {off})"
    if args.kind == "sliding_window":
        return mods.sliding_window(args.window, offset=off), f"sliding window {args.window} (offset {off})"
    if args.kind == "prefix_lm":
        return mods.prefix_lm(args.prefix, offset=off), f"prefix-LM, prefix {args.prefix} (offset {off})"
    if args.kind == "document":
        lengths = _int_list(args.docs, "--docs")
        if sum(lengths) != args.kv_len:
            raise UsageError(f"--docs: expected document lengths summing to --kv-len={args.kv_len}, got {lengths} "
                             f"(sum {sum(lengths)})")
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
        return mods.document(ids[:, off:] if off >= 0 else ids, ids), f"documents {lengths} (queries: the last {args.q_len} rows)"
    valid = args.valid if args.valid is not None else args.kv_len
    return (mods.key_padding(torch.tensor([valid])), f"key padding: the first {valid} keys are valid")


def cmd_mask(args) -> int:
    if args.kind == "document" and args.q_len > args.kv_len:
        raise UsageError(f"--q-len: the document drawing needs --q-len <= --kv-len, got {args.q_len} > {args.kv_len}")
    if args.kind == "document" and args.docs is None:
        args.docs = ",".join(str(x) for x in _split(args.kv_len, 3))
    fn, title = _mask_fn(args)
    grid = fn(*reference.index_grids(1, 1, args.q_len, args.kv_len, "cpu")).expand(1, 1, args.q_len, args.kv_len)[0, 0]
    if args.png:
        _require_matplotlib("--png")
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        width = max(3, args.kv_len / 8)
        fig, ax = plt.subplots(figsize=(width, max(3, args.q_len / 8)))
        ax.imshow(grid.numpy(), cmap="Blues", interpolation="nearest", vmin=0, vmax=1)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        ax.set_title(_wrap_title(title, width, 9), fontsize=9)
        fig.tight_layout()
        # tight: the saved image grows to hold whatever still sticks out (a long word of the title).
        fig.savefig(args.png, dpi=110, bbox_inches="tight")
        print(f"wrote {args.png}")
        return 0
    print(f"{title}; Nq={args.q_len}, Nk={args.kv_len}; '#' = may attend, '.' = masked")
    for i, row in enumerate(grid.tolist()):
        print(f"{i:4d} " + "".join("#" if x else "." for x in row))
    return 0
