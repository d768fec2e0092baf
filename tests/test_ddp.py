"""The search under torchrun: 2 processes, gloo on loopback (CPU). Every rank must draw
the same architecture noise, hold the same alphas and weights, and derive the same
architecture; the data batches differ per rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)
def test_two_rank_gloo_search_derives_the_same_arch(tmp_path):
    out = tmp_path / "ddp"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "MASTER_ADDR": "127.0.0.1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "tangle_kernels.search",
        "--preset",
        "tiny",
        "--hp",
        "block_size=16",
        "--data",
        "synthetic",
        "--batch-size",
        "4",
        "--steps",
        "6",
        "--optimizer",
        "gdas",
        "--set",
        "eval_batches=2",
        "--set",
        "arch_lr=0.05",
        "--out",
        str(out),
        "--no-progress",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "x 2 processes on cpu" in p.stdout
    arch = json.loads((out / "arch.json").read_text())
    d = arch["distributed"]
    assert d["world_size"] == 2 == arch["world_size"]
    assert d["rank_archs"][0] == d["rank_archs"][1] == arch["arch"]
    assert d["rank_alphas"][0] == d["rank_alphas"][1]  # bit for bit (JSON floats round-trip)
    assert d["rank_last_arch_sample"][0] == d["rank_last_arch_sample"][1] is not None
    assert d["rank_weights_sum"][0] == d["rank_weights_sum"][1]  # DDP kept the weights equal
    assert d["ranks_agree"] is True
    # the alphas moved (gradients flowed and were averaged, not zero)
    assert any(abs(v) > 1e-3 for vals in arch["alphas"].values() for v in vals)
    # only rank 0 writes the files: one metrics record per step
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(6))
