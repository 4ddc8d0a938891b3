"""Toy models for the `fastvit_repcpe` family (timm fastvit ``RepConditionalPosEnc``).

Written for this project from timm's published layout (``timm/models/fastvit.py``):
``pos_enc(x) + x`` with ``pos_enc`` a depthwise k×k conv with bias, padding ``k // 2``; deploy form
``reparam_conv``. Variants: 7×7 (FastViT's default), 3×3 and 5×5, at two widths. No BN anywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

EPS = 1e-5
INPUT_SHAPE = (2, 3, 16, 16)


class RepConditionalPosEnc(nn.Module):
    def __init__(self, dim: int, spatial_shape: tuple[int, int] = (7, 7), deploy: bool = False) -> None:
        super().__init__()
        padding = spatial_shape[0] // 2
        if deploy:
            self.reparam_conv = nn.Conv2d(dim, dim, spatial_shape, 1, padding, groups=dim, bias=True)
        else:
            self.reparam_conv = None
            self.pos_enc = nn.Conv2d(dim, dim, spatial_shape, 1, padding, groups=dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return self.pos_enc(x) + x


class RepCPENet(nn.Module):
    def __init__(self, deploy: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.pos_emb = RepConditionalPosEnc(8, (7, 7), deploy)
        self.act = nn.GELU()
        self.expand = nn.Conv2d(8, 16, 1)
        self.pos_embs = nn.Sequential(
            RepConditionalPosEnc(16, (3, 3), deploy),
            RepConditionalPosEnc(16, (5, 5), deploy),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.expand(self.act(self.pos_emb(self.stem(x))))
        return self.head(self.pos_embs(x).mean((2, 3)))


def train_model() -> nn.Module:
    model = RepCPENet()
    generator = torch.Generator().manual_seed(41)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RepConditionalPosEnc):
                module.pos_enc.weight.copy_(torch.randn(module.pos_enc.weight.shape, generator=generator) * 0.2)
                module.pos_enc.bias.copy_(torch.randn(module.pos_enc.bias.shape, generator=generator) * 0.5)
    return model.eval()


def deploy_model() -> nn.Module:
    return RepCPENet(deploy=True).eval()
