"""timm's own LeViT, shrunk: the `timm_levit_convnorm`, `timm_levit_linearnorm` and `timm_normlinear` families.

Built from the installed timm (huggingface/pytorch-image-models ``timm/models/levit.py``) with
``timm.create_model("levit_128s", ...)`` and a smaller configuration (two stages, 16 and 24
channels, key_dim 4, a 32×32 input): the same classes, key names and forward as every LeViT, just
narrow. Its stem has four ConvNorms, its attention/MLP/downsample layers are LinearNorms (several
square: ``attn.proj.ln`` 16×16, ``q.ln``), and the distilled model's two heads are NormLinears.
The deploy form is timm's own ``reparameterize_model`` of the same model. BN eps 1e-5.
"""

from __future__ import annotations

import timm
from timm.utils import reparameterize_model

from .seeded import train_form

EPS = 1e-5
FAMILIES = {"timm_levit_convnorm", "timm_levit_linearnorm", "timm_normlinear"}
"""The families whose blocks this model holds (tests/test_family_contract.py)."""
INPUT_SHAPE = (2, 3, 32, 32)
CONFIG = dict(img_size=32, embed_dim=(16, 24), key_dim=4, depth=(1, 1), num_heads=(2, 3), num_classes=10)


def build(**overrides):
    """The shrunk LeViT (``levit_conv_128s`` for the conv variant), fresh from timm."""
    name = overrides.pop("name", "levit_128s")
    return timm.create_model(name, pretrained=False, **{**CONFIG, **overrides})


def train_model():
    return train_form(build, seed=31)


def deploy_model():
    return reparameterize_model(build()).eval()
