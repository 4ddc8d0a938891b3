"""timm's RepGhostNet and GhostNetV3 re-parameterizable modules.

``timm_repghost`` follows huggingface/pytorch-image-models ``timm/models/repghost.py``,
``RepGhostModule`` (Chen et al., "RepGhost: A Hardware-Efficient Ghost Module via
Re-parameterization", 2022). Forward: ``x1 = primary_conv(x)`` (conv, BN, ReLU: kept as it is),
then ``relu(cheap_operation(x1) + fusion_bn[0](fusion_conv[0](x1)))`` where ``cheap_operation``
is a depthwise conv and its BN (``cheap_operation.0``, ``.1``), ``fusion_conv.0`` an
``nn.Identity`` (no keys) and ``fusion_bn.0`` a BN. ``switch_to_deploy`` writes
``cheap_operation`` as one depthwise conv with bias (the Sequential's index level goes) and sets
``fusion_conv``/``fusion_bn`` to empty lists: ``plus(then(dw, bn), then(identity, fusion_bn))``.
A module built with ``reparam=False`` (no ``fusion_bn``) is left as it is, as timm does.

The GhostNetV3 families follow ``timm/models/ghostnet.py`` (Liu et al., "GhostNetV3: Exploring
the Training Strategies for Compact Models", 2024). Every branch is a ``ConvBnAct`` without
activation: ``conv`` then ``bn1`` (timm's ``checkpoint_filter_fn`` renames upstream's ``bn``).

- ``GhostModuleV3`` fuses two separate sums in one call, so it holds two sites (two families):
  ``timm_ghostv3_primary``: ``sum(primary_rpr_conv[i](x))`` (k×k, usually 1×1; ``primary_rpr_scale``
  and ``primary_rpr_skip`` are None in timm and read if present) → ``primary_conv.0`` (a
  ``Sequential(conv, primary_activation)``); ``timm_ghostv3_cheap``: on ``x1`` after the
  activation, ``cheap_rpr_scale(x1) + cheap_rpr_skip(x1) + sum(cheap_rpr_conv[i](x1))`` (depthwise
  3×3 ×3, depthwise 1×1, identity BN) → ``cheap_operation.0`` (``Sequential(conv,
  cheap_activation)``). The ``*_rpr_*`` children are deleted and ``infer_mode`` set. The
  ``short_conv`` gate of ``mode='shortcut'`` modules is not re-parameterized (kept).
- ``GhostBottleneckV3`` with stride > 1: ``dw_rpr_scale(x) + sum(dw_rpr_conv[i](x))`` (depthwise
  k×k ×3 and 1×1, all strided) → ``conv_dw`` (with bias); ``bn_dw`` becomes ``nn.Identity``.
  Stride-1 bottlenecks have no ``dw_rpr_*`` keys (timm's call is a no-op there).

Every site is matched at the child it is read from (see :mod:`.timm_sites`): a bottleneck holds
two ghost modules, and a ghost module two sites.
"""

from __future__ import annotations

import re

from torch import nn

from ..algebra.maps import Map, plus
from ..errors import UnsupportedError
from ..fusion.values import FusedConv
from .base import Family
from .keys import join
from .modules import conv_from_fused, is_batch_norm
from .timm_mobileone import numbered
from .timm_repvgg import _check_plain_conv
from .timm_sites import ChildSite

# -- RepGhostModule ----------------------------------------------------------------------------


