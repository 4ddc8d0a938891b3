"""Per-block checks: seeded probes, the centre-pixel products taken during fusion, check_block.

(During a conversion, :class:`CentreProbe` takes each branch's centre products from the weight
rows fusion has just upcast, before it folds anything into them; BN, scales and identity are
still :func:`~.forward.reference_forward`'s.) A composite block (see :mod:`repvgg_cli.algebra`)
is checked against its declared expression run with torch's own ops
(:mod:`repvgg_cli.semantics`) instead.
"""

from __future__ import annotations

import zlib
from dataclasses import replace

import torch
from torch import Tensor

from ..fusion.sum import raise_non_finite
from ..fusion.values import Branches, FusedConv
from ..semantics import run
from .forward import (
    as_float64_vector,
    branch_geometry,
    centre_window,
    check_groups,
    fused_forward,
    pad_input,
    reference_forward,
)
from .tolerance import FLOAT64, BlockCheck, Tolerance, compare


def block_seed(seed: int, name: str) -> int:
    """A per-block seed that does not depend on the order blocks are visited in."""
    return (seed * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**63)


def block_probe(in_channels: int, kernel_size: tuple[int, int], dilation: tuple[int, int], seed: int, batch: int = 1,
                padding: tuple[int, int] | None = None, padding_mode: str = "zeros") -> Tensor:
    """A seeded float64 input just large enough for the centre output to see every kernel tap.

    With a reflect/replicate/circular ``padding_mode`` it is also larger than ``padding`` (reflect
    padding must be smaller than the input).
    """
    h = dilation[0] * (kernel_size[0] - 1) + 1
    w = dilation[1] * (kernel_size[1] - 1) + 1
    if padding_mode != "zeros" and padding is not None:
        h, w = max(h, padding[0] + 1), max(w, padding[1] + 1)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_channels, h, w, generator=generator, dtype=FLOAT64)


def branches_probe(branches: Branches, seed: int) -> Tensor:
    """:func:`block_probe` for a train-form block (its input channels, kernel and padding).

    A block with an identity BN gets a second sample: that BN's running statistics are the
    block's own input statistics, so the second sample is drawn from them (per channel mean and
    standard deviation), and the error reported is the error on data like the model's own, not
    only on unit-scale noise. The first sample is exactly :func:`block_probe`'s (what a deploy
    file records and ``verify`` re-runs)."""
    def probe(of_seed: int) -> Tensor:
        return block_probe(branches.resolved_in_channels, branches.kernel_size, branches.dilation, of_seed,
                           padding=branches.resolved_padding, padding_mode=branches.padding_mode)

    x = probe(seed)
    bn = branches.identity.bn if branches.identity is not None else None
    if bn is None or int(x.shape[1]) != bn.num_features:
        return x
    mean = as_float64_vector(bn.running_mean, None).reshape(1, -1, 1, 1)
    std = as_float64_vector(bn.running_var, None).clamp_min(0).sqrt().reshape(1, -1, 1, 1)
    return torch.cat([x, mean + std * probe((seed + 1) % (2**63))])


def reference_probe(branches: Branches, seed: int) -> Tensor:
    """The train-form output at the centre pixel for the block's seeded probe (the first sample,
    the one a deploy file records): ``(1, C_out)``."""
    stride1 = replace(branches, stride=(1, 1))
    return reference_forward(stride1, branches_probe(branches, seed)[:1], centre=True)[:, :, 0, 0]


def fused_probe(fused: FusedConv, seed: int) -> Tensor:
    """The deploy-form output at the centre pixel for the same seeded probe."""
    x = block_probe(fused.in_channels, fused.kernel_size, fused.dilation, seed,
                    padding=fused.padding, padding_mode=fused.padding_mode)
    return fused_forward(fused, x, stride=(1, 1), centre=True)[:, :, 0, 0]


