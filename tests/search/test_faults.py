"""Faults and fuzzing of the search driver (issue 24): a search killed with SIGKILL at
random points and resumed loses nothing (its alphas, derived architecture and metrics
equal the uninterrupted run's, bit for bit), and generated bad command lines end with a
clear one-line error or a successful run, never a traceback."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tangle_kernels.search.cli import main
from tangle_kernels.search.config import SearchConfig
from tangle_kernels.search.samplers import SAMPLERS

TINY = ["--preset", "tiny", "--hp", "block_size=16", "--batch-size", "2", "--no-progress",
        "--set", "eval_batches=1", "--data", "synthetic", "--threads", "1"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train_records(path):
    out = []
    for line in open(path, encoding="utf-8"):
        r = json.loads(line)
        if r["kind"] == "train":
            out.append((r["step"], r["train_loss"], r.get("arch_loss"), r["probs"], r["arch"]))
    return out


def _lines(path):
    try:
        with open(path, encoding="utf-8") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def test_sigkill_at_random_points_loses_nothing(tmp_path):
    steps = 10
    args = [*TINY, "--steps", str(steps), "--checkpoint-every", "1", "--sampler", "gdas"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    ref = json.loads((tmp_path / "ref" / "arch.json").read_text())

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(2024)
    kills = resumes = 0
    for attempt in range(12):
        ck = out / "checkpoint.pt"
        extra = ["--resume"] if ck.exists() else (["--overwrite"] if out.exists() else [])
        resumes += extra == ["--resume"]
        p = subprocess.Popen([sys.executable, "-m", "tangle_kernels.search", *args, "--out",
                              str(out), *extra], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        if kills < 3:
            # kill once the metrics reach a random step, a random few ms into the next one
            target = rng.randint(1, steps)
            t0 = time.monotonic()
            while p.poll() is None and time.monotonic() - t0 < 120:
                if _lines(out / "metrics.jsonl") >= target:
                    time.sleep(rng.uniform(0.0, 0.05))
                    break
                time.sleep(0.002)
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                kills += 1
        _, err = p.communicate(timeout=300)
        if p.returncode == 0:
            break
        assert p.returncode == -signal.SIGKILL, err
    assert kills == 3 and p.returncode == 0
    assert resumes >= 2  # the kills landed inside the run, after checkpoints
    got = json.loads((out / "arch.json").read_text())
    assert got["alphas"] == ref["alphas"]  # bitwise: JSON floats round-trip exactly
    assert got["arch"] == ref["arch"] and got["val"] == ref["val"]
    assert _train_records(out / "metrics.jsonl") == _train_records(tmp_path / "ref" / "metrics.jsonl")


# ---------------------------------------------------------------- fuzzing the CLI

_floats = st.one_of(st.sampled_from(["nan", "inf", "-inf", "0", "-1", "1e30", "abc", "1e-3"]),
                    st.floats(allow_nan=True, allow_infinity=True).map(repr))
_ints = st.one_of(st.integers(-3, 2).map(str), st.sampled_from(["1.5", "x", "", "-0"]))
_values = st.sampled_from(["-1", "0", "1", "2", "nan", "inf", "abc", "[1]", "1e30", "true", ""])
_fields = st.sampled_from([*SearchConfig.field_names(), "nope", "optimizer", ""])

_fragment = st.one_of(
    st.tuples(st.just("--steps"), _ints),
    st.tuples(st.just("--lr"), _floats),
    st.tuples(st.just("--arch-lr"), _floats),
    st.tuples(st.just("--batch-size"), _ints),
    st.tuples(st.just("--sampler"), st.sampled_from([*SAMPLERS, "bogus", ""])),
    st.tuples(st.just("--tau-max"), _floats),
    st.tuples(st.just("--precision"), st.sampled_from(["fp32", "bf16", "fp8", ""])),
    st.tuples(st.just("--device"), st.sampled_from(["cpu", "tpu", "cuda:99", "", "auto"])),
    st.tuples(st.just("--choice"), st.sampled_from(["embed=16", "embed=", "embed=17,x", "=1",
                                                    "heads=3", "nope=1", "embed"])),
    st.tuples(st.just("--hp"), st.sampled_from(["block_size=0", "block_size=x", "dropout=2",
                                                "nope=1", "block_size=16"])),
    st.tuples(st.just("--set"), st.builds(lambda k, v: f"{k}={v}", _fields, _values)),
    st.tuples(st.just("--data"), st.sampled_from(["synthetic", "/nonexistent/x.txt", "/", ""])),
)


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(_fragment, min_size=1, max_size=3))
def test_cli_bad_inputs_give_one_error_line_or_succeed(capsys, fragments):
    out = tempfile.mkdtemp(prefix="tk-fuzz-")
    argv = [*TINY, "--steps", "1", "--out", os.path.join(out, "o")]
    for flag, value in fragments:
        argv += [flag, value]
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    stdout, err = capsys.readouterr()
    assert "Traceback" not in stdout + err, argv
    lines = [line for line in err.strip().splitlines()
             if line and not line.startswith("tangle-search: warning: ")]
    if rc == 0:
        assert os.path.isfile(os.path.join(out, "o", "arch.json")), argv
        assert not lines, (argv, err)
    else:
        assert rc == 2, (argv, rc, err)
        assert len(lines) == 1 and lines[0].startswith("tangle-search: error: "), (argv, err)
