"""Benchmark harness: fused lightnet_ops backends against stock PyTorch and ``torch.compile``.

Run ``python -m lightnet_ops.bench`` (or ``lightnet-bench``, or ``make bench``). It picks the device
(CUDA when present, else CPU), times every case for every backend this install has plus the peers
``stock`` (torch.nn / F composition, eager) and ``compile`` (``torch.compile`` of that composition),
prints a table, and writes ``results_<device>.json`` and ``speedups_<device>.png`` (``_quick`` added
in ``--quick`` mode) under ``benchmarks/results/``.

Modes:
  ``fwd``      inference forward under ``torch.no_grad()`` (the fused ops skip the argmax)
  ``fwd+bwd``  forward with autograd, then ``torch.autograd.grad`` of (input, weight, bias) with a fixed
               grad_output created outside the timed region
  ``step``     LightNet training step: zero_grad, forward, cross-entropy, backward, SGD step

Timing: the backends of one (case, mode) are warmed up (``torch.compile`` compiles here, untimed),
then sampled round-robin, one block of calls per backend per round, so load changes on a shared
machine hit all backends alike; speedups are ratios of medians from the same run.
CPU blocks run through ``torch.utils.benchmark.Timer`` with a fixed thread count; CUDA blocks are
timed with CUDA events after a synchronise.

Memory: ``saved_bytes`` is what the forward keeps for backward, measured with
``torch.autograd.graph.saved_tensors_hooks`` (unique storages, parameters and the input excluded);
``peak_bytes`` is the peak of memory allocated through PyTorch during one call above the level
before it: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU, the running sum of the
allocation / free records of ``torch.profiler`` (``profile_memory=True``) in time order.

The case definitions and ``build_runner`` are shared with the pytest-benchmark files in
``benchmarks/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import lightnet_ops as lo

PEERS = ("stock", "compile")
MODES = ("fwd", "fwd+bwd", "step")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# In a source checkout results go next to the benchmark files; an installed copy (site-packages)
# writes under the current directory instead.
DEFAULT_OUT = (
    os.path.join(REPO_ROOT, "benchmarks", "results")
    if os.path.isdir(os.path.join(REPO_ROOT, "benchmarks"))
    else os.path.join(os.getcwd(), "benchmarks", "results")
)


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One benchmark problem.

    op: "conv" (conv2d_relu_maxpool2d), "linear" (linear_relu) or "lightnet" (the whole model).
    conv: (C, K, H, W, kernel, stride, padding, dilation, pool_kernel, pool_stride), NCHW input.
    linear: (in_features, out_features).
    devices: device kinds the case runs on; quick: device kinds whose --quick run includes it.
    """

    name: str
    op: str
    batch: int
    description: str
    dtype: str = "float32"
    conv: Optional[tuple] = None
    linear: Optional[tuple] = None
    devices: tuple = ("cpu", "cuda")
    quick: tuple = ()

    @property
    def modes(self) -> tuple:
        return ("fwd", "step") if self.op == "lightnet" else ("fwd", "fwd+bwd")


def _conv_case(name, batch, spec, desc, dtype="float32", devices=("cpu", "cuda"), quick=()):
    return Case(name, "conv", batch, desc, dtype, conv=spec, devices=devices, quick=quick)


def _linear_case(name, batch, spec, desc, dtype="float32", devices=("cpu", "cuda"), quick=()):
    return Case(name, "linear", batch, desc, dtype, linear=spec, devices=devices, quick=quick)


_CONV1 = (1, 6, 32, 32, 3, 1, 0, 1, 2, 2)     # LightNet conv1: 1->6, 32x32, k3, pool2
_CONV2 = (6, 16, 15, 15, 3, 1, 0, 1, 2, 2)    # LightNet conv2: 6->16, 15x15, k3, pool2
_VGG = (64, 64, 56, 56, 3, 1, 1, 1, 2, 2)     # VGG-style block: 64->64, 56x56, k3 pad1, pool2

