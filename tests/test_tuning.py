"""The generator choice (flexflash._tuning.flash_choice) follows its measured table, and never
chooses FlashAttention-4 where it cannot run or was not measured faster; the tuned Triton tiles
apply only where they were measured."""

from __future__ import annotations

import functools
import itertools
import dataclasses
import types

import pytest
import torch

from flexflash import _tuning, mods
from flexflash._compose import Structure

CUDA = torch.device("cuda")
BF16 = torch.bfloat16


def work(B, H, N, D):
    return 4.0 * B * H * N * N * D


@pytest.fixture
def sm90_with_flash(monkeypatch):
    monkeypatch.setattr(_tuning, "_FLASH_AVAILABLE", [True])
    monkeypatch.setattr(_tuning, "capability", lambda device: (9, 0))


def test_choices_of_the_table(sm90_with_flash):
    # key padding with gradients wins from N = 4096 (B=4 H=16 D=128) up
    assert _tuning.flash_choice("key_padding", True, CUDA, BF16, 128, 128, work(4, 16, 4096, 128))
    assert not _tuning.flash_choice("key_padding", True, CUDA, BF16, 128, 128, work(16, 16, 1024, 128))
    # forward only: D=128 loses at N=4096 and wins at N=16384; D=64 wins at N=4096
    assert not _tuning.flash_choice("key_padding", False, CUDA, BF16, 128, 128, work(4, 16, 4096, 128))
    assert _tuning.flash_choice("key_padding", False, CUDA, BF16, 128, 128, work(1, 16, 16384, 128))
    assert _tuning.flash_choice("key_padding", False, CUDA, BF16, 64, 64, work(4, 32, 4096, 64))
    # dense: forward+backward only, where it beat cuDNN
    assert _tuning.flash_choice("dense", True, CUDA, BF16, 128, 128, work(1, 16, 16384, 128))
    assert not _tuning.flash_choice("dense", True, CUDA, BF16, 128, 128, work(4, 16, 4096, 128))
    assert not _tuning.flash_choice("dense", False, CUDA, BF16, 128, 128, work(1, 16, 16384, 128))


def test_never_where_not_measured_or_not_possible(sm90_with_flash, monkeypatch):
    big = work(1, 16, 16384, 128)
    assert not _tuning.flash_choice(None, True, CUDA, BF16, 128, 128, big)  # modifiers, biases, ...
    assert not _tuning.flash_choice("dense", True, CUDA, torch.float16, 128, 128, big)
    assert not _tuning.flash_choice("dense", True, CUDA, BF16, 80, 80, big)
    assert not _tuning.flash_choice("dense", True, CUDA, BF16, 128, 64, big)
    assert not _tuning.flash_choice("dense", True, torch.device("cpu"), BF16, 128, 128, big)
    monkeypatch.setattr(_tuning, "capability", lambda device: (8, 0))
    assert not _tuning.flash_choice("dense", True, CUDA, BF16, 128, 128, big)
    monkeypatch.setattr(_tuning, "capability", lambda device: (9, 0))
    torch.use_deterministic_algorithms(True)
    try:
        assert not _tuning.flash_choice("dense", True, CUDA, BF16, 128, 128, big)
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setattr(_tuning, "_FLASH_AVAILABLE", [False])  # the package is missing
    assert not _tuning.flash_choice("dense", True, CUDA, BF16, 128, 128, big)


def test_triton_tiles_only_where_measured(monkeypatch):
    monkeypatch.setattr(_tuning, "capability", lambda device: (9, 0))
    small = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3}
    wide = {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3}
    small_bwd = {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                 "bwd_num_warps": 4, "bwd_num_stages": 3}
    options = functools.partial(_tuning.triton_options, CUDA)
    for case in ("mask", "mask_mod"):  # D=128: mask tensors and mask_mods, bf16 and fp16
        for dtype in (BF16, torch.float16):
            tuned = options(dtype, 128, (128, 128), case=case)
            assert tuned == small
            assert not any(key.startswith("bwd_") for key in tuned)  # the backward keeps the defaults
        assert options(torch.float32, 128, (128, 128), case=case) is None
        assert options(BF16, 128, (32, 128), case=case) is None  # tiles divide blocks
        assert options(BF16, 80, (128, 128), case=case) is None
    # D=128: a bias, ALiBi, soft-capping, dense and causal keep the defaults
    for case in ("bias", "alibi", "tanh_softcap", None):
        assert options(BF16, 128, (128, 128), case=case) is None
    # D=64: 128x64 forward tiles for masks, mask_mods, biases and ALiBi; 64x64 for soft-capping;
    # 64x64 backward tiles for bf16 mask_mods and biases
    assert options(BF16, 64, (128, 128), case="mask") == wide
    assert options(torch.float16, 64, (128, 128), case="mask") == wide
    for case in ("mask_mod", "bias"):
        assert options(BF16, 64, (128, 128), case=case) == {**wide, **small_bwd}
        assert options(torch.float16, 64, (128, 128), case=case) == wide
        assert options(BF16, 64, (64, 128), case=case) is None  # 128 rows per forward tile
    assert options(BF16, 64, (128, 128), case="alibi") == wide
    assert options(BF16, 64, (128, 128), case="tanh_softcap") == small
    assert options(BF16, 64, (64, 64), case="tanh_softcap") == small
    assert options(BF16, 64, (128, 32), case="tanh_softcap") is None  # 64 columns per tile
    assert options(torch.float16, 64, (128, 128), case="alibi") is None  # not measured
    assert options(BF16, 64, (128, 128), case=None) is None
    assert _tuning.triton_options(torch.device("cpu"), BF16, 128, (128, 128), case="mask") is None
    # dense masks: 128x64 tiles, 8 warps at D=128 bf16; elsewhere the tiles of masks
    assert options(BF16, 128, (128, 128), case="dense_mask") == {**wide, "fwd_num_warps": 8}
    assert options(BF16, 128, (64, 128), case="dense_mask") is None  # 128 rows per forward tile
    assert options(torch.float16, 128, (128, 128), case="dense_mask") == small
    assert options(BF16, 64, (128, 128), case="dense_mask") == wide
    monkeypatch.setattr(_tuning, "capability", lambda device: (8, 0))
    assert options(BF16, 128, (128, 128), case="mask_mod") is None
    assert options(BF16, 128, (128, 128), case="dense_mask") is None


