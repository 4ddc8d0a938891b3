"""repvgg_cli.checks (forward, probe, model) to the letter (issue 15: mutation score of the checks).

Every number a verdict rests on is compared with the same number computed here by hand in
float64 (BatchNorm as ``(y - mean) / sqrt(var + eps) * weight + bias``, convs through
``F.conv2d``'s own padding): the train-form reference, the fused conv, the probes and their
seeds, eps sensitivity, ``check_block``/``check_expression`` records, and the whole-model helpers
(input shape, dtype, the throwaway float64 copy, thread count, output flattening). Tolerances and
the metadata encoding are pinned in tests/test_mutation_checks_tolerance.py.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections import OrderedDict
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repvgg_cli.algebra.expression import AffineOp, ConvOp, IdentityOp, PlusOp, ThenOp
from repvgg_cli.checks import forward, model
from repvgg_cli.checks.forward import (
    as_float64_vector,
    branch_geometry,
    centre_window,
    check_groups,
    conv64,
    fused_forward,
    pad_input,
    reference_forward,
)
from repvgg_cli.checks.model import (
    compare_outputs,
    copy_model,
    flatten_outputs,
    infer_input_shape,
    leave_a_core,
    model_dtype,
    model_outputs,
)
from repvgg_cli.checks.probe import (
    GEOMETRY_CHANNELS,
    CentreProbe,
    block_probe,
    block_seed,
    branches_probe,
    check_block,
    check_expression,
    eps_sensitivity,
    fused_probe,
    geometry_channels,
    has_batch_norm,
    reference_probe,
    with_eps,
)
from repvgg_cli.checks.tolerance import Tolerance
from repvgg_cli.errors import InputError, UnsupportedError
from repvgg_cli.fusion.sum import fuse_branches
from repvgg_cli.fusion.values import (
    BatchNorm,
    Branches,
    ConvBranch,
    FusedConv,
    IdentityBranch,
)

F64 = torch.float64


# -- helpers: random parameters and the block computed by hand ------------------------------------

def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape, seed: int, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=gen(seed), dtype=F64)


def make_bn(c: int, seed: int, eps: float = 1e-5, small_var: bool = False, affine: bool = True) -> BatchNorm:
    """Running statistics far from (0, 1); a small variance makes eps matter."""
    var = rand(c, seed=seed + 1, lo=1e-4, hi=5e-3) if small_var else rand(c, seed=seed + 1, lo=0.3, hi=3.0)
    return BatchNorm(
        running_mean=rand(c, seed=seed, lo=-2.0, hi=2.0), running_var=var, eps=eps,
        weight=rand(c, seed=seed + 2, lo=0.5, hi=1.5) if affine else None,
        bias=rand(c, seed=seed + 3) if affine else None,
    )


def bn_hand(y: torch.Tensor, bn: BatchNorm | None, eps: float | None = None) -> torch.Tensor:
    if bn is None:
        return y
    e = bn.eps if eps is None else eps
    shape = (1, -1, 1, 1)
    out = (y - bn.running_mean.to(F64).reshape(shape)) / torch.sqrt(bn.running_var.to(F64).reshape(shape) + e)
    if bn.weight is not None:
        out = out * bn.weight.to(F64).reshape(shape)
    if bn.bias is not None:
        out = out + bn.bias.to(F64).reshape(shape)
    return out


def vec(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(F64).reshape(1, -1, 1, 1)


def block_hand(b: Branches, x: torch.Tensor, eps: float | None = None, stride=(1, 1)) -> torch.Tensor:
    """The train-form block, every conv with its own zero padding (block padding less half the
    kernel difference), BN by its formula, scales applied after; the full output map."""
    x = x.to(F64)
    groups = b.resolved_groups
    total = None
    pad = b.resolved_padding
    kernel = b.kernel_size
    for conv in b.convs:
        kh, kw = conv.kernel_size
        padding = conv.padding if conv.padding is not None else (
            pad[0] - b.dilation[0] * (kernel[0] - kh) // 2, pad[1] - b.dilation[1] * (kernel[1] - kw) // 2)
        dilation = conv.dilation if (kh, kw) != (1, 1) else (1, 1)
        y = F.conv2d(x, conv.weight.to(F64), None if conv.bias is None else conv.bias.to(F64), stride=stride,
                     padding=padding, dilation=dilation, groups=groups)
        y = bn_hand(y, conv.bn, eps)
        if conv.scale is not None:
            y = y * vec(conv.scale)
        total = y if total is None else total + y
    if b.identity is not None:
        y = bn_hand(x, b.identity.bn, eps)
        if b.identity.scale is not None:
            y = y * vec(b.identity.scale)
        total = y if total is None else total + y
    total = bn_hand(total, b.post_bn, eps)
    if b.post_scale is not None:
        total = total * vec(b.post_scale)
    return total


def centre(y: torch.Tensor) -> torch.Tensor:
    h, w = int(y.shape[2]) // 2, int(y.shape[3]) // 2
    return y[:, :, h: h + 1, w: w + 1]


def rich_block(c: int = 4, groups: int = 2, eps: float = 1e-5, small_var: bool = False, stride=(1, 1),
               seed: int = 0) -> Branches:
    """3x3 conv with bias + BN + scale, 1x1 conv + BN, identity BN + scale, post BN + post scale."""
    per = c // groups
    return Branches(
        convs=(
            ConvBranch(rand(c, per, 3, 3, seed=seed + 10), bias=rand(c, seed=seed + 11),
                       bn=make_bn(c, seed + 20, eps, small_var), scale=rand(c, seed=seed + 12, lo=0.5, hi=2.0)),
            ConvBranch(rand(c, per, 1, 1, seed=seed + 13), bn=make_bn(c, seed + 30, eps, small_var)),
        ),
        identity=IdentityBranch(bn=make_bn(c, seed + 40, eps, small_var), scale=rand(c, seed=seed + 14, lo=0.5)),
        groups=groups, stride=stride, post_bn=make_bn(c, seed + 50, eps, small_var),
        post_scale=rand(c, seed=seed + 15, lo=0.5, hi=2.0),
    )


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-12) -> bool:
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(float(b.abs().max()), 1e-300)
    return float((a.to(F64) - b.to(F64)).abs().max()) <= rel * scale


# -- forward.py -----------------------------------------------------------------------------------

def test_encode_tensor_of_every_float_dtype() -> None:
    from repvgg_cli.checks.tolerance import decode_tensor, encode_tensor

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = torch.tensor([[0.5, -3.25]], dtype=dtype)
        assert torch.equal(decode_tensor(encode_tensor(t), (1, 2)), torch.tensor([[0.5, -3.25]], dtype=F64))


def test_as_float64_vector() -> None:
    assert as_float64_vector(None, None) is None
    assert as_float64_vector(None, [0]) is None
    t = torch.tensor([1.5, 2.5, 3.5], dtype=torch.float16, requires_grad=False)
    full = as_float64_vector(t, None)
    assert full.dtype == F64 and torch.equal(full, torch.tensor([1.5, 2.5, 3.5], dtype=F64))
    assert torch.equal(as_float64_vector(t, (2, 0)), torch.tensor([3.5, 1.5], dtype=F64))
    g = torch.ones(2, requires_grad=True) * 3
    assert not as_float64_vector(g, None).requires_grad
    assert as_float64_vector(t, None).device.type == "cpu"
    with pytest.raises(NotImplementedError):  # always brought to the CPU: a meta tensor has no data to bring
        as_float64_vector(torch.empty(3, device="meta"), None)


def test_pad_input_zeros_modes_and_crops() -> None:
    x = torch.arange(2 * 5 * 6, dtype=F64).reshape(1, 2, 5, 6)
    assert pad_input(x, (0, 0), "zeros") is x
    assert pad_input(x, (0, 0), "reflect") is x
    z = pad_input(x, (1, 2), "zeros")
    assert z.shape == (1, 2, 7, 10) and torch.equal(z, F.pad(x, (2, 2, 1, 1)))
    assert torch.equal(pad_input(x, (2, 0), "zeros"), F.pad(x, (0, 0, 2, 2)))
    for mode in ("reflect", "replicate", "circular"):
        assert torch.equal(pad_input(x, (1, 2), mode), F.pad(x, (2, 2, 1, 1), mode=mode)), mode
        assert torch.equal(pad_input(x, (0, 1), mode), F.pad(x, (1, 1, 0, 0), mode=mode)), mode
    # negative padding crops (ACNet's cropped branches), then the other side pads
    assert torch.equal(pad_input(x, (-1, 0), "zeros"), x[:, :, 1:4, :])
    assert torch.equal(pad_input(x, (0, -2), "zeros"), x[:, :, :, 2:4])
    crop_pad = pad_input(x, (-1, 1), "zeros")
    assert torch.equal(crop_pad, F.pad(x[:, :, 1:4, :], (1, 1, 0, 0)))
    assert torch.equal(pad_input(x, (2, -1), "replicate"), F.pad(x[:, :, :, 1:5], (0, 0, 2, 2), mode="replicate"))
    with pytest.raises(KeyError):
        pad_input(x, (1, 1), "mirror")


def test_row_chunks_whole_groups_or_slices() -> None:
    rc = forward._row_chunks
    # a step of 2 rows (524288 float64 values fit in 4 MiB: 524288 // 262144 = 2)
    assert list(rc(8, 2, 3, 262144)) == [(0, 2, 0, 3, 1), (2, 4, 0, 3, 1), (4, 6, 3, 6, 1), (6, 8, 3, 6, 1)]
    assert list(rc(8, 2, 3, 174762)) == [(0, 3, 0, 3, 1), (3, 4, 0, 3, 1), (4, 7, 3, 6, 1), (7, 8, 3, 6, 1)]
    assert list(rc(4, 1, 5, 524288)) == [(0, 1, 0, 5, 1), (1, 2, 0, 5, 1), (2, 3, 0, 5, 1), (3, 4, 0, 5, 1)]
    # small groups: several whole groups per chunk
    assert list(rc(8, 4, 1, 131072)) == [(0, 4, 0, 2, 2), (4, 8, 2, 4, 2)]
    assert list(rc(6, 3, 2, 131072)) == [(0, 4, 0, 4, 2), (4, 6, 4, 6, 1)]
    assert list(rc(4, 2, 1, 174762)) == [(0, 2, 0, 1, 1), (2, 4, 1, 2, 1)]
    assert list(rc(8, 1, 4, 9)) == [(0, 8, 0, 4, 1)]
    assert list(rc(8, 8, 1, 9)) == [(0, 8, 0, 8, 8)]


def test_centre_window() -> None:
    x = torch.arange(7 * 9, dtype=F64).reshape(1, 1, 7, 9)
    assert torch.equal(centre_window(x, (3, 3), (1, 1), (1, 1)), x[:, :, 2:5, 3:6])
    # (7-3)//2+1 = 3 rows -> the middle one starts at 1*2; (9-3)//1+1 = 7 -> 3
    assert torch.equal(centre_window(x, (3, 3), (2, 1), (1, 1)), x[:, :, 2:5, 3:6])
    assert torch.equal(centre_window(x, (3, 3), (1, 2), (1, 1)), x[:, :, 2:5, 4:7])
    assert torch.equal(centre_window(x, (3, 1), (1, 1), (2, 1)), x[:, :, 1:6, 4:5])
    assert torch.equal(centre_window(x, (1, 3), (1, 1), (1, 3)), x[:, :, 3:4, 1:8])
    assert torch.equal(centre_window(x, (2, 2), (3, 3), (1, 1)), x[:, :, 3:5, 3:5])


def test_check_groups() -> None:
    assert check_groups((4, 2, 3, 3), 2, 4) is None
    assert check_groups((6, 1, 3, 3), 6, 6) is None
    assert check_groups((4, 3, 1, 1), 1, 3) is None
    for shape, groups, channels in (((4, 2, 3, 3), 2, 6), ((4, 2, 3, 3), 0, 0), ((5, 2, 3, 3), 2, 4),
                                    ((4, 2, 3, 3), -2, -4), ((4, 3, 1, 1), 1, 4)):
        with pytest.raises(UnsupportedError) as info:
            check_groups(shape, groups, channels)
        assert str(info.value) == (f"a conv weight {shape} with groups={groups} does not take {channels} input "
                                   "channels")


@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
def test_conv64_full_rows_and_centre(groups: int, mode: str) -> None:
    out, per = 6, 2
    x = rand(2, per * groups, 7, 8, seed=1)
    w = rand(out, per, 3, 3, seed=2).to(torch.float32)
    b = rand(out, seed=3).to(torch.float32)
    kw = {"stride": (1, 1), "padding": (1, 2), "dilation": (1, 2), "groups": groups, "padding_mode": mode}
    want = F.conv2d(pad_input(x, (1, 2), mode), w.to(F64), b.to(F64), dilation=(1, 2), groups=groups)
    full = conv64(x, w, b, rows=None, centre=False, **kw)
    assert full.dtype == F64 and close(full, want)
    rows = [5, 0, 3]
    assert close(conv64(x, w, b, rows=rows, centre=False, **kw), want[:, rows])
    assert close(conv64(x, w, None, rows=[4], centre=False, **kw), want[:, [4]] - b[4].to(F64))
    assert close(conv64(x, w, b, rows=None, centre=True, **kw), centre(want))
    assert close(conv64(x, w, b, rows=(1, 2), centre=True, **kw), centre(want)[:, [1, 2]])
    strided = conv64(x, w, b, rows=None, centre=False, **{**kw, "stride": (2, 3)})
    assert close(strided, want[:, :, ::2, ::3])
    assert close(conv64(x, w, b, rows=[4, 1], centre=False, **{**kw, "stride": (2, 3)}), want[:, [4, 1], ::2, ::3])
    assert close(conv64(x, w, b, rows=[2], centre=False, **{**kw, "stride": (3, 2)}), want[:, [2], ::3, ::2])
    with pytest.raises(UnsupportedError):
        conv64(x[:, :1], w, b, rows=None, centre=False, **kw)


def test_conv64_brings_weights_to_the_cpu() -> None:
    """Weights on another device are read onto the CPU, row by row or chunk by chunk: a meta
    tensor (no data) stands for one and fails at that copy."""
    x = rand(1, 4, 3, 3, seed=1)
    w = torch.empty(4, 2, 3, 3, device="meta")
    for groups, rows, inputs in ((1, [1, 3], x[:, :2]), (2, [1], x), (1, None, x[:, :2]), (2, None, x)):
        with pytest.raises(NotImplementedError, match="meta"):
            conv64(inputs, w, None, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=groups,
                   padding_mode="zeros", rows=rows, centre=False)


def test_conv64_in_chunks(monkeypatch) -> None:
    """The chunked path (a reused buffer, whole groups or a slice of one) gives the same numbers."""
    x = rand(1, 4, 5, 5, seed=4)
    for groups, step, out in ((1, 2, 6), (2, 1, 6), (2, 3, 6), (4, 2, 8), (4, 3, 8), (1, 2, 5), (1, 3, 8),
                              (2, 2, 6), (4, 3, 4)):
        w = rand(out, 4 // groups, 3, 3, seed=5 + groups)
        b = rand(int(w.shape[0]), seed=6)
        monkeypatch.setattr(forward, "chunk_rows", lambda n, s=step: s)
        got = conv64(x, w, b, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=groups, padding_mode="zeros",
                     rows=None, centre=False)
        want = F.conv2d(x, w, b, padding=1, groups=groups)
        assert close(got, want), (groups, step)
        got_nb = conv64(x, w, None, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=groups,
                        padding_mode="zeros", rows=None, centre=False)
        assert close(got_nb, F.conv2d(x, w, None, padding=1, groups=groups)), (groups, step)


def test_branch_geometry() -> None:
    w5x3 = ConvBranch(rand(2, 2, 5, 3, seed=1), dilation=(2, 2))
    w1 = ConvBranch(rand(2, 2, 1, 1, seed=2), dilation=(2, 2))
    w3x1 = ConvBranch(rand(2, 2, 3, 1, seed=3), dilation=(2, 2))
    w1x3 = ConvBranch(rand(2, 2, 1, 3, seed=3), dilation=(3, 2))
    own = ConvBranch(rand(2, 2, 3, 3, seed=4), padding=(0, 7), dilation=(1, 1))
    b = Branches(convs=(w5x3, w1, w3x1, w1x3, own), dilation=(2, 2))
    assert b.resolved_padding == (4, 2)
    assert branch_geometry(b, w5x3) == ((4, 2), (2, 2))
    assert branch_geometry(b, w1) == ((0, 0), (1, 1))  # a 1x1 kernel's dilation does not matter
    assert branch_geometry(b, w3x1) == ((2, 0), (2, 2))
    assert branch_geometry(b, w1x3) == ((0, 2), (3, 2))
    assert branch_geometry(b, own) == ((0, 7), (1, 1))
    plain = Branches(convs=(w5x3, w1), padding=(3, 1), dilation=(1, 1))
    assert branch_geometry(plain, w1) == ((1, 0), (1, 1))


def test_reference_forward_is_the_block_computed_by_hand() -> None:
    b = rich_block(c=4, groups=2)
    x = rand(2, 4, 6, 5, seed=7)
    want = block_hand(b, x)
    got = reference_forward(b, x)
    assert got.dtype == F64 and close(got, want)
    assert close(reference_forward(b, x.to(torch.float32)), block_hand(b, x.to(torch.float32)))
    assert close(reference_forward(b, x, channels=[3, 1]), want[:, [3, 1]])
    assert close(reference_forward(b, x, channels=(2,), centre=True), centre(want)[:, [2]])
    assert close(reference_forward(b, x, centre=True), centre(want))
    strided = replace(b, stride=(2, 2), identity=None)
    assert close(reference_forward(strided, x), block_hand(strided, x, stride=(2, 2)))
    # a block without post BN or scales, and an identity without BN
    bare = Branches(convs=(ConvBranch(rand(4, 4, 3, 3, seed=8)),), identity=IdentityBranch())
    assert close(reference_forward(bare, x), block_hand(bare, x))
    assert close(reference_forward(bare, x, channels=[0, 2], centre=True), centre(block_hand(bare, x))[:, [0, 2]])
    ident_scale = Branches(convs=(), identity=IdentityBranch(scale=rand(4, seed=9)), in_channels=4)
    assert close(reference_forward(ident_scale, x, channels=[1, 3]), x[:, [1, 3]] * vec(ident_scale.identity.scale)[:, [1, 3]])


def test_reference_forward_from_given_conv_outputs() -> None:
    b = rich_block(c=4, groups=2)
    x = rand(1, 4, 3, 3, seed=11)
    outs = [centre(F.conv2d(x, c.weight, c.bias, padding=branch_geometry(b, c)[0], groups=2)) for c in b.convs]
    assert close(reference_forward(b, x, centre=True, conv_outputs=outs), centre(block_hand(b, x)))
    # the conv products are taken as given: zeros leave only the rest of the block
    zeros = [torch.zeros(1, 4, 1, 1, dtype=F64)] * 2
    no_convs = replace(b, convs=tuple(replace(c, weight=torch.zeros_like(c.weight), bias=None) for c in b.convs))
    assert close(reference_forward(b, x, centre=True, conv_outputs=zeros), centre(block_hand(no_convs, x)))
    message = "conv_outputs: one centre output per conv branch, all channels"
    for kwargs in ({"centre": True, "conv_outputs": outs[:1]}, {"centre": False, "conv_outputs": outs},
                   {"centre": True, "conv_outputs": outs, "channels": [0]}, {"centre": True, "conv_outputs": outs * 2}):
        with pytest.raises(ValueError) as info:
            reference_forward(b, x, **kwargs)
        assert str(info.value) == message


def test_branch_outputs_of_different_shapes_are_refused() -> None:
    b = Branches(convs=(ConvBranch(rand(2, 2, 3, 3, seed=1), padding=(0, 0)),
                        ConvBranch(rand(2, 2, 1, 1, seed=2), padding=(0, 0))))
    with pytest.raises(UnsupportedError) as info:
        reference_forward(b, rand(1, 2, 5, 5, seed=3))
    assert str(info.value) == "the branches' outputs differ in shape: (1, 2, 3, 3) vs (1, 2, 5, 5)"


def test_fused_forward() -> None:
    w, bias = rand(4, 2, 3, 3, seed=1).half(), rand(4, seed=2).half()
    fused = FusedConv(w, bias, stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2, padding_mode="replicate")
    x = rand(1, 4, 7, 7, seed=3).float()
    padded = F.pad(x.to(F64), (0, 0, 1, 1), mode="replicate")
    full = F.conv2d(padded, w.to(F64), bias.to(F64), stride=(2, 1), dilation=(1, 2), groups=2)
    assert close(fused_forward(fused, x), full)
    stride1 = F.conv2d(padded, w.to(F64), bias.to(F64), dilation=(1, 2), groups=2)
    assert close(fused_forward(fused, x, stride=(1, 1)), stride1)
    assert close(fused_forward(fused, x, stride=(1, 1), channels=[3, 0]), stride1[:, [3, 0]])
    assert close(fused_forward(fused, x, stride=(1, 1), centre=True), centre(stride1))
    assert close(fused_forward(fused, x, centre=True, channels=[2]), full[:, [2], 2:3, 1:2])


# -- probe.py: seeds and probes --------------------------------------------------------------------

def test_block_seed() -> None:
    assert block_seed(0, "") == 0
    assert block_seed(0, "stage1.0") == zlib.crc32(b"stage1.0")
    assert block_seed(7, "a.b") == 7 * 1_000_003 + zlib.crc32(b"a.b")
    assert block_seed(3, "é") == 3 * 1_000_003 + zlib.crc32("é".encode())
    assert block_seed(2**62, "x") == (2**62 * 1_000_003 + zlib.crc32(b"x")) % 2**63
    assert 0 <= block_seed(-5, "x") < 2**63 and block_seed(-5, "x") == (-5 * 1_000_003 + zlib.crc32(b"x")) % 2**63


def test_block_probe() -> None:
    x = block_probe(3, (3, 5), (2, 1), seed=11)
    assert x.dtype == F64 and x.shape == (1, 3, 5, 5)
    assert torch.equal(x, torch.randn(1, 3, 5, 5, generator=gen(11), dtype=F64))
    assert torch.equal(block_probe(3, (3, 5), (2, 1), 11, batch=2), torch.randn(2, 3, 5, 5, generator=gen(11),
                                                                                     dtype=F64))
    assert block_probe(2, (1, 1), (3, 3), 0).shape == (1, 2, 1, 1)
    assert block_probe(2, (3, 3), (1, 1), 0, padding=(4, 5)).shape == (1, 2, 3, 3)  # zeros: padding free
    assert block_probe(2, (3, 3), (1, 1), 0, padding=(4, 5), padding_mode="zeros").shape == (1, 2, 3, 3)
    assert block_probe(2, (3, 3), (1, 1), 0, padding=(4, 1), padding_mode="reflect").shape == (1, 2, 5, 3)
    assert block_probe(2, (3, 3), (1, 1), 0, padding=(1, 3), padding_mode="circular").shape == (1, 2, 3, 4)
    assert block_probe(2, (3, 3), (1, 1), 0, padding=(2, 2), padding_mode="replicate").shape == (1, 2, 3, 3)
    assert block_probe(2, (3, 3), (1, 1), 0, padding_mode="reflect").shape == (1, 2, 3, 3)
    assert not torch.equal(block_probe(2, (3, 3), (1, 1), 0), block_probe(2, (3, 3), (1, 1), 1))


def test_branches_probe_without_identity_bn_is_the_block_probe() -> None:
    b = Branches(convs=(ConvBranch(rand(4, 2, 3, 5, seed=1), dilation=(1, 2)),), groups=2, dilation=(1, 2),
                 padding_mode="reflect", padding=(1, 5))
    x = branches_probe(b, 9)
    assert torch.equal(x, block_probe(4, (3, 5), (1, 2), 9, padding=(1, 5), padding_mode="reflect"))
    assert x.shape == (1, 4, 3, 9)
    reflect = Branches(convs=(ConvBranch(rand(4, 4, 3, 3, seed=1)),), padding=(3, 1), padding_mode="reflect")
    assert torch.equal(branches_probe(reflect, 9), block_probe(4, (3, 3), (1, 1), 9, padding=(3, 1),
                                                               padding_mode="reflect"))
    assert branches_probe(reflect, 9).shape == (1, 4, 4, 3)
    circular = replace(reflect, padding=(1, 5), padding_mode="circular")
    assert branches_probe(circular, 9).shape == (1, 4, 3, 6)
    wide = Branches(convs=(ConvBranch(rand(4, 4, 3, 3, seed=1)),), padding=(3, 4))  # zeros: any padding
    assert torch.equal(branches_probe(wide, 9), block_probe(4, (3, 3), (1, 1), 9))
    plain_identity = Branches(convs=(ConvBranch(rand(4, 4, 3, 3, seed=1)),), identity=IdentityBranch())
    assert torch.equal(branches_probe(plain_identity, 5), block_probe(4, (3, 3), (1, 1), 5))


def test_branches_probe_second_sample_from_identity_statistics() -> None:
    bn = make_bn(4, 3)
    var = bn.running_var.clone()
    var[2] = -0.5  # a negative variance is taken as 0 (no spread)
    bn = replace(bn, running_var=var)
    b = Branches(convs=(ConvBranch(rand(4, 4, 3, 3, seed=1)),), identity=IdentityBranch(bn=bn))
    x = branches_probe(b, 21)
    assert x.shape == (2, 4, 3, 3)
    assert torch.equal(x[:1], block_probe(4, (3, 3), (1, 1), 21))
    second = block_probe(4, (3, 3), (1, 1), 22)
    std = var.clamp_min(0).sqrt().reshape(1, -1, 1, 1)
    assert torch.equal(x[1:], bn.running_mean.reshape(1, -1, 1, 1) + std * second)
    assert torch.equal(x[1, 2], torch.full((3, 3), float(bn.running_mean[2]), dtype=F64))
    top = branches_probe(b, 2**63 - 1)  # the second seed wraps to 0
    assert torch.equal(top[1:], bn.running_mean.reshape(1, -1, 1, 1) + std * block_probe(4, (3, 3), (1, 1), 0))
    widest = branches_probe(b, 2**64 - 1)  # the largest seed torch takes: the second one wraps into range
    assert torch.equal(widest[:1], block_probe(4, (3, 3), (1, 1), 2**64 - 1))
    assert torch.equal(widest[1:], bn.running_mean.reshape(1, -1, 1, 1) + std * block_probe(4, (3, 3), (1, 1), 0))
    # an identity BN of another width than the input (in_channels given): one sample
    other = Branches(convs=(ConvBranch(rand(4, 4, 3, 3, seed=1)),), identity=IdentityBranch(bn=bn), in_channels=3)
    assert branches_probe(other, 21).shape == (1, 3, 3, 3)


def test_reference_and_fused_probe() -> None:
    b = rich_block(c=4, groups=2, stride=(2, 2))
    want = centre(block_hand(b, block_probe(4, (3, 3), (1, 1), 13, padding=(1, 1))))[:, :, 0, 0]
    got = reference_probe(b, 13)
    assert got.shape == (1, 4) and close(got, want)
    fused = fuse_branches(replace(b, stride=(1, 1)))
    f = fused_probe(replace(fused, stride=(2, 2)), 13)
    assert f.shape == (1, 4) and close(f, want, rel=1e-12)
    reflect = FusedConv(rand(2, 3, 3, 3, seed=1), rand(2, seed=2), padding=(3, 1), padding_mode="reflect",
                        stride=(3, 3))
    x = block_probe(3, (3, 3), (1, 1), 4, padding=(3, 1), padding_mode="reflect")
    assert x.shape == (1, 3, 4, 3)
    full = F.conv2d(F.pad(x, (1, 1, 3, 3), mode="reflect"), reflect.weight, reflect.bias)
    assert close(fused_probe(reflect, 4), centre(full)[:, :, 0, 0])
    zeros = replace(reflect, padding=(4, 5), padding_mode="zeros")  # zero padding needs no larger probe
    x = block_probe(3, (3, 3), (1, 1), 4)
    full = F.conv2d(x, zeros.weight, zeros.bias, padding=(4, 5))
    assert close(fused_probe(zeros, 4), centre(full)[:, :, 0, 0])


def test_geometry_channels() -> None:
    assert GEOMETRY_CHANNELS == 8
    assert geometry_channels(1) == [0]
    assert geometry_channels(8) == list(range(8))
    assert geometry_channels(9) == [0, 1, 2, 3, 5, 6, 7, 8]
    assert geometry_channels(64) == [0, 9, 18, 27, 36, 45, 54, 63]
    assert geometry_channels(100, count=3) == [0, 50, 99]
    assert geometry_channels(3, count=3) == [0, 1, 2]
    assert geometry_channels(4, count=2) == [0, 3]
    assert geometry_channels(1, count=1) == [0]
    assert geometry_channels(0) == []


# -- probe.py: CentreProbe ------------------------------------------------------------------------

def depthwise_block(c: int = 12) -> Branches:
    return Branches(
        convs=(ConvBranch(rand(c, 1, 3, 3, seed=61), bias=rand(c, seed=62), bn=make_bn(c, 63)),
               ConvBranch(rand(c, 1, 1, 1, seed=64), bn=make_bn(c, 65), scale=rand(c, seed=66, lo=0.5))),
        identity=IdentityBranch(bn=make_bn(c, 67)), groups=c, post_bn=make_bn(c, 68),
    )


@pytest.mark.parametrize("which", ["rich", "depthwise", "dilated"])
@pytest.mark.parametrize("chunk", [None, 1, 3, 5])
def test_centre_probe_products_are_the_reference(which: str, chunk) -> None:
    if which == "rich":
        b = rich_block(c=6, groups=3)
    elif which == "depthwise":
        b = depthwise_block()
    else:
        b = Branches(convs=(ConvBranch(rand(4, 4, 3, 3, seed=71), dilation=(2, 1), bn=make_bn(4, 72)),
                            ConvBranch(rand(4, 4, 1, 3, seed=73), dilation=(2, 1))),
                     dilation=(2, 1), padding_mode="circular")
    p = CentreProbe("blk", b, 5)
    assert torch.equal(p.x, branches_probe(b, block_seed(5, "blk")))
    fused = fuse_branches(b, rows_per_chunk=chunk, observer=p, check_finite=False)
    reference, output = p.outputs(fused)
    want = reference_forward(replace(b, stride=(1, 1)), p.x, centre=True)
    assert reference.shape == want.shape == output.shape
    assert close(reference, want) and close(output, want, rel=1e-12)
    assert close(output, fused_forward(fused, p.x, stride=(1, 1), centre=True))
    # another eps: the same conv products, other BN parameters
    other = with_eps(b, 0.25)
    assert close(p.reference_for(other), reference_forward(replace(other, stride=(1, 1)), p.x, centre=True))


def test_centre_probe_shipped_with_another_geometry_runs_the_conv() -> None:
    b = rich_block(c=4, groups=2)
    p = CentreProbe("b", b, 1)
    fused = fuse_branches(b, observer=p, check_finite=False)
    _, same = p.outputs(fused)
    # the same geometry: the products taken during fusion (and the shipped bias) are the output
    doubled = replace(fused, weight=fused.weight * 2)
    assert close(p.outputs(doubled)[1], same)
    assert close(p.outputs(replace(fused, bias=fused.bias + 1))[1], same + 1)
    # another geometry: the conv is run as shipped
    wrong = replace(doubled, padding_mode="circular")
    _, out = p.outputs(wrong)
    assert close(out, fused_forward(wrong, p.x, stride=(1, 1), centre=True))
    assert not close(out, same, rel=1e-3)
    strided = replace(wrong, stride=(2, 2))  # run at stride 1 whatever the conv's stride
    assert close(p.outputs(strided)[1], out)
    for changed in ({"padding": (0, 0)}, {"dilation": (1, 2)}, {"groups": 1, "weight": torch.cat([fused.weight] * 2, 1)},
                    {"weight": fused.weight[:, :, :1, :1], "padding": (0, 0)}):
        shipped = replace(fused, **changed)
        assert close(p.outputs(shipped)[1], fused_forward(shipped, p.x, stride=(1, 1), centre=True)), changed
    assert close(p.outputs(replace(fused, padding=(0, 0)))[1],
                 fused_forward(replace(fused, padding=(0, 0)), p.x, stride=(1, 1), centre=True))


def test_centre_probe_fp16_rows_are_upcast_into_scratch() -> None:
    b = rich_block(c=4, groups=1)
    p = CentreProbe("b", b, 3)
    shipped = fuse_branches(b, torch.float16, observer=p, check_finite=False)
    _, out = p.outputs(shipped)
    assert close(out, fused_forward(shipped, p.x, stride=(1, 1), centre=True))


def test_centre_probe_products_use_each_branch_geometry() -> None:
    """Each conv branch's products use its own dilation (as the reference does), the fused conv's
    the block's; even where fusion would refuse the mix."""
    c = 3
    b = Branches(convs=(ConvBranch(rand(c, c, 3, 3, seed=1), bias=rand(c, seed=2), dilation=(1, 1)),
                        ConvBranch(rand(c, c, 3, 3, seed=3), dilation=(2, 2), bn=make_bn(c, 4))),
                 dilation=(2, 2))
    p = CentreProbe("b", b, 7)
    for i, conv in enumerate(b.convs):
        p.source(i, 0, c, conv.weight)
    fused_w = rand(c, c, 3, 3, seed=5)
    p.fused(0, c, fused_w, torch.empty_like(fused_w))
    assert close(p.reference_for(b), reference_forward(b, p.x, centre=True))
    shipped = FusedConv(fused_w, torch.zeros(c, dtype=F64), padding=(2, 2), dilation=(2, 2))
    assert close(p.outputs(shipped)[1], fused_forward(shipped, p.x, centre=True))