CASES: tuple[Case, ...] = (
    _conv_case("conv1_b1", 1, _CONV1, "LightNet conv1 1->6 32x32 k3 pool2, batch 1"),
    _conv_case("conv1_b64", 64, _CONV1, "LightNet conv1 1->6 32x32 k3 pool2, batch 64", quick=("cpu",)),
    _conv_case("conv1_b256", 256, _CONV1, "LightNet conv1 1->6 32x32 k3 pool2, batch 256", quick=("cuda",)),
    _conv_case("conv2_b1", 1, _CONV2, "LightNet conv2 6->16 15x15 k3 pool2, batch 1"),
    _conv_case("conv2_b64", 64, _CONV2, "LightNet conv2 6->16 15x15 k3 pool2, batch 64", quick=("cpu",)),
    _conv_case("conv2_b256", 256, _CONV2, "LightNet conv2 6->16 15x15 k3 pool2, batch 256", quick=("cuda",)),
    _conv_case("vgg_b8", 8, _VGG, "VGG-style block 64->64 56x56 k3 pad1 pool2, batch 8", quick=("cpu",)),
    _conv_case("vgg_b8_fp16", 8, _VGG, "VGG-style block, float16", "float16", ("cuda",), quick=("cuda",)),
    _conv_case("vgg_b8_bf16", 8, _VGG, "VGG-style block, bfloat16", "bfloat16", ("cuda",), quick=("cuda",)),
    _linear_case("linear_576x120_b256", 256, (576, 120), "linear_relu 576->120 (LightNet fc1), batch 256",
                 quick=("cpu", "cuda")),
    _linear_case("linear_1024x4096_b4096", 4096, (1024, 4096), "linear_relu 1024->4096, batch 4096"),
    _linear_case("linear_1024x4096_b4096_fp16", 4096, (1024, 4096), "linear_relu 1024->4096, batch 4096, float16",
                 "float16", ("cuda",)),
    _linear_case("linear_1024x4096_b4096_bf16", 4096, (1024, 4096), "linear_relu 1024->4096, batch 4096, bfloat16",
                 "bfloat16", ("cuda",), quick=("cuda",)),
    Case("lightnet_b64", "lightnet", 64, "LightNet 1x32x32 -> 10: inference forward / SGD training step, batch 64",
         quick=("cpu",)),
    Case("lightnet_b256", "lightnet", 256, "LightNet 1x32x32 -> 10: inference forward / SGD training step, batch 256",
         quick=("cuda",)),
)
CASES_BY_NAME = {c.name: c for c in CASES}

#: Speed targets from the issues (stock or compile time / backend time; "memory": stock saved bytes /
#: backend saved bytes). (device kind, case, mode, backends, peer, ratio).
TARGETS: tuple = (
    ("cpu", "conv1_b64", "fwd", ("cpu",), "stock", 3.0),
    ("cpu", "conv2_b64", "fwd", ("cpu",), "stock", 3.0),
    ("cpu", "conv1_b64", "fwd+bwd", ("cpu",), "stock", 2.0),
    ("cpu", "conv2_b64", "fwd+bwd", ("cpu",), "stock", 2.0),
    ("cpu", "vgg_b8", "fwd", ("cpu",), "stock", 1.5),
    ("cpu", "vgg_b8", "fwd+bwd", ("cpu",), "stock", 1.2),
    ("cpu", "linear_576x120_b256", "fwd+bwd", ("cpu",), "stock", 1.1),
    ("cpu", "linear_1024x4096_b4096", "fwd+bwd", ("cpu",), "stock", 1.0),
    ("cpu", "lightnet_b64", "step", ("cpu",), "stock", 3.0),
    ("cpu", "lightnet_b256", "step", ("cpu",), "stock", 3.0),
    ("cpu", "conv*", "fwd+bwd", ("cpu",), "memory", 8.0),
    ("cuda", "conv1_b256", "fwd+bwd", ("cuda", "triton"), "stock", 2.0),
    ("cuda", "conv2_b256", "fwd+bwd", ("cuda", "triton"), "stock", 2.0),
    ("cuda", "conv1_b256", "fwd+bwd", ("cuda", "triton"), "compile", 1.2),
    ("cuda", "conv2_b256", "fwd+bwd", ("cuda", "triton"), "compile", 1.2),
    ("cuda", "vgg_b8_fp16", "fwd+bwd", ("cuda", "triton"), "stock", 1.3),
    ("cuda", "vgg_b8_bf16", "fwd+bwd", ("cuda", "triton"), "stock", 1.3),
    ("cuda", "vgg_b8_fp16", "fwd+bwd", ("cuda", "triton"), "compile", 1.0),
    ("cuda", "vgg_b8_bf16", "fwd+bwd", ("cuda", "triton"), "compile", 1.0),
    ("cuda", "linear_1024x4096_b4096_bf16", "fwd+bwd", ("cuda", "triton"), "stock", 1.1),
    ("cuda", "linear_1024x4096_b4096_bf16", "fwd+bwd", ("cuda", "triton"), "compile", 1.0),
    ("cuda", "lightnet_b256", "step", ("cuda", "triton"), "stock", 2.0),
    ("cuda", "lightnet_b256", "step", ("cuda", "triton"), "compile", 1.2),
    ("cuda", "*", "*", ("triton",), "cuda", 1 / 1.25),
)


