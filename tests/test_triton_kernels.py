"""Triton-specific tests: the four ``lightnet_ops::triton_*`` ops against the reference backend.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py turns it on
before triton is imported); shapes stay tiny because the interpreter executes every program in Python.
On a CUDA machine the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lightnet_ops as lo
from lightnet_ops import backend_registry, reference
from lightnet_ops.ops import CONTRACTS

HAS_CUDA = torch.cuda.is_available()
if not backend_registry.triton_available():
    pytest.skip(f"triton backend unavailable: {backend_registry._triton_import_error()}", allow_module_level=True)
if not (HAS_CUDA or backend_registry.triton_interpreter_on()):
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

import lightnet_ops._triton_ops as T  # noqa: E402

CONV = T.KERNEL_MODULES["conv2d_relu_maxpool2d"]
LINEAR = T.KERNEL_MODULES["linear_relu"]
DEV = "cuda" if HAS_CUDA else "cpu"
OPS = torch.ops.lightnet_ops
ROOT = Path(__file__).resolve().parent.parent
LOW = [torch.float16, torch.bfloat16]
# max-norm slack over the stock error in low precision (see _assert_close_to_ref64)
EPS = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _no_tf32():
    """The Triton kernels multiply float32 in IEEE float32; keep the reference's cuDNN convolutions off
    TF32 too (PyTorch enables it for cuDNN by default), or float32 parity on a GPU is only ~1e-3."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(autouse=True)
def _fixed_configs(monkeypatch):
    """One config per kernel (no autotuning): on a GPU every new problem size would otherwise benchmark
    and compile the whole config list. test_autotuned_launch_matches_fixed_config covers autotuning."""
    monkeypatch.setattr(T._kernels._common, "AUTOTUNE", False)


def _conv_case(N, C, H, W, K, R, S, stride=1, padding=0, dilation=1, pool=2, pool_stride=None, bias=True,
               dtype=torch.float32, integer=False):
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    g = torch.Generator().manual_seed(N * 1000 + C * 100 + H * 10 + W + K)
    if integer:   # small integers: every sum is exact, so equal windows tie exactly in any order
        x = torch.randint(-2, 3, (N, C, H, W), generator=g).to(dtype)
        w = torch.randint(-1, 2, (K, C, R, S), generator=g).to(dtype)
        b = torch.randint(-2, 3, (K,), generator=g).to(dtype) if bias else None
    else:
        x = torch.randn(N, C, H, W, generator=g).to(dtype)
        w = (torch.randn(K, C, R, S, generator=g) / (C * R * S) ** 0.5).to(dtype)
        b = (torch.randn(K, generator=g) - 1.0).to(dtype) if bias else None   # some windows end ReLU-zeroed
    params = [pair(stride), pair(padding), pair(dilation), pair(pool),
              pair(pool if pool_stride is None else pool_stride)]
    return x.to(DEV), w.to(DEV), (b.to(DEV) if b is not None else None), params


CONV_CASES = {
    "basic": dict(N=2, C=3, H=8, W=8, K=4, R=3, S=3),
    "stride2_pad1": dict(N=2, C=2, H=9, W=9, K=3, R=3, S=3, stride=2, padding=1),
    "dilation_rect": dict(N=1, C=2, H=10, W=9, K=3, R=2, S=3, stride=(1, 2), padding=(2, 1), dilation=(2, 1),
                          pool=(2, 3), pool_stride=(1, 2)),
    "pool3_stride2_nobias": dict(N=2, C=2, H=9, W=9, K=3, R=3, S=3, padding=1, pool=3, pool_stride=2, bias=False),
    "kernel1_pool1": dict(N=1, C=3, H=5, W=6, K=4, R=1, S=1, pool=1),
}


