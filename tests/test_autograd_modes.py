"""Autograd modes beyond first-order reverse mode, on every backend this machine runs: double
backward (create_graph=True), forward-mode AD, torch.func transforms and per-sample gradients.

Each must match stock PyTorch on the same inputs. float64 is compared tightly; Triton (no float64)
at float32 against a float64 stock reference, within a multiple of float32 stock's own error.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import lightnet_ops as lo
from conftest import backend_cases
from lightnet_ops.ops import CONTRACTS

CPU_BACKENDS = [b for b, dev in backend_cases() if dev == "cpu"]
# Odd configs: strided, padded, dilated conv; overlapping 3/2 pool.
CONV_CFG = dict(stride=2, padding=1, dilation=1, pool_kernel_size=3, pool_stride=2)
CONV_CFG_DILATED = dict(stride=1, padding=2, dilation=2, pool_kernel_size=2, pool_stride=2)


def _dtype(backend: str) -> torch.dtype:
    return torch.float32 if backend == "triton" else torch.float64  # Triton has no float64


def _fused_conv(backend, cfg):
    return lambda x, w, b: lo.conv2d_relu_maxpool2d(x, w, b, backend=backend, **cfg)


def _stock_conv(cfg):
    return lambda x, w, b: F.max_pool2d(F.relu(F.conv2d(x, w, b, cfg["stride"], cfg["padding"], cfg["dilation"])),
                                        cfg["pool_kernel_size"], cfg["pool_stride"])


def _fused_linear(backend):
    return lambda x, w, b: lo.linear_relu(x, w, b, backend=backend)


def _stock_linear(x, w, b):
    return F.relu(F.linear(x, w, b))


def _conv_args(dtype, seed=0, shape=(2, 2, 9, 9)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, dtype=dtype, generator=g), torch.randn(3, shape[1], 3, 3, dtype=dtype, generator=g),
            torch.randn(3, dtype=dtype, generator=g))


def _linear_args(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 6, dtype=dtype, generator=g), torch.randn(5, 6, dtype=dtype, generator=g),
            torch.randn(5, dtype=dtype, generator=g))


def _assert_matches_stock(fused, stock, args, backend):
    """fused(*args) == stock(*args) (tuples of tensors): float64 tightly; float32 (Triton) within 8x
    float32 stock's own error against float64 stock, plus a small floor."""
    got = fused(*args)
    if _dtype(backend) == torch.float64:
        for g, w in zip(got, stock(*args)):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
        return
    want32 = stock(*args)
    want64 = stock(*(a.double() for a in args))
    for g, w32, w64 in zip(got, want32, want64):
        stock_err = (w32.double() - w64).abs().max().item()
        scale = w64.abs().max().item()
        assert (g.double() - w64).abs().max().item() <= 8 * stock_err + 1e-5 * max(scale, 1.0)


# --- Every op's C++ autograd kernel against its contract's reference ------------------------------
# On the contract's sample arguments, so a new op is covered without an edit here: the extension's
# raw op (its Autograd-key kernel) must differentiate like the reference composition of stock ops.

needs_extension = pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")


def _contract_case(name: str, with_bias: bool = True):
    """(the extension's op, the reference, float64 sample arguments, indices of the float tensors)."""
    c = CONTRACTS[name]
    args = list(c.sample_args(torch.float64, torch.Generator().manual_seed(0)))
    if not with_bias:
        args[2] = None  # the fused-layer ops take (input, weight, bias, ...)
    floats = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    return getattr(torch.ops.lightnet_ops, name), c.reference, args, floats


def _output(out):
    return out[0] if isinstance(out, tuple) else out


