"""linear_relu: 576->120 at batch 256 and 1024->4096 at batch 4096 (plus fp16/bf16 on CUDA), forward
and forward+backward; LightNet's fc1 / fc2 and a 4096->4096 layer at batch 1 and 8, forward; for every
backend this install has plus stock eager and torch.compile."""

from __future__ import annotations

import pytest
import torch

import lightnet_ops.bench as lb

DEVICE_KIND = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case,mode,impl", lb.benchmark_matrix("linear", DEVICE_KIND), ids=lb.case_id)
def test_linear_relu(benchmark, bench_run, case, mode, impl):
    bench_run(benchmark, case, impl, mode)
