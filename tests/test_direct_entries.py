"""The functional ops' direct entries (csrc/ops.cpp: ``_C.linear_relu``, ``_C.conv2d_relu_maxpool2d``).

They are the functional API's first try: the op through its typed dispatcher handle, without
torch.ops' boxed call. They must give exactly what torch.ops gives where they take a call, and return
None (so the Python API handles it) wherever something the Python API does in Python could matter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import lightnet_ops as lo
from lightnet_ops import _ops
from lightnet_ops.api import conv2d_relu_maxpool2d as conv_api
from lightnet_ops.api import linear_relu as linear_api

pytestmark = pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")

OPS = torch.ops.lightnet_ops


def _linear_entry():
    return _ops.direct_entry("linear_relu")


def _conv_entry():
    return _ops.direct_entry("conv2d_relu_maxpool2d")


def _linear_args(dtype=torch.float64, requires_grad=True, bias=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g, dtype=dtype).requires_grad_(requires_grad)
    w = torch.randn(3, 7, generator=g, dtype=dtype).requires_grad_(requires_grad)
    b = torch.randn(3, generator=g, dtype=dtype).requires_grad_(requires_grad) if bias else None
    return x, w, b


def _conv_args(shape=(2, 3, 9, 9), dtype=torch.float64, requires_grad=True, bias=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)
    w = torch.randn(4, shape[-3], 3, 3, generator=g, dtype=dtype).requires_grad_(requires_grad)
    b = torch.randn(4, generator=g, dtype=dtype).requires_grad_(requires_grad) if bias else None
    return x, w, b


# The entry's positional parameters after (input, weight, bias), as the functional API passes them:
# stride, padding, dilation, pool_kernel_size, pool_stride, pool_padding, ceil_mode, backend, and the
# op's normalised (stride, padding, dilation, pool_kernel_size, pool_stride, pool_padding, ceil_mode).
CONV_FORMS = [
    ((1, 0, 1, 2, None, 0, False, "auto"), ([1, 1], [0, 0], [1, 1], [2, 2], [2, 2], [0, 0], False)),
    (((1, 2), [1, 0], 1, (3, 2), 2, 1, True, "cpu"), ([1, 2], [1, 0], [1, 1], [3, 2], [2, 2], [1, 1], True)),
    ((2, 1, (2, 1), 2, (1, 2), (1, 0), False, "auto"), ([2, 2], [1, 1], [2, 1], [2, 2], [1, 2], [1, 0], False)),
]


def _grads(out, *tensors):
    torch.manual_seed(1)
    return torch.autograd.grad(out, [t for t in tensors if t is not None], torch.randn_like(out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_entry_equals_the_op(dtype, bias):
    x, w, b = _linear_args(dtype, bias=bias)
    got = _linear_entry()(x, w, b, "auto")
    want = OPS.linear_relu(x, w, b)
    assert "CppNode" in got.grad_fn.name()
    assert torch.equal(got, want)
    for g1, g2 in zip(_grads(got, x, w, b), _grads(want, x, w, b)):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("form", range(len(CONV_FORMS)))
@pytest.mark.parametrize("bias", [True, False])
def test_conv_entry_equals_the_op(form, bias):
    given, normalised = CONV_FORMS[form]
    x, w, b = _conv_args(bias=bias)
    got = _conv_entry()(x, w, b, *given[:3], given[3], given[4], given[5], given[6], given[7])
    stride, padding, dilation, pool_k, pool_s, pool_p, ceil_mode = normalised
    want, _ = OPS.conv2d_relu_maxpool2d(x, w, b, stride, padding, dilation, pool_k, pool_s, True, pool_p, ceil_mode)
    assert "CppNode" in got.grad_fn.name()
    assert torch.equal(got, want)
    for g1, g2 in zip(_grads(got, x, w, b), _grads(want, x, w, b)):
        assert torch.equal(g1, g2)


def test_conv_entry_unbatched_input_and_inference():
    x, w, b = _conv_args(shape=(3, 9, 9))
    got = _conv_entry()(x, w, b, 1, 1, 1, 2, None, 0, False, "auto")
    want = OPS.conv2d_relu_maxpool2d(x.unsqueeze(0), w, b, [1, 1], [1, 1], [1, 1], [2, 2], [2, 2], True, [0, 0],
                                     False)[0].squeeze(0)
    assert got.shape == want.shape == (4, 4, 4) and torch.equal(got, want)
    for g1, g2 in zip(_grads(got, x, w, b), _grads(want, x, w, b)):
        assert torch.equal(g1, g2)
    with torch.no_grad():  # inference: no argmax asked for, same output
        assert torch.equal(_conv_entry()(x, w, b, 1, 1, 1, 2, None, 0, False, "auto"), want)


def test_functional_api_and_modules_take_the_entries(monkeypatch):
    calls = []

    def spy(entry):
        def wrapped(*args):
            out = entry(*args)
            calls.append(out is not None)
            return out
        return wrapped

    monkeypatch.setattr(linear_api, "_direct_linear_relu", spy(_linear_entry()))
    monkeypatch.setattr(conv_api, "_direct_conv2d_relu_maxpool2d", spy(_conv_entry()))
    lo.linear_relu(*_linear_args())
    lo.LinearReLU(7, 3)(torch.randn(2, 7))
    x, w, b = _conv_args()
    lo.conv2d_relu_maxpool2d(x, w, b, padding=1)
    lo.Conv2dReLUMaxPool2d(3, 4, 3, padding=1)(torch.randn(2, 3, 9, 9))
    assert calls == [True] * 4
    # Calls the entry declines still work, through the Python path.
    calls.clear()
    y = lo.linear_relu(torch.randn(2, 3, 7), torch.randn(3, 7))
    assert y.shape == (2, 3, 3) and calls == [False]


class _Subclass(torch.Tensor):
    pass


class _Recorder(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _linear_declined_cases():
    x, w, b = _linear_args(torch.float32, requires_grad=False)
    return {
        "tensor subclass input": ((x.as_subclass(_Subclass), w, b, "auto"), None),
        "tensor subclass weight": ((x, w.as_subclass(_Subclass), b, "auto"), None),
        "list input": ((x.tolist(), w, b, "auto"), None),
        "1-D input": ((x[0], w, b, "auto"), None),
        "3-D input": ((x.unsqueeze(0), w, b, "auto"), None),
        "float16 input": ((x.half(), w.half(), b.half(), "auto"), None),
        "0-d bias": ((x, w, b[0], "auto"), None),
        "meta weight": ((x, w.to("meta"), b, "auto"), None),
        "reference backend": ((x, w, b, "reference"), None),
        "non-str backend": ((x, w, b, None), None),
        "torch function mode": ((x, w, b, "auto"), _Recorder),
        "cpu autocast": ((x, w, b, "auto"), lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    }


@pytest.mark.parametrize("case", list(_linear_declined_cases()))
def test_linear_entry_declines(case):
    args, context = _linear_declined_cases()[case]
    if context is None:
        assert _linear_entry()(*args) is None
    else:
        with context():
            assert _linear_entry()(*args) is None


def _conv_declined_cases():
    x, w, b = _conv_args(dtype=torch.float32, requires_grad=False)
    plain = (1, 0, 1, 2, None, 0, False, "auto")

    def but(i, value):
        rest = list(plain)
        rest[i] = value
        return (x, w, b, *rest)

    return {
        "tensor subclass input": (x.as_subclass(_Subclass), w, b, *plain),
        "2-D input": (x[0, 0], w, b, *plain),
        "5-D input": (x.unsqueeze(0), w, b, *plain),
        "bfloat16 input": (x.bfloat16(), w.bfloat16(), b.bfloat16(), *plain),
        "meta bias": (x, w, b.to("meta"), *plain),
        "string padding": but(1, "same"),
        "numpy int stride": but(0, np.int64(1)),
        "0-d tensor dilation": but(2, torch.tensor(1)),
        "bool stride": but(0, True),
        "three-int pool window": but(3, (2, 2, 2)),
        "float in a pair": but(4, (2, 2.0)),
        "int beyond int64": but(5, 2**70),
        "int ceil_mode": but(6, 1),
        "triton backend": but(7, "triton"),
    }


@pytest.mark.parametrize("case", list(_conv_declined_cases()))
def test_conv_entry_declines(case):
    assert _conv_entry()(*_conv_declined_cases()[case]) is None


def test_entries_decline_under_tracing_and_transforms():
    x, w, b = _linear_args(torch.float32, requires_grad=False)
    cx, cw, cb = _conv_args(dtype=torch.float32, requires_grad=False)
    seen = []

    def f(x):
        seen.append(_linear_entry()(x, w, b, "auto"))
        seen.append(_conv_entry()(cx, cw, cb, 1, 0, 1, 2, None, 0, False, "auto"))
        return x * 2

    torch.jit.trace(f, (x,), check_trace=False)
    torch.func.vmap(f)(x.unsqueeze(0).expand(2, -1, -1))
    torch.func.grad(lambda x: f(x).sum())(x)
    assert seen == [None] * 6


def test_entry_errors_are_the_ops(monkeypatch):
    # Values of the right form reach the op, whose C++ checks raise what the Python path raises.
    x, w, b = _linear_args(torch.float32, requires_grad=False)
    cx, cw, cb = _conv_args(dtype=torch.float32, requires_grad=False)
    calls = {
        "linear": (lambda: lo.linear_relu(x, w[:, :6], b), "input has 7 features but weight expects 6"),
        "conv stride": (lambda: lo.conv2d_relu_maxpool2d(cx, cw, cb, stride=0), None),
        "conv channels": (lambda: lo.conv2d_relu_maxpool2d(cx, cw[:, :2], cb), None),
    }
    for name, (call, message) in calls.items():
        with pytest.raises(ValueError) as direct:
            call()
        with monkeypatch.context() as m:
            m.setattr(linear_api, "_direct_linear_relu", None)
            m.setattr(conv_api, "_direct_conv2d_relu_maxpool2d", None)
            with pytest.raises(ValueError) as python_path:
                call()
        assert str(direct.value) == str(python_path.value), name
        if message is not None:
            assert message in str(direct.value)
    with pytest.raises(TypeError, match="expected 4 arguments"):
        _linear_entry()(x, w, b)


def test_entries_carry_tangents():
    import torch.autograd.forward_ad as fwAD
    x, w, b = _linear_args(requires_grad=False)
    cx, cw, cb = _conv_args(requires_grad=False)
    tx, tcx = torch.randn_like(x), torch.randn_like(cx)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(_linear_entry()(fwAD.make_dual(x, tx), w, b, "auto")).tangent
        want = fwAD.unpack_dual(torch.relu(torch.nn.functional.linear(fwAD.make_dual(x, tx), w, b))).tangent
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        got = fwAD.unpack_dual(_conv_entry()(fwAD.make_dual(cx, tcx), cw, cb, 1, 0, 1, 2, None, 0, False,
                                             "auto")).tangent
        want = fwAD.unpack_dual(torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(
            fwAD.make_dual(cx, tcx), cw, cb)), 2)).tangent
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_entries_take_the_plain_form_of_the_declined_cases():
    # The cases above decline because of the one thing each changes, not because the base call does.
    x, w, b = _linear_args(torch.float32, requires_grad=False)
    assert torch.equal(_linear_entry()(x, w, b, "auto"), OPS.linear_relu(x, w, b))
    cx, cw, cb = _conv_args(dtype=torch.float32, requires_grad=False)
    got = _conv_entry()(cx, cw, cb, 1, 0, 1, 2, None, 0, False, "auto")
    assert torch.equal(got, OPS.conv2d_relu_maxpool2d(cx, cw, cb, [1, 1], [0, 0], [1, 1], [2, 2], [2, 2], False)[0])
