#!/usr/bin/env bash
# Creates ./.venv (if missing), installs the pinned CPU stack and builds the
# extension (C++ always; CUDA objects too when nvcc is found). Idempotent.
#   TANGLE_VENV=path   use another virtualenv location
#   TANGLE_SKIP_CUDA=1 do not compile the CUDA kernels
#   --models           instead: create the second environment of tests/models
#                      (requirements/models.txt: torch + torchvision + timm), at
#                      $TANGLE_MODELS_VENV (default .venv/models); it uses
#                      tangle_kernels from the source tree, built by the first run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--models" ]; then
  MVENV="${TANGLE_MODELS_VENV:-.venv/models}"
  PY="${PYTHON:-python3}"
  if [ ! -x "$MVENV/bin/python" ]; then
    echo "[setup] creating the models virtualenv $MVENV"
    "$PY" -m venv "$MVENV"
  fi
  "$MVENV/bin/python" -m pip install -q --upgrade pip
  echo "[setup] installing requirements/models.txt into $MVENV"
  "$MVENV/bin/python" -m pip install -q -r requirements/models.txt
  PYTHONPATH="$PWD" "$MVENV/bin/python" -c "import torch, torchvision, timm, transformers, tangle_kernels; print('[setup] models env: torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)"
  exit 0
fi
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