def test_centre_probe_reference_is_from_the_rows_fusion_showed() -> None:
    """The conv products come from the rows shown during fusion, not from the branches' tensors
    again (BN, scales and identity are the branches' own)."""
    b = rich_block(c=4, groups=2)
    p = CentreProbe("b", b, 1)
    for i, conv in enumerate(b.convs):
        p.source(i, 0, 4, conv.weight * 2)
    p.fused(0, 4, torch.zeros(4, 2, 3, 3, dtype=F64), torch.empty(4, 2, 3, 3, dtype=F64))
    doubled = replace(b, convs=tuple(replace(c, weight=c.weight * 2) for c in b.convs))
    assert close(p.reference_for(b), reference_forward(doubled, p.x, centre=True))
    assert not close(p.reference_for(b), reference_forward(b, p.x, centre=True), rel=1e-3)


def test_centre_probe_needs_every_row() -> None:
    b = rich_block(c=4, groups=2)
    p = CentreProbe("b", b, 1)
    with pytest.raises(RuntimeError) as info:
        p.reference_for(b)
    assert str(info.value) == "fusion showed [0, 0, 0] rows of 4 to the check's probe"
    p.source(0, 0, 4, b.convs[0].weight)
    p.source(1, 0, 2, b.convs[1].weight[:2])
    p.fused(0, 4, torch.zeros(4, 2, 3, 3, dtype=F64), torch.empty(4, 2, 3, 3, dtype=F64))
    with pytest.raises(RuntimeError) as info:
        p.reference_for(b)
    assert str(info.value) == "fusion showed [4, 2, 4] rows of 4 to the check's probe"


