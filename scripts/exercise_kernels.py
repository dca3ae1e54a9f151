#!/usr/bin/env python3
"""Runs every CUDA kernel of lightnet_ops (and the Triton backend, if it imports) forward and
backward on small shapes, and compares each result with the reference backend. Exits non-zero on
any mismatch or error. Small on purpose: scripts/gpu_check.sh runs it under compute-sanitizer
(memcheck, racecheck).

Every op of lightnet_ops.ops.CONTRACTS runs on its contract's sample_args (forward, then backward
with every gradient asked for) against the contract's reference; EXTRAS adds the op-specific cases
below (an op without an entry gets the sample problem only).

Two data kinds per case:
  * "int": small integer values, so every conv/GEMM result is exact in every dtype (sums stay
    below 256, the largest range where bfloat16 holds every integer). Outputs and argmax must then
    equal the reference bit for bit, which checks the tie rule (first maximum wins), the ReLU
    sentinel and, with a NaN planted in the input, NaN propagation (last NaN in a window wins).
  * "randn": Gaussian values; outputs compared with a float64 reference computed from the same
    (rounded) inputs, gradients with the float64 reference backward fed the same argmax.

Both conv paths are forced in turn through LIGHTNET_OPS_CUDA_CONV_PATH=direct|cudnn (forward:
direct fused kernel or cuDNN + epilogue; backward: direct grad_input/grad_weight kernels or cuDNN),
the direct path once more with 64-bit indices forced (LIGHTNET_OPS_CUDA_INDEX64=1), plus the
automatic choice; both linear forward variants through LIGHTNET_OPS_CUDA_LINEAR_EPILOGUE.

Usage: python3 scripts/exercise_kernels.py [--quick] [--fp64] [--no-triton] [--backends cuda triton]
(--quick, for the sanitizer runs: same kernels, fewer launches: integer data only except for
randn-only cases, no separate "auto" path). Without a GPU, ``TRITON_INTERPRET=1 ... --backends triton``
runs the Triton kernels on CPU tensors in Triton's interpreter (slow: use --quick).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import lightnet_ops  # noqa: E402
from lightnet_ops import backend_registry, reference  # noqa: E402
from lightnet_ops.ops import CONTRACTS, OpContract  # noqa: E402

CONV_PATH_ENV = "LIGHTNET_OPS_CUDA_CONV_PATH"
# Forces 64-bit indices in the direct backward kernels (their 32-bit variant serves every size
# below 2^30 elements, so no test shape reaches the 64-bit one otherwise).
INDEX64_ENV = "LIGHTNET_OPS_CUDA_INDEX64"
CONV_BWD_PATH_ENV = "LIGHTNET_OPS_CUDA_CONV_BWD_PATH"
LINEAR_EPILOGUE_ENV = "LIGHTNET_OPS_CUDA_LINEAR_EPILOGUE"

# Tolerance for "randn" data, relative to max(1, max |float64 reference|) of each compared tensor.
TOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}
# Triton may use TF32 for float32 dot products.
TRITON_FP32_TOL = 5e-3


@dataclass(frozen=True)
class ConvCase:
    name: str
    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    pool_k: tuple[int, int] = (2, 2)
    pool_s: tuple[int, int] = (2, 2)
    int_range: int = 1          # integer data in [-int_range, int_range]
    channels_last: bool = False
    nan: bool = False           # plant a NaN in the input
    expanded_grad: bool = False  # grad_output is a stride-0 expanded tensor
    randn_only: bool = False


CONV_CASES = [
    # LightNet's first layer shape at a small size: 3*3*3*9 + 3 = 246 < 256.
    ConvCase("lightnet1", 2, 3, 12, 12, 6, 3, 3, int_range=3),
    ConvCase("lightnet2", 3, 6, 8, 9, 16, 3, 3, int_range=2),
    # Odd sizes, rectangular filter, stride/padding/dilation, overlapping pool windows.
    ConvCase("odd_overlap", 2, 2, 11, 9, 3, 3, 2, stride=(2, 1), padding=(1, 2), dilation=(1, 2), pool_k=(3, 2),
             pool_s=(2, 1), int_range=4),
    ConvCase("channels_last", 2, 4, 10, 10, 5, 3, 3, padding=(1, 1), int_range=2, channels_last=True),
    ConvCase("nan", 2, 3, 10, 10, 4, 3, 3, int_range=3, nan=True),
    ConvCase("expanded_grad", 2, 3, 8, 8, 4, 3, 3, int_range=3, expanded_grad=True),
    # 24*3*3 = 216 <= 256: values in {-1, 0, 1} stay exact.
    ConvCase("wide24", 2, 24, 9, 9, 8, 3, 3, padding=(1, 1), int_range=1),
    ConvCase("batch0", 0, 3, 8, 8, 4, 3, 3, int_range=1),
    # C*R*S = 360 > 256: the automatic choice takes the cuDNN path.
    ConvCase("wide40_auto_cudnn", 2, 40, 8, 8, 8, 3, 3, padding=(1, 1), randn_only=True),
]


@dataclass(frozen=True)
class LinearCase:
    name: str
    M: int
    IN: int
    OUT: int
    bias: bool = True
    nan: bool = False


LINEAR_CASES = [
    LinearCase("small", 5, 7, 9),
    LinearCase("no_bias", 6, 7, 10, bias=False),
    LinearCase("rows33", 33, 7, 70),
    LinearCase("nan", 4, 7, 9, nan=True),
    LinearCase("batch0", 0, 7, 9),
]


def _sync(dev: torch.device) -> None:
    """Waits for the device's kernels, so that an error is reported by the case that caused it."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Checker:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.passed = 0

    def close(self, label: str, actual: torch.Tensor, expected: torch.Tensor, tol: float | None) -> None:
        """tol None: exact (NaN == NaN); else |a - e| <= tol * max(1, max|e|)."""
        try:
            if actual.shape != expected.shape:
                raise AssertionError(f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
            if actual.dtype != expected.dtype and tol is None:
                raise AssertionError(f"dtype {actual.dtype} != {expected.dtype}")
            a = actual.detach().double().cpu()
            e = expected.detach().double().cpu()
            if tol is None:
                same = (a == e) | (a.isnan() & e.isnan())
                if not bool(same.all()):
                    bad = (~same).nonzero()[:5].tolist()
                    raise AssertionError(f"{int((~same).sum())} elements differ, first at {bad}: "
                                         f"{[a[tuple(i)].item() for i in bad]} vs {[e[tuple(i)].item() for i in bad]}")
            else:
                nan_a, nan_e = a.isnan(), e.isnan()
                if not bool((nan_a == nan_e).all()):
                    raise AssertionError(f"NaN pattern differs ({int(nan_a.sum())} vs {int(nan_e.sum())} NaNs)")
                finite = ~nan_e
                scale = max(1.0, float(e[finite].abs().max()) if bool(finite.any()) else 1.0)
                err = float((a[finite] - e[finite]).abs().max()) if bool(finite.any()) else 0.0
                if err > tol * scale:
                    raise AssertionError(f"max abs error {err:.3g} > {tol:.1g} * {scale:.3g}")
            self.passed += 1
        except AssertionError as ex:
            self.failures.append(f"{label}: {ex}")
            print(f"FAIL {label}: {ex}", flush=True)

    def error(self, label: str) -> None:
        msg = traceback.format_exc(limit=3).strip().splitlines()[-1]
        self.failures.append(f"{label}: raised {msg}")
        print(f"FAIL {label}: raised\n{traceback.format_exc()}", flush=True)


# --- every op: its contract's sample problem --------------------------------------------------


def _schema_args(name: str, schema: str) -> list:
    return torch._C.parse_schema(f"lightnet_ops::{name}{schema}").arguments


def backward_args(c: OpContract, fwd_args: tuple, outputs: Any, grad_output: torch.Tensor) -> list:
    """The backward op's arguments after the forward `fwd_args` -> `outputs`, by the backward schema's
    argument names: grad_output; the forward's own arguments (input, weight, stride, ...); output_mask
    all true; ``output``, the forward's output; any other tensor (the argmax), the forward's next
    returned tensors in order. Trailing arguments the forward call left at their defaults stay so."""
    given = dict(zip((a.name for a in _schema_args(c.name, c.schema)), fwd_args))
    forward_names = {a.name for a in _schema_args(c.name, c.schema)}
    outs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    routed = iter(outs[1:])
    args: list = []
    for a in _schema_args(c.backward_name, c.backward_schema):
        if a.name == "grad_output":
            args.append(grad_output)
        elif a.name == "output_mask":
            args.append([True] * a.N)
        elif a.name in given:
            args.append(given[a.name])
        elif a.name in forward_names and a.has_default_value():
            break
        elif a.name == "output":
            args.append(outs[0])
        else:
            args.append(next(routed))
    return args


def check_sample(chk: Checker, backend: str, c: OpContract, dtype: torch.dtype, dev: torch.device) -> None:
    """The op's sample problem (randn data): the forward's floating outputs against the float64
    reference of the same (rounded) inputs, then every gradient against the float64 reference
    backward fed the kernel's own routing outputs (argmax, ReLU gate)."""
    label = f"[{backend}] {c.name} sample {str(dtype).replace('torch.', '')}"
    kernels = backend_registry.get(backend).kernels(c.name)
    args = [a.to(dev) if isinstance(a, torch.Tensor) else a
            for a in c.sample_args(dtype, torch.Generator().manual_seed(7))]
    try:
        out = kernels.forward(*args)
        first = out[0] if isinstance(out, (tuple, list)) else out
        grad_output = torch.randn(first.shape, generator=torch.Generator().manual_seed(8)).to(dev, dtype)
        grads = kernels.backward(*backward_args(c, tuple(args), out, grad_output))
        _sync(dev)
    except Exception:  # noqa: BLE001 - report and go on with the other cases
        chk.error(label)
        return
    tol = TRITON_FP32_TOL if (backend == "triton" and dtype == torch.float32) else TOL[dtype]

    def f64(v: Any) -> Any:
        return v.detach().cpu().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else (
            v.cpu() if isinstance(v, torch.Tensor) else v)

    ref = c.reference(*(f64(a) for a in args))
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    for i, (got, exp) in enumerate(zip(outs, refs)):
        if got.is_floating_point():
            chk.close(f"{label} output {i}", got, exp, tol)
    ref_grads = c.reference_backward(*(f64(a) for a in backward_args(c, tuple(args), out, grad_output)))
    for i, (got, exp) in enumerate(zip(grads, ref_grads)):
        chk.close(f"{label} grad {i}", got, exp, tol)



# --- conv2d_relu_maxpool2d: integer data, NaN, channels_last, every CUDA path -----------------


def _conv_inputs(c: ConvCase, dtype: torch.dtype, kind: str, dev: torch.device):
    g = torch.Generator(device="cpu").manual_seed(1234)
    shape_x, shape_w = (c.N, c.C, c.H, c.W), (c.K, c.C, c.R, c.S)
    if kind == "int":
        a = c.int_range
        x = torch.randint(-a, a + 1, shape_x, generator=g).to(dtype)
        w = torch.randint(-a, a + 1, shape_w, generator=g).to(dtype)
        b = torch.randint(-a, a + 1, (c.K,), generator=g).to(dtype)
    else:
        x = torch.randn(shape_x, generator=g).to(dtype)
        w = (torch.randn(shape_w, generator=g) / (c.C * c.R * c.S) ** 0.5).to(dtype)
        b = torch.randn((c.K,), generator=g).to(dtype)
    if c.nan and x.numel() > 0:
        x[0, 0, 1, 1] = float("nan")
        x[-1, -1, 4, 5] = float("nan")
    x, w, b = x.to(dev), w.to(dev), b.to(dev)
    if c.channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, w, b


def _pooled_shape(c: ConvCase) -> tuple[int, int, int, int]:
    def out(n, k, s, p, d):
        return (n + 2 * p - d * (k - 1) - 1) // s + 1

    P = out(c.H, c.R, c.stride[0], c.padding[0], c.dilation[0])
    Q = out(c.W, c.S, c.stride[1], c.padding[1], c.dilation[1])
    return c.N, c.K, (P - c.pool_k[0]) // c.pool_s[0] + 1, (Q - c.pool_k[1]) // c.pool_s[1] + 1


def _grad_output(c: ConvCase, dtype, kind, dev):
    shape = _pooled_shape(c)
    g = torch.Generator(device="cpu").manual_seed(99)
    if c.expanded_grad:
        return torch.tensor(1.5 if kind == "randn" else 2.0, dtype=dtype, device=dev).expand(shape)
    if kind == "int":
        return torch.randint(-2, 3, shape, generator=g).to(dtype).to(dev)
    return torch.randn(shape, generator=g).to(dtype).to(dev)


def check_conv(chk: Checker, backend: str, c: ConvCase, dtype, kind: str, path: str, dev) -> None:
    label = f"[{backend}] conv {c.name} {str(dtype).replace('torch.', '')} {kind} path={path}"
    be = backend_registry.get(backend)
    x, w, b = _conv_inputs(c, dtype, kind, dev)
    gout = _grad_output(c, dtype, kind, dev)
    args = (list(c.stride), list(c.padding), list(c.dilation), list(c.pool_k), list(c.pool_s))
    try:
        out, argmax = be.kernels("conv2d_relu_maxpool2d").forward(x, w, b, *args, True)
        out_noarg, argmax_empty = be.kernels("conv2d_relu_maxpool2d").forward(x, w, b, *args, False)
        grads = be.kernels("conv2d_relu_maxpool2d").backward(gout, x, w, argmax, *args, [True, True, True])
        grads_masked = be.kernels("conv2d_relu_maxpool2d").backward(gout, x, w, argmax, *args, [False, True, False])
        _sync(dev)
    except Exception:  # noqa: BLE001 - report and go on with the other cases
        chk.error(label)
        return
    chk.close(f"{label} out(need_argmax=False) == out", out_noarg, out, None)
    chk.close(f"{label} empty argmax", torch.tensor(list(argmax_empty.shape)), torch.tensor([0]), None)
    # cuDNN may pick a different weight-gradient algorithm when grad_input is not wanted.
    chk.close(f"{label} masked grad_weight", grads_masked[1], grads[1], TOL[dtype])
    chk.close(f"{label} masked grad_input empty", torch.tensor(list(grads_masked[0].shape)), torch.tensor([0]), None)
    if c.N == 0:
        # Known answer: empty outputs, zero gradients (without relying on the reference for it).
        shape = _pooled_shape(c)
        chk.close(f"{label} out", out, torch.empty(shape, dtype=dtype), None)
        chk.close(f"{label} argmax", argmax, torch.empty(shape, dtype=torch.uint8), None)
        for name, got, like in zip(("grad_input", "grad_weight", "grad_bias"), grads, (x, w, b)):
            chk.close(f"{label} {name}", got, torch.zeros(like.shape, dtype=dtype), None)
    elif kind == "int":
        # Exact oracle: float64 on the CPU (im2col + GEMM: no Winograd/FFT that could move NaNs).
        cpu = [t.double().cpu() for t in (x, w, b, gout)]
        ref_out, ref_argmax = reference.conv2d_relu_maxpool2d(*cpu[:3], *args, True)
        ref_grads = reference.conv2d_relu_maxpool2d_backward(cpu[3], cpu[0], cpu[1], ref_argmax, *args,
                                                             [True, True, True])
        exact = True
        if backend == "cuda" and path == "cudnn" and not c.nan:
            # The exact checks need cuDNN's conv of integers to be exact (no Winograd/FFT rounding).
            conv = torch.nn.functional.conv2d(x, w, None, c.stride, c.padding, c.dilation)
            exact = bool((conv == conv.round()).all())
            if not exact:
                print(f"note {label}: cuDNN's conv output is not exact for integer data; "
                      "out compared with a tolerance, argmax not compared")
        chk.close(f"{label} out", out, ref_out.to(dtype) if exact else ref_out, None if exact else TOL[dtype])
        if exact:
            chk.close(f"{label} argmax", argmax, ref_argmax, None)
        # The routed gradient is exact; cuDNN may round grad_input/grad_weight sums (float16/bfloat16
        # always may), so those two get a tolerance.
        if not c.nan:  # cuDNN's backward algorithms may spread NaN differently from im2col
            for name, got, exp in zip(("grad_input", "grad_weight"), grads[:2], ref_grads[:2]):
                chk.close(f"{label} {name}", got, exp, TOL[dtype])
        bias_tol = None if dtype != torch.bfloat16 else TOL[dtype]
        chk.close(f"{label} grad_bias", grads[2], ref_grads[2].to(dtype) if bias_tol is None else ref_grads[2],
                  bias_tol)
    else:
        tol = TRITON_FP32_TOL if (backend == "triton" and dtype == torch.float32) else TOL[dtype]
        x64, w64, b64, g64 = x.double(), w.double(), b.double(), gout.double()
        ref_out, _ = reference.conv2d_relu_maxpool2d(x64, w64, b64, *args, True)
        ref_grads = reference.conv2d_relu_maxpool2d_backward(g64, x64, w64, argmax, *args, [True, True, True])
        chk.close(f"{label} out", out, ref_out, tol)
        for name, got, exp in zip(("grad_input", "grad_weight", "grad_bias"), grads, ref_grads):
            chk.close(f"{label} {name}", got, exp, tol)


# --- linear_relu: integer data, NaN, no bias, both CUDA epilogues ---------------------------------


def _linear_inputs(c: LinearCase, dtype, kind, dev):
    g = torch.Generator(device="cpu").manual_seed(4321)
    if kind == "int":
        x = torch.randint(-3, 4, (c.M, c.IN), generator=g).to(dtype)
        w = torch.randint(-3, 4, (c.OUT, c.IN), generator=g).to(dtype)
        b = torch.randint(-3, 4, (c.OUT,), generator=g).to(dtype)
        go = torch.randint(-2, 3, (c.M, c.OUT), generator=g).to(dtype)
    else:
        x = torch.randn((c.M, c.IN), generator=g).to(dtype)
        w = (torch.randn((c.OUT, c.IN), generator=g) / c.IN**0.5).to(dtype)
        b = torch.randn((c.OUT,), generator=g).to(dtype)
        go = torch.randn((c.M, c.OUT), generator=g).to(dtype)
    if c.nan and x.numel() > 0:
        x[0, 0] = float("nan")
    return x.to(dev), w.to(dev), (b.to(dev) if c.bias else None), go.to(dev)


def check_linear(chk: Checker, backend: str, c: LinearCase, dtype, kind: str, epilogue: str, dev) -> None:
    label = f"[{backend}] linear {c.name} {str(dtype).replace('torch.', '')} {kind} epilogue={epilogue}"
    be = backend_registry.get(backend)
    x, w, b, go = _linear_inputs(c, dtype, kind, dev)
    mask = [True, True, b is not None]
    try:
        out = be.kernels("linear_relu").forward(x, w, b)
        grads = be.kernels("linear_relu").backward(go, x, w, out, mask)
        _sync(dev)
    except Exception:  # noqa: BLE001
        chk.error(label)
        return
    if kind == "int":
        # Every sum is an integer below 256: exact in every dtype. Oracle: float64 on the CPU.
        x64, w64, go64 = x.double().cpu(), w.double().cpu(), go.double().cpu()
        b64 = None if b is None else b.double().cpu()
        ref_out = reference.linear_relu(x64, w64, b64).to(dtype)
        ref_grads = [t.to(dtype) for t in reference.linear_relu_backward(go64, x64, w64, ref_out.double(), mask)]
        tol = None
    else:
        tol = TRITON_FP32_TOL if (backend == "triton" and dtype == torch.float32) else TOL[dtype]
        ref_out = reference.linear_relu(x.double(), w.double(), None if b is None else b.double())
        # Gate by the kernel's own output: near-zero outputs may round to either side.
        ref_grads = reference.linear_relu_backward(go.double(), x.double(), w.double(), out.double(), mask)
    chk.close(f"{label} out", out, ref_out, tol)
    names = ("grad_input", "grad_weight", "grad_bias")
    for name, got, exp, wanted in zip(names, grads, ref_grads, mask):
        # With a NaN input, BLAS libraries may or may not skip 0 * NaN in grad_weight.
        if wanted and not (c.nan and name == "grad_weight"):
            chk.close(f"{label} {name}", got, exp, tol)


def conv_extras(chk: Checker, backend: str, dtypes: list, quick: bool, dev: torch.device) -> None:
    """CONV_CASES on every CUDA conv path (direct, direct with 64-bit indices, cuDNN, automatic),
    then a dtype mismatch that must raise."""
    paths = (["direct", "direct-index64", "cudnn"] if quick else
             ["direct", "direct-index64", "cudnn", "auto"]) if backend == "cuda" else ["-"]
    kinds = ("int",) if quick else ("int", "randn")
    os.environ.pop(CONV_BWD_PATH_ENV, None)  # the backward follows CONV_PATH_ENV
    for path in paths:
        if backend == "cuda":
            os.environ[CONV_PATH_ENV] = path.removesuffix("-index64")
            if path.endswith("-index64"):
                os.environ[INDEX64_ENV] = "1"
            else:
                os.environ.pop(INDEX64_ENV, None)
        for c in CONV_CASES:
            for dtype in dtypes:
                for kind in ("randn",) if c.randn_only else kinds:
                    if kind == "randn" and c.nan:
                        continue
                    check_conv(chk, backend, c, dtype, kind, path, dev)
    os.environ.pop(CONV_PATH_ENV, None)
    os.environ.pop(INDEX64_ENV, None)
    if backend != "cuda":
        return
    # Bad input must raise a clear error, not crash the process.
    try:
        x = torch.randn(2, 3, 8, 8, device=dev, dtype=torch.float32)
        w = torch.randn(4, 3, 3, 3, device=dev, dtype=torch.float16)
        backend_registry.get("cuda").kernels("conv2d_relu_maxpool2d").forward(
            x, w, None, [1, 1], [0, 0], [1, 1], [2, 2], [2, 2], False)
        chk.failures.append("[cuda] dtype mismatch did not raise")
        print("FAIL [cuda] dtype mismatch did not raise")
    except RuntimeError as ex:
        print(f"ok: dtype mismatch raises: {str(ex).splitlines()[0]}")


def linear_extras(chk: Checker, backend: str, dtypes: list, quick: bool, dev: torch.device) -> None:
    """LINEAR_CASES with both CUDA forward epilogues."""
    kinds = ("int",) if quick else ("int", "randn")
    for epi in ["default", "cublaslt"] if backend == "cuda" else ["-"]:
        if backend == "cuda":
            os.environ[LINEAR_EPILOGUE_ENV] = epi
        for c in LINEAR_CASES:
            if epi == "cublaslt" and c.nan:
                continue  # the cuBLASLt ReLU epilogue is not promised to keep NaN (opt-in path)
            for dtype in dtypes:
                for kind in kinds:
                    check_linear(chk, backend, c, dtype, kind, epi, dev)
    os.environ.pop(LINEAR_EPILOGUE_ENV, None)


#: op -> its cases beyond the contract's sample problem: (chk, backend, dtypes, quick, device) -> None.
EXTRAS: dict[str, Callable[[Checker, str, list, bool, torch.device], None]] = {
    "conv2d_relu_maxpool2d": conv_extras,
    "linear_relu": linear_extras,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp64", action="store_true", help="also run float64")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton backend")
    ap.add_argument("--backends", nargs="+", choices=("cuda", "triton"), default=["cuda", "triton"],
                    help="backends to exercise (default both; triton alone runs on CPU under TRITON_INTERPRET=1)")
    ap.add_argument("--quick", action="store_true", help="fewer launches, same kernels (for compute-sanitizer)")
    args = ap.parse_args(argv)
    wanted = [b for b in args.backends if not (args.no_triton and b == "triton")]

    if torch.cuda.is_available():
        dev = torch.device("cuda")
    elif wanted == ["triton"] and backend_registry.triton_interpreter_on():
        dev = torch.device("cpu")   # Triton's interpreter on CPU tensors
    else:
        print("exercise_kernels: no CUDA GPU visible; nothing to exercise (Triton alone runs on CPU with "
              "TRITON_INTERPRET=1 and --backends triton)", file=sys.stderr)
        return 2
    if "cuda" in wanted and not backend_registry.cuda_available():
        print(f"exercise_kernels: the extension has no CUDA kernels (extension: "
              f"{lightnet_ops._ops.EXTENSION_ERROR or 'loaded without CUDA'})", file=sys.stderr)
        return 1
    # Exact float32 references: no TF32 in cuDNN / cuBLAS.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {name}; torch {torch.__version__}; backends {lightnet_ops.backends()}")

    dtypes = [torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if args.fp64 else [])
    backends = [b for b in wanted if b == "cuda"]
    if "triton" in wanted:
        if backend_registry.triton_available():
            backends.append("triton")
        else:
            print(f"triton backend skipped: {backend_registry._triton_import_error()}")

    chk = Checker()
    saved = {key: os.environ.get(key) for key in (CONV_PATH_ENV, CONV_BWD_PATH_ENV, INDEX64_ENV, LINEAR_EPILOGUE_ENV)}
    try:
        for backend in backends:
            # the Triton kernels take float32/16/bf16 (float64 raises, by design: tests/test_triton_kernels.py)
            run = [d for d in dtypes if not (backend == "triton" and d == torch.float64)]
            for op, contract in CONTRACTS.items():
                for dtype in run:
                    check_sample(chk, backend, contract, dtype, dev)
                if op in EXTRAS:
                    EXTRAS[op](chk, backend, run, args.quick, dev)
    finally:
        for key, val in saved.items():
            if val is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = val
    _sync(dev)
    print(f"\nexercise_kernels: {chk.passed} checks passed, {len(chk.failures)} failed")
    for f in chk.failures[:50]:
        print(f"  {f}")
    return 1 if chk.failures else 0


if __name__ == "__main__":
    sys.exit(main())