def _assert_conv_forward_matches(x, w, b, params, exact_argmax=True):
    out, am = OPS.triton_conv2d_relu_maxpool2d(x, w, b, *params, True)
    ref_out, ref_am = reference.conv2d_relu_maxpool2d(x, w, b, *params, True)
    assert out.shape == ref_out.shape and out.dtype == x.dtype and am.dtype == torch.uint8
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5, equal_nan=True)
    if exact_argmax:
        assert torch.equal(am, ref_am), f"argmax differs at {(am != ref_am).nonzero()[:5].tolist()}"
    return out, am


def _assert_conv_backward_matches(x, w, am, params, mask=(True, True, True), **tol):
    g = torch.randn(am.shape, dtype=x.dtype, device=x.device)
    got = OPS.triton_conv2d_relu_maxpool2d_backward(g, x, w, am, *params, list(mask))
    want = reference.conv2d_relu_maxpool2d_backward(g, x, w, am, *params, list(mask))
    for name, a, e, m in zip(("grad_input", "grad_weight", "grad_bias"), got, want, mask):
        if not m:
            assert a.shape == (0,), f"{name} should be empty when masked off"
            continue
        torch.testing.assert_close(a, e, msg=lambda s: f"{name}: {s}", equal_nan=True,
                                   **(tol or dict(rtol=1e-5, atol=1e-5)))


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_forward_backward_match_reference_fp32(case):
    x, w, b, params = _conv_case(**CONV_CASES[case])
    _, am = _assert_conv_forward_matches(x, w, b, params)
    assert (am != 255).any() and (am == 255).any(), "the case should exercise both live and ReLU-zeroed windows"
    _assert_conv_backward_matches(x, w, am, params)


def test_conv_inference_path_writes_no_argmax():
    x, w, b, params = _conv_case(**CONV_CASES["basic"])
    out, am = OPS.triton_conv2d_relu_maxpool2d(x, w, b, *params, False)
    assert am.shape == (0,) and am.dtype == torch.uint8
    torch.testing.assert_close(out, reference.conv2d_relu_maxpool2d(x, w, b, *params, False)[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask", [(False, False, True), (True, False, False), (False, True, False),
                                  (False, True, True)])
def test_conv_backward_output_masks(mask):
    x, w, b, params = _conv_case(**CONV_CASES["stride2_pad1"])
    _, am = _assert_conv_forward_matches(x, w, b, params)
    _assert_conv_backward_matches(x, w, am, params, mask)


@pytest.mark.parametrize("split", [1, 3])
def test_conv_weight_grad_split_reduction(split):
    """The split-K partials of grad_weight (and the fused grad_bias) sum to the unsplit result."""
    x, w, b, params = _conv_case(**CONV_CASES["basic"])
    _, am = OPS.triton_conv2d_relu_maxpool2d(x, w, b, *params, True)
    g = torch.randn(am.shape, device=DEV)
    s = lo._shapes.conv_pool_shape(x, w, b, *params)
    _, gw, gb = CONV.conv2d_relu_maxpool2d_backward(g, x, w, am, *params, s.P, s.Q, [False, True, True],
                                                       split=split)
    _, rgw, rgb = reference.conv2d_relu_maxpool2d_backward(g, x, w, am, *params, [False, True, True])
    torch.testing.assert_close(gw, rgw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, rgb, rtol=1e-5, atol=1e-5)


def test_conv_ties_pick_first_maximum():
    """Integer data makes many pooled windows hold exactly equal maxima; the first (row-major) wins,
    as in stock max_pool2d. Overlapping windows route several gradients to one conv position."""
    x, w, b, params = _conv_case(N=2, C=2, H=9, W=9, K=3, R=2, S=2, pool=3, pool_stride=2, integer=True)
    x[0] = 1.0   # constant image: every window of sample 0 is one big tie
    conv = torch.nn.functional.conv2d(x, w, b)
    windows = torch.nn.functional.unfold(conv.flatten(0, 1).unsqueeze(1), 3, stride=2)   # (N*K, 9, PH*PW)
    tied = (windows == windows.amax(1, keepdim=True)).sum(1) > 1
    assert tied[3:].any(), "sample 1 (random integers) should have tied maxima too"
    _, am = _assert_conv_forward_matches(x, w, b, params)
    assert (am[0][am[0] != 255] == 0).all()
    _assert_conv_backward_matches(x, w, am, params)


