"""The values of the fusion: eval-mode BatchNorm parameters, a conv branch, the identity branch,
a block's branches (:class:`Branches`, the normal form every family and the algebra produce) and
the one conv they equal (:class:`FusedConv`). Tensors are held, never changed.
"""


from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..errors import InputError

Pair = tuple[int, int]
FLOAT64 = torch.float64


@dataclass(frozen=True)
class BatchNorm:
    """Eval-mode BatchNorm parameters. ``weight``/``bias`` are None for ``affine=False``."""

    running_mean: Tensor
    running_var: Tensor
    eps: float = 1e-5
    weight: Tensor | None = None
    bias: Tensor | None = None

    @property
    def num_features(self) -> int:
        return int(self.running_mean.shape[0])


@dataclass(frozen=True)
class ConvBranch:
    """One convolution branch: ``scale * BN(conv(x, weight) + bias)``.

    ``padding`` and ``dilation`` are the branch's own; ``padding=None`` means "aligned with
    the main kernel by construction" and is not checked. ``scale`` is a per-output-channel
    factor applied last (layer scale, or -1 for a subtracted branch). ``padding_mode=None``
    means "the block's" (a branch that pads with another mode cannot be fused).
    """

    weight: Tensor
    bias: Tensor | None = None
    bn: BatchNorm | None = None
    padding: Pair | None = None
    dilation: Pair = (1, 1)
    scale: Tensor | None = None
    padding_mode: str | None = None

    @property
    def kernel_size(self) -> Pair:
        return (int(self.weight.shape[2]), int(self.weight.shape[3]))


@dataclass(frozen=True)
class IdentityBranch:
    """The skip branch ``scale * BN(x)`` (or plain ``x``); needs in == out and stride 1."""

    bn: BatchNorm | None = None
    scale: Tensor | None = None


@dataclass(frozen=True)
class Branches:
    """The neutral description of a train-form block, shared by every family.

    ``groups=None`` means "not known" (a state dict does not store it): it is derived from
    the identity branch when there is one; without one the fused kernel does not depend on it.
    ``padding=None`` means the usual ``dilation * (k // 2)``.
    """

    convs: tuple[ConvBranch, ...]
    identity: IdentityBranch | None = None
    groups: int | None = None
    stride: Pair = (1, 1)
    padding: Pair | None = None
    dilation: Pair = (1, 1)
    padding_mode: str = "zeros"
    post_bn: BatchNorm | None = None
    in_channels: int | None = None
    geometry_known: bool = False
    """True when stride/groups/padding were read from live modules (module tree), not assumed."""
    post_scale: Tensor | None = None
    """A per-channel factor applied after ``post_bn`` (a layer scale after a sum that has a BN)."""
    composite: bool = False
    """Some conv term was computed from a composition (see :mod:`repvgg_cli.algebra`): the check
    then runs :attr:`ops`, the expression it came from, instead of trusting those weights."""
    ops: object | None = field(default=None, compare=False, repr=False)
    """The expression (:mod:`repvgg_cli.algebra` ``*Op`` nodes) of a composite value."""

    @property
    def groups_known(self) -> bool:
        """Groups are known from the modules, or pinned down by an identity branch."""
        return self.geometry_known or self.groups is not None or self.identity is not None

    @property
    def kernel_size(self) -> Pair:
        """The fused kernel: the largest branch kernel in each dimension (1×1 for identity only)."""
        kh = max([c.kernel_size[0] for c in self.convs] + [1])
        kw = max([c.kernel_size[1] for c in self.convs] + [1])
        return (kh, kw)

    @property
    def out_channels(self) -> int:
        if self.convs:
            return int(self.convs[0].weight.shape[0])
        if self.identity is not None and self.identity.bn is not None:
            return self.identity.bn.num_features
        if self.in_channels is not None:
            return self.in_channels
        raise InputError("a block with neither conv branches nor channel count")

    @property
    def resolved_padding(self) -> Pair:
        if self.padding is not None:
            return self.padding
        kh, kw = self.kernel_size
        return (self.dilation[0] * (kh // 2), self.dilation[1] * (kw // 2))

    @property
    def resolved_groups(self) -> int:
        """Groups of the fused conv; 1 when unknown and no identity pins it down."""
        if self.groups is not None:
            return self.groups
        if self.identity is not None and self.convs:
            per_group = int(self.convs[0].weight.shape[1])
            return max(1, self.out_channels // per_group)
        return 1

    @property
    def resolved_in_channels(self) -> int:
        if self.in_channels is not None:
            return self.in_channels
        if self.identity is not None:
            return self.out_channels
        if self.convs:
            return int(self.convs[0].weight.shape[1]) * self.resolved_groups
        raise InputError("cannot tell the block's input channels")


@dataclass(frozen=True)
class FusedConv:
    """The deploy-form convolution: ``conv2d(x, weight, bias, stride, padding, dilation, groups)``."""

    weight: Tensor
    bias: Tensor
    stride: Pair = (1, 1)
    padding: Pair = (1, 1)
    dilation: Pair = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"
    extra: dict = field(default_factory=dict, compare=False)

    def to(self, dtype: torch.dtype) -> FusedConv:
        """A copy with fresh, contiguous tensors of ``dtype`` (safetensors refuses shared storage)."""
        return FusedConv(
            weight=_fresh(self.weight, dtype),
            bias=_fresh(self.bias, dtype),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            padding_mode=self.padding_mode,
        )

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.groups

    @property
    def kernel_size(self) -> Pair:
        return (int(self.weight.shape[2]), int(self.weight.shape[3]))


def _fresh(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` as ``dtype`` in new, contiguous memory (one copy, never shared with the input)."""
    out = tensor.detach().to(dtype=dtype)
    if out.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
        return out.clone(memory_format=torch.contiguous_format)
    return out.contiguous()


def map_branch_tensors(branches: Branches, fn) -> Branches:
    """The same description with ``fn`` applied to every tensor (weights, biases, BN, scales)."""

    def t(value):
        return fn(value) if isinstance(value, Tensor) else value

    def bn(value: BatchNorm | None) -> BatchNorm | None:
        if value is None:
            return None
        return replace(value, running_mean=t(value.running_mean), running_var=t(value.running_var),
                       weight=t(value.weight), bias=t(value.bias))

    convs = tuple(replace(c, weight=t(c.weight), bias=t(c.bias), bn=bn(c.bn), scale=t(c.scale))
                  for c in branches.convs)
    identity = None if branches.identity is None else replace(
        branches.identity, bn=bn(branches.identity.bn), scale=t(branches.identity.scale))
    return replace(branches, convs=convs, identity=identity, post_bn=bn(branches.post_bn),
                   post_scale=t(branches.post_scale), ops=None)


def as_meta(tensor: Tensor) -> Tensor:
    """A data-free stand-in with the same shape and dtype (to report on a block after freeing it)."""
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