@needs_extension
@pytest.mark.parametrize("name", sorted(CONTRACTS))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("wanted", ["all", "first", "last"])
def test_op_gradients_match_the_reference(name, with_bias, wanted):
    # First order (the hand-written backward op) and, under create_graph=True, the second order.
    op, ref, args, floats = _contract_case(name, with_bias)
    diff = {"all": floats, "first": floats[:1], "last": floats[-1:]}[wanted]

    def grads(fn):
        a = [t.detach().requires_grad_(i in diff) if i in floats else t for i, t in enumerate(args)]
        leaves = [a[i] for i in diff]
        y = _output(fn(*a))
        first = torch.autograd.grad(y.pow(2).sum(), leaves, create_graph=True)
        second = torch.autograd.grad(y.sum() + sum(g.pow(2).sum() for g in first), leaves)
        return first + second

    for got, want in zip(grads(op), grads(ref), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@needs_extension
@pytest.mark.parametrize("name", sorted(CONTRACTS))
@pytest.mark.parametrize("requires_grad", [False, True])
def test_op_tangents_match_the_reference(name, requires_grad):
    # Forward-mode AD, alone and with a graph recorded in the same call.
    op, ref, args, floats = _contract_case(name)
    g = torch.Generator().manual_seed(3)
    tangents = {i: torch.randn(args[i].shape, dtype=args[i].dtype, generator=g) for i in floats}

    def tangent_of(fn):
        with fwAD.dual_level():
            a = [fwAD.make_dual(t.detach().requires_grad_(requires_grad), tangents[i]) if i in floats else t
                 for i, t in enumerate(args)]
            out = _output(fn(*a))
            return fwAD.unpack_dual(out).primal.detach(), fwAD.unpack_dual(out).tangent

    for got, want in zip(tangent_of(op), tangent_of(ref), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


# --- Double backward ---------------------------------------------------------------------------

def _penalty_grads(op):
    """Gradients of a WGAN-GP style loss: output + squared input and weight gradients."""
    def run(x, w, b):
        x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
        y = op(x, w, b)
        gx, gw = torch.autograd.grad(y.pow(2).sum(), (x, w), create_graph=True)
        return torch.autograd.grad(y.sum() + gx.pow(2).sum() + gw.pow(2).sum(), (x, w, b))
    return run


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cfg", [CONV_CFG, CONV_CFG_DILATED], ids=["strided", "dilated"])
def test_conv_gradient_penalty_matches_stock(backend, cfg):
    args = _conv_args(_dtype(backend))
    _assert_matches_stock(_penalty_grads(_fused_conv(backend, cfg)), _penalty_grads(_stock_conv(cfg)), args, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_gradient_penalty_matches_stock(backend):
    args = _linear_args(_dtype(backend))
    _assert_matches_stock(_penalty_grads(_fused_linear(backend)), _penalty_grads(_stock_linear), args, backend)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
@pytest.mark.parametrize("cfg", [CONV_CFG, CONV_CFG_DILATED], ids=["strided", "dilated"])
def test_gradgradcheck_float64(backend, cfg):
    x, w, b = (t.requires_grad_() for t in _conv_args(torch.float64, shape=(1, 2, 7, 7)))
    assert torch.autograd.gradgradcheck(_fused_conv(backend, cfg), (x, w, b))
    a, lw, lb = (t.requires_grad_() for t in _linear_args(torch.float64))
    assert torch.autograd.gradgradcheck(_fused_linear(backend), (a, lw, lb))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hessian_matches_stock(backend):
    a, lw, lb = _linear_args(_dtype(backend))

    def hess(op):
        return lambda a, w, b: (torch.autograd.functional.hessian(lambda w: op(a, w, b).pow(2).sum(), w),)
    _assert_matches_stock(hess(_fused_linear(backend)), hess(_stock_linear), (a, lw, lb), backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_first_order_backward_under_create_graph_equals_plain_backward(backend):
    # The create_graph formulation routes through the same argmax as the hand-written backward.
    x, w, b = (t.requires_grad_() for t in _conv_args(_dtype(backend)))
    y = _fused_conv(backend, CONV_CFG)(x, w, b)
    plain = torch.autograd.grad(y.sum(), (x, w, b), retain_graph=True)
    graphed = torch.autograd.grad(y.sum(), (x, w, b), create_graph=True)
    for p, g in zip(plain, graphed):
        torch.testing.assert_close(g.detach(), p, rtol=1e-5, atol=1e-5)


# --- Forward-mode AD ---------------------------------------------------------------------------

def _jvp(op):
    def run(x, w, b):
        g = torch.Generator().manual_seed(7)
        tangents = tuple(torch.randn(t.shape, dtype=t.dtype, generator=g) for t in (x, w, b))
        return torch.func.jvp(op, (x, w, b), tangents)
    return run


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cfg", [CONV_CFG, CONV_CFG_DILATED], ids=["strided", "dilated"])
def test_conv_func_jvp_matches_stock(backend, cfg):
    _assert_matches_stock(_jvp(_fused_conv(backend, cfg)), _jvp(_stock_conv(cfg)), _conv_args(_dtype(backend)),
                          backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_jacfwd_matches_stock(backend):
    a, lw, lb = _linear_args(_dtype(backend))

    def jac(op):
        return lambda a, w, b: (torch.func.jacfwd(lambda a: op(a, w, b))(a),)
    _assert_matches_stock(jac(_fused_linear(backend)), jac(_stock_linear), (a, lw, lb), backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_dual_tensors_get_stock_tangents(backend, requires_grad):
    # torch.autograd.forward_ad directly, alone and mixed with reverse mode.
    x, w, b = (t.requires_grad_(requires_grad) for t in _conv_args(_dtype(backend)))

    def tangent_of(op):
        def run(x, w, b):
            tx = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(3))
            with fwAD.dual_level():
                return (fwAD.unpack_dual(op(fwAD.make_dual(x, tx), w, b)).tangent,)
        return run
    _assert_matches_stock(tangent_of(_fused_conv(backend, CONV_CFG)), tangent_of(_stock_conv(CONV_CFG)),
                          (x, w, b), backend)


def test_lightnet_jvp_matches_stock():
    torch.manual_seed(0)
    net = lo.LightNet().double()
    stock = lo.StockLightNet().double()
    stock.load_state_dict(net.state_dict())
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    t = torch.randn_like(x)
    (_, got), (_, want) = torch.func.jvp(net, (x,), (t,)), torch.func.jvp(stock, (x,), (t,))
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


# --- torch.func reverse transforms and per-sample gradients ---------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_func_grad_and_jacrev_match_stock(backend):
    def grads(op):
        def run(x, w, b):
            gw = torch.func.grad(lambda w: op(x, w, b).pow(2).sum())(w)
            jx = torch.func.jacrev(lambda x: op(x, w, b))(x)
            return gw, jx
        return run
    _assert_matches_stock(grads(_fused_conv(backend, CONV_CFG)), grads(_stock_conv(CONV_CFG)),
                          _conv_args(_dtype(backend)), backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_sample_gradients_match_stock(backend):
    x, w, b = _conv_args(_dtype(backend), shape=(5, 2, 9, 9))

    def per_sample(op):
        def run(x, w, b):
            loss = lambda w, xi: op(xi.unsqueeze(0), w, b).pow(2).sum()  # noqa: E731
            return (torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(w, x),)
        return run
    _assert_matches_stock(per_sample(_fused_conv(backend, CONV_CFG)), per_sample(_stock_conv(CONV_CFG)),
                          (x, w, b), backend)


# --- Second-order MAML on a Conv-4 backbone (conv3x3 -> ReLU -> max-pool 2, four times) -------------

def _conv4_logits(params, x, block):
    for i in range(4):
        x = block(x, params[2 * i], params[2 * i + 1])
    return F.linear(x.flatten(1), params[8], params[9])


def _maml_losses(block, steps=3, inner_steps=2, inner_lr=0.1, outer_lr=0.05):
    """Outer-loop losses of second-order MAML (inner SGD with create_graph=True) on fixed tasks."""
    g = torch.Generator().manual_seed(0)
    params = []
    for c_in in (1, 8, 8, 8):
        params += [torch.randn(8, c_in, 3, 3, dtype=torch.float64, generator=g) * 0.4,
                   torch.randn(8, dtype=torch.float64, generator=g) * 0.1]
    params += [torch.randn(5, 8, dtype=torch.float64, generator=g) * 0.4, torch.zeros(5, dtype=torch.float64)]
    params = [p.requires_grad_() for p in params]
    losses = []
    for _ in range(steps):
        xs, xq = (torch.randn(10, 1, 28, 28, dtype=torch.float64, generator=g) for _ in range(2))
        ys, yq = (torch.randint(0, 5, (10,), generator=g) for _ in range(2))
        fast = params
        for _ in range(inner_steps):
            loss = F.cross_entropy(_conv4_logits(fast, xs, block), ys)
            grads = torch.autograd.grad(loss, fast, create_graph=True)
            fast = [p - inner_lr * gp for p, gp in zip(fast, grads)]
        outer = F.cross_entropy(_conv4_logits(fast, xq, block), yq)
        meta_grads = torch.autograd.grad(outer, params)
        losses.append(outer.item())
        params = [(p - outer_lr * gp).detach().requires_grad_() for p, gp in zip(params, meta_grads)]
    return losses, params


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_second_order_maml_matches_stock(backend):
    fused = _maml_losses(lambda x, w, b: lo.conv2d_relu_maxpool2d(x, w, b, padding=1, backend=backend))
    stock = _maml_losses(lambda x, w, b: F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=1)), 2))
    torch.testing.assert_close(fused[0], stock[0], rtol=1e-9, atol=1e-12)
    for p, q in zip(fused[1], stock[1]):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


# --- Tracing and export do not bake in the grad mode ------------------------------------------------

def _lightnet_pair():
    torch.manual_seed(0)
    net = lo.LightNet().double()
    stock = lo.StockLightNet().double()
    stock.load_state_dict(net.state_dict())
    return net, stock, torch.randn(3, 1, 32, 32, dtype=torch.float64)


def _grads_match(run_fused, net, stock, x):
    run_fused(x).square().sum().backward()
    stock(x).square().sum().backward()
    for p, q in zip(net.parameters(), stock.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)


def test_jit_trace_passes_its_check_and_trains():
    net, stock, x = _lightnet_pair()
    traced = torch.jit.trace(net, x)  # check_trace re-traces under no_grad: the graphs must agree
    torch.testing.assert_close(traced(x), stock(x), rtol=1e-9, atol=1e-12)
    _grads_match(traced, net, stock, x)


@pytest.mark.parametrize("how", ["jit.trace", "export"])
def test_graph_captured_under_no_grad_runs_with_grad(how):
    net, stock, x = _lightnet_pair()
    with torch.no_grad():
        graph = torch.jit.trace(net, x) if how == "jit.trace" else torch.export.export(net, (x,)).module()
    _grads_match(graph, net, stock, x)


def test_jit_script_says_what_to_use_instead():
    with pytest.raises(RuntimeError, match="torch.jit.script.*torch.export"):
        torch.jit.script(lo.LightNet())
