"""Diverse Branch Block (DBB), and the ConvBN layers of the DBB and OREPA projects.

Follows DingXiaoH/DiverseBranchBlock ``diversebranchblock.py`` (``DiverseBranchBlock``,
``IdentityBasedConv1x1``, ``BNAndPadLayer``), ``dbb_transforms.py`` (its deploy math, transI-VI)
and ``convnet_utils.py`` (``ConvBN``, ``conv_bn``); Ding et al., "Diverse Branch Block: Building a
Convolution as an Inception-like Unit", CVPR 2021. JUGGHM/OREPA_CVPR2022 ``blocks.py`` (its copy,
class ``DBB``) and ``basic.py`` (``ConvBN``) have the same keys.

A block with in ``I``, out ``O``, kernel ``k``, stride ``s``, padding ``p = k // 2`` and groups ``g``
sums four branches, then applies ``nonlinear`` (kept, no keys):

- ``dbb_origin``: ``conv`` (k×k) then ``bn``;
- ``dbb_1x1``: ``conv`` (1×1, stride s) then ``bn`` (dense layout only, ``g < O``);
- ``dbb_avg``: dense: ``conv`` (1×1) then ``bn`` (a ``BNAndPadLayer``, keys ``dbb_avg.bn.bn.*``),
  a k×k average pool (stride s, padding 0) and ``avgbn``; depthwise (``g >= O``): the average
  pool (padding p, zeros counted) and ``avgbn`` only;
- ``dbb_1x1_kxk``: a 1×1 (``idconv1``: ``weight`` plus the identity, which is not stored; or a
  plain ``conv1``), ``bn1`` (a ``BNAndPadLayer``, keys ``bn1.bn.*``), ``conv2`` (k×k, stride s,
  padding 0) and ``bn2``.

A ``BNAndPadLayer`` pads its output by ``p`` with what its BN gives for a zero input, so the k×k
map after it sees the 1×1 chain run on an input zero-padded by ``p`` once: ``then(...,
pad_first=True)``. Groups are not stored; the 1×1→k×k branch gives them exactly
(``g = rows of the first 1×1 / conv2.weight.shape[1]``).

Deploy form: ``dbb_reparam`` (a conv with bias, ``dbb_origin.conv``'s geometry); the four branches
are deleted. ``ConvBN`` (``conv`` without bias, ``bn``) becomes ``conv`` with a bias (``bn``
deleted): a layout every conv+BN pair has, so it is switched on only inside a model recognised as
DBB or OREPA (:mod:`.architectures`), and in a live model only for a module of class ``ConvBN``
with ``switch_to_deploy`` (upstream's class).
"""

from __future__ import annotations

from torch import nn

from ..algebra import maps
from ..algebra.maps import Map, plus, then
from ..errors import InputError, UnsupportedError
from ..fusion.values import FusedConv
from .base import Family
from .modules import conv_from_fused, is_batch_norm

BRANCHES = ("dbb_origin", "dbb_avg", "dbb_1x1", "dbb_1x1_kxk")


def _conv(v, local: str, groups: int, after_pad: int | None = None) -> Map:
    """The conv at ``local``: a live one with its own geometry, except that ``after_pad`` (the
    border of the BNAndPadLayer before it) replaces its own padding of 0; a stored one centred,
    stride 1, with ``groups``."""
    value = v.conv(local)
    c = value.convs[0]
    if v.tree == "module":
        if after_pad is None:
            return value
        if max(value.padding or (0, 0)) > 0:
            raise UnsupportedError(f"{v.where}: {local} pads its input after a BNAndPadLayer that pads already")
        return maps.conv(c.weight, c.bias, stride=value.stride, padding=after_pad, dilation=value.dilation,
                            groups=value.groups, padding_mode=value.padding_mode, in_channels=value.in_channels,
                            known=True)
    return maps.conv(c.weight, c.bias, groups=groups)


def _pad_pixels(v, local: str) -> int | None:
    """The border a live BNAndPadLayer adds (None for a stored block: its convs are centred)."""
    if v.tree == "key":
        return None
    pixels = getattr(v.get(local), "pad_pixels", None)
    if not isinstance(pixels, int):
        raise UnsupportedError(f"{v.where}: {local} has no integer pad_pixels; a BNAndPadLayer is expected")
    return pixels


