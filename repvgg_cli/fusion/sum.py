"""The sum of a block's branches as one conv, a few output channels at a time, in float64.

See :func:`fuse_branches`. The per-channel factors (BN, scales) are folded into vectors first;
each branch weight is then read once, chunk by chunk, and the result rounded once into the dtype
asked for.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from ..errors import InputError, UnsupportedError
from .bn import bn_scale_shift, check_vector
from .kernels import centred_slice, check_alignment
from .values import FLOAT64, Branches, FusedConv

CHUNK_BYTES = 4 << 20
"""float64 working memory per chunk of output channels: large weights are fused (and checked, see
``verify``) a few rows at a time, so no float64 copy of a whole weight is ever made."""


def chunk_rows(row_numel: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """How many output channels of ``row_numel`` float64 elements each fit in one chunk (at least 1)."""
    return max(1, chunk_bytes // (8 * max(1, row_numel)))


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
    check_alignment(branches, kernel_size)
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
        b = check_vector(conv.bias, out, f"{what} bias")
        factor: Tensor | None = None
        if conv.bn is not None:
            factor, shift = bn_scale_shift(conv.bn, out)
            b = shift if b is None else b * factor + shift
        elif b is None:
            b = torch.zeros(out, dtype=FLOAT64)
        s = check_vector(conv.scale, out, f"{what} scale")
        if s is not None:
            factor = s if factor is None else factor * s
            b = b * s
        terms.append(_Term(index, w, factor, centred_slice(kernel_size, conv.kernel_size)))
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
        s = check_vector(branches.identity.scale, out, "identity scale")
        if s is not None:
            diagonal, b = diagonal * s, b * s
        bias += b

    post: Tensor | None = None
    if branches.post_bn is not None:
        post, shift = bn_scale_shift(branches.post_bn, out, "post-sum BatchNorm")
        bias = bias * post + shift
    post_scale = check_vector(branches.post_scale, out, "post-sum scale")
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
