"""timm fastvit ``RepMixer`` (FastViT's re-parameterizable token mixer).

Follows Vasu et al., "FastViT: A Fast Hybrid Vision Transformer using Structural
Reparameterization" (ICCV 2023) as ported to timm, ``timm/models/fastvit.py`` (``RepMixer``).
Train form: ``x + layer_scale(mixer(x) - norm(x))`` where

- ``mixer`` is a depthwise timm ``MobileOneBlock`` without activation: ``conv_kxk.{i}`` (conv+bn),
  ``conv_scale`` (1×1 conv+bn) and ``identity`` (BN);
- ``norm`` is a ``MobileOneBlock`` with nothing but its ``identity`` BN;
- ``layer_scale`` is a ``LayerScale2d`` (``layer_scale.gamma``, shape ``(dim, 1, 1)``) or absent.

All of it is linear, so the whole mixer folds into one depthwise conv: the expression is
``plus(identity, then(mixer, gamma), then(norm, -gamma))`` (without a layer scale: ``mixer`` and
``then(norm, -1)``); the sum keeps the plain ``x`` as its identity term and writes the two identity
BNs as 1×1 identity-kernel terms, each with its own BN and factor. Deploy form: ``reparam_conv`` (depthwise, bias);
timm's ``reparameterize`` deletes ``mixer``, ``norm`` and ``layer_scale`` (the layer scale is
folded, not kept). Nothing sits after the sum.

The ``MobileOneBlock``s inside are part of this block: :attr:`encloses` keeps the MobileOne
family from claiming them a second time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..algebra import maps
from ..algebra.maps import Map, plus, then
from ..errors import UnsupportedError
from ..fusion.values import FusedConv
from .base import Family
from .fastvit_large_kernel import is_passive, linear_conv_norm
from .keys import join

NOTE = (
    "mixer/norm identity BNs are fused as 1x1 identity-kernel branches; "
    "layer_scale is folded (+gamma for mixer, -gamma for norm)"
)


def _is_timm_mobileone(module: object) -> bool:
    """A train-form timm ``MobileOneBlock`` (the fused ``reparam_conv`` not built yet)."""
    return (
        isinstance(module, nn.Module)
        and all(hasattr(module, part) for part in ("conv_kxk", "conv_scale", "identity"))
        and getattr(module, "reparam_conv", None) is None
    )


def _pairs(v, local: str) -> list[str]:
    """``<local>.0``, ``<local>.1``, …: a live ModuleList's entries, or the consecutive indices from 0
    a state dict holds (a gap leaves the later keys unread: refused as unexpected)."""
    count = len(v.get(local) or ()) if v.tree == "module" else 0
    while v.tree == "key" and v.has(join(local, str(count), "conv", "weight")):
        count += 1
    return [join(local, str(i)) for i in range(count)]


def _linear_mobileone(v, local: str) -> Map | None:
    """A MobileOneBlock inside a RepMixer: its k×k pairs, 1×1 pair and identity BN, summed (it must
    have no SE and no activation); None when it has no branch at all."""
    if v.tree == "module":
        for part in ("se", "act"):
            module = v.get(join(local, part))
            if not is_passive(module):
                raise UnsupportedError(
                    f"{v._label(join(local, part))} is a {type(module).__name__}; a RepMixer's MobileOne "
                    "blocks must be linear (no SE, use_act=False) to be folded"
                )
    terms = [linear_conv_norm(v, pair) for pair in _pairs(v, join(local, "conv_kxk"))]
    if v.has_any(join(local, "conv_scale")):
        terms.append(linear_conv_norm(v, join(local, "conv_scale")))
    if v.has_any(join(local, "identity")):
        terms.append(then(maps.identity(), v.bn(join(local, "identity"))))
    return plus(*terms) if terms else None


class FastVitRepMixer(Family):
    name = "fastvit_repmixer"
    title = "timm fastvit RepMixer"
    source = "Vasu et al., FastViT (ICCV 2023); timm timm/models/fastvit.py RepMixer"
    anchor = "mixer.conv_kxk.0.conv.weight"
    deploy_anchor = "reparam_conv.weight"
    encloses = ("timm_mobileone",)
    parts = ("mixer", "norm", "layer_scale")
    deploy = "reparam_conv"
    train_keys = (
        "mixer.{conv_kxk.i.{conv,bn}, conv_scale.{conv,bn}, identity (BN)}, norm.identity (BN), "
        "[layer_scale.gamma]; x + gamma * (mixer - norm)"
    )
    deploy_keys = "reparam_conv.{weight,bias} (layer_scale folded and removed)"
    after_sum = "nothing"

    def expression(self, v) -> Map | None:
        if v.tree == "key" and not v.has_any("norm.identity"):
            return None  # a MobileOne block called `mixer` without RepMixer's norm: not this family
        if v.tree == "module":
            if not v.get("mixer.conv_kxk"):
                raise UnsupportedError(f"{v.where}.mixer has no conv_kxk branch; timm's RepMixer always has one")
            layer_scale = v.get("layer_scale")
            if not is_passive(layer_scale) and not isinstance(getattr(layer_scale, "gamma", None), Tensor):
                raise UnsupportedError(f"{v.where}.layer_scale is a {type(layer_scale).__name__}; a LayerScale2d "
                                       "(gamma) or nn.Identity is expected")
        mixer = _linear_mobileone(v, "mixer")
        channels = mixer.out_channels
        gamma = v.scale("layer_scale.gamma", channels, required=False)
        minus = -v.tensor("layer_scale.gamma") if gamma is not None else -torch.ones(channels, dtype=torch.float64)
        norm = _linear_mobileone(v, "norm")
        v.note(NOTE)
        return plus(maps.identity(), mixer if gamma is None else then(mixer, gamma),
                    *([then(norm, maps.scale(minus))] if norm is not None else []))

    def matches_module(self, module: nn.Module) -> bool:
        return (
            _is_timm_mobileone(getattr(module, "mixer", None))
            and _is_timm_mobileone(getattr(module, "norm", None))
            and hasattr(module, "layer_scale")
        )

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        # timm's RepMixer has an inference_mode flag (a later reparameterize() then returns early);
        # a look-alike without one gets none
        super().to_deploy_module(module, fused)
        if hasattr(module, "inference_mode"):
            module.inference_mode = True
        return module
