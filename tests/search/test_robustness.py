"""No silent wrong result, nothing lost (issue 24, the search driver): a run owns its
--out, the checkpoint fingerprints its data, a diverged search stops without deriving an
architecture, the decision report treats NaN as NaN, and every bad input ends with one
``tangle-search: error: ...`` line and exit status 2."""

from __future__ import annotations

import json
import math
import os
import pickle
import stat

import pytest
import torch

from cli_util import assert_one_error, run_cli

from tangle_kernels.nn.arch import HardArch, check_arch
from tangle_kernels.search.decision import decision_report, entropy, format_decision
from tangle_kernels.search.rundir import RunDir

TINY = ["--preset", "tiny", "--hp", "block_size=16", "--batch-size", "2", "--no-progress",
        "--set", "eval_batches=1", "--steps", "2"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_run = run_cli


_one_error = assert_one_error


def _text(path, seed, n=3000, alphabet="abcdefgh \n"):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(alphabet), (n,), generator=g)
    path.write_text("".join(alphabet[int(i)] for i in idx))
    return str(path)


# ---------------------------------------------------------------- run folders


def test_a_new_run_where_one_lives_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "o"
    assert _run([*TINY, "--data", "synthetic", "--out", str(out)], capsys)[0] == 0
    before = (out / "metrics.jsonl").read_bytes()
    rc, _, err = _run([*TINY, "--data", "synthetic", "--out", str(out), "--seed", "1"], capsys)
    _one_error(rc, err, "holds a run")
    assert (out / "metrics.jsonl").read_bytes() == before  # not truncated
    rc, _, err = _run([*TINY, "--data", "synthetic", "--out", str(out), "--seed", "1",
                       "--overwrite"], capsys)
    assert rc == 0, err
    assert json.loads((out / "arch.json").read_text())["seed"] == 1


def test_a_second_concurrent_run_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    held = RunDir(str(out))
    held.acquire(resume=False, overwrite=False)  # another search holds the folder
    try:
        rc, _, err = _run([*TINY, "--data", "synthetic", "--out", str(out)], capsys)
        _one_error(rc, err, "another search is running there")
        assert not (out / "checkpoint.pt").exists()
    finally:
        held.release()
    assert _run([*TINY, "--data", "synthetic", "--out", str(out)], capsys)[0] == 0
    assert not (out / ".tangle-search.lock").exists()  # released at the end


def test_temp_files_are_unique_and_every_output_has_one_mode(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    # fixed temp names (the old ``alphas.png.tmp.png``, ``arch.json.tmp``) are taken
    for name in ("alphas.png.tmp.png", "arch.json.tmp", "metrics.jsonl.tmp"):
        (out / name).mkdir()
    rc, _, err = _run([*TINY, "--data", "synthetic", "--out", str(out), "--sampler", "darts"],
                      capsys)
    assert rc == 0, err
    files = [p for p in out.iterdir() if p.is_file()]
    assert {"arch.json", "metrics.jsonl", "checkpoint.pt"} <= {p.name for p in files}
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert len(set(modes.values())) == 1, modes  # checkpoint.pt was 0600, the rest 0644


# ---------------------------------------------------------------- data fingerprint


def test_resume_refuses_other_data_unless_told(tmp_path, capsys):
    a, b = _text(tmp_path / "a.txt", 0), _text(tmp_path / "b.txt", 1)
    out = tmp_path / "o"
    base = [*TINY, "--out", str(out), "--steps", "4", "--checkpoint-every", "2"]
    assert _run([*base, "--data", a], capsys)[0] == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    fp = ck["data_fingerprint"]
    assert fp["size"] == os.path.getsize(a) and len(fp["sha256"]) == 64
    rc, _, err = _run([*base, "--data", b, "--resume"], capsys)
    _one_error(rc, err, "resume with the same --data")
    rc, _, err = _run([*base, "--data", b, "--resume", "--resume-other-data"], capsys)
    assert rc == 0, err
    # another alphabet: the supernet does not fit the checkpoint: one line, no traceback
    c = _text(tmp_path / "c.txt", 2, alphabet="abcdefghijklmnop \n")
    rc, _, err = _run([*base, "--data", c, "--resume", "--resume-other-data"], capsys)
    _one_error(rc, err, "does not fit this run's supernet")


def test_checkpoint_missing_keys_is_one_line(tmp_path, capsys):
    out = tmp_path / "o"
    assert _run([*TINY, "--data", "synthetic", "--out", str(out)], capsys)[0] == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    del ck["w_opt"], ck["rng"]
    torch.save(ck, out / "checkpoint.pt")
    rc, _, err = _run([*TINY, "--data", "synthetic", "--out", str(out), "--resume"], capsys)
    _one_error(rc, err, "missing w_opt, rng")


# ---------------------------------------------------------------- divergence


def test_a_diverging_search_stops_and_derives_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    rc, _, err = _run([*TINY, "--data", "synthetic", "--out", str(out), "--steps", "6",
                       "--checkpoint-every", "1", "--arch-lr", "1e30"], capsys)
    _one_error(rc, err, "the search diverged at step")
    assert "no architecture derived" in err
    assert not (out / "arch.json").exists()
    ck = torch.load(out / "checkpoint.pt", weights_only=True)  # the last good one
    assert all(bool(torch.isfinite(a).all()) for a in ck["alphas"].values())
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kind"] == "train" for r in recs)  # no final record, no decision
    assert ck["step"] <= len(recs)


@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--lr", "nan"), ("--arch-lr", "inf"),
                                        ("--set", "weight_decay=nan")])
