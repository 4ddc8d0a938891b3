"""The train form run as the ops it stands for, and the fused conv as shipped, in float64.

The reference is computed independently of :mod:`repvgg_cli.fusion`: every train-form branch
is run as the ops it stands for (``conv2d`` then eval-mode ``batch_norm``), in float64, and
summed. Weights are upcast a chunk of output channels at a time (never a float64 copy whole).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UnsupportedError
from ..fusion.sum import chunk_rows
from ..fusion.values import BatchNorm, Branches, ConvBranch, FusedConv
from .tolerance import FLOAT64

Rows = Sequence[int] | None
"""Output channels to compute (``None``: all of them)."""


def as_float64_vector(t: Tensor | None, rows: Rows) -> Tensor | None:
    if t is None:
        return None
    t = t.detach().to(device="cpu", dtype=FLOAT64)
    return t if rows is None else t[list(rows)]


def _bn_eval(x: Tensor, bn: BatchNorm, rows: Rows = None) -> Tensor:
    return F.batch_norm(
        x, as_float64_vector(bn.running_mean, rows), as_float64_vector(bn.running_var, rows), as_float64_vector(bn.weight, rows),
        as_float64_vector(bn.bias, rows), training=False, eps=bn.eps,
    )


def pad_input(x: Tensor, padding: tuple[int, int], padding_mode: str) -> Tensor:
    """Pad ``x`` explicitly (negative padding crops, as ACNet's cropped branches do), so the
    convs below run with padding 0 and can be restricted to the centre output."""
    ph, pw = padding
    if min(ph, pw) < 0:
        crop_h, crop_w = min(ph, 0), min(pw, 0)
        x = F.pad(x, (crop_w, crop_w, crop_h, crop_h))
    pad = (max(pw, 0), max(pw, 0), max(ph, 0), max(ph, 0))
    if not any(pad):
        return x
    if padding_mode == "zeros":
        return F.pad(x, pad)
    mode = {"reflect": "reflect", "replicate": "replicate", "circular": "circular"}[padding_mode]
    return F.pad(x, pad, mode=mode)


def _row_chunks(out: int, groups: int, in_per_group: int, row_numel: int):
    """``(first row, end row, first input channel, end input channel, groups)`` per chunk of
    output channels: whole groups, or a slice of one group's rows when a group is large."""
    step = chunk_rows(row_numel)
    per_group = out // groups
    if per_group >= step:
        for g in range(groups):
            for a in range(g * per_group, (g + 1) * per_group, step):
                yield a, min(a + step, (g + 1) * per_group), g * in_per_group, (g + 1) * in_per_group, 1
        return
    n = max(1, step // per_group)
    for g0 in range(0, groups, n):
        g1 = min(groups, g0 + n)
        yield g0 * per_group, g1 * per_group, g0 * in_per_group, g1 * in_per_group, g1 - g0


def centre_window(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """The receptive field of the centre output pixel in a padded input ``x``."""
    extent = (dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1)
    size = [(int(x.shape[2 + d]) - extent[d]) // stride[d] + 1 for d in range(2)]
    top, left = (size[0] // 2) * stride[0], (size[1] // 2) * stride[1]
    return x[:, :, top : top + extent[0], left : left + extent[1]]


def check_groups(shape: tuple[int, ...], groups: int, in_channels: int) -> None:
    """A conv weight of ``shape`` with ``groups`` takes ``in_channels`` inputs (else UnsupportedError)."""
    out, in_per_group = shape[0], shape[1]
    if groups < 1 or out % groups or in_channels != in_per_group * groups:
        raise UnsupportedError(
            f"a conv weight {tuple(shape)} with groups={groups} does not take {in_channels} input channels"
        )


def conv64(x: Tensor, weight: Tensor, bias: Tensor | None, *, stride: tuple[int, int], padding: tuple[int, int],
            dilation: tuple[int, int], groups: int, padding_mode: str, rows: Rows, centre: bool) -> Tensor:
    """``conv2d`` in float64, on the output channels ``rows`` only and, with ``centre``, at the
    centre output pixel only (its receptive field is cut out of the padded input).

    The weight is upcast a chunk of output channels at a time (never a float64 copy of it whole).
    """
    weight = weight.detach()
    out, in_per_group, kh, kw = (int(d) for d in weight.shape)
    check_groups((out, in_per_group, kh, kw), groups, int(x.shape[1]))
    x = pad_input(x, padding, padding_mode)
    if centre:
        x = centre_window(x, (kh, kw), stride, dilation)
    per_group = out // groups
    bias64 = as_float64_vector(bias, None)
    if rows is not None:
        rows = list(rows)
        if groups == 1:
            index = torch.tensor(rows, dtype=torch.long)
            return F.conv2d(x, weight.index_select(0, index.to(weight.device)).to(device="cpu", dtype=FLOAT64),
                            None if bias64 is None else bias64[rows], stride=stride, dilation=dilation)
        parts = [F.conv2d(x[:, (r // per_group) * in_per_group : (r // per_group + 1) * in_per_group],
                          weight[r : r + 1].to(device="cpu", dtype=FLOAT64),
                          None if bias64 is None else bias64[r : r + 1], stride=stride, dilation=dilation)
                 for r in rows]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    chunks = list(_row_chunks(out, groups, in_per_group, in_per_group * kh * kw))
    buffer = torch.empty(max(b - a for a, b, *_ in chunks), in_per_group, kh, kw, dtype=FLOAT64)
    parts = []
    for a, b, i0, i1, g in chunks:  # the buffer is reused: a fresh allocation per chunk costs page faults
        parts.append(F.conv2d(x[:, i0:i1], buffer[: b - a].copy_(weight[a:b]),
                              None if bias64 is None else bias64[a:b], stride=stride, dilation=dilation, groups=g))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _centre_of(x: Tensor) -> Tensor:
    """The centre pixel of ``x`` as a 1x1 map."""
    h, w = int(x.shape[2]) // 2, int(x.shape[3]) // 2
    return x[:, :, h : h + 1, w : w + 1]


def branch_geometry(branches: Branches, conv: ConvBranch) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(padding, dilation)`` a conv branch runs with: its own padding, or the block's padding
    less the difference of kernel extents; a 1x1 kernel's dilation does not matter (1)."""
    kernel, block_padding = branches.kernel_size, branches.resolved_padding
    kh, kw = conv.kernel_size
    padding = conv.padding
    if padding is None:
        padding = tuple(block_padding[d] - branches.dilation[d] * (kernel[d] - (kh, kw)[d]) // 2 for d in range(2))
    return padding, conv.dilation if (kh, kw) != (1, 1) else (1, 1)


def reference_forward(branches: Branches, x: Tensor, *, channels: Rows = None, centre: bool = False,
                      conv_outputs: Sequence[Tensor] | None = None) -> Tensor:
    """The train-form block's eval output, branch by branch, in float64.

    Args:
        branches: the block's neutral description (source tensors).
        x: input ``(N, C_in, H, W)``; cast to float64.
        channels: compute these output channels only (``None``: all).
        centre: compute the centre output pixel only (a ``1x1`` map): every kernel tap of every
            output channel, at the cost of one matrix-vector product.
        conv_outputs: with ``centre``, each conv branch's centre output (bias included, before its
            BN) already computed, e.g. by :class:`CentreProbe`; the rest of the block is run here.
    Returns:
        ``sum(scale_b * BN_b(conv_b(x))) [+ scale_id * BN_id(x)]``, then the post-sum BN if any.
    """
    x = x.to(FLOAT64)
    rows = None if channels is None else list(channels)
    groups = branches.resolved_groups
    total: Tensor | None = None
    if conv_outputs is not None and (len(conv_outputs) != len(branches.convs) or not centre or rows is not None):
        raise ValueError("conv_outputs: one centre output per conv branch, all channels")
    for index, conv in enumerate(branches.convs):
        if conv_outputs is not None:
            y = conv_outputs[index]
        else:
            padding, dilation = branch_geometry(branches, conv)
            y = conv64(x, conv.weight, conv.bias, stride=branches.stride, padding=padding, dilation=dilation,
                        groups=groups, padding_mode=branches.padding_mode, rows=rows, centre=centre)
        if conv.bn is not None:
            y = _bn_eval(y, conv.bn, rows)
        if conv.scale is not None:
            y = y * as_float64_vector(conv.scale, rows).reshape(1, -1, 1, 1)
        total = _add(total, y)
    if branches.identity is not None:
        y = x if rows is None else x[:, rows]
        if centre:
            y = _centre_of(y)
        if branches.identity.bn is not None:
            y = _bn_eval(y, branches.identity.bn, rows)
        if branches.identity.scale is not None:
            y = y * as_float64_vector(branches.identity.scale, rows).reshape(1, -1, 1, 1)
        total = _add(total, y)
    assert total is not None
    if branches.post_bn is not None:
        total = _bn_eval(total, branches.post_bn, rows)
    if branches.post_scale is not None:
        total = total * as_float64_vector(branches.post_scale, rows).reshape(1, -1, 1, 1)
    return total


def _add(total: Tensor | None, y: Tensor) -> Tensor:
    if total is None:
        return y
    if total.shape != y.shape:
        raise UnsupportedError(f"the branches' outputs differ in shape: {tuple(total.shape)} vs {tuple(y.shape)}")
    return total + y


def fused_forward(fused: FusedConv, x: Tensor, stride: tuple[int, int] | None = None, *, channels: Rows = None,
                  centre: bool = False) -> Tensor:
    """The deploy-form conv's output in float64 (its tensors upcast exactly from what ships);
    ``channels`` and ``centre`` as for :func:`reference_forward`."""
    return conv64(x.to(FLOAT64), fused.weight, fused.bias, stride=fused.stride if stride is None else stride,
                   padding=fused.padding, dilation=fused.dilation, groups=fused.groups,
                   padding_mode=fused.padding_mode, rows=channels, centre=centre)
