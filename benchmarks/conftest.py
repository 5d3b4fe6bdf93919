import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA device")
    for item in items:
        # benchmarks/test_attention.py runs on CPU too, with FLEXFLASH_BENCH_DEVICE=cpu
        if not (os.environ.get("FLEXFLASH_BENCH_DEVICE") == "cpu" and item.path.name == "test_attention.py"):
            item.add_marker(skip)
