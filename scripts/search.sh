#!/usr/bin/env bash
# The README's main command: sets everything up, then runs a NAS search on CPU
# (nanoGPT space, DrNAS) and prints the derived architecture and its validation
# loss. Extra arguments go to tangle-search (e.g. --data file.txt --steps 300).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
source "${TANGLE_VENV:-.venv}/bin/activate"
exec tangle-search --space nanogpt --optimizer drnas --out runs/nanogpt "$@"
