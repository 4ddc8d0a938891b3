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

import dataclasses

from torch import nn

from ..errors import UnsupportedError
from ..fusion import Branches, ConvBranch, FusedConv
from .base import (
    Block,
    Family,
    FamilyOptions,
    KeyView,
    bn_from_keys,
    bn_from_module,
    conv_branch_from_keys,
    conv_branch_from_module,
    conv_from_fused,
    geometry_from_conv,
    is_batch_norm,
    join,
    source_dtype,
)

BRANCH_MODULES = ("square_conv", "square_bn", "ver_conv", "ver_bn", "hor_conv", "hor_bn", "last_bn")
CROP_MODULES = ("ver_conv_crop_layer", "hor_conv_crop_layer")
KEPT_CHILDREN = ("nonlinear",)
"""Children of a block that stay in the deploy form (DiverseBranchBlock's ACBlock)."""
NONLINEAR_NOTE = (
    "nonlinear kept after the fused conv; the upstream ACBlock's deploy forward returns "
    "fused_conv(x) and skips it, so its deploy model differs unless that forward is patched"
)


def _check_asymmetric_shapes(where: str, square: ConvBranch, ver: ConvBranch, hor: ConvBranch) -> None:
    kh, kw = square.kernel_size
    if ver.kernel_size != (kh, 1):
        raise UnsupportedError(
            f"block {where}: ver_conv has a {ver.kernel_size[0]}x{ver.kernel_size[1]} kernel; "
            f"ACNet's vertical branch is {kh}x1 for a {kh}x{kw} square kernel"
        )
    if hor.kernel_size != (1, kw):
        raise UnsupportedError(
            f"block {where}: hor_conv has a {hor.kernel_size[0]}x{hor.kernel_size[1]} kernel; "
            f"ACNet's horizontal branch is 1x{kw} for a {kh}x{kw} square kernel"
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


def _asymmetric_branch(module: nn.Module, branch: str, where: str) -> tuple[ConvBranch, tuple[int, int]]:
    """The ``ver``/``hor`` branch and its effective padding (a crop is a negative padding)."""
    conv = getattr(module, f"{branch}_conv")
    parsed = conv_branch_from_module(conv, getattr(module, f"{branch}_bn"), f"{where}.{branch}_conv")
    crop = _crop_of(module, branch, where)
    assert parsed.padding is not None
    effective = (parsed.padding[0] - crop[0], parsed.padding[1] - crop[1])
    return parsed, effective


def _aligned_padding(square: nn.Conv2d, kernel: tuple[int, int]) -> tuple[int, int]:
    """The padding that puts a smaller kernel's taps on the square kernel's centre."""
    k = square.kernel_size
    return tuple(
        int(square.padding[d]) - int(square.dilation[d]) * (int(k[d]) - kernel[d]) // 2 for d in range(2)
    )


class ACNetBlock(Family):
    name = "acnet"
    title = "ACNet ACBlock"
    source = "DingXiaoH/ACNet acnet/acb.py (ICCV 2019); DingXiaoH/DiverseBranchBlock acb.py"
    anchor = "square_conv.weight"
    deploy_anchor = "fused_conv.weight"
    train_keys = "square_conv, square_bn, ver_conv (kx1), ver_bn, hor_conv (1xk), hor_bn, [last_bn]"
    deploy_keys = "fused_conv.{weight,bias}"
    after_sum = "last_bn (folded); DiverseBranchBlock's nonlinear - kept"
    default_eps = 1e-5

    def parse_keys(self, view: KeyView, options: FamilyOptions) -> Block | None:
        if not (view.has("ver_conv.weight") and view.has("hor_conv.weight")):
            return None
        eps, eps_note = self.eps(options)
        square = conv_branch_from_keys(view, "square_conv", "square_bn", eps)
        ver = conv_branch_from_keys(view, "ver_conv", "ver_bn", eps)
        hor = conv_branch_from_keys(view, "hor_conv", "hor_bn", eps)
        _check_asymmetric_shapes(view.prefix or "<root>", square, ver, hor)
        post_bn = bn_from_keys(view, "last_bn", eps) if view.has_any("last_bn") else None
        # An ACBlock is a leaf: everything under it is a branch, except what its deploy form
        # keeps (nonlinear) and a deploy conv, which convert reports as a half-converted file.
        kept = view.owned_under(*KEPT_CHILDREN, "fused_conv")
        return self.finish_key_block(
            view,
            owned=view.owned_under("") - kept,
            branches=Branches(convs=(square, ver, hor), post_bn=post_bn),
            deploy_prefix=join(view.prefix, "fused_conv"),
            eps_note=eps_note,
            dtype=source_dtype(square.weight),
        )

    def matches_module(self, module: nn.Module) -> bool:
        convs = all(isinstance(getattr(module, c, None), nn.Conv2d) for c in ("square_conv", "ver_conv", "hor_conv"))
        norms = all(isinstance(getattr(module, b, None), nn.Module) for b in ("square_bn", "ver_bn", "hor_bn"))
        return convs and norms

    def parse_module(self, name: str, module: nn.Module, options: FamilyOptions) -> Block:
        where = name or "<root>"
        square_conv: nn.Conv2d = module.square_conv
        square = conv_branch_from_module(square_conv, module.square_bn, f"{where}.square_conv")
        ver, ver_padding = _asymmetric_branch(module, "ver", where)
        hor, hor_padding = _asymmetric_branch(module, "hor", where)
        _check_asymmetric_shapes(where, square, ver, hor)
        geometry = geometry_from_conv(square_conv)
        for label, branch, padding in (("ver_conv", ver, ver_padding), ("hor_conv", hor, hor_padding)):
            expected = _aligned_padding(square_conv, branch.kernel_size)
            if padding != expected:
                raise UnsupportedError(
                    f"{where}.{label}: its effective padding {padding} (padding minus crop) does not "
                    f"line up with {where}.square_conv (padding {tuple(square_conv.padding)}, "
                    f"dilation {tuple(square_conv.dilation)}); expected {expected}"
                )
            for attribute in ("stride", "groups", "padding_mode"):
                if getattr(module.square_conv, attribute) != getattr(getattr(module, label), attribute):
                    raise UnsupportedError(f"{where}.{label} and square_conv differ in {attribute}")
        # A crop is a negative padding: the reference forward crops the input for it.
        convs = (square, dataclasses.replace(ver, padding=ver_padding), dataclasses.replace(hor, padding=hor_padding))
        last_bn = getattr(module, "last_bn", None)
        post_bn = None
        if last_bn is not None:
            if not is_batch_norm(last_bn):
                raise UnsupportedError(f"{where}.last_bn is a {type(last_bn).__name__}, not a BatchNorm")
            post_bn = bn_from_module(last_bn, f"{where}.last_bn")
        nonlinear = getattr(module, "nonlinear", None)
        notes = (NONLINEAR_NOTE,) if isinstance(nonlinear, nn.Module) and not isinstance(nonlinear, nn.Identity) else ()
        return Block(
            name=name,
            family=self.name,
            branches=Branches(convs=convs, post_bn=post_bn, **geometry),
            source_keys=self.module_keys(name, module, *BRANCH_MODULES),
            deploy_prefix=join(name, "fused_conv"),
            dtype=source_dtype(square_conv.weight),
            notes=notes,
        )

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        module.fused_conv = conv_from_fused(fused, like=module.square_conv.weight)
        for child in BRANCH_MODULES + CROP_MODULES:
            if hasattr(module, child):
                delattr(module, child)
        module.deploy = True
        return module
