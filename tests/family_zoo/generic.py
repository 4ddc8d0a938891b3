"""Block types no family knows, for the `generic` family (read from the traced forward, module tree only).

Written only for these tests (issue 12, "Generic fusion"): the issue's own block (conv3x3+BN,
conv1x3+BN, conv3x1+BN, avgpool+BN, identity BN, summed, then ReLU), a block with layer scales and
an SE after the sum, a 1x1->3x3 sequence, depthwise and grouped blocks; in one small network with
several channel counts and strides. ``deploy_model`` is the project's deploy form of that network:
every block a :class:`~repvgg_cli.families.generic.deploy.GenericDeploy` whose conv has the geometry each
block declares (``deploy_conv``) and whose ``post`` is the block's traced remainder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from repvgg_cli.families.generic.deploy import GenericDeploy
from repvgg_cli.families.generic.read import post_module, read_block
from tests.family_zoo.seeded import train_form

EPS = 1e-5
INPUT_SHAPE = (2, 3, 16, 16)
MODULE_TREE_ONLY = True
"""The family reads a live block's forward: a state dict holds none of its blocks."""


def conv_bn(cin: int, cout: int, kernel, stride: int = 1, padding=0, groups: int = 1, eps: float = 1e-5) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
                         nn.BatchNorm2d(cout, eps=eps))


class AcBlock(nn.Module):
    """The issue's block: conv3x3+BN, conv1x3+BN, conv3x1+BN, avgpool+BN, identity BN, summed, ReLU
    (the pool and identity only where the shapes allow)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride
        self.square = conv_bn(cin, cout, 3, stride, 1)
        self.hor = conv_bn(cin, cout, (1, 3), stride, (0, 1))
        self.ver = conv_bn(cin, cout, (3, 1), stride, (1, 0))
        self.pool = nn.Sequential(nn.AvgPool2d(3, stride, 1), nn.BatchNorm2d(cout)) if cin == cout else None
        self.skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.square(x) + self.hor(x) + self.ver(x)
        if self.pool is not None:
            y = y + self.pool(x)
        if self.skip is not None:
            y = y + self.skip(x)
        return self.act(y)

    def deploy_conv(self) -> nn.Conv2d:
        return nn.Conv2d(self.cin, self.cout, 3, self.stride, 1)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // 2, 1)
        self.fc2 = nn.Conv2d(channels // 2, channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class ScaledBlock(nn.Module):
    """Layer scales: a 3x3 conv+BN, a 1x1 conv+BN times ``gamma``, the input; then GELU, an SE and
    a layer scale after the activation (BN eps 1e-3: read from the modules)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.dense = conv_bn(channels, channels, 3, 1, 1, eps=1e-3)
        self.point = conv_bn(channels, channels, 1, 1, 0, eps=1e-3)
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1))
        self.act = nn.GELU()
        self.se = SqueezeExcite(channels)
        self.ls = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x):
        y = self.dense(x) + self.point(x) * self.gamma + x
        return self.se(self.act(y)) * self.ls

    def deploy_conv(self) -> nn.Conv2d:
        return nn.Conv2d(self.channels, self.channels, 3, 1, 1)


class SeqBlock(nn.Module):
    """A 1x1 -> 3x3 sequence (then BN) beside a 3x3 conv+BN and an identity BN, then SiLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.seq = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False),
                                 nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.dense = conv_bn(channels, channels, 3, 1, 1)
        self.skip = nn.BatchNorm2d(channels)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.seq(x) + self.dense(x) + self.skip(x))

    def deploy_conv(self) -> nn.Conv2d:
        return nn.Conv2d(self.channels, self.channels, 3, 1, 1)


class GroupedBlock(nn.Module):
    """Grouped (or depthwise: ``groups == channels``) 3x3 and 1x1 convs+BN, an identity BN where the
    shapes allow, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.cin, self.cout, self.stride, self.groups = cin, cout, stride, groups
        self.dense = conv_bn(cin, cout, 3, stride, 1, groups=groups)
        self.point = conv_bn(cin, cout, 1, stride, 0, groups=groups)
        self.skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.dense(x) + self.point(x)
        if self.skip is not None:
            y = y + self.skip(x)
        return self.act(y)

    def deploy_conv(self) -> nn.Conv2d:
        return nn.Conv2d(self.cin, self.cout, 3, self.stride, 1, groups=self.groups)


class GenericNet(nn.Module):
    """A stem, six generic blocks (8 -> 8 -> 16 -> 16 -> 16 -> 16 -> 24 channels, two of stride 2), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(
            AcBlock(8, 8), AcBlock(8, 16, stride=2), ScaledBlock(16), SeqBlock(16),
            GroupedBlock(16, 16, groups=16), GroupedBlock(16, 24, stride=2, groups=4),
        )
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def deploy_form(block: nn.Module) -> GenericDeploy:
    """The project's deploy form of one block: its declared conv, then its traced remainder."""
    reading = read_block(block)
    assert reading is not None, type(block).__name__
    return GenericDeploy(block.deploy_conv(), post_module(block, reading))


def train_model() -> GenericNet:
    return train_form(GenericNet, seed=31)


def deploy_model() -> GenericNet:
    net = GenericNet().eval()
    for index, block in enumerate(net.blocks):
        net.blocks[index] = deploy_form(block)
    return net
