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

from ..errors import UnsupportedError
from ..fusion import Branches, FusedConv, IdentityBranch
from .base import (
    Block,
    Family,
    FamilyOptions,
    KeyView,
    bn_from_module,
    conv_branch_from_module,
    conv_from_fused,
    geometry_from_conv,
    is_batch_norm,
    join,
    source_dtype,
)

BRANCHES = ("branch_3x3", "branch_1x1", "branch_norm")
SE_NOTE = (
    "se_layer kept after the fused conv; stock mmpretrain's deploy forward returns "
    "act(branch_reparam(x)) and skips se_layer, so its deploy model differs from the train form "
    "unless that forward is patched"
)


def _conv_then_norm(module: nn.Module | None) -> bool:
    return isinstance(getattr(module, "conv", None), nn.Conv2d) and isinstance(
        getattr(module, "norm", None), nn.Module
    )


class MmpretrainRepVGG(Family):
    name = "mmpretrain"
    title = "mmpretrain / mmcls RepVGGBlock"
    source = "open-mmlab/mmpretrain mmpretrain/models/backbones/repvgg.py (RepVGGBlock)"
    anchor = "branch_3x3.conv.weight"
    deploy_anchor = "branch_reparam.weight"
    train_keys = "branch_3x3.{conv,norm}, branch_1x1.{conv,norm}, [branch_norm (BN)]"
    deploy_keys = "branch_reparam.{weight,bias}"
    after_sum = "se_layer (skipped by upstream's deploy forward), then act - kept"
    default_eps = 1e-5

    def parse_keys(self, view: KeyView, options: FamilyOptions) -> Block | None:
        if not view.has("branch_1x1.conv.weight"):
            return None
        return self.parse_dense_point_identity(
            view, options, ("branch_3x3.conv", "branch_3x3.norm"), ("branch_1x1.conv", "branch_1x1.norm"), "branch_norm",
            deploy_leaf="branch_reparam", owned=BRANCHES, notes=(SE_NOTE,) if view.has_any("se_layer") else (),
        )

    def matches_module(self, module: nn.Module) -> bool:
        return _conv_then_norm(getattr(module, "branch_3x3", None)) and _conv_then_norm(
            getattr(module, "branch_1x1", None)
        )

    def parse_module(self, name: str, module: nn.Module, options: FamilyOptions) -> Block:
        where = name or "<root>"
        dense = conv_branch_from_module(module.branch_3x3.conv, module.branch_3x3.norm, f"{where}.branch_3x3")
        point = conv_branch_from_module(module.branch_1x1.conv, module.branch_1x1.norm, f"{where}.branch_1x1")
        identity_module = getattr(module, "branch_norm", None)
        identity = None
        if is_batch_norm(identity_module):
            identity = IdentityBranch(bn=bn_from_module(identity_module, f"{where}.branch_norm"))
        elif identity_module is not None:
            raise UnsupportedError(
                f"{where}.branch_norm is a {type(identity_module).__name__}; mmpretrain only "
                "re-parameterizes blocks whose norm is BN"
            )
        se = getattr(module, "se_layer", None)
        notes = (SE_NOTE,) if isinstance(se, nn.Module) and not isinstance(se, nn.Identity) else ()
        branches = Branches(
            convs=(dense, point), identity=identity, **geometry_from_conv(module.branch_3x3.conv)
        )
        return Block(
            name=name,
            family=self.name,
            branches=branches,
            source_keys=self.module_keys(name, module, *BRANCHES),
            deploy_prefix=join(name, "branch_reparam"),
            dtype=source_dtype(module.branch_3x3.conv.weight),
            notes=notes,
        )

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        module.branch_reparam = conv_from_fused(fused, like=module.branch_3x3.conv.weight)
        for branch in BRANCHES:
            if hasattr(module, branch):
                delattr(module, branch)
        module.deploy = True
        return module
