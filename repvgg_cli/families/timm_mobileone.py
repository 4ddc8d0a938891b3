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
from typing import ClassVar

import torch
from torch import nn

from ..errors import UnsupportedError
from ..fusion import Branches, ConvBranch, FusedConv
from .base import (
    Block,
    Family,
    FamilyOptions,
    KeyView,
    conv_from_fused,
    geometry_from_conv,
    identity_from_module,
    join,
    source_dtype,
)
from .timm_repvgg import (
    conv_norm_branch_from_keys,
    conv_norm_branch_from_module,
    delete_attributes,
    first_tensor,
    has_no_deploy_conv,
    identity_from_keys,
    is_conv_norm,
)

BRANCHES = ("conv_kxk", "conv_scale", "identity")
DEPLOY_DELETES = ("conv_kxk", "conv_scale", "identity", "drop_path")


def numbered_branches(view: KeyView, local: str) -> list[str]:
    """The ``<local>.<i>`` sub-prefixes of a ModuleList of conv+norm pairs, 0, 1, … in order."""
    pattern = re.compile(re.escape(view.key(local) + ".") + r"(\d+)\.conv\.weight$")
    indices = sorted(int(m.group(1)) for k in view.owned_under(local) if (m := pattern.match(k)))
    return [join(local, str(i)) for i in indices]


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _zero_kernel_branch(
    channels: int, groups: int, kernel: tuple[int, int], dilation: tuple[int, int], like: torch.Tensor
) -> ConvBranch:
    """A zero k×k branch: gives an identity-only block the k×k deploy kernel its project builds."""
    weight = torch.zeros(channels, channels // groups, *kernel, dtype=like.dtype)
    return ConvBranch(weight=weight, dilation=dilation)


def deploy_template(module: nn.Module, conv_list: str, scale: str, skip: str) -> torch.Tensor:
    """The tensor whose dtype and device the fused conv takes: the first branch's weight."""
    for branch in [*(getattr(module, conv_list) or ()), getattr(module, scale)]:
        if branch is not None:
            return branch.conv.weight
    skip_bn = getattr(module, skip)
    return first_tensor(getattr(skip_bn, "weight", None), getattr(skip_bn, "running_mean", None))


def mobileone_branches(
    module: nn.Module,
    where: str,
    conv_list: str,
    scale: str,
    skip: str,
    in_channels_attribute: str,
) -> tuple[Branches, tuple[str, ...]]:
    """The neutral description of a live MobileOne block (timm or apple naming).

    Args:
        module: the block.
        where: its name, for messages.
        conv_list, scale, skip: the names of its k×k ModuleList, 1×1 scale branch and skip BN.
        in_channels_attribute: the block attribute holding the input channels (identity-only blocks).
    Returns:
        ``(branches, notes)``: the branches and what the report should say about them.
    """
    convs: list[ConvBranch] = []
    main_convs: list[nn.Conv2d] = []
    for index, branch in enumerate(getattr(module, conv_list) or ()):
        convs.append(conv_norm_branch_from_module(branch, f"{where}.{conv_list}.{index}"))
        main_convs.append(branch.conv)
    scale_module = getattr(module, scale)
    if scale_module is not None:
        convs.append(conv_norm_branch_from_module(scale_module, f"{where}.{scale}"))
        main_convs.append(scale_module.conv)
    identity = identity_from_module(getattr(module, skip), f"{where}.{skip}")
    notes: tuple[str, ...] = ()
    if main_convs:
        geometry = geometry_from_conv(main_convs[0])
    else:
        missing = [a for a in ("kernel_size", "groups", in_channels_attribute) if not hasattr(module, a)]
        if missing:
            raise UnsupportedError(
                f"{where} has only its {skip} branch and no {', '.join(missing)} attribute to size the deploy conv"
            )
        kernel = _pair(module.kernel_size)
        dilation = _pair(getattr(module, "dilation", 1))
        in_channels = int(getattr(module, in_channels_attribute))
        groups = int(module.groups)
        centre = (dilation[0] * (kernel[0] // 2), dilation[1] * (kernel[1] // 2))
        geometry = {
            "groups": groups,
            "stride": _pair(getattr(module, "stride", 1)),
            "dilation": dilation,
            "padding": _pair(getattr(module, "padding", centre)),
            "in_channels": in_channels,
        }
        template = deploy_template(module, conv_list, scale, skip)
        convs.append(_zero_kernel_branch(in_channels, groups, kernel, dilation, template))
        notes = (f"identity-only block: written as a {kernel[0]}x{kernel[1]} kernel, as its project does",)
    return Branches(convs=tuple(convs), identity=identity, **geometry), notes


class TimmMobileOneBlock(Family):
    name = "timm_mobileone"
    title = "timm MobileOneBlock (byobnet, fastvit)"
    source = (
        "huggingface/pytorch-image-models timm/models/byobnet.py and timm/models/fastvit.py "
        "MobileOneBlock (after MobileOne, CVPR 2023)"
    )
    anchor = "conv_kxk.0.conv.weight"
    deploy_anchor = "reparam_conv.weight"
    train_keys = "conv_kxk.{i}.{conv,bn}, [conv_scale.{conv,bn}], [identity (BN)]"
    deploy_keys = "reparam_conv.{weight,bias}"
    after_sum = "SE (attn in byobnet, se in fastvit), then act - kept"

    branch_names: ClassVar[tuple[str, str, str]] = BRANCHES
    """(k×k conv list, 1×1 scale branch, identity BN): the names differ between projects."""
    deploy_deletes: ClassVar[tuple[str, ...]] = DEPLOY_DELETES
    in_channels_attribute: ClassVar[str] = "in_chs"

    def parse_keys(self, view: KeyView, options: FamilyOptions) -> Block | None:
        conv_list, scale, skip = self.branch_names
        eps, eps_note = self.eps(options)
        convs = [conv_norm_branch_from_keys(view, local, eps) for local in numbered_branches(view, conv_list)]
        if view.has_any(scale):
            convs.append(conv_norm_branch_from_keys(view, scale, eps))
        return self.finish_key_block(
            view,
            owned=view.owned_under(*self.branch_names),
            branches=Branches(convs=tuple(convs), identity=identity_from_keys(view, skip, eps)),
            deploy_prefix=join(view.prefix, "reparam_conv"),
            eps_note=eps_note,
            dtype=source_dtype(convs[0].weight),
        )

    def is_train_form(self, module: nn.Module) -> bool:
        return has_no_deploy_conv(module)

    def matches_module(self, module: nn.Module) -> bool:
        if not self.is_train_form(module) or not all(hasattr(module, b) for b in self.branch_names):
            return False
        conv_list, scale, skip = (getattr(module, b) for b in self.branch_names)
        if conv_list is not None and not (
            isinstance(conv_list, nn.ModuleList) and all(is_conv_norm(m) for m in conv_list)
        ):
            return False
        if scale is not None and not is_conv_norm(scale):
            return False
        return bool(conv_list) or scale is not None or skip is not None

    def parse_module(self, name: str, module: nn.Module, options: FamilyOptions) -> Block:
        branches, notes = mobileone_branches(
            module, name or "<root>", *self.branch_names, in_channels_attribute=self.in_channels_attribute
        )
        return Block(
            name=name,
            family=self.name,
            branches=branches,
            source_keys=self.module_keys(name, module, *self.branch_names),
            deploy_prefix=join(name, "reparam_conv"),
            dtype=source_dtype(deploy_template(module, *self.branch_names)),
            notes=notes,
        )

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        module.reparam_conv = conv_from_fused(fused, like=deploy_template(module, *self.branch_names))
        delete_attributes(module, self.deploy_deletes)
        if hasattr(module, "inference_mode"):
            module.inference_mode = True
        return module
