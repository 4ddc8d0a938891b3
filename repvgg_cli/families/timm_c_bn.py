"""timm's LeViT-descended ``c``/``bn`` conv→BN pair (RepViT ``ConvNorm``, SHViT ``Conv2dNorm``, iFormer
``ConvNorm``), and what the three model files share around it.

Follows huggingface/pytorch-image-models (installed timm 1.0.31):

- ``timm/models/repvit.py`` ``ConvNorm`` (Wang et al., "RepViT: Revisiting Mobile CNN From ViT
  Perspective", CVPR 2024);
- ``timm/models/shvit.py`` ``Conv2dNorm`` (Yun & Ro, "SHViT: Single-Head Vision Transformer with
  Memory Efficient Macro Design", CVPR 2024);
- ``timm/models/iformer.py`` ``ConvNorm`` (Zheng, "iFormer: Integrating ConvNet and Transformer for
  Mobile Application", ICLR 2025).

Each is an ``nn.Sequential`` of ``c`` (a bias-free ``nn.Conv2d``, any kernel, stride, padding and
groups) and ``bn`` (``BatchNorm2d``, eps 1e-5). Its ``fuse()`` returns one ``nn.Conv2d`` with bias
and ``c``'s geometry, which ``timm.utils.reparameterize_model`` puts in the pair's place: train
keys ``<site>.c.weight``, ``<site>.bn.*``; deploy keys ``<site>.weight``, ``<site>.bias``. Math:
``then(conv, bn)``.

``c``/``bn`` is a layout any project may use without folding it, so the family is switched on only
inside the architectures recognised from the whole key layout (``repvit``, ``shvit``, ``iformer`` in
:mod:`.architectures`); in a live model only timm's own three classes are matched.

The helpers here (the depthwise conv of a state dict, timm's ``NormLinear`` head as ``then(bn,
linear)``, the ``nn.Linear`` a head becomes) are shared with :mod:`.timm_repvit`,
:mod:`.timm_shvit` and :mod:`.timm_iformer`.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..algebra.maps import Map, then
from ..errors import UnsupportedError
from ..fusion.values import FusedConv
from .base import Family
from .keys import join
from .modules import is_batch_norm

REPVIT = "timm.models.repvit"
SHVIT = "timm.models.shvit"
IFORMER = "timm.models.iformer"

ARCHITECTURES = ("repvit", "shvit", "iformer")


def is_timm(module: object, file: str, cls: str) -> bool:
    """Exactly timm's class (a subclass may have another forward)."""
    return type(module).__module__ == file and type(module).__name__ == cls


def is_c_bn(module: object) -> bool:
    """One of timm's three ``c``/``bn`` pairs, with exactly a Conv2d ``c`` and a BatchNorm ``bn``."""
    if not (is_timm(module, REPVIT, "ConvNorm") or is_timm(module, SHVIT, "Conv2dNorm")
            or is_timm(module, IFORMER, "ConvNorm")):
        return False
    children = dict(module.named_children())
    return set(children) == {"c", "bn"} and type(children["c"]) is nn.Conv2d and is_batch_norm(children["bn"])


def is_norm_linear(module: object, file: str) -> bool:
    """timm's ``NormLinear`` of ``file``: exactly a BatchNorm ``bn`` and an ``nn.Linear`` ``l``."""
    if not is_timm(module, file, "NormLinear"):
        return False
    children = dict(module.named_children())
    return set(children) == {"bn", "l"} and is_batch_norm(children["bn"]) and type(children["l"]) is nn.Linear


def c_bn(v, local: str, depthwise: bool = False) -> Map:
    """The pair at ``local`` (``<local>.c`` then ``<local>.bn``).

    ``depthwise``: the project builds this conv with ``groups = channels`` (a state dict does not
    store groups; a live conv says its own). A stored weight that is not ``(C, 1, k, k)`` is refused.
    """
    conv = join(local, "c")
    if v.tree == "module" or not depthwise:
        return v.conv_bn(conv, join(local, "bn"))
    weight = v.state.get(v.key(join(conv, "weight")))
    if isinstance(weight, Tensor) and weight.dim() == 4 and int(weight.shape[1]) != 1:
        raise UnsupportedError(
            f"{v.where}: {v.label(join(conv, 'weight'))} has shape {tuple(weight.shape)}; timm builds this conv "
            "depthwise (groups = channels, one input channel per output), and a state dict does not store groups"
        )
    channels = int(weight.shape[0]) if isinstance(weight, Tensor) and weight.dim() == 4 else None
    value = v.conv(conv, groups=channels)
    return then(value, v.bn(join(local, "bn"), channels, f"{v.label(join(conv, 'weight'))} (output channels)"))


def norm_linear(v, local: str) -> Map:
    """timm's ``NormLinear`` at ``local``: ``bn`` (``BatchNorm1d`` over the input features), then ``l``
    (``nn.Linear`` with its bias): ``then(bn, linear)``."""
    linear = v.linear(join(local, "l"))
    in_features = int(linear.convs[0].weight.shape[1])
    return then(v.bn(join(local, "bn"), in_features, f"{v.label(join(local, 'l.weight'))} (input features)"), linear)


def linear_from_fused(fused: FusedConv, like: Tensor) -> nn.Linear:
    """The ``nn.Linear`` a fused head is (what timm's ``NormLinear.fuse`` returns), in ``like``'s
    dtype and device."""
    out_features, in_features = int(fused.weight.shape[0]), int(fused.weight.shape[1])
    linear = nn.Linear(in_features, out_features, bias=True, device="meta")
    linear.weight = nn.Parameter(fused.weight.reshape(out_features, in_features).to(like).clone())
    linear.bias = nn.Parameter(fused.bias.to(like).clone())
    return linear


def linear_shape(value: Map) -> tuple[int, int]:
    """``(out, in)`` of a value that is one linear layer (a 1×1 conv)."""
    weight = value.convs[0].weight
    return int(weight.shape[0]), int(weight.shape[1])


class TimmCBn(Family):
    name = "timm_c_bn"
    title = "timm RepViT / SHViT / iFormer ConvNorm (c, then bn)"
    source = ("huggingface/pytorch-image-models timm/models/repvit.py ConvNorm (RepViT, CVPR 2024), "
              "timm/models/shvit.py Conv2dNorm (SHViT, CVPR 2024), "
              "timm/models/iformer.py ConvNorm (iFormer, ICLR 2025)")
    anchor = "c.weight"
    parts = ("c", "bn")
    deploy = ""
    only_in = ARCHITECTURES
    train_keys = "c.weight (no bias), bn (BatchNorm2d)"
    deploy_keys = "weight, bias (the pair becomes a Conv2d)"
    after_sum = "nothing (a plain pair, no sum)"

    def expression(self, v) -> Map | None:
        if v.tree == "key" and not (v.has("bn.running_var") or v.has("bn.running_mean")):
            return None  # a conv without its BN: not a pair
        return c_bn(v, "")

    def matches_module(self, module: nn.Module) -> bool:
        return is_c_bn(module)

