"""LightNet (fused, per backend) vs StockLightNet (eager and torch.compile), same initialisation:
inference forward and the SGD training step (forward, cross-entropy, backward, step) at batch 64 and 256."""

from __future__ import annotations

import pytest
from conftest import params


@pytest.mark.parametrize("case,mode,impl", params("lightnet"))
def test_lightnet(benchmark, bench_run, case, mode, impl):
    bench_run(benchmark, case, impl, mode)
