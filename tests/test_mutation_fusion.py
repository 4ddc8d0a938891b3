"""The fusion math and the algebra, to the letter (issue 15: mutation score of the fusion row).

Fast unit tests, float64, of what the end-to-end and law tests leave loose: each leaf's geometry
and tensors, ``then``/``plus`` and the exact reason of each refusal, where padding and dilation
put a kernel, groups and regrouping, bias handling, the errors that name the branch, BN or scale at
fault, chunked fusion equal to whole-tensor fusion, the dtype of the result, the chunks and rows
an observer sees, and ``map_branch_tensors``' mapping. Expected values come from torch's own
``conv2d``/``batch_norm`` on a random input, or by hand for tiny kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest
from torch import Tensor

from repvgg_cli.algebra import compose, maps
from repvgg_cli.algebra.expression import AffineOp, ConvOp, IdentityOp, PadOp, PlusOp, ThenOp, ops_of
from repvgg_cli.errors import InputError, UnsupportedError
from repvgg_cli.fusion import bn as fbn
from repvgg_cli.fusion import kernels, sum as fsum
from repvgg_cli.fusion.values import (
    BatchNorm,
    Branches,
    ConvBranch,
    FusedConv,
    IdentityBranch,
    as_meta,
    map_branch_tensors,
)

F64 = torch.float64


# -- helpers ------------------------------------------------------------------------------------


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def rand_bn(channels: int, seed: int, affine: bool = True, eps: float = 1e-3) -> BatchNorm:
    gen = torch.Generator().manual_seed(1000 + seed)
    mean = torch.randn(channels, generator=gen, dtype=F64)
    var = torch.rand(channels, generator=gen, dtype=F64) + 0.5
    weight = torch.randn(channels, generator=gen, dtype=F64) if affine else None
    bias = torch.randn(channels, generator=gen, dtype=F64) if affine else None
    return BatchNorm(running_mean=mean, running_var=var, eps=eps, weight=weight, bias=bias)


def bn_fwd(y: Tensor, norm: BatchNorm) -> Tensor:
    return F.batch_norm(y, norm.running_mean, norm.running_var, norm.weight, norm.bias, training=False,
                        eps=norm.eps)


def per_channel(v: Tensor) -> Tensor:
    return v.reshape(1, -1, 1, 1)


def conv_fwd(x: Tensor, fused: FusedConv) -> Tensor:
    return F.conv2d(x, fused.weight.to(F64), fused.bias.to(F64), fused.stride, fused.padding,
                    fused.dilation, fused.groups)


def close(actual: Tensor, expected: Tensor) -> None:
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)


def raises(kind: type[Exception], message: str):
    """The exception of exactly ``kind`` whose message is exactly ``message``."""
    return pytest.raises(kind, match="^" + _escape(message) + "$")


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def branches(*convs: ConvBranch, **fields) -> Branches:
    return Branches(convs=tuple(convs), **fields)


# -- values.py ----------------------------------------------------------------------------------


def test_fused_conv_to_copies_every_geometry_field_into_fresh_contiguous_tensors() -> None:
    weight = randn(4, 6, 3, 5).transpose(2, 3)  # not contiguous
    bias = randn(4, seed=1)
    fused = FusedConv(weight=weight, bias=bias, stride=(2, 1), padding=(0, 3), dilation=(2, 3), groups=2,
                      padding_mode="reflect", extra={"kept": False})
    for dtype in (F64, torch.float32, torch.float16):
        copy = fused.to(dtype)
        assert (copy.stride, copy.padding, copy.dilation, copy.groups, copy.padding_mode) == \
            ((2, 1), (0, 3), (2, 3), 2, "reflect")
        assert copy.extra == {}
        for new, old in ((copy.weight, weight), (copy.bias, bias)):
            assert new.dtype == dtype
            assert new.is_contiguous()
            assert new.untyped_storage().data_ptr() != old.untyped_storage().data_ptr()
            assert torch.equal(new, old.to(dtype))


def test_fused_conv_to_never_shares_a_contiguous_same_dtype_tensor_and_detaches() -> None:
    weight = randn(2, 1, 3, 3).requires_grad_()
    bias = randn(2, seed=1)
    copy = FusedConv(weight=weight, bias=bias).to(F64)
    assert not copy.weight.requires_grad
    assert copy.weight.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
    assert copy.bias.untyped_storage().data_ptr() != bias.untyped_storage().data_ptr()
    assert torch.equal(copy.weight, weight.detach()) and torch.equal(copy.bias, bias)
    bias.add_(1.0)  # the copy is independent of the original's storage
    assert not torch.equal(copy.bias, bias)
    assert (copy.stride, copy.padding, copy.dilation, copy.groups, copy.padding_mode) == \
        ((1, 1), (1, 1), (1, 1), 1, "zeros")


def test_as_meta_keeps_shape_and_dtype_without_data() -> None:
    meta = as_meta(randn(3, 2, 5, dtype=torch.float16))
    assert meta.device.type == "meta"
    assert tuple(meta.shape) == (3, 2, 5)
    assert meta.dtype == torch.float16


def test_map_branch_tensors_maps_every_tensor_and_keeps_everything_else() -> None:
    seen: list[int] = []

    def fn(t: Tensor) -> Tensor:
        seen.append(id(t))
        return t + 1000.0

    norms = [rand_bn(4, s) for s in range(3)]
    plain_bn = BatchNorm(running_mean=randn(4, seed=9), running_var=randn(4, seed=10).abs(), eps=0.25)
    convs = (
        ConvBranch(weight=randn(4, 2, 3, 3, seed=1), bias=randn(4, seed=2), bn=norms[0], padding=(1, 1),
                   dilation=(1, 1), scale=randn(4, seed=3), padding_mode="reflect"),
        ConvBranch(weight=randn(4, 2, 1, 1, seed=4), bn=plain_bn, padding=(0, 0)),
    )
    value = Branches(convs=convs, identity=IdentityBranch(bn=norms[1], scale=randn(4, seed=5)), groups=2,
                     stride=(1, 1), padding=(1, 1), dilation=(1, 1), padding_mode="reflect", post_bn=norms[2],
                     in_channels=4, geometry_known=True, post_scale=randn(4, seed=6), composite=True, ops="an op")
    mapped = map_branch_tensors(value, fn)

    def same(new: Tensor | None, old: Tensor | None) -> None:
        if old is None:
            assert new is None
        else:
            assert torch.equal(new, old + 1000.0)

    def same_bn(new: BatchNorm | None, old: BatchNorm | None) -> None:
        if old is None:
            assert new is None
            return
        assert new.eps == old.eps
        for name in ("running_mean", "running_var", "weight", "bias"):
            same(getattr(new, name), getattr(old, name))

    assert len(mapped.convs) == 2
    for new, old in zip(mapped.convs, convs):
        same(new.weight, old.weight)
        same(new.bias, old.bias)
        same(new.scale, old.scale)
        same_bn(new.bn, old.bn)
        assert (new.padding, new.dilation, new.padding_mode) == (old.padding, old.dilation, old.padding_mode)
    same_bn(mapped.identity.bn, value.identity.bn)
    same(mapped.identity.scale, value.identity.scale)
    same_bn(mapped.post_bn, value.post_bn)
    same(mapped.post_scale, value.post_scale)
    assert mapped.ops is None
    assert (mapped.groups, mapped.stride, mapped.padding, mapped.dilation, mapped.padding_mode, mapped.in_channels,
            mapped.geometry_known, mapped.composite) == (2, (1, 1), (1, 1), (1, 1), "reflect", 4, True, True)
    # 2 weights, 1 bias, 1 scale, 4 + 2 BN tensors of the convs; identity 4 + 1; post 4 + 1
    assert len(seen) == 2 + 1 + 1 + 6 + 5 + 5


def test_map_branch_tensors_leaves_missing_parts_missing() -> None:
    value = Branches(convs=(ConvBranch(weight=randn(2, 2, 1, 1)),))
    mapped = map_branch_tensors(value, lambda t: t * 2)
    assert mapped.identity is None and mapped.post_bn is None and mapped.post_scale is None
    (term,) = mapped.convs
    assert term.bias is None and term.bn is None and term.scale is None
    assert torch.equal(term.weight, value.convs[0].weight * 2)


# -- bn.py ----------------------------------------------------------------------------------------


def test_bn_scale_shift_by_hand() -> None:
    norm = BatchNorm(running_mean=torch.tensor([1.0, 2.0]), running_var=torch.tensor([3.0, 0.0]), eps=1.0,
                     weight=torch.tensor([4.0, -2.0]), bias=torch.tensor([0.5, 1.0]))
    scale, shift = fbn.bn_scale_shift(norm, 2)
    assert scale.dtype == F64 and shift.dtype == F64
    assert scale.tolist() == [2.0, -2.0]
    assert shift.tolist() == [-1.5, 5.0]
    plain = BatchNorm(running_mean=torch.tensor([1.0, 2.0]), running_var=torch.tensor([3.0, 0.0]), eps=1.0)
    scale, shift = fbn.bn_scale_shift(plain, 2)
    assert scale.tolist() == [0.5, 1.0]
    assert shift.tolist() == [-0.5, -2.0]


def test_bn_scale_shift_equals_torch_batch_norm() -> None:
    norm = rand_bn(5, seed=3, eps=0.01)
    scale, shift = fbn.bn_scale_shift(norm, 5)
    x = randn(2, 5, 3, 3, seed=4)
    close(x * per_channel(scale) + per_channel(shift), bn_fwd(x, norm))


def test_bn_scale_shift_accepts_eps_0_with_positive_var_and_var_0_with_positive_eps() -> None:
    norm = BatchNorm(running_mean=torch.zeros(2, dtype=F64), running_var=torch.tensor([4.0, 0.25], dtype=F64),
                     eps=0.0)
    assert fbn.bn_scale_shift(norm, 2)[0].tolist() == [0.5, 2.0]
    norm = BatchNorm(running_mean=torch.zeros(2, dtype=F64), running_var=torch.zeros(2, dtype=F64), eps=0.25)
    assert fbn.bn_scale_shift(norm, 2)[0].tolist() == [2.0, 2.0]


def _bn(**fields) -> BatchNorm:
    base = dict(running_mean=torch.tensor([1.0, 2.0]), running_var=torch.tensor([1.0, 2.0]), eps=1e-5)
    base.update(fields)
    return BatchNorm(**base)


@pytest.mark.parametrize("norm, message", [
    (_bn(running_mean=torch.tensor([1.0, 2.0, 3.0])), "X running_mean has shape (3,); expected (2,)"),
    (_bn(running_mean=torch.tensor([[1.0], [2.0]])), "X running_mean has shape (2, 1); expected (2,)"),
    (_bn(running_mean=torch.tensor([1.0, float("nan")])), "X running_mean holds NaN or Inf"),
    (_bn(running_var=torch.tensor([1, 2])), "X running_var has dtype torch.int64; a floating-point tensor is needed"),
    (_bn(running_var=[1.0, 2.0]), "X running_var is a list, not a tensor"),
    (_bn(running_var=torch.tensor([1.0, float("inf")])), "X running_var holds NaN or Inf"),
    (_bn(running_var=torch.tensor([1.0, -0.5])), "X running_var has negative values"),
    (_bn(running_var=torch.tensor([5.0, 5.0]), eps=-1.0), "X eps=-1.0 is not a non-negative number"),
    (_bn(eps=float("nan")), "X eps=nan is not a non-negative number"),
    (_bn(running_var=torch.tensor([0.0, 1.0]), eps=0.0), "X has running_var + eps == 0; the BN divides by zero"),
    (_bn(weight=torch.tensor([1.0, 2.0, 3.0])), "X weight has shape (3,); expected (2,)"),
    (_bn(weight=torch.tensor([1.0, float("-inf")])), "X weight holds NaN or Inf"),
    (_bn(bias=torch.tensor([1.0])), "X bias has shape (1,); expected (2,)"),
    (_bn(bias=torch.tensor([float("nan"), 1.0])), "X bias holds NaN or Inf"),
])
def test_bn_scale_shift_refusals_name_the_bn_and_the_part(norm: BatchNorm, message: str) -> None:
    with raises(InputError, message):
        fbn.bn_scale_shift(norm, 2, "X")


def test_bn_scale_shift_is_called_batchnorm_by_default_and_checks_mean_before_var() -> None:
    norm = _bn(running_mean=torch.tensor([1.0]), running_var=torch.tensor([1.0]))
    with raises(InputError, "BatchNorm running_mean has shape (1,); expected (2,)"):
        fbn.bn_scale_shift(norm, 2)


def test_as_float64_and_check_vector() -> None:
    t = torch.tensor([1.0, 2.0], dtype=torch.float32, requires_grad=True)
    out = fbn.as_float64(t, "t")
    assert out.dtype == F64 and out.device.type == "cpu" and not out.requires_grad
    assert out.tolist() == [1.0, 2.0]
    with raises(InputError, "t is a float, not a tensor"):
        fbn.as_float64(1.0, "t")
    with raises(InputError, "t has dtype torch.bool; a floating-point tensor is needed"):
        fbn.as_float64(torch.tensor([True]), "t")
    assert fbn.check_vector(None, 3, "v") is None
    assert fbn.check_vector(t, 2, "v").dtype == F64
    with raises(InputError, "v has shape (2,); expected (3,)"):
        fbn.check_vector(t, 3, "v")
    with raises(InputError, "v has shape (2, 1); expected (2,)"):
        fbn.check_vector(torch.ones(2, 1), 2, "v")
    with raises(InputError, "v holds NaN or Inf"):
        fbn.check_vector(torch.tensor([1.0, float("inf")]), 2, "v")


def test_fold_batch_norm_equals_conv_then_batch_norm_with_and_without_bias() -> None:
    weight, bias, norm = randn(4, 3, 3, 3, seed=1, dtype=torch.float32), randn(4, seed=2), rand_bn(4, seed=3)
    x = randn(2, 3, 5, 5, seed=4)
    for b in (bias, None):
        w, folded = fbn.fold_batch_norm(weight, b, norm)
        assert w.dtype == F64 and folded.dtype == F64
        expected = bn_fwd(F.conv2d(x, weight.to(F64), b, padding=1), norm)
        close(F.conv2d(x, w, folded, padding=1), expected)


def test_fold_batch_norm_refusals() -> None:
    norm = rand_bn(4, seed=3)
    with raises(InputError, "conv weight is a list, not a tensor"):
        fbn.fold_batch_norm([1.0], None, norm)
    with raises(InputError, "conv weight has dtype torch.int64; a floating-point tensor is needed"):
        fbn.fold_batch_norm(torch.ones(4, 1, 1, 1, dtype=torch.int64), None, norm)
    with raises(InputError, "conv bias has shape (3,); expected (4,)"):
        fbn.fold_batch_norm(randn(4, 1, 1, 1), randn(3), norm)
    with raises(InputError, "BatchNorm running_var has negative values"):
        fbn.fold_batch_norm(randn(4, 1, 1, 1), None, BatchNorm(torch.zeros(4), -torch.ones(4)))


def test_fuse_conv_bn_keeps_the_geometry_and_gives_contiguous_float64() -> None:
    weight, bias, norm = randn(4, 2, 3, 1, seed=1, dtype=torch.float32), randn(4, seed=2), rand_bn(4, seed=3)
    fused = fbn.fuse_conv_bn(weight, bias, norm, stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2)
    assert (fused.stride, fused.padding, fused.dilation, fused.groups) == ((2, 1), (1, 0), (2, 1), 2)
    assert fused.weight.is_contiguous() and fused.bias.is_contiguous()
    assert fused.weight.dtype == F64
    x = randn(1, 4, 7, 6, seed=4)
    expected = bn_fwd(F.conv2d(x, weight.to(F64), bias, (2, 1), (1, 0), (2, 1), 2), norm)
    close(conv_fwd(x, fused), expected)


def test_apply_scale_multiplies_rows_or_returns_the_inputs() -> None:
    weight, bias = randn(2, 1, 1, 2), randn(2, seed=1)
    w, b = fbn._apply_scale(weight, bias, None, "branch 0")
    assert w is weight and b is bias
    w, b = fbn._apply_scale(weight, bias, torch.tensor([2.0, -3.0]), "branch 0")
    assert torch.equal(w, weight * torch.tensor([2.0, -3.0], dtype=F64).reshape(-1, 1, 1, 1))
    assert torch.equal(b, bias * torch.tensor([2.0, -3.0], dtype=F64))
    with raises(InputError, "branch 0 scale has shape (3,); expected (2,)"):
        fbn._apply_scale(weight, bias, torch.ones(3), "branch 0")


# -- kernels.py -----------------------------------------------------------------------------------


def test_centred_slice_by_hand() -> None:
    assert kernels.centred_slice((5, 3), (1, 3)) == (slice(2, 3), slice(0, 3))
    assert kernels.centred_slice((3, 7), (3, 1)) == (slice(0, 3), slice(3, 4))
    assert kernels.centred_slice((7, 5), (3, 1)) == (slice(2, 5), slice(2, 3))


@pytest.mark.parametrize("big, small", [((3, 3), (5, 1)), ((3, 3), (1, 5)), ((4, 3), (1, 1)), ((3, 4), (1, 1)),
                                        ((3, 3), (2, 3)), ((3, 3), (3, 2))])
def test_centred_slice_refuses_what_cannot_be_centred(big, small) -> None:
    message = f"a {small[0]}x{small[1]} kernel cannot be centred in a {big[0]}x{big[1]} kernel"
    with raises(UnsupportedError, message):
        kernels.centred_slice(big, small)


def test_center_kernel_places_a_small_kernel_in_the_middle() -> None:
    weight = randn(2, 1, 1, 3)
    out = kernels.center_kernel(weight, (3, 5))
    expected = torch.zeros(2, 1, 3, 5, dtype=F64)
    expected[:, :, 1, 1:4] = weight[:, :, 0]
    assert torch.equal(out, expected)
    out = kernels.center_kernel(randn(1, 1, 3, 1, seed=2), (5, 3))
    expected = torch.zeros(1, 1, 5, 3, dtype=F64)
    expected[:, :, 1:4, 1] = randn(1, 1, 3, 1, seed=2)[:, :, :, 0]
    assert torch.equal(out, expected)
    with raises(UnsupportedError, "a 2x2 kernel cannot be centred in a 3x3 kernel"):
        kernels.center_kernel(randn(1, 1, 2, 2), (3, 3))


def test_identity_kernel_by_hand() -> None:
    kernel = kernels.identity_kernel(4, 2, (3, 5))
    expected = torch.zeros(4, 2, 3, 5, dtype=F64)
    for i in range(4):
        expected[i, i % 2, 1, 2] = 1.0
    assert kernel.dtype == F64
    assert torch.equal(kernel, expected)
    assert torch.equal(kernels.identity_kernel(3, 3, (1, 1)), torch.eye(3, dtype=F64).reshape(3, 3, 1, 1))


@pytest.mark.parametrize("args, message", [
    ((4, 2, (3, 2)), "an identity branch cannot be centred in an even 3x2 kernel"),
    ((4, 2, (2, 3)), "an identity branch cannot be centred in an even 2x3 kernel"),
    ((4, 0, (3, 3)), "4 channels do not split into groups of 0 for the identity"),
    ((4, -2, (3, 3)), "4 channels do not split into groups of -2 for the identity"),
    ((4, 3, (3, 3)), "4 channels do not split into groups of 3 for the identity"),
])
def test_identity_kernel_refusals(args, message) -> None:
    with raises(UnsupportedError, message):
        kernels.identity_kernel(*args)


def conv_term(out: int, per_group: int, kh: int, kw: int, seed: int = 0, **fields) -> ConvBranch:
    return ConvBranch(weight=randn(out, per_group, kh, kw, seed=seed), **fields)


def test_check_alignment_accepts_aligned_branches_and_exempts_1x1_from_dilation() -> None:
    value = branches(conv_term(2, 2, 3, 5, padding=(2, 4), dilation=(2, 2)),
                     conv_term(2, 2, 1, 1, padding=(0, 0), dilation=(3, 3), padding_mode="reflect"),
                     conv_term(2, 2, 1, 5, padding=(0, 4), dilation=(2, 2), padding_mode=None),
                     conv_term(2, 2, 3, 3, padding=None, dilation=(2, 2)),
                     identity=IdentityBranch(), dilation=(2, 2))
    assert value.resolved_padding == (2, 4)
    kernels.check_alignment(value, (3, 5))


@pytest.mark.parametrize("value, message", [
    (branches(conv_term(2, 2, 3, 3), conv_term(2, 2, 3, 3, dilation=(2, 2))),
     "branch 1 has dilation (2, 2) but the block has (1, 1)"),
    (branches(conv_term(2, 2, 3, 3, dilation=(2, 2)), conv_term(2, 2, 1, 3, dilation=(1, 1)), dilation=(2, 2)),
     "branch 1 has dilation (1, 1) but the block has (2, 2)"),
    (branches(conv_term(2, 2, 3, 3), conv_term(2, 2, 3, 3, padding_mode="reflect")),
     "branch 1 (3x3) pads with padding_mode='reflect' but the block's main conv with 'zeros'; one fused conv "
     "has one padding mode"),
    (branches(conv_term(2, 2, 3, 3), conv_term(2, 2, 1, 3, padding_mode="zeros"), padding_mode="circular"),
     "branch 1 (1x3) pads with padding_mode='zeros' but the block's main conv with 'circular'; one fused conv "
     "has one padding mode"),
    (branches(conv_term(2, 2, 3, 5), conv_term(2, 2, 1, 1, padding=(0, 1))),
     "branch 1 (1x1) has padding (0, 1), which does not line up with the 3x5 kernel's padding (1, 2)"),
    (branches(conv_term(2, 2, 3, 3), conv_term(2, 2, 1, 3, padding=(1, 0))),
     "branch 1 (1x3) has padding (1, 0), which does not line up with the 3x3 kernel's padding (1, 1)"),
    (branches(conv_term(2, 2, 3, 3), conv_term(2, 2, 1, 3, padding=(0, 0))),
     "branch 1 (1x3) has padding (0, 0), which does not line up with the 3x3 kernel's padding (1, 1)"),
    (branches(conv_term(2, 2, 3, 3, dilation=(2, 2)), conv_term(2, 2, 1, 1, padding=(1, 1)), dilation=(2, 2)),
     "branch 1 (1x1) has padding (1, 1), which does not line up with the 3x3 kernel's padding (2, 2)"),
    (branches(conv_term(2, 2, 3, 3), identity=IdentityBranch(), stride=(2, 2)),
     "an identity branch with stride (2, 2)"),
    (branches(conv_term(2, 2, 3, 3), identity=IdentityBranch(), stride=(1, 2)),
     "an identity branch with stride (1, 2)"),
    (branches(conv_term(2, 2, 3, 3), identity=IdentityBranch(), padding=(0, 0)),
     "an identity branch needs padding (1, 1) for a (3, 3) kernel, not (0, 0)"),
    (branches(conv_term(2, 2, 3, 5, dilation=(2, 2)), identity=IdentityBranch(), padding=(2, 2), dilation=(2, 2)),
     "an identity branch needs padding (2, 4) for a (3, 5) kernel, not (2, 2)"),
])
def test_check_alignment_refusals(value: Branches, message: str) -> None:
    with raises(UnsupportedError, message):
        kernels.check_alignment(value, value.kernel_size)


def test_check_alignment_lets_an_unpadded_branch_use_another_padding_mode() -> None:
    value = branches(conv_term(2, 2, 3, 3), conv_term(2, 2, 1, 1, padding_mode="reflect"),
                     conv_term(2, 2, 3, 3, padding_mode=None), padding=(1, 1))
    kernels.check_alignment(value, (3, 3))
    # a 1x3 branch in a 3x3 block pads its width: refused with another mode, on the width alone
    bad = branches(conv_term(2, 2, 3, 3), conv_term(2, 2, 1, 3, padding_mode="reflect"))
    with pytest.raises(UnsupportedError, match="padding_mode='reflect'"):
        kernels.check_alignment(bad, (3, 3))
    bad = branches(conv_term(2, 2, 3, 3), conv_term(2, 2, 3, 1, padding_mode="reflect"))
    with pytest.raises(UnsupportedError, match="padding_mode='reflect'"):
        kernels.check_alignment(bad, (3, 3))


# -- sum.py ------------------------------------------------------------------------------------


def test_chunk_rows() -> None:
    assert fsum.CHUNK_BYTES == 4 * 1024 * 1024
    assert fsum.chunk_rows(10, 800) == 10
    assert fsum.chunk_rows(10, 799) == 9
    assert fsum.chunk_rows(0, 800) == 100
    assert fsum.chunk_rows(1000, 800) == 1
    assert fsum.chunk_rows(9) == 4 * 1024 * 1024 // 72


def test_raise_non_finite_names_the_first_branch_with_nan_or_inf() -> None:
    good = ConvBranch(weight=randn(2, 1, 1, 1))
    nan = ConvBranch(weight=torch.tensor([[[[1.0]]], [[[float("nan")]]]]))
    inf = ConvBranch(weight=torch.tensor([[[[float("-inf")]]], [[[1.0]]]]))
    with raises(InputError, "branch 1 weight holds NaN or Inf"):
        fsum.raise_non_finite(branches(good, nan, inf))
    with raises(InputError, "branch 2 weight holds NaN or Inf"):
        fsum.raise_non_finite(branches(good, good, inf))
    with raises(InputError, "the fused weight overflows (NaN or Inf): the branch weights or BN scales are too large"):
        fsum.raise_non_finite(branches(good, good))


def test_checked_weight() -> None:
    weight = randn(3, 2, 1, 1).requires_grad_()
    out = fsum._checked_weight(weight, 3, "branch 2")
    assert not out.requires_grad
    assert out.data_ptr() == weight.data_ptr() and out.dtype == F64  # not copied, not upcast
    half = randn(3, 2, 1, 1, dtype=torch.float16)
    assert fsum._checked_weight(half, 3, "b").dtype == torch.float16
    with raises(InputError, "branch 2 weight is a list, not a tensor"):
        fsum._checked_weight([1.0], 3, "branch 2")
    with raises(InputError, "branch 2 weight has dtype torch.int32; a floating-point tensor is needed"):
        fsum._checked_weight(torch.ones(3, 2, 1, 1, dtype=torch.int32), 3, "branch 2")
    with raises(InputError, "branch 2 weight has 3 dimensions; a conv weight has 4"):
        fsum._checked_weight(randn(3, 2, 1), 3, "branch 2")
    with raises(UnsupportedError, "branch 2 has 3 output channels; the block has 4"):
        fsum._checked_weight(weight, 4, "branch 2")


def test_fused_weight_shape() -> None:
    assert fsum.fused_weight_shape(branches(conv_term(6, 2, 1, 3), conv_term(6, 2, 3, 1))) == (6, 2, 3, 3)
    assert fsum.fused_weight_shape(Branches(convs=(), identity=IdentityBranch(), in_channels=6, groups=3)) == \
        (6, 2, 1, 1)
    assert fsum.fused_weight_shape(Branches(convs=(), identity=IdentityBranch(), in_channels=6)) == (6, 6, 1, 1)
    with raises(UnsupportedError, "branches disagree on input channels per group: [1, 2, 3]"):
        fsum.fused_weight_shape(branches(conv_term(6, 3, 1, 1), conv_term(6, 1, 1, 1), conv_term(6, 2, 3, 3)))


def _full_block() -> tuple[Branches, callable]:
    """A grouped block of every kind of term (the 3x3 not first), with its train-form forward."""
    groups, channels = 2, 4
    norms = [rand_bn(channels, seed=s) for s in range(5)]
    w1, w3, w13, w31 = (randn(4, 2, 1, 1, seed=1), randn(4, 2, 3, 3, seed=2), randn(4, 2, 1, 3, seed=3),
                        randn(4, 2, 3, 1, seed=4))
    b3, b13 = randn(4, seed=5), randn(4, seed=6)
    s3, s13, s_id, s_post = (randn(4, seed=7), randn(4, seed=8), randn(4, seed=9), randn(4, seed=10))
    value = Branches(
        convs=(ConvBranch(weight=w1, bn=norms[0]),
               ConvBranch(weight=w3, bias=b3, bn=norms[1], scale=s3),
               ConvBranch(weight=w13, bias=b13, scale=s13),
               ConvBranch(weight=w31)),
        identity=IdentityBranch(bn=norms[2], scale=s_id), groups=groups, post_bn=norms[3], post_scale=s_post,
    )

    def forward(x: Tensor) -> Tensor:
        y = bn_fwd(F.conv2d(x, w1, groups=groups), norms[0])
        y = y + bn_fwd(F.conv2d(x, w3, b3, padding=1, groups=groups), norms[1]) * per_channel(s3)
        y = y + F.conv2d(x, w13, b13, padding=(0, 1), groups=groups) * per_channel(s13)
        y = y + F.conv2d(x, w31, padding=(1, 0), groups=groups)
        y = y + bn_fwd(x, norms[2]) * per_channel(s_id)
        return bn_fwd(y, norms[3]) * per_channel(s_post)

    return value, forward


def test_fuse_branches_equals_the_train_form_of_a_block_with_every_kind_of_term() -> None:
    value, forward = _full_block()
    fused = fsum.fuse_branches(value)
    assert fused.weight.dtype == F64 and fused.bias.dtype == F64
    assert tuple(fused.weight.shape) == (4, 2, 3, 3)
    assert (fused.stride, fused.padding, fused.dilation, fused.groups, fused.padding_mode) == \
        ((1, 1), (1, 1), (1, 1), 2, "zeros")
    x = randn(2, 4, 5, 6, seed=11)
    close(conv_fwd(x, fused), forward(x))


@pytest.mark.parametrize("rows", [1, 3, 4, 100])
def test_fuse_branches_in_chunks_is_bit_identical_to_whole(rows: int) -> None:
    value, _ = _full_block()
    whole = fsum.fuse_branches(value)
    chunked = fsum.fuse_branches(value, rows_per_chunk=rows)
    assert torch.equal(chunked.weight, whole.weight) and torch.equal(chunked.bias, whole.bias)


def test_fuse_branches_in_float32_is_the_float64_result_rounded_once() -> None:
    value, _ = _full_block()
    whole = fsum.fuse_branches(value)
    single = fsum.fuse_branches(value, dtype=torch.float32, rows_per_chunk=3)
    assert single.weight.dtype == torch.float32 and single.bias.dtype == torch.float32
    assert torch.equal(single.weight, whole.weight.to(torch.float32))
    assert torch.equal(single.bias, whole.bias.to(torch.float32))


def test_fuse_branches_without_a_full_size_branch_in_uneven_chunks() -> None:
    """A 1x3 and a 3x1 (ACNet without its square) and an identity: no branch covers the 3x3."""
    w13, w31, norm = randn(5, 5, 1, 3, seed=1), randn(5, 5, 3, 1, seed=2), rand_bn(5, seed=3)
    value = branches(ConvBranch(weight=w13, bias=randn(5, seed=4)), ConvBranch(weight=w31, bn=norm),
                     identity=IdentityBranch())
    x = randn(1, 5, 4, 4, seed=5)
    expected = (F.conv2d(x, w13, value.convs[0].bias, padding=(0, 1)) + bn_fwd(F.conv2d(x, w31, padding=(1, 0)), norm)
                + x)
    whole = fsum.fuse_branches(value)
    close(conv_fwd(x, whole), expected)
    for rows in (1, 2, 3):
        chunked = fsum.fuse_branches(value, rows_per_chunk=rows)
        assert torch.equal(chunked.weight, whole.weight) and torch.equal(chunked.bias, whole.bias)


def test_fuse_branches_of_an_identity_alone_in_uneven_chunks() -> None:
    norm, factor = rand_bn(3, seed=1), randn(3, seed=2)
    value = Branches(convs=(), identity=IdentityBranch(bn=norm, scale=factor), in_channels=3, groups=3)
    scale, shift = fbn.bn_scale_shift(norm, 3)
    for rows in (None, 2):
        fused = fsum.fuse_branches(value, rows_per_chunk=rows)
        assert tuple(fused.weight.shape) == (3, 1, 1, 1) and fused.groups == 3 and fused.padding == (0, 0)
        assert torch.equal(fused.weight.reshape(-1), scale * factor)
        assert torch.equal(fused.bias, shift * factor)
    dense = fsum.fuse_branches(Branches(convs=(), identity=IdentityBranch(), in_channels=3), rows_per_chunk=2)
    assert torch.equal(dense.weight, torch.eye(3, dtype=F64).reshape(3, 3, 1, 1))
    assert torch.equal(dense.bias, torch.zeros(3, dtype=F64)) and dense.groups == 1


def test_fuse_branches_keeps_negative_zeros_of_a_lone_full_size_branch() -> None:
    """The first full-size branch is the sum's start, read as it is (no 0 + w: -0.0 stays -0.0)."""
    weight = torch.full((2, 1, 3, 3), -0.0, dtype=torch.float32)
    weight[0, 0, 1, 1] = 2.0
    fused = fsum.fuse_branches(branches(ConvBranch(weight=weight), ConvBranch(weight=torch.full((2, 1, 1, 1), -0.0))))
    assert torch.equal(torch.signbit(fused.weight), torch.signbit(weight))
    alone = fsum.fuse_branches(branches(ConvBranch(weight=weight, scale=torch.tensor([1.0, 3.0]))))
    assert torch.equal(torch.signbit(alone.weight), torch.signbit(weight))