def test_conv_nan_propagates_like_stock():
    x, w, b, params = _conv_case(N=1, C=2, H=8, W=8, K=3, R=3, S=3, padding=1, pool=3, pool_stride=2, integer=True)
    x[0, 0, 2, 5] = float("nan")
    x[0, 1, 6, 1] = float("nan")
    out, am = _assert_conv_forward_matches(x, w, b, params)
    assert out.isnan().any() and not out.isnan().all()
    _assert_conv_backward_matches(x, w, am, params)


def test_conv_channels_last_and_batch_zero():
    x, w, b, params = _conv_case(**CONV_CASES["basic"])
    _, am = _assert_conv_forward_matches(x.to(memory_format=torch.channels_last), w, b, params)
    _assert_conv_backward_matches(x.to(memory_format=torch.channels_last), w, am, params)
    x0 = x[:0]
    out, am0 = OPS.triton_conv2d_relu_maxpool2d(x0, w, b, *params, True)
    assert out.shape == (0, 4, 3, 3) and am0.shape == (0, 4, 3, 3)
    gi, gw, gb = OPS.triton_conv2d_relu_maxpool2d_backward(out, x0, w, am0, *params, [True, True, True])
    assert gi.shape == x0.shape and gw.shape == w.shape and gb.shape == (4,)
    assert not gw.any() and not gb.any()


def _assert_close_to_ref64(got, low, ref64, dtype, name):
    """|got - ref64| must be within 2x the stock (reference backend, same dtype) error plus a slack."""
    scale = ref64.abs().max().clamp_min(1.0)
    err = (got.double() - ref64).abs().max() / scale
    stock_err = (low.double() - ref64).abs().max() / scale
    assert err <= 2 * stock_err + EPS[dtype], f"{name}: error {err:.3g} vs stock {stock_err:.3g} ({dtype})"


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_conv_low_precision(dtype):
    x, w, b, params = _conv_case(**CONV_CASES["stride2_pad1"], dtype=dtype)
    out, am = OPS.triton_conv2d_relu_maxpool2d(x, w, b, *params, True)
    assert out.dtype == dtype
    x64, w64, b64 = x.double(), w.double(), b.double()
    ref64, _ = reference.conv2d_relu_maxpool2d(x64, w64, b64, *params, False)
    stock, _ = reference.conv2d_relu_maxpool2d(x, w, b, *params, False)
    _assert_close_to_ref64(out, stock, ref64, dtype, "output")
    # backward through our argmax, so both sides route the gradient the same way
    g = torch.randn(out.shape, device=DEV).to(dtype)
    got = OPS.triton_conv2d_relu_maxpool2d_backward(g, x, w, am, *params, [True, True, True])
    stock = reference.conv2d_relu_maxpool2d_backward(g, x, w, am, *params, [True, True, True])
    want = reference.conv2d_relu_maxpool2d_backward(g.double(), x64, w64, am, *params, [True, True, True])
    for name, a, s, e in zip(("grad_input", "grad_weight", "grad_bias"), got, stock, want):
        assert a.dtype == dtype
        _assert_close_to_ref64(a, s, e, dtype, name)


# ---------------------------------------------------------------------------------------------
# linear_relu
# ---------------------------------------------------------------------------------------------


