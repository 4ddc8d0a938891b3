"""Toy models for the `timm_repvgg` family: timm byobnet's RepVggBlock layout, written from scratch.

Same attribute names and forward order as timm's ``RepVggBlock``: ``conv_kxk`` / ``conv_1x1``
(``conv`` then ``bn``), ``identity`` BN (in == out, stride 1), the conv sum through ``drop_path``
before the identity is added, then ``attn`` (an SE with ``fc1``/``fc2``) and ``act``. The deploy
form is what timm's ``reparameterize()`` leaves: ``reparam_conv`` plus ``attn`` and ``act``.
Covers strided (no identity), identity, grouped, grouped+SE and dilated blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from tests import zoo

EPS = 1e-5
INPUT_SHAPE = (2, 3, 16, 16)


class ConvNorm(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, dilation: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, dilation * (k - 1) // 2, dilation, groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=EPS)

    def forward(self, x):
        return self.bn(self.conv(x))


class SE(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class RepVggBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, dilation=1, groups=1, se=False, inference_mode=False):
        super().__init__()
        if inference_mode:
            self.reparam_conv = nn.Conv2d(cin, cout, 3, stride, dilation, dilation, groups, bias=True)
        else:
            self.reparam_conv = None
            self.identity = nn.BatchNorm2d(cout, eps=EPS) if cin == cout and stride == 1 else None
            self.conv_kxk = ConvNorm(cin, cout, 3, stride, dilation, groups)
            self.conv_1x1 = ConvNorm(cin, cout, 1, stride, 1, groups)
            self.drop_path = nn.Identity()
        self.attn = SE(cout, 4) if se else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.attn(self.reparam_conv(x)))
        if self.identity is None:
            out = self.conv_1x1(x) + self.conv_kxk(x)
        else:
            skip = self.identity(x)
            out = self.drop_path(self.conv_1x1(x) + self.conv_kxk(x)) + skip
        return self.act(self.attn(out))


class Net(nn.Module):
    def __init__(self, inference_mode: bool = False) -> None:
        super().__init__()
        d = {"inference_mode": inference_mode}
        self.stages = nn.Sequential(
            RepVggBlock(3, 8, stride=2, **d),
            RepVggBlock(8, 8, **d),
            RepVggBlock(8, 16, stride=2, groups=2, **d),
            RepVggBlock(16, 16, groups=4, se=True, **d),
            RepVggBlock(16, 16, dilation=2, **d),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.stages(x).mean((2, 3)))


def train_model():
    return zoo.randomize_bn(Net(), seed=21).eval()


def deploy_model():
    return Net(inference_mode=True).eval()
