"""apple ml-fastvit's ``RepMixer`` and ``RepCPE``, in apple's own names.

Follows apple/ml-fastvit ``models/fastvit.py`` (Vasu et al., "FastViT: A Fast Hybrid Vision
Transformer using Structural Reparameterization", ICCV 2023). timm's port names the same blocks
differently (``fastvit_repmixer``, ``fastvit_repcpe``). The other re-parameterizable blocks of
apple's FastViT have families of their own: ``MobileOneBlock`` (stem, ``PatchEmbed.proj.1``,
``conv_exp``) is ``apple_mobileone``; ``PatchEmbed.proj.0``, a ``ReparamLargeKernelConv`` with
RepLKNet's layout, is ``replknet``.

``RepMixer`` (``network.i.j.token_mixer``): ``x + layer_scale * (mixer(x) - norm(x))``, where
``mixer`` is a depthwise k×k MobileOneBlock without activation (``rbr_skip`` BN, ``rbr_scale``
1×1, ``rbr_conv`` k×k), ``norm`` one with its ``rbr_skip`` BN alone, and ``layer_scale`` a
Parameter of shape (dim, 1, 1) on the RepMixer itself (absent without layer scale: then
``x + mixer(x) - norm(x)``). Deploy form, as ``reparameterize`` leaves it: ``reparam_conv``
(depthwise k×k, padding k//2, bias); ``mixer``, ``norm`` and ``layer_scale`` deleted. The
MobileOne blocks inside are part of this block (:attr:`encloses`): they are not fused on their
own (their deploy names would be ``token_mixer.mixer.reparam_conv``, which apple's deploy model
does not have). ``RepMixerBlock.layer_scale`` (on the ConvFFN branch, one level up) is not this
block's and stays.

``RepCPE`` (``network.i`` before an attention stage): ``pe(x) + x`` with ``pe`` a depthwise
Conv2d with bias, padding k//2. Deploy: ``reparam_conv``; ``pe`` deleted. A lone depthwise conv
called ``pe`` says little in a state dict, so this family is on only inside apple's FastViT
(:mod:`.architectures`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..algebra import maps
from ..algebra.maps import Map, plus, then
from ..errors import UnsupportedError
from .apple_mobileone import AppleMobileOneBlock
from .base import Family
from .keys import join
from .replknet import conv_bn_pair
from .timm_mobileone import numbered

_MOBILEONE = AppleMobileOneBlock()


def _linear_mobileone(v, sub: str) -> Map:
    """An apple MobileOneBlock used without activation and SE: ``rbr_skip(x) + rbr_scale(x) +
    sum(rbr_conv[i](x))``."""
    if v.tree == "module":
        block = v.get(sub)
        for part in ("se", "activation"):
            child = getattr(block, part, None)
            if child is not None and not isinstance(child, nn.Identity):
                raise UnsupportedError(f"{v.where}: {sub}.{part} is a {type(child).__name__}; a RepMixer's "
                                       "MobileOne blocks must be linear (no SE, use_act=False) to be folded")
    terms = [conv_bn_pair(v, local) for local in numbered(v, join(sub, "rbr_conv"))]
    if v.has_any(join(sub, "rbr_scale")):
        terms.append(conv_bn_pair(v, join(sub, "rbr_scale")))
    identity = v.identity_bn(join(sub, "rbr_skip"))
    if identity is not None:
        terms.append(identity)
    if not terms:
        raise UnsupportedError(f"{v.where}: {sub} has no branch at all")
    return plus(*terms)


class AppleRepMixer(Family):
    name = "apple_repmixer"
    title = "apple ml-fastvit RepMixer"
    source = "apple/ml-fastvit models/fastvit.py RepMixer (FastViT, ICCV 2023)"
    anchor = "mixer.rbr_conv.0.conv.weight"
    deploy_anchor = "reparam_conv.weight"
    parts = ("mixer", "norm", "layer_scale")
    deploy = "reparam_conv"
    deploy_flags = {"inference_mode": True}  # so that a later reparameterize() returns early
    encloses = ("apple_mobileone",)
    train_keys = ("mixer.{rbr_conv.i.{conv,bn}, rbr_scale.{conv,bn}, rbr_skip}, norm.rbr_skip, [layer_scale]; "
                  "x + layer_scale * (mixer - norm)")
    deploy_keys = "reparam_conv.{weight,bias} (layer_scale folded and removed)"
    after_sum = "nothing"

    def expression(self, v) -> Map | None:
        if not v.has_any("norm.rbr_skip"):
            return None  # a MobileOne block called `mixer` without RepMixer's norm: apple_mobileone's
        mixer = _linear_mobileone(v, "mixer")
        channels = mixer.out_channels
        minus = maps.scale(-torch.ones(channels, dtype=torch.float64))
        difference = plus(mixer, then(_linear_mobileone(v, "norm"), minus))
        layer_scale = v.scale("layer_scale", channels, required=False)
        if layer_scale is not None:
            difference = then(difference, layer_scale)
        return plus(maps.identity(channels), difference)

    def matches_module(self, module: nn.Module) -> bool:
        return (getattr(module, "reparam_conv", None) is None
                and all(isinstance(getattr(module, part, None), nn.Module) and _MOBILEONE.matches_module(getattr(module, part))
                        for part in ("mixer", "norm")))


class AppleRepCPE(Family):
    name = "apple_repcpe"
    title = "apple ml-fastvit RepCPE"
    source = "apple/ml-fastvit models/fastvit.py RepCPE (FastViT, ICCV 2023; CPE after Chu et al., ICLR 2023)"
    anchor = "pe.weight"
    deploy_anchor = "reparam_conv.weight"
    parts = ("pe",)
    deploy = "reparam_conv"
    only_in = ("apple_fastvit",)
    train_keys = "pe.{weight,bias} (depthwise conv) + identity"
    deploy_keys = "reparam_conv.{weight,bias}"
    after_sum = "nothing"

    def expression(self, v) -> Map | None:
        if v.tree == "key":
            own = {v.key("pe.weight"), v.key("pe.bias")}
            if not v.has("pe.bias") or v.owned_under("") - own:
                return None  # apple's RepCPE holds its conv and nothing else
            weight = v.tensor("pe.weight")
            if weight.dim() != 4 or int(weight.shape[1]) != 1:
                return None  # not depthwise: not a RepCPE
        return plus(v.conv("pe"), maps.identity())

    def matches_module(self, module: nn.Module) -> bool:
        pe = getattr(module, "pe", None)
        return (isinstance(pe, nn.Conv2d) and pe.bias is not None and getattr(module, "reparam_conv", None) is None
                and set(dict(module.named_children())) == {"pe"}
                and all(hasattr(module, a) for a in ("spatial_shape", "embed_dim")))
