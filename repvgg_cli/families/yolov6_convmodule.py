"""YOLOv6's ConvModule (conv + BN), folded as YOLOv6's ``fuse_model`` folds it.

Follows meituan/YOLOv6 ``yolov6/layers/common.py`` (``ConvModule``: ``conv`` without bias, ``bn``,
an optional ``act``; ``forward_fuse`` skips ``bn``; ``ConvBNReLU`` / ``ConvBNSiLU`` / ``ConvBN`` /
``ConvBNHS`` hold it as ``block``) and ``yolov6/utils/torch_utils.py`` (``fuse_model``: every
ConvModule that still has ``bn`` gets a new biased conv equal to conv then BN, ``bn`` is deleted,
``forward = forward_fuse``; ``initialize_weights`` builds every BN with eps 1e-3).

YOLOv6's deploy path (export, evaluation, inference) runs ``fuse_model`` and then
``switch_to_deploy`` on every RepVGGBlock, so the deploy form YOLOv6 users load has every
ConvModule folded, not only the re-parameterizable blocks.

Key tree: ``X.block.conv.weight`` + ``X.block.bn.*`` becomes ``X.block.conv.weight`` +
``X.block.conv.bias``. Any conv+BN pair has that layout, so the family is switched on only inside a
model recognised as YOLOv6 (:mod:`.architectures`), and only for a module named ``block`` (the
ConvBN* wrappers' attribute; the ConvModules inside RepVGGBlock / QARepVGGBlock are those blocks'
branches). A ConvModule already folded (``conv.bias``, no ``bn``) is left as it is.

Module tree: a module of class ``ConvModule`` with ``conv``, ``bn`` and ``forward_fuse`` (what
``fuse_model`` picks by class), wherever it sits outside a re-parameterizable block; switched as
``fuse_model`` switches it.
"""

from __future__ import annotations

from torch import nn

from ..algebra.maps import Map
from ..fusion.values import FusedConv
from .base import Family
from .modules import conv_from_fused, is_batch_norm


class Yolov6ConvModule(Family):
    name = "yolov6_convmodule"
    title = "YOLOv6 ConvModule (conv+BN in ConvBNReLU/ConvBNSiLU/ConvBN/ConvBNHS)"
    source = "meituan/YOLOv6 yolov6/layers/common.py ConvModule; yolov6/utils/torch_utils.py fuse_model"
    anchor = "conv.weight"
    parts = ("conv", "bn")
    deploy = "conv"
    only_in = ("yolov6",)
    default_eps = 1e-3
    train_keys = "block.conv (no bias), block.bn"
    deploy_keys = "block.conv.{weight,bias}"
    after_sum = "act (ReLU/SiLU/Hardswish or none) - kept"

    def expression(self, v) -> Map | None:
        if v.tree == "key":
            if v.prefix.rpartition(".")[2] != "block":
                return None  # a RepVGGBlock / QARepVGGBlock branch, or a conv+BN of something else
            if not (v.has("bn.running_var") or v.has("bn.running_mean")):
                return None  # already folded by fuse_model, or a plain conv
        return v.conv_bn("conv", "bn")

    def matches_module(self, module: nn.Module) -> bool:
        return (type(module).__name__ == "ConvModule" and callable(getattr(module, "forward_fuse", None))
                and isinstance(getattr(module, "conv", None), nn.Conv2d)
                and is_batch_norm(getattr(module, "bn", None)))

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        # The fused conv keeps the train conv's name (the generic switch would delete it again as a
        # part); then what fuse_model does: bn deleted, the conv frozen, forward = forward_fuse.
        module.conv = conv_from_fused(fused, like=module.conv.weight).requires_grad_(False)
        del module.bn
        module.forward = module.forward_fuse
        return module
