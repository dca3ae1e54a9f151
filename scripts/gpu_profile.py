"""Where the time of each GPU benchmark case goes: host (Python, dispatch, launches) or device
(kernels), and which kernels. Run by scripts/gpu_check.sh on a CUDA machine; prints one block per
(case, mode, impl):

    conv1_b256 fwd+bwd cuda: wall 123.4 us/call  host 98.7 us/call  kernels 45.6 us/call in 7 launches
        20.1 us  x1  some_kernel_name ...

wall: CUDA-event time per call of back-to-back calls (as the benchmark times them). host: time the
Python thread spends issuing one call when it never waits for the GPU (20 calls, no sync inside).
kernels: the sum of the durations of the GPU activities per call (kernels, and memsets or copies
where there are any; torch.profiler, 10 calls). wall close to host means the case is bound by the
host (Python, dispatch, launches); wall close to kernels means the GPU is the floor.

wall is the best of three blocks of 50 calls; the benchmark (lightnet_ops.bench) reports the
median of ~50 ms blocks, which reads higher on a noisy host.

Usage: python3 scripts/gpu_profile.py [--cases NAME ...] [--impls cuda triton stock ...]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lightnet_ops import bench  # noqa: E402

DEFAULT_CASES = ["conv1_b256", "conv2_b256", "vgg_b8_fp16", "vgg_b8_bf16", "linear_1024x4096_b4096_bf16",
                 "lightnet_b256"]


def _events_per_call(fn, device, calls: int = 50) -> float:
    """Microseconds per call of `calls` back-to-back calls, timed with CUDA events (the bench's timer)."""
    return bench._BlockTimer(fn, device, threads=1)(calls) * 1e6


def _host_per_call(fn, device, calls: int = 20) -> float:
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize(device)
    return (t1 - t0) * 1e6 / calls


def _kernels_per_call(fn, device, calls: int = 10):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    per_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            per_name[e.name].append(e.time_range.elapsed_us())
    total = sum(sum(v) for v in per_name.values()) / calls
    launches = sum(len(v) for v in per_name.values()) / calls
    top = sorted(((sum(v) / calls, len(v) / calls, name) for name, v in per_name.items()), reverse=True)
    return total, launches, top


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES,
                   choices=[c.name for c in bench.CASES if "cuda" in c.devices])
    p.add_argument("--impls", nargs="+", default=["cuda", "triton", "stock"])
    p.add_argument("--top", type=int, default=8, help="kernels listed per block")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_profile: no CUDA device")
        return 1
    device = torch.device("cuda")
    failures = 0
    for name in args.cases:
        case = bench.CASES_BY_NAME[name]
        modes = ["step"] if case.op == "lightnet" else ["fwd+bwd"]
        for mode in modes:
            for impl in args.impls:
                label = f"{name} {mode} {impl}"
                try:
                    runner = bench.build_runner(case, impl, mode, device)
                    for _ in range(30):
                        runner.fn()
                    wall = min(_events_per_call(runner.fn, device) for _ in range(3))
                    host = min(_host_per_call(runner.fn, device) for _ in range(3))
                    total, launches, top = _kernels_per_call(runner.fn, device)
                except Exception as e:  # noqa: BLE001 - report and go on to the next block
                    failures += 1
                    print(f"{label}: ERROR {bench._short_error(e)}", flush=True)
                    continue
                print(f"{label}: wall {wall:.1f} us/call  host {host:.1f} us/call  kernels {total:.1f} us/call "
                      f"in {launches:g} launches", flush=True)
                for us, count, kname in top[: args.top]:
                    print(f"    {us:8.1f} us  x{count:<4g} {kname[:110]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
