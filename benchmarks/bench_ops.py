"""Every fused op alone (each entry of lightnet_ops.bench.OPS with a ``fused_op``), on each of its
cases, forward and forward+backward (inference only for the small-batch cases), for every backend
this install has plus stock eager and torch.compile. Test ids start with the op's name, so
``-k conv2d_relu_maxpool2d`` selects one op."""

from __future__ import annotations

import pytest
import torch

import lightnet_ops.bench as lb

DEVICE_KIND = "cuda" if torch.cuda.is_available() else "cpu"
MATRIX = [(op, *params) for op, entry in lb.fused_op_benches().items()
          for params in lb.benchmark_matrix(entry, DEVICE_KIND)]


@pytest.mark.parametrize("op,case,mode,impl", MATRIX, ids=lb.case_id)
def test_op(benchmark, bench_run, op, case, mode, impl):
    bench_run(benchmark, case, impl, mode)
