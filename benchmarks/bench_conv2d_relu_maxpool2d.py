"""conv2d_relu_maxpool2d: LightNet conv1/conv2 at batch 1/64/256 and the VGG-style block, forward and
forward+backward, for every backend this install has plus stock eager and torch.compile."""

from __future__ import annotations

import pytest
from conftest import params


@pytest.mark.parametrize("case,mode,impl", params("conv"))
def test_conv2d_relu_maxpool2d(benchmark, bench_run, case, mode, impl):
    bench_run(benchmark, case, impl, mode)
