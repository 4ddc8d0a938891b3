"""timm SHViT's ``Residual`` around a depthwise ``Conv2dNorm``, and its ``NormLinear`` head.

Follows huggingface/pytorch-image-models ``timm/models/shvit.py`` (``Residual``, ``Conv2dNorm``,
``NormLinear``; Yun & Ro, "SHViT: Single-Head Vision Transformer with Memory Efficient Macro
Design", CVPR 2024). The plain ``Conv2dNorm`` pairs are the :mod:`.timm_c_bn` family.

``Residual`` (``stages.N.blocks.M.conv``, ``stages.N.downsample.{0,3}``): forward ``x + m(x)``. When
``m`` is a ``Conv2dNorm`` (a 3×3 depthwise conv, stride 1, padding 1, then ``bn``), its ``fuse()``
returns that pair fused plus the identity (no keys) as one depthwise ``nn.Conv2d``, which takes the
Residual's place: train keys ``<site>.m.c.weight``, ``<site>.m.bn.*``; deploy ``<site>.weight``,
``<site>.bias``. ``plus(then(conv, bn), identity)``. timm asserts depthwise and adds the identity
as a 1×1 ones kernel padded by one pixel (k = 3 assumed); the algebra centres it for any odd k.
A ``Residual`` around anything else (``FFN``, ``SHSA``) returns itself: not a block (its insides
are ``Conv2dNorm`` pairs of their own).

``NormLinear`` (``head``): ``bn`` (``BatchNorm1d`` over the input features), then ``l`` (``nn.Linear``
with bias): ``then(bn, l)``; ``fuse()`` returns an ``nn.Linear`` in its place: deploy keys
``head.weight``, ``head.bias``.
"""

from __future__ import annotations

from torch import nn

from ..algebra import maps
from ..algebra.maps import Map, plus
from ..fusion.values import FusedConv
from .base import Family
from .timm_c_bn import (
    SHVIT,
    c_bn,
    is_c_bn,
    is_norm_linear,
    is_timm,
    linear_from_fused,
    linear_shape,
    norm_linear,
)


class TimmShvitResidual(Family):
    name = "timm_shvit_residual"
    title = "timm SHViT Residual around a depthwise Conv2dNorm (conv + BN + identity)"
    source = "huggingface/pytorch-image-models timm/models/shvit.py Residual, Conv2dNorm (SHViT, CVPR 2024)"
    anchor = "m.c.weight"
    parts = ("m",)
    deploy = ""
    only_in = ("shvit",)
    encloses = ("timm_c_bn",)
    train_keys = "m.c.weight (3x3 depthwise), m.bn; identity (no keys)"
    deploy_keys = "weight, bias (the Residual becomes a depthwise Conv2d)"
    after_sum = "nothing"

    def expression(self, v) -> Map | None:
        if v.tree == "key" and not (v.has("m.bn.running_var") or v.has("m.bn.running_mean")):
            return None
        return plus(c_bn(v, "m", depthwise=True), maps.identity())

    def matches_module(self, module: nn.Module) -> bool:
        return is_timm(module, SHVIT, "Residual") and is_c_bn(getattr(module, "m", None))


class TimmShvitNormLinear(Family):
    name = "timm_shvit_normlinear"
    title = "timm SHViT NormLinear head (BatchNorm1d, then Linear)"
    source = "huggingface/pytorch-image-models timm/models/shvit.py NormLinear (SHViT, CVPR 2024)"
    anchor = "l.weight"
    parts = ("bn", "l")
    deploy = ""
    only_in = ("shvit",)
    train_keys = "bn (BatchNorm1d over the inputs), l.{weight,bias}"
    deploy_keys = "weight, bias (the head becomes a Linear)"
    after_sum = "nothing (a plain pair, no sum)"

    def expression(self, v) -> Map | None:
        value = norm_linear(v, "")
        v.weight_shape = linear_shape(value)
        return value

    def matches_module(self, module: nn.Module) -> bool:
        return is_norm_linear(module, SHVIT)

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        # timm's fuse() returns an nn.Linear, which the generic switch (a Conv2d) cannot say
        return linear_from_fused(fused, like=module.l.weight)
