"""The CUDA superpose kernels stream 16 bytes per load AND per store on sm_90.

The kernels are memory-bound: W_mix costs one read and one write of the weight, the
backward two reads and one write. nvcc once compiled the 16-byte store of the row
loops into four 32-bit STG.E (4x the store instructions; the H100 run of that code
reached 49% of copy bandwidth in fwd+bwd). This test compiles csrc/cuda/superpose_cuda.cu
for sm_90 with the nvcc found here, disassembles it with cuobjdump (Triton's bundled
copy) and checks every vectorised kernel's global memory instructions.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SRC = os.path.join(ROOT, "csrc", "cuda", "superpose_cuda.cu")


def _tool(name):
    try:
        import triton

        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    return shutil.which(name)


@pytest.fixture(scope="module")
def sass(tmp_path_factory):
    nvcc = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc") else None)
    cuobjdump = _tool("cuobjdump")
    if not nvcc or not cuobjdump:
        pytest.skip("needs the CUDA toolkit (nvcc and cuobjdump)")
    out = tmp_path_factory.mktemp("sass") / "sp.cubin"
    r = subprocess.run([nvcc, "-arch=sm_90", "-O3", "--use_fast_math", f"-I{ROOT}/csrc", "-cubin",
                        SRC, "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([cuobjdump, "-sass", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    funcs, cur = {}, None
    for line in r.stdout.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1)
            funcs[cur] = collections.Counter()
        elif cur:
            for op in re.findall(r"\b((?:LDG|STG)\.[A-Z0-9.]+)", line):
                funcs[cur][op] += 1
    return funcs


# (kernel, storage type, vector width) as they appear in the mangled names
VECTOR_KERNELS = [("fwd_kernel", "ff", 4), ("bwd_kernel", "ff", 4), ("fwd_kernel", "dd", 2),
                  ("bwd_kernel", "dd", 2), ("fwd_kernel", "6__halff", 8),
                  ("bwd_kernel", "6__halff", 8), ("fwd_kernel", "13__nv_bfloat16f", 8),
                  ("bwd_kernel", "13__nv_bfloat16f", 8)]


def _find(funcs, kernel, ty, vec):
    names = [n for n in funcs if f"{kernel}I{ty}Li{vec}E" in n]
    assert len(names) == 1, (kernel, ty, vec, list(funcs))
    return funcs[names[0]]


@pytest.mark.parametrize("kernel,ty,vec", VECTOR_KERNELS, ids=lambda v: str(v))
def test_vector_kernels_use_128_bit_loads_and_stores(sass, kernel, ty, vec):
    ops = _find(sass, kernel, ty, vec)
    st128 = sum(n for op, n in ops.items() if op.startswith("STG.E.128"))
    ld128 = sum(n for op, n in ops.items() if op.startswith("LDG.E.128"))
    narrow_st = {op: n for op, n in ops.items() if op.startswith("STG") and ".128" not in op}
    assert st128 >= 1 and ld128 >= (2 if kernel == "bwd_kernel" else 1), ops
    # The streamed data only moves in 16-byte accesses. The backward may keep one
    # narrow store: the per-cell partial of P into the deterministic workspace.
    assert sum(narrow_st.values()) <= (1 if kernel == "bwd_kernel" else 0), ops
    assert not any(op.startswith("LDG.E.U8") for op in ops), ops