def test_centre_probe_non_finite() -> None:
    w = rand(4, 4, 3, 3, seed=1)
    w[1, 2, 0, 0] = float("inf")
    b = Branches(convs=(ConvBranch(rand(4, 4, 3, 3, seed=2)), ConvBranch(w)))
    p = CentreProbe("b", b, 0)
    fused = fuse_branches(b, observer=p, check_finite=False)
    with pytest.raises(InputError) as info:
        p.outputs(fused)
    assert str(info.value) == "branch 1 weight holds NaN or Inf"
    big = Branches(convs=(ConvBranch(torch.full((2, 2, 1, 1), 1e308, dtype=F64)),
                          ConvBranch(torch.full((2, 2, 1, 1), 1e308, dtype=F64))))
    p = CentreProbe("b", big, 0)
    fused = fuse_branches(big, observer=p, check_finite=False)
    with pytest.raises(InputError) as info:
        p.outputs(fused)
    assert str(info.value).startswith("the fused weight overflows")


# -- probe.py: check_block, check_expression -------------------------------------------------------

def hand_check(b: Branches, shipped: FusedConv, name: str, seed: int):
    """(err, scale) of check_block computed here: all channels at the centre, the geometry
    channels everywhere, both against the block by hand at stride 1."""
    x = branches_probe(b, block_seed(seed, name))
    ref = block_hand(b, x)
    out = F.conv2d(pad_input(x, shipped.padding, shipped.padding_mode), shipped.weight.to(F64),
                   shipped.bias.to(F64), dilation=shipped.dilation, groups=shipped.groups)
    rows = geometry_channels(shipped.out_channels)
    err = max(float((centre(ref) - centre(out)).abs().max()), float((ref[:, rows] - out[:, rows]).abs().max()))
    scale = max(float(centre(ref).abs().max()), float(ref[:, rows].abs().max()))
    return err, scale, x, ref, out


