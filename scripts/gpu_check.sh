#!/usr/bin/env bash
# One-shot validation on a CUDA machine whose system python3 already has torch, triton, pytest
# (no pip installs, no venv, no internet needed). Usage: scripts/gpu_check.sh OUTDIR
#
# Steps (each runs even if an earlier one failed; each has a timeout so the whole run stays under
# ~8 minutes; the summary lists every step's exit status, 124 (or 137, killed after a grace
# period) meaning it timed out):
#   build      MAX_JOBS=$(nproc) TORCH_CUDA_ARCH_LIST=9.0 python3 setup.py egg_info build_ext --inplace
#              (egg_info: the torch_dynamo_backends entry point for torch.compile(backend="lightnet_ops"))
#   pytest     python3 -m pytest, Triton autotuning off; with pytest-xdist 8 workers (a crashing
#              test takes down one worker, which xdist names and replaces)
#   exercise   python3 scripts/exercise_kernels.py (every CUDA/Triton kernel vs the reference)
#   memcheck   compute-sanitizer --tool memcheck on the exercise script
#   racecheck  compute-sanitizer --tool racecheck on the exercise script
#   profile    python3 scripts/gpu_profile.py (host vs kernel time and the top kernels per case)
#   bench      python3 -m lightnet_ops.bench on the GPU target cases (full measurement settings)
#              --out <tmp>; results packed into OUTDIR/bench_results.tar.gz
#
# OUTDIR gets at most 8 files: build.log, pytest.log, junit.xml, sanitizer.log (exercise, memcheck
# and racecheck sections), profile.log, bench.log, summary.txt and bench_results.tar.gz.
#
# Environment overrides: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS
# (default nproc), GPU_CHECK_PYTEST_ARGS (default "-q -rfE --tb=short"), GPU_CHECK_PYTEST_CAP_S (default 200),
# GPU_CHECK_BENCH_ARGS (bench arguments; default: the issue's GPU target cases, fwd+bwd and step),
# GPU_CHECK_BENCH_CAP_S (default 150),
# GPU_CHECK_BUDGET_S (default 500), GPU_CHECK_STEPS (default "build pytest exercise memcheck
# racecheck profile bench": a shorter list runs only those), GPU_CHECK_TESTS (default "tests"),
# GPU_CHECK_PYTEST_K (a pytest -k expression; default: every test), GPU_CHECK_PROFILE_ARGS
# (gpu_profile.py arguments, e.g. "--impls cuda stock").
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

STEPS=" ${GPU_CHECK_STEPS:-build pytest exercise memcheck racecheck profile bench} "
wanted() { [[ "$STEPS" == *" $1 "* ]]; }
for step in $STEPS; do
  case " build pytest exercise memcheck racecheck profile bench " in
    *" $step "*) ;;
    *) echo "gpu_check: unknown step '$step' in GPU_CHECK_STEPS" >&2; exit 2 ;;
  esac
done

# The steps in order, each with the seconds it needs at the least (what the steps after a step
# keep back from it when the budget runs short).
ORDER=(build pytest exercise memcheck racecheck profile bench)
declare -A MIN_S=([build]=60 [pytest]=60 [exercise]=20 [memcheck]=30 [racecheck]=45 [profile]=30 [bench]=90)

# reserve_after NAME: the least seconds the wanted steps after NAME need.
reserve_after() {
  local after=0 total=0 step
  for step in "${ORDER[@]}"; do
    if ((after)) && wanted "$step"; then total=$((total + MIN_S[$step])); fi
    [ "$step" = "$1" ] && after=1
  done
  echo "$total"
}

# step_timeout NAME CAP: seconds step NAME may take: at most CAP, leaving the budget the later
# wanted steps need, and never less than 10.
step_timeout() {
  local left
  left=$((DEADLINE - $(now) - $(reserve_after "$1")))
  (($2 < left)) && left=$2
  ((left < 10)) && left=10
  echo "$left"
}

