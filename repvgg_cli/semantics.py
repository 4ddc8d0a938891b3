"""What a train-form expression computes, run with torch's own ops in float64.

The independent side of every check of a composite block (see :mod:`repvgg_cli.algebra`): the
expression a family declared is run as the layers it stands for (``conv2d``, eval-mode
``batch_norm``, the identity, per-channel factors, sums), never through the weights the algebra
computed from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .algebra.expression import AffineOp, ConvOp, IdentityOp, PadOp, PlusOp, ThenOp
from .errors import UnsupportedError

FLOAT64 = torch.float64


def _vector(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(device="cpu", dtype=FLOAT64).reshape(-1)


def _padding(op: ConvOp) -> tuple[int, int]:
    if op.padding is not None:
        return op.padding
    kh, kw = int(op.weight.shape[2]), int(op.weight.shape[3])
    return (op.dilation[0] * (kh // 2), op.dilation[1] * (kw // 2))


def _spatial_padding(op: object) -> tuple[int, int]:
    """The padding a chain's later conv would add, moved to the chain's input by ``pad_first``."""
    if isinstance(op, ConvOp):
        return _padding(op)
    if isinstance(op, ThenOp):
        first, second = _spatial_padding(op.first), _spatial_padding(op.second)
        return (first[0] + second[0], first[1] + second[1])
    if isinstance(op, PadOp):
        inner = _spatial_padding(op.inner)
        return (inner[0] + op.padding[0], inner[1] + op.padding[1])
    return (0, 0)


def run(op: object, x: Tensor, *, stride1: bool = False, pad: bool = True) -> Tensor:
    """The output of expression ``op`` on ``x`` (float64).

    Args:
        op: an expression of :mod:`repvgg_cli.algebra` ``*Op`` nodes.
        x: the input ``(N, C, H, W)``.
        stride1: run every conv with stride 1 (a strided output is a subsample of it; checks compare
            the stride-1 outputs, which see every position).
        pad: apply the convs' own padding (False inside a ``pad_first`` chain, whose input was
            padded once already).
    """
    x = x.to(FLOAT64)
    if isinstance(op, IdentityOp):
        return x
    if isinstance(op, AffineOp):
        y = x
        if op.bn is not None:
            y = F.batch_norm(y, _vector(op.bn.running_mean), _vector(op.bn.running_var), _vector(op.bn.weight),
                             _vector(op.bn.bias), training=False, eps=op.bn.eps)
        if op.scale is not None:
            y = y * _vector(op.scale).reshape(1, -1, 1, 1)
        return y
    if isinstance(op, ConvOp):
        weight = op.weight.detach().to(device="cpu", dtype=FLOAT64)
        groups = op.groups if op.groups is not None else int(x.shape[1]) // int(weight.shape[1])
        ph, pw = _padding(op) if pad else (0, 0)
        if ph or pw:
            if op.padding_mode == "zeros":
                x = F.pad(x, (pw, pw, ph, ph))
            else:
                x = F.pad(x, (pw, pw, ph, ph), mode={"reflect": "reflect", "replicate": "replicate",
                                                     "circular": "circular"}[op.padding_mode])
        return F.conv2d(x, weight, _vector(op.bias), stride=(1, 1) if stride1 else op.stride,
                        dilation=op.dilation, groups=groups)
    if isinstance(op, PadOp):
        ph, pw = op.padding
        return run(op.inner, F.pad(x, (pw, pw, ph, ph)), stride1=stride1, pad=pad)
    if isinstance(op, ThenOp):
        if op.pad_first and pad:  # once, at the outermost step of the chain
            ph, pw = _spatial_padding(op)
            x = F.pad(x, (pw, pw, ph, ph))
            return run(op.second, run(op.first, x, stride1=stride1, pad=False), stride1=stride1, pad=False)
        return run(op.second, run(op.first, x, stride1=stride1, pad=pad), stride1=stride1, pad=pad)
    if isinstance(op, PlusOp):
        outputs = [run(term, x, stride1=stride1, pad=pad) for term in op.terms]
        total = outputs[0]
        for y in outputs[1:]:
            if y.shape != total.shape:
                raise UnsupportedError(f"summed branches give outputs of shapes {tuple(total.shape)} and "
                                       f"{tuple(y.shape)}")
            total = total + y
        return total
    raise TypeError(f"not an expression node: {type(op).__name__}")
