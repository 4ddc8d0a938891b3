"""timm fastvit ``ReparamLargeKernelConv`` (the large-kernel conv of FastViT's patch embedding).

Follows Vasu et al., "FastViT: A Fast Hybrid Vision Transformer using Structural
Reparameterization" (ICCV 2023) as ported to timm, ``timm/models/fastvit.py``
(``ReparamLargeKernelConv``, itself after RepLKNet, Ding et al., CVPR 2022). Train form:
``large_conv`` (a timm ``ConvNormAct``: ``conv`` k×k without bias, ``bn``) plus an optional
``small_conv`` (same, a smaller kernel centred in the large one), same stride and groups, summed;
then ``se`` and ``act``, which are kept. There is no identity branch. Deploy form:
``reparam_conv`` (a Conv2d with bias, the large conv's geometry), as timm's ``reparameterize``
leaves it (``large_conv``/``small_conv`` deleted).

The linear ``ConvNormAct`` pair is shared with ``fastvit_repmixer``.
"""

from __future__ import annotations

from torch import nn

from ..algebra.maps import Map, plus
from ..errors import UnsupportedError
from .base import Family
from .keys import join
from .modules import is_batch_norm


def is_conv_bn(module: object) -> bool:
    """A timm ``ConvNormAct``-like pair: ``conv`` (Conv2d) then ``bn`` (a BatchNorm)."""
    return isinstance(getattr(module, "conv", None), nn.Conv2d) and is_batch_norm(getattr(module, "bn", None))


def is_passive(module: object) -> bool:
    """A module that does nothing in eval mode (absent, ``nn.Identity`` or dropout)."""
    return module is None or isinstance(module, (nn.Identity, nn.Dropout))


def linear_conv_norm(v, local: str) -> Map:
    """A timm ``ConvNormAct`` used with ``apply_act=False``: ``<local>.conv`` then ``<local>.bn``
    (a BatchNorm). A live pair that applies an activation or anti-aliasing is refused."""
    if v.tree == "module":
        pair, where = v.get(local), v._label(local)
        if not is_conv_bn(pair):
            raise UnsupportedError(f"{where} is a {type(pair).__name__}, not a conv + BatchNorm pair")
        for part in ("act", "drop"):
            if not is_passive(getattr(pair.bn, part, None)):
                raise UnsupportedError(
                    f"{where}.bn applies {type(getattr(pair.bn, part)).__name__} after the BatchNorm; "
                    "only a linear branch (apply_act=False) can be fused"
                )
        if not is_passive(getattr(pair, "aa", None)):
            raise UnsupportedError(f"{where} has an anti-aliasing layer; it cannot be fused")
    return v.conv_bn(join(local, "conv"), join(local, "bn"))


class FastVitLargeKernel(Family):
    name = "fastvit_large_kernel"
    title = "timm fastvit ReparamLargeKernelConv"
    source = "Vasu et al., FastViT (ICCV 2023); timm timm/models/fastvit.py ReparamLargeKernelConv"
    anchor = "large_conv.conv.weight"
    deploy_anchor = "reparam_conv.weight"
    parts = ("large_conv", "small_conv")
    deploy = "reparam_conv"
    train_keys = "large_conv.{conv,bn}, [small_conv.{conv,bn}]"
    deploy_keys = "reparam_conv.{weight,bias}"
    after_sum = "se, then act - kept"

    def expression(self, v) -> Map | None:
        if not v.has_any("large_conv.bn"):
            return None  # a bare large_conv without its BN is not this block
        large = linear_conv_norm(v, "large_conv")
        return plus(large, linear_conv_norm(v, "small_conv")) if v.has_any("small_conv") else large

    def matches_module(self, module: nn.Module) -> bool:
        return is_conv_bn(getattr(module, "large_conv", None))
