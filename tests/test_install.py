"""The package installs into an empty virtualenv from a wheel and brings what it
imports (issue 16): ``torch`` is a dependency (``triton`` an extra), and
``python -m tangle_kernels info`` runs from the installed copy.

Nothing is downloaded: the wheel is built with ``--no-build-isolation`` (the build
tools of this environment), installed with ``--no-index``, and the empty virtualenv
sees this environment's packages (the pinned torch, numpy, tqdm) through one ``.pth``
line, so pip finds ``torch>=2.11`` already installed. Were a dependency not declared,
``info`` would still fail to import it; were one declared that is not present, the
``--no-index`` install would fail. The sources are copied first, so the build writes
nothing into the working tree. The C++ extension is built (CUDA skipped): about a
minute on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "CMakeLists.txt", "csrc", "tangle_kernels")


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_wheel_installs_into_an_empty_virtualenv(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"))
        elif p.exists():
            shutil.copy2(p, src / name)
    env = dict(os.environ, TANGLE_SKIP_CUDA="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(dist), str(src)], env=env, cwd=tmp_path)
    wheels = list(dist.glob("tangle_kernels-*.whl"))
    assert len(wheels) == 1, wheels

    # The metadata: torch required, triton only as an extra; the extension inside.
    with zipfile.ZipFile(wheels[0]) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert any(r.replace(" ", "").startswith("torch>=2.11") and "extra" not in r for r in requires), requires
    assert all("extra ==" in r for r in requires if r.startswith("triton")), requires
    assert any(n.startswith("tangle_kernels/_C") for n in names), names
    assert "tangle_kernels/data/sonnets.txt" in names

    # An empty virtualenv (not even pip: this environment's pip installs into it) that
    # sees this environment's site-packages (torch, numpy, tqdm) as a plain path (their
    # own .pth files, e.g. this checkout's editable install, are not processed).
    vdir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(vdir)
    py = vdir / "bin" / "python"
    vsite = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    assert not any(vsite.iterdir()), list(vsite.iterdir())  # empty
    here = sysconfig.get_paths()["purelib"]
    (vsite / "outer_env.pth").write_text(here + "\n")
    r = _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-index", str(wheels[0])],
             env=env, cwd=tmp_path)
    assert "torch>=2.11" in r.stdout and "already satisfied" in r.stdout, r.stdout

    # Run from outside the checkout: the installed copy answers.
    r = _run([str(py), "-m", "tangle_kernels", "info"], env=env, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert "cpu" in out and "ok" in out, out
    where = _run([str(py), "-c", "import tangle_kernels, torch; print(tangle_kernels.__file__); "
                  "print(torch.__version__)"], env=env, cwd=tmp_path).stdout.split()
    assert where[0].startswith(str(vsite)), where
    r = _run([str(vdir / "bin" / "tangle-search"), "spaces"], env=env, cwd=tmp_path)
    assert "nanogpt" in r.stdout