def _avg_pool(v, channels: int, kernel: int, after_pad: int | None) -> Map:
    """``dbb_avg.avg``: a stored block's is k×k, stride 1, padding ``k // 2`` (its own, or the
    BNAndPadLayer's before it); a live ``nn.AvgPool2d`` has its own geometry, except that
    ``after_pad`` replaces its own padding of 0."""
    if v.tree == "key":
        return maps.avg_pool(channels, kernel, stride=1, padding=kernel // 2)
    pool = v.get("dbb_avg.avg")
    if not isinstance(pool, nn.AvgPool2d):
        raise UnsupportedError(f"{v.where}: dbb_avg.avg is a {type(pool).__name__}, not an AvgPool2d")
    if pool.ceil_mode or not pool.count_include_pad or pool.divisor_override is not None:
        raise UnsupportedError(f"{v.where}: dbb_avg.avg must count the zero padding (count_include_pad=True, "
                               "no ceil_mode or divisor_override) to be a conv")
    own = pool.padding
    if after_pad is not None and own not in (0, (0, 0)):
        raise UnsupportedError(f"{v.where}: dbb_avg.avg pads its input after a BNAndPadLayer that pads already")
    return maps.avg_pool(channels, pool.kernel_size, stride=pool.stride, padding=own if after_pad is None else after_pad)


def _check_linear_pair(v, local: str) -> None:
    """A live ``dbb_origin``/``dbb_1x1`` may be a ConvBN (OREPA's copy): its ``nonlinear`` must do nothing."""
    if v.tree != "module":
        return
    act = getattr(v.get(local), "nonlinear", None)
    if act is not None and not isinstance(act, nn.Identity):
        raise UnsupportedError(f"{v.where}: {local} applies {type(act).__name__} inside the branch; "
                               "a branch with an activation before the sum cannot be fused")


class DiverseBranchBlock(Family):
    name = "dbb"
    title = "Diverse Branch Block (DBB)"
    source = "DingXiaoH/DiverseBranchBlock diversebranchblock.py, dbb_transforms.py (CVPR 2021)"
    anchor = "dbb_origin.conv.weight"
    deploy_anchor = "dbb_reparam.weight"
    parts = BRANCHES
    deploy = "dbb_reparam"
    encloses = ("dbb_convbn",)  # OREPA's copy builds dbb_origin/dbb_1x1 as ConvBN layers
    train_keys = ("dbb_origin.{conv,bn}, [dbb_1x1.{conv,bn}], dbb_avg.{[conv, bn.bn], avgbn}, "
                  "dbb_1x1_kxk.{idconv1|conv1, bn1.bn, conv2, bn2}")
    deploy_keys = "dbb_reparam.{weight,bias}"
    after_sum = "nonlinear - kept"

    def expression(self, v) -> Map | None:
        first_name = "dbb_1x1_kxk.idconv1" if v.has("dbb_1x1_kxk.idconv1.weight") else "dbb_1x1_kxk.conv1"
        origin_weight = v.conv("dbb_origin.conv").convs[0].weight
        out, k = int(origin_weight.shape[0]), int(origin_weight.shape[-1])
        if tuple(origin_weight.shape[2:]) != (k, k) or k % 2 == 0:
            raise UnsupportedError(f"{v.where}: dbb_origin.conv has a {tuple(origin_weight.shape[2:])} kernel; "
                                   "DBB's kernel is square and odd")
        first_rows = int(v.conv(first_name).convs[0].weight.shape[0])
        conv2_cols = int(v.conv("dbb_1x1_kxk.conv2").convs[0].weight.shape[1])
        if conv2_cols <= 0 or first_rows % conv2_cols:
            raise InputError(f"{v.where}: {first_name}.weight has {first_rows} rows, which dbb_1x1_kxk.conv2.weight "
                             f"({conv2_cols} inputs per group) does not split into groups")
        groups = first_rows // conv2_cols
        _check_linear_pair(v, "dbb_origin")
        terms = [then(_conv(v, "dbb_origin.conv", groups), v.bn("dbb_origin.bn"))]
        if v.has_any("dbb_1x1"):
            _check_linear_pair(v, "dbb_1x1")
            terms.append(then(_conv(v, "dbb_1x1.conv", groups), v.bn("dbb_1x1.bn")))

        if first_name.endswith("idconv1"):  # IdentityBasedConv1x1: weight + the (unstored) identity
            first = plus(_conv(v, first_name, groups), maps.identity(first_rows))
        else:
            first = _conv(v, first_name, groups)
        terms.append(then(first, v.bn("dbb_1x1_kxk.bn1.bn"),
                          _conv(v, "dbb_1x1_kxk.conv2", groups, _pad_pixels(v, "dbb_1x1_kxk.bn1")),
                          v.bn("dbb_1x1_kxk.bn2"), pad_first=True))

        if v.has("dbb_avg.conv.weight"):  # dense: 1x1, BNAndPad, avg pool without padding, BN
            terms.append(then(_conv(v, "dbb_avg.conv", groups), v.bn("dbb_avg.bn.bn"),
                              _avg_pool(v, out, k, _pad_pixels(v, "dbb_avg.bn")), v.bn("dbb_avg.avgbn"),
                              pad_first=True))
        else:  # depthwise: the pool pads with zeros itself
            terms.append(then(_avg_pool(v, out, k, None), v.bn("dbb_avg.avgbn")))
        return plus(*terms)

    def matches_module(self, module: nn.Module) -> bool:
        origin = getattr(module, "dbb_origin", None)
        return (isinstance(getattr(origin, "conv", None), nn.Conv2d)
                and isinstance(getattr(module, "dbb_1x1_kxk", None), nn.Module)
                and isinstance(getattr(module, "dbb_avg", None), nn.Module)
                and getattr(module, "dbb_reparam", None) is None)


class DbbConvBN(Family):
    name = "dbb_convbn"
    title = "DBB / OREPA ConvBN (conv+BN layer)"
    source = "DingXiaoH/DiverseBranchBlock convnet_utils.py ConvBN; JUGGHM/OREPA_CVPR2022 basic.py ConvBN"
    anchor = "conv.weight"
    parts = ("conv", "bn")
    deploy = "conv"
    only_in = ("dbb", "orepa")
    train_keys = "conv (no bias), bn"
    deploy_keys = "conv.{weight,bias}"
    after_sum = "nonlinear - kept"

    def expression(self, v) -> Map | None:
        if v.tree == "key" and not (v.has("bn.running_var") or v.has("bn.running_mean")):
            return None  # a conv without its BN (a deployed ConvBN, a plain conv)
        return v.conv_bn("conv", "bn")

    def matches_module(self, module: nn.Module) -> bool:
        return (type(module).__name__ == "ConvBN" and callable(getattr(module, "switch_to_deploy", None))
                and isinstance(getattr(module, "conv", None), nn.Conv2d) and is_batch_norm(getattr(module, "bn", None)))

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        # The deploy conv takes the train conv's own name (upstream's ConvBN.switch_to_deploy), so
        # the generic switch (set the deploy conv, then delete the parts) would delete it again.
        module.conv = conv_from_fused(fused, like=module.conv.weight)
        del module.bn
        return module
