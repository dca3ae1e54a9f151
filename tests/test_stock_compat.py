"""What stock PyTorch accepts, the fused functional API accepts too, with stock's result: autocast,
integer-likes for sizes, padding strings, a 0-d linear bias; and stock's errors where stock errs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lightnet_ops as lo
from conftest import backend_cases

CPU_BACKENDS = [b for b, dev in backend_cases() if dev == "cpu"]


def _mixed_model() -> nn.Module:
    # A stock conv feeds a fused chain: under autocast the fused layer gets a bfloat16 activation.
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 7 * 7, 10), nn.ReLU())


def test_autocast_mixed_stock_and_fused_model_matches_stock_amp():
    torch.manual_seed(0)
    stock = _mixed_model()
    fused = lo.fuse(stock)
    assert isinstance(fused[2], lo.Conv2dReLUMaxPool2d)
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bfloat16 reference-fallback notice
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = stock(x), fused(x)
        (gw_want,) = torch.autograd.grad(want.float().sum(), stock[2].weight)
        (gw_got,) = torch.autograd.grad(got.float().sum(), fused[2].weight)
    assert got.dtype == want.dtype == torch.bfloat16
    ref = stock.double()(x.double())  # stock's own autocast error against float64 bounds ours
    stock_err = (want.double() - ref).abs().max().item()
    assert (got.double() - ref).abs().max().item() <= 2 * stock_err + 1e-6
    torch.testing.assert_close(gw_got, gw_want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mismatched_dtypes_outside_autocast_are_errors(backend):
    with pytest.raises(ValueError, match="does not match weight dtype"):
        lo.linear_relu(torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 4), backend=backend)
    with pytest.raises(ValueError, match="does not match weight dtype"):
        lo.conv2d_relu_maxpool2d(torch.randn(1, 1, 6, 6, dtype=torch.float64), torch.randn(2, 1, 3, 3),
                                 backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("kernel,dilation", [(3, 1), (4, 1), (2, 3), (4, 2)])
def test_padding_strings_match_stock(backend, padding, kernel, dilation):
    g = torch.Generator().manual_seed(kernel * 10 + dilation)
    x = torch.randn(2, 3, 13, 12, generator=g, requires_grad=True)
    w = torch.randn(4, 3, kernel, kernel, generator=g, requires_grad=True)
    got = lo.conv2d_relu_maxpool2d(x, w, padding=padding, dilation=dilation, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stock's note about a padded copy for even kernels
        want = F.max_pool2d(F.relu(F.conv2d(x, w, padding=padding, dilation=dilation)), 2)
    tol = dict(rtol=1e-4, atol=1e-4) if backend == "triton" else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(torch.autograd.grad(got.sum(), (x, w)), torch.autograd.grad(want.sum(), (x, w))):
        torch.testing.assert_close(a, b, **tol)


def test_padding_string_errors_match_stock():
    x, w = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 3, 3)
    with pytest.raises(ValueError, match="not supported for strided"):
        lo.conv2d_relu_maxpool2d(x, w, padding="same", stride=2)
    with pytest.raises(ValueError, match="invalid padding string"):
        lo.conv2d_relu_maxpool2d(x, w, padding="full")


@pytest.mark.parametrize("size", [np.int64(2), np.int32(2), torch.tensor(2), (np.int64(2), torch.tensor(2))])
def test_integer_likes_as_sizes(size):
    x, w = torch.randn(1, 2, 9, 9), torch.randn(3, 2, 3, 3)
    got = lo.conv2d_relu_maxpool2d(x, w, stride=size, padding=size, pool_kernel_size=size, pool_stride=size)
    want = F.max_pool2d(F.relu(F.conv2d(x, w, stride=2, padding=2)), 2, 2)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bad", [2.0, torch.tensor(2.0), True, "2"])
def test_non_integers_as_sizes_are_type_errors(bad):
    with pytest.raises((TypeError, ValueError), match="stride must be an int"):
        lo.conv2d_relu_maxpool2d(torch.randn(1, 1, 8, 8), torch.randn(1, 1, 3, 3), stride=bad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_dim_linear_bias_broadcasts_like_stock(backend):
    a = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(5, 6, requires_grad=True)
    b = torch.tensor(0.3, requires_grad=True)
    got, want = lo.linear_relu(a, w, b, backend=backend), F.relu(F.linear(a, w, b))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for x, y in zip(torch.autograd.grad(got.sum(), (a, w, b)), torch.autograd.grad(want.sum(), (a, w, b))):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
