"""LightNet as the PyTorch "Neural Networks" tutorial this project started from writes it, verbatim,
with the globals it reads (lightnet_ops.LightNet is the drop-in replacement for it). Its
num_flat_features loop over x.size() defeats torch.fx.symbolic_trace, which is why the tests use it
for the torch.compile backend and for what lo.fuse must leave alone."""

import torch.nn as nn
import torch.nn.functional as F

N_CHANNEL_IN, N_CHANNEL_OUT, H, W = 1, 6, 6, 6


class LightNet(nn.Module):

    def __init__(self):
        super(LightNet, self).__init__()
        self.conv1 = nn.Conv2d(N_CHANNEL_IN, N_CHANNEL_OUT, 3)
        self.conv2 = nn.Conv2d(N_CHANNEL_OUT, 16, 3)
        self.fc1 = nn.Linear(H * W * 16, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, self.num_flat_features(x))
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)

    def num_flat_features(self, x):
        size = x.size()[1:]
        num_feature = 1
        for s in size:
            num_feature *= s
        return num_feature


SeedLightNet = LightNet