def test_fuse_branches_dilated_strided_and_padding_mode_are_the_blocks() -> None:
    w3, w1, norm = randn(4, 4, 3, 3, seed=1), randn(4, 4, 1, 1, seed=2), rand_bn(4, seed=3)
    value = branches(ConvBranch(weight=w1), ConvBranch(weight=w3, dilation=(2, 2), padding=(2, 2), bn=norm),
                     identity=IdentityBranch(), dilation=(2, 2))
    fused = fsum.fuse_branches(value)
    assert (fused.padding, fused.dilation, fused.groups, fused.stride) == ((2, 2), (2, 2), 1, (1, 1))
    x = randn(1, 4, 6, 6, seed=4)
    expected = F.conv2d(x, w1) + bn_fwd(F.conv2d(x, w3, padding=2, dilation=2), norm) + x
    close(conv_fwd(x, fused), expected)
    strided = fsum.fuse_branches(branches(ConvBranch(weight=w3), ConvBranch(weight=w1), stride=(2, 1),
                                          padding_mode="reflect"))
    assert (strided.stride, strided.padding, strided.padding_mode) == ((2, 1), (1, 1), "reflect")
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w3, stride=(2, 1)) + F.conv2d(x, w1, stride=(2, 1))
    got = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), strided.weight, strided.bias, stride=(2, 1))
    close(got, expected)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def source(self, index: int, start: int, stop: int, rows: Tensor) -> None:
        self.calls.append(("source", index, start, stop, rows.clone(), rows.data_ptr()))

    def fused(self, start: int, stop: int, rows: Tensor, scratch: Tensor) -> None:
        assert scratch.dtype == F64 and scratch.shape == rows.shape
        self.calls.append(("fused", start, stop, rows.clone(), scratch.data_ptr()))
        scratch.fill_(float("nan"))  # the observer may overwrite its work space