@pytest.mark.parametrize("use_probe", [False, True])
def test_check_block_numbers(use_probe: bool) -> None:
    b = rich_block(c=10, groups=2, stride=(2, 2))
    p = CentreProbe("s.0", b, 4) if use_probe else None
    fused64 = replace(fuse_branches(replace(b, stride=(1, 1)), observer=p, check_finite=False), stride=(2, 2))
    # shipped with a wrong bias on channel 7 (off the geometry channels of 10: 0,1,3,4,5,6,8,9)
    bias = fused64.bias.clone()
    bias[7] += 0.125
    shipped = replace(fused64, bias=bias)
    check = check_block("s.0", b, None, shipped, 4, Tolerance(rtol=1e-3, atol=0.5), probe=p)
    err, scale, _x, ref, _ = hand_check(b, shipped, "s.0", 4)
    assert check.name == "s.0" and check.problem is None
    assert check.max_abs_err == pytest.approx(0.125, rel=1e-9) and check.max_abs_err == pytest.approx(err, rel=1e-9)
    assert check.scale == pytest.approx(scale, rel=1e-12)
    assert check.rtol == 1e-3 and check.atol == 0.5 and check.cast_abs_err == check.max_abs_err
    assert check.reference.shape == (1, 10) and close(check.reference, centre(ref)[:1, :, 0, 0])
    assert check.ok and not replace(check, atol=0.0).ok


