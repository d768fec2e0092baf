"""pytest configuration of the benchmark suites (run them with ``python benchmarks/run.py``).

The ``bench`` fixture gives the run's :class:`~benchmarks.harness.Settings` and
``bench.record(rec)``: it appends the record to ``TANGLE_BENCH_RECORDS`` (JSON lines,
flushed per record, so a run cut short keeps what it measured), then skips the test
when the provider was unavailable or out of time and fails it on an error.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks import harness

if os.environ.get("TANGLE_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["TANGLE_BENCH_THREADS"]))
if os.environ.get("TANGLE_BENCH_DEVICE") == "cuda":
    # what training runs use; the fused Triton linear uses tf32 dots too
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


class _Bench:
    def __init__(self) -> None:
        self.settings = harness.settings()

    def record(self, rec: dict) -> dict:
        if self.settings.records:
            with open(self.settings.records, "a") as f:
                f.write(json.dumps(rec, default=str) + "\n")
        status = rec["status"]
        if status.startswith(("unavailable", "skipped")):
            pytest.skip(status)
        if status != "ok":
            pytest.fail(status + "\n" + rec.get("traceback", ""), pytrace=False)
        return rec


@pytest.fixture(scope="session")
def bench() -> _Bench:
    return _Bench()
