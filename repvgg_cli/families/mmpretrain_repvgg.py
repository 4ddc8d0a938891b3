"""mmpretrain's (formerly mmcls') RepVGGBlock.

Follows open-mmlab/mmpretrain ``mmpretrain/models/backbones/repvgg.py`` (and the same class in
``mmcls/models/backbones/repvgg.py``), an implementation of Ding et al., "RepVGG: Making
VGG-style ConvNets Great Again" (CVPR 2021). A block holds ``branch_3x3`` and ``branch_1x1``
(each a Sequential of ``conv`` and ``norm`` - the BN sits under ``norm``, not ``bn``) and, when
in == out, stride 1 and padding == dilation, a ``branch_norm`` BN as the identity branch. The
branches are summed, then ``se_layer`` (``se_cfg``, e.g. RepVGG-D2se) and ``act`` follow; both
are kept. Deploy form: ``branch_reparam`` (a Conv2d with bias) and ``deploy=True``.

Upstream caveat: in deploy mode mmpretrain's ``forward`` returns ``act(branch_reparam(x))`` and
skips ``se_layer``, so a block built with ``se_cfg`` has no equivalent deploy form in stock
mmpretrain. Such blocks are still fused correctly up to the sum (the SE weights are kept), and
the block carries a note saying so; the whole-model check of the module tree reports the
mismatch instead of hiding it.
"""

from __future__ import annotations

from torch import nn

from ..algebra.maps import Map, plus
from ..errors import UnsupportedError
from .base import Family
from .modules import is_batch_norm

SE_NOTE = (
    "se_layer kept after the fused conv; stock mmpretrain's deploy forward returns "
    "act(branch_reparam(x)) and skips se_layer, so its deploy model differs from the train form "
    "unless that forward is patched"
)


def _conv_then_norm(module: nn.Module | None) -> bool:
    return isinstance(getattr(module, "conv", None), nn.Conv2d) and isinstance(
        getattr(module, "norm", None), nn.Module
    )


def _has_se(v) -> bool:
    if v.tree == "key":
        return v.has_any("se_layer")
    se = v.get("se_layer")
    return isinstance(se, nn.Module) and not isinstance(se, nn.Identity)


class MmpretrainRepVGG(Family):
    name = "mmpretrain"
    title = "mmpretrain / mmcls RepVGGBlock"
    source = "open-mmlab/mmpretrain mmpretrain/models/backbones/repvgg.py (RepVGGBlock)"
    anchor = "branch_3x3.conv.weight"
    deploy_anchor = "branch_reparam.weight"
    parts = ("branch_3x3", "branch_1x1", "branch_norm")
    deploy = "branch_reparam"
    deploy_flags = {"deploy": True}
    train_keys = "branch_3x3.{conv,norm}, branch_1x1.{conv,norm}, [branch_norm (BN)]"
    deploy_keys = "branch_reparam.{weight,bias}"
    after_sum = "se_layer (skipped by upstream's deploy forward), then act - kept"
    default_eps = 1e-5

    def expression(self, v) -> Map | None:
        if not v.has("branch_1x1.conv.weight"):
            return None
        if v.tree == "module" and v.has("branch_norm") and not is_batch_norm(v.get("branch_norm")):
            raise UnsupportedError(f"{v._label('branch_norm')} is a {type(v.get('branch_norm')).__name__}; "
                                   "mmpretrain only re-parameterizes blocks whose norm is BN")
        if _has_se(v):
            v.note(SE_NOTE)
        identity = v.identity_bn("branch_norm")
        return plus(v.conv_bn("branch_3x3.conv", "branch_3x3.norm"), v.conv_bn("branch_1x1.conv", "branch_1x1.norm"),
                    *([identity] if identity is not None else []))

    def matches_module(self, module: nn.Module) -> bool:
        return _conv_then_norm(getattr(module, "branch_3x3", None)) and _conv_then_norm(
            getattr(module, "branch_1x1", None)
        )