# run_step NAME LOG CAP CMD...: runs CMD with a timeout, appending to LOG.
run_step() {
  local name=$1 log=$2 cap=$3
  shift 3
  local limit t0 rc
  if ! wanted "$name"; then
    RESULTS+=("$(printf '%-10s skipped (GPU_CHECK_STEPS)' "$name")")
    return 0
  fi
  limit=$(step_timeout "$name" "$cap")
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
run_step build "$OUT/build.log" 180 "$PY" setup.py egg_info build_ext --inplace
"$PY" -c "
import torch, lightnet_ops
from lightnet_ops import _ops
print('extension:', 'loaded' if _ops.EXTENSION_AVAILABLE else _ops.EXTENSION_ERROR)
for op in _ops.OP_NAMES:
    print(op, 'CUDA kernel:', _ops.has_kernel(op, 'CUDA'))
print('backends:', lightnet_ops.backends())
" >>"$OUT/build.log" 2>&1

# 2. The test suite on the GPU (GPU_CHECK_PYTEST_K, e.g. "cuda or triton", selects a subset).
# Triton kernels run their one default config here: autotuning every test's problem sizes costs
# minutes (the autotune test switches it on for itself). Profile and bench below keep it off too.
export LIGHTNET_OPS_TRITON_AUTOTUNE="${LIGHTNET_OPS_TRITON_AUTOTUNE:-0}"
PYTEST_EXTRA=(--junitxml="$OUT/junit.xml" --durations=15)
if "$PY" -c "import pytest_benchmark" >/dev/null 2>&1; then
  PYTEST_EXTRA+=(--benchmark-disable)
fi
if [ -n "${GPU_CHECK_PYTEST_K:-}" ]; then
  PYTEST_EXTRA+=(-k "$GPU_CHECK_PYTEST_K")
fi
PYTEST_ARGS=(${GPU_CHECK_PYTEST_ARGS:--q -rfE --tb=short} "${PYTEST_EXTRA[@]}" -p no:cacheprovider)
TESTS="${GPU_CHECK_TESTS:-tests}"
if "$PY" -c "import xdist" >/dev/null 2>&1; then
  # 8 workers, one file per worker at a time: a segfault ends only its worker, and xdist reports
  # the test that was running and starts a new worker.
  # shellcheck disable=SC2086
  run_step pytest "$OUT/pytest.log" ${GPU_CHECK_PYTEST_CAP_S:-200} \
    "$PY" -X faulthandler -m pytest -n 8 --dist loadfile "${PYTEST_ARGS[@]}" $TESTS
else
  # shellcheck disable=SC2086
  run_step pytest "$OUT/pytest.log" ${GPU_CHECK_PYTEST_CAP_S:-200} \
    "$PY" -X faulthandler -m pytest "${PYTEST_ARGS[@]}" $TESTS
fi

# 3. Every kernel against the reference, then under compute-sanitizer.
run_step exercise "$SAN_LOG" 60 "$PY" scripts/exercise_kernels.py

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
  wanted memcheck && RESULTS+=("memcheck   exit MISSING (compute-sanitizer not found)")
  wanted racecheck && RESULTS+=("racecheck  exit MISSING (compute-sanitizer not found)")
else
  echo "compute-sanitizer: $SANITIZER ($("$SANITIZER" --version 2>&1 | tail -1))" >>"$SAN_LOG"
  # The caching allocator would hide out-of-bounds accesses inside its big blocks.
  run_step memcheck "$SAN_LOG" 80 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool memcheck --error-exitcode 1 --print-limit 100 "$PY" scripts/exercise_kernels.py --quick
  run_step racecheck "$SAN_LOG" 80 \
    "$SANITIZER" --tool racecheck --error-exitcode 1 --print-limit 100 "$PY" scripts/exercise_kernels.py --quick
fi

# 4. Where the time goes (host or kernels), per GPU target case and backend.
# shellcheck disable=SC2086
run_step profile "$OUT/profile.log" 80 "$PY" scripts/gpu_profile.py ${GPU_CHECK_PROFILE_ARGS:-}

# 5. Benchmarks of the GPU target cases into a scratch folder, packed into one archive.
BENCH_TMP="$(mktemp -d)"
BENCH_ARGS="${GPU_CHECK_BENCH_ARGS:---cases conv1_b256 conv2_b256 vgg_b8_fp16 vgg_b8_bf16 linear_1024x4096_b4096_bf16 lightnet_b256 --modes fwd+bwd step --backends cuda triton stock compile}"
# shellcheck disable=SC2086
run_step bench "$OUT/bench.log" ${GPU_CHECK_BENCH_CAP_S:-150} "$PY" -m lightnet_ops.bench $BENCH_ARGS --out "$BENCH_TMP"
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
