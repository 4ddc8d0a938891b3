"""Toy models for the `qarepvgg` family: YOLOv6's QARepVGGBlock / QARepVGGBlockV2 layout.

Written for these tests from the published attribute names and forward order of meituan/YOLOv6
``yolov6/layers/common.py``: ``rbr_dense`` (conv + bn), a plain 1x1 conv ``rbr_1x1``, an
``nn.Identity`` ``rbr_identity`` (in == out, stride 1), V2's ``rbr_avg`` average pool, summed,
then ``se`` (nn.Identity), the post-sum ``bn`` and ReLU. ``switch_to_deploy`` (this file's own
math) leaves ``rbr_reparam`` and keeps ``bn``, as YOLOv6 does; ``fold_post_bn=True`` also folds
``bn`` and replaces it by nn.Identity (the converter's ``--fold-post-bn`` deploy form).
Every BN has eps 1e-3 (YOLOv6's ``initialize_weights``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests import zoo

EPS = 1e-3
INPUT_SHAPE = (2, 3, 16, 16)
OPTIONS = {"qa_variant": "v1"}  # train_model() builds QARepVGGBlock (V1); a state dict cannot tell


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=EPS, momentum=0.03)


def conv_bn(cin: int, cout: int, k: int, s: int, p: int, g: int = 1) -> nn.Sequential:
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, s, p, groups=g, bias=False))
    seq.add_module("bn", _bn(cout))
    return seq


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    std = (bn.running_var + bn.eps).sqrt()
    return bn.weight / std, bn.bias - bn.running_mean * bn.weight / std


class QARepVGGBlock(nn.Module):
    """QARepVGGBlock; ``deploy=True`` builds what its ``switch_to_deploy`` leaves (``bn`` kept)."""

    def __init__(self, cin: int, cout: int, k: int = 3, s: int = 1, p: int = 1, g: int = 1,
                 deploy: bool = False, fold_post_bn: bool = False) -> None:
        super().__init__()
        self.deploy = deploy
        self.groups = g
        self.in_channels = cin
        self.out_channels = cout
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()
        if deploy:
            self.rbr_reparam = nn.Conv2d(cin, cout, k, s, p, groups=g, bias=True)
            self.bn = nn.Identity() if fold_post_bn else _bn(cout)
        else:
            self.rbr_identity = nn.Identity() if cin == cout and s == 1 else None
            self.rbr_dense = conv_bn(cin, cout, k, s, p, g)
            self.rbr_1x1 = nn.Conv2d(cin, cout, 1, s, groups=g, bias=False)
            self.bn = _bn(cout)

    def _branches(self, x: Tensor) -> Tensor:
        total = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            total = total + self.rbr_identity(x)
        return total

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.bn(self.se(self.rbr_reparam(x))))
        return self.nonlinearity(self.bn(self.se(self._branches(x))))

    def _kernel_bias(self) -> tuple[Tensor, Tensor]:
        scale, shift = _bn_scale_shift(self.rbr_dense.bn)
        k = self.rbr_dense.conv.kernel_size[0]
        weight = self.rbr_dense.conv.weight * scale.reshape(-1, 1, 1, 1)
        weight = weight + F.pad(self.rbr_1x1.weight, [k // 2] * 4)
        if self.rbr_identity is not None:
            per_group = self.in_channels // self.groups
            for i in range(self.in_channels):
                weight[i, i % per_group, k // 2, k // 2] += 1.0
        return weight, shift

    @torch.no_grad()
    def switch_to_deploy(self, fold_post_bn: bool = False) -> None:
        weight, bias = self._kernel_bias()
        if fold_post_bn:
            scale, shift = _bn_scale_shift(self.bn)
            weight, bias = weight * scale.reshape(-1, 1, 1, 1), bias * scale + shift
            self.bn = nn.Identity()
        c = self.rbr_dense.conv
        self.rbr_reparam = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                                     c.dilation, c.groups, bias=True)
        self.rbr_reparam.weight.copy_(weight)
        self.rbr_reparam.bias.copy_(bias)
        for name in ("rbr_dense", "rbr_1x1", "rbr_identity", "rbr_avg"):
            if hasattr(self, name):
                delattr(self, name)
        self.deploy = True


class QARepVGGBlockV2(QARepVGGBlock):
    """QARepVGGBlockV2: an extra ``rbr_avg`` AvgPool2d(k, s, p) where the identity is."""

    def __init__(self, cin: int, cout: int, k: int = 3, s: int = 1, p: int = 1, g: int = 1,
                 deploy: bool = False, fold_post_bn: bool = False) -> None:
        super().__init__(cin, cout, k, s, p, g, deploy, fold_post_bn)
        if not deploy:
            self.rbr_avg = nn.AvgPool2d(k, s, p) if cin == cout and s == 1 else None

    def _branches(self, x: Tensor) -> Tensor:
        total = super()._branches(x)
        if self.rbr_avg is not None:
            total = total + self.rbr_avg(x)
        return total

    def _kernel_bias(self) -> tuple[Tensor, Tensor]:
        weight, bias = super()._kernel_bias()
        if self.rbr_avg is not None:
            k = self.rbr_avg.kernel_size
            per_group = self.in_channels // self.groups
            for i in range(self.in_channels):
                weight[i, i % per_group] += 1.0 / (k * k)
        return weight, bias


class TinyQARepVGG(nn.Module):
    """Strided (in != out), identity, widening, grouped widening, identity blocks."""

    def __init__(self, deploy: bool = False, fold_post_bn: bool = False, block: type = QARepVGGBlock,
                 grouped_identity: bool = False, strided_same: bool = False) -> None:
        super().__init__()
        kw = dict(deploy=deploy, fold_post_bn=fold_post_bn)
        blocks = [
            block(3, 8, s=2, **kw),
            block(8, 8, **kw),
            block(8, 16, **kw),
            block(16, 24, g=4, **kw),
            block(24, 24, **kw),
        ]
        if grouped_identity:
            blocks.append(block(24, 24, g=3, **kw))
        if strided_same:
            blocks.append(block(24, 24, s=2, **kw))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(24, 5, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x))

    def switch_to_deploy(self, fold_post_bn: bool = False) -> "TinyQARepVGG":
        for module in self.blocks:
            module.switch_to_deploy(fold_post_bn)
        return self


def train_model(**kwargs) -> nn.Module:
    return zoo.randomize_bn(TinyQARepVGG(**kwargs), seed=61).eval()


def deploy_model(**kwargs) -> nn.Module:
    return TinyQARepVGG(deploy=True, **kwargs).eval()