def select_cases(device_kind: str, patterns: Optional[list[str]] = None, quick: bool = False) -> list[Case]:
    """Cases for a device kind. `patterns` are case names or fnmatch patterns ("conv*"); without them,
    every case for the device (only the quick subset when `quick`)."""
    cases = [c for c in CASES if device_kind in c.devices]
    if patterns:
        unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(c.name, p) for c in CASES)]
        if unknown:
            raise SystemExit(f"unknown case(s) {unknown}; --list shows them")
        chosen = [c for c in cases if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
        if not chosen:
            raise SystemExit(f"no case matching {patterns} runs on {device_kind}")
        return chosen
    if quick:
        cases = [c for c in cases if device_kind in c.quick]
    return cases


# ----------------------------------------------------------------------------------------------
# Runners: the timed callables
# ----------------------------------------------------------------------------------------------
@dataclass
class Runner:
    """fn: the timed callable. exclude: tensors whose storages do not count as activations.
    forward_with_grad: a forward that builds the autograd graph (for the saved-tensor measurement)."""

    fn: Callable[[], Any]
    exclude: list
    forward_with_grad: Optional[Callable[[], Any]] = None
    flops: Optional[float] = None
    min_bytes: Optional[float] = None


def _stock_conv(x, w, b, stride, padding, dilation, pool_k, pool_s):
    return F.max_pool2d(F.relu(F.conv2d(x, w, b, stride, padding, dilation)), pool_k, pool_s)


def _stock_linear(x, w, b):
    return F.relu(F.linear(x, w, b))


def _compile(fn: Callable) -> Callable:
    # dynamic=False: one static graph per shape, as a user with fixed shapes gets.
    return torch.compile(fn, dynamic=False)


def _conv_sizes(case: Case) -> dict:
    C, K, H, W, k, s, p, d, pk, ps = case.conv
    P = (H + 2 * p - d * (k - 1) - 1) // s + 1
    Q = (W + 2 * p - d * (k - 1) - 1) // s + 1
    PH, PW = (P - pk) // ps + 1, (Q - pk) // ps + 1
    return dict(C=C, K=K, H=H, W=W, k=k, s=s, p=p, d=d, pk=pk, ps=ps, P=P, Q=Q, PH=PH, PW=PW)


def _op_cost(case: Case, mode: str) -> tuple[Optional[float], Optional[float]]:
    """(FLOPs, compulsory bytes) of one call: every input read once, every output written once."""
    e = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    N = case.batch
    if case.op == "conv":
        z = _conv_sizes(case)
        x, w, b = N * z["C"] * z["H"] * z["W"], z["K"] * z["C"] * z["k"] ** 2, z["K"]
        out = N * z["K"] * z["PH"] * z["PW"]
        flops = 2.0 * N * z["K"] * z["P"] * z["Q"] * z["C"] * z["k"] ** 2
        if mode == "fwd":
            return flops, float(e * (x + w + b + out))
        # forward writes out + argmax (1 B); backward reads grad_out, argmax, x, w, writes the three grads
        fwd = e * (x + w + b + out) + out
        bwd = e * (out + x + w) + out + e * (x + w + b)
        return 3 * flops, float(fwd + bwd)
    if case.op == "linear":
        fin, fout = case.linear
        x, w, b, out = N * fin, fout * fin, fout, N * fout
        flops = 2.0 * N * fin * fout
        if mode == "fwd":
            return flops, float(e * (x + w + b + out))
        fwd = e * (x + w + b + out)
        bwd = e * (out + out + x + w) + e * (x + w + b)  # grad_out, saved out, x, w; grads
        return 3 * flops, float(fwd + bwd)
    return None, None


def _make_conv(case: Case, impl: str, mode: str, device: torch.device) -> Runner:
    z = _conv_sizes(case)
    dtype = DTYPES[case.dtype]
    g = torch.Generator().manual_seed(0)
    N = case.batch
    x = torch.randn(N, z["C"], z["H"], z["W"], generator=g).to(device, dtype)
    bound = 1.0 / math.sqrt(z["C"] * z["k"] ** 2)
    w = ((torch.rand(z["K"], z["C"], z["k"], z["k"], generator=g) * 2 - 1) * bound).to(device, dtype)
    b = ((torch.rand(z["K"], generator=g) * 2 - 1) * bound).to(device, dtype)
    args = ((z["s"],) * 2, (z["p"],) * 2, (z["d"],) * 2, (z["pk"],) * 2, (z["ps"],) * 2)
    if impl == "stock":
        f = _stock_conv
    elif impl == "compile":
        f = _compile(_stock_conv)
    else:
        def f(x, w, b, stride, padding, dilation, pool_k, pool_s, _backend=impl):
            return lo.conv2d_relu_maxpool2d(x, w, b, stride, padding, dilation, pool_k, pool_s, backend=_backend)
    return _op_runner(case, mode, f, (x, w, b), args, (N, z["K"], z["PH"], z["PW"]))


def _make_linear(case: Case, impl: str, mode: str, device: torch.device) -> Runner:
    fin, fout = case.linear
    dtype = DTYPES[case.dtype]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.batch, fin, generator=g).to(device, dtype)
    bound = 1.0 / math.sqrt(fin)
    w = ((torch.rand(fout, fin, generator=g) * 2 - 1) * bound).to(device, dtype)
    b = ((torch.rand(fout, generator=g) * 2 - 1) * bound).to(device, dtype)
    if impl == "stock":
        f = _stock_linear
    elif impl == "compile":
        f = _compile(_stock_linear)
    else:
        def f(x, w, b, _backend=impl):
            return lo.linear_relu(x, w, b, backend=_backend)
    return _op_runner(case, mode, f, (x, w, b), (), (case.batch, fout))


