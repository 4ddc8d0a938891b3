"""What every block family provides, and the shared helpers families are built from.

A family knows one naming convention (the "zoo" in DESIGN.md). It recognises its blocks in a
state dict (key tree) or in a live model (module tree), turns each into the neutral
:class:`~repvgg_cli.fusion.Branches`, and knows the deploy form: which keys the fused conv gets
in a state dict and how a live block is switched so that its own ``forward`` uses the fused conv.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..errors import InputError, UnsupportedError
from ..fusion import BatchNorm, Branches, ConvBranch, FusedConv, IdentityBranch

BN_STAT_KEYS = ("running_mean", "running_var")
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def join(prefix: str, *parts: str) -> str:
    """Join key parts with dots, skipping empty ones (a block may sit at the root)."""
    return ".".join(p for p in (prefix, *parts) if p)


@dataclass(frozen=True)
class FamilyOptions:
    """What a family may need beyond the tensors themselves.

    Attributes:
        bn_eps: BN eps for the key tree (state dicts do not store it); None: the family default.
        fold_post_bn: fold a post-sum BN (QARepVGG) into the conv where that is valid.
        no_identity: glob patterns of block names that have no parameter-free identity branch
            (the key tree cannot see an ``nn.Identity``; see the QARepVGG family's rule).
        avg_branch: glob patterns of block names that have a parameter-free avg-pool branch
            (YOLOv6 QARepVGGBlockV2; invisible in a state dict).
    """

    bn_eps: float | None = None
    fold_post_bn: bool = False
    no_identity: tuple[str, ...] = ()
    avg_branch: tuple[str, ...] = ()


@dataclass(frozen=True)
class Block:
    """One re-parameterizable block found in a checkpoint or model.

    Attributes:
        name: the block's key prefix / module path ("" for a root block).
        family: the family's registry name.
        branches: the neutral description fed to the fusion.
        source_keys: state-dict keys the block replaces (key tree; module tree: its parameters).
        deploy_prefix: where the fused conv's ``weight``/``bias`` live in the deploy form.
        dtype: the dtype of the source tensors (the fused conv is written in it).
        eps_note: where BN eps came from ("module", "family default", "--bn-eps").
        notes: anything else worth reporting about this block.
    """

    name: str
    family: str
    branches: Branches
    source_keys: tuple[str, ...]
    deploy_prefix: str
    dtype: torch.dtype = torch.float32
    eps_note: str = "module"
    notes: tuple[str, ...] = ()

    @property
    def branch_labels(self) -> tuple[str, ...]:
        labels = [
            f"{c.kernel_size[0]}x{c.kernel_size[1]}" + ("+bn" if c.bn is not None else "")
            for c in self.branches.convs
        ]
        if self.branches.identity is not None:
            labels.append("id" + ("+bn" if self.branches.identity.bn is not None else ""))
        return tuple(labels)

    def deploy_state(self, fused: FusedConv) -> dict[str, Tensor]:
        """The deploy-form state-dict entries for this block's fused conv."""
        return {
            join(self.deploy_prefix, "weight"): fused.weight,
            join(self.deploy_prefix, "bias"): fused.bias,
        }


@dataclass
class KeyView:
    """The keys of a state dict under one prefix, recording which ones a family read."""

    state: Mapping[str, Tensor]
    prefix: str
    read: set[str] = field(default_factory=set)

    def key(self, local: str) -> str:
        return join(self.prefix, local)

    def has(self, local: str) -> bool:
        return self.key(local) in self.state

    def has_any(self, local_prefix: str) -> bool:
        start = self.key(local_prefix) + "."
        return any(k.startswith(start) for k in self.state)

    def tensor(self, local: str, required: bool = True) -> Tensor | None:
        full = self.key(local)
        if full not in self.state:
            if required:
                raise InputError(f"block {self.prefix or '<root>'}: key {full} is missing")
            return None
        value = self.state[full]
        if not isinstance(value, Tensor):
            raise InputError(
                f"block {self.prefix or '<root>'}: key {full} holds a {type(value).__name__}, not a tensor"
            )
        self.read.add(full)
        return value

    def mark(self, local: str) -> None:
        """Mark a key as owned by the block without reading it (e.g. num_batches_tracked)."""
        if self.has(local):
            self.read.add(self.key(local))

    def owned_under(self, *local_prefixes: str) -> set[str]:
        """Every key under the given sub-prefixes (the block's branch modules)."""
        starts = tuple(self.key(p) + "." if self.key(p) else "" for p in local_prefixes)
        return {k for k in self.state if k.startswith(starts)}


def _finite(tensor: Tensor) -> bool:
    """No NaN or Inf anywhere. Fast path: NaN/Inf propagate into a plain sum (no mask is built);
    only when that sum is not finite (which huge finite values can also cause) look element-wise."""
    tensor = tensor.detach()
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def conv_weight(view: KeyView, local: str) -> Tensor:
    weight = view.tensor(local)
    assert weight is not None
    if weight.dim() != 4:
        raise InputError(
            f"block {view.prefix or '<root>'}: {view.key(local)} has shape {tuple(weight.shape)}; "
            "a conv weight has 4 dimensions"
        )
    if not weight.is_floating_point():
        raise InputError(f"block {view.prefix or '<root>'}: {view.key(local)} has dtype {weight.dtype}; "
                         "a conv weight is floating point")
    if not _finite(weight):
        raise InputError(f"block {view.prefix or '<root>'}: {view.key(local)} holds NaN or Inf")
    return weight


def channel_vector(view: KeyView, local: str, channels: int, of: str, required: bool = True) -> Tensor | None:
    """A per-channel vector (conv bias, BN statistic or affine parameter), checked where it is read.

    Args:
        view: the block's keys.
        local: the vector's key under the block.
        channels: the length it must have.
        of: what fixes that length, for the message (e.g. the conv weight's key).
        required: raise when the key is absent (else return None).
    """
    vector = view.tensor(local, required=required)
    if vector is None:
        return None
    where, key = f"block {view.prefix or '<root>'}", view.key(local)
    if vector.dim() != 1:
        raise InputError(f"{where}: {key} has shape {tuple(vector.shape)}; a per-channel vector has 1 dimension")
    if not vector.is_floating_point():
        raise InputError(f"{where}: {key} has dtype {vector.dtype}; a floating-point tensor is needed")
    if vector.shape[0] != channels:
        raise InputError(f"{where}: {key} has {vector.shape[0]} channels but {of} has {channels}")
    if not _finite(vector):
        raise InputError(f"{where}: {key} holds NaN or Inf")
    return vector


def conv_branch_from_keys(view: KeyView, conv: str, bn: str | None, eps: float) -> ConvBranch:
    """A conv (``<conv>.weight``, optional ``<conv>.bias``) followed by an optional BN at ``bn``."""
    weight = conv_weight(view, join(conv, "weight"))
    of = f"{view.key(join(conv, 'weight'))} (output channels)"
    bias = channel_vector(view, join(conv, "bias"), int(weight.shape[0]), of, required=False)
    norm = bn_from_keys(view, bn, eps, int(weight.shape[0]), of) if bn else None
    return ConvBranch(weight=weight, bias=bias, bn=norm)


def bn_from_keys(view: KeyView, local: str, eps: float, channels: int | None = None, of: str = "") -> BatchNorm:
    """Read a BatchNorm's tensors from ``<local>.{weight,bias,running_mean,running_var}``.

    Args:
        view, local: the block's keys and the BN's prefix under it.
        eps: the BN eps (a state dict does not store it).
        channels, of: the number of channels the BN must have and what fixes it (e.g. its conv);
            None: as many as its ``running_mean``.
    """
    where = f"block {view.prefix or '<root>'}"
    present = [part for part in BN_KEYS[:4] if view.has(join(local, part))]
    stats = [part for part in BN_STAT_KEYS if part in present]
    if len(stats) == 1:
        missing = next(part for part in BN_STAT_KEYS if part not in stats)
        raise InputError(f"{where}: key {view.key(join(local, missing))} is missing "
                         f"(BatchNorm {view.key(local)} has {stats[0]})")
    if not stats:
        if present:
            raise UnsupportedError(
                f"{where}: BatchNorm {view.key(local)} has no running "
                "statistics (track_running_stats=False?); it normalises with batch statistics "
                "and cannot be folded into a conv",
            )
        raise InputError(f"{where}: BatchNorm {view.key(local)} is missing")
    affine = [part for part in ("weight", "bias") if part in present]
    if len(affine) == 1:
        missing = "bias" if affine == ["weight"] else "weight"
        raise InputError(f"{where}: key {view.key(join(local, missing))} is missing "
                         f"(BatchNorm {view.key(local)} has {affine[0]}; an affine BatchNorm has both)")
    if channels is None:
        mean = view.tensor(join(local, "running_mean"))
        assert mean is not None
        channels = int(mean.shape[0]) if mean.dim() == 1 else -1
        of = view.key(join(local, "running_mean"))
    vectors = {part: channel_vector(view, join(local, part), channels, of, required=part in BN_STAT_KEYS)
               for part in ("running_mean", "running_var", "weight", "bias")}
    if bool((vectors["running_var"].detach().to(torch.float64) < 0).any()):
        raise InputError(f"{where}: {view.key(join(local, 'running_var'))} has negative values; a variance cannot be")
    view.mark(join(local, "num_batches_tracked"))
    return BatchNorm(
        running_mean=vectors["running_mean"],
        running_var=vectors["running_var"],
        eps=eps,
        weight=vectors["weight"],
        bias=vectors["bias"],
    )


def is_batch_norm(module: object) -> bool:
    """BatchNorm1d/2d/3d, SyncBatchNorm and their subclasses (e.g. timm's BatchNormAct2d)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def bn_from_module(bn: nn.Module, where: str) -> BatchNorm:
    """The eval-mode parameters of a live BN module, eps included."""
    if not is_batch_norm(bn):
        raise UnsupportedError(f"{where} is a {type(bn).__name__}, not a BatchNorm")
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise UnsupportedError(
            f"{where} has track_running_stats=False: it normalises with batch statistics "
            "and cannot be folded into a conv"
        )
    act = getattr(bn, "act", None)  # timm's BatchNormAct2d: BN, then an activation
    if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
        raise UnsupportedError(
            f"{where} applies {type(act).__name__} after the BatchNorm, inside the branch; "
            "a branch with an activation before the sum cannot be fused"
        )
    return BatchNorm(
        running_mean=bn.running_mean,
        running_var=bn.running_var,
        eps=float(bn.eps),
        weight=bn.weight if bn.affine else None,
        bias=bn.bias if bn.affine else None,
    )


def identity_from_module(module: nn.Module | None, where: str) -> IdentityBranch | None:
    """A live skip branch: a BN (its eval form), ``nn.Identity`` (plain ``x``) or None (no branch)."""
    if module is None:
        return None
    if is_batch_norm(module):
        return IdentityBranch(bn=bn_from_module(module, where))
    if isinstance(module, nn.Identity):
        return IdentityBranch()
    raise UnsupportedError(f"{where} is a {type(module).__name__}; a BatchNorm, nn.Identity or None is expected")


def conv_branch_from_module(conv: nn.Module, bn: nn.Module | None, where: str) -> ConvBranch:
    """A live ``nn.Conv2d`` (+ optional BN) as a :class:`ConvBranch` with its own geometry."""
    if not isinstance(conv, nn.Conv2d):
        raise UnsupportedError(f"{where} is a {type(conv).__name__}, not a Conv2d")
    if isinstance(conv.padding, str):
        raise UnsupportedError(f"{where} uses padding={conv.padding!r}; numeric padding is needed")
    return ConvBranch(
        weight=conv.weight,
        bias=conv.bias,
        bn=bn_from_module(bn, f"{where} BN") if bn is not None else None,
        padding=tuple(conv.padding),
        dilation=tuple(conv.dilation),
        padding_mode=conv.padding_mode,
    )


def geometry_from_conv(conv: nn.Conv2d) -> dict:
    """The block geometry read off its main conv, as keyword arguments of :class:`Branches`."""
    return dict(
        groups=int(conv.groups),
        stride=tuple(conv.stride),
        padding=tuple(conv.padding),
        dilation=tuple(conv.dilation),
        padding_mode=conv.padding_mode,
        in_channels=int(conv.in_channels),
        geometry_known=True,
    )


def conv_from_fused(fused: FusedConv, like: Tensor) -> nn.Conv2d:
    """A fresh ``nn.Conv2d`` holding ``fused``, with the dtype and device of ``like``."""
    conv = nn.Conv2d(
        fused.in_channels,
        fused.out_channels,
        fused.kernel_size,
        stride=fused.stride,
        padding=fused.padding,
        dilation=fused.dilation,
        groups=fused.groups,
        bias=True,
        padding_mode=fused.padding_mode,
        device="meta",
    )
    conv.weight = nn.Parameter(fused.weight.to(device=like.device, dtype=like.dtype).clone())
    conv.bias = nn.Parameter(fused.bias.to(device=like.device, dtype=like.dtype).clone())
    return conv


def source_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The dtype the fused conv is written in: the main weight's."""
    for t in tensors:
        if isinstance(t, Tensor) and t.is_floating_point():
            return t.dtype
    return torch.float32


def _check_branches_agree(view: KeyView, branches: Branches) -> None:
    """Summed branches must agree on channels: name the keys that do not (before any fusing)."""
    convs = [c for c in branches.convs if isinstance(c.weight, Tensor) and c.weight.dim() == 4]
    if not convs:
        return
    key_of = {id(view.state[k]): k for k in view.read}

    def name(tensor: Tensor, fallback: str) -> str:
        return key_of.get(id(tensor), fallback)

    first = name(convs[0].weight, "the first branch's weight")
    out, per_group = int(convs[0].weight.shape[0]), int(convs[0].weight.shape[1])
    where = f"block {view.prefix or '<root>'}"
    for index, conv in enumerate(convs[1:], start=1):
        if int(conv.weight.shape[0]) != out:
            raise UnsupportedError(f"{where}: {name(conv.weight, f'branch {index} weight')} has "
                                   f"{int(conv.weight.shape[0])} output channels but {first} has {out}; "
                                   "summed branches must agree")
        if int(conv.weight.shape[1]) != per_group:
            raise UnsupportedError(f"{where}: {name(conv.weight, f'branch {index} weight')} has "
                                   f"{int(conv.weight.shape[1])} input channels per group but {first} has "
                                   f"{per_group}; summed branches must agree")
    identity_bn = branches.identity.bn if branches.identity is not None else None
    if identity_bn is not None and isinstance(identity_bn.running_mean, Tensor):
        channels = int(identity_bn.running_mean.shape[0]) if identity_bn.running_mean.dim() == 1 else -1
        if channels != out:
            raise UnsupportedError(f"{where}: {name(identity_bn.running_mean, 'the identity BatchNorm')} has "
                                   f"{channels} channels but {first} has {out} output channels; "
                                   "an identity branch needs in == out")


class Family:
    """Base class of a block family. Subclasses set the class attributes and the parse methods.

    Key tree: :meth:`find_prefixes` yields candidate block prefixes (by default every prefix
    that has ``anchor`` under it); :meth:`parse_keys` turns one into a :class:`Block`.
    Module tree: :meth:`matches_module`, :meth:`parse_module` and :meth:`to_deploy_module`.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    source: ClassVar[str]
    anchor: ClassVar[str]
    train_keys: ClassVar[str]
    deploy_keys: ClassVar[str]
    after_sum: ClassVar[str] = "nothing"
    default_eps: ClassVar[float] = 1e-5
    deploy_anchor: ClassVar[str | None] = None
    encloses: ClassVar[tuple[str, ...]] = ()
    """Families whose blocks may sit inside this family's blocks and are fused as part of them."""

    def find_prefixes(self, keys: list[str]) -> list[str]:
        suffix = "." + self.anchor
        found = []
        for key in keys:
            if key == self.anchor:
                found.append("")
            elif key.endswith(suffix):
                found.append(key[: -len(suffix)])
        return found

    def find_deploy_prefixes(self, keys: list[str]) -> list[str]:
        """Prefixes of blocks already in this family's deploy form (for inspect/verify)."""
        if self.deploy_anchor is None:
            return []
        suffix = "." + self.deploy_anchor
        return [k[: -len(suffix)] for k in keys if k.endswith(suffix)] + (
            [""] if self.deploy_anchor in keys else []
        )

    def eps(self, options: FamilyOptions) -> tuple[float, str]:
        """The BN eps for the key tree and where it came from."""
        if options.bn_eps is not None:
            return options.bn_eps, "--bn-eps"
        return self.default_eps, "family default"

    def parse_keys(self, view: KeyView, options: FamilyOptions) -> Block | None:  # pragma: no cover
        """The block at ``view.prefix``, or None when the keys there are not this family's."""
        raise NotImplementedError

    def matches_module(self, module: nn.Module) -> bool:  # pragma: no cover
        raise NotImplementedError

    def parse_module(self, name: str, module: nn.Module, options: FamilyOptions) -> Block:  # pragma: no cover
        raise NotImplementedError

    def to_deploy_module(self, module: nn.Module, fused: FusedConv) -> nn.Module:  # pragma: no cover
        """Switch a live block to its deploy form; return the module to put in its parent."""
        raise NotImplementedError

    # -- helpers for subclasses -------------------------------------------------------------

    def finish_key_block(
        self,
        view: KeyView,
        owned: set[str],
        branches: Branches,
        deploy_prefix: str,
        eps_note: str,
        dtype: torch.dtype,
        notes: tuple[str, ...] = (),
    ) -> Block:
        """Check the family read every key it owns (no stray keys), then build the Block."""
        stray = sorted(owned - view.read)
        if stray:
            raise UnsupportedError(
                f"block {view.prefix or '<root>'} ({self.name}): unexpected key {stray[0]}"
                + (f" and {len(stray) - 1} more" if len(stray) > 1 else "")
            )
        _check_branches_agree(view, branches)
        ordered = tuple(k for k in view.state if k in view.read)
        return Block(
            name=view.prefix,
            family=self.name,
            branches=branches,
            source_keys=ordered,
            deploy_prefix=deploy_prefix,
            dtype=dtype,
            eps_note=eps_note,
            notes=notes,
        )

    def parse_dense_point_identity(
        self,
        view: KeyView,
        options: FamilyOptions,
        dense: tuple[str, str],
        point: tuple[str, str],
        identity: str,
        deploy_leaf: str,
        owned: tuple[str, ...],
        notes: tuple[str, ...] = (),
    ) -> Block:
        """The most common key-tree block: a k×k conv+BN, a 1×1 conv+BN and an optional identity BN.

        Args:
            dense, point: ``(conv, bn)`` local names of the two conv branches.
            identity: local name of the identity BN (a branch only when its keys exist).
            deploy_leaf: the deploy conv's local name ("" when the block itself becomes the conv).
            owned: local sub-prefixes whose every key belongs to the block ("" for all keys).
        """
        eps, eps_note = self.eps(options)
        convs = (conv_branch_from_keys(view, *dense, eps), conv_branch_from_keys(view, *point, eps))
        skip = IdentityBranch(bn=bn_from_keys(view, identity, eps)) if view.has_any(identity) else None
        return self.finish_key_block(
            view,
            owned=view.owned_under(*owned),
            branches=Branches(convs=convs, identity=skip),
            deploy_prefix=join(view.prefix, deploy_leaf),
            eps_note=eps_note,
            dtype=source_dtype(convs[0].weight),
            notes=notes,
        )

    def module_keys(self, name: str, module: nn.Module, *children: str) -> tuple[str, ...]:
        """The state-dict keys of the given child modules (the block's branches)."""
        keys = []
        for child in children:
            sub = getattr(module, child, None)
            if isinstance(sub, nn.Module):
                keys.extend(join(name, child, k) for k in sub.state_dict().keys())
        return tuple(keys)
