"""timm's NextViT (``timm/models/nextvit.py``), made small from timm's own building blocks.

NextViT's stage widths are fixed in its constructor (96 ... 1024 channels), so this model is
built from timm's own ``ConvNormAct`` stem layers and ``NextStage``s with narrow blocks, under
NextViT's attribute names (``stem``, ``stages.N.blocks.M``, ``norm``): a NextConvBlock, a
NextTransformerBlock with ``sr_ratio`` 2 (``e_mhsa.norm`` after the token pool) and one with
``sr_ratio`` 1 (none), head dim 16, mix ratio 0.75 as NextViT. BN statistics and every constant
parameter are randomised. The deploy form is timm's own ``reparameterize_model`` of the model.
"""

from __future__ import annotations

import torch
from torch import nn

from .seeded import train_form

EPS = 1e-5
INPUT_SHAPE = (2, 3, 32, 32)


class SmallNextViT(nn.Module):
    def __init__(self) -> None:
        from timm.models.nextvit import ConvNormAct, NextConvBlock, NextStage, NextTransformerBlock

        super().__init__()
        self.stem = nn.Sequential(ConvNormAct(3, 16, stride=2), ConvNormAct(16, 32, stride=2))
        self.stages = nn.Sequential(
            NextStage(32, [32, 128], [NextConvBlock, NextTransformerBlock], stride=1, sr_ratio=2, head_dim=16,
                      mix_block_ratio=0.75),
            NextStage(128, [128], [NextTransformerBlock], stride=2, sr_ratio=1, head_dim=16, mix_block_ratio=0.75),
        )
        self.norm = nn.BatchNorm2d(128)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.stages(self.stem(x)))
        return self.head(x.mean((2, 3)))


def train_model() -> nn.Module:
    return train_form(SmallNextViT, seed=15)


def deploy_model() -> nn.Module:
    from timm.utils import reparameterize_model

    return reparameterize_model(train_model())
