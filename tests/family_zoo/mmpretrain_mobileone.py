"""Toy models for mmpretrain's MobileOne backbone (Vasu et al., "An Improved One millisecond Mobile Backbone").

Written for these tests from the layout and conversion math of open-mmlab/mmpretrain
``mmpretrain/models/backbones/mobileone.py`` and ``mmpretrain/models/utils/se_layer.py`` (no
code copied; mmcv's ``ConvModule`` replaced by a minimal equivalent with its key names). Names
and forward order are upstream's:

- ``MobileOneBlock``: ``act(se(branch_norm(x) + branch_scale(x) + sum(branch_conv_list[i](x))))``.
  ``branch_norm`` is a BN (in == out and stride 1, else None); ``branch_scale`` a 1×1
  ``Sequential(conv, norm)`` (padding 0, only when k > 1); ``branch_conv_list`` a ModuleList of
  ``num_convs`` k×k ``Sequential(conv, norm)`` with the block's padding and dilation. Note the
  BN inside each branch is named ``norm``, not ``bn``. All convs are bias-free and share stride
  and groups. Deploy form: ``branch_reparam`` (k×k conv with bias, the block's padding and
  dilation).
- ``se`` is an ``SELayer`` (``conv1``/``conv2`` ConvModules, keys ``conv1.conv.*``/``conv2.conv.*``,
  squeeze = make_divisible(channels // ratio, 8)) or Identity; ``act`` ReLU. Both stay.
- ``switch_to_deploy`` folds each branch's BN into its conv, pads the 1×1 kernel by k//2 and
  turns ``branch_norm`` into a k×k grouped identity kernel (``K[i, i % (C/g), k//2, k//2] = 1``)
  before folding it, sums, and deletes the branches. BN eps is PyTorch's default 1e-5.

The toy backbone has upstream's ``stage0`` (dense strided 3×3, one conv branch) and stages of
depthwise 3×3 / pointwise 1×1 block pairs (first depthwise block strided) with 2 and 3 conv
branches and SE on the last pair (ratio 16). Upstream's backbone never dilates or uses groups
other than 1 and depthwise, but the block takes both, so stage 2 ends with a grouped (g=4) 3×3
block with dilation 2 and padding 2. ``forward`` returns the outputs of ``out_indices`` (0, 1).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .seeded import train_form

EPS = 1e-5
INPUT_SHAPE = (2, 3, 32, 32)


def make_divisible(value: float, divisor: int, min_value: int | None = None, min_ratio: float = 0.9) -> int:
    """mmpretrain's channel rounding: nearest multiple of ``divisor``, at least ``min_value``."""
    floor = divisor if min_value is None else min_value
    rounded = max(floor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < min_ratio * value else rounded


class ConvModule(nn.Module):
    """mmcv ConvModule in its default order (conv, norm, act) with mmcv's names ``conv``, ``bn``, ``activate``.

    ``bias='auto'`` gives the conv a bias exactly when there is no norm, as in mmcv.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 with_bn: bool = False, act: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=not with_bn)
        self.bn = nn.BatchNorm2d(out_channels, eps=EPS) if with_bn else None
        self.activate = act

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.activate(x) if self.activate is not None else x


class SELayer(nn.Module):
    def __init__(self, channels: int, ratio: int = 16, divisor: int = 8) -> None:
        super().__init__()
        squeeze = make_divisible(channels // ratio, divisor)
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.conv1 = ConvModule(channels, squeeze, 1, act=nn.ReLU())
        self.conv2 = ConvModule(squeeze, channels, 1, act=nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.conv2(self.conv1(self.global_avgpool(x)))


def conv_norm(cin: int, cout: int, k: int, stride: int, padding: int, dilation: int, groups: int) -> nn.Sequential:
    """mmpretrain's ``create_conv_bn``: ``conv`` (no bias) then ``norm``."""
    layers = nn.Sequential()
    layers.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False))
    layers.add_module("norm", nn.BatchNorm2d(cout, eps=EPS))
    return layers