@pytest.mark.parametrize("use_probe", [False, True])
def test_check_block_sees_the_border(use_probe: bool) -> None:
    """A wrong padding mode changes no centre output: only the geometry channels see it."""
    b = rich_block(c=4, groups=2)
    p = CentreProbe("b", b, 0) if use_probe else None
    fused = fuse_branches(b, observer=p, check_finite=False)
    shipped = replace(fused, padding_mode="circular")
    check = check_block("b", b, None, shipped, 0, Tolerance(), probe=p)
    err, scale, *_ = hand_check(b, shipped, "b", 0)
    assert err > 1e-3 and check.max_abs_err == pytest.approx(err, rel=1e-9)
    assert check.scale == pytest.approx(scale, rel=1e-12)
    assert check.rtol == 1e-9 and not check.ok
    good = check_block("b", b, None, fused, 0, Tolerance(), probe=None)
    assert good.ok and good.max_abs_err < 1e-12 * good.scale


def test_check_block_border_sees_the_geometry_channels_only() -> None:
    """Padding errors are the same for every channel, so only the geometry channels are run at
    every position: an error on another channel's border only is not looked for."""
    c = 10
    w = torch.zeros(c, c, 3, 3, dtype=F64)
    for i in range(c):
        w[i, i, 1, 1] = 1.0 + i  # a centre tap reads no padding
    w[7, 7, 0, 0] = 0.5  # channel 7 (not a geometry channel of 10) reads the border
    b = Branches(convs=(ConvBranch(w),))
    assert 7 not in geometry_channels(c)
    shipped = replace(fuse_branches(b), padding_mode="circular")
    check = check_block("b", b, None, shipped, 0, Tolerance())
    x = branches_probe(b, block_seed(0, "b"))
    full_err = float((reference_forward(b, x) - fused_forward(shipped, x)).abs().max())
    assert full_err > 0.01 and check.max_abs_err == 0.0 and check.ok
    assert check.scale == float(reference_forward(b, x, channels=geometry_channels(c)).abs().max())


def test_check_block_scale_from_the_border() -> None:
    """The scale is the largest reference value at the centre or on the geometry channels' map."""
    w = torch.zeros(2, 1, 3, 3, dtype=F64)
    w[:, :, 0, 0] = 1.0  # the top-left tap: at the centre it reads the probe, at the border also padding
    b = Branches(convs=(ConvBranch(w),), in_channels=1, padding=(1, 1))
    fused = fuse_branches(b)
    check = check_block("b", b, None, fused, 0, Tolerance())
    x = branches_probe(b, block_seed(0, "b"))
    full = F.conv2d(x, w, padding=1)
    assert check.scale == float(full.abs().max())
    assert check.max_abs_err == 0.0


@pytest.mark.parametrize("stride", [(1, 1), (2, 2)])
@pytest.mark.parametrize("use_probe", [False, True])
def test_check_block_cast_error(use_probe: bool, stride) -> None:
    b = rich_block(c=10, groups=2, stride=stride)
    b = b if stride == (1, 1) else replace(b, identity=None)
    p = CentreProbe("b", b, 2) if use_probe else None
    fused64 = fuse_branches(b)
    shipped = fuse_branches(b, torch.float16, observer=p, check_finite=False)
    check = check_block("b", b, fused64, shipped, 2, Tolerance(), probe=p)
    x = branches_probe(b, block_seed(2, "b"))
    rows = geometry_channels(10)
    out16 = fused_forward(shipped, x, stride=(1, 1))
    out64 = fused_forward(fused64, x, stride=(1, 1))
    cast = max(float((centre(out16) - centre(out64)).abs().max()), float((out16[:, rows] - out64[:, rows]).abs().max()))
    assert cast > 0 and check.cast_abs_err == pytest.approx(cast, rel=1e-9)
    err, *_ = hand_check(b, shipped, "b", 2)
    assert check.max_abs_err == pytest.approx(err, rel=1e-9)
    assert check.rtol == 4e-3
    bf = fuse_branches(b, torch.bfloat16)
    assert check_block("b", b, fused64, bf, 2, Tolerance()).rtol == 3e-2
    assert check_block("b", b, fused64, bf, 2, Tolerance()).cast_abs_err < check_block("b", b, None, bf, 2,
                                                                                        Tolerance()).max_abs_err + 1
    # no fused64: the error is all cast error; float32: not measured apart
    assert check_block("b", b, None, shipped, 2, Tolerance()).cast_abs_err == pytest.approx(err, rel=1e-9)
    f32 = fuse_branches(b, torch.float32)
    c32 = check_block("b", b, fused64, f32, 2, Tolerance())
    assert c32.cast_abs_err == c32.max_abs_err and c32.rtol == 1e-5


def composite_block() -> Branches:
    c = 4
    w3, w1 = rand(c, 2, 3, 3, seed=81), rand(c, 2, 1, 1, seed=82)
    bn3, bn1 = make_bn(c, 83), make_bn(c, 84)
    ops = PlusOp((ThenOp(ConvOp(w3, rand(c, seed=85), (2, 2), None, (1, 1), 2, "zeros"), AffineOp(bn3, None)),
                  ThenOp(ConvOp(w1, None, (2, 2), None, (1, 1), 2, "zeros"), AffineOp(bn1, rand(c, seed=86)))))
    plain = Branches(convs=(ConvBranch(w3, bias=ops.terms[0].first.bias, bn=bn3),
                            ConvBranch(w1, bn=bn1, scale=ops.terms[1].second.scale)), groups=2, stride=(2, 2))
    return replace(plain, composite=True, ops=ops)


def expression_hand(b: Branches, x: torch.Tensor) -> torch.Tensor:
    t0, t1 = b.ops.terms
    y0 = bn_hand(F.conv2d(x, t0.first.weight, t0.first.bias, padding=1, groups=2), t0.second.bn)
    y1 = bn_hand(F.conv2d(x, t1.first.weight, None, groups=2), t1.second.bn) * vec(t1.second.scale)
    return y0 + y1


def test_check_expression_numbers() -> None:
    b = composite_block()
    fused64 = fuse_branches(replace(b, composite=False, ops=None))
    bias = fused64.bias.clone()
    bias[2] -= 0.0625
    shipped = replace(fused64, bias=bias)
    check = check_expression("c", b, None, shipped, 3, Tolerance(atol=0.01))
    x = branches_probe(b, block_seed(3, "c"))
    ref = expression_hand(b, x)
    assert check.name == "c" and check.problem is None
    assert check.max_abs_err == pytest.approx(0.0625, rel=1e-9)
    assert check.scale == pytest.approx(float(ref.abs().max()), rel=1e-12)
    assert check.rtol == 1e-9 and check.atol == 0.01 and check.cast_abs_err == check.max_abs_err
    assert check.reference.shape == (1, 4) and close(check.reference, ref[:1, :, 1, 1])
    assert not check.ok
    # check_block hands composite blocks to check_expression
    assert check_block("c", b, None, shipped, 3, Tolerance(atol=0.01)) == check
    # with the float64 fusion: the cast error is measured apart, as check_expression does
    half = fused64.to(torch.float16)
    via_block = check_block("c", b, fused64, half, 3, Tolerance())
    assert via_block == check_expression("c", b, fused64, half, 3, Tolerance())
    assert via_block.cast_abs_err != via_block.max_abs_err


def test_check_expression_records_the_centre_pixel() -> None:
    """The first sample's centre output (row, column) on a 5x7 map; a block with an identity BN
    has a second sample, which is checked but not recorded."""
    w = rand(2, 2, 5, 7, seed=91)
    bn, id_bn = make_bn(2, 92), replace(make_bn(2, 93), running_mean=torch.tensor([30.0, -30.0], dtype=F64))
    b = Branches(convs=(ConvBranch(w),), composite=True,
                 ops=ThenOp(ConvOp(w, None, (1, 1), None, (1, 1), 1, "zeros"), AffineOp(bn, None)))
    fused = fuse_branches(replace(b, composite=False, ops=None, convs=(ConvBranch(w, bn=bn),)))
    check = check_expression("e", b, None, fused, 0, Tolerance())
    x = branches_probe(b, block_seed(0, "e"))
    ref = bn_hand(F.conv2d(x, w, padding=(2, 3)), bn)
    assert ref.shape == (1, 2, 5, 7) and close(check.reference, ref[:1, :, 2, 3])
    assert check.ok and check.max_abs_err <= 1e-12 * check.scale
    with_id = Branches(convs=(ConvBranch(w),), identity=IdentityBranch(bn=id_bn), composite=True,
                       ops=PlusOp((ThenOp(ConvOp(w, None, (1, 1), None, (1, 1), 1, "zeros"), AffineOp(bn, None)),
                                   ThenOp(IdentityOp(), AffineOp(id_bn, None)))))
    fused = fuse_branches(replace(with_id, composite=False, ops=None, convs=(ConvBranch(w, bn=bn),)))
    check = check_expression("e", with_id, None, fused, 0, Tolerance())
    x = branches_probe(with_id, block_seed(0, "e"))
    assert x.shape[0] == 2
    ref = bn_hand(F.conv2d(x, w, padding=(2, 3)), bn) + bn_hand(x, id_bn)
    assert check.reference.shape == (1, 2) and close(check.reference, ref[:1, :, 2, 3])
    assert check.scale == pytest.approx(float(ref.abs().max()), rel=1e-12)  # both samples checked
    assert float(ref[1:].abs().max()) > float(ref[:1].abs().max())


