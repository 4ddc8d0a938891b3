"""Pure tensor math of structural re-parameterization.

A RepVGG-style block is a sum of parallel branches (k×k conv+BN, smaller convs+BN, an
identity, optionally scaled), maybe followed by a BatchNorm. Because every branch is linear
in eval mode, the sum equals one k×k convolution with bias. This module computes that conv.

Tensors in, tensors out: no ``nn.Module`` walking, no IO. Everything is computed in float64;
the caller casts the result to the dtype it ships (see :meth:`FusedConv.to`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError, UnsupportedError

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

    def to(self, dtype: torch.dtype) -> "FusedConv":
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
    return replace(branches, convs=convs, identity=identity, post_bn=bn(branches.post_bn))


def as_float64(tensor: Tensor) -> Tensor:
    """Floating tensors upcast to float64 (on the CPU); other dtypes left for validation to refuse."""
    return tensor.detach().to(device="cpu", dtype=FLOAT64) if tensor.is_floating_point() else tensor


def as_meta(tensor: Tensor) -> Tensor:
    """A data-free stand-in with the same shape and dtype (to report on a block after freeing it)."""
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


def _as_float64(tensor: Tensor, what: str) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise InputError(f"{what} is a {type(tensor).__name__}, not a tensor")
    if not (tensor.is_floating_point()):
        raise InputError(f"{what} has dtype {tensor.dtype}; a floating-point tensor is needed")
    return tensor.detach().to(device="cpu", dtype=FLOAT64)


def _check_vector(tensor: Tensor | None, length: int, what: str) -> Tensor | None:
    if tensor is None:
        return None
    t = _as_float64(tensor, what)
    if t.dim() != 1 or t.shape[0] != length:
        raise InputError(f"{what} has shape {tuple(t.shape)}; expected ({length},)")
    if not torch.isfinite(t).all():
        raise InputError(f"{what} holds NaN or Inf")
    return t


def bn_scale_shift(bn: BatchNorm, channels: int, what: str = "BatchNorm") -> tuple[Tensor, Tensor]:
    """Eval-mode BN as ``y = x * scale + shift``, both float64 vectors of length ``channels``.

    Args:
        bn: the BN's running statistics, eps and optional affine parameters.
        channels: the number of channels the BN must have.
        what: a name for error messages.
    Returns:
        ``(scale, shift)`` with ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``.
    """
    mean = _check_vector(bn.running_mean, channels, f"{what} running_mean")
    var = _check_vector(bn.running_var, channels, f"{what} running_var")
    if bn.running_mean is None or bn.running_var is None:  # pragma: no cover - dataclass guard
        raise UnsupportedError(f"{what} has no running statistics")
    if (var < 0).any():
        raise InputError(f"{what} running_var has negative values")
    if not (bn.eps >= 0) or bn.eps != bn.eps:
        raise InputError(f"{what} eps={bn.eps} is not a non-negative number")
    denom = torch.sqrt(var + float(bn.eps))
    if (denom == 0).any():
        raise InputError(f"{what} has running_var + eps == 0; the BN divides by zero")
    gamma = _check_vector(bn.weight, channels, f"{what} weight")
    beta = _check_vector(bn.bias, channels, f"{what} bias")
    scale = (gamma if gamma is not None else torch.ones(channels, dtype=FLOAT64)) / denom
    shift = (beta if beta is not None else torch.zeros(channels, dtype=FLOAT64)) - mean * scale
    return scale, shift


def fold_batch_norm(weight: Tensor, bias: Tensor | None, bn: BatchNorm) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BN into the conv before it.

    Args:
        weight: conv weight ``(out, in/groups, kh, kw)``.
        bias: the conv's own bias or None.
        bn: the BN that follows the conv.
    Returns:
        ``(weight, bias)`` in float64 such that ``conv(x, w, b) == bn(conv(x, weight, bias))``.
    """
    w = _as_float64(weight, "conv weight")
    out = int(w.shape[0])
    b = _check_vector(bias, out, "conv bias")
    scale, shift = bn_scale_shift(bn, out)
    folded_w = w * scale.reshape(-1, 1, 1, 1)
    folded_b = shift if b is None else b * scale + shift
    return folded_w, folded_b