def test_learning_rates_and_settings_must_be_finite(flag, value, tmp_path, capsys):
    rc, _, err = _run([*TINY, "--data", "synthetic", "--out", str(tmp_path / "o"), flag, value],
                      capsys)
    _one_error(rc, err, "finite")
    assert not (tmp_path / "o").exists()


def test_decision_report_treats_nan_as_nan():
    nan = float("nan")
    rep = decision_report({"a": [nan, nan, nan], "b": [0.9, 0.1]}, {"a": [1, 2, 3], "b": [4, 5]})
    a = rep["choices"]["a"]
    assert a["verdict"] == "not finite" and a["chosen"] is None
    assert math.isnan(a["entropy"]) and math.isnan(a["margin"])
    assert rep["choices"]["b"]["verdict"] == "confident"
    assert rep["overall"]["not_finite"] == ["a"] and math.isnan(rep["overall"]["entropy"])
    assert math.isnan(entropy(torch.tensor([nan, 1.0])))
    assert any("NOT FINITE on a" in line for line in format_decision(rep))


# ---------------------------------------------------------------- input checks


def test_hard_arch_indices_and_arch_values_are_checked():
    w = {"embed": torch.tensor([0.0, 0.0, 1.0])}
    with pytest.raises(ValueError, match="index -1 of choice 'embed' is outside 0..2"):
        HardArch(w, {"embed": -1})
    with pytest.raises(ValueError, match="index 3 of choice 'embed'"):
        HardArch(w, {"embed": 3})
    with pytest.raises(TypeError, match="must be an int"):
        HardArch(w, {"embed": "2"})
    assert HardArch(w, {"embed": 2}).index == {"embed": 2}
    with pytest.raises(TypeError, match=r"arch\['embed'\]: expected a 1-D tensor.*got list"):
        check_arch({"embed": [0.5, 0.5]})
    with pytest.raises(ValueError, match="1-D"):
        check_arch({"embed": torch.ones(2, 2)})
    with pytest.raises(TypeError, match="floating"):
        check_arch({"embed": torch.ones(2, dtype=torch.long)})


def test_corpus_of_one_character_and_binary_file(tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text("a" * 5000)
    rc, _, err = _run([*TINY, "--data", str(one), "--out", str(tmp_path / "o")], capsys)
    _one_error(rc, err, "single distinct character")
    binary = tmp_path / "b.bin"
    g = torch.Generator().manual_seed(0)
    binary.write_bytes(bytes(torch.randint(0, 256, (6000,), generator=g).tolist()))
    rc, _, err = _run([*TINY, "--data", str(binary), "--out", str(tmp_path / "b")], capsys)
    warn = [line for line in err.splitlines() if line.startswith("tangle-search: warning: ")]
    assert len(warn) == 1 and "does not look like a text file" in warn[0], err


def test_benchmark_is_checked_before_the_search(tmp_path, capsys):
    bad = tmp_path / "bench.json"
    bad.write_text("{not json")
    rc, _, err = _run(["--space", "conv-macro", "--preset", "tiny", "--data", "synthetic",
                       "--steps", "1", "--batch-size", "2", "--no-progress", "--out",
                       str(tmp_path / "o"), "--benchmark", str(bad)], capsys)
    _one_error(rc, err, "not valid JSON")
    assert not (tmp_path / "o" / "metrics.jsonl").exists()  # refused before any step
    rc, _, err = _run([*TINY, "--data", "synthetic", "--out", str(tmp_path / "n"),
                       "--benchmark", str(bad)], capsys)
    _one_error(rc, err, "no tabular benchmark")
    assert not (tmp_path / "n").exists()


def test_tabular_convert_refuses_its_input_and_a_missing_folder(tmp_path, capsys):
    from tangle_kernels.tabular import main as tabular

    src = tmp_path / "x.pkl"
    src.write_bytes(pickle.dumps({"k": {"test_acc": 1.0}}))
    before = src.read_bytes()
    assert tabular(["convert", str(src), str(src)]) == 2
    err = capsys.readouterr().err
    assert "is the input" in err and len(err.strip().splitlines()) == 1
    assert src.read_bytes() == before
    assert tabular(["convert", str(src), str(tmp_path / "nowhere" / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


@pytest.mark.parametrize("case", ["missing choice", "arch a string", "space_config a list",
                                  "not an object"])
def test_train_on_a_malformed_arch_json(case, tmp_path, capsys):
    out = tmp_path / "o"
    assert _run([*TINY, "--data", "synthetic", "--out", str(out)], capsys)[0] == 0
    rec = json.loads((out / "arch.json").read_text())
    if case == "missing choice":
        rec["arch"].pop("embed")
    elif case == "arch a string":
        rec["arch"] = "embed=16"
    elif case == "space_config a list":
        rec["space_config"] = [1, 2]
    else:
        rec = [rec]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rec))
    rc, _, err = _run(["train", str(bad), "--steps", "1", "--no-progress"], capsys)
    _one_error(rc, err, str(bad))


def test_old_optimizer_name_still_loads():
    from tangle_kernels.search import SearchConfig, build_config

    old = SearchConfig(sampler="gdas").to_dict()
    old["optimizer"] = old.pop("sampler")  # a checkpoint / arch.json config before the rename
    assert SearchConfig.from_dict(old).sampler == "gdas"
    assert build_config(None, base=old).sampler == "gdas"
    assert build_config(None, {"optimizer": "darts"}).sampler == "darts"
    cfg = SearchConfig(optimizer="spos")
    assert cfg.sampler == cfg.optimizer == "spos"
    with pytest.raises(TypeError, match="differ"):
        SearchConfig(optimizer="spos", sampler="darts")