def test_check_expression_cast_error() -> None:
    b = composite_block()
    fused64 = fuse_branches(replace(b, composite=False, ops=None))
    x = branches_probe(b, block_seed(1, "c"))
    ref = expression_hand(b, x)
    for dtype, rtol in ((torch.float16, 4e-3), (torch.bfloat16, 3e-2)):
        shipped = fused64.to(dtype)
        check = check_expression("c", b, fused64, shipped, 1, Tolerance())
        out = fused_forward(shipped, x, stride=(1, 1))
        cast = float((out - fused_forward(fused64, x, stride=(1, 1))).abs().max())
        err = float((out - ref).abs().max())
        assert cast > 0 and check.cast_abs_err == pytest.approx(cast, rel=1e-9), dtype
        assert check.max_abs_err == pytest.approx(err, rel=1e-9) and check.rtol == rtol
        assert check.cast_abs_err != check.max_abs_err
        alone = check_expression("c", b, None, shipped, 1, Tolerance())
        assert alone.cast_abs_err == alone.max_abs_err == check.max_abs_err
    f32 = fused64.to(torch.float32)
    c32 = check_expression("c", b, fused64, f32, 1, Tolerance())
    assert c32.cast_abs_err == c32.max_abs_err and c32.rtol == 1e-5
    c64 = check_expression("c", b, fused64, fused64, 1, Tolerance(rtol=0.5))
    assert c64.cast_abs_err == c64.max_abs_err and c64.rtol == 0.5 and c64.ok


# -- probe.py: eps ---------------------------------------------------------------------------------

def test_with_eps_sets_every_batch_norm() -> None:
    b = rich_block(c=4, groups=2, eps=1e-5)
    b = replace(b, convs=(*b.convs, ConvBranch(rand(4, 2, 3, 3, seed=90))))
    other = with_eps(b, 0.125)
    assert [c.bn.eps for c in other.convs[:2]] == [0.125, 0.125] and other.convs[2].bn is None
    assert other.identity.bn.eps == 0.125 and other.post_bn.eps == 0.125
    for old, new in zip((*[c.bn for c in b.convs[:2]], b.identity.bn, b.post_bn),
                        (*[c.bn for c in other.convs[:2]], other.identity.bn, other.post_bn)):
        assert new.running_mean is old.running_mean and new.running_var is old.running_var
        assert new.weight is old.weight and new.bias is old.bias
    for old, new in zip(b.convs, other.convs):
        assert new.weight is old.weight and new.bias is old.bias and new.scale is old.scale
    assert other.identity.scale is b.identity.scale and other.post_scale is b.post_scale
    assert (other.groups, other.stride) == (b.groups, b.stride)
    assert b.convs[0].bn.eps == 1e-5  # the block itself is left as it was
    bare = Branches(convs=(ConvBranch(rand(4, 4, 1, 1, seed=91)),))
    assert with_eps(bare, 0.5) == bare
    no_bn_identity = Branches(convs=(ConvBranch(rand(4, 4, 1, 1, seed=91)),), identity=IdentityBranch())
    assert with_eps(no_bn_identity, 0.5).identity == IdentityBranch()


def test_has_batch_norm_for_each_branch_kind() -> None:
    w = rand(4, 4, 3, 3, seed=1)
    bn = make_bn(4, 2)
    plain = ConvBranch(w)
    normed = ConvBranch(w, bn=bn)
    assert not has_batch_norm(Branches(convs=(plain,)))
    assert not has_batch_norm(Branches(convs=(plain, plain)))
    assert not has_batch_norm(Branches(convs=(plain,), identity=IdentityBranch(scale=torch.ones(4))))
    assert not has_batch_norm(Branches(convs=(), identity=IdentityBranch(), in_channels=4))
    assert not has_batch_norm(Branches(convs=(plain,), post_scale=torch.ones(4)))
    assert has_batch_norm(Branches(convs=(normed,)))
    assert has_batch_norm(Branches(convs=(plain, normed)))
    assert has_batch_norm(Branches(convs=(normed, plain)))
    assert has_batch_norm(Branches(convs=(plain,), post_bn=bn))
    assert has_batch_norm(Branches(convs=(), post_bn=bn, in_channels=4))
    assert has_batch_norm(Branches(convs=(plain,), identity=IdentityBranch(bn=bn)))
    assert has_batch_norm(Branches(convs=(), identity=IdentityBranch(bn=bn)))
    assert has_batch_norm(Branches(convs=(normed,), identity=IdentityBranch(bn=bn), post_bn=bn))


def eps_by_hand(b: Branches, x: torch.Tensor, other: float) -> float:
    first = centre(block_hand(b, x))
    second = centre(block_hand(b, x, eps=other))
    err, scale = float((first - second).abs().max()), float(first.abs().max())
    return err / scale if scale > 0 else err


@pytest.mark.parametrize("stride", [(1, 1), (2, 2), (1, 2), (2, 1)])
def test_eps_sensitivity_is_the_block_recomputed_with_the_other_eps(stride) -> None:
    b = rich_block(c=4, groups=2, small_var=True, stride=stride)
    b = replace(b, identity=None) if stride != (1, 1) else b
    x = branches_probe(b, block_seed(6, "blk"))
    want = eps_by_hand(b, x, 1e-3)
    assert want > 1e-3  # the variances are small: eps matters
    assert eps_sensitivity("blk", b, 6) == pytest.approx(want, rel=1e-9)
    assert eps_sensitivity("blk", b, 6, other_eps=1e-3) == pytest.approx(want, rel=1e-9)
    assert eps_sensitivity("blk", b, 6, other_eps=0.5) == pytest.approx(eps_by_hand(b, x, 0.5), rel=1e-9)
    assert eps_sensitivity("blk", b, 6, other_eps=1e-5) == 0.0  # the eps it has
    p = CentreProbe("blk", b, 6)
    fuse_branches(b, observer=p, check_finite=False)
    assert eps_sensitivity("blk", b, 6, probe=p) == pytest.approx(want, rel=1e-9)
    assert eps_sensitivity("other", b, 99, probe=p) == pytest.approx(want, rel=1e-9)  # the probe's input


def test_eps_sensitivity_of_each_branch_kind() -> None:
    """Each BN (conv, identity, post-sum) is recomputed with the other eps."""
    w = rand(4, 4, 3, 3, seed=1)
    x_of = lambda b: branches_probe(b, block_seed(0, "k"))
    for b in (Branches(convs=(ConvBranch(w, bn=make_bn(4, 2, small_var=True)),)),
              Branches(convs=(ConvBranch(w),), identity=IdentityBranch(bn=make_bn(4, 3, small_var=True))),
              Branches(convs=(ConvBranch(w),), post_bn=make_bn(4, 4, small_var=True))):
        want = eps_by_hand(b, x_of(b), 1e-3)
        assert want > 1e-3 and eps_sensitivity("k", b, 0) == pytest.approx(want, rel=1e-9)


def test_eps_sensitivity_relative_and_absolute() -> None:
    w = rand(4, 4, 3, 3, seed=1)
    # an output of all zeros at both eps: 0, not a division by zero
    zero_bn = BatchNorm(rand(4, seed=2), rand(4, seed=3, lo=1e-4, hi=1e-3), weight=torch.zeros(4, dtype=F64),
                        bias=torch.zeros(4, dtype=F64))
    assert eps_sensitivity("z", Branches(convs=(ConvBranch(w, bn=zero_bn),)), 0) == 0.0
    # small outputs (max below 1): relative to that scale, not the absolute change
    bn = make_bn(4, 5, small_var=True)
    small = replace(bn, weight=bn.weight * 1e-4, bias=bn.bias * 1e-4)
    b = Branches(convs=(ConvBranch(w, bn=small),))
    x = branches_probe(b, block_seed(0, "s"))
    first = centre(block_hand(b, x))
    second = centre(block_hand(b, x, eps=1e-3))
    err, scale = float((first - second).abs().max()), float(first.abs().max())
    assert 0 < scale < 1 and err > 0
    assert eps_sensitivity("s", b, 0) == pytest.approx(err / scale, rel=1e-9)
    # large outputs (max above 1)
    big = replace(bn, weight=bn.weight * 1e4, bias=bn.bias * 1e4)
    bb = Branches(convs=(ConvBranch(w, bn=big),))
    first = centre(block_hand(bb, x))
    second = centre(block_hand(bb, x, eps=1e-3))
    assert float(first.abs().max()) > 1
    assert eps_sensitivity("s", bb, 0) == pytest.approx(float((first - second).abs().max() / first.abs().max()),
                                                        rel=1e-9)


