"""lo.fuse on torchvision's classification models (weights=None): BatchNorm folding and chains across
module boundaries in real architectures, pool padding / ceil_mode reported until the op supports them,
and the coverage report (python -m lightnet_ops.fuse --report)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightnet_ops as lo

torchvision = pytest.importorskip("torchvision", reason="builds torchvision models")
fuse_mod = importlib.import_module("lightnet_ops.fuse")
report_mod = importlib.import_module("lightnet_ops.fuse_report")
ROOT = Path(__file__).resolve().parents[1]
BN_KIND = "conv2d_bn_relu_maxpool2d"


def _build64(name: str) -> torch.nn.Module:
    """Eval-mode float64 model, built on meta and filled with U(-1/sqrt(fan_in), 1/sqrt(fan_in)); BatchNorm
    running statistics and affine parameters randomised so that a wrong fold shows."""
    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None, **({"init_weights": False}
                                                                    if name in ("googlenet", "inception_v3") else {}))
    model = model.to(torch.float64).to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            p.uniform_(-(fan_in ** -0.5), fan_in ** -0.5, generator=gen)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.2, 0.2, generator=gen)
                m.num_batches_tracked.zero_()
    return model


def _pool_blocked(reason: str) -> bool:
    """The chain is left alone only for a pool argument the op does not support yet (POOL_SUPPORT)."""
    return ("pool padding" in reason and not fuse_mod.POOL_SUPPORT.padding) or (
        "ceil_mode" in reason and not fuse_mod.POOL_SUPPORT.ceil_mode)


# name -> (input side, BN chains expected in the model). With the pool flags off, the chains of the
# padded / ceil-mode pool families are reported with that reason instead of fused.
FAMILIES = {
    "vgg11_bn": (32, 5),          # Sequential: module pass
    "inception_v3": (75, 2),      # BasicConv2d (conv, bn, F.relu) -> parent's MaxPool2d(3, 2): graph pass
    "googlenet": (64, 2),         # BasicConv2d -> MaxPool2d(3, 2, ceil_mode=True)
    "resnet18": (64, 1),          # stem: conv1 -> bn1 -> relu -> MaxPool2d(3, 2, padding=1)
    "densenet121": (64, 1),       # features: conv0 -> norm0 -> relu0 -> pool0 (padding=1)
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bn_chains_folded_or_reported(name):
    size, n_chains = FAMILIES[name]
    model = _build64(name)
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y0 = model(x)
    keys = set(model.state_dict().keys())
    fused = lo.fuse(model, inplace=True)
    bn_fused = [c for c in fused.fused_chains if c.kind == BN_KIND]
    bn_skipped = [c for c in fused.skipped_chains if c.kind == BN_KIND]
    assert len(bn_fused) + len(bn_skipped) == n_chains, (fused.fused_chains, fused.skipped_chains)
    assert all(_pool_blocked(c.reason) for c in bn_skipped), bn_skipped
    if name in ("vgg11_bn", "inception_v3"):
        assert len(bn_fused) == n_chains
    assert set(fused.state_dict().keys()) == keys
    with torch.no_grad():
        y1 = fused(x)
    assert y0.abs().max() > 0
    assert (y1 - y0).abs().max() <= 1e-10 * y0.abs().max()


@pytest.mark.slow
def test_report_on_small_models(tmp_path):
    """python -m lightnet_ops.fuse --report on two small models: chains, differences, times, files."""
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "lightnet_ops.fuse", "--report", "--models", "alexnet,resnet18", "--size", "64",
         "--budget", "0.2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "fuse_report.json").read_text())
    md = (out / "fuse_report.md").read_text()
    rows = {r["model"]: r for r in result["models"]}
    assert set(rows) == {"alexnet", "resnet18"} and result["machine"]["cpu"]
    alex = rows["alexnet"]
    assert alex["fused"] == alex["found"] == 5 and alex["kinds"] == ["conv2d_relu_maxpool2d", "linear_relu"]
    assert alex["maxdiff_f64"][0] <= 1e-10 * alex["maxdiff_f64"][1]
    assert alex["maxdiff_f32"][0] <= 1e-4 * alex["maxdiff_f32"][1]
    assert len(alex["chain_times"]) == 5 and all(c["times_us"][0] > 0 < c["times_us"][1] for c in alex["chain_times"])
    for b in ("1", "8"):
        assert alex["time"][b]["original"]["median_ms"] > 0 and alex["time"][b]["fused"]["median_ms"] > 0
    res = rows["resnet18"]
    assert res["found"] == 1 and (res["fused"] == 1) == fuse_mod.POOL_SUPPORT.padding
    if not fuse_mod.POOL_SUPPORT.padding:  # the reason comes from the pattern checks
        assert "pool padding=1" in res["chains"][0]["reason"] and "pool padding=1" in md
    assert "| alexnet | 64 | 5 | 5 | 0 |" in md and "Machine:" in md


def test_report_requires_the_flag():
    with pytest.raises(SystemExit):
        report_mod.main(["--models", "alexnet"])
