#!/usr/bin/env bash
# One-shot validation on a CUDA machine whose system python3 already has torch, triton, pytest
# (no pip installs, no venv, no internet needed). Usage: scripts/gpu_check.sh OUTDIR
#
# Steps (each runs even if an earlier one failed; each has a timeout so the whole run stays under
# ~8 minutes; the summary lists every step's exit status, 124 meaning it timed out):
#   build      MAX_JOBS=$(nproc) TORCH_CUDA_ARCH_LIST=9.0 python3 setup.py build_ext --inplace
#   pytest     python3 -m pytest: with pytest-xdist, 8 workers (a crashing test takes down one
#              worker, which xdist names and replaces); without it, one process per test file
#   exercise   python3 scripts/exercise_kernels.py (every CUDA/Triton kernel vs the reference)
#   memcheck   compute-sanitizer --tool memcheck on the exercise script
#   racecheck  compute-sanitizer --tool racecheck on the exercise script
#   profile    python3 scripts/gpu_profile.py (host vs kernel time and the top kernels per case)
#   bench      python3 -m lightnet_ops.bench on the GPU target cases (full measurement settings)
#              --out <tmp>; results packed into OUTDIR/bench_results.tar.gz
#
# OUTDIR gets at most 8 files: build.log, pytest.log, sanitizer.log (exercise, memcheck and
# racecheck sections), profile.log, bench.log, summary.txt and bench_results.tar.gz.
#
# Environment overrides: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS
# (default nproc), GPU_CHECK_PYTEST_ARGS (default "-q -rfE --tb=short"), GPU_CHECK_PYTEST_CAP_S (default 200),
# GPU_CHECK_BENCH_ARGS (bench arguments; default: the issue's GPU target cases, fwd+bwd and step),
# GPU_CHECK_BUDGET_S (default 500), GPU_CHECK_STEPS (default "build pytest exercise memcheck
# racecheck profile bench": a shorter list runs only those), GPU_CHECK_TESTS (default "tests").
set -u

OUT="${1:-gpu-check-results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

PY="${PYTHON:-python3}"
START=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET_S:-500}"
DEADLINE=$((START + BUDGET))
SUMMARY="$OUT/summary.txt"
SAN_LOG="$OUT/sanitizer.log"
: >"$SUMMARY"
: >"$SAN_LOG"
declare -a RESULTS=()

now() { date +%s; }

# step_timeout CAP RESERVE: seconds the next step may take: at most CAP, leaving RESERVE seconds
# of the budget for the steps after it, and never less than 10.
step_timeout() {
  local cap=$1 reserve=$2 left
  left=$((DEADLINE - $(now) - reserve))
  ((left > cap)) && left=$cap
  ((left < 10)) && left=10
  echo "$left"
}

# run_step NAME LOG CAP RESERVE CMD...: runs CMD with a timeout, appending to LOG.
STEPS=" ${GPU_CHECK_STEPS:-build pytest exercise memcheck racecheck profile bench} "
wanted() { [[ "$STEPS" == *" $1 "* ]]; }

run_step() {
  local name=$1 log=$2 cap=$3 reserve=$4
  shift 4
  local limit t0 rc
  if ! wanted "$name"; then
    RESULTS+=("$(printf '%-10s skipped (GPU_CHECK_STEPS)' "$name")")
    return 0
  fi
  limit=$(step_timeout "$cap" "$reserve")
  t0=$(now)
  {
    echo "===== $name: $* (timeout ${limit}s) ====="
    echo "started $(date -u +%FT%TZ)"
  } >>"$log"
  timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  echo "===== $name: exit $rc after $(($(now) - t0))s =====" >>"$log"
  RESULTS+=("$(printf '%-10s exit %-4s %4ss  (%s)' "$name" "$rc" "$(($(now) - t0))" "$(basename "$log")")")
  echo "[gpu_check] $name: exit $rc ($(($(now) - t0))s)"
  return 0
}

{
  echo "gpu_check started $(date -u +%FT%TZ) in $ROOT"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed files"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -4
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
  command -v nvcc >/dev/null && nvcc --version | tail -1
  echo "nproc $(nproc)"
} >>"$SUMMARY"

# 1. Build in place with every core, for Hopper unless told otherwise.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
run_step build "$OUT/build.log" 180 320 "$PY" setup.py build_ext --inplace
"$PY" -c "
import torch, lightnet_ops
from lightnet_ops import _ops
print('extension:', 'loaded' if _ops.EXTENSION_AVAILABLE else _ops.EXTENSION_ERROR)
for op in _ops.OP_NAMES:
    print(op, 'CUDA kernel:', _ops.has_kernel(op, 'CUDA'))
print('backends:', lightnet_ops.backends())
" >>"$OUT/build.log" 2>&1

