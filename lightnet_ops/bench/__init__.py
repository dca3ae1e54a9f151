"""Benchmark harness: fused lightnet_ops backends against stock PyTorch and ``torch.compile``.

Run ``python -m lightnet_ops.bench`` (or ``lightnet-bench``, or ``make bench``). It picks the device
(CUDA when present, else CPU), times every case for every backend this install has plus the peers
``stock`` (torch.nn / F composition, eager), ``compile`` (``torch.compile`` of that composition) and,
for LightNet inference on CPU when ``onnxruntime`` is installed, ``onnxruntime`` (the exported stock
model on ONNX Runtime's CPU provider, same thread count), prints a table, checks the speed targets (``targets.json``), and writes ``results_<device>.json``,
``table_<device>.md`` and ``speedups_<device>.png`` (``_quick`` added in ``--quick`` mode) under
``bench-results/`` (git-ignored); ``--update-reference`` writes the committed reference results under
``benchmarks/results/`` instead.

``--sweep`` times stock against the fused ops over a seeded list of shapes the cases do not list
(``sweep.py``) and reports the geometric mean, the worst ratio and the shapes below 0.95x.

Modes:
  ``fwd``      inference forward under ``torch.no_grad()`` (the fused ops skip the argmax)
  ``fwd+bwd``  forward with autograd, then ``torch.autograd.grad`` of (input, weight, bias) with a fixed
               grad_output created outside the timed region
  ``step``     LightNet training step: zero_grad, forward, cross-entropy, backward, SGD step

Modules:
  ``problems``     what a case is (Case, ConvShape, LinearShape)
  ``ops``          how each op is set up for every implementation, and its cases (OPS, build_runner, Runner);
                   a fused op's own part (cases, stock composition, inputs, cost) is its API module's BENCH
  ``cases``        the cases collected from OPS (CASES, select_cases, benchmark_matrix)
  ``timing``       block timer, warm-up, statistics, copy bandwidth (FULL / QUICK settings)
  ``memory``       saved-for-backward bytes and peak allocated bytes of one call
  ``measure``      one (case, mode) group: round-robin sampling, memory, ratios
  ``sweep``        the shape sweep: seeded shape list, interleaved timing, summaries
  ``targets``      the speed targets (``targets.json``) and the check of a run against them
  ``environment``  device, CPU, versions and git metadata of a run
  ``report``       text / markdown table, chart, result files
  ``cli``          the command line (main)

Timing: the backends of one (case, mode) are warmed up (``torch.compile`` compiles here, untimed),
then sampled round-robin, one block of calls per backend per round, so load changes on a shared
machine hit all backends alike; speedups are ratios of medians from the same run.

The case definitions and ``build_runner`` are shared with the pytest-benchmark files in
``benchmarks/``.
"""

from .cases import (CASES, CASES_BY_NAME, MODES, Case, ConvShape, LinearShape, benchmark_matrix, case_id,
                    fused_op_benches, select_cases)
from .cli import DEFAULT_OUT, REFERENCE_OUT, main, output_dir, parse_args
from .environment import REPO_ROOT, device_info, device_slug
from .measure import measure_group
from .memory import peak_bytes, quiet_profiler_logs, saved_activation_bytes
from .ops import DTYPES, OPS, ORT, PEERS, Runner, build_runner, default_backends
from .report import format_table, plot, short_error, table_rows
from .sweep import SWEEP_FULL, SWEEP_QUICK, SWEEP_SEED, SweepSettings, summarize, sweep_cases
from .targets import TARGETS_FILE, Target, check_targets, load_targets
from .timing import FULL, QUICK, BlockTimer, Settings, copy_bandwidth

# Names of the single-module harness that scripts/gpu_profile.py still uses.
_BlockTimer = BlockTimer
_short_error = short_error

__all__ = [
    "BlockTimer", "CASES", "CASES_BY_NAME", "Case", "ConvShape", "DEFAULT_OUT", "DTYPES", "FULL", "LinearShape",
    "MODES", "OPS", "ORT", "PEERS", "QUICK", "REFERENCE_OUT", "REPO_ROOT", "Runner", "SWEEP_FULL", "SWEEP_QUICK",
    "SWEEP_SEED", "Settings", "SweepSettings", "TARGETS_FILE", "Target",
    "benchmark_matrix", "build_runner", "case_id", "check_targets", "copy_bandwidth", "default_backends",
    "device_info", "device_slug", "format_table", "fused_op_benches", "load_targets", "main", "measure_group", "output_dir",
    "parse_args", "peak_bytes", "plot", "quiet_profiler_logs", "saved_activation_bytes", "select_cases",
    "short_error", "summarize", "sweep_cases", "table_rows",
]