def test_triton_case_of_a_call():
    from flexflash._kinds import structure, triton_case
    q = torch.randn(1, 2, 8, 4)

    def case(**kw):
        kw = dict(dict(causal=False, mask=None, bias=None, mask_mod=None, score_mod=None), **kw)
        return triton_case(structure(q, q, **kw), kw["score_mod"])

    window, own = mods.sliding_window(2), (lambda s, b, h, i, j: s * 2)
    bias, mask = torch.randn(2, 8, 8), torch.rand(1, 8) > 0.5
    assert case() is None and case(causal=True) is None
    assert case(mask=mask) == "mask"
    dense = torch.rand(1, 1, 8, 8) > 0.5  # full along both sequence dimensions
    assert case(mask=dense) == "dense_mask" == case(mask=dense, causal=True)
    assert case(mask=torch.rand(1, 1, 8, 1) > 0.5) == "mask"  # a per-query mask
    assert case(mask=dense, mask_mod=window) == "mask_mod"
    assert case(mask=mask, mask_mod=window) == "mask_mod" == case(mask_mod=window, causal=True)
    assert case(bias=bias) == "bias" == case(bias=bias, causal=True, mask=mask, mask_mod=window)
    assert case(bias=bias, score_mod=mods.alibi(2)) is None  # not measured
    assert case(score_mod=mods.alibi(2), causal=True) == "alibi"
    assert case(score_mod=mods.tanh_softcap(5.0), mask_mod=window) == "tanh_softcap"
    assert case(score_mod=own) is None and case(score_mod=own, mask=mask) is None


def test_new_cases_of_the_table(sm90_with_flash):
    at_4096 = work(4, 16, 4096, 128)  # 5.5e11, where these were measured
    for case in ("causal", "gqa_causal", "softcap", "alibi_causal", "prefix_lm"):
        assert _tuning.flash_choice(case, True, CUDA, BF16, 128, 128, at_4096), case
        assert not _tuning.flash_choice(case, True, CUDA, BF16, 128, 128, work(4, 16, 2048, 128)), case
        # D=64 (B=4 H=32 at N=4096: the same work)
        assert _tuning.flash_choice(case, True, CUDA, BF16, 64, 64, at_4096), case
    # forward only: FLASH won for causal and soft-capping (and ALiBi at D=64), lost for the rest
    assert _tuning.flash_choice("causal", False, CUDA, BF16, 128, 128, at_4096)
    assert _tuning.flash_choice("softcap", False, CUDA, BF16, 128, 128, at_4096)
    assert _tuning.flash_choice("alibi_causal", False, CUDA, BF16, 64, 64, at_4096)
    for case in ("gqa_causal", "alibi_causal", "prefix_lm"):
        assert not _tuning.flash_choice(case, False, CUDA, BF16, 128, 128, 1e15), case
    assert not _tuning.flash_choice("gqa_causal", False, CUDA, BF16, 64, 64, at_4096)
    assert not _tuning.flash_choice("prefix_lm", False, CUDA, BF16, 64, 64, 1e15)
    # causal ties Triton at N=16384 B=1 (2.2e12): Triton there; soft-capping keeps FLASH
    for case in ("causal", "gqa_causal"):
        assert not _tuning.flash_choice(case, True, CUDA, BF16, 128, 128, work(1, 16, 16384, 128)), case
    assert _tuning.flash_choice("softcap", True, CUDA, BF16, 128, 128, work(1, 16, 16384, 128))


def _fake_cuda(*shape, requires_grad=False):
    """What flash_case reads of a tensor (device type, shape), for a CUDA call on a CPU machine."""
    return types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"), shape=shape, requires_grad=requires_grad)


def _case(q, k, *, causal=False, mask=None, mask_mod=None, score_mod=None, dropout=False, return_lse=False, Nk=None):
    from flexflash._kinds import flash_case
    from flexflash._fingerprint import inspect_modifier
    st = Structure(causal=causal, mask_full=None if mask is None else tuple(s > 1 for s in mask),
                   bias_full=None, has_mask_mod=mask_mod is not None, has_score_mod=score_mod is not None,
                   causal_aligned=causal and (Nk is None or Nk == q.shape[2]))
    return flash_case(st, q, k, mask_mod=mask_mod, score_mod=score_mod,
                      infos=(inspect_modifier(mask_mod), inspect_modifier(score_mod)), dropout=dropout,
                      return_lse=return_lse)


