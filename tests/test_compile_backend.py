"""torch.compile(model, backend="lightnet_ops"): registration, the seed LightNet verbatim (which
torch.fx cannot trace) forward/backward parity and SGD steps, chains that must not be fused,
graph breaks, options, and the Inductor hand-off."""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as prune

import lightnet_ops as lo
from conftest import autograd_node_names, ran_fused_backwards
from seed_model import LightNet  # the seed tutorial's class, verbatim
from lightnet_ops import compile_backend

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    compile_backend.reports.clear()
    yield
    torch._dynamo.reset()


def _kinds() -> list[str]:
    return [c.kind for r in compile_backend.reports for c in r.fused]


def test_registered_by_name():
    assert "lightnet_ops" in torch._dynamo.list_backends()
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("lightnet_ops") is compile_backend.lightnet_ops_backend


def test_register_is_idempotent():
    compile_backend.register()
    compile_backend.register()
    assert "lightnet_ops" in torch._dynamo.list_backends()
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("lightnet_ops") is compile_backend.lightnet_ops_backend


def test_lazy_registration_in_fresh_process():
    """`import lightnet_ops` does not import TorchDynamo, yet the name works in torch.compile."""
    code = textwrap.dedent("""
        import sys, torch
        import lightnet_ops
        assert "torch._dynamo" not in sys.modules, "lightnet_ops imported torch._dynamo"
        f = torch.compile(lambda x: torch.nn.functional.relu(x) * 2, backend="lightnet_ops")
        assert torch.equal(f(torch.tensor([-1.0, 2.0])), torch.tensor([0.0, 4.0]))
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_seed_lightnet_forward_backward_parity(dtype, tol):
    torch.manual_seed(0)
    eager = LightNet().to(dtype)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="lightnet_ops")
    for batch in (4, 3):  # a second batch size: recompile / dynamic shapes still fused
        x = torch.randn(batch, 1, 32, 32, dtype=dtype)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        torch.testing.assert_close(yc, ye, rtol=tol, atol=tol)
        g = torch.randn_like(ye)
        eager.zero_grad()
        model.zero_grad()
        ye.backward(g)
        yc.backward(g)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=tol, atol=tol)
        for (n, pe), (_, pc) in zip(eager.named_parameters(), model.named_parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=tol, atol=tol, msg=n)
        # the hand-written backward ran, and the stock pool backward did not
        names = autograd_node_names(yc)
        assert ran_fused_backwards(names), names
        assert "MaxPool2DWithIndicesBackward0" not in names
    assert _kinds()[:4] == ["conv2d_relu_maxpool2d"] * 2 + ["linear_relu"] * 2


def test_seed_lightnet_sgd_steps_match_eager():
    torch.manual_seed(1)
    eager = LightNet().double()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="lightnet_ops", options={"backend": "cpu"})
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.01)
    opt_c = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = nn.MSELoss()  # the seed's recipe
    for step in range(5):
        x = torch.randn(8, 1, 32, 32, dtype=torch.float64)
        target = torch.randn(8, 10, dtype=torch.float64)
        losses = []
        for net, opt in ((eager, opt_e), (compiled, opt_c)):
            opt.zero_grad()
            loss = criterion(net(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-10), step
    for (n, pe), (_, pc) in zip(eager.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-10, atol=1e-12, msg=n)
    assert not torch.equal(eager.conv1.weight, LightNet().double().conv1.weight)  # weights did move


class NotFusable(nn.Module):
    """Skip connection on the conv output, second consumer of a ReLU, grouped conv, dilated pool."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.conv(x)
        x = F.max_pool2d(F.relu(y), 2) + F.max_pool2d(y, 2)
        x = F.max_pool2d(F.relu(self.grouped(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2, dilation=2)
        r = F.relu(self.fc(x.mean((2, 3))))
        return r + r.sum()


def test_not_fusable_chains_left_alone():
    torch.manual_seed(2)
    eager = NotFusable().double()
    compiled = torch.compile(copy.deepcopy(eager), backend="lightnet_ops")
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-12, atol=1e-12)
    # r = relu(fc(...)) feeds two consumers, but Linear->ReLU only needs the linear output to be
    # single-use, so that chain is fused; nothing else is
    assert _kinds() == ["linear_relu"]
    reasons = " ".join(c.reason for r in compile_backend.reports for c in r.skipped)
    assert "groups=2" in reasons and "dilation" in reasons


def test_graph_break_each_graph_rewritten():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 2, 3)
            self.b = nn.Linear(2 * 3 * 3, 5)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.a(x)), 2)
            torch._dynamo.graph_break()
            return F.relu(self.b(x.flatten(1)))

    torch.manual_seed(3)
    eager = Broken().double()
    compiled = torch.compile(copy.deepcopy(eager), backend="lightnet_ops")
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-12, atol=1e-12)
    assert len(compile_backend.reports) == 2
    assert sorted(_kinds()) == ["conv2d_relu_maxpool2d", "linear_relu"]


