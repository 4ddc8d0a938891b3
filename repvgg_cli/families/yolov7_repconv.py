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

from ..algebra.maps import Map, plus
from .base import Family
from .modules import is_batch_norm


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
    deploy_anchor = None  # rbr_reparam.* is official RepVGG's deploy form too: inspect reports it there
    parts = ("rbr_dense", "rbr_1x1", "rbr_identity", "id_tensor")
    deploy = "rbr_reparam"
    # what fuse_repvgg_block leaves: the branch attributes None
    deploy_flags = {"rbr_dense": None, "rbr_1x1": None, "rbr_identity": None, "deploy": True}
    train_keys = "rbr_dense.{0 (conv),1 (bn)}, rbr_1x1.{0,1}, [rbr_identity (BN)]"
    deploy_keys = "rbr_reparam.{weight,bias}"
    after_sum = "act (SiLU) - kept"
    default_eps = 1e-3

    def expression(self, v) -> Map | None:
        if not v.has("rbr_1x1.0.weight"):
            return None
        identity = v.identity_bn("rbr_identity")
        return plus(v.conv_bn("rbr_dense.0", "rbr_dense.1"), v.conv_bn("rbr_1x1.0", "rbr_1x1.1"),
                    *([identity] if identity is not None else []))

    def matches_module(self, module: nn.Module) -> bool:
        return _is_indexed_conv_bn(getattr(module, "rbr_dense", None)) and _is_indexed_conv_bn(
            getattr(module, "rbr_1x1", None)
        )
