"""pytest-benchmark setup for benchmarks/ (not part of `make test`; run
`python -m pytest benchmarks/ --benchmark-only`).

Files are named bench_*.py (bench_ops.py: every fused op; bench_lightnet.py, bench_call_overhead.py),
so they are collected here rather than through pytest's default test_*.py pattern. Cases and the
timed callables come from lightnet_ops.bench, the same definitions `python -m lightnet_ops.bench` uses.
"""

from __future__ import annotations

import os

import pytest
import torch

import lightnet_ops.bench as lb

DEVICE = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
THREADS = int(os.environ.get("LIGHTNET_BENCH_THREADS", "0")) or torch.get_num_threads()


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself; don't add them twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    torch.set_num_threads(THREADS)
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)


def pytest_report_header(config):
    info = lb.device_info(DEVICE)
    return [f"lightnet_ops bench device: {info['name']} ({DEVICE.type}), threads={THREADS}, "
            f"impls={lb.default_backends(DEVICE.type)}"]


@pytest.fixture
def bench_run():
    """bench_run(benchmark, case, impl, mode): warms up (torch.compile compiles here, untimed), then
    lets pytest-benchmark time the callable; CUDA calls are synchronised inside the timed call."""

    def run(benchmark, case: lb.Case, impl: str, mode: str) -> None:
        benchmark.group = f"{case.name} {mode}"
        runner = lb.build_runner(case, impl, mode, DEVICE)
        if DEVICE.type == "cuda":
            def fn():
                runner.fn()
                torch.cuda.synchronize(DEVICE)
        else:
            fn = runner.fn
        for _ in range(3):
            fn()
        benchmark(fn)
        benchmark.extra_info.update(device=lb.device_info(DEVICE)["name"], threads=THREADS, dtype=case.dtype,
                                    batch=case.batch)
        if runner.forward_with_grad is not None:
            saved = lb.saved_activation_bytes(runner.forward_with_grad, runner.exclude)
            benchmark.extra_info.update(saved_bytes=saved, saved_bytes_per_sample=saved / case.batch)
        if runner.torch_memory:
            benchmark.extra_info["peak_bytes"] = lb.peak_bytes(runner.fn, DEVICE)

    return run
