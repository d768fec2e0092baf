#!/usr/bin/env bash
# The README's test command: sets everything up, then runs the test suite on CPU,
# with Triton kernels in interpreter mode. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
source "${TANGLE_VENV:-.venv}/bin/activate"
export TRITON_INTERPRET=1
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
models_lane=0
if [ "${TANGLE_SKIP_MODELS:-0}" != 1 ] && [ "$#" -eq 0 ]; then models_lane=1; fi
if [ "$models_lane" = 1 ]; then export TANGLE_MODELS_LANE=pending; fi
python -m pytest -q -p no:cacheprovider tests "$@"
# The models lane: timm and torchvision import only next to a torch that has a matching
# torchvision build (requirements/models.txt); a second virtualenv runs tests/models and
# the entangle() tests there, with tangle_kernels from this tree. TANGLE_SKIP_MODELS=1
# skips it (only when extra pytest arguments select other tests, e.g. -k superpose).
if [ "$models_lane" = 1 ]; then
  unset TANGLE_MODELS_LANE
  bash scripts/setup_env.sh --models
  PYTHONPATH="$PWD" "${TANGLE_MODELS_VENV:-.venv/models}/bin/python" -m pytest -q -p no:cacheprovider \
    tests/models tests/nn/test_entangle.py tests/nn/test_entangle_registry.py
fi
