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
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

from ..errors import UnsupportedError
from ..fusion import BatchNorm, Branches, ConvBranch, FusedConv, IdentityBranch
from .base import (
    Block,
    Family,
    FamilyOptions,
    KeyView,
    bn_from_keys,
    bn_from_module,
    conv_branch_from_keys,
    conv_branch_from_module,
    conv_from_fused,
    geometry_from_conv,
    identity_from_module,
    is_batch_norm,
    join,
    source_dtype,
)

BRANCHES = ("rbr_dense", "rbr_1x1", "rbr_identity", "rbr_avg")


def avg_pool_kernel(channels: int, in_per_group: int, kernel_size: tuple[int, int]) -> Tensor:
    """The kernel of a per-channel ``AvgPool2d`` (zero padding counted) as a grouped conv, float64."""
    kh, kw = kernel_size
    kernel = torch.zeros(channels, in_per_group, kh, kw, dtype=torch.float64)
    rows = torch.arange(channels)
    kernel[rows, rows % in_per_group] = 1.0 / (kh * kw)
    return kernel


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def _has_conv_bn(module: object) -> bool:
    return isinstance(getattr(module, "conv", None), nn.Conv2d) and is_batch_norm(getattr(module, "bn", None))


class QARepVGG(Family):
    name = "qarepvgg"
    title = "YOLOv6 QARepVGGBlock / QARepVGGBlockV2"
    source = "meituan/YOLOv6 yolov6/layers/common.py QARepVGGBlock, QARepVGGBlockV2 (arXiv:2212.01593)"
    anchor = "rbr_dense.conv.weight"
    deploy_anchor = "rbr_reparam.weight"
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

    def find_deploy_prefixes(self, keys: list[str]) -> list[str]:
        """``rbr_reparam`` with the kept post-sum ``bn`` beside it (folded ones look like official RepVGG)."""
        present = set(keys)
        return [p for p in super().find_deploy_prefixes(keys) if join(p, "bn.running_var") in present]

    # -- key tree ---------------------------------------------------------------------------------

    def parse_keys(self, view: KeyView, options: FamilyOptions) -> Block | None:
        if not view.has("rbr_1x1.weight") or view.has_any("rbr_1x1.conv"):
            return None  # official RepVGG has rbr_1x1.{conv,bn}
        eps, eps_note = self.eps(options)
        dense = conv_branch_from_keys(view, "rbr_dense.conv", "rbr_dense.bn", eps)
        point = conv_branch_from_keys(view, "rbr_1x1", None, eps)
        notes: list[str] = []
        identity = None
        square = point.weight.dim() == 4 and point.weight.shape[0] == point.weight.shape[1]
        if square and _matches(view.prefix, options.no_identity):
            notes.append("no identity branch: the block name matches --no-identity")
        elif square:
            identity = IdentityBranch()
            notes.append("identity branch assumed: the 1x1 weight is square (in == out, groups 1)")
        convs = [dense, point]
        if identity is not None and _matches(view.prefix, options.avg_branch):
            in_per_group = int(dense.weight.shape[1])
            convs.append(ConvBranch(weight=avg_pool_kernel(int(dense.weight.shape[0]), in_per_group,
                                                           dense.kernel_size)))
            notes.append("QARepVGGBlockV2 avg-pool branch assumed (the block name matches the avg-branch option)")
        owned = view.owned_under(*BRANCHES)
        post_bn = None
        if view.has_any("bn"):
            if options.fold_post_bn:
                if view.has_any("se"):
                    raise UnsupportedError(
                        f"block {view.prefix or '<root>'} (qarepvgg): an `se` module sits between the sum and "
                        "the post-sum bn; --fold-post-bn would fold a BN across it",
                        hint="convert without --fold-post-bn (the bn is then kept)",
                    )
                post_bn = bn_from_keys(view, "bn", eps)
                owned |= view.owned_under("bn")
                notes.append("post-sum bn folded into rbr_reparam (--fold-post-bn)")
            else:
                notes.append("post-sum bn kept")
        return self.finish_key_block(
            view,
            owned=owned,
            branches=Branches(convs=tuple(convs), identity=identity, post_bn=post_bn),
            deploy_prefix=join(view.prefix, "rbr_reparam"),
            eps_note=eps_note,
            dtype=source_dtype(dense.weight),
            notes=tuple(notes),
        )

    # -- module tree ------------------------------------------------------------------------------

    def matches_module(self, module: nn.Module) -> bool:
        return (
            _has_conv_bn(getattr(module, "rbr_dense", None))
            and isinstance(getattr(module, "rbr_1x1", None), nn.Conv2d)
            and is_batch_norm(getattr(module, "bn", None))
        )

    def _avg_branch(self, pool: nn.AvgPool2d, dense: nn.Conv2d, where: str) -> ConvBranch:
        kernel, stride, padding = _pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding)
        if pool.ceil_mode or pool.divisor_override is not None or (not pool.count_include_pad and padding != (0, 0)):
            raise UnsupportedError(
                f"{where}.rbr_avg: ceil_mode, divisor_override or count_include_pad=False with padding "
                "make the average pool differ from a convolution at the borders"
            )
        if stride != tuple(dense.stride):
            raise UnsupportedError(f"{where}.rbr_avg has stride {stride} but rbr_dense has {tuple(dense.stride)}")
        in_per_group = dense.in_channels // dense.groups
        return ConvBranch(
            weight=avg_pool_kernel(dense.out_channels, in_per_group, kernel),
            padding=padding,
        )

    def parse_module(self, name: str, module: nn.Module, options: FamilyOptions) -> Block:
        where = name or "<root>"
        dense_conv = module.rbr_dense.conv
        dense = conv_branch_from_module(dense_conv, module.rbr_dense.bn, f"{where}.rbr_dense")
        point = conv_branch_from_module(module.rbr_1x1, None, f"{where}.rbr_1x1")
        convs = [dense, point]
        identity = identity_from_module(getattr(module, "rbr_identity", None), f"{where}.rbr_identity")
        pool = getattr(module, "rbr_avg", None)
        if isinstance(pool, nn.AvgPool2d):
            convs.append(self._avg_branch(pool, dense_conv, where))
        elif pool is not None:
            raise UnsupportedError(f"{where}.rbr_avg is a {type(pool).__name__}; nn.AvgPool2d or None is expected")
        post_bn: BatchNorm | None = None
        parts = list(BRANCHES)
        if options.fold_post_bn:
            se = getattr(module, "se", None)
            if se is not None and not isinstance(se, nn.Identity):
                raise UnsupportedError(
                    f"{where}: `se` ({type(se).__name__}) sits between the sum and the post-sum bn; "
                    "--fold-post-bn would fold a BN across it",
                    hint="convert without --fold-post-bn (the bn is then kept)",
                )
            post_bn = bn_from_module(module.bn, f"{where}.bn")
            parts.append("bn")
            self._folding.add(module)
        else:
            self._folding.discard(module)
        branches = Branches(convs=tuple(convs), identity=identity, post_bn=post_bn, **geometry_from_conv(dense_conv))
        return Block(
            name=name,
            family=self.name,
            branches=branches,
            source_keys=self.module_keys(name, module, *parts),
            deploy_prefix=join(name, "rbr_reparam"),
            dtype=source_dtype(dense_conv.weight),
            notes=("post-sum bn folded into rbr_reparam (--fold-post-bn)" if post_bn is not None else "post-sum bn kept",),
        )

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:
        """What YOLOv6's ``switch_to_deploy`` leaves (``rbr_reparam``, ``bn`` kept); folded: ``bn`` = Identity."""
        folded = module in self._folding
        self._folding.discard(module)
        module.rbr_reparam = conv_from_fused(fused, like=module.rbr_dense.conv.weight)
        for attribute in BRANCHES + ("id_tensor",):
            if hasattr(module, attribute):
                delattr(module, attribute)
        if folded:
            module.bn = nn.Identity()
        if hasattr(module, "deploy"):
            module.deploy = True
        return module