def test_the_observer_sees_each_source_chunk_exactly_as_stored_then_the_fused_rows() -> None:
    value, _ = _full_block()
    recorder = Recorder()
    fused = fsum.fuse_branches(value, rows_per_chunk=3, observer=recorder)
    assert torch.equal(fused.weight, fsum.fuse_branches(value).weight)
    # the full-size branch (index 1) starts each chunk, then the others in order; then the fused rows
    shape = [(c[0], c[1], c[2], c[3]) if c[0] == "source" else (c[0], c[1], c[2]) for c in recorder.calls]
    assert shape == [("source", 1, 0, 3), ("source", 0, 0, 3), ("source", 2, 0, 3), ("source", 3, 0, 3),
                     ("fused", 0, 3),
                     ("source", 1, 3, 4), ("source", 0, 3, 4), ("source", 2, 3, 4), ("source", 3, 3, 4),
                     ("fused", 3, 4)]
    for call in recorder.calls:
        if call[0] == "source":
            _, index, start, stop, rows, _ = call
            assert rows.dtype == F64
            assert torch.equal(rows, value.convs[index].weight[start:stop])  # before any BN or scale
        else:
            _, start, stop, rows, _ = call
            assert torch.equal(rows, fused.weight[start:stop])
    # the full-size branch is read straight into the sum's buffer (no zero-filled accumulator)
    first_source = recorder.calls[0][5]
    assert recorder.calls[4][4] == first_source


def test_fusion_chunks_by_default_to_fit_the_chunk_bytes() -> None:
    out, per_group = 30, 2048  # a row is 2048 * 9 float64 values: 28 rows to 4 MiB
    value = branches(ConvBranch(weight=torch.ones(out, per_group, 3, 3, dtype=torch.float16)),
                     ConvBranch(weight=torch.ones(out, per_group, 1, 1, dtype=torch.float16)))
    recorder = Recorder()
    fused = fsum.fuse_branches(value, dtype=torch.float16, observer=recorder)
    rows = fsum.chunk_rows(per_group * 9)
    assert rows == 28
    assert [(c[1], c[2]) for c in recorder.calls if c[0] == "fused"] == [(0, 28), (28, 30)]
    assert fused.weight[:, :, 1, 1].eq(2).all() and fused.weight[:, :, 0].eq(1).all()
    tall = branches(ConvBranch(weight=torch.ones(out, 3 * per_group, 3, 1, dtype=torch.float16)))
    recorder = Recorder()
    fsum.fuse_branches(tall, dtype=torch.float16, observer=recorder)
    assert [(c[1], c[2]) for c in recorder.calls if c[0] == "fused"] == [(0, 28), (28, 30)]


