"""Toy models for the `apple_mobileone` family: apple/ml-mobileone's MobileOne layout, from scratch.

Same attribute names and forward order as ml-mobileone's ``MobileOneBlock``: ``rbr_skip`` BN,
``rbr_scale`` (1×1 ``Sequential(conv, bn)``), ``rbr_conv`` (ModuleList of k×k ``Sequential(conv,
bn)``), summed, then ``se`` (``SEBlock`` with ``reduce``/``expand``) and ``activation`` (ReLU);
``inference_mode`` selects ``reparam_conv``. Like the MobileOne network: a strided stem, then
depthwise 3×3 and pointwise 1×1 blocks (with and without skip, strided, with SE, 2 branches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests import zoo

EPS = 1e-5
INPUT_SHAPE = (2, 3, 16, 16)


class SEBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // 4, 1)
        self.expand = nn.Conv2d(channels // 4, channels, 1)

    def forward(self, x):
        w = torch.sigmoid(self.expand(F.relu(self.reduce(F.avg_pool2d(x, x.shape[2:])))))
        return x * w


def conv_bn(cin, cout, k, stride, padding, groups):
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout, eps=EPS))
    return seq


class MobileOneBlock(nn.Module):
    def __init__(self, cin, cout, k, stride=1, padding=0, groups=1, inference_mode=False, use_se=False,
                 num_conv_branches=1):
        super().__init__()
        self.inference_mode = inference_mode
        self.num_conv_branches = num_conv_branches
        self.se = SEBlock(cout) if use_se else nn.Identity()
        self.activation = nn.ReLU()
        if inference_mode:
            self.reparam_conv = nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=True)
        else:
            self.rbr_skip = nn.BatchNorm2d(cin, eps=EPS) if cin == cout and stride == 1 else None
            self.rbr_conv = nn.ModuleList(conv_bn(cin, cout, k, stride, padding, groups) for _ in range(num_conv_branches))
            self.rbr_scale = conv_bn(cin, cout, 1, stride, 0, groups) if k > 1 else None

    def forward(self, x):
        if self.inference_mode:
            return self.activation(self.se(self.reparam_conv(x)))
        out = (self.rbr_skip(x) if self.rbr_skip is not None else 0) + (
            self.rbr_scale(x) if self.rbr_scale is not None else 0
        )
        for ix in range(self.num_conv_branches):
            out = out + self.rbr_conv[ix](x)
        return self.activation(self.se(out))


class Net(nn.Module):
    def __init__(self, inference_mode: bool = False) -> None:
        super().__init__()
        d = {"inference_mode": inference_mode, "num_conv_branches": 2}
        self.stage0 = MobileOneBlock(3, 8, 3, stride=2, padding=1, **d)
        self.stage1 = nn.Sequential(
            MobileOneBlock(8, 8, 3, padding=1, groups=8, **d),
            MobileOneBlock(8, 16, 1, **d),
            MobileOneBlock(16, 16, 3, stride=2, padding=1, groups=16, **d),
            MobileOneBlock(16, 16, 1, use_se=True, **d),
        )
        self.linear = nn.Linear(16, 10)

    def forward(self, x):
        return self.linear(self.stage1(self.stage0(x)).mean((2, 3)))


def train_model():
    return zoo.randomize_bn(Net(), seed=23).eval()


def deploy_model():
    return Net(inference_mode=True).eval()
