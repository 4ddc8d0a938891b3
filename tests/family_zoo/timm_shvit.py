"""timm's own SHViT (``timm/models/shvit.py``, huggingface/pytorch-image-models), shrunk for tests.

``shvit_s1``'s layout (types ``i, s, s``) with 16/24/32 channels, one block per stage and 5
classes: ``Conv2dNorm`` pairs everywhere, ``Residual`` around the depthwise ``Conv2dNorm`` of
every block and of each downsample (and around ``FFN``/``SHSA``, which timm does not fold), and the
``NormLinear`` head. Every BN and every constant parameter is randomised. The deploy form is
``timm.utils.reparameterize_model`` of the same model.
"""

from __future__ import annotations

import timm
from torch import nn

from .seeded import train_form

EPS = 1e-5
INPUT_SHAPE = (2, 3, 64, 64)
FAMILIES = {"timm_c_bn", "timm_shvit_residual", "timm_shvit_normlinear"}
"""The families whose blocks this model holds (tests/test_family_contract.py)."""

SMALL = {"embed_dim": (16, 24, 32), "partial_dim": (4, 6, 8), "qk_dim": (4, 4, 4), "depth": (1, 1, 1),
         "num_classes": 5}


def small(**kwargs) -> nn.Module:
    return timm.create_model("shvit_s1", pretrained=False, **{**SMALL, **kwargs})


def train_model() -> nn.Module:
    return train_form(small, seed=41)


def deploy_model() -> nn.Module:
    return timm.utils.reparameterize_model(train_model())