def test_fuse_branches_writes_into_the_buffer_given() -> None:
    value, _ = _full_block()
    target = torch.empty(4, 2, 3, 3, dtype=torch.float32)
    fused = fsum.fuse_branches(value, dtype=torch.float32, out=target)
    assert fused.weight is target
    assert torch.equal(target, fsum.fuse_branches(value).weight.to(torch.float32))
    message = ("out= has shape (4, 2, 3, 3) and dtype torch.float32; the fused weight is (4, 2, 3, 3), "
               "torch.float64")
    with raises(ValueError, message):
        fsum.fuse_branches(value, out=target)
    message = ("out= has shape (4, 2, 3, 1) and dtype torch.float64; the fused weight is (4, 2, 3, 3), "
               "torch.float64")
    with raises(ValueError, message):
        fsum.fuse_branches(value, out=torch.empty(4, 2, 3, 1, dtype=F64))


def test_fuse_branches_non_finite_results() -> None:
    nan = randn(2, 2, 3, 3)
    nan[1, 0, 2, 2] = float("nan")
    value = branches(ConvBranch(weight=randn(2, 2, 1, 1)), ConvBranch(weight=nan))
    with raises(InputError, "branch 1 weight holds NaN or Inf"):
        fsum.fuse_branches(value, rows_per_chunk=1)
    big = torch.full((2, 2, 3, 3), 1e300, dtype=F64)
    huge = BatchNorm(running_mean=torch.zeros(2, dtype=F64), running_var=torch.ones(2, dtype=F64), eps=0.0,
                     weight=torch.full((2,), 1e300, dtype=F64))
    overflow = branches(ConvBranch(weight=big, bn=huge))
    with raises(InputError, "the fused weight overflows (NaN or Inf): the branch weights or BN scales are too large"):
        fsum.fuse_branches(overflow)
    unchecked = fsum.fuse_branches(overflow, check_finite=False)
    assert torch.isinf(unchecked.weight).all()
    assert torch.isnan(fsum.fuse_branches(value, check_finite=False).weight[1]).any()


@pytest.mark.parametrize("value, message", [
    (branches(conv_term(4, 2, 3, 3), conv_term(4, 2, 1, 1, bias=torch.ones(3))), "branch 1 bias has shape (3,); expected (4,)"),
    (branches(conv_term(4, 2, 3, 3), conv_term(4, 2, 1, 1, scale=torch.tensor([1.0, 1, 1, float("nan")]))),
     "branch 1 scale holds NaN or Inf"),
    (branches(conv_term(4, 2, 3, 3), conv_term(4, 2, 1, 1, bn=BatchNorm(torch.zeros(4), -torch.ones(4)))),
     "BatchNorm running_var has negative values"),
    (branches(conv_term(4, 2, 3, 3), conv_term(4, 2, 1, 1, bn=BatchNorm(torch.zeros(3), torch.ones(3)))),
     "BatchNorm running_mean has shape (3,); expected (4,)"),
    (branches(conv_term(4, 2, 3, 3), ConvBranch(weight=torch.ones(4, 2, 1, 1, dtype=torch.int64))),
     "branch 1 weight has dtype torch.int64; a floating-point tensor is needed"),
    (branches(conv_term(4, 2, 3, 3), ConvBranch(weight=randn(4, 2, 1, 1, 1))),
     "branch 1 weight has 5 dimensions; a conv weight has 4"),
    (branches(conv_term(4, 2, 3, 3), identity=IdentityBranch(bn=BatchNorm(torch.zeros(4), -torch.ones(4)))),
     "identity BatchNorm running_var has negative values"),
    (branches(conv_term(4, 2, 3, 3), identity=IdentityBranch(scale=torch.ones(3))),
     "identity scale has shape (3,); expected (4,)"),
    (branches(conv_term(4, 2, 3, 3), post_bn=BatchNorm(torch.zeros(4), -torch.ones(4))),
     "post-sum BatchNorm running_var has negative values"),
    (branches(conv_term(4, 2, 3, 3), post_scale=torch.ones(5)), "post-sum scale has shape (5,); expected (4,)"),
])
def test_fuse_branches_input_errors_name_the_part(value: Branches, message: str) -> None:
    with raises(InputError, message):
        fsum.fuse_branches(value)


@pytest.mark.parametrize("value, message", [
    (branches(conv_term(4, 2, 3, 3), conv_term(3, 2, 1, 1)), "branch 1 has 3 output channels; the block has 4"),
    (branches(conv_term(4, 2, 3, 3), identity=IdentityBranch(), in_channels=6),
     "an identity branch needs in == out channels, not 4/6 -> 4"),
    (branches(conv_term(4, 2, 3, 3), identity=IdentityBranch(), groups=1),
     "an identity branch needs in == out channels, not 2/4 -> 4"),
    (branches(conv_term(4, 4, 3, 3), identity=IdentityBranch(bn=rand_bn(3, seed=1))),
     "the identity BatchNorm has 3 channels but the block has 4: an identity branch needs in == out"),
    (branches(conv_term(4, 4, 2, 2), identity=IdentityBranch()),
     "an identity branch cannot be centred in an even 2x2 kernel"),
    (branches(conv_term(4, 4, 3, 2), identity=IdentityBranch(), padding=(1, 1)),
     "an identity branch cannot be centred in an even 3x2 kernel"),
    (branches(conv_term(4, 4, 2, 3), identity=IdentityBranch(), padding=(1, 1)),
     "an identity branch cannot be centred in an even 2x3 kernel"),
])
def test_fuse_branches_refusals(value: Branches, message: str) -> None:
    with raises(UnsupportedError, message):
        fsum.fuse_branches(value)


def test_fuse_branches_identity_with_in_channels_equal_to_out_is_accepted() -> None:
    w = randn(4, 2, 3, 3)
    fused = fsum.fuse_branches(branches(ConvBranch(weight=w), identity=IdentityBranch(), in_channels=4))
    assert fused.groups == 2
    x = randn(1, 4, 3, 3, seed=1)
    close(conv_fwd(x, fused), F.conv2d(x, w, padding=1, groups=2) + x)


# -- maps.py: leaves --------------------------------------------------------------------------


def test_conv_leaf_holds_its_tensors_and_geometry() -> None:
    w, b = randn(4, 2, 3, 5), randn(4, seed=1)
    value = maps.conv(w, b, stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, padding_mode="reflect",
                      in_channels=4, known=True)
    (term,) = value.convs
    assert term.weight is w and term.bias is b and term.bn is None and term.scale is None
    assert (term.padding, term.dilation, term.padding_mode) == ((1, 2), (1, 2), "reflect")
    assert (value.groups, value.stride, value.padding, value.dilation, value.padding_mode, value.in_channels,
            value.geometry_known) == (2, (2, 1), (1, 2), (1, 2), "reflect", 4, True)
    assert value.identity is None and value.post_bn is None and value.post_scale is None
    assert not value.composite and value.ops is None
    plain = maps.conv(w, stride=2, padding=1, dilation=3)
    assert (plain.stride, plain.padding, plain.dilation, plain.convs[0].padding, plain.convs[0].dilation) == \
        ((2, 2), (1, 1), (3, 3), (1, 1), (3, 3))
    default = maps.conv(w)
    assert (default.stride, default.padding, default.dilation, default.groups, default.padding_mode,
            default.in_channels, default.geometry_known) == ((1, 1), None, (1, 1), None, "zeros", None, False)
    assert default.convs[0].padding is None and default.convs[0].bias is None
    assert default.convs[0].padding_mode == "zeros"


def test_conv_leaf_refuses_what_is_not_a_4d_tensor() -> None:
    with raises(InputError, "a conv weight must be a 4-D tensor, not a list"):
        maps.conv([1.0])
    with raises(InputError, "a conv weight must be a 4-D tensor, not a tensor of shape (2, 3, 3)"):
        maps.conv(randn(2, 3, 3))


def test_linear_leaf_is_a_1x1_conv() -> None:
    w, b = randn(3, 5), randn(3, seed=1)
    value = maps.linear(w, b)
    (term,) = value.convs
    assert tuple(term.weight.shape) == (3, 5, 1, 1) and torch.equal(term.weight[:, :, 0, 0], w)
    assert term.bias is b and term.padding == (0, 0)
    assert (value.padding, value.groups, value.in_channels, value.stride) == ((0, 0), 1, 5, (1, 1))
    x = randn(2, 5, seed=2)
    fused = maps.evaluate(value)
    close(conv_fwd(x.reshape(2, 5, 1, 1), fused).reshape(2, 3), F.linear(x, w, b))
    with raises(InputError, "a linear weight must be a 2-D tensor, not a tensor of shape (3, 5, 1, 1)"):
        maps.linear(randn(3, 5, 1, 1))
    with raises(InputError, "a linear weight must be a 2-D tensor, not a str"):
        maps.linear("w")


def test_bn_scale_shift_and_identity_leaves() -> None:
    norm = rand_bn(3, seed=1)
    value = maps.bn(norm)
    assert value.convs == () and value.identity.bn is norm and value.identity.scale is None
    assert value.in_channels == 3
    factor = randn(1, 3, 1, 1, seed=2).requires_grad_()
    value = maps.scale(factor)
    assert value.identity.bn is None and value.in_channels == 3
    assert tuple(value.identity.scale.shape) == (3,) and not value.identity.scale.requires_grad
    assert torch.equal(value.identity.scale, factor.detach().reshape(-1))
    with raises(InputError, "a scale must be a floating-point tensor, not a tensor of shape (3,)"):
        maps.scale(torch.ones(3, dtype=torch.int64))
    with raises(InputError, "a scale must be a floating-point tensor, not a float"):
        maps.scale(1.5)
    offset = randn(1, 3, 1, 1, seed=3, dtype=torch.float32)
    value = maps.shift(offset)
    shift_bn = value.identity.bn
    assert shift_bn.eps == 0.0 and shift_bn.weight is None and shift_bn.bias is None
    assert shift_bn.running_mean.dtype == F64 and torch.equal(shift_bn.running_mean, -offset.reshape(-1).to(F64))
    assert torch.equal(shift_bn.running_var, torch.ones(3, dtype=F64))
    assert value.in_channels == 3 and value.identity.scale is None
    x = randn(1, 3, 2, 2, seed=4)
    close(conv_fwd(x, maps._materialize(value)), x + offset.to(F64))
    with raises(InputError, "a shift must be a floating-point tensor, not a tensor of shape (2,)"):
        maps.shift(torch.ones(2, dtype=torch.int32))
    with raises(InputError, "a shift must be a floating-point tensor, not a list"):
        maps.shift([1.0])
    ident = maps.identity()
    assert ident.convs == () and ident.identity == IdentityBranch() and ident.in_channels is None
    assert maps.identity(5).in_channels == 5


def test_avg_pool_leaf_is_a_depthwise_conv_of_equal_taps() -> None:
    value = maps.avg_pool(3, 3)
    (term,) = value.convs
    assert term.weight.dtype == F64 and torch.equal(term.weight, torch.full((3, 1, 3, 3), 1 / 9, dtype=F64))
    assert (value.stride, value.padding, value.groups, value.in_channels) == ((3, 3), (0, 0), 3, 3)
    value = maps.avg_pool(2, (2, 3), stride=1, padding=(1, 0), dtype=torch.float32)
    (term,) = value.convs
    assert term.weight.dtype == torch.float32
    assert torch.equal(term.weight, torch.full((2, 1, 2, 3), 1 / 6, dtype=torch.float32))
    assert (value.stride, value.padding, value.groups, value.in_channels) == ((1, 1), (1, 0), 2, 2)
    x = randn(1, 2, 5, 5)
    exact = maps.evaluate(maps.avg_pool(2, (2, 3), stride=1, padding=(1, 0)))
    close(conv_fwd(x, exact), F.avg_pool2d(x, (2, 3), 1, (1, 0), count_include_pad=True))


def test_small_helpers() -> None:
    assert maps._pair(3) == (3, 3)
    assert maps._pair((2, 5)) == (2, 5)
    assert maps._pair([torch.tensor(2), 4]) == (2, 4) and type(maps._pair([torch.tensor(2), 4])[0]) is int
    assert maps._pair(None) is None and maps._pair(None, (7, 8)) == (7, 8)
    a, b = torch.tensor([2.0], dtype=torch.float32), torch.tensor([3.0], dtype=torch.float32)
    assert maps._times(None, b) is b and maps._times(a, None) is a and maps._times(None, None) is None
    product = maps._times(a, b)
    assert product.dtype == F64 and product.tolist() == [6.0]
    term = ConvBranch(weight=randn(1, 1, 1, 1), scale=a)
    assert maps._scaled_term(term, b).scale.tolist() == [6.0] and maps._scaled_term(term, b).weight is term.weight
    assert maps._describe(randn(2, 3)) == "a tensor of shape (2, 3)"
    assert maps._describe(None) == "a NoneType"


