"""timm's LCNetV2 ``RepDepthwiseSeparable``: multi-scale depthwise branches → one depthwise conv.

Follows huggingface/pytorch-image-models ``timm/models/lcnetv2.py``, class
``RepDepthwiseSeparable`` (PP-LCNetV2, PaddleClas). With ``use_rep`` the depthwise conv trains as
parallel ``ConvNormAct`` branches without activation, ``dw_conv_list.{i}`` (``conv``, ``bn``),
kernels ``dw_kernel_size, dw_kernel_size - 2, ..., 1`` (the 1×1 left out when strided), all
depthwise with the block's stride and centred padding; their sum goes through ``dw_act``, ``se``
and ``pw_conv`` (kept). ``reparameterize`` writes ``dw_conv`` (a depthwise conv with bias) and
sets ``dw_conv_list`` to None: ``plus(then(dw_k, bn_k), ...)``. Blocks without ``use_rep`` have a
``dw_conv`` ConvNormAct with activation (timm's call does nothing there): not claimed.
"""

from __future__ import annotations

from torch import nn

from ..algebra.maps import Map, plus
from ..errors import UnsupportedError
from .base import Family
from .keys import join
from .timm_mobileone import numbered
from .timm_repvgg import conv_norm, is_conv_norm


class TimmLcnetV2RepDw(Family):
    name = "timm_lcnetv2"
    title = "timm LCNetV2 RepDepthwiseSeparable (lcnetv2)"
    source = "huggingface/pytorch-image-models timm/models/lcnetv2.py RepDepthwiseSeparable (PP-LCNetV2)"
    anchor = "dw_conv_list.0.conv.weight"
    deploy_anchor = "dw_conv.weight"
    parts = ("dw_conv_list",)
    deploy = "dw_conv"
    deploy_flags = {"dw_conv_list": None}
    train_keys = "dw_conv_list.{i}.{conv,bn} (depthwise k x k, k = K, K-2, ..., [1])"
    deploy_keys = "dw_conv.{weight,bias}"
    after_sum = "dw_act, se, pw_conv - kept"

    def expression(self, v) -> Map | None:
        terms = [conv_norm(v, local) for local in numbered(v, "dw_conv_list")]
        if not terms:
            raise UnsupportedError(f"{v.where}: dw_conv_list holds no branch")
        return plus(*terms)

    def matches_module(self, module: nn.Module) -> bool:
        branches = getattr(module, "dw_conv_list", None)
        return (isinstance(branches, nn.ModuleList) and len(branches) > 0 and all(is_conv_norm(b) for b in branches)
                and getattr(module, "dw_conv", False) is None)

    def find_deploy_prefixes(self, keys: list[str]) -> list[str]:
        """A deployed block: ``dw_conv`` with a bias next to its ``pw_conv`` (a non-rep block's
        ``dw_conv`` is a ConvNormAct: ``dw_conv.conv.weight``)."""
        present = set(keys)
        return [p for p in super().find_deploy_prefixes(keys)
                if join(p, "dw_conv.bias") in present
                and (join(p, "pw_conv.conv.weight") in present or join(p, "pw_conv.0.conv.weight") in present)]
