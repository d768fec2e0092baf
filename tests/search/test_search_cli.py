"""The ``tangle-search`` command line: a tiny end-to-end run with its output files, the
``train`` and ``spaces`` commands, and malformed arguments ending with one clear error
line and a non-zero exit status (never a traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from cli_util import run_cli

from tangle_kernels.search.cli import main

TINY = [
    "--preset",
    "tiny",
    "--hp",
    "block_size=16",
    "--batch-size",
    "4",
    "--no-progress",
    "--set",
    "eval_batches=2",
]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_run = run_cli


def test_cli_search_train_and_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = _run(
        [
            "--space",
            "nanogpt",
            "--optimizer",
            "gdas",
            "--data",
            "synthetic",
            "--steps",
            "4",
            "--checkpoint-every",
            "2",
            "--retrain-steps",
            "2",
            "--out",
            str(out),
            "--seed",
            "3",
            *TINY,
        ],
        capsys,
    )
    assert rc == 0, err
    assert (
        "derived architecture:" in stdout
        and "validation (inherited supernet weights): loss" in stdout
    )
    assert "trained from scratch, 2 steps" in stdout
    # the nanoGPT space's default final selection: a race at the retraining's budget
    assert "race (4 most probable contenders from scratch, 2 steps each)" in stdout
    assert "'confident' is their margin, not evidence" in stdout
    arch = json.loads((out / "arch.json").read_text())
    assert arch["optimizer"] == "gdas" and arch["seed"] == 3 and arch["steps"] == 4
    assert set(arch["alphas"]) == {"embed", "heads", "mlp_ratio", "layers"}
    assert arch["space_config"]["hparams"]["block_size"] == 16
    for name in ("metrics.jsonl", "checkpoint.pt"):
        assert (out / name).exists()
    taus = [
        json.loads(line).get("tau") for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert taus[0] == pytest.approx(10.0) and taus[3] == pytest.approx(0.1)  # linear annealing
    if _has_matplotlib():
        assert (out / "alphas.png").exists()

    # a finished run resumed: nothing left to train, same architecture
    def train_records():
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r for r in recs if r["kind"] == "train"]

    train_before = train_records()
    assert [r["step"] for r in train_before] == [0, 1, 2, 3]
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 4
    rc, stdout2, err = _run(
        [
            "--optimizer",
            "gdas",
            "--data",
            "synthetic",
            "--steps",
            "4",
            "--out",
            str(out),
            "--seed",
            "3",
            "--retrain-steps",  # the same race (the space's default final selection)
            "2",
            "--resume",
            *TINY,
        ],
        capsys,
    )
    assert rc == 0, err
    assert json.loads((out / "arch.json").read_text())["arch"] == arch["arch"]
    assert "at step 4/4" in stdout2, stdout2  # resumed at the end
    assert train_records() == train_before  # no step was trained again
    resumed = json.loads((out / "arch.json").read_text())
    assert resumed["alphas"] == arch["alphas"]  # nothing moved the alphas

    rc, stdout, err = _run(
        ["train", str(out / "arch.json"), "--steps", "2", "--no-progress", "--batch-size", "4"],
        capsys,
    )
    assert rc == 0, err
    scratch = json.loads((out / "scratch.json").read_text())
    assert scratch["arch"] == arch["arch"] and scratch["steps"] == 2
    assert scratch["params"] == arch["params"]
    assert "validation (trained from scratch, 2 steps)" in stdout


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_cli_spaces_lists_all_seven(capsys):
    rc, out, _ = _run(["spaces"], capsys)
    assert rc == 0
    names = [line.split()[0] for line in out.strip().splitlines()]
    assert names == [
        "nanogpt",
        "conv-macro",
        "entangled-cell",
        "nb201",
        "darts",
        "autoformer",
        "mobilenetv3",
    ]
    assert out.splitlines()[0].rstrip().endswith("ok")


def _files(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("abc\n")


BAD = {  # name: (argv given tmp_path, expected part of the message)
    "unknown space": (lambda t: ["--space", "nope"], "unknown space 'nope'"),
    "missing data file": (lambda t: ["--data", str(t / "missing.txt")], "data file not found"),
    "empty data file": (lambda t: ["--data", str(t / "empty.txt")], "data file is empty"),
    "too short data file": (lambda t: ["--data", str(t / "short.txt")], "fewer than block_size"),
    "choice value the space cannot take": (
        lambda t: ["--choice", "heads=5"],
        "heads=5 does not divide",
    ),
    "choice value of the wrong type": (lambda t: ["--choice", "embed=wide"], "expected an integer"),
    "unknown choice": (lambda t: ["--choice", "depth=2"], "has no choice 'depth'"),
    "unknown hparam": (lambda t: ["--hp", "context=8"], "has no hparam 'context'"),
    "bad assignment": (lambda t: ["--choice", "embed"], "expected NAME=VALUE"),
    "zero steps": (lambda t: ["--steps", "0"], "--steps 0"),
    "unrolled gdas": (lambda t: ["--optimizer", "gdas", "--unrolled"], "--unrolled"),
    "resume without checkpoint": (
        lambda t: ["--resume", "--out", str(t / "nothing")],
        "no checkpoint",
    ),
    "unknown preset": (lambda t: ["--preset", "huge"], "no preset 'huge'"),
    "bad device": (lambda t: ["--device", "tpu"], "--device"),
    "unknown setting": (lambda t: ["--set", "foo=1"], "not a search setting"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_malformed_arguments_clean_error(case, tmp_path, capsys):
    _files(tmp_path)
    argv_fn, msg = BAD[case]
    rc, out, err = _run(["--steps", "1", "--out", str(tmp_path / "o"), *argv_fn(tmp_path)], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tangle-search: error: ") and msg in lines[0], lines[0]
    assert "Traceback" not in err + out
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_cli_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--optimizer", "bogus"])
    assert e.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    """The real entry point (``python -m tangle_kernels.search``): exit 2, one line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TANGLE_DEBUG", None)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "tangle_kernels.search",
            "--data",
            str(tmp_path / "nope.txt"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 2
    assert (
        p.stderr.strip()
        == f"tangle-search: error: --data: data file not found: {tmp_path / 'nope.txt'}"
    )
    assert "Traceback" not in p.stdout + p.stderr


def test_registry_lazy_and_not_available_errors():
    from tangle_kernels import spaces

    assert spaces.SPACES["nanogpt"] == "tangle_kernels.spaces.nanogpt:NanoGPTSpace"
    spaces.register_space("tangle_kernels.spaces.not_written_yet:Ghost", name="ghost")
    spaces.register_space("tangle_kernels.spaces.nanogpt:NoSuchClass", name="ghost2")
    try:
        with pytest.raises(spaces.SpaceError, match="'ghost' is not available.*not_written_yet"):
            spaces.get_space("ghost")
        with pytest.raises(spaces.SpaceError, match="has no NoSuchClass"):
            spaces.get_space("ghost2")
    finally:
        del spaces.SPACES["ghost"], spaces.SPACES["ghost2"]
    with pytest.raises(spaces.SpaceError, match="unknown space 'ghost'"):
        spaces.get_space("ghost")


def test_missing_matplotlib_is_reported_once_and_skipped(tmp_path, monkeypatch):
    from tangle_kernels.search import plot
    from tangle_kernels.search.engine import Search, SearchConfig
    from tangle_kernels.spaces.nanogpt import NanoGPTSpace

    monkeypatch.setattr(plot, "have_matplotlib", lambda: False)
    space = NanoGPTSpace(preset="tiny", hparams={"block_size": 16})
    msgs = []
    cfg = SearchConfig(optimizer="darts", steps=1, batch_size=2, eval_batches=1)
    res = Search(
        space, space.make_data("synthetic"), cfg, out=tmp_path, progress=False, log=msgs.append
    ).run()
    assert res["plot"] is None and not (tmp_path / "alphas.png").exists()
    assert sum("matplotlib is not installed" in m for m in msgs) == 1
    assert (tmp_path / "arch.json").exists()


def test_cli_precision_flag(capsys):
    """--precision reaches the search settings (search and train parsers); a value
    outside fp32/tf32/bf16 is an argparse error (exit 2)."""
    from tangle_kernels.search.cli import _config, build_parser, build_train_parser
    from tangle_kernels.spaces.nanogpt import NanoGPTSpace

    space = NanoGPTSpace(preset="tiny")
    for parser in (build_parser(), build_train_parser()):
        args = parser.parse_args(["--space", "nanogpt", "--precision", "bf16"]
                                 if parser.prog.endswith("search") else ["arch.json", "--precision", "tf32"])
        want = "bf16" if parser.prog.endswith("search") else "tf32"
        assert _config(space, args).precision == want
    assert _config(space, build_parser().parse_args(["--space", "nanogpt"])).precision == "fp32"
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--precision", "fp8"])
    assert e.value.code == 2
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
