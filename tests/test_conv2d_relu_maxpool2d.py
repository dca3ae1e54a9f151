"""conv2d_relu_maxpool2d: parity with the stock composition (outputs and every gradient) for every
backend this machine has, gradcheck, opcheck, torch.compile, ties/NaN, layouts, bad inputs, fuzzing."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from conftest import NoGradThrough, backend_cases, env_vars, results_per_thread_count, cpu_best_isa, expected_isa, parse_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parity import DTYPES, assert_matches

import lightnet_ops as lo
from lightnet_ops import _shapes, reference
from lightnet_ops._shapes import ARGMAX_RELU_ZERO, pair


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    N: int
    C: int
    H: int
    W: int
    K: int
    kernel: tuple
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    pool: object = 2
    pool_stride: object = None
    bias: bool = True
    tiny: bool = True  # small enough for Triton's (slow) interpreter

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("lightnet_conv1", 2, 1, 32, 32, 6, (3, 3), tiny=False),
    Case("lightnet_conv2", 2, 6, 15, 15, 16, (3, 3), tiny=False),
    Case("small", 2, 3, 8, 8, 4, (3, 3)),
    Case("nonsquare_stride", 2, 3, 13, 10, 4, (3, 2), stride=(2, 1), padding=(1, 0)),
    Case("dilation_padding", 1, 2, 12, 11, 3, (3, 3), padding=2, dilation=2, pool=(2, 3)),
    Case("pool3_stride2_overlapping", 2, 3, 11, 10, 4, (3, 3), padding=1, pool=3, pool_stride=2),
    Case("kernel1x1_nobias", 2, 4, 7, 9, 5, (1, 1), bias=False),
    Case("pool1", 1, 2, 5, 6, 3, (2, 2), pool=1),
    Case("pool_stride_gt_window", 1, 3, 12, 12, 4, (3, 3), pool=2, pool_stride=3),
    Case("odd_tail_floor_mode", 1, 2, 10, 9, 3, (2, 2), pool=(3, 2)),
    Case("wide_channels", 2, 20, 9, 9, 24, (3, 3), padding=1, tiny=False),
    # C * R * S = 288 > 256: the CPU backend's ATen (oneDNN conv + fused pool pass) path by default.
    Case("vgg_like_channels", 2, 32, 10, 9, 8, (3, 3), padding=1, tiny=False),
]
CASES_BY_NAME = {c.name: c for c in CASES}

def parity_params():
    for backend, device in backend_cases():
        for dtype in DTYPES[(backend, device)]:
            for case in CASES:
                if backend == "triton" and device == "cpu" and not case.tiny:
                    continue  # the interpreter is slow; the tiny cases cover the same code paths
                yield pytest.param(backend, device, dtype, case, id=f"{backend}-{device}-{str(dtype)[6:]}-{case}")


def make_inputs(case: Case, dtype: torch.dtype, device: str, *, requires_grad: bool = True):
    """float64 master copies (for the reference) and their casts to `dtype`."""
    x64 = torch.randn(case.N, case.C, case.H, case.W, dtype=torch.float64)
    w64 = torch.randn(case.K, case.C, *case.kernel, dtype=torch.float64) / (case.C * case.kernel[0] * case.kernel[1]) ** 0.5
    b64 = torch.randn(case.K, dtype=torch.float64) * 0.3 if case.bias else None
    # Round the masters to `dtype` so that every computation starts from identical values.
    x64, w64 = x64.to(dtype).double(), w64.to(dtype).double()
    b64 = b64.to(dtype).double() if b64 is not None else None

    def leaf(t: Optional[torch.Tensor], dt: torch.dtype) -> Optional[torch.Tensor]:
        if t is None:
            return None
        return t.to(device=device, dtype=dt).detach().requires_grad_(requires_grad)

    return (leaf(x64, torch.float64), leaf(w64, torch.float64), leaf(b64, torch.float64)), (
        leaf(x64, dtype), leaf(w64, dtype), leaf(b64, dtype))


def stock(x, w, b, case: Case):
    conv = F.conv2d(x, w, b, case.stride, case.padding, case.dilation)
    return F.max_pool2d(F.relu(conv), case.pool, case.pool_stride)


def fused(x, w, b, case: Case, backend: str):
    return lo.conv2d_relu_maxpool2d(x, w, b, case.stride, case.padding, case.dilation, case.pool, case.pool_stride,
                                    backend=backend)


def outputs_and_grads(fn, tensors, grad_out_seed: int = 1):
    leaves = [t for t in tensors if t is not None]
    out = fn(*tensors)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, g.to(device=out.device, dtype=out.dtype))
    return [out.detach()] + list(grads)


@pytest.mark.parametrize("backend, device, dtype, case", list(parity_params()))
def test_parity_with_stock(backend, device, dtype, case):
    (x64, w64, b64), (x, w, b) = make_inputs(case, dtype, device)
    ref = outputs_and_grads(lambda *t: stock(*t, case), (x64, w64, b64))
    want = outputs_and_grads(lambda *t: stock(*t, case), (x, w, b))
    got = outputs_and_grads(lambda *t: fused(*t, case, backend), (x, w, b))
    for name, g, s, r in zip(["output", "grad_input", "grad_weight", "grad_bias"], got, want, ref):
        assert_matches(g, s, r, f"{backend}/{device}/{dtype} {case} {name}")


CPU_PATH_CASES = ["lightnet_conv2", "nonsquare_stride", "dilation_padding", "pool3_stride2_overlapping",
                  "kernel1x1_nobias", "pool_stride_gt_window", "odd_tail_floor_mode", "vgg_like_channels"]


# The CPU backend's paths (csrc/cpu/conv2d_relu_maxpool2d.cpp): direct kernels (forward by the
# direct kernel or its Winograd F(2x2, 3x3) variant, grad_weight by the direct kernel or the span
# kernel); or the ATen path -- forward by ATen's convolution or by Winograd F(2x2, 3x3), backward
# by the scatter kernels or ATen's dense convolution_backward. Winograd takes only 3x3 filters
# with stride 1 and a 2x2 pool with stride 2; other shapes keep the path's plain forward.
CPU_PATHS = {
    "direct": {"LIGHTNET_OPS_CPU_CONV_PATH": "direct", "LIGHTNET_OPS_CPU_DIRECT_FORWARD": "direct",
               "LIGHTNET_OPS_CPU_DIRECT_INPUT_GRAD": "direct", "LIGHTNET_OPS_CPU_DIRECT_WEIGHT_GRAD": "direct"},
    "direct-winograd-span": {"LIGHTNET_OPS_CPU_CONV_PATH": "direct", "LIGHTNET_OPS_CPU_DIRECT_FORWARD": "winograd",
                             "LIGHTNET_OPS_CPU_DIRECT_INPUT_GRAD": "winograd",
                             "LIGHTNET_OPS_CPU_DIRECT_WEIGHT_GRAD": "span"},
    "aten-scatter": {"LIGHTNET_OPS_CPU_CONV_PATH": "aten", "LIGHTNET_OPS_CPU_ATEN_FORWARD": "conv",
                     "LIGHTNET_OPS_CPU_ATEN_BACKWARD": "scatter"},
    "aten-dense": {"LIGHTNET_OPS_CPU_CONV_PATH": "aten", "LIGHTNET_OPS_CPU_ATEN_FORWARD": "conv",
                   "LIGHTNET_OPS_CPU_ATEN_BACKWARD": "dense"},
    "aten-winograd": {"LIGHTNET_OPS_CPU_CONV_PATH": "aten", "LIGHTNET_OPS_CPU_ATEN_FORWARD": "winograd",
                      "LIGHTNET_OPS_CPU_ATEN_BACKWARD": "scatter"},
}


def check_cpu_parity_float64_and_float32(case: Case, label: str,
                                         then: Optional[Callable[[torch.dtype], None]] = None) -> None:
    """The cpu backend (as the environment forces it) against stock: output and every gradient.
    `then(dtype)` runs after each dtype's forward and backward (to inspect what ran)."""
    for dtype in (torch.float64, torch.float32):
        (x64, w64, b64), (x, w, b) = make_inputs(case, dtype, "cpu")
        ref = outputs_and_grads(lambda *t: stock(*t, case), (x64, w64, b64))
        want = outputs_and_grads(lambda *t: stock(*t, case), (x, w, b))
        got = outputs_and_grads(lambda *t: fused(*t, case, "cpu"), (x, w, b))
        for what, g, st_, r in zip(["output", "grad_input", "grad_weight", "grad_bias"], got, want, ref):
            assert_matches(g, st_, r, f"{label}/{dtype} {case} {what}")
        if then is not None:
            then(dtype)