def test_is_affine_and_single_term() -> None:
    ident, conv = maps.identity(2), maps.conv(randn(2, 2, 1, 1))
    assert maps._is_affine(ident) and maps._is_affine(maps.bn(rand_bn(2, seed=1)))
    assert not maps._is_affine(conv)
    assert not maps._is_affine(Branches(convs=()))
    assert not maps._is_affine(replace_(ident, post_bn=rand_bn(2, seed=1)))
    assert not maps._is_affine(replace_(ident, post_scale=torch.ones(2)))
    assert maps._single_term(ident) and maps._single_term(conv)
    assert not maps._single_term(replace_(conv, identity=IdentityBranch()))
    assert not maps._single_term(replace_(conv, post_bn=rand_bn(2, seed=1)))
    assert not maps._single_term(replace_(conv, post_scale=torch.ones(2)))
    assert not maps._single_term(Branches(convs=()))


def replace_(value, **fields):
    from dataclasses import replace

    return replace(value, **fields)


# -- maps.py: then ----------------------------------------------------------------------------


def test_then_needs_a_map_and_one_map_is_itself() -> None:
    with raises(ValueError, "then() needs at least one map"):
        maps.then()
    conv = maps.conv(randn(2, 2, 3, 3))
    assert maps.then(conv) is conv
    assert maps.then(maps.identity(), conv) is conv
    assert maps.then(maps.identity(2), maps.identity(), conv) is conv


def test_per_channel_maps_after_a_conv_fold_into_its_row() -> None:
    w = randn(3, 2, 3, 3)
    conv = maps.conv(w, known=True, stride=2)
    norm, factor, factor2 = rand_bn(3, seed=1), maps.scale(randn(3, seed=2)), maps.scale(randn(3, seed=3))
    value = maps.then(conv, maps.bn(norm))
    (term,) = value.convs
    assert term.bn is norm and term.scale is None and term.weight is w
    assert value.post_bn is None and value.post_scale is None and value.ops is None and not value.composite
    assert value.geometry_known and value.stride == (2, 2)
    value = maps.then(conv, maps.bn(norm), factor)
    assert value.convs[0].bn is norm and value.convs[0].scale is factor.identity.scale
    value = maps.then(conv, factor, factor2)
    assert value.convs[0].bn is None
    assert torch.equal(value.convs[0].scale, factor.identity.scale * factor2.identity.scale)
    ident = maps.then(maps.identity(3), maps.bn(norm), factor)
    assert ident.convs == () and ident.identity.bn is norm and ident.identity.scale is factor.identity.scale
    assert ident.in_channels == 3


def test_a_second_bn_after_a_conv_goes_after_it_in_order() -> None:
    w, b = randn(3, 2, 3, 3), randn(3, seed=1)
    bn1, bn2, s = rand_bn(3, seed=2), rand_bn(3, seed=3), randn(3, seed=4)
    x = randn(1, 2, 5, 5, seed=5)
    y = F.conv2d(x, w, b, padding=1)
    cases = [
        ((maps.bn(bn1), maps.bn(bn2)), bn_fwd(bn_fwd(y, bn1), bn2)),
        ((maps.scale(s), maps.bn(bn2)), bn_fwd(y * per_channel(s), bn2)),
        ((maps.bn(bn1), maps.scale(s), maps.bn(bn2)), bn_fwd(bn_fwd(y, bn1) * per_channel(s), bn2)),
    ]
    for after, expected in cases:
        value = maps.then(maps.conv(w, b), *after)
        assert value.post_bn is bn2 and value.post_scale is None
        close(conv_fwd(x, maps.evaluate(value)), expected)


def test_per_channel_maps_after_a_sum() -> None:
    w3, w1 = randn(3, 3, 3, 3), randn(3, 3, 1, 1, seed=1)
    s, s2, norm, norm2 = randn(3, seed=2), randn(3, seed=3), rand_bn(3, seed=4), rand_bn(3, seed=5)
    total = maps.plus(maps.conv(w3), maps.conv(w1), maps.identity())
    scaled = maps.then(total, maps.scale(s))
    assert all(torch.equal(c.scale, s) for c in scaled.convs)
    assert torch.equal(scaled.identity.scale, s)
    assert scaled.post_scale is None and scaled.post_bn is None
    normed = maps.then(total, maps.bn(norm), maps.scale(s2))
    assert normed.post_bn is norm and torch.equal(normed.post_scale, s2)
    assert all(c.scale is None and c.bn is None for c in normed.convs)
    x = randn(1, 3, 4, 4, seed=6)
    y = F.conv2d(x, w3, padding=1) + F.conv2d(x, w1) + x
    close(conv_fwd(x, maps.evaluate(scaled)), y * per_channel(s))
    close(conv_fwd(x, maps.evaluate(normed)), bn_fwd(y, norm) * per_channel(s2))
    twice = maps.then(normed, maps.scale(s))
    assert twice.post_bn is norm and torch.equal(twice.post_scale, s2 * s)
    close(conv_fwd(x, maps.evaluate(twice)), bn_fwd(y, norm) * per_channel(s2 * s))
    again = maps.then(normed, maps.bn(norm2))
    (term,) = again.convs
    assert term.bn is norm2 and again.post_bn is None and again.identity is None
    assert again.composite and not again.geometry_known
    assert isinstance(again.ops, ThenOp) and isinstance(again.ops.first, ThenOp)
    assert isinstance(again.ops.first.first, PlusOp) and again.ops.second.bn is norm2
    assert again.ops.first.second.bn is norm and again.ops.first.second.scale is normed.post_scale
    close(conv_fwd(x, maps.evaluate(again)), bn_fwd(bn_fwd(y, norm) * per_channel(s2), norm2))
    known = maps.then(maps.plus(maps.conv(w3, known=True), maps.conv(w1, known=True)), maps.bn(norm),
                      maps.bn(norm2))
    assert known.geometry_known


def test_per_channel_maps_after_a_composite_keep_the_expression() -> None:
    w1, w3, w3b = randn(3, 2, 1, 1), randn(4, 3, 3, 3, seed=1), randn(4, 2, 3, 3, seed=2)
    chain = maps.then(maps.conv(w1), maps.conv(w3, padding=1))
    total = maps.plus(chain, maps.conv(w3b))
    assert total.composite and isinstance(total.ops, PlusOp)
    norm, s = rand_bn(4, seed=3), maps.scale(randn(4, seed=4))
    normed = maps.then(total, maps.bn(norm))
    assert normed.post_bn is norm
    assert normed.ops.first is total.ops and normed.ops.second.bn is norm and normed.ops.second.scale is None
    scaled = maps.then(normed, s)
    assert scaled.post_scale is s.identity.scale
    assert scaled.ops.first is normed.ops and scaled.ops.second.bn is None
    assert scaled.ops.second.scale is s.identity.scale
    spread_out = maps.then(total, s)
    assert spread_out.ops.first is total.ops and spread_out.ops.second.scale is s.identity.scale
    single = maps.then(chain, maps.bn(norm))
    assert single.convs[0].bn is norm and single.ops.first is chain.ops and single.ops.second.bn is norm


def test_conv_then_conv_through_then() -> None:
    w1, b1, w3, b3 = randn(3, 2, 1, 1), randn(3, seed=1), randn(4, 3, 3, 3, seed=2), randn(4, seed=3)
    x = randn(1, 2, 5, 5, seed=4)
    first, second = maps.conv(w1, b1, padding=0, known=True), maps.conv(w3, b3, padding=1, known=True)
    message = ("a conv that pads its input after another map is one conv only when that map gives 0 for a zero "
               "input (a 1x1 conv without bias), or when the block pads its input first")
    with raises(UnsupportedError, message):
        maps.then(first, second)
    value = maps.then(first, second, pad_first=True)
    assert value.composite and value.geometry_known and value.padding == (1, 1)
    assert isinstance(value.ops, ThenOp) and value.ops.pad_first is True
    assert value.ops.first.weight is w1 and value.ops.second.weight is w3
    expected = F.conv2d(F.conv2d(F.pad(x, (1, 1, 1, 1)), w1, b1), w3, b3)
    close(conv_fwd(x, maps.evaluate(value)), expected)
    unbiased = maps.then(maps.conv(w1, padding=0), second)
    assert not unbiased.geometry_known and unbiased.ops.pad_first is False
    close(conv_fwd(x, maps.evaluate(unbiased)), F.conv2d(F.conv2d(x, w1), w3, b3, padding=1))
    assert not maps.then(first, maps.conv(w3, b3, padding=1), pad_first=True).geometry_known


def test_affine_then_conv_through_then() -> None:
    norm, w3, b3 = rand_bn(3, seed=1), randn(4, 3, 3, 3, seed=2), randn(4, seed=3)
    x = randn(1, 3, 5, 5, seed=4)
    message = ("a BatchNorm with a shift before a padded conv is not one conv: the padded border sees 0, not the "
               "BN's output for 0 (the block must pad its input first)")
    with raises(UnsupportedError, message):
        maps.then(maps.bn(norm), maps.conv(w3, b3, padding=1))
    value = maps.then(maps.bn(norm), maps.conv(w3, b3, padding=1, known=True), pad_first=True)
    assert value.composite and value.padding == (1, 1) and value.ops.pad_first is True
    assert isinstance(value.ops.first, ThenOp) and value.ops.first.second.bn is norm
    expected = F.conv2d(bn_fwd(F.pad(x, (1, 1, 1, 1)), norm), w3, b3)
    close(conv_fwd(x, maps.evaluate(value)), expected)
    s = randn(3, seed=5)
    scaled = maps.then(maps.scale(s), maps.conv(w3, b3, padding=1))
    close(conv_fwd(x, maps.evaluate(scaled)), F.conv2d(x * per_channel(s), w3, b3, padding=1))


def test_pad() -> None:
    w = randn(3, 2, 3, 3)
    value = maps.pad(maps.conv(w, padding=0, known=True), (1, 2))
    assert value.padding == (1, 2) and value.convs[0].padding == (1, 2) and value.composite
    assert value.geometry_known
    assert isinstance(value.ops, PadOp) and value.ops.padding == (1, 2) and value.ops.inner.weight is w
    x = randn(1, 2, 4, 4, seed=1)
    close(conv_fwd(x, maps.evaluate(value)), F.conv2d(x, w, padding=(1, 2)))
    again = maps.pad(value, 1)
    assert again.padding == (2, 3) and again.ops.padding == (1, 1) and again.ops.inner is value.ops
    assert not maps.pad(maps.conv(w, padding=0), 1).geometry_known
    with raises(UnsupportedError, "a per-channel map of unknown width cannot be written as a conv"):
        maps.pad(maps.identity(), 1)


# -- maps.py: plus ----------------------------------------------------------------------------


def test_plus_needs_a_map_and_one_map_is_itself() -> None:
    with raises(ValueError, "plus() needs at least one map"):
        maps.plus()
    conv = maps.conv(randn(2, 2, 3, 3))
    assert maps.plus(conv) is conv


def test_plus_keeps_the_terms_and_takes_the_largest_kernels_geometry() -> None:
    w1, w3, w5 = randn(4, 2, 1, 1), randn(4, 2, 3, 3, seed=1), randn(4, 2, 1, 5, seed=2)
    value = maps.plus(maps.conv(w1, padding=0, in_channels=None, known=True),
                      maps.conv(w3, padding=(1, 2), padding_mode="reflect", in_channels=4, known=True),
                      maps.conv(w5, padding=(0, 2), in_channels=6, known=True))
    assert [c.weight for c in value.convs] == [w1, w3, w5]
    assert (value.padding, value.padding_mode, value.dilation, value.stride, value.in_channels) == \
        ((1, 2), "reflect", (1, 1), (1, 1), 4)
    assert value.identity is None and value.groups is None and value.geometry_known
    assert not value.composite and value.ops is None
    assert not maps.plus(maps.conv(w3, known=True), maps.conv(w1)).geometry_known
    with_identity = maps.plus(maps.conv(w3, known=True), maps.identity(4))
    assert with_identity.geometry_known and with_identity.identity == IdentityBranch()
    assert not maps.plus(maps.identity(4), Branches(convs=(), in_channels=4)).geometry_known


def test_plus_refuses_different_strides() -> None:
    with raises(UnsupportedError, "summed branches have different strides: [(1, 1), (2, 2)]"):
        maps.plus(maps.conv(randn(2, 2, 3, 3), stride=2), maps.conv(randn(2, 2, 1, 1)))


def test_plus_regroups_finer_terms_to_the_common_groups() -> None:
    wd, w2, w3 = randn(12, 1, 3, 3), randn(12, 3, 3, 3, seed=1), randn(12, 2, 1, 1, seed=2)
    value = maps.plus(maps.conv(wd, groups=12), maps.conv(w2, groups=4), maps.conv(w3, groups=6))
    assert value.groups == 2
    assert [tuple(c.weight.shape) for c in value.convs] == [(12, 6, 3, 3), (12, 6, 3, 3), (12, 6, 1, 1)]
    x = randn(1, 12, 4, 4, seed=3)
    expected = F.conv2d(x, wd, padding=1, groups=12) + F.conv2d(x, w2, padding=1, groups=4) + F.conv2d(x, w3, groups=6)
    close(conv_fwd(x, maps.evaluate(value)), expected)
    same = maps.plus(maps.conv(w2, groups=4), maps.conv(randn(12, 3, 1, 1), groups=None))
    assert same.groups == 4 and tuple(same.convs[1].weight.shape) == (12, 3, 1, 1)


