"""Test configuration: seeds every test; CPU lane runs Triton in interpreter mode.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at the
top, unless the GPU lane (scripts/gpu_lane.sh sets TANGLE_GPU_LANE=1) runs.
"""

import os
import sys

# Tests live in folders that mirror the package (tests/ops, tests/nn, ...); their shared
# helpers (tol_util, linear_util, nn_util) live here, at the top of tests/.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if os.environ.get("TANGLE_GPU_LANE", "0") in ("", "0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning
# threads made steps 4-8x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Caches the package writes (the latency tables) go to a folder of this test session,
# never the user's ~/.cache.
if "TANGLE_CACHE" not in os.environ:
    import tempfile

    os.environ["TANGLE_CACHE"] = tempfile.mkdtemp(prefix="tangle-test-cache-")

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



# ------------------------------------------------------------------ CI skip guard
# Under CI (the CI environment variable set), a skip hides a test that should have run:
# the only skips allowed are the GPU ones (the ``gpu`` mark, a missing CUDA device or
# CUDA toolkit). Every skip reason is printed; any other skip fails the run.
_ALLOWED_SKIP_WORDS = ("CUDA device", "CUDA toolkit")
_MODELS_LANE_WORDS = "runs in the requirements/models.txt environment"
_SKIPS: list = []  # (nodeid, reason, allowed)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _skip_reason(report) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        return str(lr[2])
    return str(lr)


def _note_skip(report) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    allowed = "gpu" in getattr(report, "keywords", {}) or any(w in reason for w in _ALLOWED_SKIP_WORDS)
    # a test of the models lane (timm, torchvision) skipped here runs in that lane, which
    # scripts/test.sh starts after this one (it sets TANGLE_MODELS_LANE=pending)
    if os.environ.get("TANGLE_MODELS_LANE") == "pending" and _MODELS_LANE_WORDS in reason:
        allowed = True
    _SKIPS.append((report.nodeid, reason, allowed))


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_collectreport(report):
    _note_skip(report)  # module-level skips (pytestmark / allow_module_level)


def pytest_sessionfinish(session, exitstatus):
    if _in_ci() and any(not ok for _, _, ok in _SKIPS) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _SKIPS:
        return
    ci = _in_ci()
    terminalreporter.section("skip reasons")
    for nodeid, reason, ok in _SKIPS:
        tag = "skipped" if ok or not ci else "SKIPPED, NOT ALLOWED IN CI"
        terminalreporter.write_line(f"{tag}: {nodeid}: {reason}")
    bad = sum(not ok for _, _, ok in _SKIPS)
    if ci and bad:
        terminalreporter.write_line(
            f"CI: {bad} test(s) skipped for a reason other than the GPU lane (the `gpu` mark, "
            "a missing CUDA device or toolkit): the run fails", red=True, bold=True)
