"""Toy models for the `mmpretrain` family: mmpretrain's RepVGGBlock layout and forward order.

Written for these tests from the layout of open-mmlab/mmpretrain
``mmpretrain/models/backbones/repvgg.py``: ``stem`` and ``stage_<i>`` Sequentials of blocks with
``branch_3x3``/``branch_1x1`` (``conv`` + ``norm``), an optional ``branch_norm`` identity BN
(in == out, stride 1, padding == dilation), ``se_layer`` (``conv1.conv``/``conv2.conv``, as
mmcv's ConvModule names them) and ``act``; deploy form ``branch_reparam``. Like upstream, the
deploy forward skips ``se_layer`` (``UPSTREAM_SE_IN_DEPLOY = False``); a test flips it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tests import zoo

EPS = 1e-5
INPUT_SHAPE = (2, 3, 32, 32)


class ConvOnly(nn.Module):
    """mmcv ConvModule without norm/act: the conv sits under ``conv`` (bias on)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class SELayer(nn.Module):
    """mmpretrain's SELayer: pool, ``conv1`` + ReLU, ``conv2`` + Sigmoid, rescale."""

    def __init__(self, channels: int, ratio: int = 4) -> None:
        super().__init__()
        squeeze = max(channels // ratio, 1)
        self.conv1 = ConvOnly(channels, squeeze)
        self.conv2 = ConvOnly(squeeze, channels)

    def forward(self, x: Tensor) -> Tensor:
        w = x.mean((2, 3), keepdim=True)
        w = torch.sigmoid(self.conv2(torch.relu(self.conv1(w))))
        return x * w


def conv_norm(cin: int, cout: int, k: int, stride: int, padding: int, dilation: int, groups: int) -> nn.Sequential:
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False))
    seq.add_module("norm", nn.BatchNorm2d(cout, eps=EPS))
    return seq


class RepVGGBlock(nn.Module):
    UPSTREAM_SE_IN_DEPLOY = False

    def __init__(self, cin: int, cout: int, stride: int = 1, padding: int = 1, dilation: int = 1,
                 groups: int = 1, use_se: bool = False, deploy: bool = False) -> None:
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.deploy = deploy
        self.se_cfg = {"ratio": 4} if use_se else None
        if deploy:
            self.branch_reparam = nn.Conv2d(cin, cout, 3, stride, padding, dilation, groups, bias=True)
        else:
            identity = cin == cout and stride == 1 and padding == dilation
            self.branch_norm = nn.BatchNorm2d(cin, eps=EPS) if identity else None
            self.branch_3x3 = conv_norm(cin, cout, 3, stride, padding, dilation, groups)
            self.branch_1x1 = conv_norm(cin, cout, 1, stride, 0, 1, groups)
        self.se_layer = SELayer(cout) if use_se else None
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            out = self.branch_reparam(x)
            if self.UPSTREAM_SE_IN_DEPLOY and self.se_cfg is not None:
                out = self.se_layer(out)
            return self.act(out)
        total = self.branch_3x3(x) + self.branch_1x1(x)
        if self.branch_norm is not None:
            total = total + self.branch_norm(x)
        if self.se_cfg is not None:
            total = self.se_layer(total)
        return self.act(total)


class FixedSEBlock(RepVGGBlock):
    """The same block with a deploy forward that keeps ``se_layer`` (a patched mmpretrain)."""

    UPSTREAM_SE_IN_DEPLOY = True


class RepVGG(nn.Module):
    """A tiny mmpretrain-style RepVGG backbone returning the outputs of ``out_indices``.

    Stage 1 is strided; stage 2 grouped (g=2: strided without identity, then with one); stage 3
    dilated (padding == dilation == 2, so both its blocks keep their identity).
    """

    def __init__(self, deploy: bool = False, use_se: bool = False, block: type = RepVGGBlock,
                 widths: tuple[int, ...] = (8, 16, 16), blocks: tuple[int, ...] = (2, 2, 2),
                 strides: tuple[int, ...] = (2, 2, 1), dilations: tuple[int, ...] = (1, 1, 2),
                 group_layers: frozenset[int] = frozenset({3, 4}), out_indices: tuple[int, ...] = (1, 2)) -> None:
        super().__init__()
        self.out_indices = out_indices
        self.stem = block(3, 8, stride=2, use_se=use_se, deploy=deploy)
        cin, index = 8, 1
        self.stages = []
        for i, (cout, n, s, d) in enumerate(zip(widths, blocks, strides, dilations)):
            layers = []
            for j in range(n):
                groups = 2 if index in group_layers else 1
                layers.append(block(cin, cout, stride=s if j == 0 else 1, padding=d, dilation=d,
                                    groups=groups, use_se=use_se, deploy=deploy))
                cin, index = cout, index + 1
            self.add_module(f"stage_{i + 1}", nn.Sequential(*layers))
            self.stages.append(f"stage_{i + 1}")

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        x = self.stem(x)
        outs = []
        for i, name in enumerate(self.stages):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)


def train_model():
    return zoo.randomize_bn(RepVGG(), seed=21).eval()


def deploy_model():
    return RepVGG(deploy=True).eval()
