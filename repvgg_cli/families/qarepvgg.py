"""YOLOv6's QARepVGGBlock and QARepVGGBlockV2 (quantization-aware RepVGG).

Follows meituan/YOLOv6 ``yolov6/layers/common.py``, classes ``QARepVGGBlock`` and
``QARepVGGBlockV2`` (Chu et al., "Make RepVGG Greater Again: A Quantization-aware Approach",
arXiv:2212.01593):

* ``rbr_dense``    = ``conv_bn``: ``rbr_dense.conv`` (k×k, no bias) + ``rbr_dense.bn``
* ``rbr_1x1``      = a plain ``nn.Conv2d`` 1×1 (no BN; a bias is read if present)
* ``rbr_identity`` = ``nn.Identity()`` when in == out and stride 1, else None (no BN, no keys)
* ``rbr_avg``      = V2 only: ``nn.AvgPool2d(k, stride, padding)`` under the same condition (no keys)
* ``bn``           = a BatchNorm2d applied after the sum

``forward`` is ``nonlinearity(bn(se(dense + 1x1 + identity [+ avg])))`` (``se`` is nn.Identity in
YOLOv6; ReLU). ``switch_to_deploy`` fuses the branches into ``rbr_reparam`` (Conv2d with bias) and
keeps ``bn`` (for QAT), so by default the deploy keys are ``rbr_reparam.{weight,bias}`` plus the
untouched ``bn.*``, and the result loads into YOLOv6's deploy-form block. ``fold_post_bn``
(``--fold-post-bn``) also folds ``bn`` into ``rbr_reparam``; that is valid only when nothing
nonlinear sits between the sum and ``bn`` (``se`` absent or nn.Identity), and is refused otherwise.
A folded live block gets ``bn = nn.Identity()`` so YOLOv6's forward still runs. YOLOv6 sets every
BN to eps 1e-3 in ``initialize_weights``: that is the key tree's default eps.

Identity rule of the key tree: a state dict cannot see the ``nn.Identity`` (nor the V2 avg-pool).
The identity is taken to be present iff the 1×1 weight is square (out == in, groups 1 assumed,
as in YOLOv6) unless the block's name (its key prefix) matches a glob of ``options.no_identity``
(``--no-identity PATTERN``), e.g. for a strided block with in == out. A V2 avg-pool branch is
taken to be present (together with the identity) only where the block's name matches a glob of
``options.avg_branch`` (CLI ``--avg-branch GLOB``); otherwise blocks are read as V1. The
module tree sees both directly.
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from fnmatch import fnmatchcase

import torch
from torch import nn

from ..algebra import maps
from ..algebra.maps import Map, plus, then
from ..errors import InputError, UnsupportedError
from ..fusion.values import FusedConv
from .base import Block, Family, FamilyOptions
from .keys import KeyView, join
from .modules import is_batch_norm

FOLD_HINT = "convert without --fold-post-bn (the bn is then kept)"


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def _has_conv_bn(module: object) -> bool:
    return isinstance(getattr(module, "conv", None), nn.Conv2d) and is_batch_norm(getattr(module, "bn", None))


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _regrouped(pool: Map, like: Map) -> Map:
    """A depthwise conv (the average pool) as the grouped conv ``like`` is (plus() sums terms of
    one groups count; the pool's geometry is checked against ``like``'s where it is read).
    Output ``i`` reads input ``i``, at place ``i % in_per_group`` of its group."""
    term, in_per_group = pool.convs[0], int(like.convs[0].weight.shape[1])
    channels = int(term.weight.shape[0])
    weight = term.weight.new_zeros(channels, in_per_group, *term.kernel_size)
    rows = torch.arange(channels)
    weight[rows, rows % in_per_group] = term.weight[:, 0]
    return replace(pool, convs=(replace(term, weight=weight),), groups=like.groups, in_channels=like.in_channels,
                   geometry_known=like.geometry_known)


def _hidden_identity(v, point: Map) -> Map | None:
    """Key tree: the ``nn.Identity`` has no keys; present iff the 1x1 weight is square, unless
    the block's name matches ``--no-identity``."""
    weight = point.convs[0].weight
    if weight.shape[0] != weight.shape[1]:
        return None
    if _matches(v.prefix, v.options.no_identity):
        v.note("no identity branch: the block name matches --no-identity")
        return None
    v.note("identity branch assumed: the 1x1 weight is square (in == out, groups 1)")
    return maps.identity()


def _avg_pool(v, dense: Map, identity: Map | None) -> Map | None:
    """V2's parameter-free ``rbr_avg``: a live ``nn.AvgPool2d``, or (key tree, no keys) assumed
    beside the identity where the block's name matches ``--avg-branch``."""
    channels, kernel = int(dense.convs[0].weight.shape[0]), dense.convs[0].kernel_size
    if v.tree == "key":
        if identity is None:
            return None
        variant = v.options.qa_variant
        if _matches(v.prefix, v.options.avg_branch):
            v.note("QARepVGGBlockV2 avg-pool branch assumed (the block name matches the avg-branch option)")
        elif variant == "v2":
            v.note("QARepVGGBlockV2 avg-pool branch (--qa-variant v2)")
        elif variant == "v1" or v.options.avg_branch:
            return None  # the user said which blocks are V2 (--avg-branch) or that none is (--qa-variant v1)
        else:
            raise InputError(
                f"{v.where} (qarepvgg): a QARepVGGBlock (v1) and a QARepVGGBlockV2 (v2, a parameter-free avg-pool "
                "branch beside the identity) have the same keys; the weights cannot tell which this is",
                hint="say which: --qa-variant v1 or --qa-variant v2 (all such blocks), or --avg-branch GLOB for the V2 "
                     "blocks (YOLOv6's QA configs use v2)",
            )
        return _regrouped(maps.avg_pool(channels, kernel, stride=1, padding=None), dense)  # centred
    pool = v.get("rbr_avg")
    if pool is None:
        return None
    if not isinstance(pool, nn.AvgPool2d):
        raise UnsupportedError(f"{v.where}.rbr_avg is a {type(pool).__name__}; nn.AvgPool2d or None is expected")
    kernel, stride, padding = _pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding)
    if pool.ceil_mode or pool.divisor_override is not None or (not pool.count_include_pad and padding != (0, 0)):
        raise UnsupportedError(
            f"{v.where}.rbr_avg: ceil_mode, divisor_override or count_include_pad=False with padding "
            "make the average pool differ from a convolution at the borders"
        )
    if stride != dense.stride:
        raise UnsupportedError(f"{v.where}.rbr_avg has stride {stride} but rbr_dense has {dense.stride}")
    return _regrouped(maps.avg_pool(channels, kernel, stride, padding), dense)


