"""Package-level behaviour: backends(), import without a built extension, registration."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lightnet_ops as lo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_backends_lists_what_this_install_runs():
    names = lo.backends()
    assert "reference" in names
    assert "cpu" in names, f"the C++ extension did not load: {lo._ops.EXTENSION_ERROR}"
    assert ("cuda" in names) == (torch.cuda.is_available() and lo.backend_registry.cuda_available())
    assert set(names) <= {"cpu", "cuda", "triton", "reference"}


def test_all_ops_registered_with_cpu_kernels():
    for name in lo._ops.OP_NAMES:
        assert hasattr(torch.ops.lightnet_ops, name)
        assert lo._ops.has_kernel(name, "CPU"), name


def test_public_api_names():
    for name in ["conv2d_relu_maxpool2d", "linear_relu", "Conv2dReLUMaxPool2d", "LinearReLU", "backends",
                 "Conv2dReLUMaxPool2dFunction", "LinearReLUFunction", "LightNet", "StockLightNet"]:
        assert hasattr(lo, name), name
    assert issubclass(lo.Conv2dReLUMaxPool2dFunction, torch.autograd.Function)
    assert issubclass(lo.LinearReLUFunction, torch.autograd.Function)


def test_import_without_built_extension_keeps_reference_and_says_how_to_build():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["lightnet_ops._C"] = None  # simulate an unbuilt extension
        import torch, torch.nn.functional as F
        import lightnet_ops as lo
        assert not lo._ops.EXTENSION_AVAILABLE
        assert [b for b in lo.backends() if b != "triton"] == ["reference"], lo.backends()  # triton needs no _C
        x, w = torch.randn(2, 1, 8, 8), torch.randn(3, 1, 3, 3)
        got = lo.conv2d_relu_maxpool2d(x, w)  # auto falls back to the reference backend
        torch.testing.assert_close(got, F.max_pool2d(F.relu(F.conv2d(x, w)), 2))
        try:
            lo.conv2d_relu_maxpool2d(x, w, backend="cpu")
        except lo.BackendUnavailableError as e:
            assert "pip install --no-build-isolation -e ." in str(e), str(e)
            print("OK")
        """
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("OK")


def test_backend_argument_validation():
    x, w = torch.randn(1, 1, 6, 6), torch.randn(2, 1, 3, 3)
    with pytest.raises(TypeError, match="backend must be a string"):
        lo.conv2d_relu_maxpool2d(x, w, backend=None)


# --- Where the hand-written backward is recorded -------------------------------------------------
# The extension's forward ops carry a C++ autograd kernel (csrc/<op>.cpp); the functional API
# calls them directly for cpu / cuda and goes through the Python autograd.Functions otherwise.

CONV_PARAMS = ([1, 1], [1, 1], [1, 1], [2, 2], [2, 2])


def _conv_args():
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    return x, w, b


def _linear_args():
    return (torch.randn(5, 7, dtype=torch.float64, requires_grad=True),
            torch.randn(3, 7, dtype=torch.float64, requires_grad=True),
            torch.randn(3, dtype=torch.float64, requires_grad=True))


needs_extension = pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")


@needs_extension
def test_cpu_backend_records_the_cpp_node_other_backends_the_python_function():
    x, w, b = _conv_args()
    a, lw, lb = _linear_args()
    assert "CppNode" in lo.conv2d_relu_maxpool2d(x, w, b, padding=1, backend="cpu").grad_fn.name()
    assert "CppNode" in lo.linear_relu(a, lw, lb, backend="cpu").grad_fn.name()
    assert lo.conv2d_relu_maxpool2d(x, w, b, backend="reference").grad_fn.name() == \
        "Conv2dReLUMaxPool2dFunctionBackward"
    assert lo.linear_relu(a, lw, lb, backend="reference").grad_fn.name() == "LinearReLUFunctionBackward"
    with torch.no_grad():
        assert lo.linear_relu(a, lw, lb, backend="cpu").grad_fn is None


