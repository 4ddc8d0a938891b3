"""Eval-mode BatchNorm as the per-channel affine map it is, and folded into the conv before it
(float64; tensors in, tensors out).

Sources: pytorch/pytorch ``torch/nn/utils/fusion.py`` (``fuse_conv_bn_weights``: the same fold,
written here in float64 with every input checked).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError, UnsupportedError
from .values import FLOAT64, BatchNorm, FusedConv


def as_float64(tensor: Tensor, what: str) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise InputError(f"{what} is a {type(tensor).__name__}, not a tensor")
    if not (tensor.is_floating_point()):
        raise InputError(f"{what} has dtype {tensor.dtype}; a floating-point tensor is needed")
    return tensor.detach().to(device="cpu", dtype=FLOAT64)


def check_vector(tensor: Tensor | None, length: int, what: str) -> Tensor | None:
    if tensor is None:
        return None
    t = as_float64(tensor, what)
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
    mean = check_vector(bn.running_mean, channels, f"{what} running_mean")
    var = check_vector(bn.running_var, channels, f"{what} running_var")
    if bn.running_mean is None or bn.running_var is None:  # pragma: no cover - dataclass guard
        raise UnsupportedError(f"{what} has no running statistics")
    if (var < 0).any():
        raise InputError(f"{what} running_var has negative values")
    if not (bn.eps >= 0) or bn.eps != bn.eps:
        raise InputError(f"{what} eps={bn.eps} is not a non-negative number")
    denom = torch.sqrt(var + float(bn.eps))
    if (denom == 0).any():
        raise InputError(f"{what} has running_var + eps == 0; the BN divides by zero")
    gamma = check_vector(bn.weight, channels, f"{what} weight")
    beta = check_vector(bn.bias, channels, f"{what} bias")
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
    w = as_float64(weight, "conv weight")
    out = int(w.shape[0])
    b = check_vector(bias, out, "conv bias")
    scale, shift = bn_scale_shift(bn, out)
    folded_w = w * scale.reshape(-1, 1, 1, 1)
    folded_b = shift if b is None else b * scale + shift
    return folded_w, folded_b


def _apply_scale(weight: Tensor, bias: Tensor, scale: Tensor | None, what: str) -> tuple[Tensor, Tensor]:
    s = check_vector(scale, int(weight.shape[0]), f"{what} scale")
    if s is None:
        return weight, bias
    return weight * s.reshape(-1, 1, 1, 1), bias * s


def fuse_conv_bn(weight: Tensor, bias: Tensor | None, bn: BatchNorm, **geometry) -> FusedConv:
    """Fold a plain conv→BN pair (no parallel branches) into one conv, float64."""
    w, b = fold_batch_norm(weight, bias, bn)
    return FusedConv(weight=w.contiguous(), bias=b.contiguous(), **geometry)