class CentreProbe:
    """A block check's centre-pixel products, computed while fusion has the rows in cache.

    A :class:`~repvgg_cli.fusion.sum.RowObserver` for :func:`~repvgg_cli.fusion.sum.fuse_branches`:
    each chunk of each conv branch's weight (upcast exactly, before any BN) and of the fused
    weight (as shipped) is multiplied with the probe's centre receptive field as it goes by, so
    the check does not read every weight twice more once the block is fused. The rest of the
    reference (BN, scales, identity, post-sum BN) is :func:`reference_forward`'s, as without a
    probe. It also takes over fusion's NaN/Inf check: every value shipped or read enters a product.
    """

    def __init__(self, name: str, branches: Branches, seed: int) -> None:
        self.branches = branches
        self.x = branches_probe(branches, block_seed(seed, name))
        out, groups = branches.out_channels, branches.resolved_groups
        self._per_group = out // max(1, groups)  # groups that do not divide out are refused on first use
        batch = int(self.x.shape[0])
        self._conv = [torch.zeros(batch, out, dtype=FLOAT64) for _ in branches.convs]
        self._fused = torch.zeros(batch, out, dtype=FLOAT64)
        self._taps: dict[int, Tensor] = {}  # per conv branch (index) and the fused conv (-1)
        self._covered = [0] * (len(branches.convs) + 1)

    def _taps_for(self, index: int, rows: Tensor) -> Tensor:
        """The probe's centre receptive field for branch ``index`` (-1: the fused conv) as
        ``(batch, groups, in_per_group * kh * kw)``, matching ``rows`` flattened."""
        taps = self._taps.get(index)
        if taps is not None:
            return taps
        b = self.branches
        kernel = tuple(int(d) for d in rows.shape[2:])
        if index < 0:
            padding, dilation = b.resolved_padding, b.dilation
        else:
            padding, dilation = branch_geometry(b, b.convs[index])
        groups = b.resolved_groups
        check_groups((b.out_channels, *rows.shape[1:]), groups, int(self.x.shape[1]))
        window = centre_window(pad_input(self.x, padding, b.padding_mode), kernel, (1, 1), dilation)
        taps = window[:, :, :: dilation[0], :: dilation[1]].reshape(int(self.x.shape[0]), groups, -1)
        self._taps[index] = taps
        return taps

    def _products(self, index: int, start: int, rows: Tensor) -> Tensor:
        """``(batch, len(rows))``: each row times its group's receptive field."""
        taps = self._taps_for(index, rows)
        flat = rows.reshape(int(rows.shape[0]), -1)
        n, per_group = int(rows.shape[0]), self._per_group
        first, last = start // per_group, (start + n - 1) // per_group
        if last - first < 4:  # a few groups: one matrix-vector product each
            return torch.cat([taps[:, g] @ flat[max(g * per_group - start, 0) : (g + 1) * per_group - start].T
                              for g in range(first, last + 1)], dim=1)
        group = torch.arange(start, start + n) // per_group  # many small groups (depthwise)
        return torch.einsum("nk,bnk->bn", flat, taps[:, group])

    def source(self, index: int, start: int, stop: int, rows: Tensor) -> None:
        self._conv[index][:, start:stop] = self._products(index, start, rows)
        self._covered[index] += stop - start

    def fused(self, start: int, stop: int, rows: Tensor, scratch: Tensor) -> None:
        if rows.dtype != FLOAT64:
            rows = scratch.copy_(rows)
        self._fused[:, start:stop] = self._products(-1, start, rows)
        self._covered[-1] += stop - start

    def reference_for(self, branches: Branches) -> Tensor:
        """The train-form output at the centre pixel, from the centre products taken during fusion;
        ``branches`` is the block's own description, or the same with other BN parameters (the
        conv products do not depend on them), e.g. another eps."""
        b = self.branches
        if any(c != b.out_channels for c in self._covered):
            raise RuntimeError(f"fusion showed {self._covered} rows of {b.out_channels} to the check's probe")
        conv_outputs = []
        for conv, y in zip(branches.convs, self._conv):
            bias = as_float64_vector(conv.bias, None)
            conv_outputs.append((y if bias is None else y + bias)[:, :, None, None])
        return reference_forward(replace(branches, stride=(1, 1)), self.x, centre=True, conv_outputs=conv_outputs)

    def outputs(self, shipped: FusedConv) -> tuple[Tensor, Tensor]:
        """``(reference, shipped output)`` at the centre pixel, ``(batch, C_out, 1, 1)`` each.

        Raises:
            InputError: a weight read or shipped holds NaN/Inf (see :func:`raise_non_finite`).
        """
        b = self.branches
        reference = self.reference_for(b)
        geometry = (shipped.kernel_size, shipped.padding, shipped.dilation, shipped.groups, shipped.padding_mode)
        if geometry == (b.kernel_size, b.resolved_padding, b.dilation, b.resolved_groups, b.padding_mode):
            output = (self._fused + as_float64_vector(shipped.bias, None))[:, :, None, None]
        else:  # not the conv these products assumed: run it as shipped
            output = fused_forward(shipped, self.x, stride=(1, 1), centre=True)
        if not (torch.isfinite(reference).all() and torch.isfinite(output).all()):
            raise_non_finite(b)
        return reference, output


GEOMETRY_CHANNELS = 8
"""Output channels checked at every output position (the rest at the centre pixel)."""


def geometry_channels(out_channels: int, count: int = GEOMETRY_CHANNELS) -> list[int]:
    """``count`` output channels spread evenly over ``range(out_channels)``, first and last included."""
    if out_channels <= count:
        return list(range(out_channels))
    return sorted({round(i * (out_channels - 1) / (count - 1)) for i in range(count)})