def _linear_case(M, I, O, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(M * 100 + I * 10 + O)
    x = torch.randn(M, I, generator=g).to(dtype).to(DEV)
    w = (torch.randn(O, I, generator=g) / I ** 0.5).to(dtype).to(DEV)
    b = torch.randn(O, generator=g).to(dtype).to(DEV) if bias else None
    return x, w, b


@pytest.mark.parametrize("M,I,O,bias", [(5, 7, 6, True), (2, 20, 3, False), (33, 17, 18, True)])
@pytest.mark.parametrize("mask", [(True, True, True), (False, False, True), (True, False, False), (False, True, False)])
def test_linear_matches_reference_fp32(M, I, O, bias, mask):
    x, w, b = _linear_case(M, I, O, bias)
    out = OPS.triton_linear_relu(x, w, b)
    torch.testing.assert_close(out, reference.linear_relu(x, w, b), rtol=1e-5, atol=1e-5)
    assert (out == 0).any() and (out > 0).any()
    g = torch.randn_like(out)
    mask = [mask[0], mask[1], mask[2] and bias]
    got = OPS.triton_linear_relu_backward(g, x, w, out, mask)
    want = reference.linear_relu_backward(g, x, w, out, mask)
    for a, e, m in zip(got, want, mask):
        if m:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
        else:
            assert a.shape == (0,)


@pytest.mark.parametrize("split", [1, 2, 3])
def test_linear_weight_grad_split_and_odd_strides(split):
    """Transposed (non-contiguous) input, a broadcast (stride-0) grad_output, NaN in the gate."""
    x, w, b = _linear_case(40, 9, 5)
    xt = x.t().contiguous().t()
    out = OPS.triton_linear_relu(xt, w, b)
    out[3, 1] = float("nan")            # NaN output passes the gradient, like stock threshold_backward
    g = torch.ones(1, 1, device=DEV).expand(40, 5)
    gi, gw, gb = LINEAR.linear_relu_backward(g, xt, w, out, [True, True, True], split=split)
    rgi, rgw, rgb = reference.linear_relu_backward(g, x, w, out, [True, True, True])
    torch.testing.assert_close(gi, rgi, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rgw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, rgb, rtol=1e-5, atol=1e-5)


def test_linear_nan_and_empty_batch():
    x, w, b = _linear_case(4, 6, 5)
    x[1, 2] = float("nan")
    torch.testing.assert_close(OPS.triton_linear_relu(x, w, b), reference.linear_relu(x, w, b), equal_nan=True)
    x0 = x[:0]
    out = OPS.triton_linear_relu(x0, w, b)
    gi, gw, gb = OPS.triton_linear_relu_backward(out, x0, w, out, [True, True, True])
    assert out.shape == (0, 5) and gi.shape == (0, 6) and not gw.any() and not gb.any()
    _, _, gb = OPS.triton_linear_relu_backward(torch.ones(1, 1, device=DEV).expand(0, 5), x0, w, out,
                                               [False, False, True])   # bias-only path, stride-0 gradient
    assert gb.shape == (5,) and not gb.any()


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_linear_low_precision(dtype):
    x, w, b = _linear_case(20, 24, 18, dtype=dtype)
    out = OPS.triton_linear_relu(x, w, b)
    assert out.dtype == dtype
    _assert_close_to_ref64(out, reference.linear_relu(x, w, b),
                           reference.linear_relu(x.double(), w.double(), b.double()), dtype, "output")
    g = torch.randn(out.shape, device=DEV).to(dtype)
    got = OPS.triton_linear_relu_backward(g, x, w, out, [True, True, True])
    stock = reference.linear_relu_backward(g, x, w, out, [True, True, True])
    want = reference.linear_relu_backward(g.double(), x.double(), w.double(), out.double(), [True, True, True])
    for name, a, s, e in zip(("grad_input", "grad_weight", "grad_bias"), got, stock, want):
        _assert_close_to_ref64(a, s, e, dtype, name)


# ---------------------------------------------------------------------------------------------
# errors, registration, compile, packaging
# ---------------------------------------------------------------------------------------------


def test_float64_raises_naming_the_dtype():
    x, w, b, params = _conv_case(**CONV_CASES["basic"], dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        OPS.triton_conv2d_relu_maxpool2d(x, w, b, *params, True)
    with pytest.raises(TypeError, match="float64"):
        lo.linear_relu(torch.randn(2, 3, dtype=torch.float64, device=DEV),
                       torch.randn(4, 3, dtype=torch.float64, device=DEV), backend="triton")


def test_cpu_tensors_without_interpreter_raise_a_clear_error():
    code = textwrap.dedent("""
        import torch, lightnet_ops as lo
        import lightnet_ops._triton_ops as T
        assert not T.INTERPRET
        x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
        for call in (lambda: lo.conv2d_relu_maxpool2d(x, w, backend="triton"),
                     lambda: torch.ops.lightnet_ops.triton_linear_relu(torch.randn(2, 3), torch.randn(4, 3), None)):
            try:
                call()
            except Exception as e:
                print(type(e).__name__, "|", e)
            else:
                print("NO ERROR")
    """)
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2 and "NO ERROR" not in res.stdout, res.stdout
    assert lines[0].startswith("BackendUnavailableError") and "TRITON_INTERPRET=1" in lines[0]
    assert lines[1].startswith("RuntimeError") and "TRITON_INTERPRET=1" in lines[1] and "interpreter is off" in lines[1]


def test_opcheck_all_four_ops():
    x, w, b, params = _conv_case(N=2, C=2, H=6, W=6, K=3, R=3, S=3, padding=1)
    out, am = OPS.triton_conv2d_relu_maxpool2d(x, w, b, *params, True)
    g = torch.randn_like(out)
    xl, wl, bl = _linear_case(4, 5, 3)
    outl = OPS.triton_linear_relu(xl, wl, bl)
    cases = [
        (OPS.triton_conv2d_relu_maxpool2d, (x, w, b, *params, True)),
        (OPS.triton_conv2d_relu_maxpool2d, (x, w, None, *params, False)),
        (OPS.triton_conv2d_relu_maxpool2d_backward, (g, x, w, am, *params, [True, True, True])),
        (OPS.triton_conv2d_relu_maxpool2d_backward, (g, x, w, am, *params, [False, True, False])),
        (OPS.triton_linear_relu, (xl, wl, bl)),
        (OPS.triton_linear_relu_backward, (torch.randn_like(outl), xl, wl, outl, [True, True, True])),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_schemas_match_the_cpp_ops():
    if not lo._ops.EXTENSION_AVAILABLE:
        pytest.skip("the compiled extension (C++ schemas) is not built")
    for name in lo._ops.OP_NAMES:
        cpp = getattr(OPS, name).default._schema
        tri = getattr(OPS, f"triton_{name}").default._schema
        assert [(a.name, str(a.type)) for a in cpp.arguments] == [(a.name, str(a.type)) for a in tri.arguments]
        assert [str(r.type) for r in cpp.returns] == [str(r.type) for r in tri.returns]


def test_torch_compile_fullgraph_forward_and_backward():
    x, w, b, params = _conv_case(N=2, C=2, H=8, W=8, K=3, R=3, S=3)
    wl = torch.randn(4, 3 * 3 * 3, device=DEV)
    bl = torch.randn(4, device=DEV)

    def net(x, w, b, wl, bl, backend):
        y = lo.conv2d_relu_maxpool2d(x, w, b, 1, 0, 1, 2, backend=backend)
        return lo.linear_relu(y.flatten(1), wl, bl, backend=backend)

    leaves = [t.clone().requires_grad_() for t in (x, w, b, wl, bl)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b, wl, bl)]
    compiled = torch.compile(net, fullgraph=True)   # inductor around the opaque custom ops
    out = compiled(*leaves, "triton")
    ref = net(*ref_leaves, "reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    for a, e in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-5)


def test_kernels_come_from_this_tree():
    """lightnet_ops.triton_kernels resolves to the triton_kernels/ of the lightnet_ops that was imported
    (in a source tree: <repo>/triton_kernels; installed: lightnet_ops/triton_kernels), even when another
    checkout is editable-installed in the same environment."""
    import lightnet_ops.triton_kernels as tk

    pkg = Path(lo.__file__).resolve().parent
    here = Path(tk.__file__).resolve().parent
    assert here in (pkg / "triton_kernels", pkg.parent / "triton_kernels")
    assert tk.OP_MODULES == T.KERNEL_MODULES and tk.conv2d_relu_maxpool2d is CONV


@pytest.mark.skipif(not HAS_CUDA, reason="autotuning runs on a GPU only (the interpreter uses one config)")
def test_autotuned_launch_matches_fixed_config(monkeypatch):
    x, w, b, params = _conv_case(N=2, C=3, H=20, W=20, K=8, R=3, S=3, dtype=torch.float16)
    xl, wl, bl = _linear_case(50, 40, 30, dtype=torch.float16)
    fixed = OPS.triton_conv2d_relu_maxpool2d(x, w, b, *params, True), OPS.triton_linear_relu(xl, wl, bl)
    monkeypatch.setattr(T._kernels._common, "AUTOTUNE", True)
    tuned = OPS.triton_conv2d_relu_maxpool2d(x, w, b, *params, True), OPS.triton_linear_relu(xl, wl, bl)
    torch.testing.assert_close(tuned[0][0], fixed[0][0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(tuned[1], fixed[1], rtol=1e-3, atol=1e-3)
    assert CONV._conv_fwd_kernel.tuned.cache and LINEAR._gemm_kernel.tuned.cache   # it did tune


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the other tests compile and run every kernel for real")
def test_kernels_compile_for_sm90_without_a_gpu():
    """Compiled mode, which the interpreter does not exercise: every kernel (default configs, float16)
    goes through Triton's whole compiler to an sm_90 cubin. `python -m lightnet_ops.triton_kernels.aot_check
    --all-configs` checks every config and dtype (minutes)."""
    code = textwrap.dedent("""
        import importlib, json, sys
        import lightnet_ops._triton_ops as T
        aot = importlib.import_module(T._kernels.__name__ + ".aot_check")
        per_op = {op: sorted({fn.__name__ for fn, _, _ in m.aot_jobs(["fp16"], False)})
                  for op, m in T._kernels.OP_MODULES.items()}
        counts = {op: len(list(m.aot_jobs(["fp16"], False))) for op, m in T._kernels.OP_MODULES.items()}
        print("JOBS " + json.dumps(dict(per_op=per_op, counts=counts, total=len(list(aot.jobs(["fp16"], False))))))
        sys.exit(aot.main(["--dtypes", "fp16"]))
    """)
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    jobs = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("JOBS "))[5:])
    # every Triton op (one per contract that has a kernel module) contributes jobs, and aot_check runs them all
    assert set(jobs["counts"]) == set(T.KERNEL_MODULES) and T.KERNEL_MODULES, jobs
    assert all(n > 0 for n in jobs["counts"].values()), jobs
    assert jobs["total"] > sum(jobs["counts"].values())   # plus the shared kernels of _common
    compiled = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("ok ")]
    assert len(compiled) == jobs["total"], res.stdout[-2000:]
    for op, names in jobs["per_op"].items():
        assert set(names) <= set(compiled), (op, names)
    assert f"aot_check: compiled {jobs['total']} kernels for sm_90" in res.stdout, res.stdout[-2000:]


def test_every_triton_module_is_an_op_with_schema_launchers():
    """Each kernel module names a contract, and its launchers take the contract's schema arguments."""
    import inspect

    assert set(T._kernels.OP_MODULES) <= set(CONTRACTS)
    assert list(T.BACKEND.ops) == list(T.KERNEL_MODULES) == [op for op in CONTRACTS if op in T.KERNEL_MODULES]
    for op, module in T.KERNEL_MODULES.items():
        c = CONTRACTS[op]
        for name, schema, launcher in ((op, c.schema, module.forward), (c.backward_name, c.backward_schema,
                                                                        module.backward)):
            want = [a.name for a in torch._C.parse_schema(f"lightnet_ops::{name}{schema}").arguments]
            assert list(inspect.signature(launcher).parameters) == want, name
