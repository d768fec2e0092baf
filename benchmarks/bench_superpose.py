"""Superpose op, forward and forward+backward: ours (each backend) vs the padded-sum
reference, torch.compile of it, the mask-sum formulation, and ``copy_`` of the weight
(the bandwidth floor). Shapes: :func:`benchmarks.shapes.op_cases`."""

import pytest

from benchmarks import harness

_ST = harness.settings()


@pytest.mark.parametrize(("case", "provider", "mode"), harness.op_params(_ST),
                         ids=["-".join(p) for p in harness.op_params(_ST)])
def test_superpose(benchmark, bench, case, provider, mode):
    benchmark.group = f"superpose {case} {mode}"
    bench.record(harness.run_op(case, provider, mode, bench.settings, benchmark))
