"""timm's EfficientViM: its conv+BN layers and its (gated) depthwise residuals.

Follows huggingface/pytorch-image-models ``timm/models/efficientvim.py`` (Lee et al.,
"EfficientViM: Efficient Vision Mamba with Hidden State Mixer based State Space Duality",
CVPR 2025). ``timm.utils.reparameterize_model`` needs an eval model and performs:

``timm_efficientvim_conv`` — ``ConvLayer2d.fuse``: ``conv`` (no bias) then ``norm`` (a BN) become
``conv`` with a bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``), ``norm`` is set to None; the
activation stays. Sites: ``patch_embed.conv.{i}``, ``stages.N.blocks.M.ffn.fc{1,2}``,
``stages.N.downsample.conv.{0,1,3}``. The same ``conv``/``norm`` layout is timm's generic
``ConvNormAct`` elsewhere (NextViT keeps its pairs), so this family is switched on only inside the
``efficientvim`` architecture (see :mod:`.architectures`).

``timm_efficientvim_dwconv`` — ``EfficientViMBlock.fuse`` and ``PatchMerging.fuse``: the depthwise
``dwconv1``/``dwconv2`` (ConvLayer2d, 3×3, stride 1, no activation) sit in a residual. In a block it
is gated by ``a = sigmoid(alpha[i])`` (``i`` = 0 for dwconv1, 2 for dwconv2; ``alpha`` a ``(4, C)``
parameter): ``x + a * (bn(dw(x)) - x)``, i.e. ``plus(then(dw, bn, scale(a)), then(identity,
scale(1 - a)))``; in PatchMerging it is ``x + bn(dw(x))``. Deploy: ``dwconv{1,2}.conv`` with a bias,
``norm`` None, and the block's Python flag ``fused`` set True (its forward then skips the
residual). ``alpha`` stays in the state dict (rows 1 and 3 still gate the mixer and the FFN): it is
read, not owned. Each dwconv is a site of its block (:mod:`.timm_sites`), matched at the child.

A deploy state dict loads only into a model whose ``fused`` flags are True and whose ``norm``
modules are None, i.e. a reparameterized one: the flag is not in the state dict, as for every
``fuse`` of timm. ``ConvLayer1d`` (Conv1d) with a BN never occurs in timm's EfficientViM (its
Conv1d layers have ``norm=None``); one is refused rather than guessed.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..algebra import maps
from ..algebra.maps import Map, plus, then
from ..errors import InputError, UnsupportedError
from ..fusion.values import FusedConv
from .base import Family
from .keys import join
from .modules import conv_from_fused, is_batch_norm
from .timm_repvgg import _check_plain_conv
from .timm_sites import SITES, ChildSite, borrowed

DWCONVS = ("dwconv1", "dwconv2")
GATE_ROW = {"dwconv1": 0, "dwconv2": 2}
"""The row of ``alpha`` gating each dwconv (rows 1 and 3 gate the mixer and the FFN)."""
_DWCONV_KEY = re.compile(r"^(?:(.*)\.)?(dwconv[12])\.norm\.running_var$")


def _is_conv_layer(module: object) -> bool:
    """timm's ``ConvLayer2d`` in train form: a Conv2d ``conv`` then a BN ``norm``."""
    return (type(module).__name__ == "ConvLayer2d" and isinstance(getattr(module, "conv", None), nn.Conv2d)
            and is_batch_norm(getattr(module, "norm", None)))


def _residual_block_keys(present, block: str) -> bool:
    """An EfficientViMBlock (``alpha``) or a PatchMerging (its ``conv`` Sequential) at ``block``."""
    return join(block, "alpha") in present or join(block, "conv.0.conv.weight") in present


def _residual_block(module: nn.Module) -> bool:
    return (type(module).__name__ in ("EfficientViMBlock", "PatchMerging") and getattr(module, "fused", None) is False
            and all(_is_conv_layer(getattr(module, d, None)) for d in DWCONVS))


