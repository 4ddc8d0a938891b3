"""The conv→BN, linear→BN and BN→linear pairs that timm's LeViT, EfficientViT (MSRA) and TinyViT fold.

Follows huggingface/pytorch-image-models (installed timm 1.0.31):

- ``timm/models/levit.py`` (LeViT, Graham et al., ICCV 2021): ``ConvNorm`` (a ``Conv2d`` named
  ``linear``, bias-free, then ``BatchNorm2d`` ``bn``), ``LinearNorm`` (a bias-free ``nn.Linear``
  ``linear``, then ``BatchNorm1d`` ``bn`` over ``x.flatten(0, 1)``, i.e. per feature) and
  ``NormLinear`` (``BatchNorm1d`` ``bn``, ``Dropout`` ``drop``, ``nn.Linear`` ``linear`` with
  bias: the ``head`` and ``head_dist`` classifiers). ``levit_conv_*`` builds ``ConvNorm`` (1×1)
  where ``levit_*`` builds ``LinearNorm``.
- ``timm/models/efficientvit_msra.py`` (EfficientViT, Liu et al., CVPR 2023): ``ConvNorm``
  (``conv`` then ``bn``, an ``nn.Sequential``) and ``NormLinear`` (as LeViT's).
- ``timm/models/tiny_vit.py`` (TinyViT, Wu et al., ECCV 2022): ``ConvNorm`` (``conv`` then ``bn``).

Each class's ``fuse()`` returns one module that ``timm.utils.reparameterize_model`` puts in its
place: ``nn.Conv2d`` (with bias, the conv's geometry) for ConvNorm, ``nn.Linear`` for LinearNorm and
NormLinear. Deploy keys: ``<site>.weight``, ``<site>.bias``. Math (BN eps 1e-5 everywhere):
ConvNorm ``then(conv, bn)``, LinearNorm ``then(linear, bn)``, NormLinear ``then(bn, linear)``
(the dropout between is a no-op in eval). EfficientViT's ``ResidualDrop`` (``x + m(x)``) around
some ConvNorms is *not* folded by timm: only its ``m`` is a site, the residual stays.

These layouts are generic (``conv``/``bn`` is everywhere, and timm keeps most such pairs unfused),
so every family here is switched on only inside the architectures recognised from the whole key
layout (:mod:`.architectures`: ``levit``, ``efficientvit_msra``, ``tiny_vit``); in a live model
only timm's own classes are matched.

LinearNorm and NormLinear share their keys (``linear.weight``, ``bn.*``). A state dict tells them
apart by the BN's width (the linear's output features: LinearNorm; its input features:
NormLinear); a square pair by ``linear.bias`` (timm's LinearNorm has none, its NormLinear heads
have one). Key order is not used to decide: a safetensors file lists keys sorted, ``bn`` before
``linear`` whatever the module order.
"""

from __future__ import annotations

import torch
from torch import nn

from ..algebra.maps import Map, then
from ..errors import InputError
from ..fusion.values import FusedConv
from .base import Family
from .modules import is_batch_norm

LEVIT = "timm.models.levit"
EFFICIENTVIT = "timm.models.efficientvit_msra"
TINYVIT = "timm.models.tiny_vit"


def _is_timm(module: object, file: str, cls: str) -> bool:
    """Exactly timm's class (a subclass may change the forward)."""
    return type(module).__module__ == file and type(module).__name__ == cls


def _children(module: nn.Module) -> dict[str, nn.Module]:
    return dict(module.named_children())


def _linear_kind(v) -> str | None:
    """``"linear_norm"``, ``"norm_linear"`` or None (not a 2-D linear with a BN) for the key tree.

    Raises:
        InputError: the BN's width fits neither of the linear's dimensions.
    """
    weight = v.state.get(v.key("linear.weight"))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not v.has("bn.running_mean"):
        return None
    mean = v.state[v.key("bn.running_mean")]
    width = int(mean.shape[0]) if isinstance(mean, torch.Tensor) and mean.dim() == 1 else -1
    out_features, in_features = (int(n) for n in weight.shape)
    architecture = getattr(getattr(v.options, "architecture", None), "name", None)
    if architecture == "efficientvit_msra":
        return "norm_linear"  # its only linear+BN pair is the NormLinear head
    if out_features != in_features:
        if width == out_features:
            return "linear_norm"
        if width == in_features:
            return "norm_linear"
        raise InputError(
            f"{v.where}: {v.key('bn.running_mean')} has {width} channels but {v.key('linear.weight')} is "
            f"{out_features}x{in_features}: neither a LinearNorm (BN over the {out_features} outputs) nor a "
            f"NormLinear (BN over the {in_features} inputs)"
        )
    if v.has("linear.bias"):
        return "norm_linear"  # square: timm's LinearNorm has no bias, its NormLinear heads have one
    return "linear_norm"


class _LinearDeploy(Family):
    """The block becomes an ``nn.Linear`` (what timm's ``fuse()`` returns)."""

    deploy = ""

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        like = module.linear.weight
        out_features, in_features = int(fused.weight.shape[0]), int(fused.weight.shape[1])
        linear = nn.Linear(in_features, out_features, bias=True, device="meta")
        linear.weight = nn.Parameter(fused.weight.reshape(out_features, in_features).to(like).clone())
        linear.bias = nn.Parameter(fused.bias.to(like).clone())
        return linear