class TimmRepGhost(Family):
    name = "timm_repghost"
    title = "timm RepGhostModule (repghost)"
    source = "huggingface/pytorch-image-models timm/models/repghost.py RepGhostModule (RepGhost, 2022)"
    anchor = "cheap_operation.0.weight"
    deploy_anchor = "cheap_operation.weight"
    parts = ("cheap_operation", "fusion_conv", "fusion_bn")
    deploy = "cheap_operation"
    train_keys = "cheap_operation.{0 (depthwise conv), 1 (BN)}, fusion_bn.0 (BN on the identity)"
    deploy_keys = "cheap_operation.{weight,bias}"
    after_sum = "relu - kept (primary_conv before it is kept too)"

    def expression(self, v) -> Map | None:
        if v.tree == "key" and not (v.has("fusion_bn.0.running_var") and v.has("cheap_operation.1.running_var")):
            return None  # reparam=False: nothing to fuse
        if v.tree == "module":
            fusion_conv, fusion_bn = v.get("fusion_conv"), v.get("fusion_bn")
            if len(fusion_conv) != 1 or len(fusion_bn) != 1 or not isinstance(fusion_conv[0], nn.Identity):
                raise UnsupportedError(f"{v.where}: fusion_conv must hold one nn.Identity beside one fusion BN")
            _check_plain_conv(v.get("cheap_operation.0"), v.label("cheap_operation.0"))
        return plus(v.conv_bn("cheap_operation.0", "cheap_operation.1"), v.identity_bn("fusion_bn.0"))

    def matches_module(self, module: nn.Module) -> bool:
        cheap, fusion_conv, fusion_bn = (getattr(module, a, None) for a in ("cheap_operation", "fusion_conv", "fusion_bn"))
        return (isinstance(cheap, nn.Sequential) and len(cheap) == 2 and isinstance(cheap[0], nn.Conv2d)
                and is_batch_norm(cheap[1]) and isinstance(fusion_conv, nn.Sequential)
                and isinstance(fusion_bn, nn.Sequential) and len(fusion_bn) > 0
                and isinstance(getattr(module, "primary_conv", None), nn.Module))

    def find_deploy_prefixes(self, keys: list[str]) -> list[str]:
        present = set(keys)
        return [p for p in super().find_deploy_prefixes(keys)
                if join(p, "cheap_operation.bias") in present and join(p, "primary_conv.0.weight") in present]

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        # As timm: the conv takes cheap_operation's place (child order kept), and the fusion
        # branches become empty lists (not modules): the forward's zip over them adds nothing.
        module.cheap_operation = conv_from_fused(fused, like=module.cheap_operation[0].weight)
        del module.fusion_conv, module.fusion_bn
        module.fusion_conv = []
        module.fusion_bn = []
        return module


# -- GhostNetV3 --------------------------------------------------------------------------------


def conv_bn1(v, local: str) -> Map:
    """timm's ``ConvBnAct`` (``_efficientnet_blocks``) used as a branch: ``conv`` then ``bn1``, no
    activation, no anti-aliasing, no skip (a live one must be exactly that)."""
    if v.tree == "module":
        module = v.get(local)
        conv, bn = getattr(module, "conv", None), getattr(module, "bn1", None)
        if not isinstance(conv, nn.Conv2d) or not is_batch_norm(bn):
            raise UnsupportedError(f"{v.label(local)} is a {type(module).__name__}, not a conv + bn1 pair")
        _check_plain_conv(conv, v.label(join(local, "conv")))
        aa = getattr(module, "aa", None)
        if getattr(module, "has_skip", False) or not (aa is None or isinstance(aa, nn.Identity)):
            raise UnsupportedError(f"{v.label(local)} has a skip or an anti-aliasing layer inside the branch")
    return v.conv_bn(join(local, "conv"), join(local, "bn1"))


def rpr_sum(v, prefix: str) -> Map:
    """``<prefix>_rpr_conv[i]`` (i = 0, 1, ...), ``<prefix>_rpr_scale`` and the identity BN
    ``<prefix>_rpr_skip`` where present, summed; all three are claimed by the site."""
    conv_list, scale, skip = (f"{prefix}_rpr_{part}" for part in ("conv", "scale", "skip"))
    for part in (conv_list, scale, skip):
        v.own(part)
    terms = [conv_bn1(v, local) for local in numbered(v, conv_list)]
    if not terms:
        raise UnsupportedError(f"{v.where}: {conv_list} holds no branch")
    if v.has_any(scale) and (v.tree == "key" or not isinstance(v.get(scale), nn.Identity)):
        terms.append(conv_bn1(v, scale))
    identity = v.identity_bn(skip)
    return plus(*terms, *([identity] if identity is not None else []))


def _train_ghost_module(module: nn.Module) -> bool:
    return (isinstance(getattr(module, "primary_rpr_conv", None), nn.ModuleList) and len(module.primary_rpr_conv) > 0
            and isinstance(getattr(module, "cheap_rpr_conv", None), nn.ModuleList) and len(module.cheap_rpr_conv) > 0
            and hasattr(module, "primary_activation") and hasattr(module, "cheap_activation")
            and not getattr(module, "infer_mode", False))


class _GhostSite(ChildSite):
    """One ``<kind>_rpr_*`` sum of a GhostNetV3 module, named after its ``<kind>_rpr_conv`` list."""

    kind: str  # primary, cheap or dw

    def key_sites(self, keys: list[str]) -> list[tuple[str, str]]:
        path = self.site_paths[0]
        pattern = re.compile(rf"^(?:(.*)\.)?{path}\.0\.conv\.weight$")
        return [(m.group(1) or "", path) for m in map(pattern.match, keys) if m]

    def expression(self, v) -> Map | None:
        return rpr_sum(v, self.kind)


