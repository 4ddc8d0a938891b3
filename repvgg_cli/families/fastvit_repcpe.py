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

from torch import nn

from ..errors import UnsupportedError
from ..fusion import Branches, ConvBranch, FusedConv, IdentityBranch
from .base import (
    Block,
    Family,
    FamilyOptions,
    KeyView,
    conv_branch_from_module,
    conv_weight,
    geometry_from_conv,
    join,
    source_dtype,
)
from .fastvit_large_kernel import replace_with_reparam_conv

OWN_KEYS = ("pos_enc.weight", "pos_enc.bias")


class FastVitRepCPE(Family):
    name = "fastvit_repcpe"
    title = "timm fastvit RepConditionalPosEnc"
    source = "Vasu et al., FastViT (ICCV 2023); timm timm/models/fastvit.py RepConditionalPosEnc"
    anchor = "pos_enc.weight"
    deploy_anchor = "reparam_conv.weight"
    train_keys = "pos_enc.{weight,bias} (depthwise conv) + identity"
    deploy_keys = "reparam_conv.{weight,bias}"
    after_sum = "nothing"

    def parse_keys(self, view: KeyView, options: FamilyOptions) -> Block | None:
        # timm's RepCPE holds nothing but its conv; a `pos_enc` with company is someone else's.
        if not view.has("pos_enc.bias") or view.owned_under("") - {view.key(k) for k in OWN_KEYS}:
            return None
        weight = conv_weight(view, "pos_enc.weight")
        if int(weight.shape[1]) != 1:
            return None  # not depthwise: not a RepCPE
        bias = view.tensor("pos_enc.bias")
        kh = int(weight.shape[2])
        branches = Branches(
            convs=(ConvBranch(weight=weight, bias=bias),),
            identity=IdentityBranch(),
            groups=int(weight.shape[0]),
            padding=(kh // 2, kh // 2),  # timm pads both dimensions by spatial_shape[0] // 2
        )
        return self.finish_key_block(
            view,
            owned=view.owned_under("pos_enc"),
            branches=branches,
            deploy_prefix=join(view.prefix, "reparam_conv"),
            eps_note="no BatchNorm",
            dtype=source_dtype(weight),
        )

    def matches_module(self, module: nn.Module) -> bool:
        return (
            isinstance(getattr(module, "pos_enc", None), nn.Conv2d)
            and hasattr(module, "reparam_conv")
            and module.reparam_conv is None
        )

    def parse_module(self, name: str, module: nn.Module, options: FamilyOptions) -> Block:
        where = name or "<root>"
        conv = module.pos_enc
        if conv.bias is None:
            raise UnsupportedError(f"{where}.pos_enc has no bias; timm's RepConditionalPosEnc has one")
        branch = conv_branch_from_module(conv, None, f"{where}.pos_enc")
        branches = Branches(convs=(branch,), identity=IdentityBranch(), **geometry_from_conv(conv))
        return Block(
            name=name,
            family=self.name,
            branches=branches,
            source_keys=self.module_keys(name, module, "pos_enc"),
            deploy_prefix=join(name, "reparam_conv"),
            dtype=source_dtype(conv.weight),
            eps_note="no BatchNorm",
        )

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        return replace_with_reparam_conv(module, fused, module.pos_enc.weight, ("pos_enc",))
