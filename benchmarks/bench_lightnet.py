"""LightNet (fused, per backend) vs StockLightNet (eager, torch.compile, and ONNX Runtime for inference
when it is installed), same initialisation: inference forward at batch 1, 8, 64 and 256 and the SGD
training step (forward, cross-entropy, backward, step) at batch 64 and 256."""

from __future__ import annotations

import pytest
import torch

import lightnet_ops.bench as lb

DEVICE_KIND = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case,mode,impl", lb.benchmark_matrix("lightnet", DEVICE_KIND), ids=lb.case_id)
def test_lightnet(benchmark, bench_run, case, mode, impl):
    bench_run(benchmark, case, impl, mode)
