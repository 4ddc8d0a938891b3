"""The plain block of tutorials and blog posts.

Follows the form most RepVGG write-ups teach (Ding et al., "RepVGG: Making VGG-style ConvNets
Great Again", CVPR 2021, Fig. 4): ``bn3x3(conv3x3(x)) + bn1x1(conv1x1(x)) + identity(x)``, with
nothing after the sum. Its deploy form is the block replaced by one ``nn.Conv2d``: deploy keys
``<block>.weight`` and ``<block>.bias``.
"""

from __future__ import annotations

from torch import nn

from ..algebra.maps import Map, plus
from .base import Family


class PlainBlock(Family):
    name = "plain"
    title = "plain block (tutorials, blog posts)"
    source = "Ding et al., RepVGG (CVPR 2021), the form most tutorials copy"
    anchor = "conv3x3.weight"
    parts = ("",)  # the whole block becomes one conv: nothing else may live under its prefix
    deploy = ""
    train_keys = "conv3x3, bn3x3, conv1x1, bn1x1, [identity (BN)]"
    deploy_keys = "<block>.weight, <block>.bias (the block becomes a Conv2d)"
    eps_known = False  # a tutorial layout: the project, and so its eps, is unknown
    after_sum = "nothing"

    def expression(self, v) -> Map | None:
        if not v.has("conv1x1.weight"):
            return None
        identity = v.identity_bn("identity")
        return plus(v.conv_bn("conv3x3", "bn3x3"), v.conv_bn("conv1x1", "bn1x1"),
                    *([identity] if identity is not None else []))

    def matches_module(self, module: nn.Module) -> bool:
        children = ("conv3x3", "bn3x3", "conv1x1", "bn1x1")
        return all(isinstance(getattr(module, p, None), nn.Module) for p in children) and isinstance(
            module.conv3x3, nn.Conv2d
        )