# ---------------------------------------------------------------- what the cpu backend ran
# The extension's debug ops report the plan of a call (_cpu_conv_plan) and what the last call on
# this thread ran (_cpu_conv_last_run), as "key=value" words: path, isa, kb (register block of
# output channels), chunk, input_grad / weight_grad (direct backward), planned, fallback_samples.

def cpu_conv_last_run() -> tuple[dict, dict]:
    """(forward, backward) as the last calls on this thread ran them."""
    forward, backward = torch.ops.lightnet_ops._cpu_conv_last_run()
    return parse_run(forward), parse_run(backward)


def cpu_conv_plan(x, w, params, mask=(True, True, True)) -> tuple[dict, dict]:
    """(forward, backward) plans for these operands, under the current overrides."""
    forward, backward = torch.ops.lightnet_ops._cpu_conv_plan(x, w, *params, list(mask))
    return parse_run(forward), parse_run(backward)


def case_params(case: Case) -> list:
    """stride, padding, dilation, pool_kernel_size, pool_stride as the op takes them."""
    pool_stride = case.pool_stride if case.pool_stride is not None else case.pool
    return [pair(v, "p") for v in (case.stride, case.padding, case.dilation, case.pool, pool_stride)]


def winograd_geometry(case: Case) -> bool:
    """Whether the Winograd F(2x2, 3x3) paths take the shape (otherwise a forced Winograd path
    keeps its plain kernel)."""
    stride, _, dilation, pool, pool_stride = case_params(case)
    return tuple(case.kernel) == (3, 3) and stride == dilation == [1, 1] and pool == pool_stride == [2, 2]


