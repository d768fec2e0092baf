"""Foundation: the build, the robust import and info()."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tangle_kernels as tk
from tangle_kernels import _ext

ROOT = Path(__file__).resolve().parents[1]


def run_py(code: str, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)


def test_info_reports_extension():
    d = tk.info()
    for key in ("torch", "cpu_extension", "cuda_extension", "cuda_archs", "cuda_device", "triton",
                "triton_interpret", "backends"):
        assert key in d
    if os.environ.get("CI"):
        # CI builds with nvcc present: both parts must be there.
        assert d["cpu_extension"] is True
        assert d["cuda_extension"] is True and "80" in d["cuda_archs"] and "90" in d["cuda_archs"]
    assert d["backends"]["cpu"]["reference"] == "ok"


def test_cli_info_prints():
    r = subprocess.run([sys.executable, "-m", "tangle_kernels", "info"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "cpu_extension" in r.stdout and "backends on cpu" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "tangle_kernels", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


BLOCK_C = (
    "import sys\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'tangle_kernels._C':\n"
    "            raise ImportError('simulated: compiled module deleted')\n"
    "sys.meta_path.insert(0, Block())\n"
)


def test_import_without_compiled_module_falls_back():
    code = BLOCK_C + (
        "import warnings, json, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import tangle_kernels as tk\n"
        "    lay = tk.Layout.prefix((4, 4), [[2, 4], None])\n"
        "    out = tk.superpose(torch.ones(4, 4), torch.tensor([0.5, 0.5]), lay)\n"
        "msgs = [str(x.message) for x in w]\n"
        "info = tk.info()\n"
        "try:\n"
        "    tk.superpose(torch.ones(4, 4), torch.tensor([0.5, 0.5]), lay, backend='cpu')\n"
        "    err = None\n"
        "except RuntimeError as e:\n"
        "    err = str(e)\n"
        "print(json.dumps({'msgs': msgs, 'ext': info['cpu_extension'], 'why': info['backends']['cpu']['cpu'],"
        " 'sum': float(out.sum()), 'err': err}))\n"
    )
    r = run_py(code)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["ext"] is False
    assert "simulated: compiled module deleted" in d["why"]
    assert any("could not be loaded" in m for m in d["msgs"])
    assert any("falling back to 'torch'" in m for m in d["msgs"])
    assert d["sum"] == pytest.approx(12.0)
    assert "backend='cpu' cannot run" in d["err"] and "compiled extension is missing" in d["err"]


def test_import_without_triton():
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\n"
        "import tangle_kernels as tk\n"
        "d = tk.info()\n"
        "print(d['triton'], '|', d['backends']['cpu']['triton'])\n"
    )
    r = run_py(code, TRITON_INTERPRET="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("None |") and "triton is not importable" in r.stdout


@pytest.mark.skipif(shutil.which("cmake") is None and not (Path(sys.prefix) / "bin" / "cmake").exists(),
                    reason="cmake not installed")
def test_skip_cuda_build(tmp_path):
    """TANGLE_SKIP_CUDA=1 builds the C++ part only; the module says it has no CUDA."""
    import pybind11

    cmake = shutil.which("cmake") or str(Path(sys.prefix) / "bin" / "cmake")
    cfg = [cmake, str(ROOT), f"-DPython_EXECUTABLE={sys.executable}",
           f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", "-DTANGLE_SKIP_CUDA=ON",
           f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={tmp_path}/out"]
    if shutil.which("ninja") or (Path(sys.prefix) / "bin" / "ninja").exists():
        cfg += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={shutil.which('ninja') or Path(sys.prefix) / 'bin' / 'ninja'}"]
    subprocess.run(cfg, cwd=tmp_path, check=True, capture_output=True)
    subprocess.run([cmake, "--build", ".", "-j", "2"], cwd=tmp_path, check=True, capture_output=True)
    so = next((tmp_path / "out").glob("_C*.so"))
    code = (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('_C', {str(so)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.with_cuda, hasattr(m, 'superpose_forward_cuda'), hasattr(m, 'superpose_forward_cpu'))\n"
    )
    r = run_py(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "True"]


def test_extension_checks_arguments():
    if not _ext.has_cpu_ext():
        pytest.skip("C++ extension not built")
    with pytest.raises(ValueError, match="dtype code"):
        _ext._C.superpose_forward_cpu(7, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="null pointer"):
        _ext._C.superpose_forward_cpu(0, 2, 2, 1, 1, 0, 0, 0, 0, 0, 1)
