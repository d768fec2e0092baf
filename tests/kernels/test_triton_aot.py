"""The fused-linear GEMM kernels compile for a real Hopper target (sm_90) on this
GPU-less machine, with a software-pipelined main loop on the tensor cores
(scripts/triton_aot_check.py; Triton compiles for an explicit target with its
bundled ptxas). The script compiles the FLAT variant of the fwd/dx kernels as a
constant; test_launcher_takes_flat_for_gpt2_layouts checks that the launcher really
chooses it for the GPT-2 layouts at those shapes (and the per-run loop otherwise)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


LAUNCH_PROBE = """
import json
import tangle_kernels as tk
from tangle_kernels.backends.triton import linear as TL

assert not TL._INTERPRET and not TL.autotune_enabled()
seen = []


class Kernel:  # stands in for the jitted kernel: records the launcher's FLAT choice
    def __getitem__(self, grid):
        return lambda *args, **kwargs: seen.append(kwargs["FLAT"])


layouts = {
    # the GPT-2 MLP weights of the README (c_fc [3072, 768], c_proj [768, 3072])
    "fc": tk.Layout.grid((3072, 768), {"embed": [384, 576, 768], "ratio": [2, 3, 4]},
                         lambda embed, ratio: [(0, embed * ratio), (0, embed)]),
    "proj": tk.Layout.grid((768, 3072), {"embed": [384, 576, 768], "ratio": [2, 3, 4]},
                           lambda embed, ratio: [(0, embed), (0, embed * ratio)]),
    # run starts at 300 / 1000: not multiples of any K tile
    "odd": tk.Layout.prefix((3072, 768), [[1000, 3072], [300, 768]]),
}
M = 16384  # the token count of the script's linear cases
out = {}
for name, lay in layouts.items():
    N, K = lay.shape
    for dt, eb in (("fp16", 2), ("bf16", 2), ("fp32", 4)):
        seen.clear()
        TL._launch("fwd", Kernel(), M, N, eb, (), {}, lay.run_start_align[0])
        TL._launch("dx", Kernel(), M, K, eb, (), {}, lay.run_start_align[1])
        out[f"{name} {dt}"] = list(seen)
print(json.dumps(out))
"""


def test_launcher_takes_flat_for_gpt2_layouts():
    """The launcher (fixed GPU tiles, no interpreter) picks the FLAT main loop for the
    fwd and dx GEMMs of the GPT-2 layouts the AOT check compiles as FLAT, and the
    per-run loop for a layout whose runs start off the K tile."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TANGLE_TRITON_AUTOTUNE")}
    r = subprocess.run([sys.executable, "-c", LAUNCH_PROBE], capture_output=True, text=True, env=env,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for key, flat in got.items():
        want = [False, False] if key.startswith("odd") else [True, True]
        assert flat == want, (key, flat)
    assert len(got) == 9
