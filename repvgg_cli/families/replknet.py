"""RepLKNet's ``ReparamLargeKernelConv``, and apple ml-fastvit's copy of it.

Follows DingXiaoH/RepLKNet-pytorch ``replknet.py`` (Ding et al., "Scaling Up Your Kernels to
31x31: Revisiting Large Kernel Design in CNNs", CVPR 2022), class ``ReparamLargeKernelConv``, and
apple/ml-fastvit ``models/modules/replknet.py`` (FastViT's ``PatchEmbed``), which keeps its names.
Train form: ``lkb_origin`` (a ``Sequential`` of ``conv``, a bias-free K×K Conv2d, and ``bn``) plus,
when the block has a small kernel, ``small_conv`` (the same with an S×S kernel, S <= K, padding
S//2), both with the block's stride and groups, summed. Nothing else is inside the block (apple's
forward calls its ``activation`` and throws the result away). Deploy form, as ``merge_kernel``
(RepLKNet) / ``reparameterize`` (apple) leave it: ``lkb_reparam`` (a K×K Conv2d with bias, the
geometry of ``lkb_origin.conv``); ``lkb_origin`` and ``small_conv`` deleted.

RepLKNet's ``structural_reparam`` touches nothing else: the ``conv``/``bn`` pairs around the large
kernel (``pw1``, ``pw2``, the stem, the transitions) and ``prelkb_bn`` keep their train keys in
its deploy model, so they are not fused here either.

The helper :func:`conv_bn_pair` (a ``Sequential`` of exactly a conv and a BN) is shared with the
mmpretrain MobileOne and UniRepLKNet families.
"""

from __future__ import annotations

from torch import nn

from ..algebra.maps import Map, plus
from ..errors import UnsupportedError
from .base import Family
from .keys import join
from .modules import is_batch_norm

PARTS = ("lkb_origin", "small_conv")


def is_conv_bn_pair(module: object, norm: str = "bn") -> bool:
    """A ``Sequential`` (or module) whose children are exactly a ``conv`` Conv2d and a BN named ``norm``."""
    if not isinstance(module, nn.Module):
        return False
    children = dict(module.named_children())
    return (set(children) == {"conv", norm} and isinstance(children["conv"], nn.Conv2d)
            and is_batch_norm(children[norm]))


def conv_bn_pair(v, local: str, norm: str = "bn") -> Map:
    """``<local>.conv`` then ``<local>.<norm>``. A live pair must hold nothing else (a ReLU after
    the BN, as in RepLKNet's ``conv_bn_relu``, would make the branch non-linear) and its conv must
    be a plain Conv2d."""
    if v.tree == "module":
        module = v.get(local)
        if not is_conv_bn_pair(module, norm):
            children = sorted(dict(module.named_children())) if isinstance(module, nn.Module) else []
            raise UnsupportedError(f"{v.where}: {local} is a {type(module).__name__} with children {children}; "
                                   f"a linear branch is exactly a conv and a BatchNorm ({norm})")
        if type(module.conv).forward is not nn.Conv2d.forward:
            raise UnsupportedError(f"{v.where}: {local}.conv is a {type(module.conv).__name__} with its own "
                                   "forward; only a plain Conv2d can be fused")
    return v.conv_bn(join(local, "conv"), join(local, norm))


class RepLKNetLargeKernel(Family):
    name = "replknet"
    title = "RepLKNet ReparamLargeKernelConv (also apple ml-fastvit PatchEmbed)"
    source = ("DingXiaoH/RepLKNet-pytorch replknet.py ReparamLargeKernelConv (CVPR 2022); "
              "apple/ml-fastvit models/modules/replknet.py")
    anchor = "lkb_origin.conv.weight"
    deploy_anchor = "lkb_reparam.weight"
    parts = PARTS
    deploy = "lkb_reparam"
    train_keys = "lkb_origin.{conv,bn}, [small_conv.{conv,bn}]"
    deploy_keys = "lkb_reparam.{weight,bias}"
    after_sum = "nothing (apple's forward discards its activation's result)"

    def expression(self, v) -> Map | None:
        if not v.has_any("lkb_origin.bn"):
            return None  # a bare conv called lkb_origin: not this block
        terms = [conv_bn_pair(v, "lkb_origin")]
        if v.has_any("small_conv"):
            terms.append(conv_bn_pair(v, "small_conv"))
        return plus(*terms)

    def matches_module(self, module: nn.Module) -> bool:
        return is_conv_bn_pair(getattr(module, "lkb_origin", None)) and getattr(module, "lkb_reparam", None) is None
