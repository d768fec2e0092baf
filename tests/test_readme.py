"""The README stays true: every ```python block runs, and the commands it names exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_python_examples():
    assert BLOCKS, "README.md has no ```python example"


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i, tmp_path):
    """Each example runs in a fresh interpreter (CPU; Triton in interpreter mode)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-c", BLOCKS[i]], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=300,
    )
    assert r.returncode == 0, f"README block {i} failed:\n{BLOCKS[i]}\n--- stderr ---\n{r.stderr[-3000:]}"


def test_readme_commands_exist():
    for script in re.findall(r"bash (scripts/[\w./-]+\.sh)", README):
        assert (ROOT / script).is_file(), f"README names {script}, which does not exist"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci, ".ci/run must call the README's test command"
