"""The algebra of structural re-parameterization: one value type, two operations.

Every branch of every re-parameterizable block is a composition of linear maps on feature maps:
a convolution (any kernel, stride, padding, dilation, groups, bias), an eval-mode BatchNorm, the
identity, an average pool, a per-channel scale, a linear layer. Each of them, and every sum and
composition of them, is an affine convolution: ``y = conv2d(x, W, stride, padding, dilation,
groups) + b``. This module builds that value (a :class:`~repvgg_cli.fusion.Branches`, the
"normal form") with two operations:

* :func:`then` ``(a, b)``: ``b`` applied to the output of ``a``;
* :func:`plus` ``(a, b)``: ``a(x) + b(x)`` (smaller and dilated kernels placed in the larger one,
  the identity and average pools as convolutions).

A family declares its block as an expression, e.g. RepVGG
``plus(then(conv3, bn3), then(conv1, bn1), then(identity(), bn_id))``, and
:func:`repvgg_cli.fusion.fuse_branches` computes the one conv it equals, in float64, a few output
channels at a time. Cheap steps stay symbolic (a BN after a conv is a per-row factor, a sum is a
list of terms); a step that needs new weights (a 1×1 conv before a k×k one, a BN before a conv)
is computed here in float64 and enters the sum as a new conv term. Every such step checks that it
is exact (padding, stride, groups) and refuses with the reason otherwise
(:class:`~repvgg_cli.errors.UnsupportedError`).

A value built with such steps is marked ``composite`` and keeps the expression it came from
(``ops``): its check then runs that expression with torch's own ops, not the computed weights.

Tensors in, tensors out: no modules, no IO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError, UnsupportedError
from .fusion import (
    FLOAT64,
    BatchNorm,
    Branches,
    ConvBranch,
    FusedConv,
    IdentityBranch,
    bn_scale_shift,
    fuse_branches,
    identity_kernel,
)

Pair = tuple[int, int]
Map = Branches
"""An affine convolution in normal form (see the module docstring)."""


# -- the expression, kept for the check of composite values -------------------------------------


@dataclass(frozen=True)
class ConvOp:
    """``conv2d`` with these parameters; ``padding=None``: centred (``dilation * (k // 2)``),
    ``groups=None``: as many as the input channels imply."""

    weight: Tensor
    bias: Tensor | None
    stride: Pair
    padding: Pair | None
    dilation: Pair
    groups: int | None
    padding_mode: str


@dataclass(frozen=True)
class AffineOp:
    """Eval-mode BatchNorm (or none), then a per-channel factor (or none)."""

    bn: BatchNorm | None
    scale: Tensor | None


@dataclass(frozen=True)
class IdentityOp:
    """``y = x``."""


@dataclass(frozen=True)
class ThenOp:
    """``second(first(x))``; with ``pad_first`` the input is zero-padded once by ``pad`` before
    ``first`` and no padding happens in between (how a chain built in weight space runs)."""

    first: object
    second: object
    pad_first: bool = False


@dataclass(frozen=True)
class PadOp:
    """Zero-pad the input by ``padding`` (rows, columns), then run ``inner``."""

    inner: object
    padding: Pair


@dataclass(frozen=True)
class PlusOp:
    """The sum of the terms' outputs."""

    terms: tuple


def ops_of(value: Map) -> object:
    """The expression a value stands for (built on demand for values that were never composed)."""
    if value.ops is not None:
        return value.ops
    terms: list[object] = []
    for c in value.convs:
        op: object = ConvOp(c.weight, c.bias, value.stride, c.padding, c.dilation, value.groups,
                            c.padding_mode or value.padding_mode)
        if c.bn is not None or c.scale is not None:
            op = ThenOp(op, AffineOp(c.bn, c.scale))
        terms.append(op)
    if value.identity is not None:
        op = IdentityOp()
        if value.identity.bn is not None or value.identity.scale is not None:
            op = ThenOp(op, AffineOp(value.identity.bn, value.identity.scale))
        terms.append(op)
    total: object = terms[0] if len(terms) == 1 else PlusOp(tuple(terms))
    if value.post_bn is not None or value.post_scale is not None:
        total = ThenOp(total, AffineOp(value.post_bn, value.post_scale))
    return total


# -- leaves -----------------------------------------------------------------------------------


def _pair(value: int | tuple[int, ...] | None, default: Pair | None = None) -> Pair | None:
    if value is None:
        return default
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def conv(weight: Tensor, bias: Tensor | None = None, *, stride: int | Pair = 1, padding: int | Pair | None = None,
         dilation: int | Pair = 1, groups: int | None = None, padding_mode: str = "zeros",
         in_channels: int | None = None, known: bool = False) -> Map:
    """A convolution ``(out, in/groups, kh, kw)`` with an optional bias.

    Args:
        weight, bias: the conv's tensors (any floating dtype; read, never changed).
        stride, padding, dilation, groups, padding_mode: its geometry; ``padding=None`` means
            centred (``dilation * (k // 2)``), ``groups=None`` unknown (a state dict does not say).
        in_channels: the input channels, when known.
        known: the geometry was read from a live module (not assumed from a state dict).
    """
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise InputError(f"a conv weight must be a 4-D tensor, not {_describe(weight)}")
    own_padding = _pair(padding)
    return Branches(
        convs=(ConvBranch(weight=weight, bias=bias, padding=own_padding, dilation=_pair(dilation),
                          padding_mode=padding_mode),),
        groups=groups, stride=_pair(stride), padding=own_padding, dilation=_pair(dilation),
        padding_mode=padding_mode, in_channels=in_channels, geometry_known=known,
    )


def linear(weight: Tensor, bias: Tensor | None = None) -> Map:
    """A linear layer ``(out, in)`` as the 1×1 convolution it is on a ``(N, in, 1, 1)`` input."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise InputError(f"a linear weight must be a 2-D tensor, not {_describe(weight)}")
    return conv(weight.reshape(*weight.shape, 1, 1), bias, padding=0, groups=1,
                in_channels=int(weight.shape[1]))


def bn(norm: BatchNorm) -> Map:
    """An eval-mode BatchNorm: ``x * gamma / sqrt(var + eps) + (beta - mean * gamma / sqrt(var + eps))``."""
    return Branches(convs=(), identity=IdentityBranch(bn=norm), in_channels=norm.num_features)


def scale(factor: Tensor) -> Map:
    """A per-channel factor (a layer scale, ``-1`` for a subtracted branch, ...)."""
    if not isinstance(factor, Tensor) or not factor.is_floating_point():
        raise InputError(f"a scale must be a floating-point tensor, not {_describe(factor)}")
    flat = factor.detach().reshape(-1)
    return Branches(convs=(), identity=IdentityBranch(scale=flat), in_channels=int(flat.shape[0]))


def shift(offset: Tensor) -> Map:
    """``x + offset`` per channel (a GRN's beta, a bias between two layers): a BatchNorm with mean
    ``-offset``, variance 1 and eps 0, which computes exactly that."""
    if not isinstance(offset, Tensor) or not offset.is_floating_point():
        raise InputError(f"a shift must be a floating-point tensor, not {_describe(offset)}")
    flat = offset.detach().reshape(-1).to(FLOAT64)
    return bn(BatchNorm(running_mean=-flat, running_var=torch.ones_like(flat), eps=0.0))


def identity(channels: int | None = None) -> Map:
    """``y = x`` (the skip branch)."""
    return Branches(convs=(), identity=IdentityBranch(), in_channels=channels)


def avg_pool(channels: int, kernel: int | Pair, stride: int | Pair | None = None, padding: int | Pair = 0,
             dtype: torch.dtype = FLOAT64) -> Map:
    """``AvgPool2d(kernel, stride, padding)`` with the zero padding counted (PyTorch's default
    ``count_include_pad=True``): the depthwise conv whose taps are all ``1 / (kh * kw)``."""
    kh, kw = _pair(kernel)
    weight = torch.full((channels, 1, kh, kw), 1.0 / (kh * kw), dtype=dtype)
    return conv(weight, stride=_pair(stride, (kh, kw)), padding=padding, groups=channels, in_channels=channels)


# -- then ---------------------------------------------------------------------------------------


def _is_affine(value: Map) -> bool:
    """A per-channel affine map (identity, BN, scale): no conv term, no post-sum factor."""
    return not value.convs and value.identity is not None and value.post_bn is None and value.post_scale is None


def _single_term(value: Map) -> bool:
    return value.post_bn is None and value.post_scale is None and (len(value.convs) + (value.identity is not None)) == 1


def _times(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None or b is None:
        return b if a is None else a
    return a.detach().to(FLOAT64) * b.detach().to(FLOAT64)


def _scaled_term(term, factor: Tensor):
    return replace(term, scale=_times(term.scale, factor))


def then(*maps: Map, pad_first: bool = False) -> Map:
    """Sequential composition: ``then(a, b)(x) = b(a(x))``, ``then(a, b, c) = then(then(a, b), c)``.

    Exact steps only:

    * a per-channel map (BN, scale) after anything: always exact (it folds into the rows);
    * a BN or scale before a conv: exact when the conv does not pad, or the BN has no shift, or
      ``pad_first``;
    * a 1×1 conv (stride 1, no padding) before any conv, or any conv before a 1×1 conv (stride 1,
      no padding): exact when nothing is padded in between with a value the first map does not
      give for a zero input (its bias is 0), or ``pad_first``.

    Args:
        maps: the maps in the order the data flows through them.
        pad_first: the block pads its input once, before the first map, and nothing in between
            (OREPA's and DBB's chains: their intermediate border holds the first map's output for
            a zero input). The composite's padding is then the sum of the maps' paddings.
    Raises:
        UnsupportedError: a composition that no single conv equals exactly, with the reason.
    """
    if not maps:
        raise ValueError("then() needs at least one map")
    value = maps[0]
    for nxt in maps[1:]:
        value = _then2(value, nxt, pad_first)
    return value


def _then2(a: Map, b: Map, pad_first: bool) -> Map:
    if _is_affine(b):
        return _then_affine(a, b.identity)
    if _is_affine(a) and a.identity.bn is None and a.identity.scale is None:
        return b  # the identity, then b
    first, second = _materialize(a), _materialize(b)
    if _is_affine(a):
        composed = _affine_then_conv(a.identity, second, pad_first)
    else:
        composed = _conv_then_conv(first, second, pad_first)
    ops = ThenOp(ops_of(a), ops_of(b), pad_first)
    return _as_map(composed, ops, a, b)


def _then_affine(a: Map, f: IdentityBranch) -> Map:
    """``a`` followed by a per-channel ``BN`` then ``scale`` (either may be None)."""
    ops = ThenOp(ops_of(a), AffineOp(f.bn, f.scale)) if a.composite else None
    if _single_term(a):
        term = a.convs[0] if a.convs else a.identity
        pushed = term
        if f.bn is not None:
            if term.bn is not None or term.scale is not None:
                pushed = None  # a second BN in the row: goes after the sum instead
            else:
                pushed = replace(term, bn=f.bn)
        if pushed is not None:
            if f.scale is not None:
                pushed = _scaled_term(pushed, f.scale)
            if a.convs:
                return replace(a, convs=(pushed,), ops=ops)
            return replace(a, identity=pushed, ops=ops)
    if f.bn is None:  # a pure factor distributes over the sum
        if a.post_bn is not None or a.post_scale is not None:
            return replace(a, post_scale=_times(a.post_scale, f.scale), ops=ops)
        convs = tuple(_scaled_term(c, f.scale) for c in a.convs)
        ident = None if a.identity is None else _scaled_term(a.identity, f.scale)
        return replace(a, convs=convs, identity=ident, ops=ops)
    if a.post_bn is None and a.post_scale is None:
        return replace(a, post_bn=f.bn, post_scale=f.scale, ops=ops)
    # a second BN after the sum: compute the sum's conv first
    return _then_affine(_as_map(_materialize(a), ops_of(a), a), f)


def _affine_then_conv(f: IdentityBranch, second: FusedConv, pad_first: bool) -> FusedConv:
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


def _conv_then_conv(first: FusedConv, second: FusedConv, pad_first: bool) -> FusedConv:
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


def pad(value: Map, padding: int | Pair) -> Map:
    """``value`` run on its input zero-padded by ``padding`` first (a weight-space chain's block
    padding, e.g. OREPA's large kernel)."""
    rows, cols = _pair(padding)
    fused = _materialize(value)
    shifted = replace(fused, padding=(fused.padding[0] + rows, fused.padding[1] + cols))
    return _as_map(shifted, PadOp(ops_of(value), (rows, cols)), value)


# -- plus ---------------------------------------------------------------------------------------


def plus(*maps: Map) -> Map:
    """Parallel sum: ``plus(a, b)(x) = a(x) + b(x)``.

    The terms keep their own kernels and paddings; the fused conv takes the largest kernel, and
    the others are placed in its centre when it is fused (their paddings are checked to line up
    then). An identity term, with its BN and scale, is a diagonal kernel; a second one becomes a
    1×1 identity-kernel conv term (a block has one identity slot).

    Dilation: terms whose k×k kernels (k > 1) all share one dilation keep it (the sum is a
    dilated conv, e.g. a dilated MobileOne block: its 1×1 and identity sit on the centre tap).
    Terms with different dilations are summed as the dense kernels they equal: a k×k kernel
    with dilation r is the ``r(k-1)+1`` kernel with its taps every r-th place and zeros between
    (UniRepLKNet's dilated branches in a large undilated kernel). That step only places values
    (exact, in the weight's own dtype); the value is marked composite with the dilated expression.

    Raises:
        UnsupportedError: terms with different strides or groups.
    """
    if not maps:
        raise ValueError("plus() needs at least one map")
    if len(maps) == 1:
        return maps[0]
    parts = [m if m.post_bn is None and m.post_scale is None else _as_map(_materialize(m), ops_of(m), m)
             for m in maps]
    spread_ops = None
    if len({c.dilation for p in parts for c in p.convs if c.kernel_size != (1, 1)}) > 1:
        spread_ops = PlusOp(tuple(ops_of(p) for p in parts))  # the dilated convs, for the check
        parts = [_undilated(p) if any(c.dilation != (1, 1) for c in p.convs) else p for p in parts]
    convs: list[ConvBranch] = []
    identities: list[IdentityBranch] = []
    for part in parts:
        convs.extend(part.convs)
        if part.identity is not None:
            identities.append(part.identity)
    with_convs = [p for p in parts if p.convs]
    strides = {p.stride for p in with_convs}
    if len(strides) > 1:
        raise UnsupportedError(f"summed branches have different strides: {sorted(strides)}")
    groups = {p.groups for p in parts if p.groups is not None}
    if len(groups) > 1:  # finer-grouped terms (a depthwise avg pool beside a dense conv) re-grouped
        common = math.gcd(*groups)
        parts = [p if p.groups in (None, common) else _regrouped(p, common) for p in parts]
        convs = [c for p in parts for c in p.convs]
        groups = {common}
    slot: IdentityBranch | None = None
    if identities:
        # the plainest identity keeps the slot; the others become 1x1 identity-kernel terms
        slot = min(identities, key=lambda i: (i.bn is not None) + (i.scale is not None))
        extra = [i for i in identities if i is not slot]
        if extra:
            if not convs:
                raise UnsupportedError("a sum of identity branches with no conv: its groups are unknown")
            channels, per_group = int(convs[0].weight.shape[0]), int(convs[0].weight.shape[1])
            for i in extra:
                convs.append(ConvBranch(weight=identity_kernel(channels, per_group, (1, 1)), bn=i.bn, scale=i.scale))
    main = max(with_convs, key=lambda p: tuple(p.kernel_size), default=parts[0])
    ops = PlusOp(tuple(ops_of(p) for p in parts)) if any(p.composite for p in parts) else None
    if spread_ops is not None:
        ops = spread_ops
    return Branches(
        convs=tuple(convs), identity=slot, groups=groups.pop() if groups else None,
        stride=main.stride, padding=main.padding, dilation=main.dilation, padding_mode=main.padding_mode,
        in_channels=next((p.in_channels for p in parts if p.in_channels is not None), None),
        geometry_known=bool(with_convs) and all(p.geometry_known for p in with_convs),
        composite=ops is not None, ops=ops,
    )


def _spread(term: ConvBranch) -> ConvBranch:
    """A dilated conv term as the undilated kernel it equals: ``(r(k-1)+1)`` wide, its taps every
    r-th place, zeros between (same dtype: values are only placed). Its padding stays the same."""
    rh, rw = term.dilation
    if (rh, rw) == (1, 1):
        return term
    kh, kw = term.kernel_size
    dense = term.weight.detach().new_zeros(*term.weight.shape[:2], rh * (kh - 1) + 1, rw * (kw - 1) + 1)
    dense[:, :, ::rh, ::rw] = term.weight.detach()
    return replace(term, weight=dense, dilation=(1, 1))


def _undilated(value: Map) -> Map:
    """``value`` with every conv term spread to its undilated kernel (see :func:`plus`)."""
    return replace(value, convs=tuple(_spread(c) for c in value.convs), dilation=(1, 1),
                   composite=True, ops=ops_of(value))


def _regrouped(value: Map, groups: int) -> Map:
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


# -- evaluation -------------------------------------------------------------------------------


def _materialize(value: Map) -> FusedConv:
    """The value as one float64 conv (weights computed now)."""
    if _is_affine(value):
        channels = value.in_channels
        if channels is None:
            raise UnsupportedError("a per-channel map of unknown width cannot be written as a conv")
        value = replace(value, groups=channels, in_channels=channels, padding=(0, 0))
    return fuse_branches(value)


def _as_map(fused: FusedConv, ops: object, *sources: Map) -> Map:
    """A computed conv as a value again (one conv term), remembering the expression it stands for."""
    known = all(s.geometry_known for s in sources if s.convs)
    return Branches(
        convs=(ConvBranch(weight=fused.weight, bias=fused.bias, padding=fused.padding, dilation=fused.dilation,
                          padding_mode=fused.padding_mode),),
        groups=fused.groups, stride=fused.stride, padding=fused.padding, dilation=fused.dilation,
        padding_mode=fused.padding_mode, in_channels=fused.in_channels, geometry_known=known,
        composite=True, ops=ops,
    )


def evaluate(value: Map, dtype: torch.dtype = FLOAT64) -> FusedConv:
    """The one conv ``value`` equals (see :func:`repvgg_cli.fusion.fuse_branches`)."""
    return fuse_branches(value, dtype=dtype)


def _vector(t: Tensor, length: int, what: str) -> Tensor:
    flat = t.detach().to(FLOAT64).reshape(-1)
    if flat.shape[0] != length:
        raise UnsupportedError(f"{what} has {flat.shape[0]} channels; {length} are expected")
    return flat


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
