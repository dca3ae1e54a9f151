"""The three ways to use lightnet_ops, side by side with stock PyTorch.

    python examples/three_ways.py
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import lightnet_ops as lo

torch.manual_seed(0)
x = torch.randn(8, 1, 32, 32)

# 1. Drop-in LightNet: same parameter names/shapes/init as the seed tutorial's model.
stock, fused = lo.StockLightNet(), lo.LightNet()
fused.load_state_dict(stock.state_dict())                  # checkpoints load either way
print("1. LightNet      max |fused - stock| =", (fused(x) - stock(x)).abs().max().item())

# 2. lo.fuse on a model you already have (module-style Sequential stacks, or torch.fx-traceable forwards).
alexnet = torchvision.models.alexnet(weights=None).eval()
fused_alexnet = lo.fuse(alexnet, verbose=True)             # prints the fused chains
img = torch.randn(2, 3, 64, 64)
print("2. lo.fuse       max |fused - stock| =", (fused_alexnet(img) - alexnet(img)).abs().max().item())


# 3. torch.compile backend: anything TorchDynamo captures, e.g. the seed's forward, which
#    torch.fx cannot trace (num_flat_features loops over x.size()).
class SeedLightNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 3), nn.Conv2d(6, 16, 3)
        self.fc1, self.fc2, self.fc3 = nn.Linear(576, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, self.num_flat_features(x))
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    def num_flat_features(self, x):
        n = 1
        for s in x.size()[1:]:
            n *= s
        return n


seed = SeedLightNet()
compiled = torch.compile(seed, backend="lightnet_ops", options={"verbose": True})
loss = compiled(x).square().mean()
loss.backward()                                            # runs the hand-written backward kernels
print("3. torch.compile max |fused - stock| =", (compiled(x) - seed(x)).abs().max().item())