def test_compiles_drop_in_lightnet_and_fused_models():
    torch.manual_seed(4)
    net = lo.LightNet().double()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    compiled = torch.compile(net, backend="lightnet_ops")
    torch.testing.assert_close(compiled(x), net(x), rtol=1e-12, atol=1e-12)
    compiled(x).sum().backward()
    assert net.conv1.weight.grad is not None


def test_options_and_verbose(capsys):
    model = LightNet()
    compiled = torch.compile(model, backend="lightnet_ops", options={"backend": "reference", "verbose": True})
    compiled(torch.randn(2, 1, 32, 32))
    out = capsys.readouterr().out
    assert "4 chain(s) fused" in out
    assert "backend = 'reference'" in compile_backend.reports[-1].code
    bad = torch.compile(LightNet(), backend="lightnet_ops", options={"bogus": 1})
    with pytest.raises(Exception, match="unknown options"):
        bad(torch.randn(2, 1, 32, 32))


def test_inductor_handoff_uses_fused_forward_and_backward_ops():
    torch.manual_seed(5)
    eager = LightNet()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="lightnet_ops", options={"inductor": True, "backend": "cpu"})
    x = torch.randn(4, 1, 32, 32)
    compiled(x)  # compile outside the profiler
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        yc = compiled(x)
        yc.sum().backward()
    ye = eager(x)
    ye.sum().backward()
    torch.testing.assert_close(yc, ye, rtol=2e-5, atol=2e-5)
    model.zero_grad()
    compiled(x).sum().backward()
    for (n, pe), (_, pc) in zip(eager.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=2e-5, atol=2e-5, msg=n)
    events = {e.name for e in prof.events()}
    for op in ("conv2d_relu_maxpool2d", "conv2d_relu_maxpool2d_backward", "linear_relu", "linear_relu_backward"):
        assert f"lightnet_ops::{op}" in events, (op, sorted(e for e in events if "lightnet" in e))
    assert compile_backend.reports[-1].inductor


def test_three_ways_example_runs():
    """examples/three_ways.py (the README's three ways in) runs and reports matching results."""
    path = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}  # this tree's lightnet_ops
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "three_ways.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "lightnet_ops.fuse: 5 chain(s) fused" in out.stdout
    assert "lightnet_ops backend: 4 chain(s) fused" in out.stdout
    diffs = [float(line.rsplit("=", 1)[1]) for line in out.stdout.splitlines() if "max |fused - stock|" in line]
    assert len(diffs) == 3 and all(d < 1e-4 for d in diffs), diffs


