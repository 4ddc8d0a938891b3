"""The expression a composite value of :mod:`repvgg_cli.algebra` keeps: the leaves and
operations it was built from, run with torch's own ops by its check (:mod:`repvgg_cli.semantics`)
instead of trusting the weights computed for it.

Values in, values out: no modules, no IO.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..fusion.values import BatchNorm, Branches

Pair = tuple[int, int]
Map = Branches


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
