"""timm's own iFormer (``timm/models/iformer.py``, huggingface/pytorch-image-models), shrunk for tests.

Two models side by side, their outputs concatenated: ``iformer_t``'s layout without distillation
(``head_dist`` an ``nn.Identity``) and ``iformer_m_distilled``'s head (two ``NormLinear`` heads,
averaged), each with 8/16/24/32 channels, depths 1/1/4/3 (one attention group in each of the last
two stages, so a ``RepCPE`` in each, and a suffix ``ConvBlock``), 5 classes and layer scales
(``gamma`` in the ``Residual``s timm does not fold). Every BN and every constant parameter (layer
scales, head biases, ...) is randomised. The deploy form is ``timm.utils.reparameterize_model``.
"""

from __future__ import annotations

import timm
from torch import nn

from .seeded import train_form
from .timm_repvit import Side

EPS = 1e-5
INPUT_SHAPE = (2, 3, 64, 64)
FAMILIES = {"timm_c_bn", "timm_iformer_repcpe", "timm_repvit_classifier"}
"""The families whose blocks this model holds (tests/test_family_contract.py)."""

SMALL = {"dims": (8, 16, 24, 32), "depths": (1, 1, 4, 3), "attn_groups": (0, 0, 1, 1),
         "attn_head_dim_reduction": (0, 0, 2, 4), "num_classes": 5, "layer_scale_init_value": 1e-6}


def small(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, pretrained=False, **{**SMALL, **kwargs})


def train_model() -> nn.Module:
    return train_form(lambda: Side(small("iformer_t"), small("iformer_m_distilled")), seed=51)


def deploy_model() -> nn.Module:
    return timm.utils.reparameterize_model(train_model())
