"""linear_relu: 576->120 at batch 256 and 1024->4096 at batch 4096 (plus fp16/bf16 on CUDA), forward
and forward+backward, for every backend this install has plus stock eager and torch.compile."""

from __future__ import annotations

import pytest
from conftest import params


@pytest.mark.parametrize("case,mode,impl", params("linear"))
def test_linear_relu(benchmark, bench_run, case, mode, impl):
    bench_run(benchmark, case, impl, mode)
