"""timm's RepVggBlock (the ``repvgg_*`` models of timm's byobnet).

Follows huggingface/pytorch-image-models ``timm/models/byobnet.py``, class ``RepVggBlock``
(after Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021). Train form:
``conv_kxk`` (a ``ConvNormAct``: ``conv`` then ``bn``, a ``BatchNormAct2d`` without activation),
``conv_1x1`` (the same, 1×1) and ``identity`` (a ``BatchNormAct2d``, only when in == out and
stride 1, else None). Forward: ``conv_1x1(x) + conv_kxk(x)``, then ``drop_path`` (a no-op in
eval), plus ``identity(x)``; then ``attn`` (SE or Identity) and ``act``.

Deploy form, as timm's ``RepVggBlock.reparameterize()`` leaves it: ``reparam_conv`` (a Conv2d with
bias, geometry of ``conv_kxk.conv``) set; ``conv_kxk``, ``conv_1x1``, ``identity`` and
``drop_path`` deleted; ``attn`` and ``act`` kept. Deploy keys: ``reparam_conv.{weight,bias}``.

The helpers for timm's ``ConvNormAct`` branches live here and are shared with the MobileOne
families.
"""

from __future__ import annotations

from torch import nn

from ..algebra.maps import Map, plus
from ..errors import UnsupportedError
from .base import Family
from .keys import join
from .modules import is_batch_norm

BRANCHES = ("conv_kxk", "conv_1x1", "identity")
DEPLOY_DELETES = ("conv_kxk", "conv_1x1", "identity", "drop_path")


# -- helpers shared with the MobileOne families ------------------------------------------------


def is_conv_norm(module: object) -> bool:
    """A ``ConvNormAct``-like pair: a ``conv`` Conv2d child and a ``bn`` child (BN, or empty)."""
    if not isinstance(module, nn.Module) or not isinstance(getattr(module, "conv", None), nn.Conv2d):
        return False
    bn = getattr(module, "bn", None)
    return is_batch_norm(bn) or isinstance(bn, (nn.Identity, nn.Sequential))


def _check_plain_conv(conv: nn.Conv2d, where: str) -> None:
    if type(conv).forward is not nn.Conv2d.forward:
        raise UnsupportedError(
            f"{where} is a {type(conv).__name__} with its own forward (e.g. timm's Conv2dSame, "
            "dynamic 'same' padding); only a plain Conv2d can be fused"
        )


def _check_no_act(bn: nn.Module, where: str) -> None:
    act = getattr(bn, "act", None)
    if act is not None and not isinstance(act, nn.Identity):
        raise UnsupportedError(
            f"{where} applies {type(act).__name__} inside the branch; a branch with an activation "
            "before the sum cannot be fused"
        )


def has_no_deploy_conv(module: nn.Module) -> bool:
    """True while a block still is in train form (``reparam_conv`` absent or None)."""
    return getattr(module, "reparam_conv", None) is None


# -- the declaration shared by timm's families -------------------------------------------------


def conv_norm(v, local: str) -> Map:
    """timm's ``ConvNormAct`` used without activation: ``<local>.conv`` then ``<local>.bn`` (the BN
    may be absent; a live pair must be a plain Conv2d with no anti-aliasing and no activation)."""
    if v.tree == "module":
        module = v.get(local)
        if not is_conv_norm(module):
            raise UnsupportedError(f"{v._label(local)} is a {type(module).__name__}, not a conv+BN pair")
        _check_plain_conv(module.conv, v._label(join(local, "conv")))
        aa = getattr(module, "aa", None)
        if aa is not None and not isinstance(aa, nn.Identity):
            raise UnsupportedError(f"{v._label(local)} has an anti-aliasing layer ({type(aa).__name__}) after the BN")
        if not is_batch_norm(module.bn):
            if isinstance(module.bn, nn.Sequential) and any(
                not isinstance(m, (nn.Identity, nn.Dropout)) for m in module.bn
            ):
                raise UnsupportedError(f"{v._label(local)}.bn holds layers that are not a BatchNorm")
            return v.conv(join(local, "conv"))
        _check_no_act(module.bn, v._label(join(local, "bn")))
    norm = join(local, "bn") if v.has_any(join(local, "bn")) and (v.tree == "key" or is_batch_norm(v.get(join(local, "bn")))) else None
    return v.conv_bn(join(local, "conv"), norm)


# -- the family --------------------------------------------------------------------------------


class TimmRepVggBlock(Family):
    name = "timm_repvgg"
    title = "timm RepVggBlock (byobnet)"
    source = "huggingface/pytorch-image-models timm/models/byobnet.py RepVggBlock (after RepVGG, CVPR 2021)"
    anchor = "conv_kxk.conv.weight"
    deploy_anchor = "reparam_conv.weight"
    parts = ("conv_kxk", "conv_1x1", "identity", "drop_path")
    deploy = "reparam_conv"
    train_keys = "conv_kxk.{conv,bn}, conv_1x1.{conv,bn}, [identity (BN)]"
    deploy_keys = "reparam_conv.{weight,bias}"
    after_sum = "attn (SE or Identity), then act - kept"

    def expression(self, v) -> Map | None:
        has_point = v.has("conv_1x1.conv.weight")
        if v.tree == "key" and not has_point and (v.has_any("conv_1x1") or not v.has_any("identity")):
            # e.g. timm's MobileVitBlock: conv_kxk (ConvNormAct) next to a plain conv_1x1 conv
            return None
        terms = [conv_norm(v, "conv_kxk")]
        if has_point:
            terms.append(conv_norm(v, "conv_1x1"))
        identity = v.identity_bn("identity")
        return plus(*terms, *([identity] if identity is not None else []))

    def matches_module(self, module: nn.Module) -> bool:
        if not has_no_deploy_conv(module) or not hasattr(module, "identity"):
            return False
        point = getattr(module, "conv_1x1", False)
        return is_conv_norm(getattr(module, "conv_kxk", None)) and (point is None or is_conv_norm(point))
