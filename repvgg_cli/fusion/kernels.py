"""Kernels placed in a larger one: a smaller kernel centred, the identity as a (grouped) kernel,
and the alignment a sum of branches needs (paddings, dilations, padding modes line up).

Tensors in, tensors out (float64 where new values are made).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UnsupportedError
from .values import FLOAT64, Branches, Pair


def center_kernel(weight: Tensor, kernel_size: Pair) -> Tensor:
    """Zero-pad a smaller kernel so it sits in the centre of ``kernel_size``.

    Args:
        weight: ``(out, in/groups, kh, kw)`` with ``kh <= KH``, ``kw <= KW`` and even differences.
        kernel_size: the target ``(KH, KW)``.
    Returns:
        A ``(out, in/groups, KH, KW)`` tensor.
    """
    rows, cols = centred_slice(kernel_size, (int(weight.shape[2]), int(weight.shape[3])))
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


def check_alignment(branches: Branches, kernel_size: Pair) -> None:
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


def centred_slice(big: Pair, small: Pair) -> tuple[slice, slice]:
    """Where a ``small`` kernel sits in the centre of a ``big`` one."""
    dh, dw = big[0] - small[0], big[1] - small[1]
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise UnsupportedError(f"a {small[0]}x{small[1]} kernel cannot be centred in a {big[0]}x{big[1]} kernel")
    return slice(dh // 2, dh // 2 + small[0]), slice(dw // 2, dw // 2 + small[1])
