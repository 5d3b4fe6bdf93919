import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings

# Hypothesis profiles: "ci" keeps the CPU suite well under 15 minutes on 2 cores (each new kind of
# call compiles a kernel, 5-10 s on CPU); "dev" is the default locally; "nightly" digs deeper.
_common = dict(deadline=None, derandomize=False, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=8, derandomize=True, **{k: v for k, v in _common.items() if k != "derandomize"})
settings.register_profile("dev", max_examples=15, **_common)
settings.register_profile("nightly", max_examples=300, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

warnings.filterwarnings("ignore", message=".*memory-bounded tiled path.*")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
