"""Pure tensor math of structural re-parameterization.

A RepVGG-style block is a sum of parallel branches (k×k conv+BN, smaller convs+BN, an
identity, optionally scaled), maybe followed by a BatchNorm. Because every branch is linear
in eval mode, the sum equals one k×k convolution with bias. This module computes that conv.

Tensors in, tensors out: no ``nn.Module`` walking, no IO. Everything is computed in float64,
a few output channels at a time, and rounded once into the dtype asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple, Protocol

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
    return replace(branches, convs=convs, identity=identity, post_bn=bn(branches.post_bn),
                   post_scale=t(branches.post_scale), ops=None)


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
    rows, cols = _centred_slice(kernel_size, (int(weight.shape[2]), int(weight.shape[3])))
    # F.pad takes the last dimension first: (left, right, top, bottom).
    return F.pad(weight, (cols.start, cols.start, rows.start, rows.start))


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


CHUNK_BYTES = 4 << 20
"""float64 working memory per chunk of output channels: large weights are fused (and checked, see
``verify``) a few rows at a time, so no float64 copy of a whole weight is ever made."""


def chunk_rows(row_numel: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """How many output channels of ``row_numel`` float64 elements each fit in one chunk (at least 1)."""
    return max(1, chunk_bytes // (8 * max(1, row_numel)))


def _centred_slice(big: Pair, small: Pair) -> tuple[slice, slice]:
    """Where a ``small`` kernel sits in the centre of a ``big`` one."""
    dh, dw = big[0] - small[0], big[1] - small[1]
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise UnsupportedError(f"a {small[0]}x{small[1]} kernel cannot be centred in a {big[0]}x{big[1]} kernel")
    return slice(dh // 2, dh // 2 + small[0]), slice(dw // 2, dw // 2 + small[1])


def raise_non_finite(branches: Branches) -> None:
    """Raise the :class:`InputError` for a fused weight found to hold NaN/Inf, naming the branch
    weight that holds one if any (the fast checks look at sums; this looks element-wise)."""
    for index, conv in enumerate(branches.convs):
        if not torch.isfinite(conv.weight.detach()).all():
            raise InputError(f"branch {index} weight holds NaN or Inf")
    raise InputError("the fused weight overflows (NaN or Inf): the branch weights or BN scales are too large")


def _checked_weight(weight: Tensor, out: int, what: str) -> Tensor:
    """A branch weight validated (floating, 4-D, ``out`` rows) but not copied or upcast."""
    if not isinstance(weight, Tensor):
        raise InputError(f"{what} weight is a {type(weight).__name__}, not a tensor")
    if not weight.is_floating_point():
        raise InputError(f"{what} weight has dtype {weight.dtype}; a floating-point tensor is needed")
    if weight.dim() != 4:
        raise InputError(f"{what} weight has {weight.dim()} dimensions; a conv weight has 4")
    if int(weight.shape[0]) != out:
        raise UnsupportedError(f"{what} has {int(weight.shape[0])} output channels; the block has {out}")
    return weight.detach()


class RowObserver(Protocol):
    """Sees every chunk :func:`fuse_branches` works on, while it is in cache (e.g. to compute a
    check's matrix-vector products without reading the weights again)."""

    def source(self, index: int, start: int, stop: int, rows: Tensor) -> None:
        """Rows ``start:stop`` of ``branches.convs[index].weight``, upcast exactly to float64
        before any BN or scale factor. Read only, and only during the call."""

    def fused(self, start: int, stop: int, rows: Tensor, scratch: Tensor) -> None:
        """Rows ``start:stop`` of the fused weight as returned (in its dtype), once written;
        ``scratch`` is float64 work space of the same shape the observer may overwrite."""


class _Term(NamedTuple):
    """One conv branch in the sum: ``weight * factor`` (per output channel) placed at ``window``
    of the fused kernel."""

    index: int
    weight: Tensor
    factor: Tensor | None
    window: tuple[slice, slice]


def _rows64(buffer: Tensor, term: _Term, start: int, stop: int, observer: RowObserver | None) -> Tensor:
    """Rows ``start:stop`` of the term's weight upcast into ``buffer`` (reused from chunk to chunk:
    a new allocation per chunk would cost more in page faults than the arithmetic), shown to the
    observer, then times the factor."""
    rows = buffer[: stop - start].copy_(term.weight[start:stop])
    if observer is not None:
        observer.source(term.index, start, stop, rows)
    return rows if term.factor is None else rows.mul_(term.factor[start:stop].reshape(-1, 1, 1, 1))


def fused_weight_shape(branches: Branches) -> tuple[int, int, int, int]:
    """The shape :func:`fuse_branches` gives the fused weight: ``(out, in/groups, KH, KW)``
    (known before fusing, so a writer can lay out a file first)."""
    per_group_values = {int(c.weight.shape[1]) for c in branches.convs}
    if len(per_group_values) > 1:
        raise UnsupportedError(
            f"branches disagree on input channels per group: {sorted(per_group_values)}"
        )
    in_per_group = (per_group_values.pop() if per_group_values
                    else branches.resolved_in_channels // branches.resolved_groups)
    return (branches.out_channels, in_per_group, *branches.kernel_size)


def fuse_branches(branches: Branches, dtype: torch.dtype = FLOAT64, rows_per_chunk: int | None = None,
                  out: Tensor | None = None, observer: RowObserver | None = None,
                  check_finite: bool = True) -> FusedConv:
    """Fuse every branch of a block into one conv.

    The arithmetic is float64 whatever ``dtype`` is: each chunk of output channels is upcast,
    fused and only then cast to ``dtype``, so asking for float32 gives the float64 result
    correctly rounded, bit for bit, without a float64 copy of the whole weight.

    Args:
        branches: the neutral description of the block.
        dtype: the dtype of the returned tensors (float64 by default).
        rows_per_chunk: output channels per chunk; None: as many as fit in :data:`CHUNK_BYTES`.
        out: where to write the fused weight (its shape is :func:`fused_weight_shape`, its dtype
            ``dtype``), e.g. a buffer reused from block to block; None: a new tensor.
        observer: shown every source chunk and every fused chunk (see :class:`RowObserver`).
        check_finite: raise :class:`InputError` when the fused weight holds NaN/Inf (one sum per
            chunk). A caller whose observer sees every value anyway (``verify.CentreProbe``)
            may take the check over and pass False; it then calls :func:`raise_non_finite`.
    Returns:
        A :class:`FusedConv` equal to the block's eval-mode output.
    Raises:
        UnsupportedError: branches that cannot be summed into one conv (misaligned padding,
            mixed groups, identity with stride); InputError: malformed tensors.
    """
    kernel_size = branches.kernel_size
    _check_alignment(branches, kernel_size)
    target = out
    out, in_per_group = fused_weight_shape(branches)[:2]
    groups = branches.resolved_groups

    # Per output channel, each branch is ``weight * factor`` plus a bias: BN and scale fold into
    # float64 vectors first; the weights are touched once, chunk by chunk, below.
    terms: list[_Term] = []
    bias = torch.zeros(out, dtype=FLOAT64)
    for index, conv in enumerate(branches.convs):
        what = f"branch {index}"
        w = _checked_weight(conv.weight, out, what)
        b = _check_vector(conv.bias, out, f"{what} bias")
        factor: Tensor | None = None
        if conv.bn is not None:
            factor, shift = bn_scale_shift(conv.bn, out)
            b = shift if b is None else b * factor + shift
        elif b is None:
            b = torch.zeros(out, dtype=FLOAT64)
        s = _check_vector(conv.scale, out, f"{what} scale")
        if s is not None:
            factor = s if factor is None else factor * s
            b = b * s
        terms.append(_Term(index, w, factor, _centred_slice(kernel_size, conv.kernel_size)))
        bias += b
    # The first full-size branch starts the sum (no zero-filled accumulator to add it to).
    terms.sort(key=lambda term: tuple(term.weight.shape[2:]) != kernel_size)
    first = terms[0] if terms and tuple(terms[0].weight.shape[2:]) == kernel_size else None
    rest = terms[1:] if first is not None else terms

    diagonal: Tensor | None = None
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
        bias += b

    post: Tensor | None = None
    if branches.post_bn is not None:
        post, shift = bn_scale_shift(branches.post_bn, out, "post-sum BatchNorm")
        bias = bias * post + shift
    post_scale = _check_vector(branches.post_scale, out, "post-sum scale")
    if post_scale is not None:
        post = post_scale if post is None else post * post_scale
        bias = bias * post_scale

    weight = torch.empty(out, in_per_group, *kernel_size, dtype=dtype) if target is None else target
    if tuple(weight.shape) != (out, in_per_group, *kernel_size) or weight.dtype != dtype:
        raise ValueError(f"out= has shape {tuple(weight.shape)} and dtype {weight.dtype}; the fused weight is "
                         f"{(out, in_per_group, *kernel_size)}, {dtype}")
    step = min(out, rows_per_chunk or chunk_rows(in_per_group * kernel_size[0] * kernel_size[1]))
    # float64 work space, reused from chunk to chunk: the sum, and one buffer per branch shape
    total = torch.empty(step, in_per_group, *kernel_size, dtype=FLOAT64)
    parts = {shape: torch.empty(step, in_per_group, *shape, dtype=FLOAT64)
             for shape in {tuple(term.weight.shape[2:]) for term in rest}}
    for start in range(0, out, step):
        stop = min(out, start + step)

        acc = total[: stop - start].zero_() if first is None else _rows64(total, first, start, stop, observer)
        for term in rest:
            rows_h, rows_w = term.window
            acc[:, :, rows_h, rows_w] += _rows64(parts[tuple(term.weight.shape[2:])], term, start, stop, observer)
        if diagonal is not None:
            rows = torch.arange(start, stop)
            acc[rows - start, rows % in_per_group, kernel_size[0] // 2, kernel_size[1] // 2] += diagonal[start:stop]
        # NaN/Inf anywhere propagates into the sum; no mask is built
        if check_finite and not torch.isfinite(acc.sum()):
            raise_non_finite(branches)
        if post is not None:
            acc.mul_(post[start:stop].reshape(-1, 1, 1, 1))
        weight[start:stop] = acc
        if observer is not None:
            observer.fused(start, stop, weight[start:stop], acc)
    return FusedConv(
        weight=weight,
        bias=bias.to(dtype),
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
