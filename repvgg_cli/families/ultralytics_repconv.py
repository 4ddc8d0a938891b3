"""ultralytics' RepConv (RT-DETR, YOLOv8/v9 RepC3 / RepNCSPELAN4 blocks).

Follows ultralytics/ultralytics ``ultralytics/nn/modules/conv.py``, class ``RepConv`` (after
RepVGG, Ding et al., CVPR 2021), and the ``fuse`` of ``ultralytics/nn/tasks.py``:

* ``conv1`` = ``Conv(c1, c2, k, s, p, g, act=False)``: ``conv1.conv`` (k×k, no bias) + ``conv1.bn``
* ``conv2`` = ``Conv(c1, c2, 1, s, p - k // 2, g, act=False)``: ``conv2.conv`` + ``conv2.bn``
* ``bn``    = identity BatchNorm2d, only with ``bn=True`` and in == out, stride 1 (usually None)

``forward`` is ``act(conv1(x) + conv2(x) + bn(x))`` with ``act`` SiLU. The deploy form
(``fuse_convs`` + ``forward = forward_fuse``) is one Conv2d with bias at ``conv``; ``conv1``,
``conv2`` and ``bn`` are deleted and ``act`` is kept. ultralytics sets every BN to eps 1e-3
(momentum 0.03) in ``initialize_weights``, so the key tree's default eps is 1e-3.

Telling it apart: ultralytics' plain ``Conv`` also has ``.conv``/``.bn`` but no ``conv1``/``conv2``;
``LightConv`` has ``conv1``/``conv2`` in series with a 1×1 ``conv1``; RepConv's ``conv1`` is the
k×k kernel (k > 1) and ``conv2`` the 1×1, both reading the same input (same input channels per
group, same output channels). A state dict cannot tell a fused RepConv (``conv.{weight,bias}``)
from a fused plain ``Conv``, so ``inspect`` does not claim deploy-form blocks of this family.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..algebra.maps import Map, plus
from ..errors import UnsupportedError
from ..fusion.values import FusedConv
from .base import Family
from .modules import is_batch_norm


def is_ultralytics_conv(module: object) -> bool:
    """ultralytics' ``Conv`` in train form: a ``conv`` Conv2d followed by a ``bn`` BatchNorm."""
    return isinstance(getattr(module, "conv", None), nn.Conv2d) and is_batch_norm(getattr(module, "bn", None))


def four_dim(value: object) -> bool:
    return isinstance(value, Tensor) and value.dim() == 4


def odd_square_larger_than_one(kernel: tuple[int, int]) -> bool:
    return kernel[0] == kernel[1] and kernel[0] > 1 and kernel[0] % 2 == 1


def parallel_kxk_and_1x1(big: Tensor, small: Tensor) -> bool:
    """Two conv weights that read the same input: a k×k (k odd, > 1) and a 1×1 with equal outputs."""
    return (
        odd_square_larger_than_one((int(big.shape[2]), int(big.shape[3])))
        and tuple(small.shape[2:]) == (1, 1)
        and big.shape[0] == small.shape[0]
        and big.shape[1] == small.shape[1]
    )


def switch_forward_to_fused(module: nn.Module) -> nn.Module:
    """What ultralytics' ``fuse`` does after fusing: the deploy conv frozen
    (``requires_grad_(False)``) and ``m.forward = m.forward_fuse``, a bound method stored on the
    instance."""
    module.conv.requires_grad_(False)
    module.forward = module.forward_fuse
    return module


class UltralyticsRepConv(Family):
    name = "ultralytics_repconv"
    title = "ultralytics RepConv (RT-DETR, YOLOv8/v9)"
    source = "ultralytics/ultralytics ultralytics/nn/modules/conv.py RepConv; nn/tasks.py fuse"
    anchor = "conv1.conv.weight"
    deploy_anchor = None  # a fused RepConv's conv.{weight,bias} is also what every fused plain Conv has
    parts = ("conv1", "conv2", "bn", "id_tensor")
    deploy = "conv"
    train_keys = "conv1.{conv,bn} (kxk), conv2.{conv,bn} (1x1), [bn (identity BN)]"
    deploy_keys = "conv.{weight,bias}"
    after_sum = "act (SiLU) - kept"
    default_eps = 1e-3

    def expression(self, v) -> Map | None:
        if v.tree == "key":  # look-alikes (the module tree tells them apart in matches_module)
            if not v.has("conv2.conv.weight") or v.has_any("conv"):
                return None  # no 1x1 branch, or a `conv` beside conv1 (e.g. RepVGGDW): not a RepConv
            big, small = v.state[v.key("conv1.conv.weight")], v.state[v.key("conv2.conv.weight")]
            if four_dim(big) and four_dim(small) and not parallel_kxk_and_1x1(big, small):
                return None  # e.g. LightConv: a 1x1 conv1 then a kxk conv2, in series
        else:  # plus() would refuse too, without naming the convs
            c1, c2 = v.get("conv1.conv"), v.get("conv2.conv")
            if (c1.stride, c1.groups) != (c2.stride, c2.groups):
                raise UnsupportedError(f"{v.where}: conv1 has stride {c1.stride}, groups {c1.groups} but conv2 has "
                                       f"stride {c2.stride}, groups {c2.groups}; the branches cannot be summed")
        identity = v.identity_bn("bn")
        return plus(v.conv_bn("conv1.conv", "conv1.bn"), v.conv_bn("conv2.conv", "conv2.bn"),
                    *([identity] if identity is not None else []))

    def matches_module(self, module: nn.Module) -> bool:
        conv1, conv2 = getattr(module, "conv1", None), getattr(module, "conv2", None)
        if not (is_ultralytics_conv(conv1) and is_ultralytics_conv(conv2)):
            return False
        if isinstance(getattr(module, "conv", None), nn.Module) or not callable(getattr(module, "forward_fuse", None)):
            return False
        return parallel_kxk_and_1x1(conv1.conv.weight, conv2.conv.weight)

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        """Beyond the declaration: ``fuse`` also deletes a leftover ``nm`` and switches ``forward``."""
        super().to_deploy_module(module, fused)
        if hasattr(module, "nm"):
            delattr(module, "nm")
        return switch_forward_to_fused(module)
