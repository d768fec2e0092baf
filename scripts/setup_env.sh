#!/usr/bin/env bash
# Creates ./.venv (if missing), installs the pinned CPU stack and builds the
# extension (C++ always; CUDA objects too when nvcc is found). Idempotent.
#   TANGLE_VENV=path   use another virtualenv location
#   TANGLE_SKIP_CUDA=1 do not compile the CUDA kernels
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TANGLE_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install -q --upgrade pip
echo "[setup] installing pinned requirements (requirements/cpu.txt)"
python -m pip install -q -r requirements/cpu.txt
echo "[setup] building tangle_kernels (CMake + ninja + pybind11)"
python -m pip install -q --no-build-isolation --no-deps -e .
python -m tangle_kernels info | sed 's/^/[setup] /'