# 2. The whole test suite on the GPU.
PYTEST_EXTRA=()
if "$PY" -c "import pytest_benchmark" >/dev/null 2>&1; then
  PYTEST_EXTRA+=(--benchmark-disable)
fi
export GPU_CHECK_PY="$PY" GPU_CHECK_PYTEST_EXTRA="${PYTEST_EXTRA[*]}" GPU_CHECK_ARGS="${GPU_CHECK_PYTEST_ARGS:--q -rfE --tb=short}"
export GPU_CHECK_TESTS="${GPU_CHECK_TESTS:-tests}"
if "$PY" -c "import xdist" >/dev/null 2>&1; then
  # 8 workers, one file per worker at a time: a segfault ends only its worker, and xdist reports
  # the test that was running and starts a new worker.
  run_step pytest "$OUT/pytest.log" ${GPU_CHECK_PYTEST_CAP_S:-160} 250 bash -c '
    $GPU_CHECK_PY -X faulthandler -m pytest -n 8 --dist loadfile $GPU_CHECK_ARGS $GPU_CHECK_PYTEST_EXTRA \
      -p no:cacheprovider $GPU_CHECK_TESTS'
else
  # One pytest process per test file, GPU-heavy files first: a crash then costs one file's results.
  run_step pytest "$OUT/pytest.log" ${GPU_CHECK_PYTEST_CAP_S:-200} 250 bash -c '
    files=""
    for f in $(find $GPU_CHECK_TESTS -name "test_*.py" | sort); do files="$files $f"; done
    worst=0
    for f in $files; do
      echo "----- $f"
      $GPU_CHECK_PY -X faulthandler -m pytest $GPU_CHECK_ARGS $GPU_CHECK_PYTEST_EXTRA -p no:cacheprovider "$f"
      rc=$?
      echo "----- $f: exit $rc"
      [ $rc -ne 0 ] && worst=1
    done
    exit $worst'
fi

# 3. Every kernel against the reference, then under compute-sanitizer.
run_step exercise "$SAN_LOG" 60 230 "$PY" scripts/exercise_kernels.py

SANITIZER=""
for cand in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
  /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
  /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  if [ -n "$cand" ] && [ -x "$cand" ]; then
    SANITIZER="$cand"
    break
  fi
done
if [ -z "$SANITIZER" ]; then
  echo "compute-sanitizer not found on PATH or under /usr/local/cuda*/bin: memcheck and racecheck skipped" >>"$SAN_LOG"
  RESULTS+=("memcheck   exit MISSING (compute-sanitizer not found)")
  RESULTS+=("racecheck  exit MISSING (compute-sanitizer not found)")
else
  echo "compute-sanitizer: $SANITIZER ($("$SANITIZER" --version 2>&1 | tail -1))" >>"$SAN_LOG"
  # The caching allocator would hide out-of-bounds accesses inside its big blocks.
  run_step memcheck "$SAN_LOG" 80 200 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool memcheck --error-exitcode 1 --print-limit 100 "$PY" scripts/exercise_kernels.py --quick
  run_step racecheck "$SAN_LOG" 80 160 \
    "$SANITIZER" --tool racecheck --error-exitcode 1 --print-limit 100 "$PY" scripts/exercise_kernels.py --quick
fi

# Profile and bench use one fixed Triton config per kernel: autotuning every kernel at every size
# would cost minutes of device time (set LIGHTNET_OPS_TRITON_AUTOTUNE=1 to tune).
export LIGHTNET_OPS_TRITON_AUTOTUNE="${LIGHTNET_OPS_TRITON_AUTOTUNE:-0}"

# 4. Where the time goes (host or kernels), per GPU target case and backend.
run_step profile "$OUT/profile.log" 80 110 "$PY" scripts/gpu_profile.py

# 5. Benchmarks of the GPU target cases into a scratch folder, packed into one archive.
BENCH_TMP="$(mktemp -d)"
BENCH_ARGS="${GPU_CHECK_BENCH_ARGS:---cases conv1_b256 conv2_b256 vgg_b8_fp16 vgg_b8_bf16 linear_1024x4096_b4096_bf16 lightnet_b256 --modes fwd+bwd step --backends cuda triton stock compile}"
# shellcheck disable=SC2086
run_step bench "$OUT/bench.log" ${GPU_CHECK_BENCH_CAP_S:-150} 0 "$PY" -m lightnet_ops.bench $BENCH_ARGS --out "$BENCH_TMP"
if [ -n "$(ls -A "$BENCH_TMP")" ]; then
  tar -czf "$OUT/bench_results.tar.gz" -C "$BENCH_TMP" .
fi
rm -rf "$BENCH_TMP"

{
  echo
  echo "step       status     time  (log)"
  printf '%s\n' "${RESULTS[@]}"
  echo "total $(($(now) - START))s (budget ${BUDGET}s); files in $OUT:"
  ls -1 "$OUT"
} >>"$SUMMARY"
cat "$SUMMARY"
