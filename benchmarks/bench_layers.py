"""Entangled layers (linear, conv, attention), forward and forward+backward: ours vs
the padded-sum layer, its torch.compile, the mask-sum layer and the plain max-size
layer (the limit). Shapes: :func:`benchmarks.shapes.layer_cases`."""

import pytest

from benchmarks import harness

_ST = harness.settings()


@pytest.mark.parametrize(("case", "provider", "mode"), harness.layer_params(_ST),
                         ids=["-".join(p) for p in harness.layer_params(_ST)])
def test_layer(benchmark, bench, case, provider, mode):
    benchmark.group = f"layer {case} {mode}"
    bench.record(harness.run_layer(case, provider, mode, bench.settings, benchmark))
