#!/usr/bin/env bash
# The README's main command: sets everything up, then runs a NAS search on CPU
# (nanoGPT space, DrNAS, 250 steps on the embedded Sonnets corpus), races the most
# probable architecture and 3 more drawn from the final distribution, each trained from
# scratch for 400 steps (the winner's training is the retraining), and prints the
# derived architecture, its validation loss, the race (a coin toss when the runner-up is
# within the seed noise) and how decided the probabilities were. Everything is saved under runs/nanogpt (arch.json, metrics.jsonl,
# checkpoint.pt, alphas.png); its run time: benchmarks/results/. How good the derived
# architecture is against every architecture trained from scratch, and against the other
# samplers: benchmarks/search_quality.py (docs/search-quality.md).
# Extra arguments go to tangle-search (e.g. --data file.txt --steps 300 --resume; a
# second run into runs/nanogpt needs --resume or --overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
source "${TANGLE_VENV:-.venv}/bin/activate"
# OpenMP threads that sleep instead of spinning between parallel regions: spinning
# threads slow every step down on a machine shared with other work.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec tangle-search --space nanogpt --sampler drnas --out runs/nanogpt --retrain-steps 400 "$@"
