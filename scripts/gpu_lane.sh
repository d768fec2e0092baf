#!/usr/bin/env bash
# The GPU lane, in one call on a GPU machine (H100/H200; system python3 with a CUDA
# torch, triton, nvcc, pybind11, cmake, ninja, pytest; no network needed):
#   1. builds tangle_kernels._C (CPU + CUDA kernels) against that torch,
#   2. prints `python -m tangle_kernels info`,
#   3. runs the quick probe (scripts/gpu_probe.py: one table of op and layer timings),
#   4. runs the ops' GPU cases (tests/ops and tests/kernels, mark gpu), the triton tests
#      on the GPU, and every other test marked gpu,
#   5. runs the GPU benchmarks (benchmarks/run.py --device cuda) when present,
#   6. copies logs and results to "$OUT" when OUT is set.
# A failing step is recorded and the lane goes on; the exit status is non-zero if any
# step failed. Total runtime is bounded by GPU_LANE_BUDGET_S (default 530 s, under the
# 10-minute device call) and per-step timeouts.
#
# Environment: PYTHON (default python3), TANGLE_CUDA_ARCHS (default 90),
# GPU_LANE_SKIP_BUILD=1 to reuse an existing build, GPU_LANE_SKIP_BENCH=1,
# GPU_LANE_STEPS (default "build info probe tests bench"): the steps to run. The
# whole lane takes more than one 10-minute device call; split it, e.g.
#   GPU_LANE_STEPS="build info probe tests" bash scripts/gpu_lane.sh
#   GPU_LANE_STEPS="build bench" bash scripts/gpu_lane.sh
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOGDIR="$ROOT/benchmarks/results/gpu_lane_$STAMP"
mkdir -p "$LOGDIR"
SUMMARY="$LOGDIR/summary.txt"
touch "$LOGDIR/.start"  # results newer than this were written by this lane
FAILED=""
T0=$(date +%s)

BUDGET_S=${GPU_LANE_BUDGET_S:-530}  # the whole lane; each step also has its own cap
STEPS=" ${GPU_LANE_STEPS:-build info probe tests bench} "
want() { case "$STEPS" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
[ "${GPU_LANE_SKIP_BUILD:-0}" = "0" ] || STEPS=${STEPS/ build / }
[ "${GPU_LANE_SKIP_BENCH:-0}" = "0" ] || STEPS=${STEPS/ bench / }

step() {  # step NAME TIMEOUT_S CMD...: run, log, record, never abort the lane
  local name=$1 limit=$2
  shift 2
  local s left
  s=$(date +%s)
  left=$(( T0 + BUDGET_S - s ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "=== [$name] SKIPPED: lane time budget (${BUDGET_S}s) spent" | tee -a "$SUMMARY"
    FAILED="$FAILED $name"
    return
  fi
  echo "=== [$name] (limit ${limit}s) $*" | tee -a "$SUMMARY"
  # bash -c so that exported shell functions (build, marked_gpu) run under timeout too
  timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" >"$LOGDIR/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - s ))
  tail -n 40 "$LOGDIR/$name.log"
  if [ $rc -eq 0 ]; then
    echo "=== [$name] ok (${dt}s)" | tee -a "$SUMMARY"
  else
    [ $rc -eq 124 ] && echo "=== [$name] TIMED OUT after ${limit}s" | tee -a "$SUMMARY"
    echo "=== [$name] FAILED rc=$rc (${dt}s)" | tee -a "$SUMMARY"
    FAILED="$FAILED $name"
  fi
}

{
  echo "gpu lane $STAMP on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi unavailable"
  $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1
  nvcc --version 2>/dev/null | tail -n 1
} | tee -a "$SUMMARY"

# 1. build ---------------------------------------------------------------------
export TANGLE_CUDA_ARCHS=${TANGLE_CUDA_ARCHS:-90}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 8)}
build() {
  # An editable install; if pip cannot write to the system site-packages, build in
  # place (the package is then imported from the repository root).
  $PY -m pip install --no-deps --no-build-isolation -e . && return 0
  echo "pip install failed; falling back to setup.py build_ext --inplace"
  $PY setup.py build_ext --inplace
}
export PY
export -f build
if want build; then
  step build 200 build
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# 2. info ----------------------------------------------------------------------
want info && step info 60 $PY -m tangle_kernels info

# 3. the quick probe first (superpose and the fused linear vs their baselines, one
# table): the numbers survive even if a later step runs out of time.
unset TRITON_INTERPRET
want probe && step probe 200 $PY scripts/gpu_probe.py --json "$LOGDIR/probe.json"

# 4. tests ---------------------------------------------------------------------
export TANGLE_GPU_LANE=1
if want tests; then
  step test_gpu 300 $PY -m pytest -q -p no:cacheprovider -rfEs --durations=15 -m gpu tests/ops tests/kernels
  step test_triton_on_gpu 90 $PY -m pytest -q -p no:cacheprovider -rfEs tests/kernels/test_triton_backend.py
fi
# Every other test marked gpu (other modules' GPU tests), whole suite, selected by marker.
marked_gpu() {  # pytest exits 5 when no test is selected: not a failure here
  $PY -m pytest -q -p no:cacheprovider -rfEs -m gpu tests --ignore=tests/ops --ignore=tests/kernels
  local rc=$?
  [ $rc -eq 5 ] && return 0
  return $rc
}
export -f marked_gpu
want tests && step test_marked_gpu 60 marked_gpu

# 5. benchmarks ----------------------------------------------------------------
if want bench; then
  if [ -f benchmarks/run.py ]; then
    step bench 480 $PY benchmarks/run.py --device cuda
  else
    echo "=== [bench] skipped: benchmarks/run.py not present" | tee -a "$SUMMARY"
  fi
fi

# 6. results -------------------------------------------------------------------
echo "total $(( $(date +%s) - T0 ))s; failed steps:${FAILED:- none}" | tee -a "$SUMMARY"
if [ -n "${OUT:-}" ]; then
  # The device tool returns at most 8 files: one tarball with the lane's logs and the
  # benchmark results written during this lane, plus the summary for a quick look.
  mkdir -p "$OUT"
  cp "$SUMMARY" "$OUT/summary.txt"
  find benchmarks/results -type f -newer "$LOGDIR/.start" 2>/dev/null | sort > "$LOGDIR.files"
  tar czf "$OUT/gpu_lane.tgz" -T "$LOGDIR.files" 2>/dev/null || tar czf "$OUT/gpu_lane.tgz" "$LOGDIR"
  rm -f "$LOGDIR.files"
fi
[ -z "$FAILED" ]
