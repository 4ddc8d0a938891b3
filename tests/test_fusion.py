"""Tests of repvgg_cli.fusion (the fusion math) and repvgg_cli.verify (the equivalence checks).

The ground truth of the property tests is an ``nn.Module`` train-form block built here from real
``nn.Conv2d`` and eval-mode ``nn.BatchNorm2d`` modules, run in float64 on the source tensors
(upcast exactly). ``checks.reference_forward`` is itself under test and is compared against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from repvgg_cli import checks
from repvgg_cli.checks import forward as checks_forward
from repvgg_cli.errors import InputError, UnsupportedError
from repvgg_cli.fusion.values import (
    BatchNorm,
    Branches,
    ConvBranch,
    FusedConv,
    IdentityBranch,
)
from repvgg_cli.fusion.bn import fold_batch_norm
from repvgg_cli.fusion.kernels import center_kernel, identity_kernel
from repvgg_cli.fusion.sum import fuse_branches, fused_weight_shape

F64 = torch.float64
SOURCE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
FLOAT64_FUSION_RTOL = 1e-10


def property_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- the comparison helper (itself tested: see the sabotage tests) ----------------------------


def rel_error(reference: Tensor, candidate: Tensor) -> float:
    """``max|reference - candidate| / max|reference|``; inf when the candidate is not finite."""
    assert reference.shape == candidate.shape, (tuple(reference.shape), tuple(candidate.shape))
    reference = reference.to(F64)
    candidate = candidate.to(F64)
    assert torch.isfinite(reference).all()
    scale = float(reference.abs().max())
    assert scale > 0.0
    if not torch.isfinite(candidate).all():
        return math.inf
    return float((reference - candidate).abs().max()) / scale


def within(reference: Tensor, candidate: Tensor, rtol: float) -> bool:
    """The pass/fail verdict of the tests: relative to max|reference|."""
    return rel_error(reference, candidate) <= rtol


# -- random train-form blocks -----------------------------------------------------------------


@dataclass(frozen=True)
class BranchSpec:
    kernel: tuple[int, int]
    bias: bool
    bn: bool
    affine: bool
    scale: bool
    explicit_padding: bool


@dataclass(frozen=True)
class BlockSpec:
    k: int
    dilation: int
    stride: int
    groups: int
    in_per_group: int
    out_per_group: int
    convs: tuple[BranchSpec, ...]
    identity: bool
    identity_bn: bool
    identity_affine: bool
    identity_scale: bool
    post_bn: bool
    post_affine: bool
    extra_padding: int
    explicit_block_padding: bool
    pass_groups: bool
    pass_in_channels: bool
    dtype: torch.dtype
    height: int
    width: int
    batch: int
    seed: int

    @property
    def in_channels(self) -> int:
        return self.groups * self.in_per_group

    @property
    def out_channels(self) -> int:
        return self.groups * self.out_per_group

    @property
    def padding(self) -> int:
        return self.dilation * (self.k // 2) + self.extra_padding

    def branch_padding(self, kernel: tuple[int, int]) -> tuple[int, int]:
        # p_b = P - d * (K - k_b) // 2 per dimension (1x1 branches: P - d * (K - 1) // 2).
        return tuple(self.padding - self.dilation * (self.k - kb) // 2 for kb in kernel)  # type: ignore[return-value]


@st.composite
def branch_specs(draw, kernel: tuple[int, int]) -> BranchSpec:
    return BranchSpec(
        kernel=kernel,
        bias=draw(st.booleans()),
        bn=draw(st.integers(0, 4)) > 0,
        affine=draw(st.booleans()),
        scale=draw(st.integers(0, 3)) == 0,
        explicit_padding=draw(st.booleans()),
    )


@st.composite
def block_specs(draw) -> BlockSpec:
    k = draw(st.sampled_from([1, 3, 5, 7]))
    dilation = draw(st.sampled_from([1, 2]))
    identity = draw(st.booleans())
    stride = 1 if identity else draw(st.sampled_from([1, 2]))
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if kind == "dense":
        groups = 1
        in_pg = draw(st.integers(1, 8))
        out_pg = in_pg if identity else draw(st.integers(1, 8))
    elif kind == "grouped":
        groups = draw(st.integers(2, 4))
        in_pg = draw(st.integers(1, 4))
        out_pg = in_pg if identity else draw(st.integers(1, 4))
    else:  # depthwise: groups == channels
        groups = draw(st.integers(2, 8))
        in_pg = out_pg = 1

    kernels = [(k, k)]
    if draw(st.integers(0, 3)) > 0:
        kernels.append((1, 1))
    if k > 1:
        asym = draw(st.sampled_from(["none", "1xk", "kx1", "both"]))
        if asym in ("1xk", "both"):
            kernels.append((1, k))
        if asym in ("kx1", "both"):
            kernels.append((k, 1))
    if k >= 5 and draw(st.booleans()):
        kernels.append((k - 2, k - 2))
    convs = tuple(draw(branch_specs(kernel)) for kernel in kernels)

    extra_padding = 0 if identity else draw(st.sampled_from([0, 0, 0, 1]))
    return BlockSpec(
        k=k,
        dilation=dilation,
        stride=stride,
        groups=groups,
        in_per_group=in_pg,
        out_per_group=out_pg,
        convs=convs,
        identity=identity,
        identity_bn=draw(st.integers(0, 3)) > 0,
        identity_affine=draw(st.booleans()),
        identity_scale=draw(st.integers(0, 3)) == 0,
        post_bn=draw(st.integers(0, 2)) == 0,
        post_affine=draw(st.booleans()),
        extra_padding=extra_padding,
        explicit_block_padding=extra_padding > 0 or draw(st.booleans()),
        # Without an identity a state dict cannot tell the groups, so they must be passed.
        pass_groups=(not identity) or draw(st.booleans()),
        pass_in_channels=draw(st.booleans()),
        dtype=draw(st.sampled_from(SOURCE_DTYPES)),
        height=draw(st.integers(1, 11)),
        width=draw(st.integers(1, 11)),
        batch=draw(st.integers(1, 2)),
        seed=draw(st.integers(0, 2**63 - 1)),
    )


class TrainFormBlock(nn.Module):
    """The train-form block as real modules: ``post_bn(sum(s_b * bn_b(conv_b(x))) + s_id * bn_id(x))``."""

    def __init__(self, convs, bns, scales, identity, identity_bn, identity_scale, post_bn) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.bns = nn.ModuleList([nn.Identity() if bn is None else bn for bn in bns])
        self.scales = scales
        self.identity = identity
        self.identity_bn = nn.Identity() if identity_bn is None else identity_bn
        self.identity_scale = identity_scale
        self.post_bn = nn.Identity() if post_bn is None else post_bn

    def forward(self, x: Tensor) -> Tensor:
        total = None
        for conv, bn, scale in zip(self.convs, self.bns, self.scales):
            y = bn(conv(x))
            if scale is not None:
                y = y * scale.reshape(1, -1, 1, 1)
            total = y if total is None else total + y
        if self.identity:
            y = self.identity_bn(x)
            if self.identity_scale is not None:
                y = y * self.identity_scale.reshape(1, -1, 1, 1)
            total = y if total is None else total + y
        return self.post_bn(total)


def nn_batch_norm(bn: BatchNorm) -> nn.BatchNorm2d:
    module = nn.BatchNorm2d(bn.num_features, eps=bn.eps, affine=bn.weight is not None).to(F64)
    with torch.no_grad():
        module.running_mean.copy_(bn.running_mean.to(F64))
        module.running_var.copy_(bn.running_var.to(F64))
        if bn.weight is not None:
            module.weight.copy_(bn.weight.to(F64))
            module.bias.copy_(bn.bias.to(F64))
    return module.eval()


@dataclass
class Block:
    spec: BlockSpec
    branches: Branches
    module: TrainFormBlock
    x: Tensor  # the drawn (possibly tiny) input: border effects
    x_full: Tensor  # large enough that every kernel tap meets real pixels, at stride 1 and 2

    def truth(self, x: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            return self.module(self.x if x is None else x)


def random_bn(gen: torch.Generator, channels: int, affine: bool, dtype: torch.dtype) -> BatchNorm:
    """Randomised eval statistics: fresh stats (mean 0, var 1) would hide wrong fusion code."""
    mean = 0.5 * torch.randn(channels, generator=gen, dtype=F64)
    var = 0.25 + 1.75 * torch.rand(channels, generator=gen, dtype=F64)
    gamma = 1.0 + 0.25 * torch.randn(channels, generator=gen, dtype=F64)
    beta = 0.5 * torch.randn(channels, generator=gen, dtype=F64)
    eps = float(10.0 ** (-6.0 + 4.0 * torch.rand(1, generator=gen, dtype=F64)))  # [1e-6, 1e-2]
    return BatchNorm(
        running_mean=mean.to(dtype),
        running_var=var.to(dtype),
        eps=eps,
        weight=gamma.to(dtype) if affine else None,
        bias=beta.to(dtype) if affine else None,
    )


def build_block(spec: BlockSpec) -> Block:
    gen = torch.Generator().manual_seed(spec.seed)
    dtype = spec.dtype
    cin, cout, d = spec.in_channels, spec.out_channels, spec.dilation

    def randn(*shape: int, std: float = 1.0) -> Tensor:
        return (std * torch.randn(*shape, generator=gen, dtype=F64)).to(dtype)

    conv_branches, conv_modules, bn_modules, scales = [], [], [], []
    for b in spec.convs:
        kh, kw = b.kernel
        weight = randn(cout, spec.in_per_group, kh, kw)
        bias = randn(cout, std=0.5) if b.bias else None
        bn = random_bn(gen, cout, b.affine, dtype) if b.bn else None
        scale = randn(cout) if b.scale else None
        padding = spec.branch_padding(b.kernel)
        dilation = (1, 1) if b.kernel == (1, 1) else (d, d)
        conv_branches.append(
            ConvBranch(
                weight=weight,
                bias=bias,
                bn=bn,
                padding=padding if b.explicit_padding else None,
                dilation=dilation,
                scale=scale,
            )
        )
        conv = nn.Conv2d(
            cin, cout, b.kernel, stride=spec.stride, padding=padding, dilation=dilation,
            groups=spec.groups, bias=b.bias,
        ).to(F64)
        with torch.no_grad():
            conv.weight.copy_(weight.to(F64))
            if bias is not None:
                conv.bias.copy_(bias.to(F64))
        conv_modules.append(conv.eval())
        bn_modules.append(None if bn is None else nn_batch_norm(bn))
        scales.append(None if scale is None else scale.to(F64))

    identity = None
    identity_bn_module = None
    identity_scale = None
    if spec.identity:
        identity_bn = random_bn(gen, cout, spec.identity_affine, dtype) if spec.identity_bn else None
        identity_scale_src = randn(cout) if spec.identity_scale else None
        identity = IdentityBranch(bn=identity_bn, scale=identity_scale_src)
        identity_bn_module = None if identity_bn is None else nn_batch_norm(identity_bn)
        identity_scale = None if identity_scale_src is None else identity_scale_src.to(F64)

    post_bn = random_bn(gen, cout, spec.post_affine, dtype) if spec.post_bn else None
    branches = Branches(
        convs=tuple(conv_branches),
        identity=identity,
        groups=spec.groups if spec.pass_groups else None,
        stride=(spec.stride, spec.stride),
        padding=(spec.padding, spec.padding) if spec.explicit_block_padding else None,
        dilation=(d, d),
        post_bn=post_bn,
        in_channels=cin if spec.pass_in_channels else None,
    )
    module = TrainFormBlock(
        conv_modules, bn_modules, scales, spec.identity, identity_bn_module, identity_scale,
        None if post_bn is None else nn_batch_norm(post_bn),
    ).eval()
    x = torch.randn(spec.batch, cin, spec.height, spec.width, generator=gen, dtype=F64)
    side = d * (spec.k - 1) + 3
    x_full = torch.randn(2, cin, side, side, generator=gen, dtype=F64)
    return Block(spec=spec, branches=branches, module=module, x=x, x_full=x_full)


def map_batch_norms(branches: Branches, change) -> Branches:
    """A copy of ``branches`` with ``change(bn)`` applied to every BatchNorm (for sabotage)."""
    convs = tuple(c if c.bn is None else replace(c, bn=change(c.bn)) for c in branches.convs)
    identity = branches.identity
    if identity is not None and identity.bn is not None:
        identity = replace(identity, bn=change(identity.bn))
    post_bn = None if branches.post_bn is None else change(branches.post_bn)
    return replace(branches, convs=convs, identity=identity, post_bn=post_bn)


def has_batch_norm(branches: Branches) -> bool:
    return (
        any(c.bn is not None for c in branches.convs)
        or (branches.identity is not None and branches.identity.bn is not None)
        or branches.post_bn is not None
    )


# -- 1. property tests of fuse_branches -------------------------------------------------------


@property_settings(1000)
@given(spec=block_specs())
def test_fuse_branches_matches_nn_module_train_form(spec: BlockSpec) -> None:
    block = build_block(spec)
    fused = fuse_branches(block.branches)
    assert fused.weight.dtype == F64 and fused.bias.dtype == F64
    assert tuple(fused.weight.shape) == (spec.out_channels, spec.in_per_group, spec.k, spec.k)
    assert tuple(fused.bias.shape) == (spec.out_channels,)
    assert fused.groups == spec.groups
    assert fused.in_channels == spec.in_channels
    assert fused.stride == (spec.stride, spec.stride)
    assert fused.padding == (spec.padding, spec.padding)
    assert fused.dilation == (spec.dilation, spec.dilation)

    shipped = fused.to(spec.dtype)
    assert shipped.weight.dtype == spec.dtype and shipped.bias.dtype == spec.dtype
    deploy = nn.Conv2d(
        fused.in_channels, fused.out_channels, fused.kernel_size, stride=fused.stride,
        padding=fused.padding, dilation=fused.dilation, groups=fused.groups, bias=True,
    ).to(F64)
    with torch.no_grad():
        deploy.weight.copy_(shipped.weight.to(F64))
        deploy.bias.copy_(shipped.bias.to(F64))

    for x in (block.x, block.x_full):
        truth = block.truth(x)
        assert truth.shape[:2] == (x.shape[0], spec.out_channels)

        # checks.reference_forward is under test too: it must agree with the nn.Module forward.
        assert rel_error(truth, checks.reference_forward(block.branches, x)) <= FLOAT64_FUSION_RTOL

        # float64 fusion is exact up to rounding.
        assert rel_error(truth, checks.fused_forward(fused, x)) <= FLOAT64_FUSION_RTOL

        # The shipped tensors differ from the float64 result only by their rounding: each weight and
        # bias by at most half an ulp of the dtype, and the output by at most what those roundings can
        # add up to (a unit-scale tolerance is not a bound: cancellation can make the sum small).
        shipped_out = checks.fused_forward(shipped, x)
        ulp_half = torch.finfo(spec.dtype).eps / 2
        tiny = torch.finfo(spec.dtype).smallest_normal * torch.finfo(spec.dtype).eps
        w_err = (fused.weight - shipped.weight.to(F64)).abs()
        b_err = (fused.bias - shipped.bias.to(F64)).abs()
        assert bool((w_err <= ulp_half * fused.weight.abs() + tiny).all())
        assert bool((b_err <= ulp_half * fused.bias.abs() + tiny).all())
        bound = checks.fused_forward(replace(fused, weight=w_err, bias=b_err), x.abs())
        exact = checks.fused_forward(fused, x)
        assert bool(((shipped_out - exact).abs() <= bound * (1 + 1e-9) + 1e-12).all())

        # fused_forward is what a real deploy-form nn.Conv2d computes.
        with torch.no_grad():
            assert rel_error(deploy(x), shipped_out) <= 1e-12


# -- 3. the harness can fail: sabotaged fusions are reported -----------------------------------


@property_settings(250)
@given(spec=block_specs())
def test_sabotaged_fusion_is_detected(spec: BlockSpec) -> None:
    block = build_block(spec)
    truth = block.truth()
    fused = fuse_branches(block.branches)
    rtol = checks.default_rtol(spec.dtype)
    assert within(truth, checks.fused_forward(fused.to(spec.dtype), block.x), rtol)

    # One bias entry off by 1e-3 of the output scale (more for the low-precision tolerances).
    scale = float(truth.abs().max())
    relative = max(1e-3, 3.0 * rtol)
    channel = spec.seed % spec.out_channels
    bump = torch.zeros(spec.out_channels, dtype=F64)
    bump[channel] = relative * scale
    sabotaged = replace(fused, bias=fused.bias + bump)
    err64 = rel_error(truth, checks.fused_forward(sabotaged, block.x))
    assert err64 == pytest.approx(relative, rel=1e-6)
    assert not within(truth, checks.fused_forward(sabotaged, block.x), FLOAT64_FUSION_RTOL)
    assert not within(truth, checks.fused_forward(sabotaged, block.x), checks.default_rtol(torch.float32))
    assert not within(truth, checks.fused_forward(sabotaged.to(spec.dtype), block.x), rtol)

    # checks.check_block reaches the same verdicts.
    honest = checks.check_block("blk", block.branches, fused, fused.to(spec.dtype), spec.seed, checks.Tolerance())
    assert honest.ok and honest.rtol == rtol and honest.rel_err <= rtol
    # check_block runs its own input, so the bump is sized to its output scale.
    sabotaged_for_check = replace(fused, bias=fused.bias + bump * (honest.scale / scale))
    caught = checks.check_block(
        "blk", block.branches, fused, sabotaged_for_check.to(spec.dtype), spec.seed, checks.Tolerance()
    )
    assert not caught.ok and caught.rel_err > rtol
    assert caught.rel_err == pytest.approx(relative, abs=rtol)

    # The largest centre-tap weight off by 1e-3 relative (the centre tap sees every input pixel).
    weight = fused.weight.clone()
    centre = weight[:, :, spec.k // 2, spec.k // 2]
    o, i = divmod(int(centre.abs().argmax()), centre.shape[1])
    weight[o, i, spec.k // 2, spec.k // 2] *= 1.0 + relative
    bad_weight = replace(fused, weight=weight)
    truth_full = block.truth(block.x_full)
    assert within(truth_full, checks.fused_forward(fused, block.x_full), FLOAT64_FUSION_RTOL)
    assert not within(truth_full, checks.fused_forward(bad_weight, block.x_full), FLOAT64_FUSION_RTOL)

    if has_batch_norm(block.branches):
        # Forgetting the BN eps is caught in float64.
        no_eps = fuse_branches(map_batch_norms(block.branches, lambda bn: replace(bn, eps=0.0)))
        assert rel_error(truth, checks.fused_forward(no_eps, block.x)) > 1e3 * FLOAT64_FUSION_RTOL

        # Fusing with fresh statistics (mean 0, var 1, gamma 1, beta 0) is caught at the dtype's tolerance.
        def fresh(bn: BatchNorm) -> BatchNorm:
            c = bn.num_features
            return BatchNorm(
                running_mean=torch.zeros(c, dtype=F64),
                running_var=torch.ones(c, dtype=F64),
                eps=bn.eps,
                weight=None if bn.weight is None else torch.ones(c, dtype=F64),
                bias=None if bn.bias is None else torch.zeros(c, dtype=F64),
            )

        fresh_fused = fuse_branches(map_batch_norms(block.branches, fresh)).to(spec.dtype)
        assert not within(truth, checks.fused_forward(fresh_fused, block.x), rtol)


def test_comparison_helper_fails_for_a_perturbed_output() -> None:
    gen = torch.Generator().manual_seed(7)
    reference = torch.randn(2, 3, 5, 5, generator=gen, dtype=F64)
    assert rel_error(reference, reference) == 0.0
    assert within(reference, reference, 0.0)
    off = reference.clone()
    off[1, 2, 3, 4] += 1e-3 * float(reference.abs().max())
    assert rel_error(reference, off) == pytest.approx(1e-3, rel=1e-9)
    assert not within(reference, off, 1e-5)
    assert within(reference, off, 2e-3)
    nan = reference.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert rel_error(reference, nan) == math.inf
    assert not within(reference, nan, 1e9)


# -- 4. probes and tensor encoding ------------------------------------------------------------


@property_settings(150)
@given(spec=block_specs(), probe_seed=st.integers(0, 2**62))
def test_reference_and_fused_probes_agree_and_detect_a_changed_weight(spec: BlockSpec, probe_seed: int) -> None:
    block = build_block(spec)
    fused = fuse_branches(block.branches)
    reference = checks.reference_probe(block.branches, probe_seed)
    probe = checks.fused_probe(fused, probe_seed)
    assert tuple(reference.shape) == (1, spec.out_channels)
    assert rel_error(reference, probe) <= FLOAT64_FUSION_RTOL

    # The probe sees every kernel tap at its centre pixel: the stride-1 nn.Module agrees.
    x = checks.block_probe(spec.in_channels, (spec.k, spec.k), (spec.dilation, spec.dilation), probe_seed)
    for conv in block.module.convs:
        conv.stride = (1, 1)
    centre = block.truth(x)[:, :, x.shape[2] // 2 + spec.extra_padding, x.shape[3] // 2 + spec.extra_padding]
    assert rel_error(centre, reference) <= FLOAT64_FUSION_RTOL

    flat = fused.weight.clone().reshape(-1)
    index = int(flat.abs().argmax())
    flat[index] *= 1.01
    changed = replace(fused, weight=flat.reshape(fused.weight.shape))
    assert rel_error(reference, checks.fused_probe(changed, probe_seed)) > 1e-7


def test_probes_of_a_fixed_random_block() -> None:
    gen = torch.Generator().manual_seed(1234)
    branches = Branches(
        convs=(
            ConvBranch(torch.randn(6, 6, 3, 3, generator=gen, dtype=F64), bn=random_bn(gen, 6, True, F64)),
            ConvBranch(torch.randn(6, 6, 1, 1, generator=gen, dtype=F64), bn=random_bn(gen, 6, True, F64)),
        ),
        identity=IdentityBranch(bn=random_bn(gen, 6, True, F64)),
        groups=1,
    )
    fused = fuse_branches(branches)
    reference = checks.reference_probe(branches, 99)
    probe = checks.fused_probe(fused, 99)
    assert rel_error(reference, probe) <= FLOAT64_FUSION_RTOL
    weight = fused.weight.clone()
    o, i, kh, kw = divmod_index(int(weight.abs().argmax()), weight.shape)
    weight[o, i, kh, kw] *= 1.01
    changed = checks.fused_probe(replace(fused, weight=weight), 99)
    x = checks.block_probe(6, (3, 3), (1, 1), 99)
    # Exactly the changed tap's contribution moves, in output channel o only.
    expected_shift = 0.01 * fused.weight[o, i, kh, kw] * x[:, i, kh, kw]
    torch.testing.assert_close(changed[:, o] - probe[:, o], expected_shift, rtol=1e-9, atol=1e-12)
    others = [c for c in range(6) if c != o]
    assert torch.equal(changed[:, others], probe[:, others])
    assert rel_error(reference, changed) > 1e-5


def divmod_index(flat_index: int, shape) -> tuple[int, ...]:
    out = []
    for size in reversed(tuple(shape)):
        flat_index, rem = divmod(flat_index, size)
        out.append(rem)
    return tuple(reversed(out))


SPECIAL_FLOATS = [
    0.0, -0.0, 1.0, -1.5, math.pi, 5e-324, 2.2250738585072014e-308, -1.7976931348623157e308,
    1.7976931348623157e308, math.inf, -math.inf, math.nan, 1e-300, 123456789.123456789,
]


def same_bits(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype == F64 and a.shape == b.shape and torch.equal(a.view(torch.int64), b.view(torch.int64))


def test_encode_decode_round_trips_special_values_bit_exactly() -> None:
    t = torch.tensor(SPECIAL_FLOATS, dtype=F64)
    text = checks.encode_tensor(t)
    assert isinstance(text, str) and text.isascii()
    decoded = checks.decode_tensor(text, t.shape)
    assert same_bits(decoded, t)
    assert math.copysign(1.0, float(decoded[1])) == -1.0
    assert math.isnan(float(decoded[11]))


@pytest.mark.parametrize("dtype", SOURCE_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (0, 3), (7,), (4, 3, 3, 3), (2, 1, 1, 5)])
def test_encode_decode_round_trip_by_dtype_and_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    decoded = checks.decode_tensor(checks.encode_tensor(t), t.shape)
    assert same_bits(decoded, t.to(F64))
    assert len(checks.encode_tensor(t)) == 4 * math.ceil(8 * t.numel() / 3)


def test_encode_decode_non_contiguous_input() -> None:
    t = torch.arange(24, dtype=F64).reshape(2, 3, 4).transpose(0, 2)
    assert not t.is_contiguous()
    decoded = checks.decode_tensor(checks.encode_tensor(t), t.shape)
    assert same_bits(decoded, t.contiguous())


@property_settings(150)
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), max_size=40))
def test_encode_decode_round_trip_property(values: list[float]) -> None:
    t = torch.tensor(values, dtype=F64)
    decoded = checks.decode_tensor(checks.encode_tensor(t), (len(values),))
    assert same_bits(decoded, t)


# -- 2. unit tests with exact expectations ----------------------------------------------------


@pytest.mark.parametrize(
    "channels,groups,kernel",
    [(4, 1, (3, 3)), (6, 2, (3, 3)), (6, 3, (5, 5)), (5, 5, (3, 3)), (8, 8, (7, 7)), (4, 1, (1, 1)), (6, 2, (3, 5))],
)
def test_identity_kernel_exact(channels: int, groups: int, kernel: tuple[int, int]) -> None:
    in_pg = channels // groups
    k = identity_kernel(channels, in_pg, kernel)
    assert k.dtype == F64
    assert tuple(k.shape) == (channels, in_pg, *kernel)
    expected = torch.zeros(channels, in_pg, *kernel, dtype=F64)
    for i in range(channels):
        expected[i, i % in_pg, kernel[0] // 2, kernel[1] // 2] = 1.0
    assert torch.equal(k, expected)
    assert float(k.sum()) == channels
    # As a grouped conv it is exactly the identity.
    x = torch.randn(2, channels, 6, 7, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = F.conv2d(x, k, padding=(kernel[0] // 2, kernel[1] // 2), groups=groups)
    assert torch.equal(y, x)


def test_identity_kernel_rejects_even_kernels_and_bad_groups() -> None:
    with pytest.raises(UnsupportedError):
        identity_kernel(4, 4, (2, 2))
    with pytest.raises(UnsupportedError):
        identity_kernel(4, 4, (3, 4))
    with pytest.raises(UnsupportedError):
        identity_kernel(6, 4, (3, 3))
    with pytest.raises(UnsupportedError):
        identity_kernel(6, 0, (3, 3))


def test_center_kernel_1x1_to_3x3() -> None:
    w = torch.tensor([[[[2.5]]], [[[-1.0]]]], dtype=F64)
    out = center_kernel(w, (3, 3))
    expected = torch.zeros(2, 1, 3, 3, dtype=F64)
    expected[0, 0, 1, 1] = 2.5
    expected[1, 0, 1, 1] = -1.0
    assert torch.equal(out, expected)


def test_center_kernel_1x3_lands_in_the_middle_row() -> None:
    w = torch.tensor([1.0, 2.0, 3.0], dtype=F64).reshape(1, 1, 1, 3)
    out = center_kernel(w, (3, 3))
    expected = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=F64).reshape(1, 1, 3, 3)
    assert torch.equal(out, expected)
    # And the 3x1 kernel in the middle column.
    out_t = center_kernel(w.reshape(1, 1, 3, 1), (3, 3))
    assert torch.equal(out_t, expected.transpose(2, 3))
    # The centred kernel computes what the 1x3 conv with aligned padding (0, 1) computes.
    x = torch.randn(1, 1, 5, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(F.conv2d(x, out, padding=1), F.conv2d(x, w, padding=(0, 1)), rtol=0, atol=1e-15)


def test_center_kernel_3x3_to_7x7() -> None:
    w = torch.arange(1, 2 * 3 * 9 + 1, dtype=F64).reshape(2, 3, 3, 3)
    out = center_kernel(w, (7, 7))
    assert tuple(out.shape) == (2, 3, 7, 7)
    assert torch.equal(out[:, :, 2:5, 2:5], w)
    mask = torch.ones(7, 7, dtype=torch.bool)
    mask[2:5, 2:5] = False
    assert torch.equal(out[:, :, mask], torch.zeros(2, 3, 40, dtype=F64))
    assert float(out.sum()) == float(w.sum())


def test_center_kernel_rejects_uncentrable_sizes() -> None:
    with pytest.raises(UnsupportedError):
        center_kernel(torch.zeros(1, 1, 2, 2, dtype=F64), (3, 3))
    with pytest.raises(UnsupportedError):
        center_kernel(torch.zeros(1, 1, 5, 5, dtype=F64), (3, 3))


def test_fold_batch_norm_hand_computed() -> None:
    # scale = gamma / sqrt(var + eps) = 4 / sqrt(3 + 1) = 2; shift = beta - mean * scale = -1 - 1 = -2.
    bn = BatchNorm(
        running_mean=torch.tensor([0.5], dtype=F64),
        running_var=torch.tensor([3.0], dtype=F64),
        eps=1.0,
        weight=torch.tensor([4.0], dtype=F64),
        bias=torch.tensor([-1.0], dtype=F64),
    )
    w, b = fold_batch_norm(torch.tensor([[[[2.0, -3.0]]]], dtype=F64), torch.tensor([1.0], dtype=F64), bn)
    assert torch.equal(w, torch.tensor([[[[4.0, -6.0]]]], dtype=F64))
    assert torch.equal(b, torch.tensor([0.0], dtype=F64))  # 1 * 2 - 2


def test_fold_batch_norm_affine_false() -> None:
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(4, 2, 3, 3, generator=gen, dtype=F64)
    bn = random_bn(gen, 4, affine=False, dtype=F64)
    assert bn.weight is None and bn.bias is None
    w, b = fold_batch_norm(weight, None, bn)
    denom = torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(w, weight / denom.reshape(-1, 1, 1, 1), rtol=1e-15, atol=0)
    torch.testing.assert_close(b, -bn.running_mean / denom, rtol=1e-15, atol=0)
    x = torch.randn(2, 2, 5, 5, generator=gen, dtype=F64)
    with torch.no_grad():
        expected = nn_batch_norm(bn)(F.conv2d(x, weight, padding=1))
    assert rel_error(expected, F.conv2d(x, w, b, padding=1)) <= 1e-13


def test_fold_batch_norm_with_conv_bias() -> None:
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(3, 3, 3, 3, generator=gen, dtype=F64)
    bias = torch.randn(3, generator=gen, dtype=F64)
    bn = random_bn(gen, 3, affine=True, dtype=F64)
    w, b = fold_batch_norm(weight, bias, bn)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(w, weight * scale.reshape(-1, 1, 1, 1), rtol=1e-15, atol=0)
    torch.testing.assert_close(b, (bias - bn.running_mean) * scale + bn.bias, rtol=1e-14, atol=1e-15)
    x = torch.randn(2, 3, 5, 5, generator=gen, dtype=F64)
    with torch.no_grad():
        expected = nn_batch_norm(bn)(F.conv2d(x, weight, bias, padding=1))
    assert rel_error(expected, F.conv2d(x, w, b, padding=1)) <= 1e-13


def test_identity_only_block_fuses_to_a_diagonal_1x1() -> None:
    gen = torch.Generator().manual_seed(8)
    bn = random_bn(gen, 4, affine=True, dtype=F64)
    fused = fuse_branches(Branches(convs=(), identity=IdentityBranch(bn=bn), in_channels=4))
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert fused.kernel_size == (1, 1) and fused.padding == (0, 0) and fused.groups == 1
    torch.testing.assert_close(fused.weight[:, :, 0, 0], torch.diag(scale), rtol=1e-15, atol=0)
    torch.testing.assert_close(fused.bias, bn.bias - bn.running_mean * scale, rtol=1e-14, atol=1e-15)


# errors


def _bn(channels: int, var: Tensor | None = None) -> BatchNorm:
    return BatchNorm(
        running_mean=torch.zeros(channels, dtype=F64),
        running_var=torch.ones(channels, dtype=F64) if var is None else var,
    )


def _conv(out: int, in_pg: int, kh: int, kw: int, **kwargs) -> ConvBranch:
    weight = torch.randn(out, in_pg, kh, kw, generator=torch.Generator().manual_seed(out * 31 + kh), dtype=F64)
    return ConvBranch(weight=weight, bn=kwargs.pop("bn", _bn(out)), **kwargs)


def test_negative_running_var_is_an_input_error() -> None:
    bad = _bn(4, torch.tensor([1.0, -0.5, 1.0, 1.0], dtype=F64))
    with pytest.raises(InputError):
        fold_batch_norm(torch.ones(4, 4, 3, 3, dtype=F64), None, bad)
    with pytest.raises(InputError):
        fuse_branches(Branches(convs=(_conv(4, 4, 3, 3, bn=bad),), groups=1))
    with pytest.raises(InputError):
        fuse_branches(Branches(convs=(_conv(4, 4, 3, 3),), identity=IdentityBranch(bn=bad), groups=1))


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weight_is_an_input_error(value: float) -> None:
    conv = _conv(4, 4, 3, 3)
    weight = conv.weight.clone()
    weight[1, 2, 0, 1] = value
    with pytest.raises(InputError):
        fuse_branches(Branches(convs=(replace(conv, weight=weight),), groups=1))


def test_nan_in_batch_norm_stats_is_an_input_error() -> None:
    mean = torch.zeros(4, dtype=F64)
    mean[2] = math.nan
    bad = BatchNorm(running_mean=mean, running_var=torch.ones(4, dtype=F64))
    with pytest.raises(InputError):
        fuse_branches(Branches(convs=(_conv(4, 4, 3, 3, bn=bad),), groups=1))


def test_non_float_weight_is_an_input_error() -> None:
    conv = ConvBranch(weight=torch.ones(4, 4, 3, 3, dtype=torch.int64), bn=_bn(4))
    with pytest.raises(InputError):
        fuse_branches(Branches(convs=(conv,), groups=1))
    with pytest.raises(InputError):
        fold_batch_norm(torch.ones(4, 4, 3, 3, dtype=torch.int64), None, _bn(4))


def test_aligned_explicit_paddings_are_accepted() -> None:
    # Dilation 2, 3x3 main kernel: P = 2; 1x1 branch P - 2 * (3 - 1) // 2 = 0; 1x3 branch (0, 2).
    fused = fuse_branches(
        Branches(
            convs=(
                _conv(4, 4, 3, 3, padding=(2, 2), dilation=(2, 2)),
                _conv(4, 4, 1, 1, padding=(0, 0)),
                _conv(4, 4, 1, 3, padding=(0, 2), dilation=(2, 2)),
            ),
            groups=1,
            dilation=(2, 2),
        )
    )
    assert fused.padding == (2, 2) and fused.dilation == (2, 2) and fused.kernel_size == (3, 3)


@pytest.mark.parametrize(
    "convs,dilation",
    [
        ((_conv(4, 4, 3, 3), _conv(4, 4, 1, 1, padding=(1, 1))), (1, 1)),  # 1x1 needs (0, 0)
        ((_conv(4, 4, 3, 3), _conv(4, 4, 1, 3, padding=(1, 1))), (1, 1)),  # 1x3 needs (0, 1)
        ((_conv(4, 4, 3, 3), _conv(4, 4, 3, 1, padding=(0, 1))), (1, 1)),  # 3x1 needs (1, 0)
        ((_conv(4, 4, 5, 5), _conv(4, 4, 3, 3, padding=(2, 2))), (1, 1)),  # 3x3 in 5x5 needs (1, 1)
        ((_conv(4, 4, 3, 3, dilation=(2, 2)), _conv(4, 4, 1, 1, padding=(1, 1))), (2, 2)),  # needs (0, 0)
    ],
)
def test_misaligned_branch_padding_is_unsupported(convs, dilation) -> None:
    with pytest.raises(UnsupportedError):
        fuse_branches(Branches(convs=convs, groups=1, dilation=dilation))


def test_identity_with_stride_2_is_unsupported() -> None:
    with pytest.raises(UnsupportedError):
        fuse_branches(Branches(convs=(_conv(4, 4, 3, 3),), identity=IdentityBranch(), groups=1, stride=(2, 2)))


def test_identity_with_in_not_equal_out_is_unsupported() -> None:
    # 4 -> 8 channels, said explicitly.
    with pytest.raises(UnsupportedError):
        fuse_branches(Branches(convs=(_conv(8, 4, 3, 3),), identity=IdentityBranch(), groups=1, in_channels=4))
    # 4 -> 8 channels implied by the weight and groups=1 (was silently fused into a wrong kernel).
    with pytest.raises(UnsupportedError):
        fuse_branches(Branches(convs=(_conv(8, 4, 3, 3),), identity=IdentityBranch(), groups=1))
    # Identity only, 8 -> 4 channels.
    with pytest.raises(UnsupportedError):
        fuse_branches(Branches(convs=(), identity=IdentityBranch(bn=_bn(4)), in_channels=8))


def test_identity_with_even_kernel_is_unsupported() -> None:
    with pytest.raises(UnsupportedError):
        fuse_branches(Branches(convs=(_conv(2, 2, 2, 2),), identity=IdentityBranch(), groups=1))


@pytest.mark.parametrize("dtype", SOURCE_DTYPES)
def test_fused_conv_to_returns_fresh_contiguous_tensors(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    # A non-contiguous weight view and a bias view into a larger buffer.
    weight = torch.randn(3, 3, 2, 4, generator=gen, dtype=F64).permute(3, 2, 1, 0)
    bias = torch.randn(8, generator=gen, dtype=F64)[::2]
    assert not weight.is_contiguous() and not bias.is_contiguous()
    fused = FusedConv(weight=weight, bias=bias, padding=(1, 1), groups=1)
    shipped = fused.to(dtype)
    for new, old in ((shipped.weight, weight), (shipped.bias, bias)):
        assert new.dtype == dtype
        assert new.is_contiguous()
        assert new.shape == old.shape
        assert new.untyped_storage().data_ptr() != old.untyped_storage().data_ptr()
        assert torch.equal(new, old.to(dtype))
    assert shipped.weight.untyped_storage().data_ptr() != shipped.bias.untyped_storage().data_ptr()
    assert (shipped.stride, shipped.padding, shipped.dilation, shipped.groups) == ((1, 1), (1, 1), (1, 1), 1)
    # Same dtype too: a copy, not the same storage; writing it leaves the source alone.
    again = shipped.to(dtype)
    assert again.weight.data_ptr() != shipped.weight.data_ptr()
    again.weight.zero_()
    assert torch.equal(shipped.weight, weight.to(dtype))


# -- 4. chunked fusion and restricted checks ---------------------------------------------------


def identical(a: Tensor, b: Tensor) -> bool:
    """Same dtype, shape and bits (NaNs and signed zeros included)."""
    as_int = {torch.float64: torch.int64, torch.float32: torch.int32}[a.dtype]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(as_int), b.view(as_int))


@property_settings(150)
@given(spec=block_specs(), rows=st.integers(1, 5))
def test_chunked_fusion_is_bit_identical_to_whole_tensor_fusion(spec: BlockSpec, rows: int) -> None:
    """Fusing a few output channels at a time, straight into the shipped dtype (or into a given
    buffer), gives the float64 result cast afterwards, bit for bit: the arithmetic is elementwise."""
    block = build_block(spec)
    whole = fuse_branches(block.branches, rows_per_chunk=spec.out_channels)
    assert tuple(whole.weight.shape) == fused_weight_shape(block.branches)
    for dtype in (torch.float64, torch.float32):
        chunked = fuse_branches(block.branches, dtype=dtype, rows_per_chunk=rows)
        expected = whole.to(dtype)
        assert chunked.weight.dtype == dtype and chunked.bias.dtype == dtype
        assert identical(chunked.weight, expected.weight) and identical(chunked.bias, expected.bias)
        buffer = torch.full(fused_weight_shape(block.branches), float("nan"), dtype=dtype)
        into = fuse_branches(block.branches, dtype=dtype, rows_per_chunk=rows, out=buffer)
        assert into.weight.data_ptr() == buffer.data_ptr()
        assert identical(buffer, expected.weight)


def test_fusing_into_a_buffer_of_the_wrong_shape_or_dtype_is_refused() -> None:
    branches = Branches(convs=(_conv(4, 3, 3, 3, bn=_bn(4)),), groups=1)
    with pytest.raises(ValueError, match="out= has shape"):
        fuse_branches(branches, dtype=torch.float32, out=torch.empty(4, 3, 3, 2))
    with pytest.raises(ValueError, match="out= has shape"):
        fuse_branches(branches, dtype=torch.float32, out=torch.empty(4, 3, 3, 3, dtype=F64))


@property_settings(150)
@given(spec=block_specs(), chunk=st.sampled_from([1, 2, 3, 1000]), data=st.data())
def test_centre_and_channel_restricted_forwards_equal_slices_of_the_full_ones(
    spec: BlockSpec, chunk: int, data
) -> None:
    """``centre=True`` is the full output's centre pixel and ``channels=`` its rows, for the
    train form and the fused conv alike, however the weight is split into chunks (within a
    group, or whole groups at a time)."""
    block = build_block(spec)
    stride1 = replace(block.branches, stride=(1, 1))
    fused = fuse_branches(block.branches)
    x = block.x_full[:1]
    rows = sorted(data.draw(st.sets(st.integers(0, spec.out_channels - 1), min_size=1, max_size=4)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checks_forward, "chunk_rows", lambda row_numel: chunk)
        for forward in (lambda **kw: checks.reference_forward(stride1, x, **kw),
                        lambda **kw: checks.fused_forward(fused, x, stride=(1, 1), **kw)):
            full = forward()
            h, w = full.shape[2] // 2, full.shape[3] // 2
            centre = forward(centre=True)
            assert centre.shape == (1, spec.out_channels, 1, 1)
            assert torch.allclose(centre[:, :, 0, 0], full[:, :, h, w], rtol=1e-12, atol=1e-12)
            assert torch.allclose(forward(channels=rows), full[:, rows], rtol=1e-12, atol=1e-12)
            assert torch.allclose(forward(channels=rows, centre=True)[:, :, 0, 0], full[:, rows, h, w],
                                  rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_centre_and_channels_with_padding_modes_and_cropped_branches(mode: str) -> None:
    """Padding modes and an ACNet-style cropped branch (negative padding) restrict exactly too."""
    gen = torch.Generator().manual_seed(7)
    square = ConvBranch(weight=torch.randn(6, 3, 3, 3, generator=gen, dtype=F64), bn=_bn(6))
    crop = ConvBranch(weight=torch.randn(6, 3, 1, 3, generator=gen, dtype=F64), bn=_bn(6), padding=(0, 1))
    point = ConvBranch(weight=torch.randn(6, 3, 1, 1, generator=gen, dtype=F64), bn=_bn(6))
    branches = Branches(convs=(square, crop, point), groups=2, padding=(1, 1), padding_mode=mode)
    fused = fuse_branches(branches)
    x = checks.block_probe(6, (3, 3), (1, 1), 3, padding=(1, 1), padding_mode=mode)
    full = checks.reference_forward(branches, x)
    h, w = full.shape[2] // 2, full.shape[3] // 2
    assert torch.allclose(checks.reference_forward(branches, x, centre=True)[:, :, 0, 0], full[:, :, h, w],
                          rtol=1e-12, atol=1e-12)
    assert torch.allclose(checks.reference_forward(branches, x, channels=[1, 4]), full[:, [1, 4]],
                          rtol=1e-12, atol=1e-12)
    assert torch.allclose(checks.fused_forward(fused, x, centre=True)[:, :, 0, 0], full[:, :, h, w],
                          rtol=1e-10, atol=1e-10)
    assert torch.allclose(checks.fused_forward(fused, x, channels=[1, 4]), full[:, [1, 4]], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels", [1, 5, 8, 9, 64, 2560])
def test_geometry_channels_spread_over_the_block(channels: int) -> None:
    rows = checks.geometry_channels(channels)
    assert rows == sorted(set(rows)) and all(0 <= r < channels for r in rows)
    assert len(rows) == min(channels, checks.GEOMETRY_CHANNELS)
    assert rows[0] == 0 and rows[-1] == channels - 1


def test_the_check_catches_a_wrong_padding_mode_seen_only_at_the_border() -> None:
    """A fused conv that pads with zeros where the block reflects agrees at the centre pixel;
    the geometry channels, compared at every position, catch it."""
    gen = torch.Generator().manual_seed(11)
    branches = Branches(convs=(ConvBranch(weight=torch.randn(16, 16, 3, 3, generator=gen, dtype=F64), bn=_bn(16)),),
                        groups=1, padding_mode="reflect")
    fused = fuse_branches(branches, dtype=torch.float32)
    good = checks.check_block("b", branches, None, fused, 0, checks.Tolerance())
    wrong = checks.check_block("b", branches, None, replace(fused, padding_mode="zeros"), 0, checks.Tolerance())
    assert good.ok and good.rel_err < 1e-6
    assert not wrong.ok and wrong.rel_err > 1e-2
    x = checks.block_probe(16, (3, 3), (1, 1), checks.block_seed(0, "b"), padding=(1, 1), padding_mode="reflect")
    centre_only = checks.compare(checks.reference_forward(branches, x, centre=True),
                                 checks.fused_forward(replace(fused, padding_mode="zeros"), x, centre=True))
    assert centre_only[0] <= 1e-5 * centre_only[1]


# -- 5. the check's centre products taken during fusion (checks.CentreProbe) --------------------


@property_settings(150)
@given(spec=block_specs(), rows=st.integers(1, 5))
def test_centre_probe_equals_the_centre_forwards_and_leaves_fusion_unchanged(spec: BlockSpec, rows: int) -> None:
    """The probe's products, taken chunk by chunk while fusing (chunks within a group or across
    groups), are the centre outputs of the train form and of the fused conv as shipped; watching
    does not change a bit of the fused weight."""
    block = build_block(spec)
    dtype = spec.dtype if spec.dtype in (torch.float32, F64) else torch.float32
    probe = checks.CentreProbe("blk", block.branches, spec.seed)
    watched = fuse_branches(block.branches, dtype=dtype, rows_per_chunk=rows, observer=probe, check_finite=False)
    plain = fuse_branches(block.branches, dtype=dtype, rows_per_chunk=rows)
    assert identical(watched.weight, plain.weight) and identical(watched.bias, plain.bias)

    reference, output = probe.outputs(watched)
    stride1 = replace(block.branches, stride=(1, 1))
    expected_reference = checks.reference_forward(stride1, probe.x, centre=True)
    expected_output = checks.fused_forward(watched, probe.x, stride=(1, 1), centre=True)
    # a block with an identity BN is also probed with a sample drawn from that BN's statistics
    samples = 2 if block.branches.identity is not None and block.branches.identity.bn is not None else 1
    assert reference.shape == output.shape == (samples, spec.out_channels, 1, 1)
    assert torch.allclose(reference, expected_reference, rtol=1e-12, atol=1e-12)
    assert torch.allclose(output, expected_output, rtol=1e-12, atol=1e-12)
    # the probe's input is check_block's own: the same verdict and numbers
    with_probe = checks.check_block("blk", block.branches, None, watched, spec.seed, checks.Tolerance(), probe)
    without = checks.check_block("blk", block.branches, None, watched, spec.seed, checks.Tolerance())
    assert with_probe.ok and without.ok
    assert with_probe.scale == pytest.approx(without.scale, rel=1e-12)
    assert with_probe.max_abs_err == pytest.approx(without.max_abs_err, rel=1e-6, abs=1e-12 * without.scale)


def _probe_block(weight_value: float | None = None, var: float = 1.0) -> Branches:
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(8, 4, 3, 3, generator=gen, dtype=F64)
    if weight_value is not None:
        weight[3, 1, 2, 0] = weight_value
    point = torch.randn(8, 4, 1, 1, generator=gen, dtype=F64)
    bn = replace(_bn(8, torch.full((8,), var, dtype=F64)), eps=1e-5 if var >= 1e-5 else 0.0)
    return Branches(convs=(ConvBranch(weight=weight, bn=bn), ConvBranch(weight=point, bn=_bn(8))), groups=2)


def test_centre_probe_reference_is_independent_of_the_folding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fusion that folds BN wrongly is caught with the probe too: the probe only multiplies
    the raw upcast weights, the BN is the reference's own ``batch_norm``."""
    from repvgg_cli.fusion import sum as fusion_sum

    branches = _probe_block()
    honest = checks.CentreProbe("b", branches, 0)
    fused = fuse_branches(branches, dtype=torch.float32, observer=honest, check_finite=False)
    assert checks.check_block("b", branches, None, fused, 0, checks.Tolerance(), honest).ok

    real = fusion_sum.bn_scale_shift
    monkeypatch.setattr(fusion_sum, "bn_scale_shift", lambda *a, **k: tuple(t * 1.001 for t in real(*a, **k)))
    probe = checks.CentreProbe("b", branches, 0)
    wrong = fuse_branches(branches, dtype=torch.float32, observer=probe, check_finite=False)
    caught = checks.check_block("b", branches, None, wrong, 0, checks.Tolerance(), probe)
    assert not caught.ok and caught.rel_err > 1e-4


