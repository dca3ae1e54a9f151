#!/usr/bin/env bash
# One-shot validation on a CUDA machine whose system python3 already has torch, triton, pytest
# (no pip installs, no venv, no internet needed). Usage: scripts/gpu_check.sh OUTDIR
#
# Steps (each runs even if an earlier one failed; each has a timeout so the whole run stays under
# ~8 minutes; the summary lists every step's exit status, 124 meaning it timed out):
#   build      MAX_JOBS=$(nproc) TORCH_CUDA_ARCH_LIST=9.0 python3 setup.py build_ext --inplace
#   pytest     python3 -m pytest, one process per test file (GPU-heavy files first)
#   exercise   python3 scripts/exercise_kernels.py (every CUDA/Triton kernel vs the reference)
#   memcheck   compute-sanitizer --tool memcheck on the exercise script
#   racecheck  compute-sanitizer --tool racecheck on the exercise script
#   bench      python3 -m lightnet_ops.bench --quick --out <tmp>; results copied to OUTDIR
#
# OUTDIR gets at most 8 files: build.log, pytest.log, sanitizer.log (exercise,
# memcheck and racecheck sections), bench.log, summary.txt and the benchmark results (at most three
# files: a .json, a .md table and a .png, else one bench_results.tar.gz).
#
# Environment overrides: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS
# (default nproc), GPU_CHECK_PYTEST_ARGS (default "-q -rfE --tb=short"), GPU_CHECK_PYTEST_CAP_S (default 200),
# GPU_CHECK_BENCH_ARGS (extra bench arguments, e.g. "--modes fwd+bwd step"), GPU_CHECK_BUDGET_S (default 430).
set -u

OUT="${1:-gpu-check-results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

PY="${PYTHON:-python3}"
START=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET_S:-430}"
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
run_step() {
  local name=$1 log=$2 cap=$3 reserve=$4
  shift 4
  local limit t0 rc
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
run_step build "$OUT/build.log" 240 420 "$PY" setup.py build_ext --inplace
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
# One pytest process per test file, GPU-heavy files first: a crash (a segfault ends the process)
# then costs one file's results, not the whole run's. Each file's exit status is logged.
export GPU_CHECK_PY="$PY" GPU_CHECK_PYTEST_EXTRA="${PYTEST_EXTRA[*]}" GPU_CHECK_ARGS="${GPU_CHECK_PYTEST_ARGS:--q -rfE --tb=short}"
run_step pytest "$OUT/pytest.log" ${GPU_CHECK_PYTEST_CAP_S:-200} 300 bash -c '
  files="tests/test_conv2d_relu_maxpool2d.py tests/test_linear_relu.py tests/test_triton_kernels.py tests/test_cuda_build.py"
  for f in tests/test_*.py; do case " $files " in *" $f "*) ;; *) files="$files $f" ;; esac; done
  worst=0
  for f in $files; do
    echo "----- $f"
    $GPU_CHECK_PY -X faulthandler -m pytest $GPU_CHECK_ARGS $GPU_CHECK_PYTEST_EXTRA -p no:cacheprovider "$f"
    rc=$?
    echo "----- $f: exit $rc"
    [ $rc -ne 0 ] && worst=1
  done
  exit $worst'

# 3. Every kernel against the reference, then under compute-sanitizer.
run_step exercise "$SAN_LOG" 60 260 "$PY" scripts/exercise_kernels.py

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
  run_step memcheck "$SAN_LOG" 100 170 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool memcheck --error-exitcode 1 --print-limit 100 "$PY" scripts/exercise_kernels.py --quick
  run_step racecheck "$SAN_LOG" 80 120 \
    "$SANITIZER" --tool racecheck --error-exitcode 1 --print-limit 100 "$PY" scripts/exercise_kernels.py --quick
fi

# 4. Quick benchmarks into a scratch folder; at most two result files are copied back.
BENCH_TMP="$(mktemp -d)"
# shellcheck disable=SC2086
run_step bench "$OUT/bench.log" ${GPU_CHECK_BENCH_CAP_S:-120} 0 "$PY" -m lightnet_ops.bench --quick ${GPU_CHECK_BENCH_ARGS:-} --out "$BENCH_TMP"
mapfile -t BENCH_FILES < <(find "$BENCH_TMP" -type f | sort)
{
  echo "bench output files (${#BENCH_FILES[@]}):"
  printf '  %s\n' "${BENCH_FILES[@]}"
} >>"$OUT/bench.log"
if ((${#BENCH_FILES[@]} > 0)); then
  n_json=$(printf '%s\n' "${BENCH_FILES[@]}" | grep -c '\.json$')
  n_png=$(printf '%s\n' "${BENCH_FILES[@]}" | grep -c '\.png$')
  n_md=$(printf '%s\n' "${BENCH_FILES[@]}" | grep -c '\.md$')
  if ((${#BENCH_FILES[@]} <= 3 && n_json <= 1 && n_png <= 1 && n_md <= 1)); then
    cp "${BENCH_FILES[@]}" "$OUT/"
  else
    tar -czf "$OUT/bench_results.tar.gz" -C "$BENCH_TMP" .
  fi
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
