"""Smoke test of the benchmark suites (benchmarks/): every provider of every suite runs
once on a tiny shape, the records have the documented schema, the memory measure sees
torch's allocations, the derived ratios are right, and the generated section of
benchmarks/results/README.md is replaced between its markers only. Timings here are meaningless (one call, tiny shapes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness, memory, providers, run, shapes  # noqa: E402

ST = harness.Settings(device="cpu", profile="smoke", target_s=0.0, min_rounds=1, max_rounds=1)
STATUS_OK_OR_UNAVAILABLE = ("ok", "unavailable (")


def _check_schema(rec: dict) -> None:
    for k in harness.RECORD_KEYS:
        assert k in rec, f"record lacks {k!r}: {rec}"
    assert rec["suite"] in harness.SUITES
    assert isinstance(rec["status"], str)
    if rec["status"] == "ok":
        assert isinstance(rec["median_s"], float) and rec["median_s"] > 0
        assert isinstance(rec["peak_bytes"], int) and rec["peak_bytes"] >= 0
    json.loads(json.dumps(rec, default=str))


def _ok(rec: dict) -> dict:
    _check_schema(rec)
    assert rec["status"] == "ok", rec["status"] + rec.get("traceback", "")
    return rec


def test_shapes_registry():
    assert shapes.OPS["gpt2_mlp_up"].K == 9 and shapes.OPS["gpt2_mlp_up"].shape == (3072, 768)
    assert shapes.OPS["conv_256_k27"].K == 27
    assert shapes.OPS["mbv3_dw7"].shape == (960, 1, 7, 7)
    for K in shapes.SWEEP_KS:
        assert shapes.sweep_layout((3072, 768), K).K == K
    for dev in ("cpu", "cuda"):
        for prof in shapes.PROFILES:
            assert shapes.op_cases(dev, prof) and shapes.layer_cases(dev, prof)
            assert shapes.supernet_cases(dev, prof)
    with pytest.raises(ValueError, match="profile"):
        shapes.op_cases("cpu", "huge")


def test_memory_sees_torch_allocations():
    n = 1 << 18  # 1 MiB of float32

    def fn():
        a = torch.ones(n)
        b = torch.ones(n)  # peak: a and b live
        del a
        c = torch.ones(n // 2)
        return b, c

    peak = memory.peak_extra_bytes(fn, "cpu")
    assert 2 * 4 * n <= peak < 2 * 4 * n + 4096


@pytest.mark.parametrize("case", ["tiny_mlp", "tiny_conv"])
def test_superpose_providers(case):
    recs = {}
    for prov in providers.op_providers("cpu"):
        if prov == "compiled-reference":
            continue  # compiled once below (a compilation costs ~10 s)
        for mode in providers.MODES:
            if prov == "copy" and mode != "fwd":
                continue
            rec = harness.run_op(case, prov, mode, ST)
            _check_schema(rec)
            if prov == "ours[triton]":
                assert rec["status"].startswith("unavailable ("), rec["status"]
                continue
            _ok(rec)
            recs[(prov, mode)] = rec
            if mode == "fwd" and prov != "copy":
                assert rec["max_rel_err"] <= 1e-5
    # K temporaries of the padded-sum vs one weight-sized output (deterministic byte counts)
    assert recs[("ours[cpu]", "fwd+bwd")]["peak_bytes"] < recs[("reference", "fwd+bwd")]["peak_bytes"]
    run.derive(list(recs.values()))
    assert recs[("ours[cpu]", "fwd")]["bw_vs_copy"] > 0


def test_compiled_reference_once():
    rec = _ok(harness.run_op("tiny_mlp", "compiled-reference", "fwd+bwd", ST))
    assert rec["first_call_s"] >= rec["median_s"]


@pytest.mark.parametrize("case", ["linear_tiny", "conv_tiny", "attn_tiny"])
def test_layer_providers(case):
    for prov in ("ours[cpu]", "ours[torch]", "reference", "masksum", "plain"):
        rec = _ok(harness.run_layer(case, prov, "fwd", ST))
        if prov != "plain":
            assert rec["max_rel_err"] <= 1e-4
    _ok(harness.run_layer(case, "ours[cpu]", "fwd+bwd", ST))


def test_sweep_records():
    recs = [_ok(harness.run_sweep(K, p, ST)) for K in (1, 9) for p in ("ours[cpu]", "reference")]
    by = {(r["K"], r["provider"]): r for r in recs}
    assert by[(9, "reference")]["peak_bytes"] > by[(1, "reference")]["peak_bytes"]


def test_supernet_step_runs():
    """Both spaces of the smoke profile ship with this checkout (tangle_kernels.spaces):
    a step of each must run. "unavailable (...)" is what an import error in a space
    becomes, so it is a failure here, not an accepted outcome."""
    cases = shapes.supernet_cases("cpu", "smoke")
    assert {c.name for c in cases} == {"nanogpt", "conv-macro"}
    for case in cases:
        space, _ = providers.make_space(case)  # raises Unavailable(reason) if it cannot
        rec = harness.run_supernet(case.name, "ours[cpu]", ST)
        _ok(rec)
        assert rec["K"] == space.num_architectures() > 1
        assert rec["items"] > 0


def test_floor_provider_runs_one_attention_call_per_head_count():
    """floor = the plain max-size GPT whose attention runs once per head-count candidate
    (max width, outputs summed): it trains, it counts one attention call per head count
    per layer (the plain model one per layer), and it is refused off the nanoGPT space."""
    import torch.nn.functional as F

    case = next(c for c in shapes.supernet_cases("cpu", "smoke") if c.name == "nanogpt")
    space, _ = providers.make_space(case)
    calls = []
    orig = F.scaled_dot_product_attention

    def counting(*a, **k):
        calls.append(a[0].shape[1])  # heads
        return orig(*a, **k)

    n_layers = max(space.choices["layers"])
    heads = sorted(space.choices["heads"], reverse=True)
    F.scaled_dot_product_attention = counting
    try:
        for prov, per_layer in (("plain", heads[:1]), ("floor", heads)):
            calls.clear()
            b = providers.make_supernet(case, prov, "cpu")
            b.fn()
            assert calls == per_layer * n_layers, (prov, calls)
    finally:
        F.scaled_dot_product_attention = orig
    import tangle_kernels.ops.attention as att

    orig_fused = att.fused_attention

    def counting_fused(q, *a, **k):
        calls.append(q.shape[1])
        return orig_fused(q, *a, **k)

    att.fused_attention = counting_fused
    F.scaled_dot_product_attention = counting  # must not be called
    try:
        for prov, per_layer in (("plain-fused", heads[:1]), ("floor-fused", heads)):
            calls.clear()
            b = providers.make_supernet(case, prov, "cpu")
            b.fn()
            assert calls == per_layer * n_layers, (prov, calls)
    finally:
        att.fused_attention = orig_fused
        F.scaled_dot_product_attention = orig
    rec = harness.run_supernet(case.name, "floor", ST)
    _ok(rec)
    conv = next(c for c in shapes.supernet_cases("cpu", "smoke") if c.name == "conv-macro")
    with pytest.raises(providers.Unavailable, match="floor"):
        providers.make_supernet(conv, "floor", "cpu")


def test_derive_targets_markdown():
    def rec(prov, t, peak, mode="fwd+bwd", case="gpt2_mlp_up", suite="superpose", **kw):
        r = harness.base_record(suite, case, prov, mode, (3072, 768), 9, "float32", "cpu", **kw)
        r.update(median_s=t, peak_bytes=peak, bytes=5 * 4 * 3072 * 768)
        return r

    recs = [rec("ours[cpu]", 0.01, 100), rec("reference", 0.1, 1000), rec("compiled-reference", 0.02, 500),
            rec("copy", 0.001, 0, mode="fwd"), rec("ours[torch]", 0.05, 0, status="unavailable (x)")]
    recs[3]["bytes"] = 2 * 4 * 3072 * 768
    run.derive(recs)
    ours = recs[0]
    assert ours["speedup_vs_reference"] == pytest.approx(10.0)
    assert ours["speedup_vs_compiled_reference"] == pytest.approx(2.0)
    assert ours["mem_vs_reference"] == pytest.approx(0.1)
    copy_bw = recs[3]["bytes"] / 0.001
    assert ours["bw_vs_copy"] == pytest.approx(ours["bytes"] / 0.01 / copy_bw)
    assert ours["time_vs_copy_floor"] == pytest.approx(0.01 / (ours["bytes"] / copy_bw))
    assert "speedup_vs_reference" not in recs[4]
    tg = run.targets(recs, "cpu")
    first = tg[0]
    assert first["verdict"] == "pass" and first["measured"] == pytest.approx(10.0)
    assert tg[1]["verdict"] == "MISS" and tg[1]["measured"] == pytest.approx(4.0)  # floor 2.5 ms
    meta = {"device": "cpu", "device_name": "x", "date": "d", "profile": "smoke", "torch": "t",
            "python": "p", "threads": 2, "timer": "t", "mem_method": "m", "wall_s": 1.0, "json": "j"}
    md = run.markdown(meta, recs, tg)
    assert "| gpt2_mlp_up | K=9 | fwd+bwd | ours[cpu] |" in md and "10.00x" in md
    assert "unavailable (x)" in md


def test_readme_replacement():
    text = "# T\n\nintro\n<!-- bench:start -->\nold table\n<!-- bench:end -->\n\n## After\nkeep\n"
    new = run.replace_section(text, "| a | b |\n")
    assert new.startswith("# T\n\nintro\n<!-- bench:start -->\n| a | b |\n<!-- bench:end -->")
    assert new.endswith("\n\n## After\nkeep\n") and "old table" not in new
    assert run.replace_section(new, "| a | b |") == new
    with pytest.raises(ValueError, match="markers"):
        run.replace_section("no markers here", "x")
    with pytest.raises(ValueError, match="markers"):
        run.replace_section("<!-- bench:end --> <!-- bench:start -->", "x")


def test_run_py_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TANGLE_KERNELS_BACKEND",)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--device", "cpu",
           "--suites", "superpose", "-k", "tiny_mlp and not compiled and not triton",
           "--out", str(tmp_path), "--no-readme"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (js,) = tmp_path.glob("*-cpu-smoke.json")
    data = json.loads(js.read_text())
    assert set(data) == {"meta", "targets", "records"}
    recs = data["records"]
    assert {r["provider"] for r in recs} == {"ours[cpu]", "ours[torch]", "reference", "masksum", "copy"}
    for r in recs:
        _ok(r)
    ours = next(r for r in recs if r["provider"] == "ours[cpu]" and r["mode"] == "fwd")
    assert ours["speedup_vs_reference"] > 0 and ours["bw_vs_copy"] > 0
    assert (tmp_path / js.name.replace(".json", ".md")).read_text().count("| tiny_mlp |") == len(recs)
    assert not (tmp_path / "README.md").exists(), "--no-readme wrote the results README"


def test_results_readme_from_records(tmp_path):
    """``run.py --readme-only --out DIR`` rebuilds DIR/README.md from the JSON records:
    the latest full run per device, image links relative to that file, the older-code
    label on a run whose commit differs from the checkout; text outside the markers is
    kept, a second run changes nothing, and the top-level README.md is never touched."""
    import shutil

    res = ROOT / "benchmarks" / "results"
    for name in ("2026-11-23-cpu.json", "2026-12-02-cpu.json", "2026-11-23-cuda.json",
                 "sweep_k-cpu.png", "sweep_k-cuda.png"):
        shutil.copy(res / name, tmp_path / name)
    top = (ROOT / "README.md").read_text()
    assert run.main(["--readme-only", "--out", str(tmp_path)]) == 0  # creates the file
    text = (tmp_path / "README.md").read_text()
    assert text.startswith(run.RESULTS_README_HEAD) and text.count(run.START) == 1
    assert "### AMD EPYC (cpu), 2026-12-02, profile full" in text  # the latest cpu run only
    assert text.count("(cpu), ") == 1 and "### NVIDIA H100 80GB HBM3 (cuda), 2026-11-23" in text
    assert "](sweep_k-cpu.png)" in text and "](sweep_k-cuda.png)" in text
    assert run._code_changed_since("89f120e") is True  # tangle_kernels/ changed since
    h100 = text[text.index("(cuda), 2026-11-23"):]
    assert "**Measured on older code**: commit `89f120e` (2026-11-23)" in h100.split("####")[0]
    # hand-written text outside the markers survives; a rebuild is idempotent
    (tmp_path / "README.md").write_text("# Mine\n\nkeep me\n\n" + text[text.index(run.START):] + "\nafter\n")
    assert run.main(["--readme-only", "--out", str(tmp_path)]) == 0
    again = (tmp_path / "README.md").read_text()
    assert again.startswith("# Mine\n\nkeep me\n\n") and again.endswith("\nafter\n")
    assert again[again.index(run.START):again.index(run.END)] == text[text.index(run.START):text.index(run.END)]
    assert (ROOT / "README.md").read_text() == top


def test_step_ab_interleaved(tmp_path):
    """benchmarks/step_ab.py: every provider runs once per round, ratios are per-round
    medians (a/b * b/a == 1 only when every round agrees: checked on the records), the
    files are written."""
    from benchmarks import step_ab

    res = step_ab.measure("nanogpt", ["plain", "floor"], 3, log=lambda m: None)
    assert res["unit"] == "tokens" and set(res["providers"]) == {"plain", "floor"}
    for r in res["providers"].values():
        assert len(r["times_s"]) == 3 and r["median_s"] > 0 and r["peak_extra_bytes"] > 0
    import statistics

    t = {p: r["times_s"] for p, r in res["providers"].items()}
    assert res["time_ratios"]["floor/plain"] == statistics.median(a / b for a, b in zip(t["floor"], t["plain"]))
    md = step_ab.markdown(res)
    assert "| floor |" in md and "time/plain" in md
    assert step_ab.main(["--case", "nanogpt", "--providers", "plain", "--rounds", "1",
                         "--out", str(tmp_path)]) == 0
    assert list(tmp_path.glob("*-step-ab-nanogpt.json")) and list(tmp_path.glob("*-step-ab-nanogpt.md"))
