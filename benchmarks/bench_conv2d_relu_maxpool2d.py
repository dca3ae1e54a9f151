"""conv2d_relu_maxpool2d: LightNet conv1/conv2 at batch 1/64/256 and the VGG-style block, forward and
forward+backward, conv1/conv2 at batch 8 forward, for every backend this install has plus stock eager
and torch.compile."""

from __future__ import annotations

import pytest
import torch

import lightnet_ops.bench as lb

DEVICE_KIND = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case,mode,impl", lb.benchmark_matrix("conv", DEVICE_KIND), ids=lb.case_id)
def test_conv2d_relu_maxpool2d(benchmark, bench_run, case, mode, impl):
    bench_run(benchmark, case, impl, mode)