def test_plus_keeps_the_plainest_identity_and_turns_the_others_into_1x1_terms() -> None:
    w = randn(4, 2, 3, 3)
    bn1, bn2, s = rand_bn(4, seed=1), rand_bn(4, seed=2), randn(4, seed=3)
    full = maps.then(maps.identity(), maps.bn(bn1), maps.scale(s))
    half = maps.then(maps.identity(), maps.bn(bn2))
    plain = maps.identity()
    value = maps.plus(full, maps.conv(w, groups=2), half, plain)
    assert value.identity is plain.identity
    assert [c.weight is w for c in value.convs] == [True, False, False]
    for term, norm, factor in zip(value.convs[1:], (bn1, bn2), (s, None)):
        assert torch.equal(term.weight, kernels.identity_kernel(4, 2, (1, 1)))
        assert term.bn is norm
        assert (term.scale is None) if factor is None else torch.equal(term.scale, factor)
    x = randn(1, 4, 3, 3, seed=4)
    expected = bn_fwd(x, bn1) * per_channel(s) + F.conv2d(x, w, padding=1, groups=2) + bn_fwd(x, bn2) + x
    close(conv_fwd(x, maps.evaluate(value)), expected)
    two = maps.plus(full, maps.conv(w, groups=2), half)
    assert two.identity is half.identity and two.convs[1].bn is bn1
    with raises(UnsupportedError, "a sum of identity branches with no conv: its groups are unknown"):
        maps.plus(maps.identity(4), half)


def test_plus_materializes_a_term_with_a_factor_after_its_sum() -> None:
    w3, w1, w3b, norm = randn(3, 3, 3, 3), randn(3, 3, 1, 1, seed=1), randn(3, 3, 3, 3, seed=2), rand_bn(3, seed=3)
    inner = maps.then(maps.plus(maps.conv(w3), maps.conv(w1)), maps.bn(norm))
    value = maps.plus(inner, maps.conv(w3b))
    assert len(value.convs) == 2 and value.convs[1].weight is w3b and value.post_bn is None
    assert value.composite and isinstance(value.ops, PlusOp) and len(value.ops.terms) == 2
    assert inner.ops is None and isinstance(value.ops.terms[0], ThenOp)  # the sum, then its BN
    assert isinstance(value.ops.terms[0].first, PlusOp) and value.ops.terms[0].second.bn is norm
    assert isinstance(value.ops.terms[1], ConvOp) and value.ops.terms[1].weight is w3b
    x = randn(1, 3, 4, 4, seed=4)
    expected = bn_fwd(F.conv2d(x, w3, padding=1) + F.conv2d(x, w1), norm) + F.conv2d(x, w3b, padding=1)
    close(conv_fwd(x, maps.evaluate(value)), expected)


def test_plus_spreads_different_dilations_into_dense_kernels() -> None:
    w5, w3 = randn(2, 2, 5, 5), randn(2, 2, 3, 3, seed=1)
    dilated = maps.conv(w3, padding=2, dilation=2)
    value = maps.plus(maps.conv(w5, padding=2), dilated)
    assert value.composite and isinstance(value.ops, PlusOp)
    assert value.ops.terms[1].dilation == (2, 2) and value.ops.terms[1].weight is w3
    assert [c.dilation for c in value.convs] == [(1, 1), (1, 1)] and value.dilation == (1, 1)
    assert tuple(value.convs[1].weight.shape) == (2, 2, 5, 5)
    x = randn(1, 2, 6, 6, seed=2)
    expected = F.conv2d(x, w5, padding=2) + F.conv2d(x, w3, padding=2, dilation=2)
    close(conv_fwd(x, maps.evaluate(value)), expected)
    same = maps.plus(dilated, maps.conv(randn(2, 2, 1, 1), padding=0), maps.identity())
    assert not same.composite and same.dilation == (2, 2) and same.convs[0].weight is w3
    undilated = maps._undilated(maps.plus(dilated, maps.conv(randn(2, 2, 1, 1), padding=0)))
    assert undilated.dilation == (1, 1) and undilated.composite
    assert isinstance(undilated.ops, PlusOp) and undilated.ops.terms[0].dilation == (2, 2)
    assert tuple(undilated.convs[0].weight.shape) == (2, 2, 5, 5) and undilated.convs[1].weight.shape[2:] == (1, 1)


# -- maps.py: evaluation ------------------------------------------------------------------------


def test_materialize_writes_a_per_channel_map_as_a_depthwise_conv() -> None:
    factor, norm = randn(3), rand_bn(3, seed=1)
    fused = maps._materialize(maps.scale(factor))
    assert (fused.groups, fused.padding, tuple(fused.weight.shape)) == (3, (0, 0), (3, 1, 1, 1))
    assert torch.equal(fused.weight.reshape(-1), factor) and torch.equal(fused.bias, torch.zeros(3, dtype=F64))
    fused = maps._materialize(maps.then(maps.identity(3), maps.bn(norm)))
    scale, shift = fbn.bn_scale_shift(norm, 3)
    assert fused.groups == 3 and torch.equal(fused.weight.reshape(-1), scale) and torch.equal(fused.bias, shift)
    fused = maps._materialize(Branches(convs=(), identity=IdentityBranch(scale=factor), in_channels=3, groups=1,
                                       padding=(1, 1)))
    assert (fused.groups, fused.padding, tuple(fused.weight.shape)) == (3, (0, 0), (3, 1, 1, 1))
    with raises(UnsupportedError, "a per-channel map of unknown width cannot be written as a conv"):
        maps._materialize(Branches(convs=(), identity=IdentityBranch(scale=factor)))


def test_as_map_turns_a_conv_into_a_one_term_composite() -> None:
    fused = FusedConv(weight=randn(4, 2, 3, 3), bias=randn(4, seed=1), stride=(2, 1), padding=(1, 0),
                      dilation=(1, 2), groups=2, padding_mode="reflect")
    value = maps._as_map(fused, "the op")
    (term,) = value.convs
    assert term.weight is fused.weight and term.bias is fused.bias
    assert (term.padding, term.dilation, term.padding_mode, term.bn, term.scale) == ((1, 0), (1, 2), "reflect",
                                                                                      None, None)
    assert (value.groups, value.stride, value.padding, value.dilation, value.padding_mode, value.in_channels) == \
        (2, (2, 1), (1, 0), (1, 2), "reflect", 4)
    assert value.geometry_known and value.composite and value.ops == "the op"
    assert value.identity is None and value.post_bn is None
    assert maps._as_map(fused, None, maps.identity()).geometry_known
    assert not maps._as_map(fused, None, maps.conv(randn(1, 1, 1, 1), known=True),
                            maps.conv(randn(1, 1, 1, 1))).geometry_known


def test_evaluate_rounds_into_the_dtype_asked() -> None:
    value = maps.conv(randn(2, 2, 3, 3), randn(2, seed=1))
    fused = maps.evaluate(value, torch.float32)
    assert fused.weight.dtype == torch.float32 and fused.bias.dtype == torch.float32
    assert torch.equal(fused.weight, value.convs[0].weight.to(torch.float32))
    assert maps.evaluate(value).weight.dtype == F64


# -- expression.py ----------------------------------------------------------------------------


def test_ops_of_spells_out_every_term() -> None:
    w0, w1, w2, b0 = randn(3, 1, 3, 3), randn(3, 1, 1, 1, seed=1), randn(3, 1, 1, 3, seed=2), randn(3, seed=3)
    norm, norm_id, post, s, s_id, s_post = (rand_bn(3, seed=4), rand_bn(3, seed=5), rand_bn(3, seed=6),
                                            randn(3, seed=7), randn(3, seed=8), randn(3, seed=9))
    value = Branches(
        convs=(ConvBranch(weight=w0, bias=b0, padding=(2, 2), dilation=(2, 2)),
               ConvBranch(weight=w1, bn=norm, padding=(0, 0), padding_mode="reflect"),
               ConvBranch(weight=w2, scale=s)),
        identity=IdentityBranch(bn=norm_id, scale=s_id), groups=3, stride=(2, 1), padding_mode="circular",
        post_bn=post, post_scale=s_post,
    )
    total = ops_of(value)
    assert isinstance(total, ThenOp) and total.pad_first is False
    assert total.second.bn is post and total.second.scale is s_post
    c0, c1, c2, ident = total.first.terms
    assert isinstance(c0, ConvOp)
    assert (c0.weight, c0.bias, c0.stride, c0.padding, c0.dilation, c0.groups, c0.padding_mode) == \
        (w0, b0, (2, 1), (2, 2), (2, 2), 3, "circular")
    assert isinstance(c1, ThenOp) and c1.second.bn is norm and c1.second.scale is None
    assert (c1.first.weight, c1.first.bias, c1.first.padding, c1.first.dilation, c1.first.padding_mode) == \
        (w1, None, (0, 0), (1, 1), "reflect")
    assert isinstance(c2, ThenOp) and c2.second.bn is None and c2.second.scale is s and c2.first.padding is None
    assert isinstance(ident, ThenOp) and isinstance(ident.first, IdentityOp)
    assert ident.second.bn is norm_id and ident.second.scale is s_id


def test_ops_of_single_terms_and_values_that_keep_their_ops() -> None:
    w = randn(2, 2, 1, 1)
    op = ops_of(maps.conv(w))
    assert isinstance(op, ConvOp) and op.weight is w and op.groups is None and op.padding_mode == "zeros"
    assert isinstance(ops_of(maps.identity()), IdentityOp)
    scaled = ops_of(Branches(convs=(), identity=IdentityBranch(scale=torch.ones(2))))
    assert isinstance(scaled, ThenOp) and scaled.second.bn is None and isinstance(scaled.first, IdentityOp)
    only_post = ops_of(Branches(convs=(ConvBranch(weight=w),), post_scale=torch.ones(2)))
    assert isinstance(only_post, ThenOp) and only_post.second.bn is None and torch.equal(only_post.second.scale,
                                                                                          torch.ones(2))
    assert isinstance(only_post.first, ConvOp)
    kept = Branches(convs=(ConvBranch(weight=w),), ops="kept")
    assert ops_of(kept) == "kept"
    pair = ops_of(Branches(convs=(ConvBranch(weight=w), ConvBranch(weight=w))))
    assert isinstance(pair, PlusOp) and len(pair.terms) == 2
    assert AffineOp(None, None) == AffineOp(None, None)


# -- compose.py -------------------------------------------------------------------------------


def test_affine_then_conv_by_groups() -> None:
    norm, factor = rand_bn(4, seed=1), randn(4, seed=2)
    second = FusedConv(weight=randn(6, 2, 3, 3, seed=3), bias=randn(6, seed=4), padding=(0, 0), groups=2,
                       stride=(2, 1), dilation=(1, 2))
    x = randn(1, 4, 7, 7, seed=5)
    composed = compose.affine_then_conv(IdentityBranch(bn=norm, scale=factor), second, False)
    assert (composed.groups, composed.padding, composed.stride, composed.dilation) == (2, (0, 0), (2, 1), (1, 2))
    close(conv_fwd(x, composed), conv_fwd(bn_fwd(x, norm) * per_channel(factor), second))
    only_bn = compose.affine_then_conv(IdentityBranch(bn=norm), second, False)
    close(conv_fwd(x, only_bn), conv_fwd(bn_fwd(x, norm), second))
    assert torch.equal(second.weight, randn(6, 2, 3, 3, seed=3))  # the conv's own weight is not changed


def test_affine_then_conv_with_padding() -> None:
    norm = rand_bn(4, seed=1)
    padded = FusedConv(weight=randn(6, 4, 3, 3, seed=3), bias=randn(6, seed=4), padding=(0, 1))
    message = ("a BatchNorm with a shift before a padded conv is not one conv: the padded border sees 0, not the "
               "BN's output for 0 (the block must pad its input first)")
    with raises(UnsupportedError, message):
        compose.affine_then_conv(IdentityBranch(bn=norm), padded, False)
    x = randn(1, 4, 5, 5, seed=5)
    first = compose.affine_then_conv(IdentityBranch(bn=norm), padded, True)
    assert first.padding == (0, 1)
    close(conv_fwd(x, first), F.conv2d(bn_fwd(F.pad(x, (1, 1, 0, 0)), norm), padded.weight, padded.bias))
    factor = randn(4, seed=6)
    scaled = compose.affine_then_conv(IdentityBranch(scale=factor), padded, False)
    close(conv_fwd(x, scaled), conv_fwd(x * per_channel(factor), padded))
    centred = BatchNorm(running_mean=torch.zeros(4, dtype=F64), running_var=randn(4, seed=7).abs() + 0.1)
    no_shift = compose.affine_then_conv(IdentityBranch(bn=centred), padded, False)
    close(conv_fwd(x, no_shift), conv_fwd(bn_fwd(x, centred), padded))


