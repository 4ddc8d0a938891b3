"""ultralytics' RepVGGDW (YOLOv10's large-kernel depthwise block, inside ``CIB`` with ``lk=True``).

Follows ultralytics/ultralytics ``ultralytics/nn/modules/block.py``, class ``RepVGGDW`` (Wang et al.,
"YOLOv10: Real-Time End-to-End Object Detection", 2024), and the ``fuse`` of ``nn/tasks.py``:

* ``conv``  = ``Conv(ed, ed, 7, 1, 3, g=ed, act=False)``: ``conv.conv`` (7×7 depthwise) + ``conv.bn``
* ``conv1`` = ``Conv(ed, ed, 3, 1, 1, g=ed, act=False)``: ``conv1.conv`` (3×3 depthwise) + ``conv1.bn``

``forward`` is ``act(conv(x) + conv1(x))`` with ``act`` SiLU; there is no identity branch.
``RepVGGDW.fuse`` folds both BNs, adds the centred 3×3 into the 7×7 and puts that plain Conv2d
(with bias) at ``conv``, then deletes ``conv1``; ``tasks.py`` switches ``forward`` to
``forward_fuse`` (``act(conv(x))``). Deploy keys: ``conv.weight``, ``conv.bias``. BN eps 1e-3
(ultralytics' ``initialize_weights``) is the key tree's default.

Telling it apart: a ``conv`` and a ``conv1`` ultralytics ``Conv`` (no ``conv2``: that is RepConv),
both depthwise, ``conv``'s kernel larger than ``conv1``'s. The fused ``conv.{weight,bias}`` looks like
any fused depthwise ``Conv``, so ``inspect`` does not claim deploy-form blocks of this family.
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor, nn

from ..algebra.maps import Map, plus
from ..errors import UnsupportedError
from ..fusion.values import FusedConv
from .base import Family
from .modules import conv_from_fused
from .ultralytics_repconv import four_dim, is_ultralytics_conv, switch_forward_to_fused


def _odd_square(weight: Tensor) -> bool:
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    return kh == kw and kh % 2 == 1


def large_and_small_depthwise(large: Tensor, small: Tensor) -> bool:
    """A larger and a smaller odd square depthwise kernel (one input channel each) with equal outputs."""
    return (
        _odd_square(large)
        and _odd_square(small)
        and large.shape[2] > small.shape[2]
        and large.shape[1] == 1
        and small.shape[1] == 1
        and large.shape[0] == small.shape[0]
    )


class UltralyticsRepVGGDW(Family):
    name = "ultralytics_repvggdw"
    title = "ultralytics RepVGGDW (YOLOv10)"
    source = "ultralytics/ultralytics ultralytics/nn/modules/block.py RepVGGDW; nn/tasks.py fuse"
    anchor = "conv1.conv.weight"
    deploy_anchor = None  # a fused RepVGGDW's conv.{weight,bias} is also what a fused depthwise Conv has
    parts = ("conv", "conv1")
    deploy = "conv"
    train_keys = "conv.{conv,bn} (7x7 depthwise), conv1.{conv,bn} (3x3 depthwise)"
    deploy_keys = "conv.{weight,bias}"
    after_sum = "act (SiLU) - kept"
    default_eps = 1e-3

    def expression(self, v) -> Map | None:
        if v.tree == "key":  # look-alikes (the module tree tells them apart in matches_module)
            if not v.has("conv.conv.weight") or v.has_any("conv2"):
                return None  # RepConv has conv1/conv2 and no `conv`
            large, small = v.state[v.key("conv.conv.weight")], v.state[v.key("conv1.conv.weight")]
            if not (four_dim(large) and four_dim(small) and large_and_small_depthwise(large, small)):
                return None
        elif v.get("conv.conv").stride != v.get("conv1.conv").stride:  # plus() would refuse too, without names
            raise UnsupportedError(f"{v.where}: conv has stride {v.get('conv.conv').stride} but conv1 has "
                                   f"{v.get('conv1.conv').stride}; the branches cannot be summed")
        large = v.conv_bn("conv.conv", "conv.bn")
        if v.tree == "key":  # a state dict stores no groups: RepVGGDW is depthwise, ed -> ed
            channels = int(large.convs[0].weight.shape[0])
            large = replace(large, groups=channels, in_channels=channels)
        return plus(large, v.conv_bn("conv1.conv", "conv1.bn"))

    def matches_module(self, module: nn.Module) -> bool:
        main, side = getattr(module, "conv", None), getattr(module, "conv1", None)
        if not (is_ultralytics_conv(main) and is_ultralytics_conv(side)):
            return False
        if isinstance(getattr(module, "conv2", None), nn.Module) or not callable(getattr(module, "forward_fuse", None)):
            return False
        large, small = main.conv, side.conv
        depthwise = all(c.groups == c.in_channels == c.out_channels for c in (large, small))
        return depthwise and large_and_small_depthwise(large.weight, small.weight)

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        """What ``RepVGGDW.fuse`` + ``tasks.py`` leave: the fused conv takes the place of the train
        ``conv`` (itself a part, so the generic set-then-delete cannot do it), ``conv1`` is deleted
        and ``forward`` switched."""
        module.conv = conv_from_fused(fused, like=module.conv.conv.weight)
        del module.conv1
        return switch_forward_to_fused(module)
