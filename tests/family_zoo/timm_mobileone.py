"""Toy models for the `timm_mobileone` family: timm's MobileOneBlock layouts, written from scratch.

Two block classes with timm's attribute names and forward order: the byobnet one (``conv_kxk``
ModuleList, ``conv_scale``, ``identity``, ``drop_path``, ``attn``, ``act``) and the fastvit one
(the same branches, ``se`` and ``act``, an ``inference_mode`` flag). The deploy form is what timm's
``reparameterize()`` leaves: ``reparam_conv`` plus the SE and ``act``. Covers a strided stem,
depthwise (group_size=1) with several branches and identity, pointwise (k=1, no scale branch)
with and without identity, strided depthwise, SE, and a fastvit block without scale branch.
"""

from __future__ import annotations

import torch
from torch import nn

from tests import zoo

EPS = 1e-5
INPUT_SHAPE = (2, 3, 16, 16)


class ConvNorm(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=EPS)

    def forward(self, x):
        return self.bn(self.conv(x))


class SE(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, 4, 1)
        self.fc2 = nn.Conv2d(4, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class ByobMobileOneBlock(nn.Module):
    """byobnet layout: SE in ``attn``, ``drop_path`` on the conv sum before the identity."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, branches=1, se=False, inference_mode=False):
        super().__init__()
        if inference_mode:
            self.reparam_conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=True)
        else:
            self.reparam_conv = None
            self.identity = nn.BatchNorm2d(cout, eps=EPS) if cin == cout and stride == 1 else None
            self.conv_kxk = nn.ModuleList(ConvNorm(cin, cout, k, stride, groups) for _ in range(branches))
            self.conv_scale = ConvNorm(cin, cout, 1, stride, groups) if k > 1 else None
            self.drop_path = nn.Identity()
        self.attn = SE(cout) if se else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.attn(self.reparam_conv(x)))
        skip = self.identity(x) if self.identity is not None else 0
        out = self.conv_scale(x) if self.conv_scale is not None else 0
        for branch in self.conv_kxk:
            out = out + branch(x)
        out = self.drop_path(out) + skip
        return self.act(self.attn(out))


class FastVitMobileOneBlock(nn.Module):
    """fastvit layout: SE in ``se``, GELU ``act``, ``inference_mode`` flag, optional scale branch."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, branches=1, se=False, use_scale_branch=True,
                 inference_mode=False):
        super().__init__()
        self.inference_mode = inference_mode
        self.se = SE(cout) if se else nn.Identity()
        if inference_mode:
            self.reparam_conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=True)
        else:
            self.reparam_conv = None
            self.identity = nn.BatchNorm2d(cin, eps=EPS) if cin == cout and stride == 1 else None
            self.conv_kxk = nn.ModuleList(ConvNorm(cin, cout, k, stride, groups) for _ in range(branches))
            self.conv_scale = ConvNorm(cin, cout, 1, stride, groups) if k > 1 and use_scale_branch else None
        self.act = nn.GELU()

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.se(self.reparam_conv(x)))
        out = (self.identity(x) if self.identity is not None else 0) + (
            self.conv_scale(x) if self.conv_scale is not None else 0
        )
        for branch in self.conv_kxk:
            out = out + branch(x)
        return self.act(self.se(out))


class Net(nn.Module):
    def __init__(self, inference_mode: bool = False) -> None:
        super().__init__()
        d = {"inference_mode": inference_mode}
        self.stem = ByobMobileOneBlock(3, 8, stride=2, branches=2, **d)
        self.stages = nn.Sequential(
            ByobMobileOneBlock(8, 8, groups=8, branches=3, **d),
            ByobMobileOneBlock(8, 16, k=1, **d),
            ByobMobileOneBlock(16, 16, k=1, branches=2, se=True, **d),
            ByobMobileOneBlock(16, 16, stride=2, groups=16, branches=2, **d),
            FastVitMobileOneBlock(16, 16, groups=16, se=True, **d),
            FastVitMobileOneBlock(16, 16, groups=4, use_scale_branch=False, branches=2, **d),
            FastVitMobileOneBlock(16, 24, k=1, **d),
        )
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def train_model():
    return zoo.randomize_bn(Net(), seed=22).eval()


def deploy_model():
    return Net(inference_mode=True).eval()