def test_centre_probe_refuses_rows_fusion_did_not_show() -> None:
    branches = _probe_block()
    probe = checks.CentreProbe("b", branches, 0)
    fused = fuse_branches(branches, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="rows of 8"):
        probe.outputs(fused)  # nothing was shown
    probe = checks.CentreProbe("b", branches, 0)
    scratch = torch.empty(3, 4, 3, 3, dtype=F64)
    probe.fused(0, 3, fused.weight[0:3], scratch)
    for index, conv in enumerate(branches.convs):
        probe.source(index, 0, 8, conv.weight.clone())
    with pytest.raises(RuntimeError, match=r"\[8, 8, 3\] rows of 8"):
        probe.outputs(fused)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_centre_probe_takes_over_the_nan_check(value: float) -> None:
    """With ``check_finite=False`` fusion does not look; the probe's products see the value and
    its outputs raise the error fusion would have raised, naming the branch."""
    branches = _probe_block(value)
    probe = checks.CentreProbe("b", branches, 0)
    fused = fuse_branches(branches, dtype=torch.float32, observer=probe, check_finite=False)
    with pytest.raises(InputError, match="branch 0 weight holds NaN or Inf"):
        probe.outputs(fused)
    with pytest.raises(InputError, match="branch 0 weight holds NaN or Inf"):
        fuse_branches(branches, dtype=torch.float32)


def test_centre_probe_reports_a_weight_that_overflows_the_shipped_dtype() -> None:
    """Finite float64 weights whose fused value exceeds float32's range ship as Inf: an input
    error (the BN scale is absurd), not a silent Inf in the deploy file."""
    branches = _probe_block(1e30, var=1e-24)  # BN scale 1e12: 1e42 > float32 max
    probe = checks.CentreProbe("b", branches, 0)
    fused = fuse_branches(branches, dtype=torch.float32, observer=probe, check_finite=False)
    assert not torch.isfinite(fused.weight).all()
    with pytest.raises(InputError, match="overflows"):
        probe.outputs(fused)
