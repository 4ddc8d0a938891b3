"""The official RepVGG block, and YOLOv6's RepVGGBlock, which shares its layout.

Follows DingXiaoH/RepVGG ``repvgg.py`` / ``repvggplus.py`` (Ding et al., CVPR 2021) and
meituan/YOLOv6 ``yolov6/layers/common.py``: ``rbr_dense`` (conv+bn), ``rbr_1x1`` (conv+bn) and an
optional ``rbr_identity`` BN, summed, then ``se`` and ``nonlinearity`` (RepVGGplus: the
nonlinearity, then ``post_se``). Deploy form: ``rbr_reparam`` (a Conv2d with bias); whatever
sits after the sum is kept. RepVGGplus' auxiliary heads (``*_aux*``) are training-only and dropped.
"""

from __future__ import annotations

import re

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
    is_batch_norm,
    join,
    source_dtype,
)

BRANCHES = ("rbr_dense", "rbr_1x1", "rbr_identity")
AUX_COMPONENT = re.compile(r"(^|\.)[^.]*_aux[^.]*\.")


def _has_conv_bn(module: nn.Module | None) -> bool:
    return isinstance(getattr(module, "conv", None), nn.Conv2d) and is_batch_norm(getattr(module, "bn", None))


class OfficialRepVGG(Family):
    name = "official"
    title = "official RepVGG / RepVGGplus / YOLOv6 RepVGGBlock"
    source = "DingXiaoH/RepVGG repvgg.py (CVPR 2021); meituan/YOLOv6 yolov6/layers/common.py"
    anchor = "rbr_dense.conv.weight"
    deploy_anchor = "rbr_reparam.weight"
    train_keys = "rbr_dense.{conv,bn}, rbr_1x1.{conv,bn}, [rbr_identity (BN)]"
    deploy_keys = "rbr_reparam.{weight,bias}"
    after_sum = "se, then nonlinearity (RepVGGplus: nonlinearity, then post_se) - kept"

    def find_deploy_prefixes(self, keys: list[str]) -> list[str]:
        """Deploy-form blocks, except QARepVGG's (its deploy form keeps a post-sum ``bn``)."""
        present = set(keys)
        return [p for p in super().find_deploy_prefixes(keys) if join(p, "bn.running_var") not in present]

    def dropped_keys(self, keys: list[str]) -> list[str]:
        """Training-only keys to drop when this family's blocks are converted (RepVGGplus aux heads)."""
        return [k for k in keys if AUX_COMPONENT.search(k)]

    def parse_keys(self, view: KeyView, options: FamilyOptions) -> Block | None:
        if not view.has("rbr_1x1.conv.weight"):
            return None  # e.g. QARepVGG: a plain rbr_1x1 conv, another family's business
        return self.parse_dense_point_identity(
            view, options, ("rbr_dense.conv", "rbr_dense.bn"), ("rbr_1x1.conv", "rbr_1x1.bn"), "rbr_identity",
            deploy_leaf="rbr_reparam", owned=BRANCHES,
        )

    def matches_module(self, module: nn.Module) -> bool:
        return _has_conv_bn(getattr(module, "rbr_dense", None)) and _has_conv_bn(getattr(module, "rbr_1x1", None))

    def parse_module(self, name: str, module: nn.Module, options: FamilyOptions) -> Block:
        where = name or "<root>"
        dense = conv_branch_from_module(module.rbr_dense.conv, module.rbr_dense.bn, f"{where}.rbr_dense")
        point = conv_branch_from_module(module.rbr_1x1.conv, module.rbr_1x1.bn, f"{where}.rbr_1x1")
        identity = identity_from_module(getattr(module, "rbr_identity", None), f"{where}.rbr_identity")
        branches = Branches(convs=(dense, point), identity=identity, **geometry_from_conv(module.rbr_dense.conv))
        return Block(
            name=name,
            family=self.name,
            branches=branches,
            source_keys=self.module_keys(name, module, *BRANCHES),
            deploy_prefix=join(name, "rbr_reparam"),
            dtype=source_dtype(module.rbr_dense.conv.weight),
        )

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        module.rbr_reparam = conv_from_fused(fused, like=module.rbr_dense.conv.weight)
        for branch in BRANCHES:
            if hasattr(module, branch):
                delattr(module, branch)
        if hasattr(module, "id_tensor"):
            delattr(module, "id_tensor")
        if hasattr(module, "deploy"):
            module.deploy = True
        return module