class Decorated(nn.Module):
    """Modules that lo.fuse leaves alone (parametrized, pruned, hooked): TorchDynamo inlines the
    parametrization, the pruning hook and the forward hook, so the backend sees plain functional
    chains whose weight is computed in the graph."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3, padding=1))
        self.c2 = nn.Conv2d(4, 6, 3)
        prune.l1_unstructured(self.c2, "weight", amount=0.4)
        self.l1 = nn.Linear(6 * 2 * 2, 8)
        self.l1.register_forward_hook(lambda mod, args, out: out * 2)  # sits between linear and relu
        self.l2 = torch.nn.utils.parametrizations.orthogonal(nn.Linear(8, 5))

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        x = F.relu(self.l1(x.flatten(1)))
        return F.relu(self.l2(x))


def test_parametrized_pruned_and_hooked_modules():
    def make():
        torch.manual_seed(6)
        return Decorated().double()

    eager, model = make(), make()
    compiled = torch.compile(model, backend="lightnet_ops")
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    g = torch.randn(2, 5, dtype=torch.float64)
    ye, yc = eager(x), compiled(x)
    torch.testing.assert_close(yc, ye, rtol=1e-10, atol=1e-12)
    ye.backward(g)
    yc.backward(g)
    assert sorted(_kinds()) == ["conv2d_relu_maxpool2d"] * 2 + ["linear_relu"]  # not l1: the hook's multiply
    named = dict(model.named_parameters())
    assert "parametrizations.weight.original0" in " ".join(named) and "c2.weight_orig" in named
    for n, pe in eager.named_parameters():
        assert pe.grad is not None and pe.grad.abs().max() > 0, n
        torch.testing.assert_close(named[n].grad, pe.grad, rtol=1e-10, atol=1e-12, msg=n)


def test_pattern_table_drives_the_backend(monkeypatch):
    """A pattern added to lightnet_ops.fuse.PATTERNS is rewritten in captured graphs too."""
    fuse_mod = importlib.import_module("lightnet_ops.fuse")  # the module (lightnet_ops.fuse is the function)

    def linear_relu6(x, weight, bias=None, *, backend="auto"):
        return F.relu6(F.linear(x, weight, bias))

    def relu6_sig(input, inplace=False):
        pass

    relu6 = fuse_mod.OpSpec("relu6", nn.ReLU6, frozenset({F.relu6}), signature=relu6_sig)
    pattern = fuse_mod.Pattern("linear_relu6", (fuse_mod.LINEAR, relu6), nn.Module, None, linear_relu6,
                               lambda links, tensor: (tensor(links[0], "weight"), tensor(links[0], "bias")))
    monkeypatch.setattr(fuse_mod, "PATTERNS", fuse_mod.PATTERNS + (pattern,))
    torch.manual_seed(7)
    lin = nn.Linear(4, 6).double()
    x = torch.randn(3, 4, dtype=torch.float64) * 10
    compiled = torch.compile(lambda t: F.relu6(lin(t)), backend="lightnet_ops")
    torch.testing.assert_close(compiled(x), F.relu6(lin(x)), rtol=1e-12, atol=1e-12)
    assert _kinds() == ["linear_relu6"]
    assert "linear_relu6" in compile_backend.reports[-1].code


class BasicConvBN(nn.Module):
    """torchvision's BasicConv2d (conv + bn, F.relu in its forward) followed by a pool in the parent."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6, eps=1e-3)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)), inplace=True)
        return self.fc(self.pool(x).flatten(1))


def _bn_model() -> nn.Module:
    torch.manual_seed(8)
    model = BasicConvBN().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(-2, 2)
        model.bn.bias.uniform_(-1, 1)
    return model


def test_batch_norm_chain_folded_in_eval_and_left_alone_in_training():
    eager = _bn_model().eval()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="lightnet_ops")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = eager(xe), compiled(xc)
    torch.testing.assert_close(yc, ye, rtol=1e-10, atol=1e-12)
    ye.sum().backward()
    yc.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-10, atol=1e-12)
    for (n, pe), (_, pc) in zip(eager.named_parameters(), model.named_parameters()):
        assert pe.grad.abs().max() > 0, n
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-10, atol=1e-12, msg=n)
    assert _kinds() == ["conv2d_bn_relu_maxpool2d"]
    assert "batch_norm" not in compile_backend.reports[-1].code.replace("conv2d_bn_relu_maxpool2d", "")
    # training mode: Dynamo recaptures with batch_norm(training=True), which is not folded
    eager.train()
    model.train()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-10, atol=1e-12)
    assert "training=True" in " ".join(c.reason for c in compile_backend.reports[-1].skipped)
    torch.testing.assert_close(model.bn.running_mean, eager.bn.running_mean, rtol=1e-12, atol=1e-12)


def test_compiles_a_model_fused_with_folded_batch_norm():
    eager = _bn_model().eval()
    fused = lo.fuse(eager)
    assert [c.kind for c in fused.fused_chains] == ["conv2d_bn_relu_maxpool2d"]
    compiled = torch.compile(fused, backend="lightnet_ops")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-10, atol=1e-12)
