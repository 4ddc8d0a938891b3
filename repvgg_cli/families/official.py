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

from ..algebra.maps import Map, plus
from .base import Family
from .keys import join
from .modules import is_batch_norm

AUX_COMPONENT = re.compile(r"(^|\.)[^.]*_aux[^.]*\.")


def _has_conv_bn(module: nn.Module | None) -> bool:
    return isinstance(getattr(module, "conv", None), nn.Conv2d) and is_batch_norm(getattr(module, "bn", None))


class OfficialRepVGG(Family):
    name = "official"
    title = "official RepVGG / RepVGGplus / YOLOv6 RepVGGBlock"
    source = "DingXiaoH/RepVGG repvgg.py (CVPR 2021); meituan/YOLOv6 yolov6/layers/common.py"
    anchor = "rbr_dense.conv.weight"
    deploy_anchor = "rbr_reparam.weight"
    parts = ("rbr_dense", "rbr_1x1", "rbr_identity", "id_tensor")
    deploy = "rbr_reparam"
    deploy_flags = {"deploy": True}
    train_keys = "rbr_dense.{conv,bn}, rbr_1x1.{conv,bn}, [rbr_identity (BN)]"
    deploy_keys = "rbr_reparam.{weight,bias}"
    eps_known = False  # a layout many projects share (YOLOv6 builds it with eps 1e-3)
    after_sum = "se, then nonlinearity (RepVGGplus: nonlinearity, then post_se) - kept"

    def expression(self, v) -> Map | None:
        if not v.has("rbr_1x1.conv.weight"):
            return None  # e.g. QARepVGG: a plain rbr_1x1 conv, another family's business
        branches = [v.conv_bn("rbr_dense.conv", "rbr_dense.bn"), v.conv_bn("rbr_1x1.conv", "rbr_1x1.bn")]
        identity = v.identity_bn("rbr_identity")
        return plus(*branches, *([identity] if identity is not None else []))

    def matches_module(self, module: nn.Module) -> bool:
        return _has_conv_bn(getattr(module, "rbr_dense", None)) and _has_conv_bn(getattr(module, "rbr_1x1", None))

    def find_deploy_prefixes(self, keys: list[str]) -> list[str]:
        """Deploy-form blocks, except QARepVGG's (its deploy form keeps a post-sum ``bn``)."""
        present = set(keys)
        return [p for p in super().find_deploy_prefixes(keys) if join(p, "bn.running_var") not in present]

    def dropped_keys(self, keys: list[str]) -> list[str]:
        """Training-only keys to drop when this family's blocks are converted (RepVGGplus aux heads)."""
        return [k for k in keys if AUX_COMPONENT.search(k)]
