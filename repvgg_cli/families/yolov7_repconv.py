"""YOLOv7's RepConv.

Follows WongKinYiu/yolov7 ``models/common.py``, class ``RepConv`` (Wang, Bochkovskiy and Liao,
"YOLOv7: Trainable bag-of-freebies sets new state-of-the-art for real-time object detectors",
CVPR 2023), itself RepVGG's block (Ding et al., CVPR 2021) with index-named branches:

* ``rbr_dense``  = ``nn.Sequential(Conv2d k×k, BatchNorm2d)``  -> keys ``rbr_dense.0`` / ``rbr_dense.1``
* ``rbr_1x1``    = ``nn.Sequential(Conv2d 1×1, BatchNorm2d)``  -> keys ``rbr_1x1.0`` / ``rbr_1x1.1``
* ``rbr_identity`` = a BatchNorm2d when in == out and stride 1, else None

``forward`` sums the three and applies ``act`` (SiLU by default). The deploy form
(``fuse_repvgg_block`` or ``deploy=True``) is ``rbr_reparam``, a Conv2d with bias; ``act`` is kept
and the branch attributes become None. YOLOv7 builds every BN with ``eps=0.001, momentum=0.03``,
so the key tree's default eps is 1e-3.

Deploy keys (``rbr_reparam.{weight,bias}``) are the same as official RepVGG's, so a deploy-form
state dict cannot tell the two apart: ``inspect`` lists such blocks once, under ``official``.
"""

from __future__ import annotations

from torch import nn

from ..fusion import Branches, FusedConv
from .base import (
    Block,
    Family,
    FamilyOptions,
    KeyView,
    conv_branch_from_module,
    conv_from_fused,
    geometry_from_conv,
    identity_from_module,
    is_batch_norm,
    join,
    source_dtype,
)

BRANCHES = ("rbr_dense", "rbr_1x1", "rbr_identity")


def _is_indexed_conv_bn(module: nn.Module | None) -> bool:
    """``nn.Sequential(Conv2d, BatchNorm)`` with index names ``0``/``1`` (official RepVGG names them conv/bn)."""
    return (
        isinstance(module, nn.Sequential)
        and [name for name, _ in module.named_children()] == ["0", "1"]
        and isinstance(module[0], nn.Conv2d)
        and is_batch_norm(module[1])
    )


class Yolov7RepConv(Family):
    name = "yolov7"
    title = "YOLOv7 RepConv"
    source = "WongKinYiu/yolov7 models/common.py RepConv (Wang et al., CVPR 2023)"
    anchor = "rbr_dense.0.weight"
    deploy_anchor = "rbr_reparam.weight"
    train_keys = "rbr_dense.{0 (conv),1 (bn)}, rbr_1x1.{0,1}, [rbr_identity (BN)]"
    deploy_keys = "rbr_reparam.{weight,bias}"
    after_sum = "act (SiLU) - kept"
    default_eps = 1e-3

    def find_deploy_prefixes(self, keys: list[str]) -> list[str]:
        """None of its own: ``rbr_reparam.*`` is official RepVGG's deploy form too, reported there."""
        return []

    def parse_keys(self, view: KeyView, options: FamilyOptions) -> Block | None:
        if not view.has("rbr_1x1.0.weight"):
            return None
        return self.parse_dense_point_identity(
            view, options, ("rbr_dense.0", "rbr_dense.1"), ("rbr_1x1.0", "rbr_1x1.1"), "rbr_identity",
            deploy_leaf="rbr_reparam", owned=BRANCHES,
        )

    def matches_module(self, module: nn.Module) -> bool:
        return _is_indexed_conv_bn(getattr(module, "rbr_dense", None)) and _is_indexed_conv_bn(
            getattr(module, "rbr_1x1", None)
        )

    def parse_module(self, name: str, module: nn.Module, options: FamilyOptions) -> Block:
        where = name or "<root>"
        dense = conv_branch_from_module(module.rbr_dense[0], module.rbr_dense[1], f"{where}.rbr_dense")
        point = conv_branch_from_module(module.rbr_1x1[0], module.rbr_1x1[1], f"{where}.rbr_1x1")
        identity = identity_from_module(getattr(module, "rbr_identity", None), f"{where}.rbr_identity")
        branches = Branches(convs=(dense, point), identity=identity, **geometry_from_conv(module.rbr_dense[0]))
        return Block(
            name=name,
            family=self.name,
            branches=branches,
            source_keys=self.module_keys(name, module, *BRANCHES),
            deploy_prefix=join(name, "rbr_reparam"),
            dtype=source_dtype(module.rbr_dense[0].weight),
        )

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        """What ``RepConv.fuse_repvgg_block`` leaves: ``rbr_reparam`` set, the branches None."""
        module.rbr_reparam = conv_from_fused(fused, like=module.rbr_dense[0].weight)
        for branch in BRANCHES:
            if hasattr(module, branch):
                delattr(module, branch)
            setattr(module, branch, None)
        if hasattr(module, "id_tensor"):
            delattr(module, "id_tensor")
        if hasattr(module, "deploy"):
            module.deploy = True
        return module
