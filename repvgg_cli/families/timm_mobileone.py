"""timm's MobileOneBlock, both versions: byobnet (``mobileone_s*``) and fastvit (``fastvit_*``).

Follows huggingface/pytorch-image-models ``timm/models/byobnet.py`` and ``timm/models/fastvit.py``,
class ``MobileOneBlock`` (after Vasu et al., "MobileOne: An Improved One millisecond Mobile
Backbone", CVPR 2023). Train form: ``conv_kxk`` (a ModuleList of ``ConvNormAct``, ``conv`` then
``bn``; fastvit: None when it has no conv branch), ``conv_scale`` (a 1×1 ``ConvNormAct``, None for
k = 1 or without a scale branch) and ``identity`` (a BN, only when in == out and stride 1),
summed (byobnet: ``drop_path``, a no-op in eval, on the conv sum before the identity is added),
then the SE (byobnet: ``attn``, fastvit: ``se``) and ``act``. Depthwise (group_size=1) and
pointwise (k = 1) blocks are the same class.

Deploy form, as timm's ``MobileOneBlock.reparameterize()`` leaves it: ``reparam_conv`` (a Conv2d
with bias) set; ``conv_kxk``, ``conv_scale``, ``identity`` (byobnet also ``drop_path``) deleted;
fastvit's ``inference_mode`` set to True; the SE and ``act`` kept. Deploy keys:
``reparam_conv.{weight,bias}``.

A fastvit block with neither conv nor scale branch (``RepMixer.norm``: the identity BN alone) is
fused into a k×k kernel like timm does; in a state dict such a block is not claimed (its only
keys, ``identity.*``, say nothing about the block), and inside a RepMixer the ``fastvit_repmixer``
family fuses the whole mixer.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import ClassVar

import torch
from torch import nn

from ..algebra import maps
from ..algebra.maps import Map, plus
from ..errors import UnsupportedError
from ..fusion.values import FusedConv
from .base import Family
from .keys import join
from .modules import conv_from_fused
from .timm_repvgg import conv_norm, has_no_deploy_conv, is_conv_norm


def numbered(v, local: str) -> list[str]:
    """The ``<local>.<i>`` of a ModuleList of conv+norm pairs, in index order (0, 1, …, 10)."""
    if v.tree == "module":
        return [join(local, str(i)) for i in range(len(v.get(local) or ()))]
    pattern = re.compile(re.escape(v.key(local) + ".") + r"(\d+)\.conv\.weight$")
    matches = (pattern.match(k) for k in v.owned_under(local))
    return [join(local, str(i)) for i in sorted(int(m.group(1)) for m in matches if m)]


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


class TimmMobileOneBlock(Family):
    name = "timm_mobileone"
    title = "timm MobileOneBlock (byobnet, fastvit)"
    source = (
        "huggingface/pytorch-image-models timm/models/byobnet.py and timm/models/fastvit.py "
        "MobileOneBlock (after MobileOne, CVPR 2023)"
    )
    anchor = "conv_kxk.0.conv.weight"
    deploy_anchor = "reparam_conv.weight"
    branches: ClassVar[tuple[str, str, str]] = ("conv_kxk", "conv_scale", "identity")
    """(k×k conv list, 1×1 scale branch, identity BN): the names differ between projects."""
    parts = ("conv_kxk", "conv_scale", "identity", "drop_path", "id_tensor")
    deploy = "reparam_conv"
    train_keys = "conv_kxk.{i}.{conv,bn}, [conv_scale.{conv,bn}], [identity (BN)]"
    deploy_keys = "reparam_conv.{weight,bias}"
    after_sum = "SE (attn in byobnet, se in fastvit), then act - kept"
    in_channels_attribute: ClassVar[str] = "in_chs"

    def expression(self, v) -> Map | None:
        conv_list, scale, skip = self.branches
        terms = [conv_norm(v, local) for local in numbered(v, conv_list)]
        if v.has_any(scale):
            terms.append(conv_norm(v, scale))
        identity = v.identity_bn(skip)
        if not terms:  # module tree only: the key tree anchors on conv_kxk.0
            terms.append(self._zero_kernel(v, skip))
        return plus(*terms, *([identity] if identity is not None else []))

    def _zero_kernel(self, v, skip: str) -> Map:
        """A zero k×k conv sized from the block's attributes: an identity-only block is written as
        the k×k kernel its project builds."""
        block = v.module
        missing = [a for a in ("kernel_size", "groups", self.in_channels_attribute) if not hasattr(block, a)]
        if missing:
            raise UnsupportedError(
                f"{v.where} has only its {skip} branch and no {', '.join(missing)} attribute to size the deploy conv"
            )
        kernel, dilation = _pair(block.kernel_size), _pair(getattr(block, "dilation", 1))
        channels, groups = int(getattr(block, self.in_channels_attribute)), int(block.groups)
        centre = (dilation[0] * (kernel[0] // 2), dilation[1] * (kernel[1] // 2))
        v.dtype = _template(block, self.branches).dtype
        v.note(f"identity-only block: written as a {kernel[0]}x{kernel[1]} kernel, as its project does")
        zero = maps.conv(torch.zeros(channels, channels // groups, *kernel, dtype=v.dtype), dilation=dilation,
                            stride=_pair(getattr(block, "stride", 1)), groups=groups, in_channels=channels)
        return replace(zero, padding=_pair(getattr(block, "padding", centre)))  # the zero kernel itself is centred

    def is_train_form(self, module: nn.Module) -> bool:
        return has_no_deploy_conv(module)

    def matches_module(self, module: nn.Module) -> bool:
        if not self.is_train_form(module) or not all(hasattr(module, b) for b in self.branches):
            return False
        conv_list, scale, skip = (getattr(module, b) for b in self.branches)
        if conv_list is not None and not (
            isinstance(conv_list, nn.ModuleList) and all(is_conv_norm(m) for m in conv_list)
        ):
            return False
        if scale is not None and not is_conv_norm(scale):
            return False
        return bool(conv_list) or scale is not None or skip is not None

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        # Not the generic switch: the fused conv takes the first branch's dtype (an identity-only
        # block has no conv, and its BN may have no parameter), and only the blocks that have an
        # inference_mode flag (fastvit's, apple's) get it set: byobnet's has none and gets none.
        module.reparam_conv = conv_from_fused(fused, like=_template(module, self.branches))
        for part in self.parts:
            if hasattr(module, part):
                delattr(module, part)
        if hasattr(module, "inference_mode"):
            module.inference_mode = True
        return module


def _template(module: nn.Module, branches: tuple[str, str, str]) -> torch.Tensor:
    """The tensor whose dtype and device the fused conv takes: the first branch's weight, else the
    identity BN's weight or running mean."""
    conv_list, scale, skip = (getattr(module, b, None) for b in branches)
    for branch in [*(conv_list or ()), scale]:
        if branch is not None:
            return branch.conv.weight
    for tensor in (getattr(skip, "weight", None), getattr(skip, "running_mean", None)):
        if isinstance(tensor, torch.Tensor):
            return tensor
    raise UnsupportedError("a block without any tensor")
