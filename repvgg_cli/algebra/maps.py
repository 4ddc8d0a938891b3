"""The algebra's leaves (a conv, a linear layer, an eval BatchNorm, a per-channel scale or shift, the
identity, an average pool) and its two operations, :func:`then` and :func:`plus`, over one value
type, :data:`Map` (see :mod:`repvgg_cli.algebra` for what they compute and when they refuse).

Tensors in, tensors out: no modules, no IO.
"""


from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from ..errors import InputError, UnsupportedError
from ..fusion.kernels import identity_kernel
from ..fusion.sum import fuse_branches
from ..fusion.values import (
    FLOAT64,
    BatchNorm,
    Branches,
    ConvBranch,
    FusedConv,
    IdentityBranch,
)
from .compose import affine_then_conv, conv_then_conv, regrouped, spread
from .expression import AffineOp, PadOp, PlusOp, ThenOp, ops_of

Pair = tuple[int, int]
Map = Branches
"""An affine convolution in normal form (see the module docstring)."""


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
        composed = affine_then_conv(a.identity, second, pad_first)
    else:
        composed = conv_then_conv(first, second, pad_first)
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
        parts = [p if p.groups in (None, common) else regrouped(p, common) for p in parts]
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


def _undilated(value: Map) -> Map:
    """``value`` with every conv term spread to its undilated kernel (see :func:`plus`)."""
    return replace(value, convs=tuple(spread(c) for c in value.convs), dilation=(1, 1),
                   composite=True, ops=ops_of(value))


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
    """The one conv ``value`` equals (see :func:`repvgg_cli.fusion.sum.fuse_branches`)."""
    return fuse_branches(value, dtype=dtype)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