def channel_blocks(isa: str, K: int) -> tuple[str, str]:
    """The direct forward's and backward's output channels per register block (one rule for both:
    4, or on AVX-512 6 where that pads fewer channels than 8)."""
    if isa != "avx512":
        return "4", "4"
    kb = "6" if -(-K // 6) * 6 < -(-K // 8) * 8 else "8"
    return kb, kb


def assert_forced_path_ran(path: str, case: Case, isa: str) -> None:
    """The last forward and backward ran the kernels CPU_PATHS[path] forces, on `isa`, without a
    silent fallback (finite operands: no data-dependent fallback applies)."""
    forward, backward = cpu_conv_last_run()
    wino = winograd_geometry(case)
    fwd_kb, bwd_kb = channel_blocks(isa, case.K)
    want_fwd = {"direct": {"path": "direct", "kb": fwd_kb},
                "direct-winograd-span": {"path": "direct-winograd" if wino else "direct", "kb": fwd_kb},
                "aten-scatter": {"path": "aten-conv"},
                "aten-dense": {"path": "aten-conv"},
                "aten-winograd": {"path": "aten-winograd" if wino else "aten-conv"}}[path]
    want_bwd = {"direct": {"path": "direct", "kb": bwd_kb, "input_grad": "direct", "weight_grad": "direct"},
                "direct-winograd-span": {"path": "direct", "kb": bwd_kb,
                                         "input_grad": "winograd" if wino else "direct", "weight_grad": "span"},
                "aten-scatter": {"path": "scatter"},
                "aten-dense": {"path": "dense"},
                "aten-winograd": {"path": "scatter"}}[path]
    want_fwd.update(isa=isa, fallback_samples="0", planned=want_fwd["path"])
    want_bwd["isa"] = isa
    assert {k: forward.get(k) for k in want_fwd} == want_fwd, f"forward ran {forward}"
    assert {k: backward.get(k) for k in want_bwd} == want_bwd, f"backward ran {backward}"
    if backward["path"] == "direct":
        assert backward["fallback_samples"] == "0", f"backward ran {backward}"


def cpu_path_env(path: str):
    """force_cpu_path for hypothesis tests (see conftest.env_vars)."""
    return env_vars(**CPU_PATHS[path])


def force_cpu_path(monkeypatch, path: str) -> None:
    for name, value in CPU_PATHS[path].items():
        monkeypatch.setenv(name, value)


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@pytest.mark.parametrize("path", list(CPU_PATHS))
@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
@pytest.mark.parametrize("name", CPU_PATH_CASES)
def test_cpu_paths_and_instruction_sets(monkeypatch, path, isa, name):
    # The CPU backend plans a path per call (csrc/cpu/conv_plan.cpp) and an instruction set per
    # CPU; force each combination so that every compiled variant is checked here, not only the one
    # the rules pick.
    # Each call must report the forced path and instruction set: a shape the path cannot take or a
    # CPU without the instruction set must not pass silently on another kernel.
    force_cpu_path(monkeypatch, path)
    monkeypatch.setenv("LIGHTNET_OPS_CPU_ISA", isa)
    case = CASES_BY_NAME[name]
    check_cpu_parity_float64_and_float32(
        case, f"{path}/{isa}", then=lambda dtype: assert_forced_path_ran(path, case, expected_isa(isa)))
    if expected_isa(isa) != isa:
        pytest.skip(f"this CPU lacks {isa}: checked its fallback to {expected_isa(isa)} only")


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
@pytest.mark.parametrize("width", [5, 18, 34, 41])
@pytest.mark.parametrize("pool", [2, 3])
def test_cpu_aten_pool_pass_row_widths(monkeypatch, isa, width, pool):
    # The ATen path's pool pass runs rows narrower than a vector element by element and wider ones
    # by whole vectors (the last overlapping its neighbour); widths from 1 to 19 pooled columns
    # cover both sides of 4, 8 and 16 lanes. Integer-valued inputs make tied maxima common, and a
    # NaN must be selected where stock selects it.
    monkeypatch.setenv("LIGHTNET_OPS_CPU_CONV_PATH", "aten")
    monkeypatch.setenv("LIGHTNET_OPS_CPU_ATEN_FORWARD", "conv")
    monkeypatch.setenv("LIGHTNET_OPS_CPU_ISA", isa)
    case = Case(f"row{width}", 2, 3, 7, width, 4, (1, 1), pool=pool, pool_stride=2)
    for dtype in (torch.float64, torch.float32):
        x = torch.randint(-3, 4, (case.N, case.C, case.H, case.W)).to(dtype)
        x[1, :, 2, width // 2] = float("nan")
        w = torch.randint(-1, 2, (case.K, case.C, 1, 1)).to(dtype)
        b = torch.tensor([0.0, 0.5, -1.0, 2.0], dtype=dtype)
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        got = outputs_and_grads(lambda *t: fused(*t, case, "cpu"), leaves)
        forward, _ = cpu_conv_last_run()
        assert (forward["path"], forward["isa"]) == ("aten-conv", expected_isa(isa)), forward
        want = outputs_and_grads(lambda *t: stock(*t, case), [t.clone().requires_grad_() for t in (x, w, b)])
        assert_same_nans_and_close(got, want)


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@pytest.mark.parametrize("per_chunk", [1, 2, 3])
@pytest.mark.parametrize("name", ["vgg_like_channels", "pool3_stride2_overlapping", "odd_tail_floor_mode"])
def test_cpu_aten_path_batch_chunks(monkeypatch, per_chunk, name):
    # The ATen-path forward convolves and pools the batch in chunks (several only for large conv
    # outputs); force small chunks, including an uneven last one (5 = 3 + 2), so that the chunk
    # offsets of the output and argmax are checked against stock.
    # (ATen's convolution forced too: by the rules vgg_like_channels takes the Winograd forward in
    # float64, which has no chunks.)
    monkeypatch.setenv("LIGHTNET_OPS_CPU_CONV_PATH", "aten")
    monkeypatch.setenv("LIGHTNET_OPS_CPU_ATEN_FORWARD", "conv")
    monkeypatch.setenv("LIGHTNET_OPS_CPU_ATEN_CHUNK", str(per_chunk))

    def ran_chunks(dtype):
        forward, _ = cpu_conv_last_run()
        assert (forward["path"], forward["chunk"]) == ("aten-conv", str(per_chunk)), forward

    check_cpu_parity_float64_and_float32(dataclasses.replace(CASES_BY_NAME[name], N=5), f"chunk {per_chunk}",
                                         then=ran_chunks)


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(N=st.integers(1, 3), C=st.integers(1, 40), K=st.integers(1, 40), H=st.integers(4, 13),
       W=st.integers(4, 13), padding=st.integers(0, 2), bias=st.booleans())
def test_cpu_winograd_forward_shapes(N, C, K, H, W, padding, bias):
    # Both Winograd F(2x2, 3x3) forwards (ATen path, direct path) for every geometry they accept
    # (3x3, stride 1, 2x2 pool): channel counts that are not whole vectors, odd conv outputs (the
    # last row / column no window reads), padding, one sample (fewer than threads) and several.
    case = Case("winograd", N, C, H, W, K, (3, 3), padding=padding, bias=bias)
    isa = expected_isa("avx512")
    for path in ("aten-winograd", "direct-winograd-span"):
        with cpu_path_env(path):
            check_cpu_parity_float64_and_float32(case, path, then=lambda dtype: assert_forced_path_ran(path, case, isa))


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@pytest.mark.parametrize("N", [1, 3])
def test_cpu_winograd_forward_row_blocks(monkeypatch, N):
    # Wide images: the Winograd forward works in blocks of about 256 tiles (here 2 pooled rows of
    # 102), so 5 pooled rows are blocks of 2, 2 and a partial 1.
    force_cpu_path(monkeypatch, "aten-winograd")
    case = Case("winograd_wide", N, 17, 11, 205, 20, (3, 3), padding=1)
    check_cpu_parity_float64_and_float32(
        case, "winograd", then=lambda dtype: assert_forced_path_ran("aten-winograd", case, expected_isa("avx512")))


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@pytest.mark.parametrize("path", ["aten-winograd", "direct-winograd-span"])
def test_cpu_winograd_overflow_falls_back_to_stock_result(monkeypatch, path):
    # Finite inputs near float32's limit: a direct convolution stays finite, the Winograd
    # transforms (sums of up to 16 inputs) overflow. The forward must notice and give stock's result.
    force_cpu_path(monkeypatch, path)
    g = torch.Generator().manual_seed(5)
    x = (torch.randint(0, 2, (2, 16, 10, 10), generator=g) * 2 - 1).float() * 1e38
    w = torch.randn(16, 16, 3, 3, generator=g) * 0.01
    b = torch.zeros(16)
    want = F.max_pool2d(F.relu(F.conv2d(x, w, b)), 2)
    assert torch.isfinite(want).all(), "test setup: stock's result should be finite"
    got = lo.conv2d_relu_maxpool2d(x, w, b, backend="cpu")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    forward, _ = cpu_conv_last_run()
    if path == "aten-winograd":  # the whole call recomputed by ATen's convolution
        assert (forward["planned"], forward["path"]) == ("aten-winograd", "aten-conv"), forward
    else:  # each sample recomputed by the direct kernel
        assert (forward["path"], forward["fallback_samples"]) == ("direct-winograd", "2"), forward


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
def test_cpu_winograd_forward_is_deterministic(monkeypatch):
    # Each block of tiles is computed by one thread with a single-threaded GEMM: the same bits for
    # any thread count, and for a sample alone or inside a batch.
    force_cpu_path(monkeypatch, "aten-winograd")
    case = Case("winograd_wide", 3, 17, 11, 205, 20, (3, 3), padding=1)
    _, (x, w, b) = make_inputs(case, torch.float32, "cpu", requires_grad=False)
    params = ([1, 1], [1, 1], [1, 1], [2, 2], [2, 2])
    results = results_per_thread_count(lambda: torch.ops.lightnet_ops.conv2d_relu_maxpool2d(x, w, b, *params, True))
    for out, argmax in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=0, atol=0)
        torch.testing.assert_close(argmax, results[0][1], rtol=0, atol=0)
    alone, alone_argmax = torch.ops.lightnet_ops.conv2d_relu_maxpool2d(x[1:2], w, b, *params, True)
    torch.testing.assert_close(alone, results[0][0][1:2], rtol=0, atol=0)
    torch.testing.assert_close(alone_argmax, results[0][1][1:2], rtol=0, atol=0)


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@pytest.mark.parametrize("path", list(CPU_PATHS))
def test_cpu_backward_is_deterministic_across_thread_counts(monkeypatch, path):
    # Weight and bias gradients are summed over a fixed split of the batch (direct path), per
    # output channel by one thread in a fixed order (scatter backward), or per plane then in batch
    # order (every path's bias): the same bits for any number of threads.
    force_cpu_path(monkeypatch, path)
    case = dataclasses.replace(CASES_BY_NAME["lightnet_conv2"], N=37)
    _, (x, w, b) = make_inputs(case, torch.float32, "cpu", requires_grad=False)
    params = ([1, 1], [0, 0], [1, 1], [2, 2], [2, 2])
    out, argmax = torch.ops.lightnet_ops.conv2d_relu_maxpool2d(x, w, b, *params, True)
    grad = torch.randn_like(out)
    results = results_per_thread_count(lambda: torch.ops.lightnet_ops.conv2d_relu_maxpool2d_backward(
        grad, x, w, argmax, *params, [True, True, True]))
    assert_forced_path_ran(path, case, expected_isa("avx512"))
    for got in results[1:]:
        # grad_weight through ATen's convolution_backward may block differently per thread count.
        exact = (0, 2) if path == "aten-dense" else (0, 1, 2)
        for i in exact:
            torch.testing.assert_close(got[i], results[0][i], rtol=0, atol=0)


def _gradcheck_backends():
    out = []
    for backend, device in backend_cases():
        if torch.float64 in DTYPES[(backend, device)]:
            out.append((backend, device))
    return out


@pytest.mark.parametrize("backend, device", _gradcheck_backends())
@pytest.mark.parametrize("case", [c for c in CASES if c.tiny], ids=str)
def test_gradcheck(backend, device, case):
    _, (x, w, b) = make_inputs(case, torch.float64, device)
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def fn(*t):
        return fused(t[0], t[1], t[2] if case.bias else None, case, backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def _opcheck_devices():
    devs = []
    if "cpu" in lo.backends():
        devs.append("cpu")
    if "cuda" in lo.backends():
        devs.append("cuda")
    return devs


@pytest.mark.parametrize("device", _opcheck_devices() or [pytest.param("cpu", marks=pytest.mark.xfail(reason="extension not built", strict=True))])
@pytest.mark.parametrize("case", [CASES[2], CASES[5], CASES[6]], ids=str)
def test_opcheck(device, case):
    dtype = torch.float32
    _, (x, w, b) = make_inputs(case, dtype, device, requires_grad=False)
    from lightnet_ops._shapes import pair

    params = [pair(case.stride, "s"), pair(case.padding, "p"), pair(case.dilation, "d"), pair(case.pool, "pk"),
              pair(case.pool_stride if case.pool_stride is not None else case.pool, "ps")]
    fwd = torch.ops.lightnet_ops.conv2d_relu_maxpool2d.default
    torch.library.opcheck(fwd, (x, w, b, *params, True))
    torch.library.opcheck(fwd, (x, w, b, *params, False))
    out, argmax = fwd(x, w, b, *params, True)
    g = torch.randn_like(out)
    bwd = torch.ops.lightnet_ops.conv2d_relu_maxpool2d_backward.default
    torch.library.opcheck(bwd, (g, x, w, argmax, *params, [True, True, case.bias]))
    torch.library.opcheck(bwd, (g, x, w, argmax, *params, [False, True, False]))


@pytest.mark.parametrize("backend, device", [bd for bd in backend_cases() if bd[0] != "triton"])
def test_compile_fullgraph(backend, device):
    case = CASES[5]
    _, (x, w, b) = make_inputs(case, torch.float32, device)

    def f(x, w, b):
        return fused(x, w, b, case, backend).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x, w, b)
    got_grads = torch.autograd.grad(got, (x, w, b))
    want = f(x, w, b)
    want_grads = torch.autograd.grad(want, (x, w, b))
    torch.testing.assert_close(got, want)
    for a, e in zip(got_grads, want_grads):
        torch.testing.assert_close(a, e)


def test_compile_inductor_inference_and_training():
    """Default Inductor backend, no graph break, forward and backward."""
    case = CASES[2]
    _, (x, w, b) = make_inputs(case, torch.float32, "cpu")
    model = lo.Conv2dReLUMaxPool2d(case.C, case.K, case.kernel)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    ref = model(x)
    torch.testing.assert_close(out, ref)
    assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- semantics: ties, NaN, ReLU gate

@pytest.mark.parametrize("backend, device", backend_cases())
def test_ties_first_maximum_wins(backend, device):
    # A 1x1 identity conv over an input with repeated values: every 2x2 window has equal maxima.
    x = torch.tensor([[[[1.0, 1.0, 2.0, 2.0], [1.0, 0.5, 2.0, 2.0], [3.0, 3.0, -1.0, -1.0], [3.0, 3.0, -1.0, -1.0]]]],
                     device=device, requires_grad=True)
    w = torch.ones(1, 1, 1, 1, device=device, requires_grad=True)
    got = lo.conv2d_relu_maxpool2d(x, w, None, pool_kernel_size=2, backend=backend)
    (gx_got,) = torch.autograd.grad(got.sum(), (x,))
    x2 = x.detach().clone().requires_grad_(True)
    want = F.max_pool2d(F.relu(F.conv2d(x2, w)), 2)
    (gx_want,) = torch.autograd.grad(want.sum(), (x2,))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx_got, gx_want)
    # The first of the tied maxima (row-major) gets the gradient; all-negative windows get none.
    expected = torch.zeros(4, 4, device=device)
    expected[0, 0] = expected[0, 2] = expected[2, 0] = 1.0
    torch.testing.assert_close(gx_got[0, 0], expected)


