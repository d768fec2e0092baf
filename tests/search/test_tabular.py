"""Tabular benchmarks: converting the seeds' pickled format (small files written here in
that format) to JSON through the restricted unpickler, JSON/CSV queries, the CLI, and
the spaces' genotype keys."""

import itertools
import json
import os
import pickle

import numpy as np
import pytest

from tangle_kernels.tabular import BenchmarkError, TabularBenchmark, convert_pickle, main

CONV_KEY = "[[8, 16, 32, 64], [5, 3, 3, 3]]"
CELL_OPS = ["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]


def cell_key(normal, reduce):
    def gene(ops):
        return "[" + ", ".join(f"('{o}', {i})" for o, i in zip(ops, (0, 0, 1))) + "]"

    return (f"Genotype(normal={gene(normal)}, normal_concat=range(1, 3), "
            f"reduce={gene(reduce)}, reduce_concat=range(1, 3))")


def write_conv_macro_pickle(path, n=12, protocol=4):
    """Entries as in the seeds' conv-macro benchmark: str(genotype) -> two floats."""
    rng = np.random.default_rng(0)
    d = {}
    combos = itertools.product([8, 16, 32], [16, 32, 64], [32, 64, 128], [64, 128, 256],
                               [3, 5, 7], [3, 5, 7], [3, 5, 7], [3, 5, 7])
    for combo in itertools.islice(combos, n):
        key = str([list(combo[:4]), list(combo[4:])])
        d[key] = {"test_acc": float(round(rng.uniform(50, 80), 3)),
                  "train_acc": float(round(rng.uniform(50, 80), 3))}
    d[CONV_KEY] = {"test_acc": 72.46, "train_acc": 71.376}
    path.write_bytes(pickle.dumps(d, protocol=protocol))
    return d


def write_cell_pickle(path, protocol):
    """Entries as in the seeds' entangled-cell benchmark: numpy float64 scalars."""
    d = {}
    for i, (a, b) in enumerate(itertools.islice(
            itertools.product(itertools.product(CELL_OPS, repeat=3), repeat=2), 20)):
        d[cell_key(a, b)] = {
            "test_acc": np.float64(80 + i / 7), "train_acc": np.float64(81 + i / 9),
            "num_params": np.float64(1000 + i), "mean_cuda_time": np.float64(1.5 + i),
            "std_cuda_time": np.float64(0.1), "mean_cpu_time": np.float64(2.5),
            "std_cpu_time": np.float64(0.2)}
    path.write_bytes(pickle.dumps(d, protocol=protocol))
    return d


def test_convert_conv_macro(tmp_path):
    src = write_conv_macro_pickle(tmp_path / "bench.pkl")
    bench = convert_pickle(tmp_path / "bench.pkl", tmp_path / "bench.json")
    assert len(bench) == len(src)
    back = TabularBenchmark.load(tmp_path / "bench.json")
    assert back.query(CONV_KEY) == {"test_acc": 72.46, "train_acc": 71.376}
    for k, v in src.items():
        assert back.query(k) == v
    # whitespace-insensitive match, and a clear error for a missing key
    assert back.query("[[8,16,32,64],[5,3,3,3]]")["test_acc"] == 72.46
    with pytest.raises(BenchmarkError, match="no entry for"):
        back.query("[[1, 2, 3, 4], [3, 3, 3, 3]]")
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["format"] == "tangle_kernels.tabular" and doc["converted_from"] == "bench.pkl"


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_convert_cell_numpy_scalars(tmp_path, protocol):
    src = write_cell_pickle(tmp_path / "cell.pkl", protocol)
    convert_pickle(tmp_path / "cell.pkl", tmp_path / "cell.json")
    back = TabularBenchmark.load(tmp_path / "cell.json")
    for k, v in src.items():
        got = back.query(k)
        assert set(got) == set(v)
        for m in v:  # float64 -> JSON -> float is exact (repr round-trips)
            assert got[m] == float(v[m]) and isinstance(got[m], float)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_convert_refuses_code_and_arrays(tmp_path):
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"k": {"test_acc": _Evil()}}))
    with pytest.raises(BenchmarkError, match="refusing to load the global"):
        convert_pickle(p, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()
    p.write_bytes(pickle.dumps({"k": {"test_acc": np.zeros(3)}}))
    with pytest.raises(BenchmarkError, match="refusing"):
        convert_pickle(p, tmp_path / "out.json")
    p.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(BenchmarkError, match="expected a pickled dict"):
        convert_pickle(p, tmp_path / "out.json")
    p.write_bytes(b"not a pickle")
    with pytest.raises(BenchmarkError, match="not a readable pickle"):
        convert_pickle(p, tmp_path / "out.json")


def test_load_never_unpickles(tmp_path):
    p = tmp_path / "bench.dat"
    p.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(BenchmarkError, match="is a pickle"):
        TabularBenchmark.load(p)
    with pytest.raises(BenchmarkError, match="not found"):
        TabularBenchmark.load(tmp_path / "nope.json")


def test_csv_and_plain_json(tmp_path):
    p = tmp_path / "b.csv"
    p.write_text('genotype,test_acc,train_acc,note\n'
                 '"[[8, 16, 32, 64], [5, 3, 3, 3]]",72.46,71.376,x\n'
                 '"[[8, 16, 32, 64], [3, 3, 3, 3]]",70,,\n')
    b = TabularBenchmark.load(p)
    assert b.query(CONV_KEY) == {"test_acc": 72.46, "train_acc": 71.376, "note": "x"}
    assert b.query("[[8, 16, 32, 64], [3, 3, 3, 3]]") == {"test_acc": 70}
    p.write_text('genotype,test_acc\n"k",1\n"k",2\n')
    with pytest.raises(BenchmarkError, match="duplicate key"):
        TabularBenchmark.load(p)
    p.write_text("genotype,test_acc\nk,1,2\n")
    with pytest.raises(BenchmarkError, match="3 fields"):
        TabularBenchmark.load(p)
    j = tmp_path / "flat.json"
    j.write_text(json.dumps({CONV_KEY: {"test_acc": 72.46}}))
    assert TabularBenchmark.load(j).query(CONV_KEY) == {"test_acc": 72.46}
    j.write_text("[1, 2]")
    with pytest.raises(BenchmarkError, match="JSON object"):
        TabularBenchmark.load(j)


def test_cli_convert_and_query(tmp_path, capsys):
    write_conv_macro_pickle(tmp_path / "bench.pkl")
    assert main(["convert", str(tmp_path / "bench.pkl"), str(tmp_path / "bench.json")]) == 0
    assert "13 entries" in capsys.readouterr().out
    assert main(["query", str(tmp_path / "bench.json"), "--key", CONV_KEY]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"key": CONV_KEY, "test_acc": 72.46, "train_acc": 71.376}
    assert main(["query", str(tmp_path / "bench.pkl"), "--key", CONV_KEY]) == 2
    assert "is a pickle" in capsys.readouterr().err


def test_cli_query_arch_json(tmp_path, capsys):
    """``query --arch`` reads the driver's arch.json (space_config + arch) and looks the
    space's genotype key up."""
    from tangle_kernels.spaces import make_space

    sp = make_space("conv-macro", preset="tiny")
    sel = {n: v[-1] for n, v in sp.choices.items()}
    key = sp.genotype_key(sel)
    (tmp_path / "b.csv").write_text(f'key,test_acc\n"{key}",61.25\n')
    (tmp_path / "arch.json").write_text(json.dumps(
        {"space": "conv-macro", "space_config": sp.config(), "arch": sel}))
    assert main(["query", str(tmp_path / "b.csv"), "--arch", str(tmp_path / "arch.json")]) == 0
    assert json.loads(capsys.readouterr().out) == {"key": key, "test_acc": 61.25}
    bad = dict(sel, c1=999)
    (tmp_path / "arch.json").write_text(json.dumps(
        {"space": "conv-macro", "space_config": sp.config(), "arch": bad}))
    assert main(["query", str(tmp_path / "b.csv"), "--arch", str(tmp_path / "arch.json")]) == 2
    assert "c1=999" in capsys.readouterr().err
