"""ACNet's Asymmetric Convolution Block (ACBlock).

Follows DingXiaoH/ACNet ``acnet/acb.py`` (Ding et al., "ACNet: Strengthening the Kernel
Skeletons for Powerful CNN via Asymmetric Convolution Blocks", ICCV 2019), and the earlier
layout of the same class that DingXiaoH/DiverseBranchBlock ``acb.py`` still ships.

A block sums three conv+BN branches: ``square_conv``/``square_bn`` (k×k),
``ver_conv``/``ver_bn`` (vertical, a k×1 kernel) and ``hor_conv``/``hor_bn`` (horizontal, a 1×k
kernel). The k×1 kernel lands in the middle column of the fused k×k kernel and the 1×k kernel in
the middle row. BNs may be ``affine=False`` (``use_affine``). When ``padding < k // 2`` the
asymmetric branches crop their input instead of padding it: ``crop`` (an int) in the current
layout, ``ver_conv_crop_layer``/``hor_conv_crop_layer`` (CropLayer) in the earlier one. The
earlier layout may also apply a ``last_bn`` to the sum (``use_last_bn``); its deploy form has no
``last_bn``, so that BN is always folded into the conv. DiverseBranchBlock's copy applies
``nonlinear`` to the sum; it is kept (its deploy forward skips it, which a note records).

Deploy form: ``fused_conv`` (a k×k Conv2d with bias, the square conv's geometry) and
``deploy=True``.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from ..algebra.maps import Map, plus, then
from ..errors import UnsupportedError
from .base import Block, Family, FamilyOptions
from .keys import KeyView

KEPT_CHILDREN = ("nonlinear",)
"""Children of a block that stay in the deploy form (DiverseBranchBlock's ACBlock)."""
NONLINEAR_NOTE = (
    "nonlinear kept after the fused conv; the upstream ACBlock's deploy forward returns "
    "fused_conv(x) and skips it, so its deploy model differs unless that forward is patched"
)


def _check_asymmetric_shapes(where: str, square: Map, ver: Map, hor: Map) -> None:
    kh, kw = square.kernel_size
    for label, branch, expected, kind in (("ver_conv", ver, (kh, 1), "vertical"), ("hor_conv", hor, (1, kw), "horizontal")):
        if branch.kernel_size != expected:
            raise UnsupportedError(
                f"{where}: {label} has a {branch.kernel_size[0]}x{branch.kernel_size[1]} kernel; ACNet's {kind} "
                f"branch is {expected[0]}x{expected[1]} for a {kh}x{kw} square kernel"
            )


def _crop_of(module: nn.Module, branch: str, where: str) -> tuple[int, int]:
    """Rows and columns the ``ver``/``hor`` branch crops from each side of its input."""
    crop = getattr(module, "crop", None)
    if isinstance(crop, int) and not isinstance(crop, bool):
        if crop < 0:
            raise UnsupportedError(f"{where}.crop is {crop}; a crop cannot be negative")
        # the vertical (k×1) branch loses columns, the horizontal (1×k) one loses rows
        return (0, crop) if branch == "ver" else (crop, 0)
    layer = getattr(module, f"{branch}_conv_crop_layer", None)
    if layer is None or isinstance(layer, nn.Identity):
        return (0, 0)
    rows, cols = getattr(layer, "rows_to_crop", None), getattr(layer, "cols_to_crop", None)
    if not isinstance(rows, int) or not isinstance(cols, int) or rows < 0 or cols < 0:
        raise UnsupportedError(
            f"{where}.{branch}_conv_crop_layer is a {type(layer).__name__} without non-negative "
            "rows_to_crop/cols_to_crop; cannot tell how it aligns the branch"
        )
    return (rows, cols)


def _aligned(v, square: nn.Conv2d, branch: str, value: Map) -> Map:
    """A live ``ver``/``hor`` branch with its crop as a negative padding (the reference forward
    crops its input), refused unless its taps then sit on the square kernel's centre."""
    label, conv = f"{branch}_conv", v.get(f"{branch}_conv")
    crop = _crop_of(v.module, branch, v.where)
    term = value.convs[0]
    padding = (term.padding[0] - crop[0], term.padding[1] - crop[1])
    k = square.kernel_size
    expected = tuple(int(square.padding[d]) - int(square.dilation[d]) * (int(k[d]) - term.kernel_size[d]) // 2
                     for d in range(2))
    if padding != expected:
        raise UnsupportedError(
            f"{v.where}.{label}: its effective padding {padding} (padding minus crop) does not "
            f"line up with {v.where}.square_conv (padding {tuple(square.padding)}, "
            f"dilation {tuple(square.dilation)}); expected {expected}"
        )
    for attribute in ("stride", "groups", "padding_mode"):
        if getattr(square, attribute) != getattr(conv, attribute):
            raise UnsupportedError(f"{v.where}.{label} and square_conv differ in {attribute}")
    return replace(value, convs=(replace(term, padding=padding),), padding=padding)


class ACNetBlock(Family):
    name = "acnet"
    title = "ACNet ACBlock"
    source = "DingXiaoH/ACNet acnet/acb.py (ICCV 2019); DingXiaoH/DiverseBranchBlock acb.py"
    anchor = "square_conv.weight"
    deploy_anchor = "fused_conv.weight"
    parts = ("square_conv", "square_bn", "ver_conv", "ver_bn", "hor_conv", "hor_bn", "last_bn",
             "ver_conv_crop_layer", "hor_conv_crop_layer")
    deploy = "fused_conv"
    deploy_flags = {"deploy": True}
    train_keys = "square_conv, square_bn, ver_conv (kx1), ver_bn, hor_conv (1xk), hor_bn, [last_bn]"
    deploy_keys = "fused_conv.{weight,bias}"
    after_sum = "last_bn (folded); DiverseBranchBlock's nonlinear - kept"
    default_eps = 1e-5

    def expression(self, v) -> Map | None:
        if not (v.has("ver_conv.weight") and v.has("hor_conv.weight")):
            return None
        square, ver, hor = (v.conv_bn(f"{b}_conv", f"{b}_bn") for b in ("square", "ver", "hor"))
        _check_asymmetric_shapes(v.where if v.tree == "key" else f"block {v.where}", square, ver, hor)
        if v.tree == "module":
            ver, hor = _aligned(v, v.get("square_conv"), "ver", ver), _aligned(v, v.get("square_conv"), "hor", hor)
            nonlinear = v.get("nonlinear")
            if isinstance(nonlinear, nn.Module) and not isinstance(nonlinear, nn.Identity):
                v.note(NONLINEAR_NOTE)
        total = plus(square, ver, hor)
        return then(total, v.bn("last_bn")) if v.has_any("last_bn") else total

    def parse_keys(self, view: KeyView, options: FamilyOptions) -> Block | None:
        """An ACBlock is a leaf: every key under it is a branch's (a stray one is refused), except
        what its deploy form keeps (nonlinear) and a deploy conv, which convert reports as a
        half-converted file. ``parts`` cannot say "all but these"."""
        block = super().parse_keys(view, options)
        if block is None:
            return None
        owned = view.owned_under("") - view.owned_under(*KEPT_CHILDREN, "fused_conv")
        return self.finish_key_block(view, owned, block.branches, block.deploy_prefix, block.eps_note,
                                     block.dtype, block.notes)

    def matches_module(self, module: nn.Module) -> bool:
        convs = all(isinstance(getattr(module, c, None), nn.Conv2d) for c in ("square_conv", "ver_conv", "hor_conv"))
        norms = all(isinstance(getattr(module, b, None), nn.Module) for b in ("square_bn", "ver_bn", "hor_bn"))
        return convs and norms
