"""Toy models for the `fastvit_repmixer` family (timm fastvit ``RepMixer``).

Written for this project from timm's published layout (``timm/models/fastvit.py``):
``x + layer_scale(mixer(x) - norm(x))`` with ``norm`` a depthwise ``MobileOneBlock`` holding only its
identity BN, ``mixer`` a depthwise ``MobileOneBlock`` (identity BN, k×k and 1×1 conv+BN, no
activation) and ``layer_scale`` a ``LayerScale2d`` (``gamma``) or ``nn.Identity``; deploy form a
depthwise ``reparam_conv``. Variants: 3×3 and 5×5 kernels, two widths, with and without layer
scale. Layer-scale values are randomised (timm initialises them to 1e-5, which would hide errors).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tests import zoo

from .fastvit_large_kernel import MobileOneBlock

EPS = 1e-5
INPUT_SHAPE = (2, 3, 16, 16)


class LayerScale2d(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class RepMixer(nn.Module):
    def __init__(self, dim: int, k: int = 3, layer_scale: float | None = 1e-5, deploy: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.kernel_size = k
        self.inference_mode = deploy
        if deploy:
            self.reparam_conv = nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim, bias=True)
        else:
            self.reparam_conv = None
            self.norm = MobileOneBlock(dim, dim, k, groups=dim, use_act=False, use_scale_branch=False,
                                       num_conv_branches=0)
            self.mixer = MobileOneBlock(dim, dim, k, groups=dim, use_act=False)
            self.layer_scale = LayerScale2d(dim, layer_scale) if layer_scale is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return x + self.layer_scale(self.mixer(x) - self.norm(x))


class RepMixerNet(nn.Module):
    def __init__(self, deploy: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.mixers = nn.Sequential(
            RepMixer(8, 3, deploy=deploy),
            nn.GELU(),
            RepMixer(8, 5, deploy=deploy),
            RepMixer(8, 3, layer_scale=None, deploy=deploy),
        )
        self.expand = nn.Conv2d(8, 16, 1)
        self.token_mixer = RepMixer(16, 3, deploy=deploy)
        self.head = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.expand(self.mixers(self.stem(x)))
        return self.head(self.token_mixer(x).mean((2, 3)))


def randomize_layer_scales(model: nn.Module, seed: int) -> nn.Module:
    """Give every ``gamma`` of a layer scale values of both signs around 0.5 (in place)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5 + 0.3)
    return model


def train_model() -> nn.Module:
    return randomize_layer_scales(zoo.randomize_bn(RepMixerNet(), seed=21), seed=22).eval()


def deploy_model() -> nn.Module:
    return RepMixerNet(deploy=True).eval()
