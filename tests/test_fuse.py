"""lo.fuse: module-style models (torchvision VGG11 / AlexNet, nn.Sequential stacks), functional
models (torch.fx rewrite), what must not be fused (hooks, parametrizations, shared intermediates),
state_dict round trips, inplace semantics (all or nothing), the pattern table.

Only the torchvision model tests need torchvision; they skip without it, the rest always run."""

from __future__ import annotations

import copy
import dataclasses
import importlib

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as prune

import lightnet_ops as lo
from seed_model import SeedLightNet  # the seed tutorial's class, verbatim
from lightnet_ops.fuse import FusedChain

fuse_mod = importlib.import_module("lightnet_ops.fuse")  # the module (lightnet_ops.fuse is the function)


def _torchvision():
    return pytest.importorskip("torchvision", reason="builds torchvision models")


def _max_abs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str = "") -> None:
    """max |actual - expected| <= rel * max |expected| (scale-aware: gradients of deep nets are tiny)."""
    assert actual.shape == expected.shape, name
    err = _max_abs(actual - expected)
    scale = max(_max_abs(expected), 1e-30)
    assert err <= rel * scale, f"{name}: max err {err:.3e} > {rel:.0e} * {scale:.3e}"


def _out_and_grads(model: nn.Module, x: torch.Tensor, g: torch.Tensor | None = None, keep: bool = True):
    """Output, input gradient and parameter gradients for the cotangent `g` (ones by default).
    keep=False hands over the .grad tensors instead of copying them (and clears .grad)."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(torch.ones_like(y) if g is None else g)
    grads = {n: p.grad.clone() if keep else p.grad for n, p in model.named_parameters()}
    if not keep:
        model.zero_grad(set_to_none=True)
    return y.detach(), x.grad.clone(), grads


def _build_float64(name: str) -> nn.Module:
    """torchvision model (weights=None) in eval mode, built on meta and filled straight in float64
    with U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (much faster than its float32 init + conversion)."""
    torchvision = _torchvision()
    with torch.device("meta"):
        model = getattr(torchvision.models, name)(weights=None)
    model = model.to(torch.float64).to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            p.uniform_(-(fan_in ** -0.5), fan_in ** -0.5, generator=gen)
    return model


def _fused_kinds(model) -> list[str]:
    return [c.kind for c in model.fused_chains]


# ---------------------------------------------------------------------------------------------
# torchvision models (eval mode, float64 so that a flipped pool argmax cannot hide in tolerance)


@pytest.mark.parametrize("name,size,expect", [
    # vgg11: 8 convs, 5 followed by a pool (the others are Conv->ReLU->Conv); 2 Linear->ReLU
    ("vgg11", 32, ["conv2d_relu_maxpool2d"] * 5 + ["linear_relu"] * 2),
    # alexnet: pools of window 3 stride 2 after convs 1, 2 and 5; 2 Linear->ReLU
    ("alexnet", 64, ["conv2d_relu_maxpool2d"] * 3 + ["linear_relu"] * 2),
])
def test_torchvision_fused_matches_original(name, size, expect):
    model = _build_float64(name)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    g = torch.randn(2, 1000, dtype=torch.float64)
    y0, gx0, grads0 = _out_and_grads(model, x, g, keep=False)
    keys0 = list(model.state_dict().keys())
    # inplace keeps memory down (VGG11 has 133M parameters): the fused model shares the Parameters
    fused = lo.fuse(model, inplace=True)
    assert fused is model
    assert _fused_kinds(fused) == expect
    assert list(fused.state_dict().keys()) == keys0
    n_fused = sum(isinstance(m, (lo.Conv2dReLUMaxPool2d, lo.LinearReLU)) for m in fused.modules())
    assert n_fused == len(expect)
    y1, gx1, grads1 = _out_and_grads(fused, x, g, keep=False)
    assert _max_abs(y0) > 0 and all(_max_abs(grads0[n]) > 0 for n in grads0)  # nothing vacuous
    assert_close_rel(y1, y0, 1e-10, "output")
    assert_close_rel(gx1, gx0, 1e-10, "input grad")
    assert grads1.keys() == grads0.keys()
    for n in grads0:
        assert_close_rel(grads1[n], grads0[n], 1e-10, n)


def test_alexnet_structure_and_names():
    model = _torchvision().models.alexnet(weights=None)
    fused = lo.fuse(model)
    f = fused.features
    assert isinstance(f[0], lo.Conv2dReLUMaxPool2d) and isinstance(f[1], nn.Identity) and isinstance(f[2], nn.Identity)
    assert f[0].pool_kernel_size == (3, 3) and f[0].pool_stride == (2, 2)
    assert f[0].stride == (4, 4) and f[0].padding == (2, 2)
    assert type(f[6]) is nn.Conv2d and type(f[7]) is nn.ReLU  # Conv->ReLU->Conv stays stock
    assert isinstance(fused.classifier[1], lo.LinearReLU) and isinstance(fused.classifier[3], nn.Dropout)
    assert fused.fused_chains[0] == FusedChain("conv2d_relu_maxpool2d", ("features.0", "features.1", "features.2"),
                                               "module")


def test_float32_error_within_stock_error():
    """float32 module-style stack: |fused - ref64| <= k * |stock - ref64| + eps, outputs and grads."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Flatten(), nn.Linear(16 * 3 * 3, 32), nn.ReLU(), nn.Linear(32, 5),
    ).eval()
    fused = lo.fuse(model)
    assert len(fused.fused_chains) == 3
    ref = copy.deepcopy(model).double()
    x = torch.randn(4, 3, 28, 28)
    g = torch.randn(4, 5)
    y_r, gx_r, gr_r = _out_and_grads(ref, x.double(), g.double())
    y_s, gx_s, gr_s = _out_and_grads(model, x, g)
    y_f, gx_f, gr_f = _out_and_grads(fused, x, g)

    def check(f, s, r, name):
        err_f = _max_abs(f.double() - r)
        err_s = _max_abs(s.double() - r)
        assert err_f <= 8 * err_s + 1e-6 * max(_max_abs(r), 1e-12), f"{name}: fused {err_f:.2e}, stock {err_s:.2e}"

    check(y_f, y_s, y_r, "output")
    check(gx_f, gx_s, gx_r, "input grad")
    for n in gr_r:
        check(gr_f[n], gr_s[n], gr_r[n], n)


# ---------------------------------------------------------------------------------------------
# Functional (torch.fx) models: every spelling of the chain is recognised


class AllSpellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3)
        self.c2 = nn.Conv2d(4, 6, (3, 2), padding=1, dilation=(1, 2))
        self.c3 = nn.Conv2d(6, 6, 3, padding="same")
        self.w4 = nn.Parameter(torch.randn(5, 6, 1, 1) * 0.3)
        self.b4 = nn.Parameter(torch.randn(5) * 0.1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d((2, 3), stride=(1, 2))
        self.l1 = nn.Linear(5 * 3 * 1, 12)
        self.l2 = nn.Linear(12, 12)
        self.l3 = nn.Linear(12, 7)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), (2, 2))            # F.relu + F.max_pool2d tuple window
        x = self.pool(self.relu(self.c2(x)))                     # nn.ReLU(inplace) + nn.MaxPool2d
        x = F.max_pool2d(torch.relu(self.c3(x)), 3, stride=1)    # torch.relu, window 3 stride 1
        x = torch.max_pool2d(F.conv2d(x, self.w4, self.b4).relu(), 2)  # functional conv, Tensor.relu
        x = torch.flatten(x, 1)
        x = F.relu(self.l1(x), inplace=True)
        x = self.l2(x).relu_()
        return self.l3(x)


def test_functional_model_all_spellings():
    torch.manual_seed(2)
    model = AllSpellings().double()
    x = torch.randn(3, 2, 20, 24, dtype=torch.float64)
    fused = lo.fuse(model)
    assert isinstance(fused, fx.GraphModule)
    assert _fused_kinds(fused) == ["conv2d_relu_maxpool2d"] * 4 + ["linear_relu"] * 2
    code = fused.code
    assert "max_pool2d" not in code and "relu" not in code.replace("linear_relu", "").replace(
        "conv2d_relu_maxpool2d", "")
    assert isinstance(fused.c1, lo.Conv2dReLUMaxPool2d) and fused.c1.weight is not model.c1.weight
    assert fused.c3.padding == (1, 1)  # 'same' converted
    y0, gx0, g0 = _out_and_grads(model, x)
    y1, gx1, g1 = _out_and_grads(fused, x)
    assert_close_rel(y1, y0, 1e-10, "output")
    assert_close_rel(gx1, gx0, 1e-10, "input grad")
    for n in g0:
        assert_close_rel(g1[n], g0[n], 1e-10, n)


def test_stock_lightnet_is_traced_and_fused():
    torch.manual_seed(3)
    stock = lo.StockLightNet().double()
    fused = lo.fuse(stock)
    assert _fused_kinds(fused) == ["conv2d_relu_maxpool2d"] * 2 + ["linear_relu"] * 2
    x = torch.randn(4, 1, 32, 32, dtype=torch.float64)
    y0, _, g0 = _out_and_grads(stock, x)
    y1, _, g1 = _out_and_grads(fused, x)
    assert_close_rel(y1, y0, 1e-10, "output")
    for n in g0:
        assert_close_rel(g1[n], g0[n], 1e-10, n)


def test_untraceable_model_is_left_alone_with_a_note(capsys):
    model = SeedLightNet()
    fused = lo.fuse(model, verbose=True)
    assert fused.fused_chains == [] and type(fused) is SeedLightNet
    out = capsys.readouterr().out
    assert "could not trace" in out and "backend='lightnet_ops'" in out
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)