def check_block(
    name: str,
    branches: Branches,
    fused64: FusedConv | None,
    shipped: FusedConv,
    seed: int,
    tolerance: Tolerance,
    probe: CentreProbe | None = None,
) -> BlockCheck:
    """Compare the shipped fused conv against the train-form branches on a seeded input.

    The input is the block's probe: one sample just large enough for the centre output to see
    every kernel tap, so every other output position sees the padding (all border cases).
    Two comparisons, both float64: every output channel at the centre pixel, where each weight
    and bias value shipped contributes (one matrix-vector product per branch, the cost of reading
    the weights once); and a few output channels (:func:`geometry_channels`) at every output
    position, which checks padding, padding mode and dilation, the same for all channels.
    Stride does not change equivalence (the strided output is a subsample), so it runs at 1.

    Args:
        name: the block's name (seeds the probe and labels the result).
        branches: the train-form description (source tensors).
        fused64: the float64 fusion result, to measure what a cast to float16/bfloat16 adds
            (None: the error is all cast error, as for float32).
        shipped: the fused conv in the dtype that is written.
        seed: the run's seed.
        tolerance: rtol/atol; rtol None means by the shipped dtype.
        probe: the :class:`CentreProbe` that watched ``shipped`` being fused (same name and
            seed): its centre products are used instead of running the convs again.
    Returns:
        A :class:`BlockCheck` with the max abs error relative to the output scale.
    """
    if branches.composite:
        return check_expression(name, branches, fused64, shipped, seed, tolerance)
    stride1 = replace(branches, stride=(1, 1))
    if probe is not None:
        x = probe.x
        reference, output = probe.outputs(shipped)
    else:
        x = branches_probe(branches, block_seed(seed, name))
        reference = reference_forward(stride1, x, centre=True)
        output = fused_forward(shipped, x, stride=(1, 1), centre=True)
    rows = geometry_channels(shipped.out_channels)
    border = fused_forward(shipped, x, stride=(1, 1), channels=rows)
    err, scale = compare(reference, output)
    border_err, border_scale = compare(reference_forward(stride1, x, channels=rows), border)
    err, scale = max(err, border_err), max(scale, border_scale)
    cast_err = err
    if fused64 is not None and shipped.weight.dtype in (torch.float16, torch.bfloat16):
        cast_err = max(compare(fused_forward(fused64, x, stride=(1, 1), centre=True), output)[0],
                       compare(fused_forward(fused64, x, stride=(1, 1), channels=rows), border)[0])
    return BlockCheck(
        name=name,
        max_abs_err=err,
        scale=scale,
        rtol=tolerance.rtol_for(shipped.weight.dtype),
        atol=tolerance.atol,
        cast_abs_err=cast_err,
        reference=reference[:1, :, 0, 0],
    )


def check_expression(name: str, branches: Branches, fused64: FusedConv | None, shipped: FusedConv, seed: int,
                     tolerance: Tolerance) -> BlockCheck:
    """:func:`check_block` for a composite block: the expression it was declared as
    (``branches.ops``) is run with torch's own ops (:func:`repvgg_cli.semantics.run`), every output
    channel at every output position of the block's probe, against the shipped conv."""
    x = branches_probe(branches, block_seed(seed, name))
    reference = run(branches.ops, x, stride1=True)
    output = fused_forward(shipped, x, stride=(1, 1))
    err, scale = compare(reference, output)
    cast_err = err
    if fused64 is not None and shipped.weight.dtype in (torch.float16, torch.bfloat16):
        cast_err = compare(fused_forward(fused64, x, stride=(1, 1)), output)[0]
    h, w = int(reference.shape[2]) // 2, int(reference.shape[3]) // 2
    return BlockCheck(
        name=name, max_abs_err=err, scale=scale, rtol=tolerance.rtol_for(shipped.weight.dtype),
        atol=tolerance.atol, cast_abs_err=cast_err, reference=reference[:1, :, h, w],
    )


def with_eps(branches: Branches, eps: float) -> Branches:
    """The same block with every BatchNorm's eps set to ``eps``."""
    def bn(value):
        return None if value is None else replace(value, eps=eps)

    convs = tuple(replace(c, bn=bn(c.bn)) for c in branches.convs)
    identity = None if branches.identity is None else replace(branches.identity, bn=bn(branches.identity.bn))
    return replace(branches, convs=convs, identity=identity, post_bn=bn(branches.post_bn))


def has_batch_norm(branches: Branches) -> bool:
    return (any(c.bn is not None for c in branches.convs) or branches.post_bn is not None
            or (branches.identity is not None and branches.identity.bn is not None))


def eps_sensitivity(name: str, branches: Branches, seed: int, probe: CentreProbe | None = None,
                    other_eps: float = 1e-3) -> float:
    """How far the block's train-form output at its probe moves when every BN's eps is
    ``other_eps`` instead of the one used (relative to the output's largest value): what an eps
    nobody decided can change. Taken from the probe's centre products when there is one."""
    other = with_eps(branches, other_eps)
    if probe is not None:
        first, second = probe.reference_for(branches), probe.reference_for(other)
    else:
        x = branches_probe(branches, block_seed(seed, name))
        first = reference_forward(replace(branches, stride=(1, 1)), x, centre=True)
        second = reference_forward(replace(other, stride=(1, 1)), x, centre=True)
    err, scale = compare(first, second)
    return err / scale if scale > 0 else err
