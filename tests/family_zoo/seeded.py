"""Seeded construction and randomisation shared by the upstream-rewrite zoos.

The rewrites of RepLKNet, UniRepLKNet, apple's FastViT and mmpretrain's MobileOne build their
train models here: under a private RNG state (so ``train_model()`` is deterministic and leaves the
global generator alone), with every BN given random running statistics and affine parameters, and
every parameter that starts constant (layer scales, GRN gamma/beta, zero biases) given random
values of both signs. With fresh statistics or constant scales a wrong fusion can still match.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from tests import zoo


def build_seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Call ``factory`` with the global torch generator seeded to ``seed``, then restore it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def randomize_constants(model: nn.Module, seed: int) -> nn.Module:
    """Randomise every BN and every parameter whose entries are all equal (in place).

    Args:
        model: the model to change.
        seed: seed of the private generator used for the new values.

    Returns:
        ``model`` itself.
    """
    zoo.randomize_bn(model, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            flat = param.detach().reshape(-1)
            if flat.numel() and bool((flat == flat[0]).all()):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5 + 0.3)
    return model


def train_form(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """A seeded model from ``factory`` with randomised BNs and constants, in eval mode."""
    return randomize_constants(build_seeded(factory, seed), seed + 100).eval()
