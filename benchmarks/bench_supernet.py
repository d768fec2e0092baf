"""One supernet training step (forward, backward to weights and architecture
parameters, AdamW step) of the nanoGPT space (tokens/s) and the conv-macro space
(images/s): ours vs the padded-sum supernet vs the plain max-size model."""

import pytest

from benchmarks import harness

_ST = harness.settings()


@pytest.mark.parametrize(("case", "provider"), harness.supernet_params(_ST),
                         ids=["-".join(p) for p in harness.supernet_params(_ST)])
def test_supernet_step(benchmark, bench, case, provider):
    benchmark.group = f"supernet {case}"
    bench.record(harness.run_supernet(case, provider, bench.settings, benchmark))