def center_kernel(weight: Tensor, kernel_size: Pair) -> Tensor:
    """Zero-pad a smaller kernel so it sits in the centre of ``kernel_size``.

    Args:
        weight: ``(out, in/groups, kh, kw)`` with ``kh <= KH``, ``kw <= KW`` and even differences.
        kernel_size: the target ``(KH, KW)``.
    Returns:
        A ``(out, in/groups, KH, KW)`` tensor.
    """
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    big_h, big_w = kernel_size
    dh, dw = big_h - kh, big_w - kw
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise UnsupportedError(
            f"a {kh}x{kw} kernel cannot be centred in a {big_h}x{big_w} kernel"
        )
    # F.pad takes the last dimension first: (left, right, top, bottom).
    return F.pad(weight, (dw // 2, dw // 2, dh // 2, dh // 2))


def identity_kernel(channels: int, in_per_group: int, kernel_size: Pair) -> Tensor:
    """The kernel of ``y = x`` as a (grouped) conv: ``K[i, i % in_per_group, centre] = 1``.

    Args:
        channels: in == out channels.
        in_per_group: input channels each group sees (``channels // groups``).
        kernel_size: ``(KH, KW)``, both odd.
    Returns:
        A float64 ``(channels, in_per_group, KH, KW)`` tensor.
    """
    kh, kw = kernel_size
    if kh % 2 == 0 or kw % 2 == 0:
        raise UnsupportedError(f"an identity branch cannot be centred in an even {kh}x{kw} kernel")
    if in_per_group <= 0 or channels % in_per_group:
        raise UnsupportedError(
            f"{channels} channels do not split into groups of {in_per_group} for the identity"
        )
    kernel = torch.zeros(channels, in_per_group, kh, kw, dtype=FLOAT64)
    rows = torch.arange(channels)
    kernel[rows, rows % in_per_group, kh // 2, kw // 2] = 1.0
    return kernel


def _apply_scale(weight: Tensor, bias: Tensor, scale: Tensor | None, what: str) -> tuple[Tensor, Tensor]:
    s = _check_vector(scale, int(weight.shape[0]), f"{what} scale")
    if s is None:
        return weight, bias
    return weight * s.reshape(-1, 1, 1, 1), bias * s


def _check_alignment(branches: Branches, kernel_size: Pair) -> None:
    padding = branches.resolved_padding
    for index, conv in enumerate(branches.convs):
        kh, kw = conv.kernel_size
        if (kh, kw) != (1, 1) and conv.dilation != branches.dilation:
            raise UnsupportedError(
                f"branch {index} has dilation {conv.dilation} but the block has {branches.dilation}"
            )
        expected_padding = [padding[d] - branches.dilation[d] * (kernel_size[d] - (kh, kw)[d]) // 2 for d in range(2)]
        if conv.padding_mode not in (None, branches.padding_mode) and max(expected_padding) > 0:
            # Reflect/replicate/circular padding of branches with one mode fuses exactly (the padded
            # pixels do not depend on the amount of padding); two modes differ at the border.
            raise UnsupportedError(
                f"branch {index} ({kh}x{kw}) pads with padding_mode={conv.padding_mode!r} but the block's "
                f"main conv with {branches.padding_mode!r}; one fused conv has one padding mode"
            )
        if conv.padding is None:
            continue
        for dim, (big, small) in enumerate(zip(kernel_size, (kh, kw))):
            expected = expected_padding[dim]
            if conv.padding[dim] != expected:
                raise UnsupportedError(
                    f"branch {index} ({kh}x{kw}) has padding {conv.padding}, which does not "
                    f"line up with the {kernel_size[0]}x{kernel_size[1]} kernel's padding {padding}"
                )
    if branches.identity is not None:
        if branches.stride != (1, 1):
            raise UnsupportedError(f"an identity branch with stride {branches.stride}")
        centre = (branches.dilation[0] * (kernel_size[0] // 2), branches.dilation[1] * (kernel_size[1] // 2))
        if padding != centre:
            raise UnsupportedError(
                f"an identity branch needs padding {centre} for a {kernel_size} kernel, not {padding}"
            )


def _add_centred(target: Tensor, kernel: Tensor) -> None:
    """``target += center_kernel(kernel)`` without allocating the padded kernel."""
    big_h, big_w = target.shape[2], target.shape[3]
    kh, kw = kernel.shape[2], kernel.shape[3]
    dh, dw = big_h - kh, big_w - kw
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise UnsupportedError(f"a {kh}x{kw} kernel cannot be centred in a {big_h}x{big_w} kernel")
    target[:, :, dh // 2 : dh // 2 + kh, dw // 2 : dw // 2 + kw] += kernel


def _raise_non_finite(branches: Branches) -> None:
    """Name the branch whose weight holds NaN/Inf (checked once on the sum, diagnosed only then)."""
    for index, conv in enumerate(branches.convs):
        if not torch.isfinite(conv.weight.detach()).all():
            raise InputError(f"branch {index} weight holds NaN or Inf")
    raise InputError("the fused weight overflows (NaN or Inf): the branch weights or BN scales are too large")


def fuse_branches(branches: Branches) -> FusedConv:
    """Fuse every branch of a block into one conv.

    Args:
        branches: the neutral description of the block.
    Returns:
        A float64 :class:`FusedConv` equal to the block's eval-mode output.
    Raises:
        UnsupportedError: branches that cannot be summed into one conv (misaligned padding,
            mixed groups, identity with stride); InputError: malformed tensors.
    """
    kernel_size = branches.kernel_size
    _check_alignment(branches, kernel_size)
    out = branches.out_channels
    groups = branches.resolved_groups
    per_group_values = {int(c.weight.shape[1]) for c in branches.convs}
    if len(per_group_values) > 1:
        raise UnsupportedError(
            f"branches disagree on input channels per group: {sorted(per_group_values)}"
        )
    in_per_group = per_group_values.pop() if per_group_values else branches.resolved_in_channels // groups

    weight: Tensor | None = None
    bias = torch.zeros(out, dtype=FLOAT64)
    for index, conv in enumerate(branches.convs):
        what = f"branch {index}"
        w = _as_float64(conv.weight, f"{what} weight")
        if w.dim() != 4:
            raise InputError(f"{what} weight has {w.dim()} dimensions; a conv weight has 4")
        if int(w.shape[0]) != out:
            raise UnsupportedError(
                f"{what} has {int(w.shape[0])} output channels; the block has {out}"
            )
        if conv.bn is not None:
            w, b = fold_batch_norm(w, conv.bias, conv.bn)
        else:
            b = _check_vector(conv.bias, out, f"{what} bias")
            b = torch.zeros(out, dtype=FLOAT64) if b is None else b
        w, b = _apply_scale(w, b, conv.scale, what)
        if weight is None and tuple(w.shape[2:]) == kernel_size:
            # The first full-size branch becomes the accumulator (a copy if it is the source itself).
            weight = w.clone() if w.data_ptr() == conv.weight.data_ptr() else w
        else:
            if weight is None:
                weight = torch.zeros(out, in_per_group, *kernel_size, dtype=FLOAT64)
            _add_centred(weight, w)
        bias += b
    if weight is None:
        weight = torch.zeros(out, in_per_group, *kernel_size, dtype=FLOAT64)

    if branches.identity is not None:
        # resolved_in_channels assumes in == out when an identity is present, so also check the
        # input channels the conv weights actually imply (in_per_group * groups).
        in_channels = {branches.resolved_in_channels}
        if branches.convs:
            in_channels.add(in_per_group * groups)
        if in_channels != {out}:
            shown = "/".join(str(c) for c in sorted(in_channels))
            raise UnsupportedError(
                f"an identity branch needs in == out channels, not {shown} -> {out}"
            )
        identity_bn = branches.identity.bn
        if identity_bn is not None and identity_bn.num_features != out:
            raise UnsupportedError(
                f"the identity BatchNorm has {identity_bn.num_features} channels but the block has {out}: "
                "an identity branch needs in == out"
            )
        kh, kw = kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise UnsupportedError(f"an identity branch cannot be centred in an even {kh}x{kw} kernel")
        if identity_bn is not None:
            diagonal, b = bn_scale_shift(identity_bn, out, "identity BatchNorm")
        else:
            diagonal, b = torch.ones(out, dtype=FLOAT64), torch.zeros(out, dtype=FLOAT64)
        s = _check_vector(branches.identity.scale, out, "identity scale")
        if s is not None:
            diagonal, b = diagonal * s, b * s
        rows = torch.arange(out)
        weight[rows, rows % in_per_group, kh // 2, kw // 2] += diagonal
        bias += b

    if not torch.isfinite(weight.sum()):  # NaN/Inf anywhere propagates into the sum; no mask is built
        _raise_non_finite(branches)
    if branches.post_bn is not None:
        scale, shift = bn_scale_shift(branches.post_bn, out, "post-sum BatchNorm")
        weight = weight * scale.reshape(-1, 1, 1, 1)
        bias = bias * scale + shift

    return FusedConv(
        weight=weight.contiguous(),
        bias=bias.contiguous(),
        stride=branches.stride,
        padding=branches.resolved_padding,
        dilation=branches.dilation,
        groups=groups,
        padding_mode=branches.padding_mode,
    )


def fuse_conv_bn(weight: Tensor, bias: Tensor | None, bn: BatchNorm, **geometry) -> FusedConv:
    """Fold a plain conv→BN pair (no parallel branches) into one conv, float64."""
    w, b = fold_batch_norm(weight, bias, bn)
    return FusedConv(weight=w.contiguous(), bias=b.contiguous(), **geometry)
