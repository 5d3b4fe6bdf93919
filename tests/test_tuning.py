"""The generator choice (flexflash._tuning.flash_choice) follows its measured table, and never
chooses FlashAttention-4 where it cannot run or was not measured faster."""

from __future__ import annotations

import pytest
import torch

from flexflash import _tuning

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


def test_masked_forward_tiles_only_where_measured(monkeypatch):
    monkeypatch.setattr(_tuning, "capability", lambda device: (9, 0))
    tuned = _tuning.masked_options(CUDA, BF16, 128, (128, 128))
    assert tuned == {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3}
    assert not any(key.startswith("bwd_") for key in tuned)  # the backward keeps the defaults
    assert _tuning.masked_options(CUDA, torch.float16, 128, (128, 128)) is None
    assert _tuning.masked_options(CUDA, BF16, 64, (128, 128)) is None
    assert _tuning.masked_options(CUDA, BF16, 128, (32, 128)) is None  # tiles must divide the blocks
    assert _tuning.masked_options(torch.device("cpu"), BF16, 128, (128, 128)) is None
    monkeypatch.setattr(_tuning, "capability", lambda device: (8, 0))
    assert _tuning.masked_options(CUDA, BF16, 128, (128, 128)) is None
