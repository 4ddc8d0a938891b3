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

from .timm_mobileone import TimmMobileOneBlock


class AppleMobileOneBlock(TimmMobileOneBlock):
    """timm's MobileOne family under Apple's names (the fusion and the deploy form are the same)."""

    name = "apple_mobileone"
    title = "apple ml-mobileone MobileOneBlock"
    source = "apple/ml-mobileone mobileone.py, apple/ml-fastvit models/modules/mobileone.py (MobileOne, CVPR 2023)"
    anchor = "rbr_conv.0.conv.weight"
    deploy_anchor = "reparam_conv.weight"
    branches = ("rbr_conv", "rbr_scale", "rbr_skip")
    parts = ("rbr_conv", "rbr_scale", "rbr_skip", "id_tensor")
    train_keys = "rbr_conv.{i}.{conv,bn}, [rbr_scale.{conv,bn}], [rbr_skip (BN)]"
    deploy_keys = "reparam_conv.{weight,bias}"
    after_sum = "se, then activation (ReLU) - kept"
    in_channels_attribute = "in_channels"

    def is_train_form(self, module: nn.Module) -> bool:
        return not getattr(module, "inference_mode", False) and getattr(module, "reparam_conv", None) is None
