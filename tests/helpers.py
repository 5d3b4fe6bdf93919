"""Shared test helpers: inputs and tolerance checks relative to the reference's own error."""

from __future__ import annotations

import zlib

import torch

import flexflash


def seed_of(*parts) -> int:
    """A seed derived from test parameters, stable across processes (unlike ``hash`` of a str)."""
    return zlib.crc32(repr(parts).encode())

# Absolute floors added to "2x the reference's own error": where the reference happens to be
# (nearly) exact against fp64, a kernel that sums in a different order still differs by a few
# units in the last place of the output dtype.
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def randn(*shape, dtype=torch.float32, device="cpu", grad=False, gen=None):
    t = torch.randn(*shape, generator=gen, device="cpu", dtype=torch.float32).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def as64(x):
    """A float64 leaf copy of a floating tensor (other values pass through)."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().double().requires_grad_(x.requires_grad)
    return x


def assert_close_to_golden(name, got, ref, golden, dtype, factor=2.0):
    """``got`` (the path under test) may be at most ``factor`` times as far from the fp64 ``golden``
    as the reference computed in the test dtype (``ref``) is, plus a floor of a few ulps (FLOOR):
    the kernel may round differently, but not be less accurate than plain PyTorch."""
    got, ref, golden = got.double(), ref.double(), golden.double()
    assert got.shape == golden.shape, f"{name}: shape {tuple(got.shape)} != {tuple(golden.shape)}"
    finite = torch.isfinite(golden)
    assert torch.equal(torch.isfinite(got), finite), f"{name}: non-finite entries differ from the reference"
    if not finite.any():
        return
    err = (got - golden)[finite].abs().max().item()
    ref_err = (ref - golden)[finite].abs().max().item()
    bound = factor * ref_err + FLOOR[dtype] * max(1.0, golden[finite].abs().max().item())
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (reference's own error {ref_err:.3g})"


def check_against_reference(q, k, v, *, grads=True, dtype=None, dropout_seed=0, **kw):
    """Runs flexflash.attention (auto backend) and the reference in the test dtype and in fp64;
    compares outputs (and, with ``grads``, gradients of every input that requires grad). With
    ``dropout_p`` in ``kw``, every call starts from ``torch.manual_seed(dropout_seed)``, so all
    three drop the same entries."""
    dtype = dtype or q.dtype
    leaves = {n: t for n, t in dict(q=q, k=k, v=v, bias=kw.get("bias")).items()
              if isinstance(t, torch.Tensor) and t.requires_grad}
    reseed = (lambda: torch.manual_seed(dropout_seed)) if kw.get("dropout_p", 0) > 0 else (lambda: None)
    reseed()
    out = flexflash.attention(q, k, v, **kw)
    reseed()
    ref = flexflash.reference.attention(q, k, v, **{a: b for a, b in kw.items() if a not in ("block_size", "backend", "kernel_options")})
    kw64 = {a: as64(b) for a, b in kw.items() if a not in ("block_size", "backend", "kernel_options")}
    q64, k64, v64 = as64(q), as64(k), as64(v)
    if "bias" in kw64 and kw64["bias"] is not None:
        leaves64 = dict(q=q64, k=k64, v=v64, bias=kw64["bias"])
    else:
        leaves64 = dict(q=q64, k=k64, v=v64)
    reseed()
    gold = flexflash.reference.attention(q64, k64, v64, **kw64)
    assert out.dtype == q.dtype
    assert_close_to_golden("out", out, ref, gold, dtype)
    if grads and leaves:
        g = torch.randn(out.shape, dtype=torch.float32).to(out)
        names = list(leaves)
        got = torch.autograd.grad(out, [leaves[n] for n in names], g)
        want = torch.autograd.grad(ref, [leaves[n] for n in names], g)
        gold_g = torch.autograd.grad(gold, [leaves64[n] for n in names], g.double())
        for n, a, b, c in zip(names, got, want, gold_g):
            assert_close_to_golden(f"d{n}", a, b, c, dtype)
    return out


def guard_trees(fn) -> list[str]:
    """The guard trees of the graphs Dynamo compiled for ``fn``'s code object, as text (one per
    cache entry): what a call of the compiled function checks before it runs its graph."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    return [str(entry.guard_manager) for entry in _debug_get_cache_entry_list(fn.__code__)]


_SHORT_PATH: list[int] = []


def spied_short_path(monkeypatch) -> list[int]:
    """A list that grows by one each time Dynamo traces a call of flash_attn_with_kvcache's short
    decoding path (``flexflash.compat._decoding.step``), appended to at trace time by ``comptime``:
    a list the traced code appended to would be state the graph guards on (a recompilation per
    step)."""
    from torch._dynamo.comptime import comptime

    from flexflash.compat import _decoding
    _SHORT_PATH.clear()
    real = _decoding.step

    def spied(*args, **kwargs):
        comptime(lambda ctx: _SHORT_PATH.append(1))  # (a comptime function closes over nothing: a global)
        return real(*args, **kwargs)
    monkeypatch.setattr(_decoding, "step", spied)
    return _SHORT_PATH
