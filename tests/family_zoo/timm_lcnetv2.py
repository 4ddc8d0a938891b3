"""timm's LCNetV2 (``timm/models/lcnetv2.py``), built small from timm itself.

timm's own LCNetV2 at a quarter width with one or two blocks per stage: RepDepthwiseSeparable
blocks with ``use_rep`` (5×5 + 3×3 branches when strided, 5×5 + 3×3 + 1×1 otherwise, with SE and
split pointwise convs in stage 2, a shortcut in stage 3) and without (the stem's and stages 0-1,
whose ``dw_conv`` ConvNormAct timm keeps); BN statistics and every constant parameter randomised.
The deploy form is timm's own ``reparameterize_model`` of the same model.
"""

from __future__ import annotations

from torch import nn

from .seeded import train_form

EPS = 1e-5
INPUT_SHAPE = (2, 3, 32, 32)


def train_model() -> nn.Module:
    from timm.models.lcnetv2 import LCNetV2

    return train_form(lambda: LCNetV2(scale=0.25, depths=(1, 1, 2, 2), num_classes=10, head_hidden_size=64), seed=13)


def deploy_model() -> nn.Module:
    from timm.utils import reparameterize_model

    return reparameterize_model(train_model())
