"""Test configuration: seeds every test; CPU lane runs Triton in interpreter mode.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at the
top, unless the GPU lane (scripts/gpu_lane.sh sets TANGLE_GPU_LANE=1) runs.
"""

import os

if os.environ.get("TANGLE_GPU_LANE", "0") in ("", "0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning
# threads made steps 4-8x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (GPU lane: scripts/gpu_lane.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
