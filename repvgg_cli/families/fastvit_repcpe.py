"""timm fastvit ``RepConditionalPosEnc`` (RepCPE, FastViT's conditional positional encoding).

Follows Vasu et al., "FastViT: A Fast Hybrid Vision Transformer using Structural
Reparameterization" (ICCV 2023) as ported to timm, ``timm/models/fastvit.py``
(``RepConditionalPosEnc``; the encoding itself is Chu et al., "Conditional Positional Encodings
for Vision Transformers", ICLR 2023). Train form: ``pos_enc(x) + x`` where ``pos_enc`` is a
depthwise (``groups = dim``) k×k Conv2d *with* bias, stride 1, padding ``k // 2``; no BN.
Deploy form: ``reparam_conv`` (depthwise, bias), as timm's ``reparameterize`` leaves it
(``pos_enc`` deleted). Nothing sits after the sum.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from ..algebra import maps
from ..algebra.maps import Map, plus
from ..errors import UnsupportedError
from .base import Block, Family, FamilyOptions

NO_BN = "no BatchNorm"


class FastVitRepCPE(Family):
    name = "fastvit_repcpe"
    title = "timm fastvit RepConditionalPosEnc"
    source = "Vasu et al., FastViT (ICCV 2023); timm timm/models/fastvit.py RepConditionalPosEnc"
    anchor = "pos_enc.weight"
    deploy_anchor = "reparam_conv.weight"
    parts = ("pos_enc",)
    deploy = "reparam_conv"
    train_keys = "pos_enc.{weight,bias} (depthwise conv) + identity"
    deploy_keys = "reparam_conv.{weight,bias}"
    after_sum = "nothing"

    def expression(self, v) -> Map | None:
        if v.tree == "module":
            if v.get("pos_enc").bias is None:
                raise UnsupportedError(f"{v.where}.pos_enc has no bias; timm's RepConditionalPosEnc has one")
            return plus(v.conv("pos_enc"), maps.identity())
        # timm's RepCPE holds nothing but its conv; a `pos_enc` with company is someone else's.
        if not v.has("pos_enc.bias") or v.owned_under("") - {v.key("pos_enc.weight"), v.key("pos_enc.bias")}:
            return None
        weight = v.tensor("pos_enc.weight")
        if weight.dim() == 4 and int(weight.shape[1]) != 1:
            return None  # not depthwise: not a RepCPE
        v.eps_note = NO_BN
        conv, kh = v.conv("pos_enc"), int(weight.shape[2])
        # a state dict does not say: depthwise, and timm pads both dimensions by spatial_shape[0] // 2
        return plus(replace(conv, groups=int(weight.shape[0]), padding=(kh // 2, kh // 2)), maps.identity())

    def matches_module(self, module: nn.Module) -> bool:
        return (
            isinstance(getattr(module, "pos_enc", None), nn.Conv2d)
            and hasattr(module, "reparam_conv")
            and module.reparam_conv is None
        )

    def parse_module(self, name: str, module: nn.Module, options: FamilyOptions) -> Block:
        # the report says the block has no BN to take an eps from (the generic one says "module")
        return replace(super().parse_module(name, module, options), eps_note=NO_BN)