def fold_bn(kernel: Tensor, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return kernel * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class MobileOneBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_convs: int, stride: int = 1,
                 padding: int = 1, dilation: int = 1, groups: int = 1, se_cfg: dict | None = None,
                 deploy: bool = False) -> None:
        super().__init__()
        self.se = SELayer(out_channels, **se_cfg) if se_cfg is not None else nn.Identity()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.num_conv_branches, self.stride, self.padding = num_convs, stride, padding
        self.dilation, self.groups, self.se_cfg, self.deploy = dilation, groups, se_cfg, deploy
        if deploy:
            self.branch_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                            groups, bias=True)
        else:
            same_shape = out_channels == in_channels and stride == 1
            self.branch_norm = nn.BatchNorm2d(in_channels, eps=EPS) if same_shape else None
            self.branch_scale = (conv_norm(in_channels, out_channels, 1, stride, 0, 1, groups)
                                 if kernel_size > 1 else None)
            self.branch_conv_list = nn.ModuleList(
                conv_norm(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
                for _ in range(num_convs)
            )
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            out = self.branch_reparam(x)
        else:
            out = 0
            if self.branch_norm is not None:
                out = out + self.branch_norm(x)
            if self.branch_scale is not None:
                out = out + self.branch_scale(x)
            for branch in self.branch_conv_list:
                out = out + branch(x)
        return self.act(self.se(out))

    def _identity_kernel(self, like: Tensor) -> Tensor:
        per_group = self.in_channels // self.groups
        kernel = like.new_zeros(self.in_channels, per_group, self.kernel_size, self.kernel_size)
        index = torch.arange(self.in_channels)
        kernel[index, index % per_group, self.kernel_size // 2, self.kernel_size // 2] = 1
        return kernel

    def reparameterize(self) -> tuple[Tensor, Tensor]:
        """Upstream's fused (weight, bias) of all branches."""
        weight: Tensor | int = 0
        bias: Tensor | int = 0
        for branch in self.branch_conv_list:
            k, b = fold_bn(branch.conv.weight, branch.norm)
            weight, bias = weight + k, bias + b
        if self.branch_scale is not None:
            k, b = fold_bn(self.branch_scale.conv.weight, self.branch_scale.norm)
            pad = self.kernel_size // 2
            weight, bias = weight + F.pad(k, (pad, pad, pad, pad)), bias + b
        if self.branch_norm is not None:
            k, b = fold_bn(self._identity_kernel(self.branch_norm.weight), self.branch_norm)
            weight, bias = weight + k, bias + b
        return weight, bias

    def switch_to_deploy(self) -> None:
        if self.deploy:
            return
        with torch.no_grad():
            weight, bias = self.reparameterize()
            conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                             self.dilation, self.groups, bias=True, dtype=weight.dtype, device=weight.device)
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
        self.branch_reparam = conv
        del self.branch_conv_list, self.branch_scale, self.branch_norm
        self.deploy = True


class MobileOne(nn.Module):
    """A tiny mmpretrain-style MobileOne backbone; ``deploy=True`` builds the deploy form."""

    def __init__(self, deploy: bool = False, widths: tuple[int, int] = (8, 16), num_blocks: tuple[int, int] = (1, 2),
                 num_conv_branches: tuple[int, int] = (2, 3), num_se_blocks: tuple[int, int] = (0, 1),
                 out_indices: tuple[int, ...] = (0, 1)) -> None:
        super().__init__()
        self.deploy = deploy
        self.out_indices = out_indices
        self.stage0 = MobileOneBlock(3, 8, 3, 1, stride=2, deploy=deploy)
        self.in_planes = 8
        self.stages = []
        for i, (planes, blocks, branches, se) in enumerate(zip(widths, num_blocks, num_conv_branches, num_se_blocks)):
            stage = self._make_stage(planes, blocks, se, branches)
            if i == len(widths) - 1:
                stage.append(MobileOneBlock(planes, planes, 3, 2, padding=2, dilation=2, groups=4, deploy=deploy))
            self.add_module(f"stage{i + 1}", stage)
            self.stages.append(f"stage{i + 1}")

    def _make_stage(self, planes: int, num_blocks: int, num_se: int, branches: int) -> nn.Sequential:
        blocks = []
        for i in range(num_blocks):
            se_cfg = {"ratio": 16} if i >= num_blocks - num_se else None
            stride = 2 if i == 0 else 1
            blocks.append(MobileOneBlock(self.in_planes, self.in_planes, 3, branches, stride, 1,
                                         groups=self.in_planes, se_cfg=se_cfg, deploy=self.deploy))
            blocks.append(MobileOneBlock(self.in_planes, planes, 1, branches, 1, 0, se_cfg=se_cfg, deploy=self.deploy))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        x = self.stage0(x)
        outs = []
        for i, name in enumerate(self.stages):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def switch_to_deploy(self) -> None:
        """Upstream's conversion: ``switch_to_deploy`` on every MobileOneBlock."""
        for module in list(self.modules()):
            if isinstance(module, MobileOneBlock):
                module.switch_to_deploy()
        self.deploy = True


def train_model() -> nn.Module:
    return train_form(MobileOne, seed=71)


def deploy_model() -> nn.Module:
    return MobileOne(deploy=True).eval()


def upstream_deploy(model: nn.Module) -> nn.Module:
    converted = copy.deepcopy(model)
    converted.switch_to_deploy()
    return converted.eval()
