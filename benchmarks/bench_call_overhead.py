"""Per-call host cost on tiny tensors: one fused call (functional and module) against ONE stock call
(F.conv2d / F.linear, nn.Conv2d / nn.Linear), inference, for every backend this install has."""

from __future__ import annotations

import pytest
import torch

import lightnet_ops.bench as lb

DEVICE_KIND = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case,mode,impl", lb.benchmark_matrix("call_fn", DEVICE_KIND)
                         + lb.benchmark_matrix("call_module", DEVICE_KIND), ids=lb.case_id)
def test_call_overhead(benchmark, bench_run, case, mode, impl):
    bench_run(benchmark, case, impl, mode)
