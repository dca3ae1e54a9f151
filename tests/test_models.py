"""LightNet (fused) and StockLightNet: names, shapes and order of parameters, seeded init, state
dicts both ways (also with the seed tutorial's own class), forward/backward parity, unbatched input."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import lightnet_ops as lo
from conftest import autograd_node_names, env_vars as env, ran_fused_backwards, results_per_thread_count
from seed_model import SeedLightNet  # the seed tutorial's class, verbatim


SEED_PARAMS = [
    ("conv1.weight", (6, 1, 3, 3)), ("conv1.bias", (6,)),
    ("conv2.weight", (16, 6, 3, 3)), ("conv2.bias", (16,)),
    ("fc1.weight", (120, 576)), ("fc1.bias", (120,)),
    ("fc2.weight", (84, 120)), ("fc2.bias", (84,)),
    ("fc3.weight", (10, 84)), ("fc3.bias", (10,)),
]

FUSED_BACKENDS = ["cpu", "reference"]


def _seeded(cls, seed=1234, **kw):
    torch.manual_seed(seed)
    return cls(**kw)


@pytest.mark.parametrize("cls", [lo.LightNet, lo.StockLightNet, SeedLightNet])
def test_parameter_names_shapes_order(cls):
    net = cls()
    assert [(n, tuple(p.shape)) for n, p in net.named_parameters()] == SEED_PARAMS
    assert list(net.state_dict().keys()) == [n for n, _ in SEED_PARAMS]
    assert [n for n, _ in net.named_children()] == ["conv1", "conv2", "fc1", "fc2", "fc3"]


def test_submodule_types():
    net = lo.LightNet()
    assert isinstance(net.conv1, lo.Conv2dReLUMaxPool2d) and isinstance(net.conv2, lo.Conv2dReLUMaxPool2d)
    assert isinstance(net.fc1, lo.LinearReLU) and isinstance(net.fc2, lo.LinearReLU)
    assert type(net.fc3) is nn.Linear


@pytest.mark.parametrize("seed", [0, 7])
def test_seeded_init_identical(seed):
    fused, stock, seed_net = _seeded(lo.LightNet, seed), _seeded(lo.StockLightNet, seed), _seeded(SeedLightNet, seed)
    for (n, a), (_, b), (_, c) in zip(fused.named_parameters(), stock.named_parameters(), seed_net.named_parameters()):
        assert torch.equal(a, b), n
        assert torch.equal(a, c), n
    # a different seed gives different weights (the comparison above is not vacuous)
    other = _seeded(lo.LightNet, seed + 1)
    assert not torch.equal(other.conv1.weight, fused.conv1.weight)


@pytest.mark.parametrize("src_cls,dst_cls", [
    (lo.StockLightNet, lo.LightNet), (lo.LightNet, lo.StockLightNet),
    (SeedLightNet, lo.LightNet), (lo.LightNet, SeedLightNet),
])
def test_state_dict_loads_both_ways(src_cls, dst_cls):
    src, dst = _seeded(src_cls, 1), _seeded(dst_cls, 2)
    assert not torch.equal(src.fc1.weight, dst.fc1.weight)
    dst.load_state_dict(src.state_dict(), strict=True)
    for (n, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), n
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(dst(x), src(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_forward_backward_parity_float64(backend):
    stock = _seeded(lo.StockLightNet, 3).double()
    fused = _seeded(lo.LightNet, 3, backend=backend).double()
    x = torch.randn(5, 1, 32, 32, dtype=torch.float64)
    xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yf = stock(xs), fused(xf)
    torch.testing.assert_close(yf, ys, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(ys)
    ys.backward(g)
    yf.backward(g)
    torch.testing.assert_close(xf.grad, xs.grad, rtol=1e-10, atol=1e-12)
    for (n, ps), (_, pf) in zip(stock.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(pf.grad, ps.grad, rtol=1e-10, atol=1e-12, msg=n)
    # the fused model really ran the fused ops (hand-written backward in the autograd graph)
    names = autograd_node_names(yf)
    assert ran_fused_backwards(names), names
    assert "MaxPool2DWithIndicesBackward0" in autograd_node_names(ys)


def test_matches_seed_class_batched():
    seed_net = _seeded(SeedLightNet, 4)
    fused = _seeded(lo.LightNet, 4)
    x = torch.randn(6, 1, 32, 32)
    torch.testing.assert_close(fused(x), seed_net(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [lo.LightNet, lo.StockLightNet])
def test_unbatched_input(cls):
    net = _seeded(cls, 5)
    x = torch.randn(1, 32, 32)
    y = net(x)
    assert y.shape == (10,)
    torch.testing.assert_close(y, net(x.unsqueeze(0))[0], rtol=1e-6, atol=1e-7)
    y.sum().backward()
    assert net.conv1.weight.grad is not None and net.conv1.weight.grad.abs().sum() > 0


def test_unbatched_fused_equals_stock():
    x = torch.randn(1, 32, 32, dtype=torch.float64)
    y_f = _seeded(lo.LightNet, 6).double()(x)
    y_s = _seeded(lo.StockLightNet, 6).double()(x)
    torch.testing.assert_close(y_f, y_s, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("in_channels,num_classes,input_size", [(3, 5, 28), (2, 7, 10), (1, 10, 41)])
def test_other_configurations(in_channels, num_classes, input_size):
    fused = _seeded(lo.LightNet, 8, in_channels=in_channels, num_classes=num_classes, input_size=input_size).double()
    stock = _seeded(lo.StockLightNet, 8, in_channels=in_channels, num_classes=num_classes,
                    input_size=input_size).double()
    x = torch.randn(2, in_channels, input_size, input_size, dtype=torch.float64)
    y = fused(x)
    assert y.shape == (2, num_classes)
    torch.testing.assert_close(y, stock(x), rtol=1e-10, atol=1e-12)


def test_too_small_input_size_raises():
    with pytest.raises(ValueError, match="input_size"):
        lo.LightNet(input_size=9)
    with pytest.raises(ValueError, match="input_size"):
        lo.StockLightNet(input_size=9)


def test_backend_is_passed_to_modules():
    net = lo.LightNet(backend="reference")
    assert {m.backend for m in (net.conv1, net.conv2, net.fc1, net.fc2)} == {"reference"}
    with pytest.raises(ValueError, match="unknown backend"):
        lo.LightNet(backend="nope")(torch.randn(1, 1, 32, 32))


def test_batch_size_zero():
    net = lo.LightNet()
    y = net(torch.randn(0, 1, 32, 32))
    assert y.shape == (0, 10)


# ---- forward in one call (convnet_forward) -----------------------------------------------------

needs_extension = pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")


def _layer_by_layer(net: lo.LightNet) -> lo.LightNet:
    """The same module, made to run forward layer by layer (a hook on a child rules out one call)."""
    net.conv1.register_forward_pre_hook(lambda m, args: None)
    return net


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_one_call_forward_equals_layer_by_layer(dtype, batch):
    # convnet_forward calls the same ops with the same arguments: outputs, gradients and the
    # autograd graph's fused nodes are those of the layer-by-layer forward, bit for bit (inference:
    # see below).
    one = _seeded(lo.LightNet, 5, backend="cpu").to(dtype)
    layers = _layer_by_layer(_seeded(lo.LightNet, 5, backend="cpu").to(dtype))
    x = torch.randn(batch, 1, 32, 32, dtype=dtype)
    assert one._one_call_args(x) is not None and layers._one_call_args(x) is None
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = one(x1), layers(x2)
    assert torch.equal(y1, y2)
    names = autograd_node_names(y1)
    assert ran_fused_backwards(names) and names == autograd_node_names(y2), names
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(x1.grad, x2.grad)
    for (n, p1), (_, p2) in zip(one.named_parameters(), layers.named_parameters()):
        assert torch.equal(p1.grad, p2.grad), n
    with torch.no_grad():
        # In inference the last stage (a plain linear) runs the project's GEMMs where they beat BLAS
        # (float32, csrc/cpu/linear_relu.cpp): the same products, summed in another order.
        if dtype == torch.float64:
            assert torch.equal(one(x), layers(x))
        else:
            torch.testing.assert_close(one(x), layers(x), rtol=1e-5, atol=1e-5)


@needs_extension
def test_one_call_forward_matches_stock_in_float64_with_second_derivatives_and_tangents():
    stock = _seeded(lo.StockLightNet, 6).double()
    fused = _seeded(lo.LightNet, 6, backend="cpu").double()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64, requires_grad=True)
    assert fused._one_call_args(x) is not None
    torch.testing.assert_close(fused(x), stock(x), rtol=1e-10, atol=1e-12)
    # double backward through the one-call forward (the C++ ops' differentiable backward)
    (gf,) = torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)
    (gs,) = torch.autograd.grad(stock(x).square().sum(), x, create_graph=True)
    torch.testing.assert_close(torch.autograd.grad(gf.sum(), x)[0], torch.autograd.grad(gs.sum(), x)[0],
                               rtol=1e-9, atol=1e-11)
    # forward-mode AD (the C++ ops' tangents)
    import torch.autograd.forward_ad as fwAD
    t = torch.randn_like(x)
    with fwAD.dual_level():
        out_f = fwAD.unpack_dual(fused(fwAD.make_dual(x.detach(), t))).tangent
        out_s = fwAD.unpack_dual(stock(fwAD.make_dual(x.detach(), t))).tangent
    torch.testing.assert_close(out_f, out_s, rtol=1e-9, atol=1e-11)
    # ... also where no gradient is recorded: the tangent alone keeps the last stage on at::linear
    args = fused._one_call_args(x)
    with torch.no_grad(), fwAD.dual_level():
        out_f = fwAD.unpack_dual(torch.ops.lightnet_ops.convnet_forward(fwAD.make_dual(x.detach(), t), *args)).tangent
    torch.testing.assert_close(out_f, out_s, rtol=1e-9, atol=1e-11)


@needs_extension
def test_one_call_forward_only_where_nothing_needs_the_layers():
    net = lo.LightNet(backend="cpu")
    x = torch.randn(2, 1, 32, 32)
    assert net._one_call_args(x) is not None
    assert net._one_call_args(x[0]) is None                                   # unbatched: the modules' path
    assert net._one_call_args(x.double()) is not None                        # the ops check dtypes themselves
    assert lo.LightNet(backend="reference")._one_call_args(x) is None        # Python backends record their own autograd
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net._one_call_args(x) is None
    hooked = lo.LightNet(backend="cpu")
    hooked.fc3.register_forward_hook(lambda m, args, out: out * 2)
    assert hooked._one_call_args(x) is None
    stock = _seeded(lo.StockLightNet, 2)
    fused = _seeded(lo.LightNet, 2, backend="cpu")
    fused.fc3.register_forward_hook(lambda m, args, out: out * 2)
    torch.testing.assert_close(fused(x), stock(x) * 2, rtol=1e-5, atol=1e-6)  # the hook ran
    replaced = lo.LightNet(backend="cpu")
    replaced.fc2 = nn.Sequential(nn.Linear(120, 84), nn.ReLU())
    assert replaced._one_call_args(x) is None
    on_meta = lo.LightNet(backend="cpu")
    on_meta.fc1.to("meta")
    assert on_meta._one_call_args(x) is None
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: None)
    try:
        assert net._one_call_args(x) is None
    finally:
        handle.remove()
    assert net._one_call_args(x) is not None
    # torch.func transforms and tracing see the per-layer Python
    seen = []
    torch.func.vmap(lambda s: seen.append(net._one_call_args(s.unsqueeze(0))) or s)(x)
    assert seen == [None]


@needs_extension
def test_one_call_forward_errors_like_the_layers():
    net = lo.LightNet(backend="cpu")
    x = torch.randn(2, 1, 28, 28)  # 28x28 flattens to 400 features, fc1 expects 576
    with pytest.raises(ValueError, match="input has 400 features but weight expects 576"):
        net(x)
    with pytest.raises(ValueError, match="input has 400 features but weight expects 576"):
        _layer_by_layer(net)(x)


@needs_extension
def test_convnet_forward_passes_opcheck():
    net = _seeded(lo.LightNet, 8, backend="cpu").double()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64, requires_grad=True)
    args = (x, *net._one_call_args(x))
    torch.library.opcheck(torch.ops.lightnet_ops.convnet_forward.default, args)


def _direct_entry():
    from lightnet_ops import _C

    return _C.convnet_forward


@needs_extension
@pytest.mark.parametrize("entry", ["op", "direct"])
def test_convnet_forward_rejects_malformed_stacks(entry):
    net = lo.LightNet(backend="cpu")
    x = torch.randn(2, 1, 32, 32)
    conv_w, conv_b, params, lin_w, lin_b = net._one_call_args(x)
    op = torch.ops.lightnet_ops.convnet_forward if entry == "op" else _direct_entry()
    with pytest.raises(ValueError, match="13 parameters per conv stage"):
        op(x, conv_w, conv_b, params[:-1], lin_w, lin_b)
    with pytest.raises(ValueError, match="at least one linear stage"):
        op(x, conv_w, conv_b, params, [], [])
    with pytest.raises(ValueError, match="expected 4-D"):
        op(x[0], conv_w, conv_b, params, lin_w, lin_b)


@needs_extension
def test_direct_entry_is_the_op_without_the_boxed_call():
    # LightNet's forward calls the extension module's entry (csrc/ops.cpp), which runs the op's
    # kernel: the same result and autograd graph as torch.ops, bit for bit; its own argument
    # errors are TypeErrors that name the argument.
    from lightnet_ops import models

    direct = _direct_entry()
    assert models._convnet_forward() is direct
    net = _seeded(lo.LightNet, 9, backend="cpu").double()
    x = torch.randn(3, 1, 32, 32, dtype=torch.float64, requires_grad=True)
    args = net._one_call_args(x)
    y1, y2 = direct(x, *args), torch.ops.lightnet_ops.convnet_forward(x, *args)
    assert torch.equal(y1, y2) and autograd_node_names(y1) == autograd_node_names(y2)
    g1 = torch.autograd.grad(y1.sum(), [x, *net.parameters()])
    g2 = torch.autograd.grad(y2.sum(), [x, *net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    conv_w, conv_b, params, lin_w, lin_b = args
    with pytest.raises(TypeError, match="each conv weight must be a Tensor, got str"):
        direct(x, ["w", conv_w[1]], conv_b, params, lin_w, lin_b)
    with pytest.raises(TypeError, match="conv_params must hold ints, got float"):
        direct(x, conv_w, conv_b, [1.0, *params[1:]], lin_w, lin_b)
    with pytest.raises(TypeError, match="linear_biases must be a list or tuple"):
        direct(x, conv_w, conv_b, params, lin_w, None)
    with pytest.raises(TypeError, match="input must be a Tensor, got NoneType"):
        direct(None, conv_w, conv_b, params, lin_w, lin_b)


@needs_extension
def test_one_call_forward_takes_plain_parameters_only():
    # A Parameter subclass may define __torch_function__, which the direct entry does not consult:
    # such a model runs layer by layer (where torch.ops and the functional layer honour it).
    class TaggedParameter(nn.Parameter):
        pass

    net = lo.LightNet(backend="cpu")
    x = torch.randn(2, 1, 32, 32)
    assert net._one_call_args(x) is not None
    net.fc2.weight = TaggedParameter(net.fc2.weight.detach().clone())
    assert net._one_call_args(x) is None
    stock = lo.StockLightNet()
    stock.load_state_dict(net.state_dict())
    torch.testing.assert_close(net(x), stock(x), rtol=1e-5, atol=1e-6)


# ---- inference in one parallel region (csrc/convnet.cpp) ---------------------------------------

def _last_run() -> str:
    return torch.ops.lightnet_ops._cpu_convnet_last_run()


def _per_op(net: lo.LightNet, x: torch.Tensor) -> torch.Tensor:
    """LightNet's inference forward as convnet_forward's per-op path calls the ops."""
    ops = torch.ops.lightnet_ops

    def conv(m, x):
        return ops.conv2d_relu_maxpool2d(x, m.weight, m.bias, [1, 1], [0, 0], [1, 1], [2, 2], [2, 2], False,
                                         [0, 0], False)[0]

    h = conv(net.conv2, conv(net.conv1, x)).flatten(1)
    h = ops.linear_relu(ops.linear_relu(h, net.fc1.weight, net.fc1.bias), net.fc2.weight, net.fc2.bias)
    return ops._linear_no_grad(h, net.fc3.weight, net.fc3.bias)


def _assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    """The same bits (a signed zero or a NaN's payload included)."""
    bits = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


# The region takes a stack only where every linear layer runs the project's GEMMs, which the rule
# picks for float32 on AVX-512 CPUs (fewer shapes on Intel's); forced, they run on any CPU.
REGION_GEMMS = ["native", "dot"]


@needs_extension
@pytest.mark.parametrize("gemm", [None, *REGION_GEMMS])
@pytest.mark.parametrize("batch", [1, 2, 3, 8, 33, 70])
def test_one_region_inference_is_the_per_op_forward_bitwise(batch, gemm):
    # Each thread runs every layer on its own slice of the samples, with the kernels (and kernel
    # choices, made for the whole batch) of the ops: the result is theirs bit for bit, whatever the
    # thread count, the slices (33 and 70 cross the 32-sample steps) or the non-finite samples that
    # the Winograd conv hands to its direct kernel. Unforced (None), the rule decides whether the
    # region runs on this CPU; the result is the per-op forward's either way.
    net = _seeded(lo.LightNet, 11, backend="cpu").eval()
    x = torch.randn(batch, 1, 32, 32)
    x[0, 0, 3, 4] = float("nan")
    x[-1, 0, 10, 10] = float("inf")
    overrides = {"LIGHTNET_OPS_CPU_GEMM": gemm} if gemm else {}
    with torch.no_grad(), env(**overrides):
        expected = _per_op(net, x)
        outs = results_per_thread_count(lambda: (net(x), _last_run()))
        for out, run in outs:
            assert run == "one-region" or (gemm is None and run == "per-op"), run
            _assert_bitwise(out, expected)
        with torch.inference_mode():
            _assert_bitwise(net(x), expected)
            assert _last_run() == outs[0][1]
        with env(LIGHTNET_OPS_CPU_CONVNET="per-op"):
            _assert_bitwise(net(x), expected)
            assert _last_run() == "per-op"


@needs_extension
def test_one_region_inference_leaves_large_layers_of_small_batches_to_the_ops():
    # With fewer samples than threads, a linear layer an op would split across threads (from about
    # 2^18 multiply-adds) sends the stack per op; from as many samples as threads it runs in the
    # region.
    net = _seeded(lo.LightNet, 16, backend="cpu", input_size=64).eval()  # fc1: 3136 -> 120
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad(), env(LIGHTNET_OPS_CPU_GEMM="dot"):
        runs = results_per_thread_count(lambda: (net(x[:1]), _last_run(), net(x), _last_run()), (1, 2, 3))
        for threads, (one, run_one, two, run_two) in zip((1, 2, 3), runs):
            assert run_one == ("one-region" if threads == 1 else "per-op"), threads
            assert run_two == ("per-op" if threads == 3 else "one-region"), threads
            _assert_bitwise(one, _per_op(net, x[:1]))
            _assert_bitwise(two, _per_op(net, x))


@needs_extension
def test_one_region_inference_in_float64_with_the_project_gemms():
    # float64 linears run BLAS by the rule (per-op path); forced onto the project's GEMMs they can
    # run in the region too, with the same result as the ops.
    net = _seeded(lo.LightNet, 12, backend="cpu").double().eval()
    x = torch.randn(5, 1, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        net(x)
        assert _last_run() == "per-op"
        with env(LIGHTNET_OPS_CPU_GEMM="native"):
            expected = _per_op(net, x)
            _assert_bitwise(net(x), expected)
            assert _last_run() == "one-region"
        torch.testing.assert_close(expected, _seeded(lo.StockLightNet, 12).double()(x), rtol=1e-12, atol=1e-13)


@needs_extension
def test_one_region_inference_only_where_nothing_observes_the_ops():
    net = _seeded(lo.LightNet, 13, backend="cpu").eval()
    x = torch.randn(4, 1, 32, 32)
    args = net._one_call_args(x)
    op = torch.ops.lightnet_ops.convnet_forward
    with env(LIGHTNET_OPS_CPU_GEMM="native"):
        _only_where_nothing_observes(net, x, args, op)


def _only_where_nothing_observes(net, x, args, op):
    from torch.utils._python_dispatch import TorchDispatchMode
    import torch.autograd.forward_ad as fwAD

    with torch.no_grad():
        expected = _per_op(net, x)
    y = op(x, *args)  # grad mode, parameters requiring grad: the ops record autograd
    assert _last_run() == "per-op" and y.grad_fn is not None
    with torch.no_grad(), torch.profiler.profile() as prof:
        _assert_bitwise(op(x, *args), expected)
    assert _last_run() == "per-op"
    assert any("conv2d_relu_maxpool2d" in e.name for e in prof.events())

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Recorder() as rec:
        _assert_bitwise(op(x, *args), expected)
    assert _last_run() == "per-op" and any("linear_relu" in o for o in rec.ops), rec.ops
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        op(x, *args)
    assert _last_run() == "per-op"
    with torch.no_grad(), fwAD.dual_level():
        fwAD.unpack_dual(op(fwAD.make_dual(x, torch.randn_like(x)), *args))
    assert _last_run() == "per-op"
    conv_w, conv_b, params, lin_w, lin_b = args
    ceil_mode = list(params)
    ceil_mode[12] = 1  # conv1's ceil_mode (same shape on 30x30): the composite pool
    with torch.no_grad():
        op(x, conv_w, conv_b, ceil_mode, lin_w, lin_b)
        assert _last_run() == "per-op"
        with env(LIGHTNET_OPS_CPU_CONV_PATH="aten"):  # a conv the ATen path runs: not per sample
            op(x, *args)
            assert _last_run() == "per-op"
        with env(LIGHTNET_OPS_CPU_GEMM="blas"):  # a linear by BLAS
            op(x, *args)
            assert _last_run() == "per-op"
        op(x.transpose(2, 3), *args)  # a non-contiguous input
        assert _last_run() == "per-op"
        op(x, *args)
        assert _last_run() == "one-region"


@needs_extension
@pytest.mark.parametrize("bad", ["features", "channels", "dtype"])
def test_one_region_inference_errors_like_the_ops(bad):
    # What the region's preparation rejects runs per op, which raises the op's own error.
    net = lo.LightNet(backend="cpu").eval()
    x = {"features": torch.randn(2, 1, 28, 28),  # flattens to 400 features, fc1 expects 576
         "channels": torch.randn(2, 3, 32, 32),
         "dtype": torch.randn(2, 1, 32, 32, dtype=torch.float64)}[bad]
    args = net._one_call_args(torch.randn(2, 1, 32, 32))
    op = torch.ops.lightnet_ops.convnet_forward
    errors = []
    for mode in ("per-op", "one-region"):
        with torch.no_grad(), env(LIGHTNET_OPS_CPU_CONVNET=mode), pytest.raises((ValueError, TypeError)) as info:
            op(x, *args)
        errors.append((type(info.value), str(info.value).split("\n")[0]))
    assert errors[0] == errors[1], errors


# ---- _C.lightnet_forward: _one_call_args' checks in C++ (csrc/ops.cpp) --------------------------

def _agree(net, x) -> bool:
    """Asserts that the C++ entry takes the one call exactly where _one_call_args does, with the
    same result; returns whether it took it."""
    from lightnet_ops import _C

    out = _C.lightnet_forward(net, x)
    args = net._one_call_args(x)
    assert (out is None) == (args is None), (out is None, args is None)
    if out is not None:
        _assert_bitwise(out, torch.ops.lightnet_ops.convnet_forward(x, *args))
    return out is not None


@needs_extension
def test_lightnet_forward_entry_decides_like_one_call_args():
    from torch.overrides import TorchFunctionMode

    from lightnet_ops import _C
    from lightnet_ops.backend_registry import BackendUnavailableError, ReferenceFallbackWarning

    net = _seeded(lo.LightNet, 14, backend="cpu")
    x = torch.randn(3, 1, 32, 32)
    assert _agree(net, x)
    assert _agree(_seeded(lo.LightNet, 14).double(), x.double())
    # Other dtypes are left to Python: "auto" resolves them to the reference backend (no one call),
    # "cpu" to its error
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReferenceFallbackWarning)  # the fallback's notice
        assert not _agree(lo.LightNet().half(), x.half())
    half = lo.LightNet(backend="cpu").half()
    assert _C.lightnet_forward(half, x.half()) is None
    with pytest.raises(BackendUnavailableError, match="supports float32 and float64"):
        half(x.half())
    with torch.no_grad():
        assert _agree(net, x)
    assert not _agree(net, x[0]) and not _agree(net, x.to("meta"))
    assert not _agree(net, nn.Parameter(x))  # not exactly a Tensor
    assert not _agree(lo.LightNet(backend="reference"), x)
    class PassThrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    for ctx in (torch.autocast("cpu", dtype=torch.bfloat16), PassThrough()):
        with ctx:
            assert not _agree(net, x)
    seen = []
    torch.func.vmap(lambda s: seen.append(_agree(net, s.unsqueeze(0))) or s)(x)
    assert seen == [False]
    handle = nn.modules.module.register_module_forward_pre_hook(lambda m, args: None)
    try:
        assert not _agree(net, x)
    finally:
        handle.remove()
    for name in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        hooked = _seeded(lo.LightNet, 14, backend="cpu")
        getattr(hooked, name).register_forward_hook(lambda m, args, out: None)
        assert not _agree(hooked, x), name
        backward_hooked = _seeded(lo.LightNet, 14, backend="cpu")
        getattr(backward_hooked, name).register_full_backward_hook(lambda m, gi, go: None)
        assert not _agree(backward_hooked, x), name
        replaced = _seeded(lo.LightNet, 14, backend="cpu")
        setattr(replaced, name, nn.Identity())
        assert not _agree(replaced, x), name
    no_bias = _seeded(lo.LightNet, 14, backend="cpu")
    no_bias.fc1.bias = None
    no_bias.conv2.register_parameter("bias", None)
    assert _agree(no_bias, x)
    on_meta = _seeded(lo.LightNet, 14, backend="cpu")
    on_meta.fc2.to("meta")
    assert not _agree(on_meta, x)
    odd_ceil = _seeded(lo.LightNet, 14, backend="cpu")
    odd_ceil.conv1.ceil_mode = 0  # not a bool: the modules' path normalises it
    assert not _agree(odd_ceil, x)


@needs_extension
def test_lightnet_forward_entry_leaves_unusual_forms_to_python():
    # A value not in the form __init__ leaves it (a list for a pair) is left to _one_call_args,
    # which still takes the one call: same output as the stock model either way.
    from lightnet_ops import _C

    net = _seeded(lo.LightNet, 15, backend="cpu")
    stock = _seeded(lo.StockLightNet, 15)
    x = torch.randn(2, 1, 32, 32)
    net.conv1.stride = [1, 1]
    assert _C.lightnet_forward(net, x) is None and net._one_call_args(x) is not None
    torch.testing.assert_close(net(x), stock(x), rtol=1e-5, atol=1e-6)