def test_flash_cases_are_made_of_flexflash_parts_only():
    """The generator table's cases are recognised by structure and by flexflash.mods' own code;
    everything else (the caller's functions, biases, other masks, offsets read from 0-d tensors,
    dropout, return_lse) is no case, so it stays on Triton."""
    q, k, kv4 = _fake_cuda(2, 16, 256, 128), _fake_cuda(2, 16, 256, 128), _fake_cuda(2, 4, 256, 128)
    assert _case(q, k) == "dense"
    assert _case(q, k, causal=True) == "causal"
    assert _case(q, kv4, causal=True) == "gqa_causal"
    assert _case(q, kv4) is None  # grouped heads without causal: not measured
    assert _case(q, k, mask=(2, 1, 1, 256)) == "key_padding"
    assert _case(q, k, mask=(1, 1, 256, 256)) is None
    assert _case(q, k, score_mod=mods.tanh_softcap(30.0)) == "softcap"
    assert _case(q, k, causal=True, score_mod=mods.alibi(16)) == "alibi_causal"
    assert _case(q, k, score_mod=mods.alibi(16)) is None  # measured with causal only
    assert _case(q, k, mask_mod=mods.prefix_lm(torch.tensor([3, 100]))) == "prefix_lm"
    assert _case(q, k, mask_mod=mods.prefix_lm(64)) == "prefix_lm"
    # a 0-d offset tensor (FLASH cannot read it), causal with Nq != Nk, the caller's own functions
    assert _case(q, k, mask_mod=mods.prefix_lm(64, offset=torch.tensor(0))) is None
    assert _case(q, k, causal=True, Nk=512) is None
    assert _case(q, k, score_mod=lambda s, b, h, i, j: 30.0 * torch.tanh(s / 30.0)) is None
    assert _case(q, k, mask_mod=mods.sliding_window(128)) is None  # slower on FLASH
    assert _case(q, k, mask_mod=mods.document(torch.zeros(256, dtype=torch.long))) is None
    assert _case(q, k, score_mod=mods.tanh_softcap(30.0), causal=True) is None  # a composition not measured
    assert _case(q, k, dropout=True) is None and _case(q, k, return_lse=True) is None


def test_family_names_flexflash_modifiers_only():
    assert mods.family(mods.tanh_softcap(2.0)) == "tanh_softcap"
    assert mods.family(mods.alibi(8, offset=3)) == "alibi"
    assert mods.family(mods.prefix_lm(torch.tensor([1, 2]))) == "prefix_lm"
    assert mods.family(mods.causal(2)) is None  # not a case of the generator table
    assert mods.family(lambda b, h, i, j: i >= j) is None
    assert mods.family(mods.and_masks(mods.causal(), mods.causal())) is None
    assert mods.family("not a function") is None


# --- the tables as data: flexflash/tuning.json, loaded once at import --------------------------
#
# The expected outputs below were computed from the tables as they stood in the code, before they
# moved to the data file, over the grid that follows; each string has one character per entry of
# BLOCKS (triton_options, dropout_pass_options) or of WORKS (flash_choice), "." where the function
# gives nothing (None, empty options, False). Every point of the grid not listed gives nothing.

BLOCKS = ((128, 128), (64, 64), (64, 128), (128, 64), (32, 128), (128, 32), (256, 256), (192, 128))
WORKS = (0.0, 1e11, 4.99e11, 5e11, 5.5e11, 1e12, 1.999e12, 2e12, 2.2e12, 1e15, float("inf"))
DTYPES = {"bf16": BF16, "fp16": torch.float16, "fp32": torch.float32}
CAPS = ((9, 0), (8, 0), (10, 0))
FWD_64 = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3}
FWD_128 = {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3}
BWD_64 = {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
          "bwd_num_warps": 4, "bwd_num_stages": 3}
TILES = {"A": FWD_128, "B": FWD_64, "C": {**FWD_128, "fwd_num_warps": 8}, "D": {**FWD_128, **BWD_64}}
TRITON_EXPECTED = {  # (case, head dim, dtype) -> a letter of TILES per block
    ("mask", 64, "bf16"): "A..A..A.", ("mask", 64, "fp16"): "A..A..A.",
    ("mask", 128, "bf16"): "BBBB..BB", ("mask", 128, "fp16"): "BBBB..BB",
    ("dense_mask", 64, "bf16"): "A..A..A.", ("dense_mask", 64, "fp16"): "A..A..A.",
    ("dense_mask", 128, "bf16"): "C..C..C.", ("dense_mask", 128, "fp16"): "BBBB..BB",
    ("mask_mod", 64, "bf16"): "D..D..D.", ("mask_mod", 64, "fp16"): "A..A..A.",
    ("mask_mod", 128, "bf16"): "BBBB..BB", ("mask_mod", 128, "fp16"): "BBBB..BB",
    ("bias", 64, "bf16"): "D..D..D.", ("bias", 64, "fp16"): "A..A..A.",
    ("alibi", 64, "bf16"): "A..A..A.", ("tanh_softcap", 64, "bf16"): "BBBB..BB",
}
DROPOUT_EXPECTED = {(128, "bf16"): "1111..11", (128, "fp16"): "1111..11"}  # (head dim, dtype)
DROPOUT_OPTIONS = (tuple(sorted(FWD_64.items())), tuple(sorted({**FWD_64, **BWD_64}.items())))
FLASH_EXPECTED = {  # (case, grad, head dim) -> "1" per work where FLASH is chosen
    ("dense", True, 64): "...1111111.", ("dense", True, 128): ".......111.",
    ("key_padding", True, 64): "...1111111.", ("key_padding", True, 128): "...1111111.",
    ("key_padding", False, 64): "...1111111.", ("key_padding", False, 128): ".......111.",
    ("causal", True, 64): "...1111....", ("causal", True, 128): "...1111....",
    ("causal", False, 64): "...1111....", ("causal", False, 128): "...1111....",
    ("gqa_causal", True, 64): "...1111....", ("gqa_causal", True, 128): "...1111....",
    ("softcap", True, 64): "...1111111.", ("softcap", True, 128): "...1111111.",
    ("softcap", False, 64): "...1111111.", ("softcap", False, 128): "...1111111.",
    ("alibi_causal", True, 64): "...1111111.", ("alibi_causal", True, 128): "...1111111.",
    ("alibi_causal", False, 64): "...1111111.",
    ("prefix_lm", True, 64): "...1111111.", ("prefix_lm", True, 128): "...1111111.",
}