def test_affine_then_conv_refusals() -> None:
    second = FusedConv(weight=randn(6, 4, 1, 1), bias=randn(6, seed=1), padding=(0, 0))
    with raises(InputError, "BatchNorm before a conv running_mean has shape (3,); expected (4,)"):
        compose.affine_then_conv(IdentityBranch(bn=rand_bn(3, seed=1)), second, False)
    with raises(UnsupportedError, "scale before a conv has 3 channels; 4 are expected"):
        compose.affine_then_conv(IdentityBranch(scale=torch.ones(3)), second, False)
    flat = compose._vector(torch.ones(2, 2, dtype=torch.float32), 4, "v")
    assert flat.dtype == F64 and tuple(flat.shape) == (4,)
    with raises(UnsupportedError, "v has 5 channels; 4 are expected"):
        compose._vector(torch.ones(5), 4, "v")


def test_dense_and_grouped() -> None:
    grouped = FusedConv(weight=randn(4, 1, 3, 3), bias=torch.zeros(4), groups=2)  # 2 out per group, 1 in
    dense = compose._dense(grouped)
    expected = torch.zeros(4, 2, 3, 3, dtype=F64)
    expected[0:2, 0:1] = grouped.weight[0:2]
    expected[2:4, 1:2] = grouped.weight[2:4]
    assert torch.equal(dense, expected)
    single = FusedConv(weight=randn(4, 2, 1, 1), bias=torch.zeros(4))
    assert compose._dense(single) is single.weight
    # block diagonal with 2 blocks of 2x3: 2 groups, not 4 (nor 3, which does not divide 4 outputs)
    blocks = torch.zeros(4, 6, 1, 1, dtype=F64)
    blocks[0:2, 0:3] = 1.0
    blocks[2:4, 3:6] = 2.0
    weight, groups = compose._grouped(blocks, (1, 2, 3, 4))
    assert groups == 2 and torch.equal(weight, torch.cat([blocks[0:2, 0:3], blocks[2:4, 3:6]]))
    lower = blocks.clone()
    lower[2, 0] = 5.0  # below the diagonal
    weight, groups = compose._grouped(lower, (2,))
    assert groups == 1 and weight is lower
    upper = blocks.clone()
    upper[1, 5] = 5.0  # above the diagonal
    assert compose._grouped(upper, (2, 1))[1] == 1
    zeros = torch.zeros(4, 4, 1, 1, dtype=F64)
    weight, groups = compose._grouped(zeros, (1, 2, 4))
    assert groups == 4 and tuple(weight.shape) == (4, 1, 1, 1)
    assert compose._grouped(zeros, (1,))[1] == 1 and compose._grouped(zeros, (0, -2, 3))[1] == 1


def test_is_pointwise() -> None:
    def fc(kh, kw, stride=(1, 1), padding=(0, 0)):
        return FusedConv(weight=randn(1, 1, kh, kw), bias=torch.zeros(1), stride=stride, padding=padding)

    assert compose._is_pointwise(fc(1, 1))
    assert not compose._is_pointwise(fc(1, 3))
    assert not compose._is_pointwise(fc(3, 1))
    assert not compose._is_pointwise(fc(1, 1, stride=(1, 2)))
    assert not compose._is_pointwise(fc(1, 1, padding=(0, 1)))


def _fc(weight: Tensor, bias: Tensor, **geometry) -> FusedConv:
    return FusedConv(weight=weight.to(F64), bias=bias.to(F64), **{"padding": (0, 0), **geometry})


def test_conv_then_conv_values_for_every_kernel_kind() -> None:
    x = randn(1, 4, 8, 8, seed=9)
    w1, b1 = randn(4, 2, 1, 1, seed=1), randn(4, seed=2)
    w3, b3 = randn(6, 2, 3, 3, seed=3), randn(6, seed=4)
    w3b, b3b = randn(4, 2, 3, 3, seed=5), randn(4, seed=6)
    cases = [
        (_fc(w1, b1, groups=2), _fc(w3, b3, groups=2), False),            # 1x1 then kxk, same groups
        (_fc(w3b, b3b, groups=2), _fc(w3, b3, groups=2), True),           # kxk then kxk
        (_fc(w3b, b3b, groups=2, stride=(2, 1), padding=(1, 0)), _fc(randn(6, 2, 1, 1), b3, groups=2), False),
        (_fc(randn(4, 4, 3, 3, seed=7), b3b), _fc(w3, b3, groups=2), True),  # dense then grouped
        (_fc(w3b, b3b, groups=2), _fc(randn(6, 4, 3, 3, seed=8), b3), True),  # grouped then dense
    ]
    for first, second, pad_first in cases:
        composed = compose.conv_then_conv(first, second, pad_first)
        if compose._is_pointwise(second):
            expected = conv_fwd(conv_fwd(x, first), second)
            assert (composed.stride, composed.padding, composed.dilation) == \
                (first.stride, first.padding, first.dilation)
        else:
            expected = conv_fwd(conv_fwd(x, first), second)
            assert composed.padding == (first.padding[0] + second.padding[0], first.padding[1] + second.padding[1])
            assert composed.stride == second.stride
        close(conv_fwd(x, composed), expected)


def test_conv_then_conv_padding_sums_and_groups_found() -> None:
    x = randn(1, 4, 6, 6, seed=1)
    depthwise = _fc(randn(4, 1, 3, 3, seed=2), randn(4, seed=3), groups=4, padding=(1, 1))
    pairwise = _fc(randn(4, 2, 1, 1, seed=4), randn(4, seed=5), groups=2)
    composed = compose.conv_then_conv(depthwise, pairwise, False)
    assert composed.groups == 2 and tuple(composed.weight.shape) == (4, 2, 3, 3) and composed.padding == (1, 1)
    close(conv_fwd(x, composed), conv_fwd(conv_fwd(x, depthwise), pairwise))
    # a dense 1x1 whose top-right block is zero, then a 2-group 3x3: only the top-right stays zero
    lower = randn(4, 4, 1, 1, seed=6)
    lower[0:2, 2:4] = 0.0
    grouped = _fc(randn(4, 2, 3, 3, seed=7), randn(4, seed=8), groups=2, padding=(1, 2), stride=(1, 1))
    composed = compose.conv_then_conv(_fc(lower, torch.zeros(4, dtype=F64)), grouped, False)
    assert composed.groups == 1 and tuple(composed.weight.shape) == (4, 4, 3, 3) and composed.padding == (1, 2)
    close(conv_fwd(x, composed), conv_fwd(conv_fwd(x, _fc(lower, torch.zeros(4, dtype=F64))), grouped))
    dilated = _fc(randn(4, 4, 3, 3, seed=9), randn(4, seed=10), dilation=(2, 1), padding=(2, 1), stride=(2, 2))
    then_1x1 = compose.conv_then_conv(dilated, _fc(randn(3, 4, 1, 1, seed=11), randn(3, seed=12)), False)
    assert (then_1x1.stride, then_1x1.padding, then_1x1.dilation, then_1x1.groups) == ((2, 2), (2, 1), (2, 1), 1)
    close(conv_fwd(x, then_1x1), conv_fwd(conv_fwd(x, dilated), _fc(randn(3, 4, 1, 1, seed=11), randn(3, seed=12))))


@pytest.mark.parametrize("first, second, message", [
    (_fc(randn(3, 2, 1, 1), torch.zeros(3)), _fc(randn(4, 4, 1, 1), torch.zeros(4)),
     "a conv with 3 outputs cannot feed one with 4 inputs"),
    (_fc(randn(4, 2, 1, 1), torch.zeros(4), padding_mode="reflect"), _fc(randn(4, 4, 1, 1), torch.zeros(4)),
     "only zero-padded convs compose into one conv"),
    (_fc(randn(4, 2, 1, 1), torch.zeros(4)), _fc(randn(4, 4, 1, 1), torch.zeros(4), padding_mode="circular"),
     "only zero-padded convs compose into one conv"),
    (_fc(randn(4, 2, 1, 1), torch.zeros(4), stride=(2, 2)), _fc(randn(4, 4, 3, 5), torch.zeros(4)),
     "a conv with stride (2, 2) or dilation (1, 1)/(1, 1) before a 3x5 conv is not one conv"),
    (_fc(randn(4, 2, 3, 3), torch.zeros(4), dilation=(2, 1)), _fc(randn(4, 4, 3, 3), torch.zeros(4)),
     "a conv with stride (1, 1) or dilation (2, 1)/(1, 1) before a 3x3 conv is not one conv"),
    (_fc(randn(4, 2, 1, 1), torch.zeros(4)), _fc(randn(4, 4, 3, 3), torch.zeros(4), dilation=(1, 2)),
     "a conv with stride (1, 1) or dilation (1, 1)/(1, 2) before a 3x3 conv is not one conv"),
    (_fc(randn(4, 2, 1, 1), torch.zeros(4)), _fc(randn(4, 4, 1, 1), torch.zeros(4), stride=(2, 2)),
     None),
    (_fc(randn(4, 2, 3, 3), torch.zeros(4)), _fc(randn(4, 4, 3, 3), torch.zeros(4), padding=(0, 1)),
     "a conv that pads its input after another map is one conv only when that map gives 0 for a zero input "
     "(a 1x1 conv without bias), or when the block pads its input first"),
    (_fc(randn(4, 2, 1, 1), torch.tensor([0.0, 0, 1, 0])), _fc(randn(4, 4, 3, 3), torch.zeros(4), padding=(1, 0)),
     "a conv that pads its input after another map is one conv only when that map gives 0 for a zero input "
     "(a 1x1 conv without bias), or when the block pads its input first"),
])
def test_conv_then_conv_refusals(first, second, message) -> None:
    if message is None:  # a strided 1x1 second: accepted, the composite is strided
        composed = compose.conv_then_conv(first, second, False)
        assert composed.stride == (2, 2)
        x = randn(1, 2, 5, 5, seed=3)
        close(conv_fwd(x, composed), conv_fwd(conv_fwd(x, first), second))
        return
    with raises(UnsupportedError, message):
        compose.conv_then_conv(first, second, False)


def test_conv_then_conv_a_1x1_without_bias_before_a_padded_conv_is_exact() -> None:
    first = _fc(randn(4, 2, 1, 1), torch.zeros(4, dtype=F64))
    second = _fc(randn(3, 4, 3, 3, seed=1), randn(3, seed=2), padding=(1, 1))
    composed = compose.conv_then_conv(first, second, False)
    x = randn(1, 2, 5, 5, seed=3)
    close(conv_fwd(x, composed), conv_fwd(conv_fwd(x, first), second))


def test_compose_kernels_is_the_kernel_of_two_convs() -> None:
    x = randn(1, 3, 9, 9, seed=1)
    for k1, k2 in (((1, 1), (3, 3)), ((3, 3), (1, 1)), ((3, 1), (1, 3)), ((3, 5), (3, 3))):
        w1, w2 = randn(4, 3, *k1, seed=2), randn(5, 4, *k2, seed=3)
        w = compose._compose_kernels(w1, w2)
        assert tuple(w.shape) == (5, 3, k1[0] + k2[0] - 1, k1[1] + k2[1] - 1)
        close(F.conv2d(x, w), F.conv2d(F.conv2d(x, w1), w2))


def test_spread_places_dilated_taps() -> None:
    weight = randn(2, 1, 3, 2, dtype=torch.float32)
    term = ConvBranch(weight=weight, bias=randn(2), padding=(2, 3), dilation=(2, 3), padding_mode="reflect")
    spread = compose.spread(term)
    expected = torch.zeros(2, 1, 5, 4, dtype=torch.float32)
    expected[:, :, ::2, ::3] = weight
    assert spread.weight.dtype == torch.float32 and torch.equal(spread.weight, expected)
    assert (spread.dilation, spread.padding, spread.padding_mode, spread.bias) == ((1, 1), (2, 3), "reflect", term.bias)
    plain = ConvBranch(weight=weight)
    assert compose.spread(plain) is plain


