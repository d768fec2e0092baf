"""The fused-linear GEMM kernels compile for a real Hopper target (sm_90) on this
GPU-less machine, with a software-pipelined main loop on the tensor cores
(scripts/triton_aot_check.py; Triton compiles for an explicit target with its
bundled ptxas)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("kernel", ["linear_fwd fp16", "linear_dx bf16", "linear_dw bf16"])
def test_fused_linear_compiles_pipelined_for_sm90(kernel, tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "triton_aot_check.py"), "--arch", "90",
         "--only", kernel, "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (rec,) = json.loads(out.read_text())["kernels"]
    assert rec["kernel"] == kernel and rec["ok"]
    assert rec["wgmma"] >= 1, rec  # Hopper tensor-core MMA
    assert rec["async_copies"] >= 2, rec  # operands streamed by the software pipeline
    if kernel.startswith(("linear_fwd", "linear_dx")):
        # the FLAT main loop (run starts of the GPT-2 layouts are multiples of BK): one
        # loop over all K tiles, so the pipeline never refills at a run boundary
        assert rec["dot_loop_depth"] == 1, rec
