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
exec python -m pytest -q -p no:cacheprovider tests "$@"
