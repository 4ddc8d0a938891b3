"""OREPA: online convolutional re-parameterization (Hu et al., CVPR 2022).

Follows JUGGHM/OREPA_CVPR2022 ``blocks.py`` (``OREPA``, ``OREPA_1x1``, ``OREPA_LargeConv``,
``OREPA_LargeConvBase``) and ``blocks_repvgg.py`` (``OREPA_3x3_RepVGG``, ``RepVGGBlock_OREPA``).
An OREPA block runs one conv whose kernel it generates from its parameters (``weight_gen``), then
``bn``, then ``nonlinear`` (kept, no keys). Every generated kernel is a sum of branches, each a
1×1 then k×k chain built in weight space, so each is a feature-space map over the algebra (a
chain pads its input once, before the 1×1: ``then(..., pad_first=True)``):

- ``origin`` ``weight_orepa_origin`` (k×k) × ``vector[0]``;
- ``avg``: ``weight_orepa_avg_conv`` (1×1), then the depthwise k×k kernel ``weight_orepa_avg_avg``
  (a stored buffer: float32 1/k², read, never recomputed) × ``vector[1]``;
- ``pfir``: ``weight_orepa_pfir_conv`` (1×1), then the depthwise kernel ``weight_orepa_prior``
  (a stored buffer; for k > 3 partly uninitialised memory upstream, so only readable) × ``vector[2]``;
- ``1x1_kxk``: ``weight_orepa_1x1_kxk_idconv1`` plus the stored ``id_tensor`` (1×1), then
  ``weight_orepa_1x1_kxk_conv2`` (k×k) × ``vector[3]``;
- ``1x1``: ``weight_orepa_1x1`` (centred) × ``vector[4]``;
- ``gconv``: ``weight_orepa_gconv_dw`` (depthwise k×k, ``r`` outputs per input channel), then
  ``weight_orepa_gconv_pw`` (grouped 1×1) × ``vector[5]``.

``OREPA_3x3_RepVGG`` (``rbr_dense`` of ``RepVGGBlock_OREPA``) names them ``weight_rbr_*``, has no
``1x1`` branch and takes gconv's factor from ``vector[4]`` (a sixth row, when present, is unused).
``OREPA_1x1``: ``weight_or1x1_origin`` × ``vector[0]`` + (``l2i_conv1`` then ``l2i_conv2``) ×
``vector[1]``. ``OREPA_LargeConv`` (k = 2L + 1 ≥ 5) generates its kernel from L weight-only 3×3
OREPAs ``weight0..weight{L-1}`` and ``OREPA_LargeConvBase`` from L plain 3×3 parameters, both by
cross-correlating the kernels: the block equals the stack of unpadded 3×3 convs ``K0``,
``flip(K1)``, ..., run on the input padded once (``pad``).

What the algebra cannot say is done on the weights here, before they enter it (each documented
where it is done): the spatial flip of the later large-kernel kernels (:func:`_spatial`), the
pointwise row order of ``gconv`` with groups > 1 (:func:`_standard_pointwise`), and the
(k, k) / (O, k, k) stored kernels broadcast to depthwise ``(O, 1, k, k)`` kernels.

Deploy forms (``switch_to_deploy`` upstream; the train tensors and ``bn`` deleted, ``nonlinear``
kept): ``orepa_reparam``, ``or1x1_reparam``, ``or_large_reparam`` (both large kernels) and, for
``RepVGGBlock_OREPA``, ``rbr_reparam`` (``rbr_dense``/``rbr_1x1``/``rbr_identity`` deleted;
``se`` and ``nonlinearity`` kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..algebra import maps
from ..algebra.maps import Map, pad, plus, then
from ..errors import InputError, UnsupportedError
from ..fusion.values import FusedConv
from .base import Family
from .keys import conv_weight, join
from .modules import conv_from_fused, is_batch_norm

KEPT = ("nonlinear",)
"""What an OREPA block keeps when switched (upstream deletes every other tensor and ``bn``)."""


@dataclass(frozen=True)
class Geometry:
    """How a generated kernel runs: stride, padding (``k // 2`` for a block, 0 for a large
    kernel's unpadded 3×3 steps), groups, input channels, and whether a live module said so."""

    stride: tuple[int, int]
    padding: int
    groups: int
    in_channels: int
    known: bool


def _weight(v, local: str) -> Tensor:
    """A 4-D kernel stored directly under the block (a parameter or buffer, not a conv module)."""
    if v.tree == "key":
        weight = conv_weight(v, local)
    else:
        weight = v.tensor(local)
        if not isinstance(weight, Tensor) or weight.dim() != 4 or not weight.is_floating_point():
            raise UnsupportedError(f"{v.where}: {local} is not a 4-D floating-point kernel")
    if v.tree == "key":
        v._first_weight(weight)  # the fused conv is written in the dtype of the first kernel read
    elif v.dtype is None:
        v.dtype = weight.dtype
    return weight


def _stored(v, local: str, shape: tuple[int, ...]) -> Tensor:
    """A stored constant (``avg_avg``, ``prior``, ``id_tensor``) of exactly ``shape``."""
    value = v.tensor(local)
    if not isinstance(value, Tensor) or tuple(value.shape) != shape or not value.is_floating_point():
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise InputError(f"{v.where}: {v.key(local) if v.tree == 'key' else local} has shape {got}; "
                         f"{shape} floating point is expected")
    if not bool(torch.isfinite(value).all()):
        raise InputError(f"{v.where}: {local} holds NaN or Inf")
    return value


def _vector(v, local: str, rows: int, channels: int) -> Tensor:
    """``vector``: one row of per-output-channel factors per branch (at least ``rows`` rows)."""
    value = v.tensor(local)
    if (not isinstance(value, Tensor) or value.dim() != 2 or value.shape[0] < rows or value.shape[1] != channels
            or not value.is_floating_point()):
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise InputError(f"{v.where}: {local} has shape {got}; ({rows}, {channels}) floating point is expected")
    if not bool(torch.isfinite(value).all()):
        raise InputError(f"{v.where}: {local} holds NaN or Inf")
    return value


def _spatial(kernel: Tensor, flip: bool) -> Tensor:
    """A k×k kernel, spatially flipped when it is a later step of a large kernel: upstream
    composes the 3×3 kernels with ``F.conv2d`` (a cross-correlation), which equals the stack of
    convs with every later kernel flipped. The algebra has no flip; it is done on the weights."""
    return kernel.flip(-2, -1) if flip else kernel


def _standard_pointwise(pw: Tensor, groups: int) -> Tensor:
    """gconv's 1×1 weight in the row order of a grouped conv.

    Upstream reads it through ``view(O/g, g, ...)``: output channel ``c * (O/g) + a`` (group ``c``)
    uses row ``a * g + c``. A grouped conv's row ``c * (O/g) + a`` belongs to group ``c``, so the
    rows are reordered (no change when ``g == 1``). The algebra has no such reindexing of a
    conv's rows against its groups; it is done on the weights.
    """
    out = int(pw.shape[0])
    if groups == 1:
        return pw
    if out % groups:
        raise InputError(f"gconv's pointwise weight has {out} rows, which {groups} groups do not split")
    return pw.reshape(out // groups, groups, *pw.shape[1:]).transpose(0, 1).reshape(pw.shape)


def _conv(weight: Tensor, geometry: Geometry, *, padding: int, groups: int | None = None,
          strided: bool = False) -> Map:
    """A conv of the generated kernel's branches: the block's groups unless told, its stride only
    on the step that carries it (``strided``; a 1×1 before a k×k runs at stride 1)."""
    return maps.conv(weight, stride=geometry.stride if strided else 1, padding=padding,
                        groups=geometry.groups if groups is None else groups, known=geometry.known)


def generated_kernel(v, at: str, prefix: str, geometry: Geometry, rows: dict[str, int], flip: bool = False) -> Map:
    """An OREPA ``weight_gen`` as the map ``conv(x, weight_gen())`` (no BN): its branches summed.

    Args:
        v: the block's view.
        at: where the kernel's tensors live under the block ("" or ``weight0``, ``rbr_dense``).
        prefix: their name prefix (``weight_orepa`` or ``weight_rbr``).
        geometry: stride, padding, groups, input channels.
        rows: the ``vector`` row of each branch (a branch without a row is absent).
        flip: flip every k×k kernel (a later step of a large kernel).
    """
    def name(leaf: str) -> str:
        return join(at, f"{prefix}_{leaf}")

    origin = _weight(v, name("origin"))
    out, k = int(origin.shape[0]), int(origin.shape[-1])
    vector = _vector(v, join(at, "vector"), max(rows.values()) + 1, out)
    p, g = geometry.padding, geometry.groups

    def factor(branch: str) -> Map:
        return maps.scale(vector[rows[branch]])

    terms = {"origin": then(_conv(_spatial(origin, flip), geometry, padding=p, strided=True), factor("origin"))}
    for branch in ("avg", "pfir"):
        first = _weight(v, name(f"{branch}_conv"))
        if branch == "avg":  # one (k, k) kernel for every channel
            taps = _stored(v, name("avg_avg"), (k, k)).expand(out, 1, k, k)
        else:  # one (k, k) kernel per channel
            taps = _stored(v, name("prior"), (out, k, k)).unsqueeze(1)
        terms[branch] = then(_conv(first, geometry, padding=0),
                             _conv(_spatial(taps, flip), geometry, padding=p, groups=out, strided=True),
                             factor(branch), pad_first=True)
    if "1x1" in rows:  # centred in the k×k kernel: its padding is the block's less k // 2
        terms["1x1"] = then(_conv(_weight(v, name("1x1")), geometry, padding=p - k // 2, strided=True), factor("1x1"))
    if v.has(name("1x1_kxk_conv1")):  # OREPA_3x3_RepVGG with an explicit internal width
        first = _conv(_weight(v, name("1x1_kxk_conv1")), geometry, padding=0)
    else:  # idconv1 + the stored id_tensor
        idconv1 = _weight(v, name("1x1_kxk_idconv1"))
        identity = _stored(v, join(at, "id_tensor"), tuple(idconv1.shape))
        first = plus(_conv(idconv1, geometry, padding=0), _conv(identity, geometry, padding=0))
    terms["1x1_kxk"] = then(first, _conv(_spatial(_weight(v, name("1x1_kxk_conv2")), flip), geometry, padding=p,
                                         strided=True), factor("1x1_kxk"), pad_first=True)
    dw = _weight(v, name("gconv_dw"))
    pw = _standard_pointwise(_weight(v, name("gconv_pw")), g)
    terms["gconv"] = then(_conv(_spatial(dw, flip), geometry, padding=p, groups=geometry.in_channels, strided=True),
                          _conv(pw, geometry, padding=0), factor("gconv"), pad_first=True)
    order = ("origin", "avg", "1x1", "1x1_kxk", "pfir", "gconv")  # upstream's sum
    return plus(*(terms[b] for b in order if b in terms))


def _key_groups(v, at: str, prefix: str, dense_pointwise: bool = False) -> tuple[int, int]:
    """``(groups, in_channels)`` from the kernel shapes: ``gconv_dw`` has ``r * I`` rows,
    ``gconv_pw`` ``r * I / g`` columns (``r * I`` in ``OREPA_3x3_RepVGG``), origin ``I / g``."""
    dw_rows = int(_weight(v, join(at, f"{prefix}_gconv_dw")).shape[0])
    pw_cols = int(_weight(v, join(at, f"{prefix}_gconv_pw")).shape[1])
    per_group = int(_weight(v, join(at, f"{prefix}_origin")).shape[1])
    if pw_cols <= 0 or dw_rows % pw_cols:
        raise InputError(f"{v.where}: {prefix}_gconv_dw has {dw_rows} rows, which {prefix}_gconv_pw "
                         f"({pw_cols} inputs) does not split into groups")
    groups = 1 if dense_pointwise else dw_rows // pw_cols
    return groups, per_group * groups


def _module_geometry(v, at: str, kernel: int, padding: int | None = None) -> Geometry:
    """A live OREPA module's own stride, padding, groups and input channels."""
    module = v.get(at) if at else v.module
    for attribute in ("stride", "padding", "dilation", "groups", "in_channels"):
        if not hasattr(module, attribute):
            raise UnsupportedError(f"{v.where}: {at or 'the block'} has no {attribute} attribute")
    def pair(value) -> tuple[int, int]:
        return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))

    if pair(module.dilation) != (1, 1):
        raise UnsupportedError(f"{v.where}: a generated kernel with dilation {module.dilation}: its branches "
                               "compose into one conv only at dilation 1")
    own = pair(module.padding)
    if own[0] != own[1]:
        raise UnsupportedError(f"{v.where}: padding {own}; OREPA pads every side alike")
    return Geometry(stride=pair(module.stride), padding=own[0] if padding is None else padding,
                    groups=int(module.groups), in_channels=int(module.in_channels), known=True)


def _has_bn(v, local: str = "bn") -> bool:
    return v.has_any(local) if v.tree == "key" else is_batch_norm(v.get(local))


def _switch(module: nn.Module, deploy: str, fused: FusedConv) -> nn.Module:
    """Give a live block its deploy conv and delete its train tensors and ``bn``, as upstream does."""
    like = next((p for p in module.parameters() if p.is_floating_point()), None)
    if like is None:
        like = next(b for b in module.buffers() if b.is_floating_point())
    names = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
    names += [n for n, _ in module.named_children()]
    for attribute in names:
        if attribute not in KEPT:
            delattr(module, attribute)
    setattr(module, deploy, conv_from_fused(fused, like=like))
    return module


ORIGIN = {"origin": 0, "avg": 1, "pfir": 2, "1x1_kxk": 3, "1x1": 4, "gconv": 5}
"""``OREPA``'s ``vector`` rows."""
RBR_ROWS = {"origin": 0, "avg": 1, "pfir": 2, "1x1_kxk": 3, "gconv": 4}
"""``OREPA_3x3_RepVGG``'s ``vector`` rows (no 1×1 branch; gconv on row 4)."""


class Orepa(Family):
    name = "orepa"
    title = "OREPA block (k x k)"
    source = "JUGGHM/OREPA_CVPR2022 blocks.py OREPA (CVPR 2022)"
    anchor = "weight_orepa_origin"
    deploy_anchor = "orepa_reparam.weight"
    parts = ("",)  # its tensors are the block's own attributes: every key under it is the block's
    deploy = "orepa_reparam"
    train_keys = ("weight_orepa_{origin,avg_conv,pfir_conv,1x1,1x1_kxk_idconv1,1x1_kxk_conv2,gconv_dw,gconv_pw}, "
                  "vector, weight_orepa_{avg_avg,prior}, id_tensor, bn")
    deploy_keys = "orepa_reparam.{weight,bias}"
    after_sum = "bn (folded), then nonlinear - kept"

    def expression(self, v) -> Map | None:
        if not _has_bn(v):
            raise UnsupportedError(f"{v.where}: a weight-only OREPA (no bn) outside an OREPA_LargeConv returns "
                                   "its kernel, not a feature map")
        k = int(_weight(v, "weight_orepa_origin").shape[-1])
        if v.tree == "key":
            groups, in_channels = _key_groups(v, "", "weight_orepa")
            geometry = Geometry((1, 1), k // 2, groups, in_channels, False)
        else:
            geometry = _module_geometry(v, "", k)
        return then(generated_kernel(v, "", "weight_orepa", geometry, ORIGIN), v.bn("bn"))

    def matches_module(self, module: nn.Module) -> bool:
        return isinstance(getattr(module, "weight_orepa_origin", None), Tensor)

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        return _switch(module, self.deploy, fused)  # parts is ("",): delete what upstream deletes


class Orepa1x1(Family):
    name = "orepa_1x1"
    title = "OREPA_1x1 block"
    source = "JUGGHM/OREPA_CVPR2022 blocks.py OREPA_1x1 (CVPR 2022)"
    anchor = "weight_or1x1_origin"
    deploy_anchor = "or1x1_reparam.weight"
    parts = ("",)
    deploy = "or1x1_reparam"
    train_keys = "weight_or1x1_{origin,l2i_conv1,l2i_conv2}, vector, bn"
    deploy_keys = "or1x1_reparam.{weight,bias}"
    after_sum = "bn (folded), then nonlinear - kept"

    def expression(self, v) -> Map | None:
        origin = _weight(v, "weight_or1x1_origin")
        first, second = _weight(v, "weight_or1x1_l2i_conv1"), _weight(v, "weight_or1x1_l2i_conv2")
        vector = _vector(v, "vector", 2, int(origin.shape[0]))
        stride, known = (1, 1), False
        if v.tree == "module":
            geometry = _module_geometry(v, "", 1)
            if geometry.groups != 1 or geometry.padding != 0:
                raise UnsupportedError(f"{v.where}: OREPA_1x1 with groups {geometry.groups}, padding "
                                       f"{geometry.padding}; upstream builds it with groups 1 and padding 0")
            stride, known = geometry.stride, True
        direct = then(maps.conv(origin, stride=stride, padding=0, groups=1, known=known), maps.scale(vector[0]))
        low_rank = then(maps.conv(first, stride=stride, padding=0, groups=1, known=known),
                        maps.conv(second, padding=0, groups=1, known=known), maps.scale(vector[1]))
        return then(plus(direct, low_rank), v.bn("bn"))

    def matches_module(self, module: nn.Module) -> bool:
        return isinstance(getattr(module, "weight_or1x1_origin", None), Tensor)

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        return _switch(module, self.deploy, fused)


def _layers(v, base: bool) -> int:
    """How many 3×3 steps a large kernel has (``weight0``, ``weight1``, ...)."""
    count = 0
    while v.has(f"weight{count}" if base else f"weight{count}.weight_orepa_origin"):
        count += 1
    return count


def _large_kernel(v, steps: list[Map], kernel: int) -> Map:
    """The large kernel's steps, unpadded, then the block's padding put once before them."""
    padding = kernel // 2
    if v.tree == "module":
        padding = _module_geometry(v, "", kernel).padding
    return then(pad(then(*steps), padding), v.bn("bn"))


class OrepaLargeConv(Family):
    name = "orepa_large"
    title = "OREPA_LargeConv (stacked 3x3 OREPA kernels)"
    source = "JUGGHM/OREPA_CVPR2022 blocks.py OREPA_LargeConv (CVPR 2022)"
    anchor = "weight0.weight_orepa_origin"
    deploy_anchor = "or_large_reparam.weight"
    parts = ("",)
    deploy = "or_large_reparam"
    encloses = ("orepa",)  # its weight0..weight{L-1} are weight-only OREPAs
    train_keys = "weight{0..L-1}.<weight-only OREPA keys>, bn"
    deploy_keys = "or_large_reparam.{weight,bias}"
    after_sum = "bn (folded), then nonlinear - kept"

    def expression(self, v) -> Map | None:
        layers = _layers(v, base=False)
        if layers < 2:
            return None  # one weight-only OREPA under "weight0" is not a large kernel
        steps = []
        for i in range(layers):
            at = f"weight{i}"
            if _has_bn(v, join(at, "bn")):
                raise UnsupportedError(f"{v.where}: {at} has a bn; the steps of an OREPA_LargeConv are weight-only")
            k = int(_weight(v, join(at, "weight_orepa_origin")).shape[-1])
            if k != 3:
                raise UnsupportedError(f"{v.where}: {at} has a {k}x{k} kernel; OREPA_LargeConv stacks 3x3 kernels")
            if v.tree == "key":
                groups, in_channels = _key_groups(v, at, "weight_orepa")
                geometry = Geometry((1, 1), 0, groups, in_channels, False)
            else:
                geometry = _module_geometry(v, at, 3, padding=0)
                stride = _module_geometry(v, "", 2 * layers + 1).stride if i == layers - 1 else (1, 1)
                geometry = Geometry(stride, 0, geometry.groups, geometry.in_channels, True)
            if geometry.groups != 1:
                raise UnsupportedError(f"{v.where}: {at} has {geometry.groups} groups; upstream's OREPA_LargeConv "
                                       "only runs with groups 1 (its later steps are built without groups)")
            steps.append(generated_kernel(v, at, "weight_orepa", geometry, ORIGIN, flip=i > 0))
        return _large_kernel(v, steps, 2 * layers + 1)

    def matches_module(self, module: nn.Module) -> bool:
        return isinstance(getattr(getattr(module, "weight0", None), "weight_orepa_origin", None), Tensor)

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        return _switch(module, self.deploy, fused)


class OrepaLargeConvBase(Family):
    name = "orepa_large_base"
    title = "OREPA_LargeConvBase (stacked 3x3 kernels)"
    source = "JUGGHM/OREPA_CVPR2022 blocks.py OREPA_LargeConvBase (CVPR 2022)"
    anchor = "weight0"
    deploy_anchor = "or_large_reparam.weight"
    parts = ("",)
    deploy = "or_large_reparam"
    only_in = ("orepa",)  # bare weight0, weight1 and a bn: too plain a layout to claim elsewhere
    train_keys = "weight0..weight{L-1} (3x3 kernels), bn"
    deploy_keys = "or_large_reparam.{weight,bias}"
    after_sum = "bn (folded), then nonlinear - kept"

    def expression(self, v) -> Map | None:
        layers = _layers(v, base=True)
        if layers < 2 or not _has_bn(v):
            return None
        kernels = [_weight(v, f"weight{i}") for i in range(layers)]
        if any(tuple(w.shape[2:]) != (3, 3) for w in kernels):
            return None
        if v.tree == "key":  # weight1 is (O, O/g, 3, 3)
            groups = int(kernels[1].shape[0]) // max(1, int(kernels[1].shape[1]))
            stride, known = (1, 1), False
        else:
            geometry = _module_geometry(v, "", 2 * layers + 1)
            groups, stride, known = geometry.groups, geometry.stride, True
        steps = [maps.conv(_spatial(w, i > 0), stride=stride if i == layers - 1 else 1, padding=0, groups=groups,
                              known=known) for i, w in enumerate(kernels)]
        return _large_kernel(v, steps, 2 * layers + 1)

    def matches_module(self, module: nn.Module) -> bool:
        steps = [getattr(module, f"weight{i}", None) for i in range(2)]
        return (all(isinstance(s, nn.Parameter) and s.dim() == 4 for s in steps)
                and is_batch_norm(getattr(module, "bn", None)) and callable(getattr(module, "weight_gen", None)))

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        return _switch(module, self.deploy, fused)


class OrepaRepVGG(Family):
    name = "orepa_repvgg"
    title = "RepVGGBlock_OREPA"
    source = "JUGGHM/OREPA_CVPR2022 blocks_repvgg.py RepVGGBlock_OREPA, OREPA_3x3_RepVGG (CVPR 2022)"
    anchor = "rbr_dense.weight_rbr_origin"
    deploy_anchor = "rbr_reparam.weight"
    parts = ("rbr_dense", "rbr_1x1", "rbr_identity")
    deploy = "rbr_reparam"
    encloses = ("dbb_convbn",)  # rbr_1x1 is a ConvBN
    train_keys = "rbr_dense.{weight_rbr_*, vector, id_tensor, bn}, rbr_1x1.{conv,bn}, [rbr_identity (BN)]"
    deploy_keys = "rbr_reparam.{weight,bias}"
    after_sum = "se, then nonlinearity - kept"

    def expression(self, v) -> Map | None:
        k = int(_weight(v, "rbr_dense.weight_rbr_origin").shape[-1])
        if v.tree == "key":
            groups, in_channels = _key_groups(v, "rbr_dense", "weight_rbr", dense_pointwise=True)
            geometry = Geometry((1, 1), k // 2, groups, in_channels, False)
        else:
            geometry = _module_geometry(v, "rbr_dense", k)
            one = v.get("rbr_1x1")
            act = getattr(one, "nonlinear", None)
            if act is not None and not isinstance(act, nn.Identity):
                raise UnsupportedError(f"{v.where}: rbr_1x1 applies {type(act).__name__} inside the branch")
        if geometry.groups != 1:
            raise UnsupportedError(f"{v.where}: rbr_dense with {geometry.groups} groups; upstream's "
                                   "OREPA_3x3_RepVGG only generates its kernel with groups 1")
        dense = then(generated_kernel(v, "rbr_dense", "weight_rbr", geometry, RBR_ROWS), v.bn("rbr_dense.bn"))
        terms = [dense, v.conv_bn("rbr_1x1.conv", "rbr_1x1.bn")]
        identity = v.identity_bn("rbr_identity")
        return plus(*terms, *([identity] if identity is not None else []))

    def matches_module(self, module: nn.Module) -> bool:
        dense = getattr(module, "rbr_dense", None)
        return isinstance(getattr(dense, "weight_rbr_origin", None), Tensor) and isinstance(
            getattr(getattr(module, "rbr_1x1", None), "conv", None), nn.Conv2d)
