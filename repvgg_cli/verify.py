"""Numerical equivalence: per block always, whole model when there is a model.

The reference is computed independently of :mod:`repvgg_cli.fusion`: every train-form branch
is run as the ops it stands for (``conv2d`` then eval-mode ``batch_norm``), in float64, and
summed. (During a conversion, :class:`CentreProbe` takes each branch's centre products from the
weight rows fusion has just upcast, before it folds anything into them; BN, scales and identity
are still this module's.) The fused conv is run with the tensors actually shipped (cast to the source dtype).
This module returns numbers; callers decide pass/fail from :attr:`BlockCheck.ok`.
"""

from __future__ import annotations

import base64
import copy
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .io.metadata import TENSOR_DIGESTS
from .errors import UnsupportedError
from .fusion import BatchNorm, Branches, ConvBranch, FusedConv, chunk_rows, raise_non_finite

FLOAT64 = torch.float64

DEFAULT_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}
"""Default relative tolerance by the dtype the fused tensors are shipped in."""


def default_rtol(dtype: torch.dtype) -> float:
    """The default ``--rtol`` for fused tensors stored as ``dtype``."""
    return DEFAULT_RTOL.get(dtype, 1e-5)


@dataclass(frozen=True)
class Tolerance:
    """Pass iff ``max_abs_err <= atol + rtol * max(|reference|)``. ``rtol=None``: by dtype."""

    rtol: float | None = None
    atol: float = 0.0

    def rtol_for(self, dtype: torch.dtype) -> float:
        return self.rtol if self.rtol is not None else default_rtol(dtype)


@dataclass(frozen=True)
class BlockCheck:
    """The comparison of one block's fused conv against its train-form branches."""

    name: str
    max_abs_err: float
    scale: float
    rtol: float
    atol: float
    cast_abs_err: float = 0.0
    problem: str | None = None
    reference: Tensor | None = field(default=None, compare=False, repr=False)
    """The train-form output at the probe's centre pixel, ``(1, C_out)``: what convert records."""

    @property
    def rel_err(self) -> float:
        return self.max_abs_err / self.scale if self.scale > 0 else self.max_abs_err

    @property
    def ok(self) -> bool:
        return self.problem is None and self.max_abs_err <= self.atol + self.rtol * self.scale


@dataclass(frozen=True)
class ModelCheck:
    """Whole-model comparison: train-form eval output vs deploy-form eval output."""

    input_shape: tuple[int, ...]
    dtype: str
    max_abs_err: float
    scale: float
    rtol: float
    atol: float
    outputs: int = 1
    problem: str | None = None

    @property
    def rel_err(self) -> float:
        return self.max_abs_err / self.scale if self.scale > 0 else self.max_abs_err

    @property
    def ok(self) -> bool:
        return self.problem is None and self.max_abs_err <= self.atol + self.rtol * self.scale


# -- reference semantics of the train form ---------------------------------------------------


Rows = Sequence[int] | None
"""Output channels to compute (``None``: all of them)."""


def _vector(t: Tensor | None, rows: Rows) -> Tensor | None:
    if t is None:
        return None
    t = t.detach().to(device="cpu", dtype=FLOAT64)
    return t if rows is None else t[list(rows)]


def _bn_eval(x: Tensor, bn: BatchNorm, rows: Rows = None) -> Tensor:
    return F.batch_norm(
        x, _vector(bn.running_mean, rows), _vector(bn.running_var, rows), _vector(bn.weight, rows),
        _vector(bn.bias, rows), training=False, eps=bn.eps,
    )


def _pad(x: Tensor, padding: tuple[int, int], padding_mode: str) -> Tensor:
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


