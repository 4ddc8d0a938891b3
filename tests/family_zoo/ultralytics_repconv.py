"""Toy models for the `ultralytics_repconv` family, in ultralytics' layout.

Written for these tests from the published attribute names and forward order of
ultralytics/ultralytics ``nn/modules/conv.py`` (``Conv``, ``LightConv``, ``RepConv``),
``nn/modules/block.py`` (``RepC3``) and the RepConv part of ``nn/tasks.py``'s ``fuse``
(``fuse_convs`` then ``m.forward = m.forward_fuse``). The fusion math here is this file's own, an
independent reference for the tests. Every BN has eps 1e-3, momentum 0.03 (ultralytics'
``initialize_weights``). The classes live here, importable, so whole pickled models can be loaded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests import zoo

EPS = 1e-3
INPUT_SHAPE = (2, 3, 16, 16)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=EPS, momentum=0.03)


def autopad(k: int, p: int | None = None, d: int = 1) -> int:
    if d > 1:
        k = d * (k - 1) + 1
    return k // 2 if p is None else p


class Conv(nn.Module):
    """conv (no bias) -> bn -> act; ``forward_fuse`` skips the bn once it is folded."""

    default_act = nn.SiLU()

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1, d: int = 1,
                 act: bool | nn.Module = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = _bn(c2)
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))


class DWConv(Conv):
    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, d: int = 1, act: bool | nn.Module = True) -> None:
        super().__init__(c1, c2, k, s, g=math.gcd(c1, c2), d=d, act=act)


class LightConv(nn.Module):
    """A 1x1 ``conv1`` then a depthwise kxk ``conv2``, in series: it must not be taken for a RepConv."""

    def __init__(self, c1: int, c2: int, k: int = 1, act: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = Conv(c1, c2, 1, act=False)
        self.conv2 = DWConv(c2, c2, k, act=act if act is not None else nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    std = (bn.running_var + bn.eps).sqrt()
    return conv.weight * (bn.weight / std).reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * bn.weight / std


class RepConv(nn.Module):
    """conv1 (kxk) + conv2 (1x1) + optional identity ``bn``, then act; fused: ``conv`` + ``forward_fuse``."""

    default_act = nn.SiLU()

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, p: int = 1, g: int = 1, d: int = 1,
                 act: bool | nn.Module = True, bn: bool = False, deploy: bool = False) -> None:
        super().__init__()
        assert k == 3 and p == 1
        self.g = g
        self.c1 = c1
        self.c2 = c2
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()
        self.bn = _bn(c1) if bn and c2 == c1 and s == 1 else None
        self.conv1 = Conv(c1, c2, k, s, p=p, g=g, act=False)
        self.conv2 = Conv(c1, c2, 1, s, p=(p - k // 2), g=g, act=False)

    def forward_fuse(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))

    def forward(self, x: Tensor) -> Tensor:
        identity = 0 if self.bn is None else self.bn(x)
        return self.act(self.conv1(x) + self.conv2(x) + identity)

    @torch.no_grad()
    def fuse_convs(self) -> None:
        """This file's own fusion (an independent reference), leaving ultralytics' deploy attributes."""
        if hasattr(self, "conv"):
            return
        w3, b3 = _folded(self.conv1.conv, self.conv1.bn)
        w1, b1 = _folded(self.conv2.conv, self.conv2.bn)
        weight, bias = w3 + F.pad(w1, [1, 1, 1, 1]), b3 + b1
        if self.bn is not None:
            per_group = self.c1 // self.g
            eye = torch.zeros_like(w3)
            for i in range(self.c1):
                eye[i, i % per_group, 1, 1] = 1.0
            std = (self.bn.running_var + self.bn.eps).sqrt()
            weight = weight + eye * (self.bn.weight / std).reshape(-1, 1, 1, 1)
            bias = bias + self.bn.bias - self.bn.running_mean * self.bn.weight / std
        c = self.conv1.conv
        self.conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
                              c.groups, bias=True).requires_grad_(False)
        self.conv.weight.copy_(weight)
        self.conv.bias.copy_(bias)
        del self.conv1
        del self.conv2
        del self.bn


class RepC3(nn.Module):
    """RT-DETR's RepC3: ``cv3(m(cv1(x)) + cv2(x))`` with ``m`` a Sequential of RepConv."""

    def __init__(self, c1: int, c2: int, n: int = 2, e: float = 1.0) -> None:
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(c1, hidden, 1, 1)
        self.m = nn.Sequential(*[RepConv(hidden, hidden) for _ in range(n)])
        self.cv3 = Conv(hidden, c2, 1, 1) if hidden != c2 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(self.m(self.cv1(x)) + self.cv2(x))


class TinyRepConvNet(nn.Module):
    """RepConv blocks with and without the identity BN, strided, grouped; plain Conv and LightConv beside."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv(3, 8, 3, 2)
        self.rep_id = RepConv(8, 8, bn=True)
        self.rep = RepConv(8, 8)
        self.rep_down = RepConv(8, 8, s=2, bn=True)
        self.rep_grouped = RepConv(8, 8, g=2, bn=True)
        self.light = LightConv(8, 8, 3)
        self.c3 = RepC3(8, 8, n=2)
        self.rep_wide = RepConv(8, 16, g=4)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.rep_grouped(self.rep_down(self.rep(self.rep_id(self.stem(x)))))
        return self.head(self.rep_wide(self.c3(self.light(x))))

    def fuse(self) -> "TinyRepConvNet":
        """The RepConv part of ultralytics' ``BaseModel.fuse``: ``fuse_convs`` and ``forward_fuse``."""
        for module in list(self.modules()):
            if isinstance(module, RepConv):
                module.fuse_convs()
                module.forward = module.forward_fuse
        return self


def train_model() -> nn.Module:
    return zoo.randomize_bn(TinyRepConvNet(), seed=81).eval()


def deploy_model() -> nn.Module:
    return TinyRepConvNet().fuse().eval()
