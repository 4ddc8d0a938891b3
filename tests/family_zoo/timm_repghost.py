"""timm's RepGhostNet (``timm/models/repghost.py``), built small from timm itself.

Four stages with timm's own RepGhostBottleneck/RepGhostModule (a stride-2 3×3 and 5×5 depthwise,
an SE, shortcuts with and without convs), BN statistics and every constant parameter randomised.
The deploy form is timm's own ``reparameterize_model`` of the same model: every RepGhostModule's
``cheap_operation`` written as one depthwise conv, ``fusion_bn``/``fusion_conv`` gone.
"""

from __future__ import annotations

from torch import nn

from .seeded import train_form

EPS = 1e-5
INPUT_SHAPE = (2, 3, 32, 32)
CFGS = [  # k, expansion, channels, SE ratio, stride (timm's cfg format)
    [[3, 8, 16, 0, 1]],
    [[3, 24, 24, 0, 2]],
    [[5, 36, 40, 0.25, 2]],
    [[3, 60, 40, 0, 1]],
]


def train_model() -> nn.Module:
    from timm.models.repghost import RepGhostNet

    return train_form(lambda: RepGhostNet(CFGS, num_classes=10, width=0.5), seed=11)


def deploy_model() -> nn.Module:
    from timm.utils import reparameterize_model

    return reparameterize_model(train_model())