@needs_extension
@pytest.mark.parametrize("with_bias", [True, False])
def test_raw_ops_are_differentiable(with_bias):
    # torch.ops.lightnet_ops.* on tensors that require grad: gradcheck through the C++ autograd
    # kernel, for every subset of inputs that require grad (masks reach the backward op).
    ops = torch.ops.lightnet_ops
    x, w, b = _conv_args()
    a, lw, lb = _linear_args()
    for needs in ([True, True, True], [False, True, True], [True, False, False], [False, False, True]):
        cx, cw, cb = (t.detach().requires_grad_(n) for t, n in zip((x, w, b), needs))
        bias = cb if with_bias else None
        inputs = [t for t in (cx, cw, bias) if t is not None and t.requires_grad]
        if not inputs:
            continue
        assert torch.autograd.gradcheck(lambda *_: ops.conv2d_relu_maxpool2d(cx, cw, bias, *CONV_PARAMS, True)[0],
                                        inputs)
        la, lww, lbb = (t.detach().requires_grad_(n) for t, n in zip((a, lw, lb), needs))
        lbias = lbb if with_bias else None
        linputs = [t for t in (la, lww, lbias) if t is not None and t.requires_grad]
        if linputs:
            assert torch.autograd.gradcheck(lambda *_: ops.linear_relu(la, lww, lbias), linputs)


@needs_extension
def test_raw_conv_op_without_argmax_still_records_its_backward():
    # A graph traced or exported under no_grad bakes in need_argmax=False; run with grad it must
    # still differentiate (the node keeps its own argmax), and match stock.
    x, w, b = _conv_args()
    out, argmax = torch.ops.lightnet_ops.conv2d_relu_maxpool2d(x, w, b, *CONV_PARAMS, False)
    assert argmax.numel() == 0 and out.grad_fn is not None
    ref = torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(x, w, b, padding=1)), 2)
    for got, want in zip(torch.autograd.grad(out.sum(), (x, w, b)), torch.autograd.grad(ref.sum(), (x, w, b))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # inference: no argmax is written
        out, argmax = torch.ops.lightnet_ops.conv2d_relu_maxpool2d(x, w, b, *CONV_PARAMS, False)
    assert argmax.numel() == 0 and out.shape == (2, 4, 4, 4)


@needs_extension
def test_python_functions_still_run_the_extension_backends():
    # The public autograd.Function classes accept "cpu" too (their forward calls the op below
    # its autograd kernel: Function.forward runs without grad recording).
    x, w, b = _conv_args()
    out, argmax = lo.Conv2dReLUMaxPool2dFunction.apply(x, w, b, (1, 1), (1, 1), (1, 1), (2, 2), (2, 2), "cpu")
    assert argmax.dtype == torch.uint8 and argmax.shape == out.shape and not argmax.requires_grad
    assert out.grad_fn.name() == "Conv2dReLUMaxPool2dFunctionBackward"
    ref = torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(x, w, b, padding=1)), 2)
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make, call", [
    (lambda: lo.Conv2dReLUMaxPool2d(2, 3, 3, backend="cpu" if "cpu" in lo.backends() else "reference"),
     lambda m, x, w, b: lo.conv2d_relu_maxpool2d(x, w, b, pool_kernel_size=2, backend="reference")),
    (lambda: lo.LinearReLU(8, 5, backend="cpu" if "cpu" in lo.backends() else "reference"),
     lambda m, x, w, b: lo.linear_relu(x, w, b, backend="reference")),
], ids=["conv", "linear"])
def test_modules_use_parametrized_and_hook_computed_weights(make, call):
    # The modules read weight and bias from _parameters only when nothing computes them: a
    # parametrization (its own subclass) and the old weight_norm (a pre-hook-set attribute) must be followed.
    import warnings
    from torch.nn.utils import parametrize
    torch.manual_seed(0)
    m = make()
    x = torch.randn(2, 2, 6, 6) if isinstance(m, lo.Conv2dReLUMaxPool2d) else torch.randn(4, 8)

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(m, "weight", Double())
    torch.testing.assert_close(m(x), call(m, x, m.weight, m.bias))
    assert torch.allclose(m.weight, 2 * m.parametrizations.weight.original)
    m2 = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.nn.utils.weight_norm(m2)
    m2.weight_g.data.mul_(3)  # the computed weight differs from the stored direction
    out = m2(x)
    torch.testing.assert_close(out, call(m2, x, m2.weight, m2.bias))
