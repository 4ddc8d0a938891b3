"""timm iFormer's ``RepCPE`` (a depthwise ``ConvNorm`` in a residual, folded with its identity).

Follows huggingface/pytorch-image-models ``timm/models/iformer.py`` (``RepCPE``, ``Residual``,
``ConvNorm``; Zheng, "iFormer: Integrating ConvNet and Transformer for Mobile Application", ICLR
2025). The plain ``ConvNorm`` pairs are the :mod:`.timm_c_bn` family, the ``RepVitClassifier``
head the :mod:`.timm_repvit` one.

``RepCPE`` (an entry of ``stages.N.blocks``, before each attention group): ``cpe``, a ``Residual``
(forward ``x + module(x)``, no layer scale and an identity ``drop_path``) around ``module``, a
``ConvNorm`` (k×k depthwise, stride 1, padding ``k // 2``, then ``bn``; k = 3 in the timm models).
Its ``fuse()`` returns the pair fused with ``1`` added at the kernel centre, one depthwise
``nn.Conv2d`` that takes the RepCPE's place: train keys ``<site>.cpe.module.c.weight``,
``<site>.cpe.module.bn.*``; deploy ``<site>.weight``, ``<site>.bias`` (three levels vanish).
``plus(then(conv, bn), identity)``. A ``cpe.gamma`` (a layer scale, which timm's ``fuse()`` would
ignore) is refused as a key the block does not know.
"""

from __future__ import annotations

from torch import nn

from ..algebra import maps
from ..algebra.maps import Map, plus
from ..errors import UnsupportedError
from .base import Family
from .timm_c_bn import IFORMER, c_bn, is_c_bn, is_timm


class TimmIformerRepCPE(Family):
    name = "timm_iformer_repcpe"
    title = "timm iFormer RepCPE (depthwise ConvNorm + identity)"
    source = "huggingface/pytorch-image-models timm/models/iformer.py RepCPE, Residual, ConvNorm (iFormer, ICLR 2025)"
    anchor = "cpe.module.c.weight"
    parts = ("cpe",)
    deploy = ""
    only_in = ("iformer",)
    encloses = ("timm_c_bn",)
    train_keys = "cpe.module.c.weight (kxk depthwise), cpe.module.bn; identity (no keys)"
    deploy_keys = "weight, bias (the RepCPE becomes a depthwise Conv2d)"
    after_sum = "nothing"

    def expression(self, v) -> Map | None:
        if v.tree == "module":
            residual = v.get("cpe")
            if getattr(residual, "gamma", None) is not None:
                raise UnsupportedError(f"{v.label('cpe')} has a layer scale (gamma), which timm's RepCPE.fuse() "
                                       "ignores; its fused form would not be this block")
        return plus(c_bn(v, "cpe.module", depthwise=True), maps.identity())

    def matches_module(self, module: nn.Module) -> bool:
        residual = getattr(module, "cpe", None)
        return (is_timm(module, IFORMER, "RepCPE") and is_timm(residual, IFORMER, "Residual")
                and is_c_bn(getattr(residual, "module", None)))