class TimmEfficientVimConv(Family):
    name = "timm_efficientvim_conv"
    title = "timm EfficientViM ConvLayer2d (conv + BN)"
    source = "huggingface/pytorch-image-models timm/models/efficientvim.py ConvLayer2d.fuse (EfficientViM, CVPR 2025)"
    anchor = "norm.running_var"
    parts = ("conv", "norm")
    deploy = "conv"
    only_in = ("efficientvim",)
    train_keys = "conv.weight (no bias), norm (BN)"
    deploy_keys = "conv.{weight,bias}; norm None"
    after_sum = "act - kept"

    def expression(self, v) -> Map | None:
        if v.tree == "key":
            parent, _, leaf = v.prefix.rpartition(".")
            if leaf in DWCONVS and _residual_block_keys(v.state, parent):
                return None  # a residual dwconv: timm_efficientvim_dwconv's
            if not v.has("conv.weight"):
                return None
            if getattr(v.state[v.key("conv.weight")], "ndim", None) == 3:
                raise UnsupportedError(f"{v.where}: a Conv1d with a BatchNorm (ConvLayer1d) is not supported")
        else:
            _check_plain_conv(v.get("conv"), v.label("conv"))
        return v.conv_bn("conv", "norm")

    def matches_module(self, module: nn.Module) -> bool:
        return _is_conv_layer(module) and SITES.lookup(module) is None

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        # As timm's fuse: the conv replaced where it is, norm kept as a None entry (child order as timm's)
        module.conv = conv_from_fused(fused, like=module.conv.weight)
        module.norm = None
        return module


class TimmEfficientVimDwconv(ChildSite):
    name = "timm_efficientvim_dwconv"
    title = "timm EfficientViM depthwise residual (EfficientViMBlock gated by sigmoid(alpha), PatchMerging)"
    source = ("huggingface/pytorch-image-models timm/models/efficientvim.py EfficientViMBlock.fuse, "
              "PatchMerging.fuse, _fuse_depthwise_residual (EfficientViM, CVPR 2025)")
    site_paths = DWCONVS
    only_in = ("efficientvim",)
    train_keys = "dwconv{1,2}.conv.weight (depthwise), dwconv{1,2}.norm (BN); block: alpha (read, kept)"
    deploy_keys = "dwconv{1,2}.conv.{weight,bias}; norm None, the block's fused flag True"
    after_sum = "nothing (the residual is inside the fused conv)"

    def key_sites(self, keys: list[str]) -> list[tuple[str, str]]:
        present = set(keys)
        sites = []
        for key in keys:
            match = _DWCONV_KEY.match(key)
            if match and _residual_block_keys(present, match.group(1) or ""):
                sites.append((match.group(1) or "", match.group(2)))
        return sites

    def block_sites(self, module: nn.Module) -> tuple[str, ...]:
        return DWCONVS if _residual_block(module) else ()

    def deploy_path(self, path: str) -> str:
        return join(path, "conv")

    def expression(self, v) -> Map | None:
        path = v.site
        v.own(path)
        if v.tree == "module":
            conv = v.get(join(path, "conv"))
            _check_plain_conv(conv, v.label(join(path, "conv")))
            if (conv.groups != conv.in_channels or conv.in_channels != conv.out_channels or conv.stride != (1, 1)
                    or conv.dilation != (1, 1)):
                raise UnsupportedError(f"{v.label(path)} is not a depthwise stride-1 undilated conv: its residual "
                                       "cannot go into it")
            if getattr(v.get(path), "act", None) is not None:
                raise UnsupportedError(f"{v.label(path)} has an activation before its residual")
        branch = v.conv_bn(join(path, "conv"), join(path, "norm"))
        if not v.has("alpha"):
            return plus(branch, maps.identity())
        channels = int(branch.convs[0].weight.shape[0])
        alpha = borrowed(v, lambda: v.tensor("alpha"))  # stays in the deploy form
        if not isinstance(alpha, torch.Tensor) or not alpha.is_floating_point() or tuple(alpha.shape) != (4, channels):
            raise InputError(f"{v.where}: alpha has shape {tuple(getattr(alpha, 'shape', ()))}; (4, {channels}) "
                             f"floating-point gates are expected ({path} has {channels} channels)")
        if not bool(torch.isfinite(alpha.detach()).all()):
            raise InputError(f"{v.where}: alpha holds NaN or Inf")
        gate = torch.sigmoid(alpha.detach().to(torch.float64)[GATE_ROW[path]])
        v.note("gate sigmoid(alpha) folded: a * (bn(dw(x)) - x) + x; alpha kept (it gates the mixer and the FFN too)")
        return plus(then(branch, maps.scale(gate)), then(maps.identity(), maps.scale(1.0 - gate)))

    def switch(self, block: nn.Module, path: str, child: nn.Module, fused: FusedConv) -> nn.Module:
        child.conv = conv_from_fused(fused, like=child.conv.weight)
        child.norm = None
        if set(DWCONVS) <= SITES.done(block, path):
            block.fused = True  # timm's forward then skips the (now folded) residual
        return child
