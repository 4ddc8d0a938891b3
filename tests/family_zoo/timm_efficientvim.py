"""timm's EfficientViM (``timm/models/efficientvim.py``), built small from timm itself.

timm's own EfficientViM class at widths 16/32/48 with one block per stage: the stem's four
ConvLayer2d, every block's gated depthwise residuals (``alpha``) and FFN, the PatchMerging
downsamples (their depthwise residuals, conv.{0,1,3} and SE); BN statistics and every constant
parameter (``alpha``, ``bn_weight_init=0`` BNs, LayerNorms, head biases) randomised. The deploy
form is timm's own ``reparameterize_model`` of the same (eval) model.
"""

from __future__ import annotations

from torch import nn

from .seeded import train_form

EPS = 1e-5
FAMILIES = {"timm_efficientvim_conv", "timm_efficientvim_dwconv"}
INPUT_SHAPE = (2, 3, 64, 64)


def train_model() -> nn.Module:
    from timm.models.efficientvim import EfficientViM

    return train_form(lambda: EfficientViM(embed_dim=(16, 32, 48), depths=(1, 1, 1), state_dim=(9, 4, 4),
                                           num_classes=10), seed=14)


def deploy_model() -> nn.Module:
    from timm.utils import reparameterize_model

    return reparameterize_model(train_model())
