import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA device")
    for item in items:
        # the attention and decoding suites run on CPU too, with FLEXFLASH_BENCH_DEVICE=cpu
        if not (os.environ.get("FLEXFLASH_BENCH_DEVICE") == "cpu"
                and item.path.name in ("test_attention.py", "test_decode.py")):
            item.add_marker(skip)
