"""The weight-space steps of :mod:`repvgg_cli.algebra`: two convs in sequence as one, a
per-channel affine map before a conv, a dilated kernel spread into the undilated one it equals, a
grouped kernel written with fewer groups. Each checks it is exact and refuses with the reason.

Tensors in, tensors out, float64: no modules, no IO. Sources: DingXiaoH/DiverseBranchBlock
``dbb_transforms.py`` (``transI_fusebn``, ``transIII_1x1_kxk``, the same compositions, written
here for any groups and checked), after DESIGN.md's algebra.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UnsupportedError
from ..fusion.bn import bn_scale_shift
from ..fusion.values import FLOAT64, Branches, ConvBranch, FusedConv, IdentityBranch

Map = Branches


def affine_then_conv(f: IdentityBranch, second: FusedConv, pad_first: bool) -> FusedConv:
    """A per-channel affine ``x * s + t`` (BN, then scale) before a conv: ``W' = W * s[in]``,
    ``b' = b + sum(W * t[in])``. The conv's zero border would see ``0``, not ``t``."""
    channels = second.in_channels
    s = torch.ones(channels, dtype=FLOAT64)
    t = torch.zeros(channels, dtype=FLOAT64)
    if f.bn is not None:
        s, t = bn_scale_shift(f.bn, channels, "BatchNorm before a conv")
    if f.scale is not None:
        factor = _vector(f.scale, channels, "scale before a conv")
        s, t = s * factor, t * factor
    if max(second.padding) > 0 and not pad_first and bool((t != 0).any()):
        raise UnsupportedError(
            "a BatchNorm with a shift before a padded conv is not one conv: the padded border sees 0, "
            "not the BN's output for 0 (the block must pad its input first)"
        )
    per_group = int(second.weight.shape[1])
    rows = torch.arange(channels).reshape(second.groups, per_group)
    out_per_group = second.out_channels // second.groups
    w = second.weight.clone()
    extra = torch.zeros(second.out_channels, dtype=FLOAT64)
    for g in range(second.groups):
        block = w[g * out_per_group : (g + 1) * out_per_group]
        extra[g * out_per_group : (g + 1) * out_per_group] = (block * t[rows[g]].reshape(1, -1, 1, 1)).sum((1, 2, 3))
        block.mul_(s[rows[g]].reshape(1, -1, 1, 1))
    return replace(second, weight=w, bias=second.bias + extra)


def _dense(fused: FusedConv) -> Tensor:
    """The weight as one ``(out, in, kh, kw)`` kernel (block-diagonal over the groups)."""
    if fused.groups == 1:
        return fused.weight
    out, per_group = fused.out_channels, int(fused.weight.shape[1])
    out_per_group = out // fused.groups
    dense = torch.zeros(out, per_group * fused.groups, *fused.kernel_size, dtype=FLOAT64)
    for g in range(fused.groups):
        dense[g * out_per_group : (g + 1) * out_per_group, g * per_group : (g + 1) * per_group] = \
            fused.weight[g * out_per_group : (g + 1) * out_per_group]
    return dense


def _grouped(dense: Tensor, candidates: tuple[int, ...]) -> tuple[Tensor, int]:
    """``dense`` as a grouped kernel with the most groups among ``candidates`` whose blocks off
    the diagonal are exactly zero (1 always is)."""
    out, cin = int(dense.shape[0]), int(dense.shape[1])
    for groups in sorted(set(candidates), reverse=True):
        if groups <= 1 or out % groups or cin % groups:
            continue
        opg, ipg = out // groups, cin // groups
        mask = torch.ones(out, cin, dtype=torch.bool)
        for g in range(groups):
            mask[g * opg : (g + 1) * opg, g * ipg : (g + 1) * ipg] = False
        if not bool(dense[mask].any()):
            return torch.cat([dense[g * opg : (g + 1) * opg, g * ipg : (g + 1) * ipg] for g in range(groups)]), groups
    return dense, 1


def _is_pointwise(fused: FusedConv) -> bool:
    return fused.kernel_size == (1, 1) and fused.stride == (1, 1) and fused.padding == (0, 0)


def conv_then_conv(first: FusedConv, second: FusedConv, pad_first: bool) -> FusedConv:
    """Two convs in sequence as one (see :func:`then` for when that is exact)."""
    if first.out_channels != second.in_channels:
        raise UnsupportedError(f"a conv with {first.out_channels} outputs cannot feed one with "
                               f"{second.in_channels} inputs")
    if first.padding_mode != "zeros" or second.padding_mode != "zeros":
        raise UnsupportedError("only zero-padded convs compose into one conv")
    if _is_pointwise(second):
        pass  # any conv, then a 1×1: exact whatever the first pads (the 1×1 adds no border)
    elif first.stride != (1, 1) or first.dilation != (1, 1) or second.dilation != (1, 1):
        raise UnsupportedError(
            f"a conv with stride {first.stride} or dilation {first.dilation}/{second.dilation} before a "
            f"{second.kernel_size[0]}x{second.kernel_size[1]} conv is not one conv"
        )
    elif max(second.padding) > 0 and not pad_first:
        if not _is_pointwise(first) or bool((first.bias != 0).any()):
            raise UnsupportedError(
                "a conv that pads its input after another map is one conv only when that map gives 0 "
                "for a zero input (a 1x1 conv without bias), or when the block pads its input first"
            )
    if first.groups == second.groups:  # group by group: no block-diagonal kernel is built
        groups = first.groups
        w1 = first.weight.reshape(groups, first.out_channels // groups, *first.weight.shape[1:])
        w2 = second.weight.reshape(groups, second.out_channels // groups, *second.weight.shape[1:])
        weight = torch.cat([_compose_kernels(w1[g], w2[g]) for g in range(groups)])
        taps = second.weight.sum((2, 3)).reshape(groups, -1, w2.shape[2])
        pre = first.bias.reshape(groups, -1, 1)
        bias = second.bias + torch.bmm(taps, pre).reshape(-1)
        candidates: tuple[int, ...] = (groups,)
    else:
        w2 = _dense(second)
        weight = _compose_kernels(_dense(first), w2)
        bias = second.bias + (w2.sum((2, 3)) @ first.bias)
        candidates = (first.groups, second.groups)
    if _is_pointwise(second):
        stride, padding, dilation = first.stride, first.padding, first.dilation
    else:
        stride, dilation = second.stride, second.dilation
        padding = (first.padding[0] + second.padding[0], first.padding[1] + second.padding[1])
    grouped, groups = (weight, candidates[0]) if len(candidates) == 1 else _grouped(weight, candidates)
    return FusedConv(weight=grouped, bias=bias, stride=stride, padding=padding, dilation=dilation, groups=groups)


def _compose_kernels(w1: Tensor, w2: Tensor) -> Tensor:
    """The ``(out, in, kh, kw)`` kernel of ``w1`` then ``w2`` (``(mid, in, ...)``, ``(out, mid, ...)``):
    a product over ``mid`` for a 1×1 kernel, else the full 2-D convolution of the two kernels."""
    k1, k2 = tuple(w1.shape[2:]), tuple(w2.shape[2:])
    if k1 == (1, 1):
        return torch.einsum("omhw,mi->oihw", w2, w1[:, :, 0, 0])
    if k2 == (1, 1):
        return torch.einsum("om,mihw->oihw", w2[:, :, 0, 0], w1)
    composed = F.conv2d(w1.permute(1, 0, 2, 3), w2.flip(2, 3), padding=(k2[0] - 1, k2[1] - 1))
    return composed.permute(1, 0, 2, 3).contiguous()


def spread(term: ConvBranch) -> ConvBranch:
    """A dilated conv term as the undilated kernel it equals: ``(r(k-1)+1)`` wide, its taps every
    r-th place, zeros between (same dtype: values are only placed). Its padding stays the same."""
    rh, rw = term.dilation
    if (rh, rw) == (1, 1):
        return term
    kh, kw = term.kernel_size
    dense = term.weight.detach().new_zeros(*term.weight.shape[:2], rh * (kh - 1) + 1, rw * (kw - 1) + 1)
    dense[:, :, ::rh, ::rw] = term.weight.detach()
    return replace(term, weight=dense, dilation=(1, 1))


def regrouped(value: Map, groups: int) -> Map:
    """``value`` (a conv with ``value.groups`` groups) written with fewer ``groups`` (a divisor):
    each kernel placed in the wider block of inputs its group sees, zeros elsewhere (exact)."""
    if value.groups % groups:
        raise UnsupportedError(f"a conv with {value.groups} groups cannot be written with {groups}")
    terms = []
    for term in value.convs:
        out, per_group = int(term.weight.shape[0]), int(term.weight.shape[1])
        channels = per_group * value.groups
        wide = torch.zeros(out, channels // groups, *term.weight.shape[2:], dtype=term.weight.dtype)
        out_per_fine, out_per_coarse = out // value.groups, out // groups
        for g in range(value.groups):
            rows = slice(g * out_per_fine, (g + 1) * out_per_fine)
            offset = g * per_group - (g * out_per_fine // out_per_coarse) * (channels // groups)
            wide[rows, offset : offset + per_group] = term.weight[rows].detach()
        terms.append(replace(term, weight=wide))
    return replace(value, convs=tuple(terms), groups=groups)


def _vector(t: Tensor, length: int, what: str) -> Tensor:
    flat = t.detach().to(FLOAT64).reshape(-1)
    if flat.shape[0] != length:
        raise UnsupportedError(f"{what} has {flat.shape[0]} channels; {length} are expected")
    return flat
