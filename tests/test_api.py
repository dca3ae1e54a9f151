"""Package-level behaviour: backends(), import without a built extension, registration."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

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


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if b in lo.backends()])
def test_double_backward_raises_a_clear_error(backend):
    # The hand-written backward ops are not themselves differentiable (@once_differentiable): a
    # second derivative through them must fail loudly, not return a wrong (e.g. zero) gradient.
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    y = lo.conv2d_relu_maxpool2d(x, w, backend=backend).square().sum()
    (gx,) = torch.autograd.grad(y, x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    lw = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    (ga,) = torch.autograd.grad(lo.linear_relu(a, lw, backend=backend).square().sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        ga.sum().backward()
