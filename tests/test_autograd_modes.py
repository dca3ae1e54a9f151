"""Autograd modes beyond first-order reverse mode, on every backend this machine runs.

Whatever a mode does, it must match stock PyTorch or raise an error naming the op: a second
derivative or a forward-mode tangent that silently loses a term is the failure this file guards.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import lightnet_ops as lo
from conftest import backend_cases

CPU_BACKENDS = [b for b, dev in backend_cases() if dev == "cpu"]
SECOND_ORDER = "second derivatives"
FORWARD_AD = "forward-mode AD"


def _dtype(backend: str) -> torch.dtype:
    return torch.float32 if backend == "triton" else torch.float64  # Triton has no float64


def _conv_args(backend: str):
    g = torch.Generator().manual_seed(0)
    dt = _dtype(backend)
    x = torch.randn(2, 2, 7, 7, dtype=dt, generator=g).requires_grad_()
    w = torch.randn(3, 2, 3, 3, dtype=dt, generator=g).requires_grad_()
    b = torch.randn(3, dtype=dt, generator=g).requires_grad_()
    return x, w, b


def _linear_args(backend: str):
    g = torch.Generator().manual_seed(1)
    dt = _dtype(backend)
    return (torch.randn(4, 6, dtype=dt, generator=g).requires_grad_(),
            torch.randn(5, 6, dtype=dt, generator=g).requires_grad_(),
            torch.randn(5, dtype=dt, generator=g).requires_grad_())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_penalty_with_respect_to_the_weight_raises(backend):
    # The input gradient, differentiated again with respect to the weight: the path that never met
    # @once_differentiable's error node and silently dropped the penalty term.
    x, w, b = _conv_args(backend)
    y = lo.conv2d_relu_maxpool2d(x, w, b, backend=backend)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=f"conv2d_relu_maxpool2d: {SECOND_ORDER}"):
        torch.autograd.grad(y.sum() + gx.pow(2).sum(), w)
    a, lw, lb = _linear_args(backend)
    out = lo.linear_relu(a, lw, lb, backend=backend)
    (ga,) = torch.autograd.grad(out.sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match=f"linear_relu: {SECOND_ORDER}"):
        torch.autograd.grad(out.sum() + ga.pow(2).sum(), lw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_with_respect_to_the_input_raises(backend):
    x, w, b = _conv_args(backend)
    (gx,) = torch.autograd.grad(lo.conv2d_relu_maxpool2d(x, w, b, backend=backend).square().sum(), x,
                                create_graph=True)
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        gx.sum().backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hessian_raises_instead_of_returning_zero(backend):
    a, lw, lb = _linear_args(backend)
    with pytest.raises(RuntimeError, match=f"linear_relu: {SECOND_ORDER}"):
        torch.autograd.functional.hessian(lambda w: lo.linear_relu(a.detach(), w, lb.detach(),
                                                                   backend=backend).pow(2).sum(), lw.detach())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_first_order_under_create_graph_still_matches_stock(backend):
    # create_graph=True alone (no second derivative taken) keeps working and gives stock's gradient.
    x, w, b = _conv_args(backend)
    y = lo.conv2d_relu_maxpool2d(x, w, b, backend=backend)
    ref = F.max_pool2d(F.relu(F.conv2d(x, w, b)), 2)
    got = torch.autograd.grad(y.sum(), (x, w, b), create_graph=True)
    want = torch.autograd.grad(ref.sum(), (x, w, b))
    tol = {} if backend != "triton" else {"rtol": 1e-4, "atol": 1e-4}
    for g, r in zip(got, want):
        torch.testing.assert_close(g.detach(), r, **tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_forward_ad_dual_inputs_raise(backend, requires_grad):
    x, w, b = (t.detach().requires_grad_(requires_grad) for t in _conv_args(backend))
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(NotImplementedError, match=f"conv2d_relu_maxpool2d: {FORWARD_AD}"):
            lo.conv2d_relu_maxpool2d(dual, w, b, backend=backend)
    a, lw, lb = (t.detach().requires_grad_(requires_grad) for t in _linear_args(backend))
    with fwAD.dual_level():
        dual = fwAD.make_dual(lw, torch.randn_like(lw))
        with pytest.raises(NotImplementedError, match=f"linear_relu: {FORWARD_AD}"):
            lo.linear_relu(a, dual, lb, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_func_jvp_raises_instead_of_zero_tangents(backend):
    x, w, b = (t.detach() for t in _conv_args(backend))
    with pytest.raises((NotImplementedError, RuntimeError)) as info:
        torch.func.jvp(lambda x: lo.conv2d_relu_maxpool2d(x, w, b, backend=backend), (x,), (torch.ones_like(x),))
    assert FORWARD_AD in str(info.value) or "functorch transforms" in str(info.value)


def test_lightnet_jvp_raises():
    net = lo.LightNet().double()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    with pytest.raises((NotImplementedError, RuntimeError), match=FORWARD_AD):
        torch.func.jvp(net, (x,), (torch.randn_like(x),))