def _op_runner(case: Case, mode: str, f: Callable, tensors: tuple, args: tuple, out_shape: tuple) -> Runner:
    flops, nbytes = _op_cost(case, mode)
    if mode == "fwd":
        x, w, b = tensors

        def fwd():
            with torch.no_grad():
                return f(x, w, b, *args)

        return Runner(fwd, [x, w, b], None, flops, nbytes)
    if mode != "fwd+bwd":
        raise ValueError(f"mode {mode!r} does not apply to case {case.name}")
    leaves = [t.detach().requires_grad_(True) for t in tensors]
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out_shape, generator=g).to(tensors[0].device, tensors[0].dtype)

    def forward_with_grad():
        return f(*leaves, *args)

    def fwd_bwd():
        out = f(*leaves, *args)
        return torch.autograd.grad(out, leaves, grad_out)

    return Runner(fwd_bwd, list(leaves), forward_with_grad, flops, nbytes)


def _make_lightnet(case: Case, impl: str, mode: str, device: torch.device) -> Runner:
    dtype = DTYPES[case.dtype]
    torch.manual_seed(0)
    stock = lo.StockLightNet()
    if impl in PEERS:
        model = stock
    else:
        model = lo.LightNet(backend=impl)
        model.load_state_dict(stock.state_dict())
    model = model.to(device, dtype)
    net = _compile(model) if impl == "compile" else model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.batch, 1, 32, 32, generator=g).to(device, dtype)
    y = torch.randint(0, 10, (case.batch,), generator=g).to(device)
    params = list(model.parameters())
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return net(x)

        return Runner(fwd, params + [x])
    if mode != "step":
        raise ValueError(f"mode {mode!r} does not apply to case {case.name}")
    opt = torch.optim.SGD(params, lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss

    def forward_with_grad():
        return F.cross_entropy(net(x), y)

    return Runner(step, params + [x], forward_with_grad)


def build_runner(case: Case, impl: str, mode: str, device: torch.device | str) -> Runner:
    """The timed callable for `impl` (a lightnet_ops backend, "stock" or "compile") on `case`."""
    device = torch.device(device)
    if case.op == "conv":
        return _make_conv(case, impl, mode, device)
    if case.op == "linear":
        return _make_linear(case, impl, mode, device)
    return _make_lightnet(case, impl, mode, device)


def default_backends(device_kind: str) -> list[str]:
    """Backends of this install that run on the device, then the peers.

    On CPU, ``triton`` is listed only when TRITON_INTERPRET is set (the interpreter is not a
    performance path); ``cuda`` only on CUDA and ``cpu`` only on CPU."""
    names = [b for b in lo.backends() if b != ("cuda" if device_kind == "cpu" else "cpu")]
    order = {"cpu": 0, "cuda": 0, "triton": 1, "reference": 2}
    return sorted(names, key=order.get) + list(PEERS)


def benchmark_matrix(op: str, device_kind: str) -> list[tuple[Case, str, str]]:
    """(case, mode, impl) for every case of `op` ("conv", "linear", "lightnet") on the device kind,
    every mode and every default backend and peer: the parametrisation of benchmarks/bench_*.py."""
    impls = default_backends(device_kind)
    return [(c, m, i) for c in CASES if c.op == op and device_kind in c.devices for m in c.modes for i in impls]


def case_id(value: Any) -> Optional[str]:
    """pytest id for benchmark_matrix values: the case name for a Case, the default otherwise."""
    return value.name if isinstance(value, Case) else None


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_activation_bytes(forward: Callable[[], Any], exclude: list) -> int:
    """Bytes of the unique storages autograd saves during `forward()` for backward, not counting
    the storages of `exclude` (parameters, the input)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in excluded:
            seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


# Lines the profiler's C++ side writes to stderr on every start / stop (torch 2.14's kineto: a
# "USDT:" trace of profiler_start / profiler_stop, and a CUDA probe on machines without a GPU).
# They made up ~40% of a `make bench` log; everything else on stderr is passed through.
_PROFILER_NOISE = (re.compile(r"^USDT:.*SyncActivityProfilerHandler"),
                   re.compile(r"^ERROR:.*gpuGetDeviceCount failed"))


@contextlib.contextmanager
def _quiet_profiler_logs():
    """Runs the body with file descriptor 2 captured, then writes the captured lines back to
    stderr except the profiler's per-start/stop noise (_PROFILER_NOISE)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (e.g. an embedded interpreter): leave it alone
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(p.search(line) for p in _PROFILER_NOISE)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _cpu_peak_bytes(fn: Callable[[], Any]) -> Optional[int]:
    """Peak of the bytes allocated through PyTorch's CPU allocator during one `fn()` (its result
    freed at the end) above the level before it, from the profiler's memory records; None if this
    torch does not expose them."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_profiler_logs(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    try:
        records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                         if e.name() == "[memory]")
    except AttributeError:  # the (private) kineto result API moved
        return None
    level = peak = 0
    for _, nbytes in records:
        level += nbytes
        peak = max(peak, level)
    return peak


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Peak allocated bytes during one `fn()` above what was allocated before it."""
    if device.type != "cuda":
        return _cpu_peak_bytes(fn)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    return int(torch.cuda.max_memory_allocated(device) - base)


class _BlockTimer:
    """Per-call seconds of a block of `number` calls."""

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
    block_s: float        # target duration of one timed block
    budget_s: float       # target total sampling time of one (case, mode)
    min_samples: int
    max_samples: int
    warmup_s: float       # warm-up time after the first call


FULL = Settings(block_s=0.05, budget_s=4.0, min_samples=7, max_samples=41, warmup_s=0.3)
QUICK = Settings(block_s=0.02, budget_s=0.6, min_samples=5, max_samples=11, warmup_s=0.05)


def _warm_up(fn: Callable[[], Any], device: torch.device, seconds: float) -> tuple[float, float]:
    """Runs fn until `seconds` have passed after the first call (at least 3 calls). Returns (first-call
    seconds, per-call seconds estimate)."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    calls, t1 = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - t1 < seconds:
        fn()
        calls += 1
        if calls >= 3 and time.perf_counter() - t1 > 10 * max(seconds, 0.1):
            break
    _sync(device)
    return first, (time.perf_counter() - t1) / calls


def _summary(times: list[float]) -> dict:
    times = sorted(times)
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return dict(median_s=statistics.median(times), q1_s=q[0], q3_s=q[2], iqr_s=q[2] - q[0],
                min_s=times[0], max_s=times[-1], samples=len(times))


def _short_error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip().splitlines()
    return msg[0][:300] if msg else type(e).__name__


def measure_group(case: Case, mode: str, impls: list[str], device: torch.device, threads: int,
                  settings: Settings, log: Callable[[str], None]) -> list[dict]:
    """Rows for every impl on (case, mode); a failing impl gets a row with "error" set."""
    if "compile" in impls:
        torch._dynamo.reset()  # a fresh cache per group keeps recompile limits out of the way
    rows: dict[str, dict] = {}
    live: dict[str, tuple[Runner, _BlockTimer, int]] = {}
    for impl in impls:
        row = dict(case=case.name, op=case.op, mode=mode, backend=impl, dtype=case.dtype, batch=case.batch,
                   error=None, saved_bytes=None, saved_bytes_per_sample=None, peak_bytes=None)
        rows[impl] = row
        try:
            runner = build_runner(case, impl, mode, device)
            first, per_call = _warm_up(runner.fn, device, settings.warmup_s)
            row.update(first_call_s=first, per_call_estimate_s=per_call, flops=runner.flops,
                       min_bytes=runner.min_bytes)
            number = max(1, int(round(settings.block_s / max(per_call, 1e-9))))
            live[impl] = (runner, _BlockTimer(runner.fn, device, threads), number)
            row["block_calls"] = number
        except Exception as e:  # noqa: BLE001 - a failing backend is a result, not a crash
            row["error"] = _short_error(e)
            log(f"    {impl:<10} error: {row['error']}")
            if os.environ.get("LIGHTNET_BENCH_TRACEBACK"):
                traceback.print_exc()
    # Round-robin sampling.
    round_s = sum(number * rows[impl]["per_call_estimate_s"] for impl, (_, _, number) in live.items()) or 1.0
    samples = int(min(settings.max_samples, max(settings.min_samples, settings.budget_s // round_s)))
    times: dict[str, list[float]] = {impl: [] for impl in live}
    for _ in range(samples):
        for impl, (_, timer, number) in list(live.items()):
            try:
                times[impl].append(timer(number))
            except Exception as e:  # noqa: BLE001
                rows[impl]["error"] = _short_error(e)
                del live[impl]
    for impl, (runner, _, _) in live.items():
        row = rows[impl]
        row.update(_summary(times[impl]))
        try:
            if runner.forward_with_grad is not None:
                row["saved_bytes"] = saved_activation_bytes(runner.forward_with_grad, runner.exclude)
                row["saved_bytes_per_sample"] = row["saved_bytes"] / case.batch
            row["peak_bytes"] = peak_bytes(runner.fn, device)
        except Exception as e:  # noqa: BLE001
            row["memory_error"] = _short_error(e)
    # Ratios within the group.
    stock = rows.get("stock", {}).get("median_s")
    comp = rows.get("compile", {}).get("median_s")
    stock_saved = rows.get("stock", {}).get("saved_bytes")
    stock_min = rows.get("stock", {}).get("min_s")
    for row in rows.values():
        med = row.get("median_s")
        row["speedup_vs_stock"] = stock / med if med and stock else None
        row["speedup_vs_compile"] = comp / med if med and comp else None
        # Ratio of the fastest samples: less sensitive to other processes on a shared machine.
        row["speedup_vs_stock_of_min"] = stock_min / row["min_s"] if row.get("min_s") and stock_min else None
        saved = row.get("saved_bytes")
        row["memory_ratio_vs_stock"] = (stock_saved / saved if saved else None) if stock_saved and saved is not None \
            else None
        if med and row.get("flops"):
            row["gflops"] = row["flops"] / med / 1e9
        if med and row.get("min_bytes"):
            row["gbps"] = row["min_bytes"] / med / 1e9
    for impl in impls:
        r = rows[impl]
        if r["error"] is None:
            log(f"    {impl:<10} {_fmt_time(r['median_s'])} (IQR {_fmt_time(r['iqr_s'])}, {r['samples']} x "
                f"{r['block_calls']} calls)  x{_fmt_ratio(r['speedup_vs_stock'])} vs stock")
    return [rows[i] for i in impls]


def copy_bandwidth(device: torch.device, threads: int, nbytes: int) -> dict:
    """Device-to-device copy bandwidth (read + write bytes per second) of `dst.copy_(src)`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    timer = _BlockTimer(lambda: dst.copy_(src), device, threads)
    timer(2)
    times = sorted(timer(3) for _ in range(7))
    med = statistics.median(times)
    return dict(bytes=nbytes, median_s=med, gbps=2 * nbytes / med / 1e9)


# ----------------------------------------------------------------------------------------------
# Metadata, table, chart
# ----------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_simd() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [x for x in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni",
                                        "avx512_bf16", "amx_tile") if x in flags]
    except OSError:
        pass
    return []


