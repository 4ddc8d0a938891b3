"""timm fastvit ``RepMixer`` (FastViT's re-parameterizable token mixer).

Follows Vasu et al., "FastViT: A Fast Hybrid Vision Transformer using Structural
Reparameterization" (ICCV 2023) as ported to timm, ``timm/models/fastvit.py`` (``RepMixer``).
Train form: ``x + layer_scale(mixer(x) - norm(x))`` where

- ``mixer`` is a depthwise timm ``MobileOneBlock`` without activation: ``conv_kxk.{i}`` (conv+bn),
  ``conv_scale`` (1×1 conv+bn) and ``identity`` (BN);
- ``norm`` is a ``MobileOneBlock`` with nothing but its ``identity`` BN;
- ``layer_scale`` is a ``LayerScale2d`` (``layer_scale.gamma``, shape ``(dim, 1, 1)``) or absent.

All of it is linear, so the whole mixer folds into one depthwise conv. In the neutral
description every mixer branch carries ``scale = gamma``, every norm branch ``scale = -gamma``,
the two identity BNs become 1×1 identity-kernel branches (so each keeps its own BN and scale)
and the plain ``x +`` is the identity branch. Deploy form: ``reparam_conv`` (depthwise, bias);
timm's ``reparameterize`` deletes ``mixer``, ``norm`` and ``layer_scale`` (the layer scale is
folded, not kept). Nothing sits after the sum.

The ``MobileOneBlock``s inside are part of this block: :attr:`encloses` keeps the MobileOne
family from claiming them a second time.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from ..errors import InputError, UnsupportedError
from ..fusion import BatchNorm, Branches, ConvBranch, FusedConv, IdentityBranch, identity_kernel
from .base import (
    Block,
    Family,
    FamilyOptions,
    KeyView,
    bn_from_keys,
    bn_from_module,
    geometry_from_conv,
    is_batch_norm,
    join,
    source_dtype,
)
from .fastvit_large_kernel import (
    conv_norm_branch_from_keys,
    is_passive,
    linear_conv_norm_branch,
    replace_with_reparam_conv,
)

PARTS = ("mixer", "norm", "layer_scale")
NOTE = (
    "mixer/norm identity BNs are fused as 1x1 identity-kernel branches; "
    "layer_scale is folded (+gamma for mixer, -gamma for norm)"
)


def _identity_as_conv(bn: BatchNorm, channels: int, per_group: int) -> ConvBranch:
    """``BN(x)`` written as a 1×1 conv with the (grouped) identity kernel followed by that BN."""
    return ConvBranch(weight=identity_kernel(channels, per_group, (1, 1)), bn=bn)


def _scaled(branches: list[ConvBranch], scale: Tensor) -> list[ConvBranch]:
    return [replace(b, scale=scale) for b in branches]


def _branch_scales(gamma: Tensor | None, channels: int, where: str) -> tuple[Tensor | None, Tensor]:
    """Per-channel factors of the mixer (``+gamma``) and norm (``-gamma``) branches."""
    if gamma is None:
        return None, -torch.ones(channels, dtype=torch.float64)
    if not gamma.is_floating_point() or gamma.numel() != channels:
        raise InputError(
            f"{where}: layer scale has shape {tuple(gamma.shape)} and dtype {gamma.dtype}; "
            f"{channels} floating-point values are expected"
        )
    flat = gamma.detach().reshape(-1)
    return flat, -flat


def _is_timm_mobileone(module: object) -> bool:
    """A train-form timm ``MobileOneBlock`` (the fused ``reparam_conv`` not built yet)."""
    return (
        isinstance(module, nn.Module)
        and all(hasattr(module, part) for part in ("conv_kxk", "conv_scale", "identity"))
        and getattr(module, "reparam_conv", None) is None
    )


class FastVitRepMixer(Family):
    name = "fastvit_repmixer"
    title = "timm fastvit RepMixer"
    source = "Vasu et al., FastViT (ICCV 2023); timm timm/models/fastvit.py RepMixer"
    anchor = "mixer.conv_kxk.0.conv.weight"
    deploy_anchor = "reparam_conv.weight"
    encloses = ("timm_mobileone",)
    train_keys = (
        "mixer.{conv_kxk.i.{conv,bn}, conv_scale.{conv,bn}, identity (BN)}, norm.identity (BN), "
        "[layer_scale.gamma]; x + gamma * (mixer - norm)"
    )
    deploy_keys = "reparam_conv.{weight,bias} (layer_scale folded and removed)"
    after_sum = "nothing"

    # -- key tree --------------------------------------------------------------------------

    def _mobileone_keys(self, view: KeyView, sub: str, eps: float, channels: int, per_group: int) -> list[ConvBranch]:
        convs: list[ConvBranch] = []
        index = 0
        while view.has(join(sub, "conv_kxk", str(index), "conv", "weight")):
            convs.append(conv_norm_branch_from_keys(view, join(sub, "conv_kxk", str(index)), eps))
            index += 1
        if view.has_any(join(sub, "conv_scale")):
            convs.append(conv_norm_branch_from_keys(view, join(sub, "conv_scale"), eps))
        if view.has_any(join(sub, "identity")):
            convs.append(_identity_as_conv(bn_from_keys(view, join(sub, "identity"), eps), channels, per_group))
        return convs

    def parse_keys(self, view: KeyView, options: FamilyOptions) -> Block | None:
        if not view.has_any("norm.identity"):
            return None  # a MobileOne block called `mixer` without RepMixer's norm: not this family
        eps, eps_note = self.eps(options)
        main = conv_norm_branch_from_keys(view, "mixer.conv_kxk.0", eps)
        channels, per_group = int(main.weight.shape[0]), int(main.weight.shape[1])
        where = f"block {view.prefix or '<root>'}"
        mixer_scale, norm_scale = _branch_scales(view.tensor("layer_scale.gamma", required=False), channels, where)
        mixer = self._mobileone_keys(view, "mixer", eps, channels, per_group)
        norm = self._mobileone_keys(view, "norm", eps, channels, per_group)
        convs = (mixer if mixer_scale is None else _scaled(mixer, mixer_scale)) + _scaled(norm, norm_scale)
        return self.finish_key_block(
            view,
            owned=view.owned_under(*PARTS),
            branches=Branches(convs=tuple(convs), identity=IdentityBranch()),
            deploy_prefix=join(view.prefix, "reparam_conv"),
            eps_note=eps_note,
            dtype=source_dtype(main.weight),
            notes=(NOTE,),
        )

    # -- module tree -----------------------------------------------------------------------

    def matches_module(self, module: nn.Module) -> bool:
        return (
            _is_timm_mobileone(getattr(module, "mixer", None))
            and _is_timm_mobileone(getattr(module, "norm", None))
            and hasattr(module, "layer_scale")
        )

    def _mobileone_module(self, block: nn.Module, where: str, channels: int, per_group: int) -> list[ConvBranch]:
        for part in ("se", "act"):
            if not is_passive(getattr(block, part, None)):
                raise UnsupportedError(
                    f"{where}.{part} is a {type(getattr(block, part)).__name__}; a RepMixer's MobileOne "
                    "blocks must be linear (no SE, use_act=False) to be folded"
                )
        convs = [
            linear_conv_norm_branch(pair, f"{where}.conv_kxk.{i}") for i, pair in enumerate(block.conv_kxk or ())
        ]
        if block.conv_scale is not None:
            convs.append(linear_conv_norm_branch(block.conv_scale, f"{where}.conv_scale"))
        if block.identity is not None:
            if not is_batch_norm(block.identity):
                raise UnsupportedError(f"{where}.identity is a {type(block.identity).__name__}, not a BatchNorm")
            convs.append(
                _identity_as_conv(bn_from_module(block.identity, f"{where}.identity"), channels, per_group)
            )
        return convs

    def parse_module(self, name: str, module: nn.Module, options: FamilyOptions) -> Block:
        where = name or "<root>"
        if not module.mixer.conv_kxk:
            raise UnsupportedError(f"{where}.mixer has no conv_kxk branch; timm's RepMixer always has one")
        main = module.mixer.conv_kxk[0].conv
        channels, per_group = int(main.out_channels), int(main.weight.shape[1])
        layer_scale = module.layer_scale
        if is_passive(layer_scale):
            gamma = None
        elif isinstance(getattr(layer_scale, "gamma", None), Tensor):
            gamma = layer_scale.gamma
        else:
            raise UnsupportedError(
                f"{where}.layer_scale is a {type(layer_scale).__name__}; a LayerScale2d (gamma) or nn.Identity is expected"
            )
        mixer_scale, norm_scale = _branch_scales(gamma, channels, f"block {where}")
        mixer = self._mobileone_module(module.mixer, f"{where}.mixer", channels, per_group)
        norm = self._mobileone_module(module.norm, f"{where}.norm", channels, per_group)
        convs = (mixer if mixer_scale is None else _scaled(mixer, mixer_scale)) + _scaled(norm, norm_scale)
        branches = Branches(convs=tuple(convs), identity=IdentityBranch(), **geometry_from_conv(main))
        return Block(
            name=name,
            family=self.name,
            branches=branches,
            source_keys=self.module_keys(name, module, *PARTS),
            deploy_prefix=join(name, "reparam_conv"),
            dtype=source_dtype(main.weight),
            notes=(NOTE,),
        )

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        replace_with_reparam_conv(module, fused, module.mixer.conv_kxk[0].conv.weight, PARTS)
        if hasattr(module, "inference_mode"):
            module.inference_mode = True  # a later timm reparameterize() then returns early
        return module
