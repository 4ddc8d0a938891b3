"""timm's own RepViT (``timm/models/repvit.py``, huggingface/pytorch-image-models), shrunk for tests.

Two models side by side, summed into one output: ``repvit_m0_9``'s layout (``RepVggDw`` with a plain
``conv1`` and an outer ``bn``) and ``repvit_m1``'s legacy layout (``conv1`` a ``ConvNorm``, no outer
BN), each with 8/16 channels, two blocks per stage, 5 classes and the distilled head (timm's
default). Every BN and every constant parameter (the NormLinear biases, ``bn_weight_init=0``
BNs) is randomised. The deploy form is ``timm.utils.reparameterize_model`` of the same model.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from .seeded import train_form

EPS = 1e-5
INPUT_SHAPE = (2, 3, 32, 32)
FAMILIES = {"timm_c_bn", "timm_repvggdw", "timm_repvit_classifier"}
"""The families whose blocks this model holds (tests/test_family_contract.py)."""

SMALL = {"embed_dim": (8, 16), "depth": (2, 2), "num_classes": 5}


class Side(nn.Module):
    """Two models on one input, their outputs concatenated."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.first(x), self.second(x)], dim=1)


def small(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name)`` with the small widths (no network: nothing pretrained)."""
    return timm.create_model(name, pretrained=False, **{**SMALL, **kwargs})


def train_model() -> nn.Module:
    return train_form(lambda: Side(small("repvit_m0_9"), small("repvit_m1")), seed=31)


def deploy_model() -> nn.Module:
    return timm.utils.reparameterize_model(train_model())
