"""Apple's MobileOneBlock (apple/ml-mobileone ``mobileone.py``; ml-fastvit ``models/modules/mobileone.py``).

Follows Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone" (CVPR 2023) as
published in apple/ml-mobileone. Train form: ``rbr_conv`` (a ModuleList of ``Sequential(conv,
bn)`` k×k branches; ml-fastvit: None without conv branches), ``rbr_scale`` (a 1×1
``Sequential(conv, bn)``, None for k = 1) and ``rbr_skip`` (a BN, only when in == out and stride
1, else None). Forward: ``rbr_skip(x) + rbr_scale(x) + sum(rbr_conv[i](x))``, then ``se`` (an
``SEBlock`` with ``reduce``/``expand`` convs, or Identity) and ``activation`` (ReLU; ml-fastvit:
GELU or Identity).

Deploy form, as ``MobileOneBlock.reparameterize()`` leaves it: ``reparam_conv`` (a Conv2d with
bias) set, ``rbr_conv``, ``rbr_scale`` and ``rbr_skip`` deleted, ``inference_mode = True`` (the
flag the forward tests); ``se`` and ``activation`` kept. Deploy keys: ``reparam_conv.{weight,bias}``.
Not to be confused with the official RepVGG block (``rbr_dense``/``rbr_1x1``/``rbr_identity`` ->
``rbr_reparam``).
"""

from __future__ import annotations

from torch import nn

from ..fusion import Branches, FusedConv
from .base import (
    Block,
    Family,
    FamilyOptions,
    KeyView,
    conv_from_fused,
    join,
    source_dtype,
)
from .timm_mobileone import deploy_template, mobileone_branches, numbered_branches
from .timm_repvgg import (
    conv_norm_branch_from_keys,
    delete_attributes,
    identity_from_keys,
    is_conv_norm,
)

BRANCHES = ("rbr_conv", "rbr_scale", "rbr_skip")


class AppleMobileOneBlock(Family):
    name = "apple_mobileone"
    title = "apple ml-mobileone MobileOneBlock"
    source = "apple/ml-mobileone mobileone.py, apple/ml-fastvit models/modules/mobileone.py (MobileOne, CVPR 2023)"
    anchor = "rbr_conv.0.conv.weight"
    deploy_anchor = "reparam_conv.weight"
    train_keys = "rbr_conv.{i}.{conv,bn}, [rbr_scale.{conv,bn}], [rbr_skip (BN)]"
    deploy_keys = "reparam_conv.{weight,bias}"
    after_sum = "se, then activation (ReLU) - kept"

    def parse_keys(self, view: KeyView, options: FamilyOptions) -> Block | None:
        eps, eps_note = self.eps(options)
        convs = [conv_norm_branch_from_keys(view, local, eps) for local in numbered_branches(view, "rbr_conv")]
        if view.has_any("rbr_scale"):
            convs.append(conv_norm_branch_from_keys(view, "rbr_scale", eps))
        return self.finish_key_block(
            view,
            owned=view.owned_under(*BRANCHES),
            branches=Branches(convs=tuple(convs), identity=identity_from_keys(view, "rbr_skip", eps)),
            deploy_prefix=join(view.prefix, "reparam_conv"),
            eps_note=eps_note,
            dtype=source_dtype(convs[0].weight),
        )

    def matches_module(self, module: nn.Module) -> bool:
        if getattr(module, "inference_mode", False) or getattr(module, "reparam_conv", None) is not None:
            return False
        if not all(hasattr(module, b) for b in BRANCHES):
            return False
        convs, scale = module.rbr_conv, module.rbr_scale
        if convs is not None and not (isinstance(convs, nn.ModuleList) and all(is_conv_norm(m) for m in convs)):
            return False
        if scale is not None and not is_conv_norm(scale):
            return False
        return bool(convs) or scale is not None or module.rbr_skip is not None

    def parse_module(self, name: str, module: nn.Module, options: FamilyOptions) -> Block:
        branches, notes = mobileone_branches(module, name or "<root>", *BRANCHES, in_channels_attribute="in_channels")
        return Block(
            name=name,
            family=self.name,
            branches=branches,
            source_keys=self.module_keys(name, module, *BRANCHES),
            deploy_prefix=join(name, "reparam_conv"),
            dtype=source_dtype(deploy_template(module, *BRANCHES)),
            notes=notes,
        )

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        module.reparam_conv = conv_from_fused(fused, like=deploy_template(module, *BRANCHES))
        delete_attributes(module, BRANCHES)
        module.inference_mode = True
        return module
