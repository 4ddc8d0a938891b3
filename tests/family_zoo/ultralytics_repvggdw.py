"""Toy models for the `ultralytics_repvggdw` family, in ultralytics' layout.

Written for these tests from the published attribute names and forward order of
ultralytics/ultralytics ``nn/modules/block.py`` (``RepVGGDW``, ``CIB``) and the RepVGGDW part of
``nn/tasks.py``'s ``fuse`` (``fuse`` then ``m.forward = m.forward_fuse``); the fusion math here is
this file's own. Every BN has eps 1e-3 (ultralytics' ``initialize_weights``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests import zoo

from .ultralytics_repconv import EPS, Conv  # noqa: F401 - EPS: the contract tests read it from every zoo module

INPUT_SHAPE = (2, 3, 16, 16)


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    std = (bn.running_var + bn.eps).sqrt()
    return conv.weight * (bn.weight / std).reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * bn.weight / std


class RepVGGDW(nn.Module):
    """7x7 depthwise ``conv`` + 3x3 depthwise ``conv1``, then SiLU; fused: a Conv2d at ``conv``."""

    def __init__(self, ed: int) -> None:
        super().__init__()
        self.conv = Conv(ed, ed, 7, 1, 3, g=ed, act=False)
        self.conv1 = Conv(ed, ed, 3, 1, 1, g=ed, act=False)
        self.dim = ed
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x) + self.conv1(x))

    def forward_fuse(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))

    @torch.no_grad()
    def fuse(self) -> None:
        w7, b7 = _folded(self.conv.conv, self.conv.bn)
        w3, b3 = _folded(self.conv1.conv, self.conv1.bn)
        c = self.conv.conv
        fused = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                          bias=True).requires_grad_(False)
        fused.weight.copy_(w7 + F.pad(w3, [2, 2, 2, 2]))
        fused.bias.copy_(b7 + b3)
        self.conv = fused
        del self.conv1


class CIB(nn.Module):
    """YOLOv10's conditional identity block with ``lk=True`` (a RepVGGDW in the middle)."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, e: float = 0.5) -> None:
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = nn.Sequential(
            Conv(c1, c1, 3, g=c1),
            Conv(c1, 2 * hidden, 1),
            RepVGGDW(2 * hidden),
            Conv(2 * hidden, c2, 1),
            Conv(c2, c2, 3, g=c2),
        )
        self.add = shortcut and c1 == c2

    def forward(self, x: Tensor) -> Tensor:
        return x + self.cv1(x) if self.add else self.cv1(x)


class TinyRepVGGDWNet(nn.Module):
    """Two RepVGGDW (one inside a CIB) beside a plain 7x7 depthwise Conv that must stay untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv(3, 8, 3, 2)
        self.cib = CIB(8, 8)
        self.dw7 = Conv(8, 8, 7, 1, 3, g=8)
        self.expand = Conv(8, 12, 1)
        self.lk = RepVGGDW(12)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lk(self.expand(self.dw7(self.cib(self.stem(x))))))

    def fuse(self) -> "TinyRepVGGDWNet":
        """The RepVGGDW part of ultralytics' ``BaseModel.fuse``."""
        for module in list(self.modules()):
            if isinstance(module, RepVGGDW):
                module.fuse()
                module.forward = module.forward_fuse
        return self


def train_model() -> nn.Module:
    return zoo.randomize_bn(TinyRepVGGDWNet(), seed=91).eval()


def deploy_model() -> nn.Module:
    return TinyRepVGGDWNet().fuse().eval()
