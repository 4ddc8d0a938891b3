"""Toy models for RepLKNet (Ding et al., "Scaling Up Your Kernels to 31x31", CVPR 2022).

Written for these tests from the layout and conversion math of DingXiaoH/RepLKNet-pytorch
``replknet.py`` (no code copied). Names and forward order are upstream's:

- ``conv_bn`` is a ``Sequential`` of ``conv`` (no bias) and ``bn``; ``conv_bn_relu`` adds
  ``nonlinear`` (ReLU). BN is ``nn.BatchNorm2d`` with the default eps 1e-5 (upstream may build
  ``SyncBatchNorm``: same keys, same eps).
- ``ReparamLargeKernelConv``: ``lkb_origin`` (k×k conv_bn, padding k//2) plus an optional
  ``small_conv`` (s×s conv_bn, padding s//2, same stride and groups), summed; deploy form
  ``lkb_reparam`` (k×k conv with bias). ``merge_kernel`` folds each BN into its conv, zero-pads
  the small kernel by (k - s)//2 on every side and adds it.
- ``RepLKBlock``: ``x + pw2(lk_nonlinear(large_kernel(pw1(prelkb_bn(x)))))``; ``ConvFFN``:
  ``x + pw2(nonlinear(pw1(preffn_bn(x))))``. Upstream's ``structural_reparam`` touches only the
  ``ReparamLargeKernelConv`` modules; ``prelkb_bn``, ``pw1``, ``pw2``, ``preffn_bn``, the stem and
  the transitions keep their train keys (``deep_fuse_BN`` is a separate, optional step, not
  rewritten here).

The toy network has upstream's stem (dense strided 3×3, depthwise 3×3, 1×1, depthwise strided 3×3)
and two stages with a transition; stage kernels 13 (small 5) and 7 (no small kernel, as
RepLKNet-XL). Upstream only ever uses the class depthwise at stride 1; the class itself takes any
stride and groups, so the toy ends with one grouped (g=2), strided 5×5 ``ReparamLargeKernelConv``
with a 3×3 small kernel before the head. Spatial sizes (8×8 and 4×4 at the large kernels) make
every kernel tap reach real pixels.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .seeded import train_form

EPS = 1e-5
INPUT_SHAPE = (2, 3, 32, 32)


def conv_bn(cin: int, cout: int, k: int, stride: int, padding: int | None, groups: int,
            dilation: int = 1) -> nn.Sequential:
    """``conv`` (bias-free) then ``bn``; ``padding=None`` means k//2."""
    layers = nn.Sequential()
    pad = k // 2 if padding is None else padding
    layers.add_module("conv", nn.Conv2d(cin, cout, k, stride, pad, dilation, groups, bias=False))
    layers.add_module("bn", nn.BatchNorm2d(cout, eps=EPS))
    return layers


def conv_bn_relu(cin: int, cout: int, k: int, stride: int, padding: int | None, groups: int,
                 dilation: int = 1) -> nn.Sequential:
    layers = conv_bn(cin, cout, k, stride, padding, groups, dilation)
    layers.add_module("nonlinear", nn.ReLU())
    return layers


def fuse_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Kernel and bias of eval ``bn(conv(x))`` for a bias-free conv (upstream ignores a conv bias)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return conv.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class ReparamLargeKernelConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int,
                 small_kernel: int | None, small_kernel_merged: bool = False) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        pad = kernel_size // 2
        if small_kernel_merged:
            self.lkb_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride, pad, 1, groups, bias=True)
            return
        self.lkb_origin = conv_bn(in_channels, out_channels, kernel_size, stride, pad, groups)
        if small_kernel is not None:
            if small_kernel > kernel_size:
                raise ValueError("the small kernel cannot be larger than the large one")
            self.small_conv = conv_bn(in_channels, out_channels, small_kernel, stride, small_kernel // 2, groups)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "lkb_reparam"):
            return self.lkb_reparam(x)
        out = self.lkb_origin(x)
        if hasattr(self, "small_conv"):
            out = out + self.small_conv(x)
        return out

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        kernel, bias = fuse_bn(self.lkb_origin.conv, self.lkb_origin.bn)
        if hasattr(self, "small_conv"):
            small_kernel, small_bias = fuse_bn(self.small_conv.conv, self.small_conv.bn)
            margin = (self.kernel_size - self.small_kernel) // 2
            kernel = kernel + F.pad(small_kernel, (margin, margin, margin, margin))
            bias = bias + small_bias
        return kernel, bias

    def merge_kernel(self) -> None:
        """Upstream's conversion: one conv with the geometry of ``lkb_origin.conv`` and a bias."""
        kernel, bias = self.get_equivalent_kernel_bias()
        origin = self.lkb_origin.conv
        merged = nn.Conv2d(origin.in_channels, origin.out_channels, origin.kernel_size, origin.stride,
                           origin.padding, origin.dilation, origin.groups, bias=True,
                           dtype=kernel.dtype, device=kernel.device)
        with torch.no_grad():
            merged.weight.copy_(kernel)
            merged.bias.copy_(bias)
        self.lkb_reparam = merged
        del self.lkb_origin
        if hasattr(self, "small_conv"):
            del self.small_conv


class ConvFFN(nn.Module):
    def __init__(self, in_channels: int, internal_channels: int, out_channels: int) -> None:
        super().__init__()
        self.preffn_bn = nn.BatchNorm2d(in_channels, eps=EPS)
        self.pw1 = conv_bn(in_channels, internal_channels, 1, 1, 0, 1)
        self.pw2 = conv_bn(internal_channels, out_channels, 1, 1, 0, 1)
        self.nonlinear = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x))))


