"""timm RepViT's token mixer ``RepVggDw`` (both layouts) and its ``RepVitClassifier`` head (RepViT and
iFormer).

Follows huggingface/pytorch-image-models ``timm/models/repvit.py`` (``RepVggDw``,
``RepVitClassifier``, ``NormLinear``; Wang et al., "RepViT: Revisiting Mobile CNN From ViT
Perspective", CVPR 2024) and ``timm/models/iformer.py`` (``RepVitClassifier``, the same head).

``RepVggDw`` (``stages.N.blocks.M.token_mixer``, ``stages.N.downsample.pre_block.token_mixer``), a
depthwise block on ``C`` channels, stride 1, forward ``bn(conv(x) + conv1(x) + x)``:

- ``conv``: a ``ConvNorm`` (``c`` k×k depthwise, padding ``(k - 1) // 2``, then ``bn``);
- ``conv1``: a plain depthwise 1×1 ``nn.Conv2d`` *with* bias, and ``bn`` a ``BatchNorm2d`` after
  the sum (default layout: repvit_m0_9, m1_0, m1_1, m1_5, m2_3), or, with ``legacy=True``
  (repvit_m1, m2, m3), ``conv1`` a depthwise 1×1 ``ConvNorm`` and ``bn`` an ``nn.Identity``;
- the identity: no keys, always there (a class invariant).

``then(plus(then(conv, bn_c), conv1, identity), bn)`` (legacy: ``plus(then(conv, bn_c),
then(conv1, bn_1), identity)``). Its ``fuse()`` returns one depthwise ``nn.Conv2d`` (``conv.c``'s
geometry, bias) that takes the block's place: deploy keys ``<block>.weight``, ``<block>.bias``.
timm places the 1×1 and the identity by padding a 1×1 kernel by one pixel on each side, i.e. it
assumes k = 3 (every RepViT variant); the algebra centres them for any odd k.

``RepVitClassifier`` (``head``): ``head`` and, with distillation, ``head_dist``, each a
``NormLinear`` (``bn`` ``BatchNorm1d`` over the inputs, then ``l`` an ``nn.Linear`` with bias);
eval forward ``head(x)`` or ``(head(x) + head_dist(x)) / 2`` (``head_drop`` is a no-op in eval).
Its ``fuse()`` returns one ``nn.Linear`` that takes the classifier's place: deploy keys
``head.weight``, ``head.bias``. ``then(bn, l)``, or ``then(plus(then(bn_h, l_h), then(bn_d, l_d)),
scale(½))``. iFormer without distillation has ``head_dist = nn.Identity()`` (no keys); with
``num_classes = 0`` the head has no keys and is no block.
"""

from __future__ import annotations

import torch
from torch import nn

from ..algebra import maps
from ..algebra.maps import Map, plus, then
from ..errors import UnsupportedError
from ..fusion.values import FusedConv
from .base import Family
from .modules import is_batch_norm
from .timm_c_bn import (
    IFORMER,
    REPVIT,
    c_bn,
    is_c_bn,
    is_norm_linear,
    is_timm,
    linear_from_fused,
    linear_shape,
    norm_linear,
)


def _depthwise_conv1(v) -> Map:
    """The default layout's plain 1×1 ``conv1`` (with bias), depthwise."""
    if v.tree == "module":
        return v.conv("conv1")
    weight = v.state.get(v.key("conv1.weight"))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or int(weight.shape[1]) != 1:
        raise UnsupportedError(f"{v.where}: {v.label('conv1.weight')} is not a depthwise (C, 1, k, k) conv weight; "
                               "timm's RepVggDw builds conv1 depthwise")
    return v.conv("conv1", groups=int(weight.shape[0]))


class TimmRepVggDw(Family):
    name = "timm_repvggdw"
    title = "timm RepViT RepVggDw (depthwise k x k + 1x1 + identity, both layouts)"
    source = "huggingface/pytorch-image-models timm/models/repvit.py RepVggDw (RepViT, CVPR 2024)"
    anchor = "conv.c.weight"
    parts = ("conv", "conv1", "bn")
    deploy = ""
    only_in = ("repvit",)
    encloses = ("timm_c_bn",)
    train_keys = "conv.{c,bn} (kxk dw), conv1.{weight,bias} (1x1 dw) + bn | legacy: conv1.{c,bn}; identity (no keys)"
    deploy_keys = "weight, bias (the block becomes a depthwise Conv2d)"
    after_sum = "bn (BatchNorm2d, default layout; folded), then se and channel_mixer - kept"

    def expression(self, v) -> Map | None:
        legacy = v.has("conv1.c.weight")
        if v.tree == "key" and not legacy and not v.has("conv1.weight"):
            return None  # not a RepVggDw
        terms = [c_bn(v, "conv", depthwise=True), c_bn(v, "conv1", depthwise=True) if legacy else _depthwise_conv1(v),
                 maps.identity()]
        value = plus(*terms)
        outer = v.get("bn") if v.tree == "module" else None
        if v.tree == "module" and not (is_batch_norm(outer) or isinstance(outer, nn.Identity)):
            raise UnsupportedError(f"{v.label('bn')} is a {type(outer).__name__}; a BatchNorm2d or nn.Identity "
                                   "is expected")
        if (v.tree == "key" and v.has_any("bn")) or is_batch_norm(outer):
            value = then(value, v.bn("bn"))
        return value

    def matches_module(self, module: nn.Module) -> bool:
        if not is_timm(module, REPVIT, "RepVggDw") or not is_c_bn(getattr(module, "conv", None)):
            return False
        conv1 = getattr(module, "conv1", None)
        return type(conv1) is nn.Conv2d or is_c_bn(conv1)


class TimmRepVitClassifier(Family):
    name = "timm_repvit_classifier"
    title = "timm RepViT / iFormer RepVitClassifier (NormLinear head [+ head_dist, averaged])"
    source = ("huggingface/pytorch-image-models timm/models/repvit.py RepVitClassifier, NormLinear "
              "(RepViT, CVPR 2024); timm/models/iformer.py RepVitClassifier")
    anchor = "head.l.weight"
    parts = ("head", "head_dist")
    deploy = ""
    only_in = ("repvit", "iformer")
    train_keys = "head.{bn,l}, [head_dist.{bn,l}] (NormLinear: BatchNorm1d, then Linear)"
    deploy_keys = "weight, bias (the classifier becomes a Linear)"
    after_sum = "nothing (distilled: the two heads' average)"

    def expression(self, v) -> Map | None:
        main = norm_linear(v, "head")
        distilled = v.has_any("head_dist") if v.tree == "key" else bool(getattr(v.module, "distillation", False))
        value = main
        if distilled:
            dist = norm_linear(v, "head_dist")
            if linear_shape(dist) != linear_shape(main):
                raise UnsupportedError(f"{v.where}: head_dist.l is {linear_shape(dist)} but head.l is "
                                       f"{linear_shape(main)}; the two heads are averaged")
            half = torch.full((linear_shape(main)[0],), 0.5, dtype=torch.float64)
            value = then(plus(main, dist), maps.scale(half))
        v.weight_shape = linear_shape(main)
        return value

    def matches_module(self, module: nn.Module) -> bool:
        for file in (REPVIT, IFORMER):
            if is_timm(module, file, "RepVitClassifier") and is_norm_linear(getattr(module, "head", None), file):
                dist = getattr(module, "head_dist", None)
                return not getattr(module, "distillation", False) or is_norm_linear(dist, file)
        return False

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        # timm's fuse() returns an nn.Linear, which the generic switch (a Conv2d) cannot say
        return linear_from_fused(fused, like=module.head.l.weight)
