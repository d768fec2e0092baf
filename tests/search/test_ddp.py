"""The search under torchrun: 2 processes, gloo on loopback (CPU). Every rank must draw
the same architecture noise, hold the same alphas and weights, and derive the same
architecture; the data batches differ per rank.

The ranks run the search module through a small wrapper (written next to the run's
output) that records what the output files cannot show: each rank's initial alphas
and a digest of every batch it drew."""

from __future__ import annotations

import json
import math
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
    rec_dir = tmp_path / "record"
    rec_dir.mkdir()
    wrapper = tmp_path / "record_ranks.py"
    wrapper.write_text(RECORDER)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "MASTER_ADDR": "127.0.0.1",
        "TK_TEST_RECORD": str(rec_dir),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(wrapper),
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
        "--set",  # no decay: only the (averaged) gradients can move the alphas
        "arch_weight_decay=0",
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
    # the alphas moved from their initial values (the same on both ranks): gradients
    # flowed and were averaged, not zero (no weight decay could move them)
    init = [json.loads((rec_dir / f"alphas0_rank{r}.json").read_text()) for r in (0, 1)]
    assert init[0] == init[1] and set(init[0]) == set(arch["alphas"])
    for n, vals in arch["alphas"].items():
        moved = max(abs(a - b) for a, b in zip(vals, init[0][n]))
        assert moved > 1e-3, (n, vals, init[0][n])
    # the data batches differ per rank (each rank draws its own shard of the stream),
    # for every split and step both ranks drew
    drawn = []
    for r in (0, 1):
        lines = (rec_dir / f"batches_rank{r}.jsonl").read_text().splitlines()
        drawn.append({(split, step): h for split, step, h in map(json.loads, lines)})
    assert drawn[0].keys() == drawn[1].keys()
    assert {k for k in drawn[0] if k[0] == "train"} == {("train", i) for i in range(6)}
    same = [k for k in drawn[0] if drawn[0][k] == drawn[1][k]]
    assert not same, f"ranks drew identical batches at {same}"
    # only rank 0 writes the files: one metrics record per step
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(6))


RECORDER = """
import hashlib, json, os, runpy, sys

from tangle_kernels.search import engine

out = os.environ["TK_TEST_RECORD"]
rank = int(os.environ.get("RANK", "0"))
_batch, _setup = engine.Search._batch, engine.Search.setup


def batch(self, split, step):
    b = _batch(self, split, step)
    h = hashlib.sha256(b[0].detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    with open(os.path.join(out, f"batches_rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps([split, step, h]) + "\\n")
    return b


def setup(self, *args, **kwargs):
    r = _setup(self, *args, **kwargs)
    alphas = {n: a.detach().cpu().tolist() for n, a in self.sampler.alphas.items()}
    with open(os.path.join(out, f"alphas0_rank{rank}.json"), "w") as f:
        json.dump(alphas, f)
    return r


engine.Search._batch, engine.Search.setup = batch, setup
sys.argv = ["tangle_kernels.search", *sys.argv[1:]]
runpy.run_module("tangle_kernels.search", run_name="__main__", alter_sys=True)
"""


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)
def test_two_rank_search_under_a_budget_with_a_race_agrees(tmp_path):
    """Issue 26/28 under DDP: the budget's Lagrange term and the race run on every rank
    (same noise, same seeds), the latency table is rank 0's; the ranks derive one
    architecture within the budget."""
    from tangle_kernels.nn.cost import CostModel
    from tangle_kernels.spaces import make_space

    sp = make_space("nanogpt", preset="tiny", hparams={"block_size": 16})
    data = sp.make_data("synthetic")
    model = sp.build_supernet(data)
    x, _ = data.batch("val", 2)
    lo, hi = CostModel(model, sp.choices, example=x).bounds("params")
    limit = int(lo + 0.4 * (hi - lo))
    out = tmp_path / "ddp-budget"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "MASTER_ADDR": "127.0.0.1", "TANGLE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tangle_kernels.search", "--preset", "tiny", "--hp", "block_size=16",
           "--data", "synthetic", "--batch-size", "4", "--steps", "5", "--sampler", "drnas",
           "--max-params", str(limit), "--set", "eval_batches=2", "--set", "select=race",
           "--set", "race_archs=3", "--set", "budget_mode=lagrange", "--retrain-steps", "2",
           "--out", str(out),
           # a latency limit every architecture meets: rank 0 measures the table, the
           # other rank prices with it (a table per rank could split the ranks)
           "--max-latency-ms", "1e6", "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    arch = json.loads((out / "arch.json").read_text())
    d = arch["distributed"]
    assert d["rank_archs"][0] == d["rank_archs"][1] == arch["arch"]
    assert d["ranks_agree"] is True
    assert arch["costs"]["params"] <= limit and arch["budget_margin"]["params"] >= 0
    assert "budget_multipliers" in arch
    assert arch["budget"]["max_latency_ms"] == 1e6 and 0 < arch["costs"]["latency"] < 1e6
    assert math.isfinite(arch["latency_table"]["rest_ms"])
    race = arch["race"]
    assert race["contenders"][race["winner"]]["arch"] == arch["arch"]
    assert all(e["params"] <= limit for e in race["contenders"])