def _load_average() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        r = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return dict(kind="cuda", name=torch.cuda.get_device_name(device),
                    total_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                    cuda_runtime=torch.version.cuda, host_cpu=_cpu_model(),
                    cudnn_benchmark=torch.backends.cudnn.benchmark, cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return dict(kind="cpu", name=_cpu_model(), logical_cpus=os.cpu_count(), simd=_cpu_simd(),
                torch_cpu_capability=torch.backends.cpu.get_cpu_capability())


def device_slug(info: dict) -> str:
    if info["kind"] == "cpu":
        return "cpu"
    return "cuda_" + re.sub(r"[^A-Za-z0-9]+", "-", info["name"]).strip("-")


def _fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.3f} ms"
    return f"{s:.3f} s"


def _fmt_ratio(r: Optional[float]) -> str:
    return "-" if r is None else f"{r:.2f}"


def _fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return "-"
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b:.0f} B"


TABLE_HEADER = ("case", "mode", "backend", "median", "IQR", "x stock", "x compile", "saved/sample", "mem saved",
                "peak mem", "%copyBW")


def table_rows(rows: list[dict]) -> list[tuple]:
    out = []
    for r in rows:
        if r.get("error"):
            out.append((r["case"], r["mode"], r["backend"], "error: " + r["error"][:60], "", "", "", "", "", "", ""))
            continue
        mem = r.get("memory_ratio_vs_stock")
        bw = r.get("fraction_of_copy_bandwidth")
        out.append((r["case"], r["mode"], r["backend"], _fmt_time(r.get("median_s")), _fmt_time(r.get("iqr_s")),
                    _fmt_ratio(r.get("speedup_vs_stock")), _fmt_ratio(r.get("speedup_vs_compile")),
                    _fmt_bytes(r.get("saved_bytes_per_sample")), "-" if mem is None else f"{mem:.1f}x",
                    _fmt_bytes(r.get("peak_bytes")), "-" if bw is None else f"{100 * bw:.1f}%"))
    return out