class RepLKBlock(nn.Module):
    def __init__(self, in_channels: int, dw_channels: int, block_lk_size: int, small_kernel: int | None,
                 small_kernel_merged: bool = False) -> None:
        super().__init__()
        self.pw1 = conv_bn_relu(in_channels, dw_channels, 1, 1, 0, 1)
        self.pw2 = conv_bn(dw_channels, in_channels, 1, 1, 0, 1)
        self.large_kernel = ReparamLargeKernelConv(dw_channels, dw_channels, block_lk_size, 1, dw_channels,
                                                   small_kernel, small_kernel_merged)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = nn.BatchNorm2d(in_channels, eps=EPS)

    def forward(self, x: Tensor) -> Tensor:
        out = self.pw1(self.prelkb_bn(x))
        out = self.lk_nonlinear(self.large_kernel(out))
        return x + self.pw2(out)


class RepLKNetStage(nn.Module):
    """``blocks`` alternates RepLKBlock and ConvFFN; ``norm`` is Identity (pretraining form)."""

    def __init__(self, channels: int, num_blocks: int, stage_lk_size: int, small_kernel: int | None,
                 dw_ratio: float = 1, ffn_ratio: int = 4, small_kernel_merged: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(num_blocks):
            layers.append(RepLKBlock(channels, int(channels * dw_ratio), stage_lk_size, small_kernel,
                                     small_kernel_merged))
            layers.append(ConvFFN(channels, int(channels * ffn_ratio), channels))
        self.blocks = nn.ModuleList(layers)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class RepLKNet(nn.Module):
    """A tiny RepLKNet classifier; ``small_kernel_merged=True`` builds upstream's deploy form."""

    def __init__(self, small_kernel_merged: bool = False, channels: tuple[int, int] = (8, 16),
                 num_classes: int = 10) -> None:
        super().__init__()
        merged = small_kernel_merged
        width = channels[0]
        self.stem = nn.ModuleList([
            conv_bn_relu(3, width, 3, 2, 1, 1),
            conv_bn_relu(width, width, 3, 1, 1, width),
            conv_bn_relu(width, width, 1, 1, 0, 1),
            conv_bn_relu(width, width, 3, 2, 1, width),
        ])
        self.stages = nn.ModuleList([
            RepLKNetStage(channels[0], 1, 13, 5, dw_ratio=1, small_kernel_merged=merged),
            RepLKNetStage(channels[1], 1, 7, None, dw_ratio=1.5, small_kernel_merged=merged),
        ])
        self.transitions = nn.ModuleList([
            nn.Sequential(conv_bn_relu(channels[0], channels[1], 1, 1, 0, 1),
                          conv_bn_relu(channels[1], channels[1], 3, 2, 1, channels[1])),
        ])
        self.extra = ReparamLargeKernelConv(channels[1], 2 * channels[1], 5, 2, 2, 3, merged)
        self.norm = nn.BatchNorm2d(2 * channels[1], eps=EPS)
        self.head = nn.Linear(2 * channels[1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.stem:
            x = layer(x)
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index < len(self.transitions):
                x = self.transitions[index](x)
        x = self.norm(self.extra(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def structural_reparam(self) -> None:
        """Upstream's conversion: ``merge_kernel`` on every module that has one."""
        for module in list(self.modules()):
            if hasattr(module, "merge_kernel"):
                module.merge_kernel()


def train_model() -> nn.Module:
    return train_form(RepLKNet, seed=41)


def deploy_model() -> nn.Module:
    return RepLKNet(small_kernel_merged=True).eval()


def upstream_deploy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` converted the way upstream's ``structural_reparam`` does it."""
    converted = copy.deepcopy(model)
    converted.structural_reparam()
    return converted.eval()