class Untraceable(nn.Module):
    """Top level defeats torch.fx; its children are a functional block and a Sequential."""

    def __init__(self):
        super().__init__()
        self.block = Block()
        self.head = nn.Sequential(nn.Linear(4 * 3 * 3, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        x = self.block(x)
        n = 1
        for s in x.size()[1:]:
            n *= s
        return self.head(x.view(-1, n))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)

    def forward(self, x):
        return F.max_pool2d(F.relu(self.conv(x)), 2)


def test_untraceable_top_level_fuses_children():
    torch.manual_seed(4)
    model = Untraceable().double()
    fused = lo.fuse(model)
    assert type(fused) is Untraceable
    assert isinstance(fused.block, fx.GraphModule) and isinstance(fused.block.conv, lo.Conv2dReLUMaxPool2d)
    assert isinstance(fused.head[0], lo.LinearReLU)
    assert sorted(c.names[0] for c in fused.fused_chains) == ["block.conv", "head.0"]
    assert list(fused.state_dict().keys()) == list(model.state_dict().keys())
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    y0, _, g0 = _out_and_grads(model, x)
    y1, _, g1 = _out_and_grads(fused, x)
    assert_close_rel(y1, y0, 1e-10, "output")
    for n in g0:
        assert_close_rel(g1[n], g0[n], 1e-10, n)


def test_conv_module_called_twice_uses_functional_form():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            a = F.max_pool2d(F.relu(self.conv(x)), 2)
            return self.conv(a)  # second call: plain conv, must stay a conv

    torch.manual_seed(5)
    model = Twice().double()
    fused = lo.fuse(model)
    assert len(fused.fused_chains) == 1
    assert type(fused.conv) is nn.Conv2d  # the module stays; the fused call reads its weight
    assert "conv2d_relu_maxpool2d" in fused.code
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y0, _, g0 = _out_and_grads(model, x)
    y1, _, g1 = _out_and_grads(fused, x)
    assert_close_rel(y1, y0, 1e-10, "output")
    for n in g0:
        assert_close_rel(g1[n], g0[n], 1e-10, n)


# ---------------------------------------------------------------------------------------------
# Must not be fused


class SkipConnection(nn.Module):
    """The conv output is used twice (pool(relu(y)) + pool(y)); the second chain is fusable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        z = F.max_pool2d(F.relu(y), 2) + F.max_pool2d(y, 2)
        return F.max_pool2d(F.relu(self.conv2(z)), 2)


class SecondConsumer(nn.Module):
    """The ReLU output feeds the pool and a second consumer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        r = F.relu(self.conv(x))
        p = F.max_pool2d(r, 2)
        h = self.fc(p.mean((2, 3)) + r.mean((2, 3)))
        return F.relu(h) + h  # the linear output is used twice: Linear->ReLU not fusable either


class InplaceAlias(nn.Module):
    """relu_ mutates the conv output in place and the pool reads the (aliased) conv output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        F.relu(y, inplace=True)
        return F.max_pool2d(y, 2)


def _seq(*mods):
    return nn.Sequential(*mods)


NOT_FUSABLE = {
    "groups2": lambda: _seq(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(), nn.MaxPool2d(2)),
    "pool_dilation": lambda: _seq(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.MaxPool2d(2, dilation=2)),
    "padding_mode": lambda: _seq(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.MaxPool2d(2)),
    "dropout_between": lambda: _seq(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Dropout(0.0), nn.MaxPool2d(2)),
    "no_pool": lambda: _seq(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)),
    "relu6": lambda: _seq(nn.Conv2d(4, 4, 3), nn.ReLU6(), nn.MaxPool2d(2)),
    "avgpool": lambda: _seq(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.AvgPool2d(2)),
}


@pytest.mark.parametrize("name", sorted(NOT_FUSABLE))
def test_sequential_not_fused(name):
    torch.manual_seed(6)
    model = NOT_FUSABLE[name]()
    fused = lo.fuse(model)
    assert fused.fused_chains == []
    assert [type(m) for m in fused] == [type(m) for m in model]
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)


def test_unsupported_chains_report_reason():
    fused = lo.fuse(NOT_FUSABLE["groups2"]())
    assert len(fused.skipped_chains) == 1 and "groups=2" in fused.skipped_chains[0].reason
    fused = lo.fuse(NOT_FUSABLE["pool_dilation"]())
    assert "dilation" in fused.skipped_chains[0].reason


@pytest.mark.parametrize("pool", [nn.MaxPool2d(3, 2, padding=1), nn.MaxPool2d(2, ceil_mode=True),
                                  nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_padded_and_ceil_mode_pools_are_fused_with_stock_results(pool, dtype):
    torch.manual_seed(6)
    model = _seq(nn.Conv2d(4, 4, 3), nn.ReLU(), pool).to(dtype)
    fused = lo.fuse(model)
    assert len(fused.fused_chains) == 1 and isinstance(fused[0], lo.Conv2dReLUMaxPool2d)
    assert (fused[0].pool_padding, fused[0].ceil_mode) == (tuple(nn.modules.utils._pair(pool.padding)), pool.ceil_mode)
    x = torch.randn(2, 4, 10, 11, dtype=dtype, requires_grad=True)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused(x), model(x), **tol)
    traced = lo.fuse(torch.fx.symbolic_trace(model))  # the graph pass takes them too
    torch.testing.assert_close(traced(x), model(x), **tol)


def test_module_with_hook_not_fused():
    model = _seq(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    fused = lo.fuse(model)
    assert fused.fused_chains == [] and "hooks" in fused.skipped_chains[0].reason
    fused(torch.randn(1, 4, 8, 8))
    assert seen == [torch.Size([1, 4, 6, 6])]


@pytest.mark.parametrize("cls,n_fused", [(SkipConnection, 1), (SecondConsumer, 0), (InplaceAlias, 0)])
def test_functional_intermediate_used_elsewhere_not_fused(cls, n_fused):
    torch.manual_seed(7)
    model = cls().double()
    fused = lo.fuse(model)
    assert len(fused.fused_chains) == n_fused
    if cls is SkipConnection:
        assert fused.fused_chains[0].names[0] == "conv2"
        assert type(fused.conv) is nn.Conv2d
    if cls is not InplaceAlias:  # there the pool reads the conv output: no chain in the graph at all
        # each left-alone chain is reported, naming the intermediate that has another consumer
        assert fused.skipped_chains and all("consumers" in c.reason for c in fused.skipped_chains)
    else:
        assert type(fused) is cls  # nothing fused: the model keeps its class
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y0, _, g0 = _out_and_grads(model, x)
    y1, _, g1 = _out_and_grads(fused, x)
    assert_close_rel(y1, y0, 1e-10, "output")
    for n in g0:
        assert_close_rel(g1[n], g0[n], 1e-10, n)


def test_functional_pools_with_padding_fused_dilated_skipped():
    class M(nn.Module):
        def __init__(self, **pool):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.pool = pool

        def forward(self, x):
            return F.max_pool2d(F.relu(self.conv(x)), 2, **self.pool)

    x = torch.randn(2, 3, 9, 9)
    padded = M(padding=1)
    fused = lo.fuse(padded)
    assert len(fused.fused_chains) == 1
    torch.testing.assert_close(fused(x), padded(x))
    fused = lo.fuse(M(dilation=2))
    assert fused.fused_chains == [] and "dilation" in fused.skipped_chains[0].reason


# ---------------------------------------------------------------------------------------------
# state dicts, inplace, options


def _vggish():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, bias=False), nn.ReLU(), nn.Conv2d(6, 6, 1), nn.ReLU(), nn.MaxPool2d(2, 1),
        nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(6 * 3 * 3, 10), nn.ReLU(), nn.Dropout(), nn.Linear(10, 2),
    )


@pytest.mark.parametrize("make", [_vggish, lo.StockLightNet, AllSpellings])
def test_state_dict_round_trip(make):
    torch.manual_seed(8)
    a, b = make(), make()  # different weights
    fused_b = lo.fuse(b)
    assert fused_b.fused_chains
    assert set(fused_b.state_dict().keys()) == set(a.state_dict().keys())
    # stock checkpoint -> fused model
    fused_b.load_state_dict(a.state_dict(), strict=True)
    for k, v in a.state_dict().items():
        assert torch.equal(fused_b.state_dict()[k], v), k
    # fused checkpoint -> stock model
    c = make()
    c.load_state_dict(fused_b.state_dict(), strict=True)
    for k, v in a.state_dict().items():
        assert torch.equal(c.state_dict()[k], v), k


def test_state_dict_keys_kept_for_unused_buffers():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.spare = nn.Linear(3, 3)  # never called in forward
            self.register_buffer("step", torch.tensor(3))

        def forward(self, x):
            return F.max_pool2d(F.relu(self.conv(x)), 2)

    model = WithUnused()
    fused = lo.fuse(model)
    assert isinstance(fused, fx.GraphModule) and len(fused.fused_chains) == 1
    assert set(fused.state_dict().keys()) == set(model.state_dict().keys())
    model.load_state_dict(fused.state_dict())


def test_not_inplace_leaves_original_untouched():
    torch.manual_seed(9)
    model = _vggish()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = [type(m) for m in model]
    rng = torch.get_rng_state()
    fused = lo.fuse(model)
    assert torch.equal(torch.get_rng_state(), rng)  # fusing draws no random numbers
    assert fused is not model and [type(m) for m in model] == types_before
    assert not hasattr(model, "fused_chains")
    assert fused[0].weight is not model[0].weight
    # training the fused copy does not touch the original
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    fused(torch.randn(2, 3, 14, 14)).sum().backward()
    opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(fused[0].weight, model[0].weight)


def test_inplace_modifies_model_and_keeps_parameters():
    torch.manual_seed(10)
    model = _vggish()
    params_before = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before fusing
    fused = lo.fuse(model, inplace=True)
    assert fused is model
    assert isinstance(model[0], lo.Conv2dReLUMaxPool2d) and isinstance(model[1], nn.Identity)
    assert isinstance(model[10], lo.LinearReLU)
    assert all(a is b for a, b in zip(model.parameters(), params_before))
    w = model[0].weight.detach().clone()
    model(torch.randn(2, 3, 14, 14)).sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight, w)  # the optimizer updated the fused module's weight


def test_inplace_on_traced_model_shares_parameters():
    model = lo.StockLightNet()
    fused = lo.fuse(model, inplace=True)
    assert isinstance(fused, fx.GraphModule)
    assert fused.conv1.weight is model.conv1.weight and fused.fc1.bias is model.fc1.bias


def test_training_flags_preserved():
    model = _vggish().eval()
    fused = lo.fuse(model)
    assert not fused.training and not fused[0].training and not fused[8].training
    model = lo.StockLightNet().eval()
    fused = lo.fuse(model)
    assert not fused.training and not fused.conv1.training


def test_backend_option_and_verbose(capsys):
    fused = lo.fuse(_vggish(), backend="reference", verbose=True)
    assert fused[0].backend == "reference" and fused[10].backend == "reference"
    out = capsys.readouterr().out
    assert "3 chain(s) fused" in out and "0 -> 1 -> 2" in out and "10 -> 11" in out
    assert "skipped" not in out
    with pytest.raises(ValueError, match="unknown backend"):
        lo.fuse(_vggish(), backend="bogus")
    with pytest.raises(TypeError):
        lo.fuse(lambda x: x)


def test_graph_module_input_and_idempotence():
    gm = fx.symbolic_trace(lo.StockLightNet())
    fused = lo.fuse(gm)
    assert len(fused.fused_chains) == 4
    again = lo.fuse(fused)
    assert again.fused_chains == []
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(again(x), gm(x), rtol=1e-5, atol=1e-6)


def test_unbatched_input_through_fused_sequential():
    model = _seq(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2))
    fused = lo.fuse(model)
    x = torch.randn(1, 10, 10)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Modules that are not plain (hooks, parametrizations, computed weights): skipped with the reason


class TwoOfEach(nn.Module):
    """Two Conv->ReLU->MaxPool chains and two Linear->ReLU chains, functional forward (graph pass)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3)
        self.l1 = nn.Linear(6 * 2 * 2, 8)
        self.l2 = nn.Linear(8, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(torch.relu(self.c2(x)), 2)
        x = F.relu(self.l1(x.flatten(1)))
        return F.relu(self.l2(x))


def _two_of_each_sequential():
    """The same network as an nn.Sequential (module pass)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(),
    )


# form -> (constructor, names of the first conv and linear (altered), names of the second ones)
FORMS = {
    "sequential": (_two_of_each_sequential, ("0", "7"), ("3", "9")),
    "graph": (TwoOfEach, ("c1", "l1"), ("c2", "l2")),
}


def _scale_grads(factor):
    return lambda module, grads: tuple(None if g is None else g * factor for g in grads)


def _as_buffer(m):
    w = m.weight.detach().clone()
    del m.weight
    m.register_buffer("weight", w)


# how to make a module non-plain -> a word the skip reason must contain. Every hook changes the
# values it sees, so dropping it would change the output or the gradients.
ALTERATIONS = {
    "parametrizations.weight_norm": (lambda m: torch.nn.utils.parametrizations.weight_norm(m),
                                     "parametrized (weight by _WeightNorm)"),
    "parametrizations.spectral_norm": (lambda m: torch.nn.utils.parametrizations.spectral_norm(m),
                                       "parametrized (weight by _SpectralNorm)"),
    "parametrizations.orthogonal": (lambda m: torch.nn.utils.parametrizations.orthogonal(m),
                                    "parametrized (weight by _Orthogonal)"),
    "utils.weight_norm (old)": (lambda m: torch.nn.utils.weight_norm(m), "forward pre-hook WeightNorm"),
    "utils.spectral_norm (old)": (lambda m: torch.nn.utils.spectral_norm(m), "forward pre-hook SpectralNorm"),
    "prune.l1_unstructured": (lambda m: prune.l1_unstructured(m, "weight", amount=0.4),
                              "forward pre-hook L1Unstructured"),
    "forward_hook": (lambda m: m.register_forward_hook(lambda mod, args, out: out * 2), "forward hook"),
    "forward_pre_hook": (lambda m: m.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,)),
                         "forward pre-hook"),
    "full_backward_hook": (lambda m: m.register_full_backward_hook(lambda mod, gi, go: _scale_grads(3)(mod, gi)),
                           "backward hook"),
    "full_backward_pre_hook": (lambda m: m.register_full_backward_pre_hook(_scale_grads(0.25)), "backward pre-hook"),
    "weight_is_a_buffer": (_as_buffer, "weight is not an nn.Parameter"),
}


def _altered(kind: str, form: str) -> nn.Module:
    """The float64 two-of-each model with ALTERATIONS[kind] applied to its first conv and first linear
    (seeded: two calls give equal models)."""
    make, (conv_name, linear_name), _ = FORMS[form]
    torch.manual_seed(11)
    model = make().double()
    for name in (conv_name, linear_name):
        ALTERATIONS[kind][0](model.get_submodule(name))
    return model


@pytest.mark.filterwarnings("ignore:.torch.nn.utils.weight_norm. is deprecated:FutureWarning")
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("kind", list(ALTERATIONS))
def test_not_plain_module_chain_skipped_with_reason(kind, form, inplace):
    twin, model = _altered(kind, form), _altered(kind, form)
    _, altered, plain = FORMS[form]
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    for m in (twin, model):  # a model that has run (old-style hooks then hold computed weights)
        m(x)
    keys = set(model.state_dict().keys())
    fused = lo.fuse(model, inplace=inplace)
    assert sorted(c.names[0] for c in fused.fused_chains) == sorted(plain)
    reasons = {c.names[0]: c.reason for c in fused.skipped_chains}
    assert sorted(reasons) == sorted(altered), fused.skipped_chains
    for name, reason in reasons.items():
        assert ALTERATIONS[kind][1] in reason and name in reason, reason
        # the module itself still runs (parametrized classes are made per instance: compare names)
        assert type(fused.get_submodule(name)).__name__ == type(twin.get_submodule(name)).__name__
    assert set(fused.state_dict().keys()) == keys
    if inplace:
        assert all(any(p is q for q in fused.parameters()) for p in model.parameters())
    else:  # the original is untouched, and the copy owns its own tensors
        assert [type(m).__name__ for m in model.modules()] == [type(m).__name__ for m in twin.modules()]
        assert not hasattr(model, "fused_chains")
        ptrs = {t.data_ptr() for t in model.state_dict().values()}
        assert not any(t.data_ptr() in ptrs for t in fused.state_dict().values())
    # same output and gradients as the unfused twin: every hook and parametrization still applies
    g = torch.randn(2, 5, dtype=torch.float64)
    y0, gx0, g0 = _out_and_grads(twin, x, g)
    y1, gx1, g1 = _out_and_grads(fused, x, g)
    assert _max_abs(y0) > 0
    assert_close_rel(y1, y0, 1e-10, "output")
    assert_close_rel(gx1, gx0, 1e-10, "input grad")
    assert g1.keys() == g0.keys()
    for n in g0:
        assert_close_rel(g1[n], g0[n], 1e-10, n)


@pytest.mark.parametrize("form", ["sequential", "graph"])
@pytest.mark.parametrize("position", [1, 2], ids=["relu", "pool"])
def test_hook_on_relu_or_pool_skips_the_chain(form, position):
    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2)).double()
    if form == "graph":  # call_module nodes of a GraphModule (graph pass)
        model = fx.symbolic_trace(model)
    model.get_submodule(str(position)).register_forward_hook(lambda mod, args, out: out + 1)
    fused = lo.fuse(model)
    assert fused.fused_chains == []
    assert len(fused.skipped_chains) == 1 and f"{position} has hooks (forward hook" in fused.skipped_chains[0].reason
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# inplace=True is all or nothing: a failure anywhere leaves the model exactly as it was


class Injected(RuntimeError):
    pass


def _fail_at_build(monkeypatch, fail_at: int, exc: type[BaseException] = Injected) -> list[int]:
    """Make the fail_at-th fused-module build or fused-call construction (counted over every pattern
    of fuse.PATTERNS) raise `exc`; returns the call counter."""
    calls = [0]

    def wrap(fn):
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == fail_at:
                raise exc(f"injected failure at build {fail_at}")
            return fn(*args, **kwargs)
        return wrapped

    patterns = tuple(dataclasses.replace(p, build_module=wrap(p.build_module), call_args=wrap(p.call_args))
                     for p in fuse_mod.PATTERNS)
    monkeypatch.setattr(fuse_mod, "PATTERNS", patterns)
    return calls


def _snapshot(model: nn.Module) -> dict:
    """Everything fuse could change: the module tree (objects by identity, child names, flags), each
    Parameter / buffer (object and value), the root's attributes, GraphModules' code and graphs."""
    return {
        "modules": [(name, id(m), type(m), tuple(m._modules), m.training)
                    for name, m in model.named_modules(remove_duplicate=False)],
        "tensors": [(k, id(v), v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()],
        "attrs": sorted(vars(model)),
        "code": [(name, m.code, m.graph.python_code(root_module="self").src) for name, m in model.named_modules()
                 if isinstance(m, fx.GraphModule)],  # the compiled code, and the code of the graph as it is now
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["modules"] == before["modules"]
    assert [t[:2] for t in after["tensors"]] == [t[:2] for t in before["tensors"]]
    for (k, _, a), (_, _, b) in zip(after["tensors"], before["tensors"]):
        assert torch.equal(a, b), k
    assert after["attrs"] == before["attrs"]
    assert after["code"] == before["code"]


class Mixed(nn.Module):
    """Every kind of edit fuse makes: Sequentials fused child by child (features, head), a functional
    block replaced by its fused GraphModule, under a top level that torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block = FunctionalBlock()
        self.head = nn.Sequential(nn.Linear(4 * 3 * 3, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        x = self.block(self.features(x))
        n = 1
        for s in x.size()[1:]:
            n *= s
        return self.head(x.view(-1, n))


class FunctionalBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return F.max_pool2d(F.relu(self.conv(x)), 2)


def _mixed() -> nn.Module:
    torch.manual_seed(13)
    return Mixed().double()


MIXED_X = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_mixed_model_fuses_with_three_builds(monkeypatch):
    """The failure tests below inject at builds 1..3: make sure those are all the builds there are."""
    calls = _fail_at_build(monkeypatch, 0)
    model = _mixed()
    fused = lo.fuse(model, inplace=True)
    assert calls[0] == 3 and len(fused.fused_chains) == 3
    assert isinstance(model.block, fx.GraphModule) and isinstance(model.features[0], lo.Conv2dReLUMaxPool2d)
    torch.testing.assert_close(model(MIXED_X), _mixed()(MIXED_X), rtol=1e-12, atol=1e-12)


def _check_atomic(model: nn.Module, x: torch.Tensor, exc: type[BaseException] = Injected) -> None:
    """lo.fuse(model, inplace=True) raises `exc` and leaves `model` as it was; then, without the
    failure, fusing it works."""
    y = model(x)
    before = _snapshot(model)
    with pytest.raises(exc, match="injected"):
        lo.fuse(model, inplace=True)
    _assert_unchanged(model, before)
    assert not hasattr(model, "fused_chains")
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_inplace_failure_at_any_build_leaves_model_unchanged(monkeypatch, fail_at):
    model = _mixed()
    _fail_at_build(monkeypatch, fail_at)
    _check_atomic(model, MIXED_X)
    monkeypatch.undo()
    fused = lo.fuse(model, inplace=True)  # the rolled-back model is intact and still fusable
    assert len(fused.fused_chains) == 3
    torch.testing.assert_close(model(MIXED_X), _mixed()(MIXED_X), rtol=1e-12, atol=1e-12)


def test_inplace_interrupt_leaves_model_unchanged(monkeypatch):
    _fail_at_build(monkeypatch, 3, KeyboardInterrupt)
    _check_atomic(_mixed(), MIXED_X, KeyboardInterrupt)


def _raise_injected(*args, **kwargs):
    raise Injected("injected failure")


@pytest.mark.parametrize("where", ["graph lint", "state keys", "training flags", "report"])
def test_inplace_failure_after_edits_leaves_model_unchanged(monkeypatch, where):
    """Failures after the fused modules are in place: in the graph rewrite's final check, while
    copying state keys / flags onto the traced block, and when attaching the report (the last step)."""
    if where == "graph lint":
        monkeypatch.setattr(fx.Graph, "lint", _raise_injected)
    elif where == "state keys":
        monkeypatch.setattr(fuse_mod, "_restore_state_keys", _raise_injected)
    elif where == "training flags":
        monkeypatch.setattr(fuse_mod, "_copy_training_flags", _raise_injected)
    else:
        set_attr = fuse_mod._Journal.set_attr

        def fail_on_second_attribute(self, obj, name, value):
            if name == "skipped_chains":
                raise Injected("injected failure")
            set_attr(self, obj, name, value)

        monkeypatch.setattr(fuse_mod._Journal, "set_attr", fail_on_second_attribute)
    _check_atomic(_mixed(), MIXED_X)


def test_inplace_refuse_keeps_previous_report(monkeypatch):
    """A model fused before keeps its fused_chains when a second, failing fuse is rolled back."""
    model = _mixed()
    lo.fuse(model, inplace=True)
    chains = model.fused_chains
    monkeypatch.setattr(fuse_mod._Journal, "set_attr", _raise_injected)
    with pytest.raises(Injected):
        lo.fuse(model, inplace=True)
    assert model.fused_chains is chains


LIGHTNET_X = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4, "lint"])
def test_inplace_graph_module_failure_leaves_graph_unchanged(monkeypatch, fail_at):
    """A GraphModule given to fuse is rewritten in place: on failure its graph, code and submodules
    come back (builds 1-4: conv1, conv2, fc1, fc2; "lint": after all four rewrites)."""
    torch.manual_seed(14)
    gm = fx.symbolic_trace(lo.StockLightNet())
    if fail_at == "lint":
        monkeypatch.setattr(fx.Graph, "lint", _raise_injected)
    else:
        _fail_at_build(monkeypatch, fail_at)
    _check_atomic(gm, LIGHTNET_X)


@pytest.mark.parametrize("use_modules", [True, False])
@pytest.mark.parametrize("fail_at", [2, 4])
def test_fuse_graph_failure_restores_graph(monkeypatch, fail_at, use_modules):
    """fuse_graph (also the compile backend's rewrite) leaves the graph as it was when it fails."""
    torch.manual_seed(15)
    gm = fx.symbolic_trace(lo.StockLightNet())
    y = gm(LIGHTNET_X)
    before = _snapshot(gm)
    calls = _fail_at_build(monkeypatch, fail_at)
    with pytest.raises(Injected):
        fuse_mod.fuse_graph(gm, use_modules=use_modules)
    assert calls[0] == fail_at
    _assert_unchanged(gm, before)
    torch.testing.assert_close(gm(LIGHTNET_X), y, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The pattern table: one entry is all a new fusion needs, in both passes


class LinearReLU6(nn.Module):
    """Stand-in fused module for a test-only Linear -> ReLU6 pattern."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        return linear_relu6(x, self.weight, self.bias)


def linear_relu6(x, weight, bias=None, *, backend="auto"):
    return F.relu6(F.linear(x, weight, bias))


def _relu6_sig(input, inplace=False):
    pass


RELU6 = fuse_mod.OpSpec("relu6", nn.ReLU6, frozenset({F.relu6}), signature=_relu6_sig)
LINEAR_RELU6 = fuse_mod.Pattern(
    "linear_relu6", (fuse_mod.LINEAR, RELU6), LinearReLU6, lambda links, backend: LinearReLU6(links[0].module),
    linear_relu6,
    lambda links, tensor: (tensor(links[0], "weight"), tensor(links[0], "bias")))


class FunctionalReLU6(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 6)

    def forward(self, x):
        x = F.relu6(self.a(x) * 4)  # not a chain: the multiply sits between
        x = F.relu6(self.b(x))      # b has two call sites: both chains become functional calls
        return F.relu6(self.b(x)) + F.relu(self.a.weight.sum() * x)


def test_new_pattern_entry_is_used_by_both_passes(monkeypatch):
    torch.manual_seed(16)
    seq = nn.Sequential(nn.Linear(5, 6), nn.ReLU6(), nn.Linear(6, 4), nn.ReLU()).double()
    func = FunctionalReLU6().double()
    with torch.no_grad():
        func.b.weight.mul_(4)  # large enough for the clamp at 6
    x = torch.randn(3, 5, dtype=torch.float64) * 10
    assert [c.kind for c in lo.fuse(seq).fused_chains] == ["linear_relu"]  # not in the table yet
    assert lo.fuse(func).fused_chains == []

    monkeypatch.setattr(fuse_mod, "PATTERNS", fuse_mod.PATTERNS + (LINEAR_RELU6,))
    fused = lo.fuse(seq)
    assert [c.kind for c in fused.fused_chains] == ["linear_relu6", "linear_relu"]
    assert isinstance(fused[0], LinearReLU6) and isinstance(fused[1], nn.Identity) and fused[0].weight is not seq[0].weight
    assert set(fused.state_dict()) == set(seq.state_dict())
    torch.testing.assert_close(fused(x), seq(x), rtol=1e-12, atol=1e-12)

    fused = lo.fuse(func)
    assert [(c.kind, c.names[0]) for c in fused.fused_chains] == [("linear_relu6", "b"), ("linear_relu6", "b_1")]
    assert isinstance(fused.b, nn.Linear) and "linear_relu6" in fused.code  # b has two call sites
    y0, gx0, g0 = _out_and_grads(func, x)
    y1, gx1, g1 = _out_and_grads(fused, x)
    with torch.no_grad():  # the first fused chain's output reaches both sides of the clamp
        h = F.relu6(func.b(F.relu6(func.a(x) * 4)))
    assert (h == 6).any() and ((h > 0) & (h < 6)).any()
    assert_close_rel(y1, y0, 1e-12, "output")
    assert_close_rel(gx1, gx0, 1e-12, "input grad")
    for n in g0:
        assert_close_rel(g1[n], g0[n], 1e-12, n)


# ---------------------------------------------------------------------------------------------
# BatchNorm2d folded into Conv2d -> ReLU -> MaxPool2d (eval mode)


BN_KIND = "conv2d_bn_relu_maxpool2d"


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that a wrong fold shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                dt = m.running_mean.dtype
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen, dtype=dt) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=dt) * 1.5 + 0.25)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=gen, dtype=dt) * 3 - 1.5)
                    m.bias.copy_(torch.rand(m.num_features, generator=gen, dtype=dt) - 0.5)
    return model


def _bn_seq(bias: bool = True, affine: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.BatchNorm2d(6, affine=affine), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, bias=not bias), nn.BatchNorm2d(8, eps=1e-3, affine=affine), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Flatten(), nn.Linear(8 * 1 * 1, 5),
    )


class BasicConv2d(nn.Module):
    """torchvision GoogLeNet / Inception's block: conv + bn in a module whose forward calls F.relu."""

    def __init__(self, cin: int, cout: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        return F.relu(x, inplace=True)


class BasicConvNet(nn.Module):
    """Chains that cross module boundaries: BasicConv2d, then a pool in the parent."""

    def __init__(self, affine: bool = True, conv_bias: bool = False):
        super().__init__()
        self.b1 = BasicConv2d(3, 6, kernel_size=3, padding=1)
        self.pool1 = nn.MaxPool2d(2)
        self.b2 = BasicConv2d(6, 8, kernel_size=3)
        if conv_bias:
            self.b1.conv = nn.Conv2d(3, 6, 3, padding=1)
        if not affine:
            self.b2.bn = nn.BatchNorm2d(8, eps=0.001, affine=False)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        x = self.pool1(self.b1(x))
        x = F.max_pool2d(self.b2(x), 2)
        return self.fc(torch.flatten(x, 1))


class FunctionalBN(nn.Module):
    """F.batch_norm(training=False) written out: a graph function call (also what TorchDynamo captures)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        bn = self.bn
        y = F.batch_norm(self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps)
        return F.max_pool2d(torch.relu(y), 2)


def _check_parity64(model: nn.Module, fused: nn.Module, x: torch.Tensor, rel: float = 1e-10) -> None:
    """Outputs, input gradient and every parameter gradient (eval mode) agree to `rel`."""
    g = None
    y0, gx0, g0 = _out_and_grads(model, x, g)
    y1, gx1, g1 = _out_and_grads(fused, x, g)
    assert _max_abs(y0) > 0
    assert_close_rel(y1, y0, rel, "output")
    assert_close_rel(gx1, gx0, rel, "input grad")
    assert g1.keys() == g0.keys()
    for n in g0:
        assert _max_abs(g0[n]) > 0, n
        assert_close_rel(g1[n], g0[n], rel, n)
    with torch.no_grad():  # the cached fold (no autograd graph) gives the same numbers
        assert_close_rel(fused(x), y0, rel, "no_grad output")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "non-affine"])
@pytest.mark.parametrize("bias", [True, False], ids=["conv-bias", "no-conv-bias"])
def test_bn_folded_sequential_float64(bias, affine):
    torch.manual_seed(20)
    model = _randomize_bn(_bn_seq(bias, affine).double()).eval()
    keys = list(model.state_dict().keys())
    fused = lo.fuse(model)
    assert _fused_kinds(fused) == [BN_KIND, BN_KIND] and fused.skipped_chains == []
    assert isinstance(fused[0], fuse_mod.Conv2dBNReLUMaxPool2d) and isinstance(fused[0], lo.Conv2dReLUMaxPool2d)
    assert type(fused[1]) is fuse_mod.FoldedBatchNorm2d and isinstance(fused[2], nn.Identity)
    assert fused[0].bn is fused[1]  # the fused module applies the stand-in's BatchNorm
    assert list(fused.state_dict().keys()) == keys  # the BN entries included, in the same order
    assert (fused[0].bias is None) == (not bias) and (fused[1].weight is None) == (not affine)
    # the fold happened at fuse time, into non-persistent buffers
    assert fused[0].folded_weight is not None and "0.folded_weight" not in fused.state_dict()
    _check_parity64(model, fused, torch.randn(3, 3, 12, 12, dtype=torch.float64))


def test_bn_fold_is_fuse_conv_bn_weights_arithmetic():
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    torch.manual_seed(21)
    for bias, affine in ((True, True), (False, False)):
        conv, bn = _bn_seq(bias, affine)[:2]
        _randomize_bn(bn)
        w, b = fuse_mod.fold_conv_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                     bn.eps)
        w0, b0 = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                      bn.bias)
        assert torch.equal(w, w0) and torch.equal(b, b0)


@pytest.mark.parametrize("make", [BasicConvNet, lambda: BasicConvNet(affine=False, conv_bias=True), FunctionalBN],
                         ids=["basic-conv", "basic-conv-nonaffine-bias", "functional-batch-norm"])
def test_bn_folded_across_module_boundaries_float64(make):
    torch.manual_seed(22)
    model = _randomize_bn(make().double()).eval()
    keys = set(model.state_dict().keys())
    fused = lo.fuse(model)
    assert isinstance(fused, fx.GraphModule)
    assert set(fused.state_dict().keys()) == keys
    if isinstance(model, BasicConvNet):
        # the chain runs through BasicConv2d (conv, bn, F.relu) into the parent's pool: found in the traced graph
        assert [(c.kind, c.names) for c in fused.fused_chains] == [
            (BN_KIND, ("b1_conv", "b1_bn", "relu", "pool1")), (BN_KIND, ("b2_conv", "b2_bn", "relu_1", "max_pool2d"))]
        assert isinstance(fused.b1.conv, fuse_mod.Conv2dBNReLUMaxPool2d)
        assert type(fused.b1.bn) is fuse_mod.FoldedBatchNorm2d and fused.b1.conv.bn is fused.b1.bn
        assert "batch_norm" not in fused.code and "relu(" not in fused.code
    else:  # a functional BatchNorm is folded by the fused call itself, on each call
        assert _fused_kinds(fused) == [BN_KIND] and "conv2d_bn_relu_maxpool2d" in fused.code
        assert not any(isinstance(m, fuse_mod.FoldedBatchNorm2d) for m in fused.modules())
    _check_parity64(model, fused, torch.randn(2, 3, 13, 13, dtype=torch.float64))


def test_bn_folded_float32_within_stock_error():
    torch.manual_seed(23)
    model = _randomize_bn(_bn_seq()).eval()
    fused = lo.fuse(model)
    assert _fused_kinds(fused) == [BN_KIND, BN_KIND]
    ref = copy.deepcopy(model).double()
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        y_r, y_s, y_f = ref(x.double()), model(x), fused(x)
    err_f, err_s = _max_abs(y_f.double() - y_r), _max_abs(y_s.double() - y_r)
    assert err_f <= 8 * err_s + 1e-6 * _max_abs(y_r), (err_f, err_s)


@pytest.mark.parametrize("form", ["sequential", "graph"])
def test_bn_train_mode_chain_left_alone(form):
    torch.manual_seed(24)
    model = (_bn_seq() if form == "sequential" else BasicConvNet()).double().train()
    twin = copy.deepcopy(model)
    fused = lo.fuse(model)
    assert BN_KIND not in _fused_kinds(fused)
    bn_skips = [c for c in fused.skipped_chains if c.kind == BN_KIND]
    assert len(bn_skips) == 2, fused.skipped_chains  # each chain reported once
    assert all("training mode" in c.reason and "model.eval()" in c.reason for c in bn_skips)
    assert not any(isinstance(m, fuse_mod.FoldedBatchNorm2d) for m in fused.modules())
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(fused(x), twin(x), rtol=1e-12, atol=1e-12)  # batch statistics, as before
    for a, b in zip(fused.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # running statistics updated alike


def test_bn_without_running_stats_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                          nn.MaxPool2d(2)).eval()
    fused = lo.fuse(model)
    assert fused.fused_chains == [] and "track_running_stats=False" in fused.skipped_chains[0].reason
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)


def test_bn_module_called_twice_left_alone():
    class SharedBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
            return self.bn(y)  # the BatchNorm runs a second time: it cannot become a pass-through

    model = _randomize_bn(SharedBN().double()).eval()
    fused = lo.fuse(model)
    assert fused.fused_chains == []
    assert "called from more than one place" in fused.skipped_chains[0].reason
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("form", ["sequential", "graph"])
def test_bn_folded_train_unfolds_and_eval_refolds(form):
    """.train() on a model with a folded BatchNorm runs the stock chain on the original tensors (batch
    statistics, running-statistics updates, exact gradients); .eval() folds the updated tensors."""
    torch.manual_seed(25)
    make = _bn_seq if form == "sequential" else BasicConvNet
    twin = _randomize_bn(make().double()).eval()
    fused = lo.fuse(copy.deepcopy(twin))
    assert _fused_kinds(fused) == [BN_KIND, BN_KIND]
    opt_t = torch.optim.SGD(twin.parameters(), lr=0.05)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.05)
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    twin.train()
    fused.train()
    for _ in range(2):
        yt, gxt, gt = _out_and_grads(twin, x)
        yf, gxf, gf = _out_and_grads(fused, x)
        assert_close_rel(yf, yt, 1e-10, "train output")
        for n in gt:
            assert_close_rel(gf[n], gt[n], 1e-10, n)
        opt_t.step()
        opt_f.step()
    for (k, a), b in zip(twin.state_dict().items(), fused.state_dict().values()):
        assert_close_rel(b.double(), a.double(), 1e-10, k)  # running stats, num_batches_tracked, weights
    assert twin.state_dict()[[k for k in twin.state_dict() if k.endswith("num_batches_tracked")][0]] == 2
    twin.eval()
    fused.eval()
    with torch.no_grad():
        assert_close_rel(fused(x), twin(x), 1e-10, "eval output after training")


def test_bn_folded_state_dict_round_trip_refolds():
    torch.manual_seed(26)
    a = _randomize_bn(_bn_seq().double(), seed=1).eval()
    b = _randomize_bn(_bn_seq().double(), seed=2).eval()
    fused_b = lo.fuse(b)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        y_b = fused_b(x)  # caches b's fold
        fused_b.load_state_dict(a.state_dict(), strict=True)  # stock checkpoint -> fused model
        assert_close_rel(fused_b(x), a(x), 1e-10, "fused model after loading a's checkpoint")
        assert not torch.allclose(y_b, a(x))
        c = _randomize_bn(_bn_seq().double(), seed=3).eval()
        c.load_state_dict(fused_b.state_dict(), strict=True)  # fused checkpoint -> stock model
        for k, v in a.state_dict().items():
            assert torch.equal(c.state_dict()[k], v), k


def test_bn_folded_follows_in_place_updates_and_dtype_moves():
    torch.manual_seed(27)
    model = _randomize_bn(_bn_seq()).eval()
    fused = lo.fuse(model, inplace=True)  # shares the tensors with `model`
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        model[5].running_var.mul_(2)  # an in-place change of a BatchNorm buffer
        model[0].weight.add_(0.1)     # and of a conv weight
        twin = _randomize_bn(_bn_seq()).eval()
        twin.load_state_dict(model.state_dict())
        torch.testing.assert_close(fused(x), twin(x), rtol=1e-5, atol=1e-5)
        fused.double()
        assert fused[0].weight.dtype == torch.float64
        assert_close_rel(fused(x.double()), twin.double()(x.double()), 1e-10, "after .double()")
        assert fused[0].folded_weight.dtype == torch.float64


def test_bn_folded_hooked_batchnorm_left_alone():
    model = _bn_seq().eval()
    model[1].register_forward_hook(lambda m, i, o: o * 2)
    fused = lo.fuse(model)
    assert _fused_kinds(fused) == [BN_KIND]  # only the second chain
    assert "1 has hooks" in fused.skipped_chains[0].reason


# ---------------------------------------------------------------------------------------------
# Speed guard and the pool capability flags


def test_speed_guard_leaves_slower_chains_and_records_times():
    torch.manual_seed(28)
    model = _randomize_bn(_bn_seq()).eval()
    x = torch.randn(2, 3, 12, 12)
    # every timed chain loses against ratio 0: all left alone, with their times
    fused = lo.fuse(model, guard_input=x, guard_ratio=0.0)
    assert fused.fused_chains == []
    assert len(fused.skipped_chains) == 2
    for c in fused.skipped_chains:
        assert "slower than stock at input" in c.reason and c.times is not None and min(c.times) > 0
    assert not any(isinstance(m, lo.Conv2dReLUMaxPool2d) for m in fused.modules())
    # and every one wins against an infinite ratio
    fused = lo.fuse(model, guard_input=(x,), guard_ratio=float("inf"))
    assert _fused_kinds(fused) == [BN_KIND, BN_KIND]
    assert all(c.times is not None for c in fused.fused_chains)
    assert "us, stock" in str(fused.fused_chains[0])


def test_speed_guard_run_leaves_state_and_rng_alone():
    torch.manual_seed(29)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.5),
                          nn.Conv2d(4, 4, 1), nn.ReLU(), nn.MaxPool2d(2)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 12, 12)
    rng = torch.get_rng_state()
    fused = lo.fuse(model, guard_input=x, guard_ratio=float("inf"))
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert _fused_kinds(fused) == ["conv2d_relu_maxpool2d"]  # the BN chain is in training mode
    assert not any(m._forward_pre_hooks for m in fused.modules())  # the shape-recording hooks are gone


def test_pool_support_flags_drive_the_skip(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1, ceil_mode=True))
    spec = importlib.import_module("lightnet_ops.fuse_spec")  # the max_pool2d OpSpec reads the flags there
    monkeypatch.setattr(spec, "POOL_SUPPORT", spec.PoolSupport())
    assert "padding" in lo.fuse(model).skipped_chains[0].reason
    monkeypatch.setattr(spec, "POOL_SUPPORT", spec.PoolSupport(padding=True))
    assert "ceil_mode=True" in lo.fuse(model).skipped_chains[0].reason
    # with both flags the chain is taken, and the fused op gets the pool's padding and ceil mode
    monkeypatch.setattr(spec, "POOL_SUPPORT", spec.PoolSupport(padding=True, ceil_mode=True))
    link = fuse_mod.Link(fuse_mod.MAX_POOL2D, "2", module=model[2])
    fuse_mod._resolve([link])
    assert spec.pool_kwargs(link.params) == {"pool_padding": (1, 1), "ceil_mode": True}