# -- model.py --------------------------------------------------------------------------------------

def test_flatten_outputs() -> None:
    t = [torch.full((1,), float(i)) for i in range(6)]
    assert flatten_outputs(t[0])[0] is t[0] and len(flatten_outputs(t[0])) == 1
    value = (t[0], [t[1], {"b": t[2], "a": t[3], 1: t[4]}], "text", None, 3)
    got = flatten_outputs(value)
    assert [float(x) for x in got] == [0.0, 1.0, 4.0, 3.0, 2.0]
    assert all(a is b for a, b in zip(got, [t[0], t[1], t[4], t[3], t[2]]))
    assert flatten_outputs({"z": (t[5],), "y": [[t[0]]]}) == [t[0], t[5]]
    assert flatten_outputs("x") == [] and flatten_outputs(None) == [] and flatten_outputs({}) == []


class ConvSub(nn.Conv2d):
    pass


@pytest.mark.parametrize(("layers", "channels"), [
    ([nn.Conv2d(3, 8, 3)], 3),
    ([nn.Linear(4, 4), nn.BatchNorm2d(5), nn.Conv2d(5, 2, 1), nn.Conv2d(2, 7, 1)], 5),
    ([nn.Conv1d(9, 9, 3), nn.ConvTranspose2d(6, 6, 3), nn.Sequential(ConvSub(11, 4, 1))], 11),
    ([nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, groups=1)))], 1),
    ([nn.Conv2d(6, 6, 3, groups=3)], 6),
])
def test_infer_input_shape_by_module_kind(layers, channels: int) -> None:
    m = nn.Sequential(*layers)
    assert infer_input_shape(m) == (2, channels, 64, 64)
    assert infer_input_shape(m, spatial=17) == (2, channels, 17, 17)
    assert infer_input_shape(m, batch=5) == (5, channels, 64, 64)
    assert infer_input_shape(m, 9, 1) == (1, channels, 9, 9)
    assert all(type(v) is int for v in infer_input_shape(m))


@pytest.mark.parametrize("m", [nn.Sequential(nn.Linear(3, 3)), nn.Conv1d(3, 3, 1), nn.ConvTranspose2d(2, 2, 1),
                               nn.Conv3d(2, 2, 1), nn.Identity()])
def test_infer_input_shape_without_a_conv2d(m) -> None:
    with pytest.raises(ValueError) as info:
        infer_input_shape(m)
    assert str(info.value) == "the model has no Conv2d to infer an input shape from; pass --input-shape N,C,H,W"


def test_model_dtype() -> None:
    assert model_dtype(nn.Conv2d(1, 1, 1)) is torch.float32
    assert model_dtype(nn.Conv2d(1, 1, 1).double()) is F64
    assert model_dtype(nn.Sequential(nn.Conv2d(1, 1, 1).half(), nn.Conv2d(1, 1, 1).double())) is torch.float16
    assert model_dtype(nn.Identity()) is torch.float32
    bn_only_buffers = nn.BatchNorm2d(2, affine=False).double()
    assert model_dtype(bn_only_buffers) is torch.float32  # buffers are not parameters

    class IntFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.count = nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
            self.w = nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))

    assert model_dtype(IntFirst()) is torch.bfloat16


def test_leave_a_core() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with leave_a_core() as threads:
            assert threads == 2 and torch.get_num_threads() == 2
            with leave_a_core() as inner:  # nested: the outer setting stays
                assert inner == 2 and torch.get_num_threads() == 2
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 3 and model._threads_left == []
        with pytest.raises(KeyError), leave_a_core():
            raise KeyError("x")
        assert torch.get_num_threads() == 3 and model._threads_left == []
        torch.set_num_threads(1)
        with leave_a_core() as threads:
            assert threads == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


class WithDeepcopy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.copies = 0

    def __deepcopy__(self, memo):
        clone = WithDeepcopy.__new__(WithDeepcopy)
        memo[id(self)] = clone
        for k, v in self.__dict__.items():
            clone.__dict__[k] = copy.deepcopy(v, memo)
        clone.copies = self.copies + 1
        return clone


class WithState(nn.Module):
    def __getstate__(self):
        return self.__dict__


def test_copies_as_a_module() -> None:
    assert model._copies_as_a_module(nn.Sequential)
    assert model._copies_as_a_module(nn.BatchNorm2d)
    assert model._copies_as_a_module(type("Plain", (nn.Module,), {}))
    assert not model._copies_as_a_module(nn.Conv2d)  # _ConvNd has its own __setstate__
    assert not model._copies_as_a_module(ConvSub)
    assert not model._copies_as_a_module(WithDeepcopy)
    assert not model._copies_as_a_module(WithState)
    assert not model._copies_as_a_module(type("Sub", (WithDeepcopy,), {}))
    assert not model._copies_as_a_module(object)
    assert not model._copies_as_a_module(dict)
    assert model._PLAIN_COPY[nn.Sequential] is True and model._PLAIN_COPY[WithDeepcopy] is False
    for hook in ("__copy__", "__reduce__", "__reduce_ex__", "__setstate__", "__getnewargs__",
                 "__getnewargs_ex__", "__slots__"):
        cls = type(f"M{hook}", (nn.Module,), {hook: ()})
        assert not model._copies_as_a_module(cls), hook


def test_cast() -> None:
    p = nn.Parameter(torch.ones(2), requires_grad=False)
    cp = model._cast(p, F64)
    assert type(cp) is nn.Parameter and cp.dtype == F64 and not cp.requires_grad
    q = model._cast(nn.Parameter(torch.ones(2)), torch.float16)
    assert type(q) is nn.Parameter and q.requires_grad and q.dtype == torch.float16
    t = torch.arange(3)
    ct = model._cast(t, F64)
    assert type(ct) is torch.Tensor and ct.dtype == torch.int64 and torch.equal(ct, t)
    assert ct.data_ptr() != t.data_ptr()  # a copy, not the buffer itself
    f = torch.ones(2)
    cf = model._cast(f, F64)
    assert type(cf) is torch.Tensor and cf.dtype == F64
    cf32 = model._cast(f, torch.float32)
    assert torch.equal(cf32, f)

    class Sub(torch.Tensor):
        pass

    assert model._cast(torch.ones(2).as_subclass(Sub), F64) is None


class Tied(nn.Module):
    """Plain modules (copied the short way), a tied weight, a frozen one, an int buffer, a hook,
    an empty and a full list, a None child."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = nn.Linear(2, 2)
        self.b.weight = self.a.weight
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.register_buffer("steps", torch.tensor(3))
        self.register_buffer("stat", torch.ones(2))
        self.register_module("gap", None)
        self.hooked = 0
        self.register_forward_hook(lambda *_: None)
        self.missing = None
        self.empty: list = []
        self.names = ["a", "b"]
        self.table = {"k": [1]}

    def forward(self, x):
        return self.b(self.a(x))


def test_copy_model() -> None:
    m = Tied()
    c = copy_model(m, F64)
    assert c is not m and type(c) is Tied and type(c.a) is nn.Linear
    assert c.a.weight is c.b.weight and c.a.weight is not m.a.weight
    assert type(c.a.weight) is nn.Parameter and c.a.weight.requires_grad and not c.frozen.requires_grad
    assert c.a.weight.dtype == F64 and c.a.bias.dtype == F64 and c.frozen.dtype == F64 and c.stat.dtype == F64
    assert c.steps.dtype == torch.int64 and int(c.steps) == 3
    assert torch.equal(c.a.weight, m.a.weight.detach().to(F64)) and m.a.weight.dtype == torch.float32
    assert c.missing is None and c.gap is None and "gap" in c._modules
    assert list(c._modules) == ["a", "b", "gap"]
    assert c._forward_hooks is not m._forward_hooks and len(c._forward_hooks) == 1
    assert c._forward_pre_hooks is not m._forward_pre_hooks and type(c._forward_pre_hooks) is OrderedDict
    assert c.empty == [] and c.empty is not m.empty
    assert c.names == ["a", "b"] and c.names is not m.names and c.table == {"k": [1]}
    assert c.table["k"] is not m.table["k"]
    c.b.weight.data.fill_(0)
    assert float(m.a.weight.detach().abs().sum()) > 0
    same = copy_model(m)
    assert same.a.weight.dtype == torch.float32 and same.a.weight is same.b.weight
    assert same.a.weight is not m.a.weight and torch.equal(same.a.weight, m.a.weight)
    half = copy_model(m, torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16} and half.steps.dtype == torch.int64
    x = torch.randn(1, 2, generator=gen(3), dtype=F64)
    with torch.no_grad():
        assert torch.equal(c(x), F.linear(F.linear(x, c.a.weight, c.a.bias), c.a.weight, c.b.bias))


def test_copy_model_takes_the_short_way_for_plain_modules(monkeypatch) -> None:
    """Plain modules are never handed to copy.deepcopy (their tensors come from the cast memo)."""
    seen: list = []
    real = copy.deepcopy

    def spy(value, memo=None, *rest):
        seen.append(type(value))
        if type(value) in (dict, OrderedDict, set, list):
            assert value, "an empty container went through deepcopy"
        return real(value, memo, *rest)

    monkeypatch.setattr(model.copy, "deepcopy", spy)
    m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm2d(2), nn.Sequential(nn.ReLU()))
    c = copy_model(m, F64)
    assert not any(issubclass(t, (nn.Module, torch.Tensor)) for t in seen), seen
    assert {p.dtype for p in c.parameters()} == {F64}
    seen.clear()
    copy_model(nn.Sequential(nn.Conv2d(1, 1, 1)), F64)  # Conv2d has its own __setstate__: deepcopy's way
    assert nn.Conv2d in seen and nn.Sequential not in seen


@pytest.fixture
def copies(monkeypatch):
    """Counts tensors deep-copied and ``Module.to`` calls during copy_model."""
    counts = {"tensor": 0, "to": 0}
    for cls in (torch.Tensor, nn.Parameter):
        real = cls.__deepcopy__

        def counted(self, memo, real=real):
            counts["tensor"] += 1
            return real(self, memo)

        monkeypatch.setattr(cls, "__deepcopy__", counted)
    real_to = nn.Module.to

    def to(self, *args, **kwargs):
        counts["to"] += 1
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", to)
    return counts


def test_copy_model_casts_in_one_pass(copies, monkeypatch) -> None:
    """Parameters and buffers are cast once, from the memo: never deep-copied first, no second
    pass with Module.to (only for tensors a module's own copying left uncast)."""
    m = Tied()
    c = copy_model(m, F64)
    assert copies == {"tensor": 0, "to": 0}
    assert c.a.weight.dtype == F64 and c.steps.dtype == torch.int64
    copy_model(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)), F64)  # deepcopy's way, same memo
    assert copies == {"tensor": 0, "to": 0}
    copy_model(m)  # no dtype: a plain deep copy, tensors and all
    assert copies == {"tensor": 6, "to": 0}
    copies["tensor"] = 0

    def refuse(module, memo):
        raise TypeError("cannot")

    monkeypatch.setattr(model, "_copy_module", refuse)
    c = copy_model(m, F64)
    assert copies == {"tensor": 0, "to": 0} and c.a.weight.dtype == F64