def test_tables_load_from_the_data_file():
    import importlib.resources
    import json
    data = json.loads(importlib.resources.files("flexflash").joinpath("tuning.json").read_text())
    assert {"tiles", "dropout", "triton", "flash"} <= set(data)
    assert len(_tuning._TRITON_TILES) == len(data["triton"]) == 13
    assert len(_tuning._FLASH_MIN_WORK) == len(data["flash"]["min_work"]) == 21
    assert len(_tuning._FLASH_MAX_WORK) == len(data["flash"]["max_work"]) == 4


def test_triton_options_over_a_grid(monkeypatch):
    for cap, device, case, D, dtype in itertools.product(
            CAPS, (CUDA, torch.device("cpu")), (None, "mask", "dense_mask", "mask_mod", "bias", "alibi",
                                                 "tanh_softcap", "dense"), (64, 80, 128), DTYPES):
        monkeypatch.setattr(_tuning, "capability", lambda device, cap=cap: cap)
        expected = "." * len(BLOCKS)
        if device.type == "cuda" and cap == (9, 0):
            expected = TRITON_EXPECTED.get((case, D, dtype), expected)
        for block, letter in zip(BLOCKS, expected):
            got = _tuning.triton_options(device, DTYPES[dtype], D, block, case=case)
            want = None if letter == "." else list(TILES[letter].items())
            assert (got if got is None else list(got.items())) == want, (cap, device, case, D, dtype, block)
            if got is not None:
                got.clear()  # a fresh dict each call: the caller may change it
                assert _tuning.triton_options(device, DTYPES[dtype], D, block, case=case) == TILES[letter]


def test_dropout_pass_options_over_a_grid(monkeypatch):
    for cap, device, D, dtype in itertools.product(CAPS, (CUDA, torch.device("cpu")), (64, 80, 128), DTYPES):
        monkeypatch.setattr(_tuning, "capability", lambda device, cap=cap: cap)
        expected = "." * len(BLOCKS)
        if device.type == "cuda" and cap == (9, 0):
            expected = DROPOUT_EXPECTED.get((D, dtype), expected)
        for block, mark in zip(BLOCKS, expected):
            want = ((), ()) if mark == "." else DROPOUT_OPTIONS
            assert _tuning.dropout_pass_options(device, DTYPES[dtype], D, block) == want, (cap, device, D, dtype)


def test_flash_choice_over_a_grid(monkeypatch):
    for cap, available, deterministic in itertools.product(CAPS, (True, False), (False, True)):
        monkeypatch.setattr(_tuning, "capability", lambda device, cap=cap: cap)
        monkeypatch.setattr(_tuning, "_FLASH_AVAILABLE", [available])
        torch.use_deterministic_algorithms(deterministic)
        try:
            for device, case, grad, dtype, (D, Dv) in itertools.product(
                    (CUDA, torch.device("cpu")), (None, "dense", "key_padding", "causal", "gqa_causal", "softcap",
                                                  "alibi_causal", "prefix_lm", "mask"),
                    (True, False), ("bf16", "fp16"), ((64, 64), (128, 128), (128, 64), (64, 128), (80, 80))):
                expected = "." * len(WORKS)
                if (device.type == "cuda" and cap == (9, 0) and available and not deterministic
                        and dtype == "bf16" and D == Dv):
                    expected = FLASH_EXPECTED.get((case, grad, D), expected)
                got = "".join("1" if _tuning.flash_choice(case, grad, device, DTYPES[dtype], D, Dv, w) else "."
                              for w in WORKS)
                assert got == expected, (cap, available, deterministic, device, case, grad, dtype, D, Dv)
        finally:
            torch.use_deterministic_algorithms(False)


def test_work_counts_flops():
    assert _tuning.work(4, 16, 4096, 4096, 128) == 4.0 * 4 * 16 * 4096 * 4096 * 128 == 549755813888.0
    assert _tuning.work(1, 16, 16384, 16384, 128) == 2199023255552.0
    assert _tuning.work(2, 3, 5, 7, 11) == 9240.0


