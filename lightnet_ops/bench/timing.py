"""Timing: blocks of back-to-back calls, warm-up, summary statistics, copy bandwidth.

CPU blocks run through ``torch.utils.benchmark.Timer`` with a fixed thread count; CUDA blocks are
timed with CUDA events after a synchronise."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BlockTimer:
    """Per-call seconds of a block of `number` calls of `fn` on `device` (`threads` CPU threads)."""

    def __init__(self, fn: Callable[[], Any], device: torch.device, threads: int) -> None:
        self.fn, self.device = fn, device
        if device.type == "cpu":
            from torch.utils.benchmark import Timer

            self.timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)

    def __call__(self, number: int) -> float:
        if self.device.type == "cpu":
            return self.timer.timeit(number).times[0]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(self.device)
        start.record()
        for _ in range(number):
            self.fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number


@dataclass
class Settings:
    """How long to measure one (case, mode) group."""

    block_s: float        # target duration of one timed block
    budget_s: float       # target total sampling time of one (case, mode)
    min_samples: int
    max_samples: int
    warmup_s: float       # warm-up time after the first call


FULL = Settings(block_s=0.05, budget_s=4.0, min_samples=7, max_samples=41, warmup_s=0.3)
QUICK = Settings(block_s=0.02, budget_s=0.6, min_samples=5, max_samples=11, warmup_s=0.05)


def warm_up(fn: Callable[[], Any], device: torch.device, seconds: float, min_calls: int = 3) -> tuple[float, float]:
    """Runs fn until `seconds` have passed after the first call (at least `min_calls` calls after it).
    Returns (first-call seconds, per-call seconds estimate)."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    calls, t1 = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - t1 < seconds:
        fn()
        calls += 1
        if calls >= min_calls and time.perf_counter() - t1 > 10 * max(seconds, 0.1):
            break
    sync(device)
    return first, (time.perf_counter() - t1) / calls


def time_block(fn: Callable[[], Any], device: torch.device, number: int) -> float:
    """Per-call seconds of `number` back-to-back calls of fn, timed with perf_counter (garbage
    collection paused, as timeit does; the device synchronised before and after). Unlike
    BlockTimer (torch.utils.benchmark's timeit), no untimed warm-up calls precede the block: for a
    slow call they would triple the time a block takes."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / number
    finally:
        if enabled:
            gc.enable()


def summary(times: list[float]) -> dict:
    """Median, quartiles, IQR, min, max and count of per-call times (seconds)."""
    times = sorted(times)
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return dict(median_s=statistics.median(times), q1_s=q[0], q3_s=q[2], iqr_s=q[2] - q[0],
                min_s=times[0], max_s=times[-1], samples=len(times))


def copy_bandwidth(device: torch.device, threads: int, nbytes: int) -> dict:
    """Device-to-device copy bandwidth (read + write bytes per second) of `dst.copy_(src)`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    timer = BlockTimer(lambda: dst.copy_(src), device, threads)
    timer(2)
    times = sorted(timer(3) for _ in range(7))
    med = statistics.median(times)
    return dict(bytes=nbytes, median_s=med, gbps=2 * nbytes / med / 1e9)