class TimmLevitConvNorm(Family):
    name = "timm_levit_convnorm"
    title = "timm LeViT ConvNorm (conv named linear, then BN)"
    source = "huggingface/pytorch-image-models timm/models/levit.py ConvNorm (LeViT, ICCV 2021)"
    anchor = "linear.weight"
    parts = ("",)
    deploy = ""
    only_in = ("levit",)
    train_keys = "linear.weight (4-D conv), bn (BatchNorm2d)"
    deploy_keys = "weight, bias (the block becomes a Conv2d)"
    after_sum = "nothing (a plain pair, no sum)"

    def expression(self, v) -> Map | None:
        if v.tree == "key":
            weight = v.state.get(v.key("linear.weight"))
            if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
                return None  # a LinearNorm or NormLinear
        return v.conv_bn("linear", "bn")

    def matches_module(self, module: nn.Module) -> bool:
        children = _children(module)
        return (_is_timm(module, LEVIT, "ConvNorm") and set(children) == {"linear", "bn"}
                and isinstance(children["linear"], nn.Conv2d) and is_batch_norm(children["bn"]))


class TimmLevitLinearNorm(_LinearDeploy):
    name = "timm_levit_linearnorm"
    title = "timm LeViT LinearNorm (Linear, then BatchNorm1d)"
    source = "huggingface/pytorch-image-models timm/models/levit.py LinearNorm (LeViT, ICCV 2021)"
    anchor = "linear.weight"
    parts = ("",)
    only_in = ("levit",)
    train_keys = "linear.weight (2-D, no bias), bn (BatchNorm1d over the outputs)"
    deploy_keys = "weight, bias (the block becomes a Linear)"
    after_sum = "nothing (a plain pair, no sum)"

    def expression(self, v) -> Map | None:
        if v.tree == "key" and _linear_kind(v) != "linear_norm":
            return None
        linear = v.linear("linear")
        out_features, in_features = (int(n) for n in linear.convs[0].weight.shape[:2])
        v.weight_shape = (out_features, in_features)
        return then(linear, v.bn("bn", out_features, f"{v.label('linear.weight')} (output features)"))

    def matches_module(self, module: nn.Module) -> bool:
        children = _children(module)
        return (_is_timm(module, LEVIT, "LinearNorm") and set(children) == {"linear", "bn"}
                and isinstance(children["linear"], nn.Linear) and is_batch_norm(children["bn"]))


class TimmNormLinear(_LinearDeploy):
    name = "timm_normlinear"
    title = "timm LeViT / EfficientViT NormLinear (BatchNorm1d, then Linear: the heads)"
    source = ("huggingface/pytorch-image-models timm/models/levit.py NormLinear (LeViT, ICCV 2021), "
              "timm/models/efficientvit_msra.py NormLinear (EfficientViT, CVPR 2023)")
    anchor = "linear.weight"
    parts = ("",)
    only_in = ("levit", "efficientvit_msra")
    train_keys = "bn (BatchNorm1d over the inputs), [drop], linear.{weight,bias}"
    deploy_keys = "weight, bias (the block becomes a Linear)"
    after_sum = "nothing (a plain pair, no sum)"

    def expression(self, v) -> Map | None:
        if v.tree == "key" and _linear_kind(v) != "norm_linear":
            return None
        linear = v.linear("linear")
        out_features, in_features = (int(n) for n in linear.convs[0].weight.shape[:2])
        v.weight_shape = (out_features, in_features)
        return then(v.bn("bn", in_features, f"{v.label('linear.weight')} (input features)"), linear)

    def matches_module(self, module: nn.Module) -> bool:
        if not (_is_timm(module, LEVIT, "NormLinear") or _is_timm(module, EFFICIENTVIT, "NormLinear")):
            return False
        children = _children(module)
        return (set(children) == {"bn", "drop", "linear"} and is_batch_norm(children["bn"])
                and isinstance(children["drop"], nn.Dropout) and isinstance(children["linear"], nn.Linear))


class TimmConvNorm(Family):
    name = "timm_convnorm"
    title = "timm EfficientViT (MSRA) / TinyViT ConvNorm (conv, then BN)"
    source = ("huggingface/pytorch-image-models timm/models/efficientvit_msra.py ConvNorm (EfficientViT, "
              "CVPR 2023), timm/models/tiny_vit.py ConvNorm (TinyViT, ECCV 2022)")
    anchor = "conv.weight"
    parts = ("",)
    deploy = ""
    only_in = ("efficientvit_msra", "tiny_vit")
    train_keys = "conv.weight, bn (BatchNorm2d)"
    deploy_keys = "weight, bias (the block becomes a Conv2d)"
    after_sum = "nothing (a plain pair, no sum; EfficientViT's ResidualDrop around it is kept)"

    def expression(self, v) -> Map | None:
        if v.tree == "key" and not v.has_any("bn"):
            return None
        return v.conv_bn("conv", "bn")

    def matches_module(self, module: nn.Module) -> bool:
        if not (_is_timm(module, EFFICIENTVIT, "ConvNorm") or _is_timm(module, TINYVIT, "ConvNorm")):
            return False
        children = _children(module)
        return (set(children) == {"conv", "bn"} and isinstance(children["conv"], nn.Conv2d)
                and is_batch_norm(children["bn"]))