def test_copy_model_keeps_shared_modules_shared() -> None:
    shared = nn.Linear(2, 2)
    m = nn.Sequential(shared, nn.ReLU(), shared, nn.Sequential(shared))
    c = copy_model(m, F64)
    assert c[0] is c[2] is c[3][0] and c[0] is not shared
    assert [type(x) for x in c] == [nn.Linear, nn.ReLU, nn.Linear, nn.Sequential]
    assert len(list(c.parameters())) == 2 and c[0].weight.dtype == F64
    same = copy_model(m)
    assert same[0] is same[2] is same[3][0] and same[0] is not shared


def test_copy_model_copies_falsy_attributes_as_they_are() -> None:
    m = nn.Linear(2, 2)
    m.zero = torch.tensor(0.0)  # a plain attribute (no buffer): falsy, not a container
    m.nothing = None
    m.count = 0
    m.empty_table: dict = {}
    c = copy_model(m, F64)
    assert c.zero.shape == () and float(c.zero) == 0.0 and c.zero is not m.zero
    assert c.nothing is None and c.count == 0 and c.empty_table == {} and c.empty_table is not m.empty_table


def test_copies_as_a_module_is_decided_once_per_class() -> None:
    cls = type("Decided", (nn.Module,), {})
    assert model._copies_as_a_module(cls) and model._PLAIN_COPY[cls] is True
    cls.__deepcopy__ = lambda self, memo: self  # added after the first copy: the class was decided
    assert model._copies_as_a_module(cls)
    other = type("Later", (nn.Module,), {})
    other.__deepcopy__ = lambda self, memo: self
    assert not model._copies_as_a_module(other) and model._PLAIN_COPY[other] is False


def test_copy_model_leaves_a_compiled_forward_behind() -> None:
    m = nn.Linear(2, 2)
    m._compiled_call_impl = lambda *args, **kwargs: "compiled"
    m.after = "kept"  # what comes after it in the instance dictionary is copied
    c = copy_model(m, F64)
    assert "_compiled_call_impl" not in vars(c) and c.after == "kept"
    x = torch.ones(1, 2, dtype=F64)
    with torch.no_grad():
        assert torch.equal(c(x), F.linear(x, c.weight, c.bias))


def test_copy_model_with_own_copying(copies) -> None:
    m = nn.Sequential(WithDeepcopy(), nn.Conv2d(2, 2, 1))
    c = copy_model(m, F64)
    assert c[0].copies == 1 and m[0].copies == 0
    assert copies["to"] == 0  # its own copying used the memo: nothing left to cast
    assert {p.dtype for p in c.parameters()} == {F64}
    assert c[0].conv.weight is not m[0].conv.weight

    class Forgetful(nn.Module):  # copies itself without the memo: its tensors come uncast
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("count", torch.tensor(1))

        def __deepcopy__(self, memo):
            clone = Forgetful.__new__(Forgetful)
            clone.__dict__.update(copy.deepcopy(self.__dict__))
            return clone

    n = nn.Sequential(Forgetful(), nn.BatchNorm2d(2))
    cn = copy_model(n, F64)
    assert copies["to"] == 1  # one pass of Module.to for what came uncast
    assert {t.dtype for t in [*cn.parameters(), *cn.buffers()] if t.is_floating_point()} == {F64}
    assert cn[0].count.dtype == torch.int64 and n[0].lin.weight.dtype == torch.float32
    assert copy_model(n)[0].lin.weight.dtype == torch.float32 and copies["to"] == 1
    assert {t.dtype for t in copy_model(n, torch.float32).parameters()} == {torch.float32} and copies["to"] == 1


def test_copy_model_falls_back_to_deepcopy(monkeypatch) -> None:
    """Anything the short way cannot copy: the whole copy is deepcopy's, still cast and tied."""
    def refuse(module, memo):
        raise TypeError("cannot")

    monkeypatch.setattr(model, "_copy_module", refuse)
    m = Tied()
    c = copy_model(m, F64)
    assert c is not m and c.a.weight is c.b.weight and c.a.weight is not m.a.weight
    assert c.a.weight.dtype == F64 and c.stat.dtype == F64 and c.steps.dtype == torch.int64
    assert m.a.weight.dtype == torch.float32
    plain = copy_model(m)
    assert plain.a.weight.dtype == torch.float32 and plain.a.weight is not m.a.weight
    assert plain.a.weight.data_ptr() != m.a.weight.data_ptr() and plain.stat.data_ptr() != m.stat.data_ptr()
    with torch.no_grad():
        plain.a.weight.fill_(7.0)
    assert not torch.equal(m.a.weight, plain.a.weight)  # the original's tensors are not shared


class Recorder(nn.Module):
    def __init__(self, fail_in=()) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.fail_in = fail_in
        self.seen: list = []

    def forward(self, x):
        self.seen.append((x.dtype, torch.get_num_threads(), self.training, torch.is_grad_enabled()))
        if x.dtype in self.fail_in:
            raise RuntimeError(f"no {x.dtype}")
        y = self.conv(x)
        return {"main": y, "aux": (y * 2,)}


def test_model_outputs_in_float64() -> None:
    m = Recorder()
    m.train()
    x = torch.randn(1, 2, 3, 3, generator=gen(1))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        outs, dtype = model_outputs(m, x)
    finally:
        torch.set_num_threads(before)
    assert dtype == "float64"
    want = F.conv2d(x.double(), m.conv.weight.double(), m.conv.bias.double())
    assert [o.dtype for o in outs] == [F64, F64]
    assert torch.equal(outs[0], want * 2) and torch.equal(outs[1], want)  # "aux" sorts before "main"
    assert m.training and m.conv.weight.dtype == torch.float32 and m.seen == []  # the model never ran


def test_model_outputs_falls_back_to_float32_then_fails() -> None:
    m = Recorder(fail_in=(F64,))
    x = torch.randn(1, 2, 3, 3, generator=gen(2))
    outs, dtype = model_outputs(m, x)
    assert dtype == "float32"
    want = F.conv2d(x, m.conv.weight, m.conv.bias)
    assert outs[1].dtype == F64 and torch.equal(outs[1], want.double())
    bad = Recorder(fail_in=(F64, torch.float32))
    with pytest.raises(RuntimeError) as info:
        model_outputs(bad, x)
    assert str(info.value) == "the model's forward failed: no torch.float32"


def test_model_outputs_run_in_eval_without_grad_on_a_core_less() -> None:
    seen: list = []

    class Spy(Recorder):
        def forward(self, x):
            seen.append((x.dtype, torch.get_num_threads(), self.training, torch.is_grad_enabled()))
            return super().forward(x)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        model_outputs(Spy(fail_in=(F64,)), torch.zeros(1, 2, 2, 2))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert seen == [(F64, 2, False, False), (torch.float32, 2, False, False)]


def test_compare_outputs() -> None:
    a = [torch.tensor([1.0, -8.0]), torch.tensor([[3.0]])]
    b = [torch.tensor([1.5, -8.0]), torch.tensor([[0.0]])]
    assert compare_outputs(a, b) == (3.0, 8.0)
    assert compare_outputs(a[:1], b[:1]) == (0.5, 8.0)
    assert compare_outputs(a[1:], b[1:]) == (3.0, 3.0)
    assert compare_outputs([], []) == (0.0, 0.0)
    assert compare_outputs([torch.zeros(2)], [torch.tensor([0.0, -0.25])]) == (0.25, 0.0)
    with pytest.raises(ValueError) as info:
        compare_outputs(a, b[:1])
    assert str(info.value) == "the models return 2 vs 1 tensors"
    with pytest.raises(ValueError) as info:
        compare_outputs([torch.zeros(2)], [torch.zeros(3)])
    assert str(info.value) == "shapes differ: (2,) vs (3,)"
    assert compare_outputs([torch.ones(1)], [torch.tensor([math.inf])])[0] == math.inf