def format_table(rows: list[dict], markdown: bool = False) -> str:
    body = table_rows(rows)
    if markdown:
        lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(TABLE_HEADER, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*TABLE_HEADER), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in body]
    return "\n".join(lines)


def check_targets(rows: list[dict], device_kind: str) -> list[dict]:
    """Each issue target that this run measured: the measured ratio and whether it holds."""
    results = []
    for kind, case_pat, mode_pat, backends, peer, need in TARGETS:
        if kind != device_kind:
            continue
        for r in rows:
            if r["backend"] not in backends or r.get("error") or not fnmatch.fnmatchcase(r["case"], case_pat) \
                    or not fnmatch.fnmatchcase(r["mode"], mode_pat):
                continue
            if peer == "memory":
                got = r.get("memory_ratio_vs_stock")
            elif peer == "stock":
                got = r.get("speedup_vs_stock")
            elif peer == "compile":
                got = r.get("speedup_vs_compile")
            else:  # another backend of this library, e.g. triton vs cuda
                other = next((o for o in rows if o["case"] == r["case"] and o["mode"] == r["mode"]
                              and o["backend"] == peer and o.get("median_s")), None)
                got = other["median_s"] / r["median_s"] if other and r.get("median_s") else None
            if got is None:
                continue
            results.append(dict(case=r["case"], mode=r["mode"], backend=r["backend"], versus=peer,
                                target=need, measured=got, holds=bool(got >= need)))
    return results


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = []
    for r in rows:
        key = (r["case"], r["mode"])
        if key not in groups:
            groups.append(key)
    impls = [b for b in dict.fromkeys(r["backend"] for r in rows) if b != "stock"]
    if not groups or not impls:
        return
    height = max(3.0, 0.22 * len(groups) * len(impls) + 1.5)
    fig, ax = plt.subplots(figsize=(9, height))
    bar = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        ys, xs = [], []
        for i, key in enumerate(groups):
            r = next((r for r in rows if (r["case"], r["mode"]) == key and r["backend"] == impl), None)
            if r and r.get("speedup_vs_stock"):
                ys.append(i + (j - (len(impls) - 1) / 2) * bar)
                xs.append(r["speedup_vs_stock"])
        ax.barh(ys, xs, height=bar, label=impl)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels([f"{c} {m}" for c, m in groups], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over stock eager (stock median / backend median; log scale, >1 is faster)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lightnet-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the subset of cases marked quick, short measurements")
    p.add_argument("--cases", nargs="+", metavar="CASE", help="case names or patterns (conv*); see --list")
    p.add_argument("--backends", nargs="+", metavar="NAME",
                   help="lightnet_ops backends and peers (stock, compile); default: all this install has")
    p.add_argument("--modes", nargs="+", choices=MODES, help="default: every mode of each case")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch.get_num_threads())")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    p.add_argument("--out", default=DEFAULT_OUT, help="results directory (default: benchmarks/results)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG chart")
    p.add_argument("--list", action="store_true", help="list the cases and backends, then exit")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    if args.device == "auto":
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            print("--device cuda: no CUDA GPU is visible", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" \
            else torch.device("cpu")
    kind = device.type
    backends = list(args.backends) if args.backends else default_backends(kind)
    if args.no_compile:
        backends = [b for b in backends if b != "compile"]
    unknown = [b for b in backends if b not in ("cpu", "cuda", "triton", "reference") + PEERS]
    if unknown:
        print(f"unknown backend(s) {unknown}; choose from cpu, cuda, triton, reference, stock, compile",
              file=sys.stderr)
        return 2
    if args.list:
        print(f"device: {kind}; backends: {' '.join(backends)}")
        for c in CASES:
            q = f" quick on {','.join(c.quick)}" if c.quick else ""
            print(f"  {c.name:<30} [{','.join(c.devices)}{q}] modes {'/'.join(c.modes)}: {c.description}")
        return 0
    cases = select_cases(kind, args.cases, args.quick)
    settings = QUICK if args.quick else FULL
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    info = device_info(device)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    groups = [(c, m) for c in cases for m in c.modes if not args.modes or m in args.modes]
    log(f"lightnet_ops bench on {info['name']} ({kind}, {threads} threads): {len(groups)} case/mode groups x "
        f"{len(backends)} backends [{', '.join(backends)}]{' (quick)' if args.quick else ''}")
    load_before = _load_average()
    if kind == "cpu" and load_before and load_before[0] > (os.cpu_count() or 1):
        log(f"warning: load average {load_before[0]:.1f} exceeds the {os.cpu_count()} CPUs; other processes are "
            f"competing for the cores and CPU timings will be noisy (compare ratios, not absolute times)")
    t_start = time.perf_counter()
    bw = None
    try:
        bw = copy_bandwidth(device, threads, (256 if kind == "cuda" else 64) * 2**20)
        log(f"copy bandwidth: {bw['gbps']:.1f} GB/s (read+write, {bw['bytes'] >> 20} MiB dst.copy_(src))")
    except Exception as e:  # noqa: BLE001
        log(f"copy bandwidth measurement failed: {_short_error(e)}")
    rows: list[dict] = []
    for i, (case, mode) in enumerate(groups, 1):
        log(f"[{i}/{len(groups)}] {case.name} {mode} ({case.dtype}, batch {case.batch})")
        impls = [b for b in backends if not (b == "compile" and args.quick and mode == "fwd")]
        rows += measure_group(case, mode, impls, device, threads, settings, log)
    elapsed = time.perf_counter() - t_start
    if bw:
        for r in rows:
            if r.get("gbps"):
                r["fraction_of_copy_bandwidth"] = r["gbps"] / bw["gbps"]

    print(format_table(rows))
    targets = check_targets(rows, kind)
    if targets:
        print("\nissue targets measured in this run:")
        for t in targets:
            print(f"  {'holds ' if t['holds'] else 'MISSED'}  {t['case']} {t['mode']} {t['backend']} vs {t['versus']}:"
                  f" {t['measured']:.2f} (target >= {t['target']:.2f})")
    result = dict(
        meta=dict(
            device=info, threads=threads, quick=args.quick, argv=sys.argv[1:] if argv is None else list(argv),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            git_commit=_git("rev-parse", "HEAD"), git_dirty=bool(_git("status", "--porcelain", "--untracked-files=no")),
            versions=dict(torch=torch.__version__, triton=_version("triton"), lightnet_ops=lo.__version__,
                          python=platform.python_version()),
            backends=backends, lightnet_ops_backends=lo.backends(),
            triton_interpret=os.environ.get("TRITON_INTERPRET"),
            triton_autotune=os.environ.get("LIGHTNET_OPS_TRITON_AUTOTUNE", "1"), copy_bandwidth=bw, elapsed_s=elapsed,
            settings=asdict(settings), load_average_before=load_before, load_average_after=_load_average(),
            notes=["speedups are ratios of medians from the same run (round-robin sampling)",
                   "fwd = inference under torch.no_grad(); fwd+bwd = forward + torch.autograd.grad of input, "
                   "weight, bias with a fixed grad_output; step = zero_grad, forward, cross_entropy, backward, SGD",
                   "saved_bytes = unique storages saved for backward (saved_tensors_hooks), params and input excluded",
                   "peak_bytes: peak allocated during one call above the pre-call level (CUDA: "
                   "max_memory_allocated; CPU: running sum of the profiler's memory records)",
                   "min_bytes/gbps: compulsory traffic (inputs read once, outputs written once) per call"],
        ),
        rows=rows,
        targets=targets,
    )
    os.makedirs(args.out, exist_ok=True)
    stem = device_slug(info) + ("_quick" if args.quick else "")
    json_path = os.path.join(args.out, f"results_{stem}.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    md_path = os.path.join(args.out, f"table_{stem}.md")
    with open(md_path, "w") as f:
        f.write(f"{info['name']} ({kind}, {threads} threads), torch {torch.__version__}, "
                f"commit {(result['meta']['git_commit'] or '?')[:10]}, {result['meta']['date']}\n\n")
        f.write(format_table(rows, markdown=True) + "\n")
    written = [json_path, md_path]
    if not args.no_plot:
        png_path = os.path.join(args.out, f"speedups_{stem}.png")
        try:
            plot(rows, png_path, f"lightnet_ops speedups over stock eager - {info['name']} ({kind}, {threads} threads)")
            written.append(png_path)
        except Exception as e:  # noqa: BLE001
            log(f"plot failed: {_short_error(e)}")
    log(f"\nwrote {', '.join(os.path.relpath(p) for p in written)} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
