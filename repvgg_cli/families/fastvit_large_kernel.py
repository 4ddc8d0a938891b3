"""timm fastvit ``ReparamLargeKernelConv`` (the large-kernel conv of FastViT's patch embedding).

Follows Vasu et al., "FastViT: A Fast Hybrid Vision Transformer using Structural
Reparameterization" (ICCV 2023) as ported to timm, ``timm/models/fastvit.py``
(``ReparamLargeKernelConv``, itself after RepLKNet, Ding et al., CVPR 2022). Train form:
``large_conv`` (a timm ``ConvNormAct``: ``conv`` k×k without bias, ``bn``) plus an optional
``small_conv`` (same, a smaller kernel centred in the large one), same stride and groups, summed;
then ``se`` and ``act``, which are kept. There is no identity branch. Deploy form:
``reparam_conv`` (a Conv2d with bias, the large conv's geometry), as timm's ``reparameterize``
leaves it (``large_conv``/``small_conv`` deleted).

The module-tree helpers shared by the three fastvit families (``fastvit_repmixer``,
``fastvit_repcpe``) live here too.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedError
from ..fusion import Branches, ConvBranch, FusedConv
from .base import (
    Block,
    Family,
    FamilyOptions,
    KeyView,
    bn_from_keys,
    conv_branch_from_module,
    conv_from_fused,
    conv_weight,
    geometry_from_conv,
    is_batch_norm,
    join,
    source_dtype,
)

BRANCHES = ("large_conv", "small_conv")


# -- helpers shared by the fastvit families ---------------------------------------------------


def is_conv_norm(module: object) -> bool:
    """A timm ``ConvNormAct``-like pair: ``conv`` (Conv2d) then ``bn`` (a BatchNorm)."""
    return isinstance(getattr(module, "conv", None), nn.Conv2d) and is_batch_norm(getattr(module, "bn", None))


def is_passive(module: object) -> bool:
    """A module that does nothing in eval mode (absent, ``nn.Identity`` or dropout)."""
    return module is None or isinstance(module, (nn.Identity, nn.Dropout))


def linear_conv_norm_branch(pair: nn.Module, where: str) -> ConvBranch:
    """A timm ``ConvNormAct`` used with ``apply_act=False`` as a :class:`ConvBranch`.

    Raises:
        UnsupportedError: the pair applies an activation or anti-aliasing (not linear).
    """
    if not is_conv_norm(pair):
        raise UnsupportedError(f"{where} is a {type(pair).__name__}, not a conv + BatchNorm pair")
    bn = pair.bn
    for part in ("act", "drop"):
        if not is_passive(getattr(bn, part, None)):
            raise UnsupportedError(
                f"{where}.bn applies {type(getattr(bn, part)).__name__} after the BatchNorm; "
                "only a linear branch (apply_act=False) can be fused"
            )
    if not is_passive(getattr(pair, "aa", None)):
        raise UnsupportedError(f"{where} has an anti-aliasing layer; it cannot be fused")
    return conv_branch_from_module(pair.conv, bn, where)


def conv_norm_branch_from_keys(view: KeyView, local: str, eps: float) -> ConvBranch:
    """``<local>.conv.weight`` (no bias in timm, but one is read if present) and ``<local>.bn``."""
    weight = conv_weight(view, join(local, "conv", "weight"))
    bias = view.tensor(join(local, "conv", "bias"), required=False)
    return ConvBranch(weight=weight, bias=bias, bn=bn_from_keys(view, join(local, "bn"), eps))


def replace_with_reparam_conv(module: nn.Module, fused: FusedConv, like, delete: tuple[str, ...]) -> nn.Module:
    """Give ``module`` a fused ``reparam_conv`` and drop its train-form children, as timm does."""
    module.reparam_conv = conv_from_fused(fused, like=like)
    for child in delete:
        if hasattr(module, child):
            delattr(module, child)
    return module


# -- the family -------------------------------------------------------------------------------


class FastVitLargeKernel(Family):
    name = "fastvit_large_kernel"
    title = "timm fastvit ReparamLargeKernelConv"
    source = "Vasu et al., FastViT (ICCV 2023); timm timm/models/fastvit.py ReparamLargeKernelConv"
    anchor = "large_conv.conv.weight"
    deploy_anchor = "reparam_conv.weight"
    train_keys = "large_conv.{conv,bn}, [small_conv.{conv,bn}]"
    deploy_keys = "reparam_conv.{weight,bias}"
    after_sum = "se, then act - kept"

    def parse_keys(self, view: KeyView, options: FamilyOptions) -> Block | None:
        if not view.has_any("large_conv.bn"):
            return None  # a bare large_conv without its BN is not this block
        eps, eps_note = self.eps(options)
        convs = [conv_norm_branch_from_keys(view, "large_conv", eps)]
        if view.has_any("small_conv"):
            convs.append(conv_norm_branch_from_keys(view, "small_conv", eps))
        return self.finish_key_block(
            view,
            owned=view.owned_under(*BRANCHES),
            branches=Branches(convs=tuple(convs)),
            deploy_prefix=join(view.prefix, "reparam_conv"),
            eps_note=eps_note,
            dtype=source_dtype(convs[0].weight),
        )

    def matches_module(self, module: nn.Module) -> bool:
        return is_conv_norm(getattr(module, "large_conv", None))

    def parse_module(self, name: str, module: nn.Module, options: FamilyOptions) -> Block:
        where = name or "<root>"
        convs = [linear_conv_norm_branch(module.large_conv, f"{where}.large_conv")]
        small = getattr(module, "small_conv", None)
        if small is not None:
            convs.append(linear_conv_norm_branch(small, f"{where}.small_conv"))
        branches = Branches(convs=tuple(convs), **geometry_from_conv(module.large_conv.conv))
        return Block(
            name=name,
            family=self.name,
            branches=branches,
            source_keys=self.module_keys(name, module, *BRANCHES),
            deploy_prefix=join(name, "reparam_conv"),
            dtype=source_dtype(module.large_conv.conv.weight),
        )

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        return replace_with_reparam_conv(module, fused, module.large_conv.conv.weight, BRANCHES)