def _between_sum_and_bn(v) -> str | None:
    """What sits between the sum and the post-sum bn (None: nothing, or nn.Identity)."""
    if v.tree == "key":
        return "an `se` module" if v.has_any("se") else None
    se = v.get("se")
    return None if se is None or isinstance(se, nn.Identity) else f"`se` ({type(se).__name__})"


class QARepVGG(Family):
    name = "qarepvgg"
    title = "YOLOv6 QARepVGGBlock / QARepVGGBlockV2"
    source = "meituan/YOLOv6 yolov6/layers/common.py QARepVGGBlock, QARepVGGBlockV2 (arXiv:2212.01593)"
    anchor = "rbr_dense.conv.weight"
    deploy_anchor = "rbr_reparam.weight"
    parts = ("rbr_dense", "rbr_1x1", "rbr_identity", "rbr_avg", "id_tensor")  # + bn when folded
    deploy = "rbr_reparam"
    deploy_flags = {"deploy": True}
    train_keys = (
        "rbr_dense.{conv,bn}, rbr_1x1 (plain conv), bn (post-sum); the identity has no keys: present iff "
        "the 1x1 weight is square, unless --no-identity matches; V2's avg-pool only where --avg-branch matches"
    )
    deploy_keys = "rbr_reparam.{weight,bias} + bn kept (--fold-post-bn: rbr_reparam only)"
    after_sum = "se, bn, nonlinearity (ReLU) - kept; bn folded with --fold-post-bn"
    default_eps = 1e-3

    def __init__(self) -> None:
        # Live blocks parsed with fold_post_bn, so that to_deploy_module (which only gets the
        # fused conv) knows to drop their bn.
        self._folding: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    def expression(self, v) -> Map | None:
        if not v.has("rbr_1x1.weight") or v.has_any("rbr_1x1.conv"):
            return None  # official RepVGG has rbr_1x1.{conv,bn}
        dense, point = v.conv_bn("rbr_dense.conv", "rbr_dense.bn"), v.conv("rbr_1x1")
        identity = _hidden_identity(v, point) if v.tree == "key" else v.identity_bn("rbr_identity")
        avg = _avg_pool(v, dense, identity)
        total = plus(dense, point, *(term for term in (identity, avg) if term is not None))
        if not v.has_any("bn"):
            return total
        if not v.options.fold_post_bn:
            v.note("post-sum bn kept")
            return total
        between = _between_sum_and_bn(v)
        if between is not None:
            where = f"{v.where} ({self.name})" if v.tree == "key" else v.where
            raise UnsupportedError(f"{where}: {between} sits between the sum and the post-sum bn; --fold-post-bn "
                                   "would fold a BN across it", hint=FOLD_HINT)
        v.note("post-sum bn folded into rbr_reparam (--fold-post-bn)")
        return then(total, v.bn("bn"))

    def matches_module(self, module: nn.Module) -> bool:
        return (
            _has_conv_bn(getattr(module, "rbr_dense", None))
            and isinstance(getattr(module, "rbr_1x1", None), nn.Conv2d)
            and is_batch_norm(getattr(module, "bn", None))
        )

    def find_deploy_prefixes(self, keys: list[str]) -> list[str]:
        """``rbr_reparam`` with the kept post-sum ``bn`` beside it (folded ones look like official RepVGG)."""
        present = set(keys)
        return [p for p in super().find_deploy_prefixes(keys) if join(p, "bn.running_var") in present]

    # -- --fold-post-bn: the post-sum bn becomes a part of the block (its keys, its deletion) ------

    def parse_keys(self, view: KeyView, options: FamilyOptions) -> Block | None:
        block = super().parse_keys(view, options)
        if block is None or not options.fold_post_bn or not view.has_any("bn"):
            return block
        owned = view.owned_under(*self.parts, "bn")  # a stray key under the folded bn is refused
        return self.finish_key_block(view, owned, block.branches, block.deploy_prefix, block.eps_note,
                                     block.dtype, block.notes)

    def parse_module(self, name: str, module: nn.Module, options: FamilyOptions) -> Block:
        block = super().parse_module(name, module, options)
        if not options.fold_post_bn:
            self._folding.discard(module)
            return block
        self._folding.add(module)
        return replace(block, source_keys=block.source_keys + self.module_keys(name, module, "bn"))

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        """What YOLOv6's ``switch_to_deploy`` leaves (``bn`` kept); folded: ``bn = nn.Identity()``,
        so YOLOv6's forward still runs."""
        folded = module in self._folding
        self._folding.discard(module)
        super().to_deploy_module(module, fused)
        if folded:
            module.bn = nn.Identity()
        return module
