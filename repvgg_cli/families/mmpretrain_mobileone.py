"""mmpretrain's MobileOneBlock (the ``MobileOne`` backbone of open-mmlab/mmpretrain).

Follows open-mmlab/mmpretrain ``mmpretrain/models/backbones/mobileone.py`` (after Vasu et al.,
"MobileOne: An Improved One millisecond Mobile Backbone", CVPR 2023). Train form:
``branch_conv_list`` (a ModuleList of ``num_convs`` k×k ``Sequential(conv, norm)``, the block's
padding and dilation), ``branch_scale`` (a 1×1 ``Sequential(conv, norm)``, padding 0, only for
k > 1) and ``branch_norm`` (a BN, only when in == out and stride 1), summed; then ``se`` (an
``SELayer`` of mmcv ConvModules ``conv1``/``conv2``, or Identity) and ``act``, both kept. The BN
inside each branch is named ``norm`` (mmpretrain's ``create_conv_bn``), not ``bn``.

Deploy form, as ``switch_to_deploy`` leaves it: ``branch_reparam`` (a k×k Conv2d with bias, the
block's stride, padding, dilation and groups), the three branches deleted, ``deploy = True``.

Dilation: the block takes one (the backbone never uses it). Its k×k branches share it, and the
1×1 and identity branches sit on the centre tap, so the sum is the k×k kernel with that dilation
(the algebra keeps a dilation all k×k terms share). A state dict does not store the dilation;
the fused tensors do not depend on it.

mmpretrain's RepVGG block shares ``branch_norm``/``branch_reparam``; MobileOne is told apart by
``branch_conv_list`` (the ``mmpretrain`` family anchors on ``branch_3x3``).
"""

from __future__ import annotations

from torch import nn

from ..algebra.maps import Map, plus
from .base import Family
from .replknet import conv_bn_pair, is_conv_bn_pair
from .timm_mobileone import numbered

PARTS = ("branch_conv_list", "branch_scale", "branch_norm")


class MmpretrainMobileOne(Family):
    name = "mmpretrain_mobileone"
    title = "mmpretrain MobileOneBlock"
    source = "open-mmlab/mmpretrain mmpretrain/models/backbones/mobileone.py (MobileOne, CVPR 2023)"
    anchor = "branch_conv_list.0.conv.weight"
    deploy_anchor = "branch_reparam.weight"
    parts = PARTS
    deploy = "branch_reparam"
    deploy_flags = {"deploy": True}
    train_keys = "branch_conv_list.{i}.{conv,norm}, [branch_scale.{conv,norm}], [branch_norm (BN)]"
    deploy_keys = "branch_reparam.{weight,bias}"
    after_sum = "se, then act - kept"

    def expression(self, v) -> Map | None:
        terms = [conv_bn_pair(v, local, "norm") for local in numbered(v, "branch_conv_list")]
        if v.has_any("branch_scale"):
            terms.append(conv_bn_pair(v, "branch_scale", "norm"))
        identity = v.identity_bn("branch_norm")
        if not terms:
            return None
        return plus(*terms, *([identity] if identity is not None else []))

    def matches_module(self, module: nn.Module) -> bool:
        conv_list = getattr(module, "branch_conv_list", None)
        if getattr(module, "branch_reparam", None) is not None or not isinstance(conv_list, nn.ModuleList):
            return False
        scale = getattr(module, "branch_scale", None)
        return (len(conv_list) > 0 and all(is_conv_bn_pair(m, "norm") for m in conv_list)
                and (scale is None or is_conv_bn_pair(scale, "norm")) and hasattr(module, "branch_norm"))