def test_regrouped_writes_a_conv_with_fewer_groups() -> None:
    x = randn(1, 6, 4, 4, seed=1)
    cases = [(randn(12, 1, 3, 3, seed=2), 6, 2), (randn(6, 2, 1, 3, seed=3), 3, 1), (randn(12, 3, 1, 1, seed=4), 2, 1),
             (randn(4, 3, 3, 3, seed=5), 2, 2)]
    for weight, fine, coarse in cases:
        value = maps.conv(weight, groups=fine, padding=(weight.shape[2] // 2, weight.shape[3] // 2))
        wide = compose.regrouped(value, coarse)
        assert wide.groups == coarse
        (term,) = wide.convs
        assert tuple(term.weight.shape) == (weight.shape[0], 6 // coarse, *weight.shape[2:])
        assert term.weight.dtype == weight.dtype
        close(conv_fwd(x, maps.evaluate(wide)), F.conv2d(x, weight, padding=value.padding, groups=fine))
    with raises(UnsupportedError, "a conv with 3 groups cannot be written with 2"):
        compose.regrouped(maps.conv(randn(6, 2, 1, 1), groups=3), 2)


# -- second pass: what the first left loose ---------------------------------------------------


def test_grouped_skips_groups_that_do_not_divide_both_sides_and_returns_the_kernel_itself() -> None:
    # 3 outputs, 4 inputs: 3 groups divide the outputs only; the diagonal pattern must not pass for them
    dense = torch.zeros(3, 4, 1, 1, dtype=F64)
    for g in range(3):
        dense[g, g] = 1.0 + g
    weight, groups = compose._grouped(dense, (3, 1))
    assert groups == 1 and weight is dense
    weight, groups = compose._grouped(dense.transpose(0, 1).contiguous(), (3,))  # 4 outputs, 3 inputs
    assert groups == 1
    upper = torch.ones(4, 4, 1, 1, dtype=F64)
    weight, groups = compose._grouped(upper, (2, 1))
    assert groups == 1 and weight is upper


def test_compose_kernels_of_a_1x1_is_the_product_at_each_tap() -> None:
    """A 1x1 kernel composes as a product over the middle channels, tap by tap (no border of zeros is
    convolved in: an Inf in the other kernel stays at its own tap)."""
    w1, w2 = randn(4, 3, 1, 1), randn(5, 4, 3, 3, seed=1)
    w2[0, 0, 0, 0] = float("inf")
    composed = compose._compose_kernels(w1, w2)
    assert torch.isfinite(composed[0, :, 1:, :]).all() and torch.isfinite(composed[1:]).all()
    w1, w2 = randn(4, 3, 3, 3), randn(5, 4, 1, 1, seed=1)
    w1[0, 0, 0, 0] = float("inf")
    composed = compose._compose_kernels(w1, w2)
    assert torch.isfinite(composed[:, 1:]).all() and torch.isfinite(composed[:, 0, 1:]).all()


def test_compose_kernels_with_kernels_of_size_2() -> None:
    x = randn(1, 3, 7, 7, seed=1)
    for k1, k2 in (((2, 1), (3, 3)), ((1, 2), (3, 3)), ((3, 3), (2, 1)), ((3, 3), (1, 2)), ((1, 1), (2, 2))):
        w1, w2 = randn(4, 3, *k1, seed=2), randn(5, 4, *k2, seed=3)
        close(F.conv2d(x, compose._compose_kernels(w1, w2)), F.conv2d(F.conv2d(x, w1), w2))


def test_conv_then_conv_with_pad_first_sums_asymmetric_paddings() -> None:
    w1, b1, w2, b2 = randn(4, 3, 3, 3), randn(4, seed=1), randn(2, 4, 3, 5, seed=2), randn(2, seed=3)
    first, second = _fc(w1, b1, padding=(1, 0)), _fc(w2, b2, padding=(0, 2))
    composed = compose.conv_then_conv(first, second, True)
    assert composed.padding == (1, 2)
    x = randn(1, 3, 6, 7, seed=4)
    expected = F.conv2d(F.conv2d(F.pad(x, (2, 2, 1, 1)), w1, b1), w2, b2)
    close(conv_fwd(x, composed), expected)


def test_times_is_float64_whatever_the_operands() -> None:
    one_d, zero_d = torch.tensor([2.0, 3.0], dtype=torch.float32), torch.tensor(0.5, dtype=torch.float32)
    for a, b in ((one_d, zero_d), (zero_d, one_d)):
        product = maps._times(a, b)
        assert product.dtype == F64 and product.tolist() == [1.0, 1.5]


def test_then_identity_after_a_map_keeps_its_terms() -> None:
    conv = maps.conv(randn(2, 2, 3, 3))
    after = maps.then(conv, maps.identity())
    assert after.convs[0] is conv.convs[0]
    ident = maps.then(maps.identity(2), maps.identity())
    assert ident.identity == IdentityBranch()


def test_then_on_a_composite_per_channel_value_keeps_its_expression() -> None:
    norm, s = rand_bn(3, seed=1), maps.scale(randn(3, seed=2))
    value = Branches(convs=(), identity=IdentityBranch(), in_channels=3, composite=True, ops="inner")
    after = maps.then(value, maps.bn(norm), s)
    assert after.identity.bn is norm and after.identity.scale is s.identity.scale
    assert isinstance(after.ops, ThenOp) and after.ops.second.scale is s.identity.scale
    assert isinstance(after.ops.first, ThenOp) and after.ops.first.first == "inner"
    assert after.ops.first.second.bn is norm


def test_bn_after_a_sum_with_only_one_post_factor() -> None:
    w3, w1 = randn(3, 3, 3, 3), randn(3, 3, 1, 1, seed=1)
    norm, norm2, s = rand_bn(3, seed=2), rand_bn(3, seed=3), randn(3, seed=4)
    x = randn(1, 3, 4, 4, seed=5)
    y = F.conv2d(x, w3, padding=1) + F.conv2d(x, w1)
    total = maps.plus(maps.conv(w3), maps.conv(w1))
    twice = maps.then(maps.then(total, maps.bn(norm)), maps.bn(norm2))
    close(conv_fwd(x, maps.evaluate(twice)), bn_fwd(bn_fwd(y, norm), norm2))
    scaled_sum = Branches(convs=total.convs, post_scale=s)
    normed = maps.then(scaled_sum, maps.bn(norm2))
    close(conv_fwd(x, maps.evaluate(normed)), bn_fwd(y * per_channel(s), norm2))
    both = maps.then(total, maps.then(maps.identity(), maps.bn(norm), maps.scale(s)))
    assert both.post_bn is norm and torch.equal(both.post_scale, s)
    close(conv_fwd(x, maps.evaluate(both)), bn_fwd(y, norm) * per_channel(s))


def test_plus_of_a_materialized_term_keeps_its_geometry_unknown() -> None:
    w3, w1, norm = randn(3, 3, 3, 3), randn(3, 3, 1, 1, seed=1), rand_bn(3, seed=2)
    inner = maps.then(maps.plus(maps.conv(w3), maps.conv(w1)), maps.bn(norm))
    assert not maps.plus(inner, maps.conv(w3, known=True)).geometry_known
    known = maps.then(maps.plus(maps.conv(w3, known=True), maps.conv(w1, known=True)), maps.bn(norm))
    assert maps.plus(known, maps.conv(w3, known=True)).geometry_known


def test_plus_keeps_the_strides_and_the_first_term_without_convs() -> None:
    value = maps.plus(maps.conv(randn(2, 2, 3, 3), stride=2), maps.conv(randn(2, 2, 1, 1), stride=2))
    assert value.stride == (2, 2)
    zero = Branches(convs=(), padding=(3, 3), padding_mode="reflect", stride=(2, 2))
    value = maps.plus(maps.identity(2), zero)
    assert (value.padding, value.padding_mode, value.stride, value.geometry_known) == (None, "zeros", (1, 1), False)


def test_plus_regroups_two_groups_and_leaves_the_common_and_unknown_alone() -> None:
    wd, w2 = randn(4, 1, 3, 3), randn(4, 2, 1, 1, seed=1)
    common = maps.conv(w2, groups=2)
    value = maps.plus(maps.conv(wd, groups=4), common, maps.identity())
    assert value.groups == 2 and value.convs[1] is common.convs[0]
    assert tuple(value.convs[0].weight.shape) == (4, 2, 3, 3) and value.identity == IdentityBranch()
    x = randn(1, 4, 4, 4, seed=2)
    close(conv_fwd(x, maps.evaluate(value)), F.conv2d(x, wd, padding=1, groups=4) + F.conv2d(x, w2, groups=2) + x)


def test_plus_spreads_and_regroups_keeping_the_original_expression() -> None:
    w5, w3 = randn(4, 1, 5, 5), randn(4, 2, 3, 3, seed=1)
    value = maps.plus(maps.conv(w5, groups=4), maps.conv(w3, dilation=2, groups=2))
    assert value.groups == 2 and value.composite
    first, second = value.ops.terms
    assert first.weight is w5 and first.groups == 4
    assert second.weight is w3 and second.dilation == (2, 2)
    x = randn(1, 4, 6, 6, seed=2)
    close(conv_fwd(x, maps.evaluate(value)),
          F.conv2d(x, w5, padding=2, groups=4) + F.conv2d(x, w3, padding=2, dilation=2, groups=2))


@pytest.mark.parametrize("dilation", [(2, 1), (1, 2)])
def test_plus_spreads_a_kernel_dilated_in_one_direction(dilation) -> None:
    w5, w3 = randn(2, 2, 5, 5), randn(2, 2, 3, 3, seed=1)
    padding = (dilation[0], dilation[1])
    value = maps.plus(maps.conv(w5, padding=(2, 2)), maps.conv(w3, padding=padding, dilation=dilation))
    assert [c.dilation for c in value.convs] == [(1, 1), (1, 1)]
    x = randn(1, 2, 6, 6, seed=2)
    close(conv_fwd(x, maps.evaluate(value)), F.conv2d(x, w5, padding=2) + F.conv2d(x, w3, padding=padding,
                                                                                   dilation=dilation))


def test_plus_spreads_only_the_terms_with_dilated_convs() -> None:
    odd = Branches(convs=(ConvBranch(weight=randn(2, 2, 7, 7)),), dilation=(3, 3))  # its own stated geometry
    value = maps.plus(odd, maps.conv(randn(2, 2, 3, 3, seed=1), dilation=2))
    assert value.dilation == (3, 3) and value.composite


def test_bn_scale_shift_without_running_statistics() -> None:
    with raises(UnsupportedError, "X has no running statistics"):
        fbn.bn_scale_shift(BatchNorm(running_mean=None, running_var=torch.ones(2)), 2, "X")
    with raises(UnsupportedError, "X has no running statistics"):
        fbn.bn_scale_shift(BatchNorm(running_mean=torch.ones(2), running_var=None), 2, "X")


def test_as_float64_brings_tensors_to_the_cpu() -> None:
    with pytest.raises(NotImplementedError):  # a meta tensor stands in for another device: no data to bring
        fbn.as_float64(torch.empty(3, device="meta"), "t")


def test_identity_kernel_depthwise_and_tall() -> None:
    assert torch.equal(kernels.identity_kernel(3, 1, (1, 1)), torch.ones(3, 1, 1, 1, dtype=F64))
    kernel = kernels.identity_kernel(2, 1, (5, 3))
    expected = torch.zeros(2, 1, 5, 3, dtype=F64)
    expected[:, 0, 2, 1] = 1.0
    assert torch.equal(kernel, expected)


def test_check_alignment_of_an_identity_with_one_dilated_direction() -> None:
    for dilation, padding in (((1, 2), (1, 2)), ((2, 1), (2, 1))):
        value = branches(conv_term(2, 2, 3, 3, dilation=dilation), identity=IdentityBranch(), dilation=dilation)
        assert value.resolved_padding == padding
        kernels.check_alignment(value, (3, 3))


def test_an_even_difference_is_refused_as_not_centred_not_as_misaligned() -> None:
    value = branches(conv_term(2, 2, 3, 3), conv_term(2, 2, 2, 2, padding=(1, 1)))
    kernels.check_alignment(value, (3, 3))
    with raises(UnsupportedError, "a 2x2 kernel cannot be centred in a 3x3 kernel"):
        fsum.fuse_branches(value)


def test_fused_weight_shape_refuses_two_per_group_widths() -> None:
    with raises(UnsupportedError, "branches disagree on input channels per group: [1, 2]"):
        fsum.fused_weight_shape(branches(conv_term(4, 2, 3, 3), conv_term(4, 1, 1, 1)))


def test_fuse_branches_with_a_post_scale_alone() -> None:
    w, s = randn(3, 3, 3, 3), randn(3, seed=1)
    fused = fsum.fuse_branches(branches(ConvBranch(weight=w, bias=randn(3, seed=2)), post_scale=s))
    x = randn(1, 3, 4, 4, seed=3)
    close(conv_fwd(x, fused), F.conv2d(x, w, randn(3, seed=2), padding=1) * per_channel(s))


@pytest.mark.parametrize("kernel", [(3, 5), (5, 3)])
def test_fuse_branches_identity_in_a_non_square_kernel(kernel) -> None:
    w, norm = randn(3, 3, *kernel), rand_bn(3, seed=1)
    fused = fsum.fuse_branches(branches(ConvBranch(weight=w), identity=IdentityBranch(bn=norm)), rows_per_chunk=2)
    x = randn(1, 3, 6, 6, seed=2)
    padding = (kernel[0] // 2, kernel[1] // 2)
    close(conv_fwd(x, fused), F.conv2d(x, w, padding=padding) + bn_fwd(x, norm))
