"""The seed tutorial's LightNet, stock and fused.

Both have the same submodule names (conv1, conv2, fc1, fc2, fc3), parameter shapes and order, and
the same default initialisation, so state dicts load either way and seeded constructions match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .modules import Conv2dReLUMaxPool2d, LinearReLU


def _flat_features(input_size: int) -> int:
    side = ((input_size - 2) // 2 - 2) // 2  # conv3x3, pool2, conv3x3, pool2
    if side <= 0:
        raise ValueError(f"input_size={input_size} is too small for LightNet (needs at least 10)")
    return 16 * side * side


class StockLightNet(nn.Module):
    """The seed's LightNet in stock torch.nn: conv3x3(in->6)+ReLU+pool2, conv3x3(6->16)+ReLU+pool2,
    fc(->120)+ReLU, fc(120->84)+ReLU, fc(84->classes). Input (N, C, S, S) or (C, S, S)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 3)
        self.conv2 = nn.Conv2d(6, 16, 3)
        self.fc1 = nn.Linear(_flat_features(input_size), 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, -3)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LightNet(nn.Module):
    """Drop-in LightNet built from the fused ops; same parameters, names and init as StockLightNet."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 32, *,
                 backend: str = "auto") -> None:
        super().__init__()
        self.conv1 = Conv2dReLUMaxPool2d(in_channels, 6, 3, pool_kernel_size=2, backend=backend)
        self.conv2 = Conv2dReLUMaxPool2d(6, 16, 3, pool_kernel_size=2, backend=backend)
        self.fc1 = LinearReLU(_flat_features(input_size), 120, backend=backend)
        self.fc2 = LinearReLU(120, 84, backend=backend)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(x))
        x = torch.flatten(x, -3)
        return self.fc3(self.fc2(self.fc1(x)))
