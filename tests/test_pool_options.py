"""Pool padding and ceil mode (max_pool2d's semantics: padding as -inf, ceil-mode windows that start
inside the padded input) on every backend this machine runs, against the stock composition:
outputs and every gradient, ties and NaN included, modules, fakes, second order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lightnet_ops as lo
from conftest import backend_cases

CPU_BACKENDS = [b for b, dev in backend_cases() if dev == "cpu"]
# (pool kernel, stride, padding, ceil_mode): ResNet's stem pool, SqueezeNet/GoogLeNet's, and odd ones.
POOLS = [(3, 2, 1, False), (3, 2, 0, True), (3, 2, 1, True), (2, 2, 1, False), (2, 1, 1, True), (3, 3, 1, True),
         (5, 2, 2, True), ((3, 2), (2, 1), (1, 0), True)]


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def _stock(x, w, b, pool, conv=(1, 1, 1)):
    k, s, p, ceil = pool
    return F.max_pool2d(F.relu(F.conv2d(x, w, b, *conv)), k, s, p, ceil_mode=ceil)


def _fused(x, w, b, pool, backend, conv=(1, 1, 1)):
    k, s, p, ceil = pool
    return lo.conv2d_relu_maxpool2d(x, w, b, *conv, k, s, p, ceil, backend=backend)


def _check(backend, x, w, b, pool, conv=(1, 1, 1)):
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    got, want = _fused(x, w, b, pool, backend, conv), _stock(x, w, b, pool, conv)
    assert got.shape == want.shape
    tol = dict(rtol=1e-4, atol=1e-4) if backend == "triton" else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, want, equal_nan=True, **tol)
    g = torch.randn(want.shape, dtype=want.dtype, generator=torch.Generator().manual_seed(1))
    for a, c in zip(torch.autograd.grad(got, (x, w, b), g), torch.autograd.grad(want, (x, w, b), g)):
        torch.testing.assert_close(a, c, equal_nan=True, **tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pool", POOLS, ids=str)
@pytest.mark.parametrize("size", [7, 8, 9])
def test_padded_and_ceil_mode_pools_match_stock(backend, pool, size):
    g = torch.Generator().manual_seed(size)
    dt = _dtype(backend)
    x = torch.randn(2, 3, size, size + 1, dtype=dt, generator=g)
    w = torch.randn(4, 3, 3, 3, dtype=dt, generator=g)
    b = torch.randn(4, dtype=dt, generator=g)
    _check(backend, x, w, b, pool)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_dilated_conv_with_a_padded_pool(backend):
    g = torch.Generator().manual_seed(3)
    dt = _dtype(backend)
    x, w, b = (torch.randn(2, 2, 15, 13, dtype=dt, generator=g), torch.randn(3, 2, 3, 3, dtype=dt, generator=g),
               torch.randn(3, dtype=dt, generator=g))
    _check(backend, x, w, b, (3, 2, 1, True), conv=(2, 2, 2))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties_and_nan_with_pool_padding(backend):
    dt = _dtype(backend)
    x = torch.zeros(1, 1, 6, 6, dtype=dt)            # every window is a tie; ReLU zeroes all of it
    w = torch.ones(2, 1, 1, 1, dtype=dt)
    b = torch.tensor([0.5, -0.5], dtype=dt)          # channel 0: positive ties, channel 1: all zero
    _check(backend, x, w, b, (3, 2, 1, True), conv=(1, 0, 1))
    x = torch.randn(1, 1, 6, 6, dtype=dt, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, 0] = float("nan")                     # NaN in the corner window next to the pool padding
    _check(backend, x, w, b, (3, 2, 1, True), conv=(1, 0, 1))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_module_with_pool_options_matches_stock_modules(backend):
    torch.manual_seed(0)
    fused = lo.Conv2dReLUMaxPool2d(3, 4, 3, padding=1, pool_kernel_size=3, pool_stride=2, pool_padding=1,
                                   ceil_mode=True, backend=backend).to(_dtype(backend))
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).to(_dtype(backend))
    conv.load_state_dict(fused.state_dict())
    stock = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True))
    x = torch.randn(2, 3, 10, 11, dtype=_dtype(backend))
    torch.testing.assert_close(fused(x), stock(x), rtol=1e-4, atol=1e-5)
    assert "pool_padding=(1, 1), ceil_mode=True" in repr(fused)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_gradgradcheck_with_pool_padding(backend):
    g = torch.Generator().manual_seed(5)
    x, w, b = (torch.randn(1, 2, 7, 7, dtype=torch.float64, generator=g).requires_grad_(),
               torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=g).requires_grad_(),
               torch.randn(2, dtype=torch.float64, generator=g).requires_grad_())
    assert torch.autograd.gradgradcheck(lambda x, w, b: _fused(x, w, b, (3, 2, 1, True), backend), (x, w, b))
    t = tuple(torch.randn_like(a) for a in (x, w, b))
    _, got = torch.func.jvp(lambda x, w, b: _fused(x, w, b, (3, 2, 1, True), backend), (x, w, b), t)
    _, want = torch.func.jvp(lambda x, w, b: _stock(x, w, b, (3, 2, 1, True)), (x, w, b), t)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pool_padding", [2, (0, 2), -1])
def test_pool_padding_beyond_half_the_window_is_an_error(pool_padding):
    with pytest.raises(ValueError, match="pool_padding"):
        lo.conv2d_relu_maxpool2d(torch.randn(1, 1, 8, 8), torch.randn(1, 1, 3, 3), pool_kernel_size=3,
                                 pool_padding=pool_padding)


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
def test_raw_op_with_pool_options_checks_and_fakes():
    x, w, b = torch.randn(2, 3, 9, 9), torch.randn(4, 3, 3, 3), torch.randn(4)
    args = (x, w, b, [1, 1], [1, 1], [1, 1], [3, 3], [2, 2], True, [1, 1], True)
    torch.library.opcheck(torch.ops.lightnet_ops.conv2d_relu_maxpool2d, args)
    out, argmax = torch.ops.lightnet_ops.conv2d_relu_maxpool2d(*args)
    grads_args = (torch.randn_like(out), x, w, argmax, [1, 1], [1, 1], [1, 1], [3, 3], [2, 2], [True, True, True],
                  [1, 1], True)
    torch.library.opcheck(torch.ops.lightnet_ops.conv2d_relu_maxpool2d_backward, grads_args)
    with pytest.raises(ValueError, match="at most half of pool_kernel_size"):
        torch.ops.lightnet_ops.conv2d_relu_maxpool2d(x, w, b, [1, 1], [1, 1], [1, 1], [3, 3], [2, 2], True, [2, 2],
                                                     False)
