"""The plain block of tutorials and blog posts.

Follows the form most RepVGG write-ups teach (Ding et al., "RepVGG: Making VGG-style ConvNets
Great Again", CVPR 2021, Fig. 4): ``bn3x3(conv3x3(x)) + bn1x1(conv1x1(x)) + identity(x)``, with
nothing after the sum. Its deploy form is the block replaced by one ``nn.Conv2d``: deploy keys
``<block>.weight`` and ``<block>.bias``.
"""

from __future__ import annotations

from torch import nn

from ..fusion import Branches, FusedConv
from .base import (
    Block,
    Family,
    FamilyOptions,
    KeyView,
    conv_branch_from_module,
    conv_from_fused,
    geometry_from_conv,
    identity_from_module,
    source_dtype,
)

PARTS = ("conv3x3", "bn3x3", "conv1x1", "bn1x1", "identity")


class PlainBlock(Family):
    name = "plain"
    title = "plain block (tutorials, blog posts)"
    source = "Ding et al., RepVGG (CVPR 2021), the form most tutorials copy"
    anchor = "conv3x3.weight"
    train_keys = "conv3x3, bn3x3, conv1x1, bn1x1, [identity (BN)]"
    deploy_keys = "<block>.weight, <block>.bias (the block becomes a Conv2d)"
    after_sum = "nothing"

    def parse_keys(self, view: KeyView, options: FamilyOptions) -> Block | None:
        if not view.has("conv1x1.weight"):
            return None
        # The whole block becomes one conv: nothing else may live under its prefix.
        return self.parse_dense_point_identity(
            view, options, ("conv3x3", "bn3x3"), ("conv1x1", "bn1x1"), "identity", deploy_leaf="", owned=("",),
        )

    def matches_module(self, module: nn.Module) -> bool:
        return all(isinstance(getattr(module, p, None), nn.Module) for p in PARTS[:4]) and isinstance(
            module.conv3x3, nn.Conv2d
        )

    def parse_module(self, name: str, module: nn.Module, options: FamilyOptions) -> Block:
        where = name or "<root>"
        dense = conv_branch_from_module(module.conv3x3, module.bn3x3, f"{where}.conv3x3")
        point = conv_branch_from_module(module.conv1x1, module.bn1x1, f"{where}.conv1x1")
        identity = identity_from_module(getattr(module, "identity", None), f"{where}.identity")
        branches = Branches(convs=(dense, point), identity=identity, **geometry_from_conv(module.conv3x3))
        return Block(
            name=name,
            family=self.name,
            branches=branches,
            source_keys=self.module_keys(name, module, *PARTS),
            deploy_prefix=name,
            dtype=source_dtype(module.conv3x3.weight),
        )

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        return conv_from_fused(fused, like=module.conv3x3.weight)