def _sized(shape, device="cuda", strides=None):
    """Stands for a contiguous tensor of ``shape`` on ``device`` (or of the given strides) where
    only its sizes are read: no memory taken, no GPU needed."""
    meta = torch.empty_strided(shape, strides or torch.empty(shape, device="meta").stride(), device="meta")
    return types.SimpleNamespace(shape=meta.shape, device=torch.device(device), stride=meta.stride)


def test_the_decoding_kernel_is_kept_off_inputs_past_32_bit_indices(monkeypatch):
    """Where an input of a call of fewer than 128 queries spans more than 2**31 - 1 elements (its
    strides counted, as Inductor counts them to choose 64-bit indices), FlexAttention's
    decoding template does not compile (torch 2.11-2.13, "Ternary expression with dynamic condition
    has inconsistent types int64 and int32"): the kernel is asked for its main kernel there
    (``FORCE_USE_FLEX_ATTENTION``), and not elsewhere, nor over a caller's own ``BACKEND``; the
    choice traces (torch 2.11's Dynamo did not trace the set operation it was once written with).
    Inside a caller's graph such calls raise."""
    from flexflash import _kernels
    from flexflash._kernels import needs_main_kernel

    q = _sized((64, 32, 1, 128))
    cache = _sized((64, 8, 32768, 128))  # 2**31 elements
    assert needs_main_kernel(q, cache, cache)
    smaller = _sized((64, 8, 32767, 128))
    assert not needs_main_kernel(q, smaller, smaller)
    assert needs_main_kernel(q, smaller, smaller, _sized((2**16, 2**15 + 1)))  # a buffer a modifier reads
    assert not needs_main_kernel(_sized((64, 32, 128, 128)), cache, cache)  # 128 queries: the main kernel
    # a view of stride 0 spans one row of its storage, whatever its shape
    assert not needs_main_kernel(q, _sized((64, 8, 2**24, 128), strides=(0, 0, 0, 1)), smaller)
    assert needs_main_kernel(q, _sized((64, 8, 2**24, 128), strides=(0, 0, 128, 1)), smaller)
    wide_out = _sized((2**25, 1, 1, 64))
    assert needs_main_kernel(wide_out, _sized((1, 1, 8, 64), strides=(0, 0, 64, 1)), _sized((1, 1, 8, 128)))

    seen = []
    monkeypatch.setattr(_kernels, "flex_attention", lambda *args, **kw: seen.append(kw["kernel_options"]))
    static = _kernels._Static(structure=None, block=(128, 128), scale=1.0, gqa=False, return_lse=False,
                              kernel_options=())
    _kernels._flex(None, None, None, None, None, static, False, main_kernel=True)
    _kernels._flex(None, None, None, None, None, static, False)
    flash = dataclasses.replace(static, kernel_options=(("BACKEND", "TRITON_DECODE"),))
    _kernels._flex(None, None, None, None, None, flash, False, main_kernel=True)
    assert seen == [{"FORCE_USE_FLEX_ATTENTION": True}, None, {"BACKEND": "TRITON_DECODE"}]
    # traced (Dynamo traces it inside every compiled kernel and caller's graph), with the same answer
    monkeypatch.setattr(_kernels, "flex_attention",
                        lambda q, k, v, **kw: q * 2 if (kw["kernel_options"] or {}).get("FORCE_USE_FLEX_ATTENTION") else q)
    traced = torch.compile(lambda x, main: _kernels._flex(x, x, x, None, None, static, False, main_kernel=main)[0],
                           backend="eager", fullgraph=True)
    x = torch.ones(2)
    assert traced(x, True).tolist() == [2.0, 2.0] and traced(x, False).tolist() == [1.0, 1.0]
    # Traced into a caller's graph (static shapes), such a call gave wrong outputs for every
    # sequence but the first (H100, torch 2.11): there it raises, naming the shapes; smaller
    # calls get the kernel's body to trace.
    from flexflash import _flex
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    kind = types.SimpleNamespace(structure=None, static=static, kind=("kind",))
    with pytest.raises(NotImplementedError, match=r"past 2\*\*31 - 1 elements \(q \(64, 32, 1, 128\), k \(64, 8, 32768"):
        _flex._kernel(kind, q, cache, cache, None, None, None, (128, 128), label=lambda: "x")
    body, _, _ = _flex._kernel(kind, q, smaller, smaller, None, None, None, (128, 128), label=lambda: "x")
    assert body.func is _kernels._flex_kernel
    assert _flex._kernel(kind, _sized((64, 32, 1, 128), "cpu"), cache, cache, None, None, None, (128, 128),
                         label=lambda: "x")[0].func is _kernels._flex_kernel


def test_the_32_bit_check_traced_over_several_shapes_compiles_one_graph():
    """Inside a caller's torch.compile (symbolic sizes) the check reads sizes and strides without
    breaking the graph, gives what it gives eagerly, and adds no recompilation over new lengths
    and batches."""
    from torch._dynamo.testing import CompileCounter

    from flexflash._kernels import needs_main_kernel

    def step(q, k, v):
        return q * 2 if needs_main_kernel(q, k, v) else q + 1

    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    # sizes that never coincide (duck sizing would guard on an equality) and never 1
    for B, Nq, Nk in ((5, 3, 64), (6, 9, 100), (7, 11, 70), (6, 13, 33)):
        q, k, v = torch.randn(B, 4, Nq, 8), torch.randn(B, 2, Nk, 8), torch.randn(B, 2, Nk, 8)
        assert not needs_main_kernel(q, k, v)
        torch.testing.assert_close(compiled(q, k, v), step(q, k, v))
    assert counter.frame_count == 1