class _GhostModuleSite(_GhostSite):
    def deploy_path(self, path: str) -> str:
        return "primary_conv.0" if self.kind == "primary" else "cheap_operation.0"

    def block_sites(self, module: nn.Module) -> tuple[str, ...]:
        return self.site_paths if _train_ghost_module(module) else ()

    def switch(self, block: nn.Module, path: str, child: nn.Module, fused: FusedConv) -> nn.Module:
        conv = conv_from_fused(fused, like=child[0].conv.weight)
        activation = getattr(block, f"{self.kind}_activation", None)
        setattr(block, "primary_conv" if self.kind == "primary" else "cheap_operation",
                nn.Sequential(conv, activation if activation is not None else nn.Sequential()))
        for part in ("conv", "scale", "skip"):
            if hasattr(block, f"{self.kind}_rpr_{part}"):
                delattr(block, f"{self.kind}_rpr_{part}")
        if not hasattr(block, "primary_rpr_conv") and not hasattr(block, "cheap_rpr_conv"):
            block.infer_mode = True
        return child


class TimmGhostV3Primary(_GhostModuleSite):
    name = "timm_ghostv3_primary"
    title = "timm GhostModuleV3 primary branches (ghostnet)"
    source = "huggingface/pytorch-image-models timm/models/ghostnet.py GhostModuleV3 (GhostNetV3, 2024)"
    kind = "primary"
    site_paths = ("primary_rpr_conv",)
    train_keys = "primary_rpr_conv.{i}.{conv,bn1} (k x k), [primary_rpr_scale, primary_rpr_skip]"
    deploy_keys = "primary_conv.0.{weight,bias} (Sequential(conv, primary_activation))"
    after_sum = "primary_activation - kept; feeds the cheap branches and the concat"


class TimmGhostV3Cheap(_GhostModuleSite):
    name = "timm_ghostv3_cheap"
    title = "timm GhostModuleV3 cheap branches (ghostnet)"
    source = "huggingface/pytorch-image-models timm/models/ghostnet.py GhostModuleV3 (GhostNetV3, 2024)"
    kind = "cheap"
    site_paths = ("cheap_rpr_conv",)
    train_keys = ("cheap_rpr_conv.{i}.{conv,bn1} (depthwise k x k), cheap_rpr_scale.{conv,bn1} (1x1), "
                  "cheap_rpr_skip (identity BN)")
    deploy_keys = "cheap_operation.0.{weight,bias} (Sequential(conv, cheap_activation))"
    after_sum = "cheap_activation, concat with x1, short_conv gate ('shortcut' mode) - kept"


class TimmGhostV3Dw(_GhostSite):
    name = "timm_ghostv3_dw"
    title = "timm GhostBottleneckV3 strided depthwise branches (ghostnet)"
    source = "huggingface/pytorch-image-models timm/models/ghostnet.py GhostBottleneckV3 (GhostNetV3, 2024)"
    kind = "dw"
    site_paths = ("dw_rpr_conv",)
    train_keys = "dw_rpr_conv.{i}.{conv,bn1} (depthwise k x k, strided), dw_rpr_scale.{conv,bn1} (1x1)"
    deploy_keys = "conv_dw.{weight,bias}; bn_dw becomes nn.Identity"
    after_sum = "se, ghost2, shortcut - kept"

    def deploy_path(self, path: str) -> str:
        return "conv_dw"

    def block_sites(self, module: nn.Module) -> tuple[str, ...]:
        conv_list = getattr(module, "dw_rpr_conv", None)
        if (isinstance(conv_list, nn.ModuleList) and len(conv_list) > 0 and hasattr(module, "conv_dw")
                and not getattr(module, "infer_mode", False)):
            return self.site_paths
        return ()

    def switch(self, block: nn.Module, path: str, child: nn.Module, fused: FusedConv) -> nn.Module:
        block.conv_dw = conv_from_fused(fused, like=child[0].conv.weight)
        block.bn_dw = nn.Identity()
        for part in ("dw_rpr_conv", "dw_rpr_scale", "dw_rpr_skip"):
            if hasattr(block, part):
                delattr(block, part)
        block.infer_mode = True
        return child
