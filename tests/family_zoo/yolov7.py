"""Toy models for the `yolov7` family: YOLOv7's RepConv layout (WongKinYiu/yolov7 models/common.py).

Written for these tests from the published attribute names and forward order: ``rbr_dense`` and
``rbr_1x1`` are ``nn.Sequential(conv, bn)``, ``rbr_identity`` a BN (in == out, stride 1) or None,
summed, then SiLU; ``deploy=True`` builds ``rbr_reparam``. Every BN has eps 1e-3, momentum 0.03.
"""

from __future__ import annotations

from torch import Tensor, nn

from tests import zoo

EPS = 1e-3
INPUT_SHAPE = (2, 3, 16, 16)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=EPS, momentum=0.03)


class RepConv(nn.Module):
    """YOLOv7's RepConv (k = 3, padding 1), train or deploy form."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, g: int = 1, act: bool | nn.Module = True,
                 deploy: bool = False) -> None:
        super().__init__()
        self.deploy = deploy
        self.groups = g
        self.in_channels = c1
        self.out_channels = c2
        self.act = nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())
        if deploy:
            self.rbr_reparam = nn.Conv2d(c1, c2, k, s, k // 2, groups=g, bias=True)
        else:
            self.rbr_identity = _bn(c1) if c1 == c2 and s == 1 else None
            self.rbr_dense = nn.Sequential(nn.Conv2d(c1, c2, k, s, k // 2, groups=g, bias=False), _bn(c2))
            self.rbr_1x1 = nn.Sequential(nn.Conv2d(c1, c2, 1, s, 0, groups=g, bias=False), _bn(c2))

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "rbr_reparam"):
            return self.act(self.rbr_reparam(x))
        total = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            total = total + self.rbr_identity(x)
        return self.act(total)


class TinyYolov7(nn.Module):
    """Strided (no identity), identity, strided with in == out, grouped with identity, grouped widening."""

    def __init__(self, deploy: bool = False) -> None:
        super().__init__()
        self.stem = RepConv(3, 8, s=2, deploy=deploy)
        self.same = RepConv(8, 8, deploy=deploy)
        self.down = RepConv(8, 8, s=2, deploy=deploy)
        self.grouped = RepConv(8, 8, g=2, deploy=deploy)
        self.wide = RepConv(8, 16, g=4, deploy=deploy)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.wide(self.grouped(self.down(self.same(self.stem(x)))))
        return self.head(x)


def train_model() -> nn.Module:
    return zoo.randomize_bn(TinyYolov7(), seed=71).eval()


def deploy_model() -> nn.Module:
    return TinyYolov7(deploy=True).eval()