def test_decoding_kernel_only_where_its_lowering_has_a_configuration(monkeypatch):
    """Calls of fewer queries than a query block take FlexAttention's decoding kernel (a static
    batch) only where its row tile, the queries of a key/value head's grouped query heads rounded up
    to a power of two (at least 16), divides the query block, the groups are a power of two and
    the batch of key/value heads fits the kernel's grid; elsewhere torch 2.11-2.13 finds no
    configuration or cannot launch it, and the main kernel runs (H100, torch 2.11: 97 queries with
    two grouped heads raised NoValidChoicesError; a dropout call of 300 x 256 heads failed with the
    static batch and passed without it), nor where the key/value cache is too large for 32-bit
    indices (H200, torch 2.11: 64 x 32,768 keys of 8 x 128 failed to compile)."""
    from flexflash._kinds import decoding_kernel

    def fits(B, Hq, Hkv, Nq, block=(128, 128), device="cuda", keys=4096, D=64):
        return decoding_kernel(_sized((B, Hq, Nq, D), device), _sized((B, Hkv, keys, D), device), block)

    assert fits(64, 32, 8, 1, keys=32767, D=128) and not fits(64, 32, 8, 1, keys=32768, D=128)
    assert fits(8, 32, 8, 1) and fits(64, 32, 8, 32) and fits(2, 4, 4, 97) and fits(2, 4, 2, 64)
    assert not fits(8, 32, 8, 33)  # 132 rows: a 256-row tile over 128-row blocks
    assert not fits(2, 4, 2, 97)  # 194 rows (the failure seen: NoValidChoicesError)
    assert fits(2, 4, 2, 97, block=(256, 128))
    assert not fits(8, 6, 2, 1)  # three grouped heads: FlexAttention keeps its main kernel
    assert not fits(300, 256, 256, 32)  # 76,800 batches of heads: past the grid's 65,535
    assert not fits(8, 32, 8, 128) and not fits(8, 32, 8, 0) and not fits(8, 32, 8, 1, device="cpu")
    # inside a caller's torch.compile its graph decides (no guards on its lengths from here)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not fits(8, 32, 8, 1)