@pytest.mark.parametrize("backend, device", backend_cases())
def test_nan_propagates_like_stock(backend, device):
    case = CASES[2]
    (_, _, _), (x, w, b) = make_inputs(case, torch.float32, device)
    with torch.no_grad():
        x[0, 1, 2, 3] = float("nan")
        x[1, 0, 5, 5] = float("nan")
    got = outputs_and_grads(lambda *t: fused(*t, case, backend), (x, w, b))
    want = outputs_and_grads(lambda *t: stock(*t, case), (x, w, b))
    assert torch.isnan(got[0]).any(), "test setup: NaN should reach the output"
    assert_same_nans_and_close(got, want)


def assert_same_nans_and_close(got: list, want: list) -> None:
    """Output and gradients: NaN in the same places as stock, the rest close."""
    for name, g, s in zip(["output", "grad_input", "grad_weight", "grad_bias"], got, want):
        assert torch.equal(torch.isnan(g), torch.isnan(s)), f"{name}: NaN positions differ from stock"
        torch.testing.assert_close(g, s, equal_nan=True, rtol=1e-4, atol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@pytest.mark.parametrize("path", list(CPU_PATHS))
@pytest.mark.parametrize("where", ["input", "weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_cpu_paths_non_finite_like_stock(monkeypatch, path, where, value):
    # Stock's dense backward multiplies every input (weight) element by a gradient, zeros
    # included, so one NaN or infinity spreads through grad_weight (grad_input). The sparse paths
    # (direct, scatter) would skip those products; they hand non-finite operands to the dense path.
    force_cpu_path(monkeypatch, path)
    case = CASES_BY_NAME["vgg_like_channels"]
    (_, _, _), (x, w, b) = make_inputs(case, torch.float32, "cpu")
    with torch.no_grad():
        (x if where == "input" else w).view(-1)[7] = value
    got = outputs_and_grads(lambda *t: fused(*t, case, "cpu"), (x, w, b))
    forward, backward = cpu_conv_last_run()
    want = outputs_and_grads(lambda *t: stock(*t, case), (x, w, b))
    assert_same_nans_and_close(got, want)
    # Both gradients were asked for, so a non-finite operand sends the backward to the dense path;
    # a non-finite weight keeps the forward off the direct kernel, and off Winograd.
    assert backward["path"] == "dense", backward
    if where == "weight":
        assert forward["path"] == "aten-conv", forward
    elif path == "aten-winograd":
        assert (forward["planned"], forward["path"]) == ("aten-winograd", "aten-conv"), forward
    elif path == "direct-winograd-span":
        assert forward["path"] == "direct-winograd" and int(forward["fallback_samples"]) >= 1, forward


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@pytest.mark.parametrize("path", list(CPU_PATHS))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_cpu_paths_non_finite_grad_output_like_stock(path, value):
    # A non-finite incoming gradient: where ReLU zeroed the element it is dropped, elsewhere it
    # spreads through the patch its conv position read, as in stock's dense backward. (The
    # Winograd grad_input would smear it over the whole 4x4 tile: it hands the sample to the direct
    # kernel.) float64: in float32 stock's oneDNN weight gradient places NaN and infinity
    # differently from a float64 reference, ours does not.
    case = CASES_BY_NAME["lightnet_conv2"]
    (x, w, b), (_, _, _) = make_inputs(case, torch.float64, "cpu")
    results = []
    for run in (lambda *t: fused(*t, case, "cpu"), lambda *t: stock(*t, case)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        with cpu_path_env(path):
            out = run(*leaves)
            g = torch.ones_like(out)
            g.view(-1)[[3, 50, 77]] = value  # a few elements, live or ReLU-zeroed
            results.append([out.detach(), *torch.autograd.grad(out, leaves, g)])
        if len(results) == 1:
            _, backward = cpu_conv_last_run()
            live = bool((out.detach().view(-1)[[3, 50, 77]] > 0).any())  # all three in sample 0
    assert_same_nans_and_close(results[0], results[1])
    # The scatter backward hands a non-finite grad_output to the dense path; the direct one takes it,
    # its Winograd grad_input recomputing the sample directly where a non-finite gradient is live.
    if path.startswith("direct"):
        wino = path == "direct-winograd-span"
        assert (backward["path"], backward["input_grad"]) == ("direct", "winograd" if wino else "direct"), backward
        assert backward["fallback_samples"] == ("1" if wino and live else "0"), backward
    else:
        assert backward["path"] == "dense", backward


@pytest.mark.parametrize("backend, device", backend_cases())
def test_argmax_encoding_matches_reference(backend, device):
    """The compact argmax (one byte: window offset, or 255 where ReLU zeroed the output)."""
    case = CASES[5]
    _, (x, w, b) = make_inputs(case, torch.float32, device, requires_grad=False)
    b[0] = -100.0  # channel 0 is all negative: ReLU zeroes it and the argmax holds the sentinel
    impl = lo.backend_registry.resolve(backend, x)
    args = (x, w, b, [1, 1], [1, 1], [1, 1], [3, 3], [2, 2])
    out, argmax = impl.kernels("conv2d_relu_maxpool2d").forward(*args, True)
    ref_out, ref_argmax = reference.conv2d_relu_maxpool2d(*args, True)
    assert argmax.dtype == torch.uint8 and argmax.shape == out.shape
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(argmax, ref_argmax)
    assert (argmax == ARGMAX_RELU_ZERO).any() and (argmax < 9).any()
    assert bool(((argmax == ARGMAX_RELU_ZERO) == (out <= 0)).all())
    out2, no_argmax = impl.kernels("conv2d_relu_maxpool2d").forward(*args, False)
    assert no_argmax.numel() == 0
    torch.testing.assert_close(out2, out)


@pytest.mark.parametrize("backend, device", backend_cases())
def test_saves_only_compact_argmax_for_backward(backend, device):
    """Backward keeps input, weight and a uint8 argmax: no dense conv output, no ReLU mask."""
    case = CASES[0] if backend != "triton" else CASES[2]
    _, (x, w, b) = make_inputs(case, torch.float32, device)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fused(x, w, b, case, backend)
    shapes = sorted((tuple(t.shape), t.dtype) for t in saved)
    assert shapes == sorted([(tuple(x.shape), x.dtype), (tuple(w.shape), w.dtype), (tuple(out.shape), torch.uint8)])


# ---------------------------------------------------------------- layouts, views, unbatched, empty

@pytest.mark.parametrize("backend, device", backend_cases())
@pytest.mark.parametrize("layout", ["channels_last", "strided_view", "noncontiguous_weight"])
def test_layouts_and_views(backend, device, layout):
    case = CASES[2]
    _, (x, w, b) = make_inputs(case, torch.float32, device, requires_grad=False)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided_view":
        x = torch.randn(case.N, case.C, case.H * 2, case.W + 3, device=device)[:, :, ::2, 1:-2]
    else:
        w = torch.randn(case.K, case.kernel[0], case.kernel[1], case.C, device=device).permute(0, 3, 1, 2)
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    got = outputs_and_grads(lambda *t: fused(*t, case, backend), (x, w, b))
    want = outputs_and_grads(lambda *t: stock(*t, case), (x, w, b))
    for g, s in zip(got, want):
        torch.testing.assert_close(g, s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend, device", backend_cases())
def test_unbatched_input(backend, device):
    case = CASES[2]
    _, (x, w, b) = make_inputs(case, torch.float32, device)
    x1 = x[0].detach().requires_grad_(True)
    got = fused(x1, w, b, case, backend)
    assert got.shape == (case.K, 3, 3)
    torch.testing.assert_close(got, stock(x1, w, b, case), rtol=1e-4, atol=1e-4)
    (gx,) = torch.autograd.grad(got.sum(), (x1,))
    x2 = x1.detach().requires_grad_(True)
    (gx_want,) = torch.autograd.grad(stock(x2, w, b, case).sum(), (x2,))
    torch.testing.assert_close(gx, gx_want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend, device", backend_cases())
def test_batch_size_zero(backend, device):
    case = dataclasses.replace(CASES[2], N=0)
    _, (x, w, b) = make_inputs(case, torch.float32, device)
    out = fused(x, w, b, case, backend)
    assert out.shape == (0, case.K, 3, 3)
    gx, gw, gb = torch.autograd.grad(out.sum(), (x, w, b))
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == b.shape
    assert gw.abs().sum() == 0 and gb.abs().sum() == 0


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@pytest.mark.parametrize("path", list(CPU_PATHS))
def test_cpu_paths_batch_size_zero(monkeypatch, path):
    force_cpu_path(monkeypatch, path)
    case = dataclasses.replace(CASES_BY_NAME["vgg_like_channels"], N=0)
    _, (x, w, b) = make_inputs(case, torch.float32, "cpu")
    for _ in range(3):  # the gradients must be written as zeros, not left as whatever memory held
        torch.randn(1 << 16).exp_()  # recycle some dirty memory first
        gx, gw, gb = torch.autograd.grad(fused(x, w, b, case, "cpu").sum(), (x, w, b))
        assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == b.shape
        assert gw.abs().sum() == 0 and gb.abs().sum() == 0
        forward, backward = cpu_conv_last_run()
        assert forward["path"] == "none", forward  # nothing to compute
        want_backward = {"direct": "direct", "direct-winograd-span": "direct", "aten-scatter": "scatter",
                         "aten-dense": "dense", "aten-winograd": "scatter"}[path]
        assert backward["path"] == want_backward, backward


@pytest.mark.parametrize("backend, device", backend_cases())
def test_inference_and_partial_grads(backend, device):
    case = CASES[5]
    _, (x, w, b) = make_inputs(case, torch.float32, device, requires_grad=False)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, w, b, case, backend), stock(x, w, b, case), rtol=1e-4, atol=1e-4)
    # Only the weight needs a gradient (frozen bias, input without grad).
    w.requires_grad_(True)
    (gw,) = torch.autograd.grad(fused(x, w, b, case, backend).sum(), (w,))
    (gw_want,) = torch.autograd.grad(stock(x, w, b, case).sum(), (w,))
    torch.testing.assert_close(gw, gw_want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend, device", backend_cases())
def test_output_without_gradient_leaves_grads_none_like_stock(backend, device):
    # The fused node then gets no gradient for its output (the C++ node does not materialise one:
    # that would zero-fill an argmax-sized tensor on every call) and must pass none on, as stock does.
    case = CASES[5]
    results = {}
    for name, f in (("fused", lambda x, w, b: fused(x, w, b, case, backend)), ("stock", lambda x, w, b: stock(x, w, b, case))):
        _, (x, w, b) = make_inputs(case, torch.float32, device, requires_grad=True)
        other = torch.ones(3, device=device, requires_grad=True)
        (NoGradThrough.apply(f(x, w, b)).sum() + (other * 2).sum()).backward()
        results[name] = (x.grad, w.grad, b.grad)
        torch.testing.assert_close(other.grad, torch.full_like(other, 2.0))
    assert results["stock"] == (None, None, None)
    assert results["fused"] == (None, None, None)

# ---------------------------------------------------------------- bad input

BAD_INPUTS = [
    ("rank2", dict(x=(3, 8)), r"expected 3-D \(C, H, W\) or 4-D"),
    ("rank5", dict(x=(1, 2, 3, 8, 8)), r"expected 3-D \(C, H, W\) or 4-D"),
    ("weight_rank", dict(w=(4, 3, 3)), "expected 4-D weight"),
    ("channels", dict(x=(2, 5, 8, 8)), "channels but weight expects"),
    ("bias_size", dict(b=(5,)), "bias must have shape"),
    ("stride0", dict(stride=0), "stride must be positive"),
    ("negative_padding", dict(padding=-1), "padding must be non-negative"),
    ("dilation0", dict(dilation=0), "dilation must be positive"),
    ("pool0", dict(pool=0), "pool_kernel_size must be positive"),
    ("pool_stride0", dict(pool_stride=0), "pool_stride must be positive"),
    ("pool_too_large", dict(pool=7), "larger than the conv output"),
    ("input_too_small", dict(x=(2, 3, 2, 2)), "too small for kernel"),
    ("pool_window_over_255", dict(x=(1, 3, 40, 40), pool=16), "one-byte argmax"),
    ("stride_triple", dict(stride=(1, 1, 1)), "stride must be an int or a pair"),
]


@pytest.mark.parametrize("backend, device", backend_cases())
@pytest.mark.parametrize("name, change, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(backend, device, name, change, message):
    x = torch.randn(*change.get("x", (2, 3, 8, 8)), device=device)
    w = torch.randn(*change.get("w", (4, 3, 3, 3)), device=device)
    b = torch.randn(*change.get("b", (4,)), device=device)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        lo.conv2d_relu_maxpool2d(x, w, b, change.get("stride", 1), change.get("padding", 0),
                                 change.get("dilation", 1), change.get("pool", 2), change.get("pool_stride"),
                                 backend=backend)


def test_dtype_and_device_mismatch():
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match="dtype"):
        lo.conv2d_relu_maxpool2d(x, w.double())
    with pytest.raises(ValueError, match="bias dtype"):
        lo.conv2d_relu_maxpool2d(x, w, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="is on meta"):
        lo.conv2d_relu_maxpool2d(x, w.to("meta"))
    with pytest.raises(TypeError, match="floating-point"):
        lo.conv2d_relu_maxpool2d(x.long(), w.long())


def test_compiled_op_rejects_bad_input_directly():
    """The C++ op checks its arguments too (for callers of torch.ops.lightnet_ops.* directly), raising
    ValueError / TypeError like the Python checker."""
    if "cpu" not in lo.backends():
        pytest.fail("the extension is not built")
    op = torch.ops.lightnet_ops.conv2d_relu_maxpool2d
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 4, 3, 3)
    with pytest.raises(ValueError, match="input has 2 channels but weight expects 4"):
        op(x, w, None, [1, 1], [0, 0], [1, 1], [2, 2], [2, 2], False)
    with pytest.raises(ValueError, match=r"stride must be positive, got \[0, 1\]"):
        op(x, w[:, :2], None, [0, 1], [0, 0], [1, 1], [2, 2], [2, 2], False)
    with pytest.raises(TypeError, match="cpu backend supports float32 and float64, got torch.float16"):
        op(x.half(), w[:, :2].half(), None, [1, 1], [0, 0], [1, 1], [2, 2], [2, 2], False)
    out, argmax = op(x, w[:, :2], None, [1, 1], [0, 0], [1, 1], [2, 2], [2, 2], True)
    bwd = torch.ops.lightnet_ops.conv2d_relu_maxpool2d_backward
    params = ([1, 1], [0, 0], [1, 1], [2, 2], [2, 2], [True, True, False])
    with pytest.raises(TypeError, match=r"argmax must be uint8 \(torch.uint8\), got torch.int64"):
        bwd(out, x, w[:, :2], argmax.long(), *params)
    with pytest.raises(ValueError, match=r"argmax has shape \[0\], expected \[1, 3, 2, 2\] \(was the forward"):
        bwd(out, x, w[:, :2], argmax[:0].flatten(), *params)
    with pytest.raises(ValueError, match=r"grad_output has shape \[1, 3, 2\], expected \[1, 3, 2, 2\]"):
        bwd(out[..., 0], x, w[:, :2], argmax, *params)
    with pytest.raises(ValueError, match="input dtype torch.float32 does not match grad_output dtype torch.float64"):
        bwd(out.double(), x, w[:, :2], argmax, *params)
    with pytest.raises(ValueError, match="^conv2d_relu_maxpool2d_backward: input has 2 channels"):
        bwd(out, x, w, argmax, *params)


# Arguments (already normalised, as the functional API passes them) that the Python checker
# (lightnet_ops/ops/conv2d_relu_maxpool2d.py) rejects: the C++ op must raise the same exception type with the same
# message, so that the Python copy of the checks can go for the compiled backends.
OP_BAD_ARGS = [
    ("rank3", dict(x=(3, 8, 8))),
    ("rank5", dict(x=(1, 2, 3, 8, 8))),
    ("weight_rank", dict(w=(4, 3, 3))),
    ("integer_dtype", dict(dtype=torch.int64)),
    ("weight_dtype", dict(w_dtype=torch.float64)),
    ("bias_dtype", dict(b_dtype=torch.float64)),
    ("channels", dict(x=(2, 5, 8, 8))),
    ("bias_size", dict(b=(5,))),
    ("bias_rank", dict(b=(4, 1))),
    ("stride0", dict(stride=[0, 1])),
    ("stride_negative", dict(stride=[1, -2])),
    ("negative_padding", dict(padding=[0, -1])),
    ("dilation0", dict(dilation=[0, 0])),
    ("pool0", dict(pool=[0, 2])),
    ("pool_stride0", dict(pool_stride=[2, 0])),
    ("stride_triple", dict(stride=[1, 1, 1])),
    ("padding_single", dict(padding=[1])),
    ("pool_too_large", dict(pool=[7, 7])),
    ("input_too_small", dict(x=(2, 3, 2, 2))),
    ("input_too_small_dilated", dict(x=(2, 3, 8, 8), dilation=[4, 1])),
    ("pool_window_over_255", dict(x=(1, 3, 40, 40), pool=[16, 16])),
    ("pool_window_huge", dict(pool=[2**40, 2**40])),
    ("kernel_empty", dict(w=(4, 3, 0, 3))),
]


@pytest.mark.parametrize("device", [d for d in ("cpu", "cuda") if d in lo.backends()]
                         or [pytest.param("cpu", marks=pytest.mark.xfail(reason="extension not built", strict=True))])
@pytest.mark.parametrize("name, change", OP_BAD_ARGS, ids=[b[0] for b in OP_BAD_ARGS])
def test_compiled_op_errors_match_python_checker(device, name, change):
    dtype = change.get("dtype", torch.float32)
    x = torch.ones(*change.get("x", (2, 3, 8, 8)), dtype=dtype, device=device)
    w = torch.ones(*change.get("w", (4, 3, 3, 3)), dtype=change.get("w_dtype", dtype), device=device)
    b = torch.ones(*change.get("b", (4,)), dtype=change.get("b_dtype", dtype), device=device)
    params = [change.get(k, [1, 1] if k != "padding" else [0, 0]) for k in ("stride", "padding", "dilation")]
    params += [change.get("pool", [2, 2]), change.get("pool_stride", [2, 2])]
    with pytest.raises((ValueError, TypeError)) as want:
        _shapes.check_conv_pool(x, w, b, *params)
    with pytest.raises((ValueError, TypeError)) as got:
        torch.ops.lightnet_ops.conv2d_relu_maxpool2d(x, w, b, *params, True)
    assert (type(got.value), str(got.value)) == (type(want.value), str(want.value))
    if x.dim() == 4 and w.dim() == 4 and "b" not in change and "b_dtype" not in change:
        # The backward checks the same arguments (its own name first).
        g = torch.ones(1, dtype=dtype, device=device)
        with pytest.raises(type(want.value)) as bwd:
            torch.ops.lightnet_ops.conv2d_relu_maxpool2d_backward(g, x, w, g.to(torch.uint8), *params,
                                                                  [True, True, True])
        assert str(bwd.value) == str(want.value).replace("conv2d_relu_maxpool2d:", "conv2d_relu_maxpool2d_backward:", 1)


def test_unknown_and_unavailable_backends():
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        lo.conv2d_relu_maxpool2d(x, w, backend="gpu")
    with pytest.raises(lo.BackendUnavailableError, match="cannot run on a tensor on cpu"):
        lo.conv2d_relu_maxpool2d(x, w, backend="cuda")
    with pytest.raises(lo.BackendUnavailableError, match="float32 and float64"):
        lo.conv2d_relu_maxpool2d(x.half(), w.half(), backend="cpu")
    # auto falls back to the reference backend for dtypes the C++ CPU kernels do not cover
    out = lo.conv2d_relu_maxpool2d(x.bfloat16(), w.bfloat16())
    torch.testing.assert_close(out, F.max_pool2d(F.relu(F.conv2d(x.bfloat16(), w.bfloat16())), 2))


# ---------------------------------------------------------------- fuzzing

@st.composite
def problems(draw):
    R, S = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pad = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pool = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pool_stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    # Choose the input big enough for the conv output to hold one pool window.
    P_min, Q_min = pool
    H = max(1, (P_min - 1) * stride[0] + dil[0] * (R - 1) + 1 - 2 * pad[0]) + draw(st.integers(0, 6))
    W = max(1, (Q_min - 1) * stride[1] + dil[1] * (S - 1) + 1 - 2 * pad[1]) + draw(st.integers(0, 6))
    return Case("fuzz", draw(st.integers(0, 3)), draw(st.integers(1, 4)), H, W, draw(st.integers(1, 5)), (R, S),
                stride, pad, dil, pool, pool_stride, draw(st.booleans()))


@pytest.mark.parametrize("backend", [b for b, d in backend_cases() if d == "cpu" and b != "reference"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=problems())
def test_fuzz_against_reference(backend, case):
    check_against_reference(backend, case)


def check_against_reference(backend: str, case: Case) -> bool:
    """Whether the geometry was valid (and matched the reference); else the error was checked."""
    dtype = torch.float64 if backend != "triton" else torch.float32
    _, (x, w, b) = make_inputs(case, dtype, "cpu")
    P = (case.H + 2 * case.padding[0] - case.dilation[0] * (case.kernel[0] - 1) - 1) // case.stride[0] + 1
    Q = (case.W + 2 * case.padding[1] - case.dilation[1] * (case.kernel[1] - 1) - 1) // case.stride[1] + 1
    if P < case.pool[0] or Q < case.pool[1]:
        with pytest.raises(ValueError, match="larger than the conv output|too small"):
            fused(x, w, b, case, backend)
        return False
    got = outputs_and_grads(lambda *t: fused(*t, case, backend), (x, w, b))
    want = outputs_and_grads(lambda *t: fused(*t, case, "reference"), (x, w, b))
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for g, s in zip(got, want):
        torch.testing.assert_close(g, s, rtol=tol, atol=tol)
    return True


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@pytest.mark.parametrize("path", list(CPU_PATHS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=problems())
def test_fuzz_cpu_paths_against_reference(path, case):
    # Every CPU path forced on random geometry (padding, dilation, strides, overlapping pools).
    with cpu_path_env(path):
        if check_against_reference("cpu", case) and case.N > 0:
            assert_forced_path_ran(path, case, expected_isa("avx512"))


# ---------------------------------------------------------------- huge strides, pool strides, paddings
# Valid arguments far beyond the image: stock returns a small output. The cpu backend must too,
# without allocating in proportion to the stride (the direct path packs stride * pool stride phase
# planes per channel; the planner sends such shapes elsewhere even when a path is forced).

HUGE_CASES = [
    Case("stride_2pow32", 1, 1, 8, 8, 1, (1, 1), stride=2**32, pool=1),
    Case("pool_stride_10000", 1, 3, 8, 8, 2, (3, 3), pool_stride=10000),
    Case("pool_stride_2pow31", 2, 2, 9, 11, 3, (2, 2), pool=(1, 2), pool_stride=(2**31 - 1, 3)),
    Case("stride_2pow40_rows", 2, 3, 9, 9, 2, (3, 1), stride=(2**40, 1), pool=(1, 2)),
    Case("padding_1000_stride_1000", 1, 2, 8, 8, 3, (3, 3), stride=1000, padding=1000),
    Case("padding_300_one_dim", 1, 1, 5, 5, 2, (3, 3), stride=(2, 300), padding=300, pool_stride=(7, 1)),
]


def check_against_stock_float64(case: Case, label: str) -> None:
    (x, w, b), _ = make_inputs(case, torch.float64, "cpu")
    got = outputs_and_grads(lambda *t: fused(*t, case, "cpu"), (x, w, b))
    want = outputs_and_grads(lambda *t: stock(*t, case), (x, w, b))
    for what, g, s_ in zip(["output", "grad_input", "grad_weight", "grad_bias"], got, want):
        torch.testing.assert_close(g, s_, rtol=1e-9, atol=1e-9, msg=lambda m, what=what: f"{label} {what}: {m}")


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@pytest.mark.parametrize("path", [None, *CPU_PATHS])
@pytest.mark.parametrize("case", HUGE_CASES, ids=str)
def test_cpu_huge_strides_and_paddings_match_stock(monkeypatch, path, case):
    if path is not None:
        force_cpu_path(monkeypatch, path)
    check_against_stock_float64(case, f"{path}")
    forward, _ = cpu_conv_last_run()
    if case.name != "padding_300_one_dim":  # (the others' phase planes alone would take gigabytes)
        assert forward["path"] == "aten-conv", forward


@st.composite
def huge_problems(draw):
    """Strides up to 2**40, pool strides up to 2**31 - 1 (stock's max_pool2d limit), paddings up to
    600 with a stride that keeps the conv output small."""
    dims = []
    for _ in range(2):
        stride = draw(st.sampled_from([1, 2, 3, 1000, 2**32, 2**40]))
        pad = draw(st.sampled_from([0, 1, 600] if stride == 1000 else [0, 1])) if stride > 3 else draw(st.integers(0, 2))
        R, dil = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        pool = draw(st.integers(1, 2)) if stride <= 3 or pad == 600 else 1
        pool_stride = draw(st.sampled_from([1, 2, 3, 1000, 2**20, 2**31 - 1]))
        size = max(1, (pool - 1) * stride + dil * (R - 1) + 1 - 2 * pad) + draw(st.integers(0, 4))
        dims.append((stride, pad, R, dil, pool, pool_stride, size))
    (sh, ph, R, dh, kh, qh, H), (sw, pw, S, dw, kw, qw, W) = dims
    return Case("huge", draw(st.integers(0, 2)), draw(st.integers(1, 3)), H, W, draw(st.integers(1, 3)), (R, S),
                (sh, sw), (ph, pw), (dh, dw), (kh, kw), (qh, qw), draw(st.booleans()))


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=huge_problems(), path=st.sampled_from([None, *CPU_PATHS]))
def test_fuzz_cpu_huge_strides_against_stock(case, path):
    with env_vars(**(CPU_PATHS[path] if path else {})):
        check_against_stock_float64(case, f"{path} {case}")


# ---------------------------------------------------------------- plans of the benchmark's shapes

CPU_OVERRIDES = ("LIGHTNET_OPS_CPU_CONV_PATH", "LIGHTNET_OPS_CPU_DIRECT_FORWARD", "LIGHTNET_OPS_CPU_DIRECT_INPUT_GRAD",
                 "LIGHTNET_OPS_CPU_DIRECT_WEIGHT_GRAD", "LIGHTNET_OPS_CPU_ATEN_FORWARD",
                 "LIGHTNET_OPS_CPU_ATEN_BACKWARD", "LIGHTNET_OPS_CPU_ATEN_CHUNK", "LIGHTNET_OPS_CPU_ISA")


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_plans_for_benchmark_shapes(monkeypatch, dtype):
    # The kernels the speed targets were measured with (lightnet_ops.bench: LightNet conv1 / conv2
    # at batch 64, the VGG block at batch 8), chosen by the rules alone.
    for name in CPU_OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    isa = cpu_best_isa()
    shapes = {
        "conv1_b64": ((64, 1, 32, 32), (6, 1, 3, 3), 0),
        "conv2_b64": ((64, 6, 15, 15), (16, 6, 3, 3), 0),
        "vgg_b8": ((8, 64, 56, 56), (64, 64, 3, 3), 1),
    }
    plans = {}
    for name, (xs, ws, pad) in shapes.items():
        x, w = torch.randn(xs, dtype=dtype), torch.randn(ws, dtype=dtype)
        plans[name] = cpu_conv_plan(x, w, [[1, 1], [pad, pad], [1, 1], [2, 2], [2, 2]])
    want = {
        "conv1_b64": ({"path": "direct", "isa": isa, "kb": channel_blocks(isa, 6)[0]},
                      {"path": "direct", "isa": isa, "kb": channel_blocks(isa, 6)[1], "input_grad": "direct",
                       "weight_grad": "direct"}),
        "conv2_b64": ({"path": "direct-winograd", "isa": isa, "kb": channel_blocks(isa, 16)[0]},
                      {"path": "direct", "isa": isa, "kb": channel_blocks(isa, 16)[1], "input_grad": "winograd",
                       "weight_grad": "span"}),
        "vgg_b8": ({"path": "aten-winograd", "isa": isa, "chunk": plans["vgg_b8"][0].get("chunk")},
                   {"path": "scatter", "isa": isa}),
    }
    assert plans == want


# ---------------------------------------------------------------- module

def test_module_matches_nn_conv2d_init_and_state_dict():
    torch.manual_seed(3)
    stock_conv = torch.nn.Conv2d(3, 8, (3, 2), stride=2, padding=1)
    torch.manual_seed(3)
    fused_mod = lo.Conv2dReLUMaxPool2d(3, 8, (3, 2), stride=2, padding=1, pool_kernel_size=3, pool_stride=2)
    torch.testing.assert_close(fused_mod.weight, stock_conv.weight, rtol=0, atol=0)
    torch.testing.assert_close(fused_mod.bias, stock_conv.bias, rtol=0, atol=0)
    assert [n for n, _ in fused_mod.named_parameters()] == ["weight", "bias"]
    fused_mod.load_state_dict(stock_conv.state_dict())
    x = torch.randn(2, 3, 17, 12)
    torch.testing.assert_close(fused_mod(x), F.max_pool2d(F.relu(stock_conv(x)), 3, 2))
    r = repr(fused_mod)
    assert "Conv2dReLUMaxPool2d(3, 8, kernel_size=(3, 2), stride=(2, 2), padding=(1, 1)" in r
    assert "pool_kernel_size=(3, 3), pool_stride=(2, 2)" in r
    no_bias = lo.Conv2dReLUMaxPool2d(3, 8, 3, bias=False)
    assert no_bias.bias is None and "bias=False" in repr(no_bias)
    assert lo.Conv2dReLUMaxPool2d(2, 4, 3, dtype=torch.float64).weight.dtype == torch.float64


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@pytest.mark.parametrize("case, forward_path, backward_path", [
    # Conv output of 4 columns, 128 x 16 planes: oneDNN's batched forward, the direct backward.
    (Case("q4_many_planes", 128, 3, 7, 7, 16, (5, 5), stride=2, padding=2, tiny=False), "aten-conv", "direct"),
    (Case("q4_few_planes", 8, 3, 7, 7, 16, (5, 5), stride=2, padding=2), "direct", "direct"),
    # 3 x 7 x 7 taps x overlapping 3/2 pool: direct only on a few planes of few channels.
    (Case("k7_two_planes", 2, 3, 14, 14, 8, (7, 7), pool=3, pool_stride=2), "direct", "direct"),
    (Case("k7_many_planes", 16, 3, 14, 14, 8, (7, 7), pool=3, pool_stride=2), "aten-conv", "aten"),
    (Case("k7_many_channels", 2, 16, 14, 14, 2, (7, 7), pool=3, pool_stride=2), "aten-conv", "aten"),
])
def test_cpu_direct_rule(case, forward_path, backward_path):
    # use_direct (csrc/cpu/conv_plan.cpp): the forward and backward plans of shapes on each side of
    # its thresholds, then the forward's parity on the path it plans.
    x = torch.randn(case.N, case.C, case.H, case.W)
    w = torch.randn(case.K, case.C, *case.kernel)
    forward, backward = cpu_conv_plan(x, w, case_params(case))
    backward_kind = "direct" if backward["path"] == "direct" else "aten"  # the ATen backward: scatter or dense
    assert (forward["path"], backward_kind) == (forward_path, backward_path), (forward, backward)
    check_cpu_parity_float64_and_float32(case, f"rule/{case.name}")


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@pytest.mark.parametrize("variant", ["winograd", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_direct_forward_repacks_weights_whenever_a_value_changes(variant, dtype):
    # The direct forward keeps each thread's recently packed weights and reuses them only while
    # every byte of the weight and bias is unchanged: edits that bump no version counter (through
    # .data), a new tensor with the same values, and more layers than the cache holds.
    layers = [lo.Conv2dReLUMaxPool2d(6, 16, 3, backend="cpu").to(dtype) for _ in range(6)]
    x = torch.randn(2, 6, 15, 15, dtype=dtype)
    edits = [
        lambda m: None,
        lambda m: m.weight.data[0, 0, 0, 0].add_(1.0),
        lambda m: m.bias.data[3].sub_(2.0),
        lambda m: m.weight.data.mul_(-1.0),
        lambda m: setattr(m, "weight", torch.nn.Parameter(m.weight.detach().clone())),
        lambda m: m.register_parameter("bias", None),
        lambda m: m.weight.data[15, 5, 2, 2].add_(0.5),
    ]
    with torch.no_grad(), env_vars(LIGHTNET_OPS_CPU_DIRECT_FORWARD=variant):
        for edit in edits:
            for m in layers:
                edit(m)
                want = F.max_pool2d(F.relu(F.conv2d(x, m.weight, m.bias)), 2)
                for _ in range(2):
                    torch.testing.assert_close(m(x), want, **({"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}))
                    forward, _ = cpu_conv_last_run()
                    assert forward["path"] == f"direct-{variant}" if variant == "winograd" else forward["path"] == "direct"
