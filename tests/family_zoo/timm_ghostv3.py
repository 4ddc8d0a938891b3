"""timm's GhostNetV3 (``timm/models/ghostnet.py``, ``version='v3'``), built small from timm itself.

Four stages of timm's own GhostBottleneckV3: two in 'original' mode, two whose ``ghost1`` is in
'shortcut' mode (the ``short_conv`` gate), stride-2 bottlenecks with 3×3 and 5×5 depthwise
branches (``dw_rpr_*``), an SE; BN statistics and every constant parameter randomised. The deploy
form is timm's own ``reparameterize_model`` of the same model.
"""

from __future__ import annotations

from torch import nn

from .seeded import train_form

EPS = 1e-5
FAMILIES = {"timm_ghostv3_primary", "timm_ghostv3_cheap", "timm_ghostv3_dw"}
INPUT_SHAPE = (2, 3, 32, 32)
CFGS = [  # k, expansion, channels, SE ratio, stride (timm's cfg format)
    [[3, 16, 16, 0, 1]],
    [[3, 48, 24, 0, 2]],
    [[5, 72, 40, 0.25, 2]],
    [[3, 64, 40, 0, 1]],
]


def train_model() -> nn.Module:
    from timm.models.ghostnet import GhostNet

    return train_form(lambda: GhostNet(CFGS, num_classes=10, width=0.5, version="v3"), seed=12)


def deploy_model() -> nn.Module:
    from timm.utils import reparameterize_model

    return reparameterize_model(train_model())