def _centre_window(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """The receptive field of the centre output pixel in a padded input ``x``."""
    extent = (dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1)
    size = [(int(x.shape[2 + d]) - extent[d]) // stride[d] + 1 for d in range(2)]
    top, left = (size[0] // 2) * stride[0], (size[1] // 2) * stride[1]
    return x[:, :, top : top + extent[0], left : left + extent[1]]


def _check_groups(shape: tuple[int, ...], groups: int, in_channels: int) -> None:
    """A conv weight of ``shape`` with ``groups`` takes ``in_channels`` inputs (else UnsupportedError)."""
    out, in_per_group = shape[0], shape[1]
    if groups < 1 or out % groups or in_channels != in_per_group * groups:
        raise UnsupportedError(
            f"a conv weight {tuple(shape)} with groups={groups} does not take {in_channels} input channels"
        )


def _conv64(x: Tensor, weight: Tensor, bias: Tensor | None, *, stride: tuple[int, int], padding: tuple[int, int],
            dilation: tuple[int, int], groups: int, padding_mode: str, rows: Rows, centre: bool) -> Tensor:
    """``conv2d`` in float64, on the output channels ``rows`` only and, with ``centre``, at the
    centre output pixel only (its receptive field is cut out of the padded input).

    The weight is upcast a chunk of output channels at a time (never a float64 copy of it whole).
    """
    weight = weight.detach()
    out, in_per_group, kh, kw = (int(d) for d in weight.shape)
    _check_groups((out, in_per_group, kh, kw), groups, int(x.shape[1]))
    x = _pad(x, padding, padding_mode)
    if centre:
        x = _centre_window(x, (kh, kw), stride, dilation)
    per_group = out // groups
    bias64 = _vector(bias, None)
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
            y = _conv64(x, conv.weight, conv.bias, stride=branches.stride, padding=padding, dilation=dilation,
                        groups=groups, padding_mode=branches.padding_mode, rows=rows, centre=centre)
        if conv.bn is not None:
            y = _bn_eval(y, conv.bn, rows)
        if conv.scale is not None:
            y = y * _vector(conv.scale, rows).reshape(1, -1, 1, 1)
        total = _add(total, y)
    if branches.identity is not None:
        y = x if rows is None else x[:, rows]
        if centre:
            y = _centre_of(y)
        if branches.identity.bn is not None:
            y = _bn_eval(y, branches.identity.bn, rows)
        if branches.identity.scale is not None:
            y = y * _vector(branches.identity.scale, rows).reshape(1, -1, 1, 1)
        total = _add(total, y)
    assert total is not None
    if branches.post_bn is not None:
        total = _bn_eval(total, branches.post_bn, rows)
    if branches.post_scale is not None:
        total = total * _vector(branches.post_scale, rows).reshape(1, -1, 1, 1)
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
    return _conv64(x.to(FLOAT64), fused.weight, fused.bias, stride=fused.stride if stride is None else stride,
                   padding=fused.padding, dilation=fused.dilation, groups=fused.groups,
                   padding_mode=fused.padding_mode, rows=channels, centre=centre)


# -- probes ----------------------------------------------------------------------------------


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
    """:func:`block_probe` for a train-form block (its input channels, kernel and padding)."""
    return block_probe(branches.resolved_in_channels, branches.kernel_size, branches.dilation, seed,
                       padding=branches.resolved_padding, padding_mode=branches.padding_mode)


def reference_probe(branches: Branches, seed: int) -> Tensor:
    """The train-form output at the centre pixel for the block's seeded probe: ``(batch, C_out)``."""
    stride1 = replace(branches, stride=(1, 1))
    return reference_forward(stride1, branches_probe(branches, seed), centre=True)[:, :, 0, 0]


def fused_probe(fused: FusedConv, seed: int) -> Tensor:
    """The deploy-form output at the centre pixel for the same seeded probe."""
    x = block_probe(fused.in_channels, fused.kernel_size, fused.dilation, seed,
                    padding=fused.padding, padding_mode=fused.padding_mode)
    return fused_forward(fused, x, stride=(1, 1), centre=True)[:, :, 0, 0]


class CentreProbe:
    """A block check's centre-pixel products, computed while fusion has the rows in cache.

    A :class:`~repvgg_cli.fusion.RowObserver` for :func:`~repvgg_cli.fusion.fuse_branches`:
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
        _check_groups((b.out_channels, *rows.shape[1:]), groups, int(self.x.shape[1]))
        window = _centre_window(_pad(self.x, padding, b.padding_mode), kernel, (1, 1), dilation)
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

    def outputs(self, shipped: FusedConv) -> tuple[Tensor, Tensor]:
        """``(reference, shipped output)`` at the centre pixel, ``(batch, C_out, 1, 1)`` each.

        Raises:
            InputError: a weight read or shipped holds NaN/Inf (see :func:`raise_non_finite`).
        """
        b = self.branches
        if any(c != b.out_channels for c in self._covered):
            raise RuntimeError(f"fusion showed {self._covered} rows of {b.out_channels} to the check's probe")
        conv_outputs = []
        for conv, y in zip(b.convs, self._conv):
            bias = _vector(conv.bias, None)
            conv_outputs.append((y if bias is None else y + bias)[:, :, None, None])
        reference = reference_forward(replace(b, stride=(1, 1)), self.x, centre=True, conv_outputs=conv_outputs)
        geometry = (shipped.kernel_size, shipped.padding, shipped.dilation, shipped.groups, shipped.padding_mode)
        if geometry == (b.kernel_size, b.resolved_padding, b.dilation, b.resolved_groups, b.padding_mode):
            output = (self._fused + _vector(shipped.bias, None))[:, :, None, None]
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


def encode_tensor(t: Tensor) -> str:
    """float64 little-endian bytes, base64: compact and exact for metadata."""
    data = t.detach().to(FLOAT64).contiguous().numpy().astype("<f8").tobytes()
    return base64.b64encode(data).decode("ascii")


def decode_tensor(text: str, shape: Iterable[int]) -> Tensor:
    import numpy as np

    data = np.frombuffer(base64.b64decode(text.encode("ascii")), dtype="<f8").copy()
    return torch.from_numpy(data).reshape(tuple(shape))


def compare(reference: Tensor, candidate: Tensor) -> tuple[float, float]:
    """``(max_abs_err, scale)`` where scale is ``max(|reference|)``."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    diff = (reference.to(FLOAT64) - candidate.to(FLOAT64)).abs()
    err = float(diff.max()) if diff.numel() else 0.0
    if not torch.isfinite(candidate).all():
        err = float("inf")
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    return err, scale


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
        reference=reference[:, :, 0, 0],
    )


# -- whole model -----------------------------------------------------------------------------


def flatten_outputs(value: object) -> list[Tensor]:
    """Every tensor in a model output (tensor, tuple/list, dict), in a stable order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flatten_outputs(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value, key=str) for t in flatten_outputs(value[k])]
    return []


def infer_input_shape(model: nn.Module, spatial: int = 64, batch: int = 2) -> tuple[int, ...]:
    """``(batch, C, spatial, spatial)`` with C the first Conv2d's input channels."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return (batch, int(module.in_channels), spatial, spatial)
    raise ValueError("the model has no Conv2d to infer an input shape from; pass --input-shape")


def model_outputs(model: nn.Module, x: Tensor) -> tuple[list[Tensor], str]:
    """Eval-mode outputs of a float64 copy of ``model`` (float32 if float64 is not supported).

    The model itself is left as it was: the copy is cast, run and dropped.
    """
    last_error: Exception | None = None
    for dtype in (FLOAT64, torch.float32):
        probe = copy.deepcopy(model).to(dtype).eval()
        try:
            with torch.no_grad():
                out = flatten_outputs(probe(x.to(dtype)))
            return [t.detach().to(FLOAT64) for t in out], str(dtype).replace("torch.", "")
        except Exception as error:  # noqa: BLE001 - a model's forward may fail in float64; try float32
            last_error = error
        finally:
            del probe
    raise RuntimeError(f"the model's forward failed: {last_error}")


def compare_outputs(reference: list[Tensor], candidate: list[Tensor]) -> tuple[float, float]:
    if len(reference) != len(candidate):
        raise ValueError(f"the models return {len(reference)} vs {len(candidate)} tensors")
    err, scale = 0.0, 0.0
    for r, c in zip(reference, candidate):
        e, s = compare(r, c)
        err, scale = max(err, e), max(scale, s)
    return err, scale


# -- deploy files ----------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyReport:
    """The re-check of a deploy artifact: per-block results and file-level problems."""

    blocks: tuple[BlockCheck, ...]
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    against: str | None = None
    model_check: ModelCheck | None = None

    @property
    def failures(self) -> tuple[BlockCheck, ...]:
        return tuple(b for b in self.blocks if not b.ok)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.failures and (self.model_check is None or self.model_check.ok)


def _fused_from_file(state, record: dict) -> tuple[FusedConv | None, str | None]:
    """The fused conv stored for one recorded block, or the reason it cannot be read."""
    prefix = record["deploy_prefix"]
    names = {part: f"{prefix}.{part}" if prefix else part for part in ("weight", "bias")}
    for key in names.values():
        if key not in state:
            return None, f"key {key} is missing"
        if not isinstance(state[key], Tensor) or not state[key].is_floating_point():
            return None, f"key {key} is not a floating-point tensor"
    weight, bias = state[names["weight"]], state[names["bias"]]
    groups = int(record["groups"] or 1)  # unknown groups: convert checked with 1 (the kernel does not depend on them)
    expected_w = (record["out_channels"], record["in_per_group"], *record["kernel"])
    if tuple(weight.shape) != tuple(expected_w):
        return None, f"{names['weight']} has shape {tuple(weight.shape)}, convert wrote {tuple(expected_w)}"
    if tuple(bias.shape) != (record["out_channels"],):
        return None, f"{names['bias']} has shape {tuple(bias.shape)}, convert wrote ({record['out_channels']},)"
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        return None, f"{prefix or '<root>'} holds NaN or Inf"
    fused = FusedConv(
        weight=weight, bias=bias, stride=tuple(record["stride"] or (1, 1)), padding=tuple(record["padding"]),
        dilation=tuple(record["dilation"]), groups=groups, padding_mode=record.get("padding_mode", "zeros"),
    )
    return fused, None


def verify_deploy(state, metadata: dict, tolerance: Tolerance | None = None) -> VerifyReport:
    """Re-check a deploy state dict on its own, from what convert recorded in it.

    Checks structure (no train-form block left, every recorded key present with the recorded
    shape, finite values), integrity (every tensor's sha256 as written) and equivalence (the
    stored fused conv on each block's seeded probe against the recorded train-form output).

    Args:
        state: the deploy state dict.
        metadata: the ``repvgg_cli`` metadata convert wrote into the file.
        tolerance: rtol/atol (rtol None: by each block's dtype).
    Returns:
        A :class:`VerifyReport`.
    """
    from .io.metadata import tensor_sha256
    from .errors import RepvggError
    from .families import find_blocks

    tolerance = tolerance or Tolerance()
    problems: list[str] = []
    try:
        left = find_blocks(state)
    except RepvggError as error:
        left = []
        problems.append(f"a train-form block is left, and malformed: {error.message}")
    problems += [f"unfused {b.family} block left: {b.name or '<root>'}" for b in left]

    recorded_hashes: dict = metadata.get(TENSOR_DIGESTS, {})
    written = list(recorded_hashes)
    missing = [k for k in written if k not in state]
    extra = [k for k in state if k not in recorded_hashes]
    if missing:
        problems.append(f"{len(missing)} key(s) convert wrote are missing, e.g. {missing[0]}")
    if extra:
        problems.append(f"{len(extra)} key(s) convert did not write, e.g. {extra[0]}")
    block_keys: dict[str, str] = {}
    for record in metadata.get("blocks", []):
        prefix = record["deploy_prefix"]
        for part in ("weight", "bias"):
            block_keys[f"{prefix}.{part}" if prefix else part] = record["name"]
    changed = [k for k in written if k in state and isinstance(state[k], Tensor)
               and tensor_sha256(state[k]) != recorded_hashes[k]]
    for key in changed:
        if key not in block_keys:
            problems.append(f"tensor {key} differs from what convert wrote (sha256)")

    checks: list[BlockCheck] = []
    for record in metadata.get("blocks", []):
        name = record["name"]
        fused, problem = _fused_from_file(state, record)
        if fused is None:
            checks.append(BlockCheck(name, float("inf"), 0.0, tolerance.rtol_for(torch.float32), tolerance.atol,
                                     problem=problem))
            continue
        probe = record["probe"]
        reference = decode_tensor(probe["reference"], probe["shape"])
        err, scale = compare(reference, fused_probe(fused, int(probe["seed"])))
        tampered = [k for k in changed if block_keys.get(k) == name]
        checks.append(BlockCheck(
            name, err, scale, tolerance.rtol_for(fused.weight.dtype), tolerance.atol,
            problem=f"{tampered[0]} differs from what convert wrote (sha256)" if tampered else None,
        ))
    return VerifyReport(blocks=tuple(checks), problems=tuple(problems))


def verify_against(deploy_state, train_state, family_options=None,
                   tolerance: Tolerance | None = None, dropped: tuple[str, ...] = (), seed: int = 0) -> VerifyReport:
    """Re-check a deploy state dict against the train-form source it came from.

    Every block of the source is recomputed from its train-form tensors and compared with the
    fused conv stored in the deploy file; every other source key must be present and identical.
    """
    from .errors import RepvggError
    from .families import FamilyOptions, find_blocks
    from .fusion import fuse_branches

    tolerance = tolerance or Tolerance()
    blocks = find_blocks(train_state, family_options or FamilyOptions())
    problems: list[str] = []
    checks: list[BlockCheck] = []
    accounted: set[str] = set()
    for block in blocks:
        half = block.dtype not in (torch.float32, torch.float64)
        try:  # fused as convert fuses (float64 kept only for half precision, to measure the cast)
            fused = fuse_branches(block.branches, dtype=FLOAT64 if half else block.dtype)
        except RepvggError as error:  # name the block, as convert does
            message = error.message if error.message.startswith("block ") else f"block {block.name or '<root>'}: {error.message}"
            raise type(error)(message, error.hint) from None
        record = {
            "deploy_prefix": block.deploy_prefix, "groups": fused.groups, "out_channels": fused.out_channels,
            "in_per_group": int(fused.weight.shape[1]), "kernel": list(fused.kernel_size), "stride": list(fused.stride),
            "padding": list(fused.padding), "dilation": list(fused.dilation), "padding_mode": fused.padding_mode,
        }
        accounted.update(block.deploy_state(fused))
        shipped, problem = _fused_from_file(deploy_state, record)
        if shipped is None:
            checks.append(BlockCheck(block.name, float("inf"), 0.0, tolerance.rtol_for(torch.float32),
                                     tolerance.atol, problem=problem))
            continue
        checks.append(check_block(block.name, block.branches, fused if half else None, shipped, seed, tolerance))
    consumed = {k for b in blocks for k in b.source_keys} | set(dropped)
    for key, value in train_state.items():
        if key in consumed:
            continue
        accounted.add(key)
        if key not in deploy_state:
            problems.append(f"key {key} of the source is missing")
        elif not (isinstance(value, Tensor) and isinstance(deploy_state[key], Tensor)
                  and value.shape == deploy_state[key].shape and value.dtype == deploy_state[key].dtype
                  and torch.equal(value, deploy_state[key])):
            problems.append(f"key {key} differs from the source")
    extra = [k for k in deploy_state if k not in accounted]
    if extra:
        problems.append(f"{len(extra)} key(s) neither from the source nor a fused block, e.g. {extra[0]}")
    return VerifyReport(blocks=tuple(checks), problems=tuple(problems))
