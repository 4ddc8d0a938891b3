"""Small reference networks (official RepVGG, the tutorial plain block), train and deploy form.

Test fixtures, not part of the package: written for this project from the layouts described in
the papers and projects named in each family file; used by the tests, ``scripts/make_samples.py``
(the bundled samples are built from them) and the benchmarks, all run from a clone. The per-family
contract models are in ``tests/family_zoo/``. The official
layout follows RepVGG's ``RepVGGBlock`` (``rbr_dense``/``rbr_1x1``/``rbr_identity`` ->
``rbr_reparam``) and its A/B width and depth table, so a state dict of :func:`repvgg` loads into
the official code and back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _conv_bn(cin: int, cout: int, k: int, stride: int, padding: int, groups: int) -> nn.Sequential:
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


class SqueezeExcite(nn.Module):
    """The SE variant of RepVGG-D2se: ``down``/``up`` 1×1 convs on the pooled input."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, hidden, 1, bias=True)
        self.up = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        w = torch.sigmoid(self.up(torch.relu(self.down(x.mean((2, 3), keepdim=True)))))
        return x * w


class OfficialBlock(nn.Module):
    """RepVGG block in the official layout; ``deploy=True`` builds the fused form."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        deploy: bool = False,
        use_se: bool = False,
    ) -> None:
        super().__init__()
        self.deploy = deploy
        padding = kernel_size // 2
        self.nonlinearity = nn.ReLU()
        self.se = SqueezeExcite(cout, max(cout // 16, 1)) if use_se else nn.Identity()
        if deploy:
            self.rbr_reparam = nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=True)
        else:
            self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
            self.rbr_dense = _conv_bn(cin, cout, kernel_size, stride, padding, groups)
            self.rbr_1x1 = _conv_bn(cin, cout, 1, stride, 0, groups)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.se(self.rbr_reparam(x)))
        total = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            total = total + self.rbr_identity(x)
        return self.nonlinearity(self.se(total))


# Depth per stage and width multipliers of the RepVGG paper's A/B models.
REPVGG_CONFIGS: dict[str, tuple[tuple[int, int, int, int], tuple[float, float], set[int], int]] = {
    "A0": ((2, 4, 14, 1), (0.75, 2.5), set(), 1),
    "A1": ((2, 4, 14, 1), (1.0, 2.5), set(), 1),
    "B0": ((4, 6, 16, 1), (1.0, 2.5), set(), 1),
    "B1": ((4, 6, 16, 1), (2.0, 4.0), set(), 1),
    "B1g2": ((4, 6, 16, 1), (2.0, 4.0), {2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26}, 2),
    "B3": ((4, 6, 16, 1), (3.0, 5.0), set(), 1),
    "tiny": ((1, 2, 2, 1), (0.25, 0.25), set(), 1),
    "tiny_g2": ((1, 2, 2, 1), (0.25, 0.25), {2, 4}, 2),
}


class RepVGG(nn.Module):
    """A RepVGG network in the official layout: ``stage0`` … ``stage4``, ``gap``, ``linear``."""

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int] = (2, 4, 14, 1),
        width: tuple[float, float] = (0.75, 2.5),
        num_classes: int = 1000,
        group_layers: set[int] | None = None,
        groups: int = 1,
        deploy: bool = False,
        use_se: bool = False,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        group_layers = group_layers or set()
        self.in_planes = min(64, int(64 * width[0]))
        self.layer_index = 1
        self.deploy = deploy
        self.use_se = use_se
        self.group_layers = group_layers
        self.groups = groups
        self.stage0 = OfficialBlock(in_channels, self.in_planes, 3, 2, deploy=deploy, use_se=use_se)
        widths = (int(64 * width[0]), int(128 * width[0]), int(256 * width[0]), int(512 * width[1]))
        self.stage1 = self._stage(widths[0], num_blocks[0])
        self.stage2 = self._stage(widths[1], num_blocks[1])
        self.stage3 = self._stage(widths[2], num_blocks[2])
        self.stage4 = self._stage(widths[3], num_blocks[3])
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[3], num_classes)

    def _stage(self, planes: int, blocks: int) -> nn.Sequential:
        layers = []
        for stride in [2] + [1] * (blocks - 1):
            g = self.groups if self.layer_index in self.group_layers else 1
            layers.append(OfficialBlock(self.in_planes, planes, 3, stride, g, self.deploy, self.use_se))
            self.in_planes = planes
            self.layer_index += 1
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        for stage in (self.stage0, self.stage1, self.stage2, self.stage3, self.stage4):
            x = stage(x)
        return self.linear(torch.flatten(self.gap(x), 1))


def repvgg(name: str = "A0", deploy: bool = False, num_classes: int = 1000, use_se: bool = False) -> RepVGG:
    """A RepVGG of the paper's ``name`` (A0, A1, B0, B1, B1g2, B3) or a ``tiny`` one for samples."""
    blocks, width, group_layers, groups = REPVGG_CONFIGS[name]
    return RepVGG(blocks, width, num_classes, group_layers, groups, deploy=deploy, use_se=use_se)


class PlainBlock(nn.Module):
    """The tutorial block: ``bn3x3(conv3x3(x)) + bn1x1(conv1x1(x)) + identity(x)``."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv3x3 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn3x3 = nn.BatchNorm2d(cout)
        self.conv1x1 = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.bn1x1 = nn.BatchNorm2d(cout)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x: Tensor) -> Tensor:
        total = self.bn3x3(self.conv3x3(x)) + self.bn1x1(self.conv1x1(x))
        if self.identity is not None:
            total = total + self.identity(x)
        return total


class PlainNet(nn.Module):
    """A small network of plain blocks with ReLUs between them; ``deploy=True`` uses Conv2d."""

    def __init__(self, channels: tuple[int, ...] = (3, 16, 16, 32, 32), strides: tuple[int, ...] = (2, 1, 2, 1), num_classes: int = 10, deploy: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout, stride in zip(channels[:-1], channels[1:], strides):
            block = nn.Conv2d(cin, cout, 3, stride, 1) if deploy else PlainBlock(cin, cout, stride)
            layers += [block, nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial running statistics and affine parameters (in place).

    With fresh statistics (mean 0, var 1) a wrong fusion can still match; tests use this.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            n = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.25)
                if module.affine:
                    module.weight.copy_(torch.randn(n, generator=generator) * 0.5 + 1.0)
                    module.bias.copy_(torch.randn(n, generator=generator) * 0.3)
    return model
