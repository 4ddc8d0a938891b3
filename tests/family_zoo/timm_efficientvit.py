"""timm's own EfficientViT (MSRA), shrunk: the `timm_convnorm` and `timm_normlinear` families.

Built from the installed timm (huggingface/pytorch-image-models ``timm/models/efficientvit_msra.py``)
with ``timm.create_model("efficientvit_m0", ...)`` and a smaller configuration (three stages of one
block, 16/24/32 channels, windows of 2, a 32×32 input): the same classes, key names and forward.
Its ConvNorms sit in the patch embedding, the depthwise ``ResidualDrop``s (``dw0.m``: timm fuses
the ConvNorm, keeps the residual), the FFNs, the cascaded attention (``qkvs``, ``dws``, ``proj.1``)
and the downsampling ``patchmerge``; the head is a NormLinear. The deploy form is timm's own
``reparameterize_model`` of the same model. BN eps 1e-5.
"""

from __future__ import annotations

import timm
from timm.utils import reparameterize_model

from .seeded import train_form

EPS = 1e-5
FAMILIES = {"timm_convnorm", "timm_normlinear"}
"""The families whose blocks this model holds (tests/test_family_contract.py)."""
INPUT_SHAPE = (2, 3, 32, 32)
CONFIG = dict(img_size=32, embed_dim=(16, 24, 32), depth=(1, 1, 1), num_heads=(2, 2, 2), key_dim=(4, 4, 4),
              window_size=(2, 2, 2), num_classes=10)


def build():
    return timm.create_model("efficientvit_m0", pretrained=False, **CONFIG)


def train_model():
    return train_form(build, seed=41)


def deploy_model():
    return reparameterize_model(build()).eval()