def test_calls_of_a_short_query_block_leave_out_the_lists_of_full_blocks(monkeypatch):
    """A call of fewer query rows than a query block has no fully allowed block (its query block is
    incomplete). Where it runs FlexAttention's decoding kernel, the (empty) lists of full blocks
    are left out of its block mask: given at all, they make that kernel split the whole key length
    over its programs (torch 2.11-2.13, ``HAS_FULL_BLOCKS``) rather than each sequence's own key
    blocks. The decoding kernel is CUDA's; on CPU the decision is forced here, and the calls still
    agree with the reference. Calls of a whole query block keep their lists."""
    from flexflash import _flex, _kernels, _kinds, plan
    from .helpers import check_against_reference, randn

    monkeypatch.setattr(_kinds, "decoding_kernel", lambda q, k, block: 0 < q.shape[-2] < block[0])
    monkeypatch.setattr(plan, "_PLANS", {})
    seen = []
    call = _kernels._Kernel.__call__
    monkeypatch.setattr(_kernels._Kernel, "__call__", lambda kernel, *a: seen.append(a[3]) or call(kernel, *a))
    gen = torch.Generator().manual_seed(7)
    lengths = torch.tensor([300, 131])
    padding = mods.key_padding(lengths)
    with torch.no_grad():
        for Nq in (3, 128):
            q, k, v = (randn(2, 4, n, 16, gen=gen) for n in (Nq, 300, 300))
            check_against_reference(q, k, v, mask_mod=padding, causal=True, block_size=128)
            blocks = seen[-1]
            assert blocks[0] is not None and blocks[1] is not None
            assert all(t is None for t in (blocks[2], blocks[3], blocks[6], blocks[7])) == (Nq < 128), Nq
            if Nq == 128:  # the whole block of the last query rows allows every key of sequence 0
                assert int(blocks[2].sum()) > 0
    # traced into a caller's graph on CUDA: a static query length below a query block
    kind = types.SimpleNamespace(decoding=False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    q = _sized((8, 32, 1, 128))
    assert _flex._without_full_blocks(kind, q, 1, (128, 128))
    assert not _flex._without_full_blocks(kind, q, 128, (128, 128))
    assert not _flex._without_full_blocks(kind, _sized((8, 32, 1, 128), "cpu"), 1, (128, 128))
    monkeypatch.setattr(_flex, "_DECODING_FULL_BLOCKS", True)
    assert not _flex._without_full_blocks(types.SimpleNamespace(decoding=True), q, 1, (128, 128))


def test_each_batch_of_a_decoding_kind_compiles_with_a_static_batch(monkeypatch):
    """FlexAttention's lowering runs its decoding kernel only for a static query batch (torch
    2.11-2.13; flexflash._kinds._STATIC_DECODING_BATCH). Recompiling for a new shape, Dynamo makes
    every size that changed symbolic, so a new batch gets a kernel of its own: each batch compiles
    a graph whose batch is a constant, a new cache length reuses it, and more
    batches than Dynamo's recompile limit start no fresh cache (an H100 decoding step of batch 8
    after one of batch 1 ran the main kernel, 1.2 ms against 0.1 ms). The decoding kernel is
    CUDA's: on CPU the decision is forced here, with a backend that records each graph's inputs
    and runs it eagerly; the calls agree with the reference."""
    import warnings

    from flexflash import _kinds, _torch_private, plan
    from .helpers import check_against_reference, randn

    batches = []

    def backend(gm, example_inputs):  # per graph: the batches of q, k and v (ints where constant)
        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        batches.append([t.shape[0] for t in values if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[-1] == 16])
        return gm.forward

    monkeypatch.setattr(_torch_private, "inductor_backend", lambda: backend)
    monkeypatch.setattr(_kinds, "decoding_kernel", lambda q, k, block: 0 < q.shape[-2] < block[0])
    monkeypatch.setattr(plan, "_PLANS", {})
    gen = torch.Generator().manual_seed(8)
    window = mods.sliding_window(9)
    shapes = [(1, 40), (3, 40), (3, 57), (3, 61)] + [(B, 57) for B in range(4, 4 + _torch_private._recompile_limit())]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (a fresh compilation cache warns)
        for B, Nk in shapes:
            q, k, v = (randn(B, 2, n, 16, gen=gen) for n in (1, Nk, Nk))
            check_against_reference(q, k, v, mask_mod=window, causal=True, block_size=128)
    assert all(isinstance(n, int) and n == b[0] for b in batches for n in b), batches  # q's, k's and v's
    # a graph per batch: new lengths reuse it (lengths are symbolic from a kernel's first compilation)
    assert [b[0] for b in batches] == [1, 3] + list(range(4, 4 + _torch_private._recompile_limit()))


def test_decoding_options_only_where_measured_and_for_the_decoding_kernel(monkeypatch):
    """Calls that run FlexAttention's decoding kernel (eager ones with a static batch, and calls
    traced into a caller's graph with a static batch and query length) take the decoding entry
    of the table, on the GPU it was measured on, for its dtypes and head dims, its split a
    multiple of FlexAttention's own; every other call keeps the choices it had (the caller's own
    options win whole). The entry here is a stand-in, set up for the test."""
    from flexflash import _kinds
    entry = {"dtypes": ["bfloat16"], "head_dims": [128], "tiles": ["dec"], "split_factor": 2}
    monkeypatch.setitem(_tuning._DATA["tiles"], "dec", {"fwd_BLOCK_N": 64, "fwd_num_stages": 3})
    monkeypatch.setattr(_tuning, "_DECODING", _tuning.decoding_entry(entry))
    monkeypatch.setattr(_tuning, "_device_traits", lambda index: ((9, 0), 132))

    def call(B=8, Hq=32, Hkv=8, Nq=1, D=128, dtype=BF16, device="cuda", options=None, decoding=None,
             block=(128, 128)):
        def tensor(shape):
            t = _sized(shape, device)
            t.dtype, t.element_size, t.is_floating_point = dtype, lambda: dtype.itemsize, lambda: True
            t.requires_grad = False
            return t
        q, k = tensor((B, Hq, Nq, D)), tensor((B, Hkv, 4096, D))
        st = Structure.of(causal=False, mask=None, bias=None, mask_mod=None, score_mod=None)
        info = types.SimpleNamespace(tensors=(), fp=None)
        return _kinds.measured_options(st, q, k, k, bias=None, mask_mod=None, score_mod=None, infos=(info, info),
                                       block=block, kernel_options=options, dropout=False, return_lse=False,
                                       decoding=decoding)[0]

    # 132 SMs over 8 x 8 heads: FlexAttention's own split is 132 // 64 * 2 = 4
    assert call() == {"fwd_BLOCK_N": 64, "fwd_num_stages": 3, "SPLIT_KV": 8}
    # wide tiles, where the entry has them: from 132 (batch, kv head) pairs on, where they divide the blocks
    monkeypatch.setitem(_tuning._DATA["tiles"], "wide", {"fwd_BLOCK_N": 128, "fwd_num_warps": 4})
    monkeypatch.setattr(_tuning, "_DECODING", _tuning.decoding_entry({**entry, "wide_tiles": ["dec", "wide"]}))
    assert call(B=16) == {"fwd_BLOCK_N": 64, "fwd_num_stages": 3, "SPLIT_KV": 2 * (132 // 128 * 2)}
    assert call(B=17) == {"fwd_BLOCK_N": 128, "fwd_num_stages": 3, "fwd_num_warps": 4, "SPLIT_KV": 2}
    assert call(B=17, block=(128, 64)) == {"fwd_BLOCK_N": 64, "fwd_num_stages": 3, "SPLIT_KV": 2}
    monkeypatch.setattr(_tuning, "_DECODING", _tuning.decoding_entry(entry))
    assert call(B=64)["SPLIT_KV"] == 2 and call(B=1)["SPLIT_KV"] == 2 * (132 // 8 * 2)
    assert call(B=3)["SPLIT_KV"] == 2 * (132 // 24 * 2)  # (not 2 * 264 // 24)
    assert call(block=(128, 32)) is None  # 64-key tiles do not divide 32-key blocks: FlexAttention's own
    assert call(options={"BLOCK_N": 32}) == {"BLOCK_N": 32}  # the caller's own
    assert call(Nq=128) is None  # a query block: the main kernel, no tiles measured for it here
    assert call(dtype=torch.float16) is None and call(D=64) is None
    assert call(Hq=24) is None  # three grouped heads: the main kernel
    monkeypatch.setattr(_tuning, "_device_traits", lambda index: ((8, 0), 108))
    assert call() is None
    monkeypatch.setattr(_tuning, "_device_traits", lambda index: ((9, 0), 132))
    # traced into a caller's graph: a static batch and query length (the decoding kernel's own
    # condition there) take them; a symbolic batch would run the main kernel
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert call(decoding=False) == {"fwd_BLOCK_N": 64, "fwd_num_stages": 3, "SPLIT_KV": 8}
    monkeypatch.setattr(_kinds, "traced_decoding", lambda q, k, block: False)
    assert call(decoding=False) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(_tuning, "_DECODING", None)  # no entry: FlexAttention's defaults
    assert call() is None
    monkeypatch.undo()
    monkeypatch.setattr(_tuning, "_device_traits", lambda index: ((9, 0), 132))
    # the table as it ships: three pipeline stages (FlexAttention's own sm_90 choice, which its
    # heuristics overwrite with one: benchmarks/NOTES_TUNING.md), 16-bit dtypes, head dim 128
    # and 128-key tiles of four warps from as many (batch, kv head) pairs as SMs on: 17 x 8 >= 132
    wide = {"fwd_num_stages": 3, "fwd_BLOCK_N": 128, "fwd_num_warps": 4}
    for dtype in (BF16, torch.float16):
        assert call(dtype=dtype) == call(B=1, dtype=dtype) == call(B=16, dtype=dtype) == {"fwd_num_stages": 3}
        assert call(B=17, dtype=dtype) == call(B=64, dtype=dtype) == wide
    assert call(B=64, Hq=8, Hkv=2) == {"fwd_num_stages": 3}  # 128 pairs
    assert call(B=64, block=(128, 64)) == {"fwd_num_stages": 3}  # 128-key tiles do not divide 64-key blocks
    assert call(dtype=torch.float32) is None and call(D=64) is None


def test_decoding_options_traced_read_the_entry_as_constants(monkeypatch):
    """Inside a caller's torch.compile a decoding step's options are read from the decoding entry
    as a tuple of constants (``_tuning.DecodingEntry``): the options equal the eager ones, and the
    caller's graph guards neither the data file's nested dicts and lists nor the functions that
    read them (each value read there is a guard checked before every step). Set up for the CPU: a
    CUDA device object and its traits as a constant (no CUDA call is made)."""
    from .helpers import guard_trees

    monkeypatch.setattr(_tuning, "_device_traits", torch.compiler.assume_constant_result(lambda index: ((9, 0), 132)))
    device = torch.device("cuda", 0)

    def step(x):
        options = _tuning.decoding_options(device, x.dtype, x.shape[-1], 8, 8, (128, 128))
        return x + len(options)

    x = torch.zeros(2, 128, dtype=BF16)
    eager = _tuning.decoding_options(device, x.dtype, 128, 8, 8, (128, 128))
    assert eager == {"fwd_num_stages": 3}
    torch._dynamo.reset()
    assert torch.compile(step, backend="eager", fullgraph=True)(x)[0, 0] == len(eager)
    trees = guard_trees(step)
    assert len(trees) == 1 and "_DATA" not in trees[0] and "._tiles" not in trees[0], trees


def test_traced_decoding_takes_the_wide_tiles_by_a_static_batch_alone(monkeypatch):
    """Traced into a caller's graph, a decoding step whose batch is static takes the entry's wide
    tiles from one (batch, kv head) pair an SM on, as an eager call does; a symbolic batch takes
    the other tiles and adds no guard on its size (the step serves every batch with one graph).
    Set up for the CPU as above."""
    from .helpers import guard_trees

    monkeypatch.setattr(_tuning, "_device_traits", torch.compiler.assume_constant_result(lambda index: ((9, 0), 132)))
    device = torch.device("cuda", 0)
    narrow = _tuning.decoding_options(device, BF16, 128, 8, 8, (128, 128))
    wide = _tuning.decoding_options(device, BF16, 128, 64, 8, (128, 128))
    assert len(wide) == 3 and len(narrow) == 1  # (as the table ships: test_decoding_options_only_where_...)

    def step(x):
        options = _tuning.decoding_options(device, x.dtype, x.shape[-1], x.shape[0], 8, (128, 128))
        return x + len(options)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    assert compiled(torch.zeros(64, 128, dtype=BF16))[0, 0] == len(wide)
    torch._dynamo.reset()
    x = torch.zeros(64, 128, dtype=BF16)
    torch._dynamo.mark_dynamic(x, 0)
    assert compiled(x)[0, 0] == len(narrow)
    assert compiled(torch.zeros(5, 128, dtype=BF16))[0, 0] == len(narrow)
    trees = guard_trees(step)
    # the batch's guards: its range alone, no bound from the SMs (8 * batch >= 132, or batch >= 17)
    batch_guards = [line.split("#")[0] for line in trees[0].splitlines()
                    if "size()[0]" in line and "GuardManager" not in line]
    assert len(trees) == 1 and batch_guards, trees
    assert not any("132" in g or "17" in g for g in batch_guards), batch_guards
