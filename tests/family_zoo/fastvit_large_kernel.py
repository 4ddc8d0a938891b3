"""Toy models for the `fastvit_large_kernel` family (timm fastvit ``ReparamLargeKernelConv``).

Written for this project from timm's published layout (``timm/models/fastvit.py``): a
``ConvNormAct``-style pair is ``conv`` (no bias) then ``bn``; the block is
``act(se(large_conv(x) + small_conv(x)))`` and its deploy form ``act(se(reparam_conv(x)))``.
Variants: dense and strided, depthwise channel-expanding with SE and an activation (FastViT's
patch embedding), grouped stride 1 with a 5×5 large kernel, and a block without ``small_conv``.
The ``ConvNorm``, ``SqueezeExcite`` and ``MobileOneBlock`` toys are shared with the other fastvit zoos.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tests import zoo

EPS = 1e-5
INPUT_SHAPE = (2, 3, 32, 32)


class ConvNorm(nn.Module):
    """timm ``ConvNormAct(..., apply_act=False)``: ``conv`` (padding k//2, no bias), then ``bn``."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class SqueezeExcite(nn.Module):
    """timm ``SqueezeExcite`` layout: ``fc1`` and ``fc2`` 1×1 convs on the pooled input, sigmoid gate."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class MobileOneBlock(nn.Module):
    """timm fastvit ``MobileOneBlock`` train form: ``act(se(identity + conv_scale + sum(conv_kxk)))``."""

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        groups: int = 1,
        use_act: bool = True,
        use_scale_branch: bool = True,
        num_conv_branches: int = 1,
    ) -> None:
        super().__init__()
        self.reparam_conv = None
        self.se = nn.Identity()
        self.identity = nn.BatchNorm2d(cin, eps=EPS) if cin == cout and stride == 1 else None
        self.conv_kxk = (
            nn.ModuleList(ConvNorm(cin, cout, k, stride, groups) for _ in range(num_conv_branches))
            if num_conv_branches > 0
            else None
        )
        self.conv_scale = ConvNorm(cin, cout, 1, stride, groups) if k > 1 and use_scale_branch else None
        self.act = nn.GELU() if use_act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = 0
        if self.identity is not None:
            out = out + self.identity(x)
        if self.conv_scale is not None:
            out = out + self.conv_scale(x)
        if self.conv_kxk is not None:
            for branch in self.conv_kxk:
                out = out + branch(x)
        return self.act(self.se(out))


class ReparamLargeKernelConv(nn.Module):
    """timm fastvit ``ReparamLargeKernelConv``; ``deploy=True`` builds ``reparam_conv`` instead."""

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        stride: int,
        groups: int,
        small_kernel: int | None = 3,
        use_se: bool = False,
        use_act: bool = False,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        if deploy:
            self.reparam_conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=True)
        else:
            self.reparam_conv = None
            self.large_conv = ConvNorm(cin, cout, k, stride, groups)
            if small_kernel is not None:
                self.small_conv = ConvNorm(cin, cout, small_kernel, stride, groups)
        self.se = SqueezeExcite(cout, max(cout // 4, 1)) if use_se else nn.Identity()
        self.act = nn.GELU() if use_act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam_conv is not None:
            out = self.reparam_conv(x)
        else:
            out = self.large_conv(x)
            small = getattr(self, "small_conv", None)
            if small is not None:
                out = out + small(x)
        return self.act(self.se(out))


class LargeKernelNet(nn.Module):
    def __init__(self, deploy: bool = False) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            ReparamLargeKernelConv(3, 8, 7, 2, 1, small_kernel=3, deploy=deploy),
            ReparamLargeKernelConv(8, 16, 7, 2, 8, small_kernel=3, use_se=True, use_act=True, deploy=deploy),
            ReparamLargeKernelConv(16, 16, 5, 1, 4, small_kernel=3, use_act=True, deploy=deploy),
            ReparamLargeKernelConv(16, 16, 5, 1, 16, small_kernel=None, deploy=deploy),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x).mean((2, 3)))


def train_model() -> nn.Module:
    return zoo.randomize_bn(LargeKernelNet(), seed=31).eval()


def deploy_model() -> nn.Module:
    return LargeKernelNet(deploy=True).eval()
