"""Exactness at scale: padding modes, eps and dtypes; the cast error convert reports; deep networks.

tests/test_fusion.py draws 1,400 random zero-padded blocks. This file draws the configurations it
does not cover: every ``padding_mode`` (zeros, reflect, replicate, circular) with smaller kernels
centred inside larger ones (5x5 + 3x3, 1xk / kx1, 1x1 with extra padding), BN eps from 0 to 10,
and every source dtype. The ground truth is always a float64 train-form block of real
``nn.Conv2d(padding_mode=...)`` and eval-mode ``nn.BatchNorm2d`` modules.

Why reflect/replicate/circular fuse exactly: each of them extends the input by a rule that does
not depend on how much is padded (pixel ``-j`` is pixel ``j`` for reflect, pixel ``0`` for
replicate, pixel ``n - j`` for circular), so a k×k branch padded by ``p = P - (K - k) / 2`` reads
the same pixels as the centred k×k taps of the K×K kernel padded by ``P``. A 1×1 branch with
padding 0 never pads. Two *different* modes on branches that pad are not equivalent at the
border: fusion refuses that (UnsupportedError, exit 3).
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from repvgg_cli import checks
from repvgg_cli.api import ConvertOptions, convert_state_dict, reparameterize
from repvgg_cli.errors import UnsupportedError
from repvgg_cli.fusion.values import (
    BatchNorm,
    Branches,
    ConvBranch,
    IdentityBranch,
)
from repvgg_cli.fusion.sum import fuse_branches
from tests import zoo
from tests.helpers import invoke

F64 = torch.float64
MODES = ("zeros", "reflect", "replicate", "circular")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
EXACT = 1e-10  # float64 fusion against the float64 modules: rounding only
PROPERTY_EXAMPLES = 200
WORST: dict[str, float] = {}
"""Worst relative error of the shipped conv against the float64 modules, by dtype (for reports)."""


def rel_error(reference: Tensor, candidate: Tensor) -> float:
    """``max|reference - candidate| / max|reference|`` in float64; inf when not finite."""
    assert reference.shape == candidate.shape, (tuple(reference.shape), tuple(candidate.shape))
    reference, candidate = reference.to(F64), candidate.to(F64)
    scale = float(reference.abs().max())
    assert math.isfinite(scale) and scale > 0.0
    if not torch.isfinite(candidate).all():
        return math.inf
    return float((reference - candidate).abs().max()) / scale


# -- 1. random blocks with padding modes ----------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    mode: str
    k: int
    dilation: int
    stride: int
    groups: int
    in_per_group: int
    out_per_group: int
    kernels: tuple[tuple[int, int], ...]
    conv_bias: tuple[bool, ...]
    branch_mode_given: tuple[bool, ...]
    explicit_padding: tuple[bool, ...]
    identity: bool
    extra_padding: int
    eps: tuple[float, ...]  # one per BN: the conv branches', then the identity's
    dtype: torch.dtype
    height: int
    width: int
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
        return tuple(self.padding - self.dilation * (self.k - kb) // 2 for kb in kernel)  # type: ignore[return-value]


# log-uniform from 1e-12 to 10, and exactly 0 now and then (allowed: every running_var here is > 0)
EPS = st.tuples(st.integers(-13, 0), st.floats(1.0, 9.99)).map(lambda t: 0.0 if t[0] == -13 else t[1] * 10.0 ** t[0])


@st.composite
def specs(draw) -> Spec:
    mode = draw(st.sampled_from(MODES))
    k = draw(st.sampled_from([1, 3, 5, 7]))
    dilation = draw(st.sampled_from([1, 1, 2]))
    identity = draw(st.booleans())
    stride = 1 if identity else draw(st.sampled_from([1, 2]))
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if kind == "dense":
        groups, in_pg = 1, draw(st.integers(1, 6))
        out_pg = in_pg if identity else draw(st.integers(1, 6))
    elif kind == "grouped":
        groups, in_pg = draw(st.integers(2, 3)), draw(st.integers(1, 3))
        out_pg = in_pg if identity else draw(st.integers(1, 3))
    else:
        groups, in_pg, out_pg = draw(st.integers(2, 6)), 1, 1
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
    n = len(kernels)
    extra = 0 if identity else draw(st.sampled_from([0, 0, 1, 2]))
    padding = dilation * (k // 2) + extra
    # reflect needs padding < size, circular padding <= size: both hold from padding + 1 on
    low = 1 if mode == "zeros" else padding + 1
    return Spec(
        mode=mode, k=k, dilation=dilation, stride=stride, groups=groups, in_per_group=in_pg, out_per_group=out_pg,
        kernels=tuple(kernels),
        conv_bias=tuple(draw(st.booleans()) for _ in range(n)),
        branch_mode_given=tuple(draw(st.booleans()) for _ in range(n)),
        explicit_padding=tuple(draw(st.booleans()) for _ in range(n)),
        identity=identity, extra_padding=extra,
        eps=tuple(draw(EPS) for _ in range(n + 1)),
        dtype=draw(st.sampled_from(DTYPES)),
        height=draw(st.integers(low, max(low, 9))),
        width=draw(st.integers(low, max(low, 9))),
        seed=draw(st.integers(0, 2**63 - 1)),
    )


def real_bn(gen: torch.Generator, channels: int, eps: float, dtype: torch.dtype) -> tuple[BatchNorm, nn.BatchNorm2d]:
    """Random eval statistics over a wide range (var 1e-3 .. 10), as the source dtype holds them."""
    mean = (0.5 * torch.randn(channels, generator=gen, dtype=F64)).to(dtype)
    var = (10.0 ** (-3.0 + 4.0 * torch.rand(channels, generator=gen, dtype=F64))).to(dtype)
    gamma = (1.0 + 0.3 * torch.randn(channels, generator=gen, dtype=F64)).to(dtype)
    beta = (0.5 * torch.randn(channels, generator=gen, dtype=F64)).to(dtype)
    module = nn.BatchNorm2d(channels, eps=eps).to(F64).eval()
    with torch.no_grad():
        for target, value in ((module.running_mean, mean), (module.running_var, var),
                              (module.weight, gamma), (module.bias, beta)):
            target.copy_(value.to(F64))
    return BatchNorm(running_mean=mean, running_var=var, eps=eps, weight=gamma, bias=beta), module


class TrainForm(nn.Module):
    """``sum_b bn_b(conv_b(x)) [+ bn_id(x)]`` from real modules."""

    def __init__(self, pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]], identity: nn.BatchNorm2d | None) -> None:
        super().__init__()
        self.convs = nn.ModuleList([c for c, _ in pairs])
        self.bns = nn.ModuleList([b for _, b in pairs])
        self.identity = identity

    def forward(self, x: Tensor) -> Tensor:
        total = sum(bn(conv(x)) for conv, bn in zip(self.convs, self.bns))
        return total + self.identity(x) if self.identity is not None else total


def build(spec: Spec) -> tuple[Branches, TrainForm, torch.Generator]:
    gen = torch.Generator().manual_seed(spec.seed)
    cin, cout, d = spec.in_channels, spec.out_channels, spec.dilation
    branches, pairs = [], []
    for index, kernel in enumerate(spec.kernels):
        weight = torch.randn(cout, spec.in_per_group, *kernel, generator=gen, dtype=F64).to(spec.dtype)
        bias = (0.5 * torch.randn(cout, generator=gen, dtype=F64)).to(spec.dtype) if spec.conv_bias[index] else None
        bn, bn_module = real_bn(gen, cout, spec.eps[index], spec.dtype)
        padding = spec.branch_padding(kernel)
        dilation = (1, 1) if kernel == (1, 1) else (d, d)
        conv = nn.Conv2d(cin, cout, kernel, stride=spec.stride, padding=padding, dilation=dilation,
                         groups=spec.groups, bias=bias is not None, padding_mode=spec.mode).to(F64).eval()
        with torch.no_grad():
            conv.weight.copy_(weight.to(F64))
            if bias is not None:
                conv.bias.copy_(bias.to(F64))
        pairs.append((conv, bn_module))
        branches.append(ConvBranch(
            weight=weight, bias=bias, bn=bn, dilation=dilation,
            padding=padding if spec.explicit_padding[index] else None,
            padding_mode=spec.mode if spec.branch_mode_given[index] else None,
        ))
    identity, identity_module = None, None
    if spec.identity:
        identity_bn, identity_module = real_bn(gen, cout, spec.eps[-1], spec.dtype)
        identity = IdentityBranch(bn=identity_bn)
    description = Branches(
        convs=tuple(branches), identity=identity, groups=spec.groups, stride=(spec.stride, spec.stride),
        padding=(spec.padding, spec.padding), dilation=(d, d), padding_mode=spec.mode, in_channels=cin,
    )
    return description, TrainForm(pairs, identity_module).eval(), gen


def deploy_conv(fused, dtype_of_weights: torch.dtype | None = None) -> nn.Conv2d:
    """The fused conv as a real float64 ``nn.Conv2d`` holding exactly the given tensors."""
    conv = nn.Conv2d(fused.in_channels, fused.out_channels, fused.kernel_size, stride=fused.stride,
                     padding=fused.padding, dilation=fused.dilation, groups=fused.groups, bias=True,
                     padding_mode=fused.padding_mode).to(F64).eval()
    with torch.no_grad():
        conv.weight.copy_(fused.weight.to(F64))
        conv.bias.copy_(fused.bias.to(F64))
    return conv


@settings(max_examples=PROPERTY_EXAMPLES, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=specs())
def test_padding_modes_eps_and_dtypes_fuse_exactly(spec: Spec) -> None:
    branches, module, gen = build(spec)
    fused = fuse_branches(branches)
    assert fused.padding_mode == spec.mode
    assert fused.padding == (spec.padding, spec.padding)
    assert tuple(fused.weight.shape) == (spec.out_channels, spec.in_per_group, spec.k, spec.k)
    shipped = fused.to(spec.dtype)
    exact, cast = deploy_conv(fused), deploy_conv(shipped)
    rtol = checks.default_rtol(spec.dtype)

    side = spec.dilation * (spec.k - 1) + 3  # every tap meets real pixels somewhere
    for x in (torch.randn(2, spec.in_channels, spec.height, spec.width, generator=gen, dtype=F64),
              torch.randn(1, spec.in_channels, side, side, generator=gen, dtype=F64)):
        with torch.no_grad():
            truth, out64, out_cast = module(x), exact(x), cast(x)
        assert rel_error(truth, checks.reference_forward(branches, x)) <= EXACT
        assert rel_error(truth, out64) <= EXACT
        err = rel_error(truth, out_cast)
        assert err <= rtol, f"{spec.dtype}: {err:.3e} > {rtol:g}"
        if spec.dtype != F64:  # the cast is real: it moves the output a little, within the tolerance
            assert rel_error(out64, out_cast) > 0.0
        assert rel_error(out_cast, checks.fused_forward(shipped, x)) <= 1e-12
        WORST[str(spec.dtype)] = max(WORST.get(str(spec.dtype), 0.0), err)

    check = checks.check_block("blk", branches, fused, shipped, spec.seed % 1000, checks.Tolerance())
    assert check.problem is None and check.ok, (check.rel_err, check.rtol)
    assert check.rtol == rtol
    probe_seed = spec.seed % 997
    assert rel_error(checks.reference_probe(branches, probe_seed), checks.fused_probe(fused, probe_seed)) <= EXACT


# -- 1b. what is not equivalent is refused -------------------------------------------------------


def mixed_block(main_mode: str, other_mode: str, k: int, small: int, extra: int) -> tuple[Branches, TrainForm]:
    """A ``k×k`` branch padded with ``main_mode`` and a centred ``small×small`` one with ``other_mode``."""
    gen = torch.Generator().manual_seed(k * 100 + small * 10 + extra)
    pairs, convs = [], []
    padding = k // 2 + extra
    for kernel, mode in ((k, main_mode), (small, other_mode)):
        p = padding - (k - kernel) // 2
        conv = nn.Conv2d(3, 4, kernel, padding=p, bias=False, padding_mode=mode).to(F64).eval()
        bn, bn_module = real_bn(gen, 4, 1e-5, F64)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=F64))
        pairs.append((conv, bn_module))
        convs.append(ConvBranch(weight=conv.weight.detach().clone(), bn=bn, padding=(p, p), padding_mode=mode))
    branches = Branches(convs=tuple(convs), groups=1, padding=(padding, padding), padding_mode=main_mode,
                        in_channels=3, geometry_known=True)
    return branches, TrainForm(pairs, None).eval()


MODE_PAIRS = [(a, b) for a in MODES for b in MODES if a != b]


@pytest.mark.parametrize(("main_mode", "other_mode"), MODE_PAIRS)
@pytest.mark.parametrize(("k", "small", "extra"), [(5, 3, 0), (3, 1, 1), (7, 3, 0)])
def test_two_padding_modes_that_both_pad_are_refused(main_mode: str, other_mode: str, k: int, small: int,
                                                    extra: int) -> None:
    branches, module = mixed_block(main_mode, other_mode, k, small, extra)
    with pytest.raises(UnsupportedError, match=re.escape(
            f"pads with padding_mode={other_mode!r} but the block's main conv with {main_mode!r}")) as caught:
        fuse_branches(branches)
    assert caught.value.exit_code == 3
    # and refusing is right: no single-mode conv reproduces the block at the border
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=F64)
    with torch.no_grad():
        truth = module(x)
    for mode in (main_mode, other_mode):
        forced = Branches(**{**branches.__dict__, "padding_mode": mode,
                             "convs": tuple(ConvBranch(**{**c.__dict__, "padding_mode": None}) for c in branches.convs)})
        with torch.no_grad():
            assert rel_error(truth, deploy_conv(fuse_branches(forced))(x)) > 1e-3


@pytest.mark.parametrize(("main_mode", "other_mode"), MODE_PAIRS)
def test_a_branch_that_does_not_pad_may_have_any_mode(main_mode: str, other_mode: str) -> None:
    branches, module = mixed_block(main_mode, other_mode, 3, 1, 0)  # the 1x1 has padding 0
    fused = fuse_branches(branches)
    assert fused.padding_mode == main_mode
    x = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(6), dtype=F64)
    with torch.no_grad():
        assert rel_error(module(x), deploy_conv(fused)(x)) <= EXACT


# -- 1c. padding modes end to end: module tree, CLI, recorded probes ------------------------------


def block_with_mode(cin: int, cout: int, mode: str, padding: int = 1, stride: int = 1) -> zoo.OfficialBlock:
    """An official-layout block whose branches pad with ``mode`` (``padding`` > 1: extra padding)."""
    block = zoo.OfficialBlock(cin, cout, 3, stride)
    block.rbr_dense.conv = nn.Conv2d(cin, cout, 3, stride, padding, bias=False, padding_mode=mode)
    block.rbr_1x1.conv = nn.Conv2d(cin, cout, 1, stride, padding - 1, bias=False, padding_mode=mode)
    return block


def padded_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        block_with_mode(3, 8, "reflect", stride=2),
        block_with_mode(8, 8, "replicate"),
        block_with_mode(8, 8, "circular"),
        # reflect padding 3 around a 3x3 kernel: more than the 3x3 per-block probe can reflect
        block_with_mode(8, 12, "reflect", padding=3),
        block_with_mode(12, 12, "zeros"),
    )
    return zoo.randomize_bn(net, seed=3)


def test_padding_modes_through_the_module_tree_and_the_cli(tmp_path: Path) -> None:
    train = padded_net().eval()
    x = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = train(x)
    result = reparameterize(copy.deepcopy(train), ConvertOptions(input_shape=(2, 3, 20, 20)))
    assert result.ok and len(result.blocks) == 5
    assert [result.model[i].rbr_reparam.padding_mode for i in range(5)] == [
        "reflect", "replicate", "circular", "reflect", "zeros"]
    assert result.model[3].rbr_reparam.padding == (3, 3)
    assert result.model_check is not None and result.model_check.rel_err < 1e-6
    with torch.no_grad():
        assert rel_error(want, result.model(x)) < 1e-5

    source, output = tmp_path / "padded.pt", tmp_path / "deploy.safetensors"
    torch.save(train, source)
    converted = invoke("convert", source, output, "--allow-pickle", "--input-shape", "2,3,20,20", "--json")
    assert converted.exit_code == 0, converted.stderr
    assert json.loads(converted.stdout)["model_check"]["ok"] is True
    verified = invoke("verify", output, "--json")  # the recorded probes of reflect/circular blocks
    assert verified.exit_code == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["failed_blocks"] == []


def test_mixed_padding_modes_are_exit_3_on_the_cli(tmp_path: Path) -> None:
    net = padded_net()
    net[3].rbr_1x1.conv.padding_mode = "zeros"  # padding 2, zeros, beside a reflect 3x3: not one conv
    source = tmp_path / "mixed.pt"
    torch.save(net, source)
    result = invoke("convert", source, tmp_path / "out.safetensors", "--allow-pickle", "--input-shape", "1,3,16,16")
    assert result.exit_code == 3, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: ") and errors[0].endswith(
        "block 3: branch 1 (1x1) pads with padding_mode='zeros' but the block's main conv with 'reflect'; "
        "one fused conv has one padding mode")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed.pt"]


# -- 2. fp16 / bf16: the cast error convert reports -----------------------------------------------


def tiny_state(dtype: torch.dtype) -> dict[str, Tensor]:
    torch.manual_seed(0)
    model = zoo.randomize_bn(zoo.repvgg("tiny", num_classes=10), seed=1)
    model = model.half() if dtype == torch.float16 else model.bfloat16()
    return model.state_dict()


def measured_cast_errors(state: dict[str, Tensor], deploy: dict[str, Tensor], seed: int = 0) -> dict[str, tuple[float, float]]:
    """Per block: ``(max|train64 - shipped|, max|train64|)`` on convert's probe input, measured here
    where convert compares: every channel at the centre pixel, the geometry channels everywhere.

    The train form is the zoo block's own modules in float64 (stride 1, as convert checks), the
    shipped conv an ``nn.Conv2d`` holding the written half tensors upcast exactly.
    """
    model = zoo.repvgg("tiny", num_classes=10)
    model.load_state_dict(state)
    model = model.double().eval()
    errors = {}
    for name, block in model.named_modules():
        if not isinstance(block, zoo.OfficialBlock):
            continue
        block = copy.deepcopy(block)
        for conv in (block.rbr_dense.conv, block.rbr_1x1.conv):
            conv.stride = (1, 1)
        weight, bias = deploy[f"{name}.rbr_reparam.weight"], deploy[f"{name}.rbr_reparam.bias"]
        groups = block.rbr_dense.conv.groups
        shipped = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], 3, 1, 1, groups=groups).double()
        with torch.no_grad():
            shipped.weight.copy_(weight.double())
            shipped.bias.copy_(bias.double())
        probe_seed = checks.block_seed(seed, name)
        x = torch.randn(1, shipped.in_channels, 3, 3, generator=torch.Generator().manual_seed(probe_seed), dtype=F64)
        if block.rbr_identity is not None:  # a second sample drawn from the identity BN's statistics
            z = torch.randn(1, shipped.in_channels, 3, 3, generator=torch.Generator().manual_seed(probe_seed + 1),
                            dtype=F64)
            mean = block.rbr_identity.running_mean.reshape(1, -1, 1, 1)
            std = block.rbr_identity.running_var.sqrt().reshape(1, -1, 1, 1)
            x = torch.cat([x, mean + std * z])
        with torch.no_grad():
            train = block.rbr_dense(x) + block.rbr_1x1(x)
            if block.rbr_identity is not None:
                train = train + block.rbr_identity(x)
            rows = checks.geometry_channels(shipped.out_channels)
            seen = torch.cat([train[:, :, 1, 1].flatten(), train[:, rows].flatten()])
            diff = (train - shipped(x)).abs()
            errors[name] = (float(torch.cat([diff[:, :, 1, 1].flatten(), diff[:, rows].flatten()]).max()),
                            float(seen.abs().max()))
    return errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_cast_error_is_what_convert_reports(tmp_path: Path, dtype: torch.dtype) -> None:
    state = tiny_state(dtype)
    assert state["stage0.rbr_dense.conv.weight"].dtype == dtype
    result = convert_state_dict(state)
    assert result.ok and len(result.blocks) == 7
    measured = measured_cast_errors(state, dict(result.state_dict))
    assert sorted(measured) == sorted(r.block.name for r in result.blocks)
    rtol = checks.default_rtol(dtype)
    for r in result.blocks:
        err, scale = measured[r.block.name]
        assert r.fused.weight.dtype == dtype
        assert 0.0 < r.check.cast_abs_err == pytest.approx(err, rel=0, abs=1e-12)
        assert r.check.scale == pytest.approx(scale, rel=1e-12)
        assert 0.0 < r.check.cast_abs_err / r.check.scale < rtol
    worst = max(err / scale for err, scale in measured.values())
    WORST[f"convert tiny {dtype}"] = worst

    # the CLI: the JSON numbers and the line under the table
    source = tmp_path / "tiny_half.pt"
    torch.save(state, source)
    document = json.loads(invoke("convert", source, tmp_path / "a.safetensors", "--json").stdout)
    assert document["ok"] is True
    for block in document["blocks"]:
        err, scale = measured[block["name"]]
        assert block["dtype"] == str(dtype).replace("torch.", "")
        assert block["cast_abs_err"] == pytest.approx(err, rel=0, abs=1e-12)
        assert block["max_abs_err"] == pytest.approx(err, rel=0, abs=1e-12)  # the cast is all the error
    table = invoke("convert", source, tmp_path / "b.safetensors")
    assert table.exit_code == 0, table.stderr
    line = f"written as {str(dtype).replace('torch.', '')}: the cast from float64 adds up to {worst:.1e} relative error"
    assert line in table.stdout.splitlines()
    assert invoke("verify", tmp_path / "b.safetensors").exit_code == 0


# -- 3. whole networks of 22 blocks with statistics from real activations --------------------------


def trained_repvgg(seed: int = 0) -> zoo.RepVGG:
    """A narrow RepVGG-A layout (2, 4, 14, 1 blocks + stem = 22) whose BN statistics come from data.

    Running statistics are gathered in train mode with ``momentum=None`` (the exact average over
    the batches); gamma and beta are then randomised so no BN is the identity.
    """
    torch.manual_seed(seed)
    model = zoo.RepVGG(num_blocks=(2, 4, 14, 1), width=(0.25, 0.5), num_classes=10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32, generator=gen) * 1.5 + 0.2)
        for bn in bns:
            bn.momentum = 0.1
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
            bn.bias.copy_(0.3 * torch.randn(bn.num_features, generator=gen))
    return model.eval()


def eval_output(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_a_22_block_network_is_exact_in_both_trees() -> None:
    train = trained_repvgg()
    blocks = [m for m in train.modules() if isinstance(m, zoo.OfficialBlock)]
    assert len(blocks) == 22
    # the statistics are real: far from the fresh (0, 1) and different per channel
    var = blocks[10].rbr_dense.bn.running_var
    assert float((var - 1).abs().max()) > 0.1 and float(var.std()) > 0.01
    assert all(int(b.rbr_dense.bn.num_batches_tracked) == 3 for b in blocks)

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    want32 = eval_output(train, x)
    want64 = eval_output(copy.deepcopy(train).double(), x.double())

    # key tree: the fused state dict loads strictly into the deploy form
    result = convert_state_dict(train.state_dict())
    assert result.ok and len(result.blocks) == 22
    assert max(r.check.rel_err for r in result.blocks) < 1e-6
    deploy = zoo.RepVGG(num_blocks=(2, 4, 14, 1), width=(0.25, 0.5), num_classes=10, deploy=True)
    deploy.load_state_dict(result.state_dict, strict=True)
    key32 = rel_error(want32, eval_output(deploy, x))
    key64 = rel_error(want64, eval_output(deploy, x))
    assert key32 < 1e-5 and key64 < 1e-5

    # module tree: reparameterize in place, the model's own forward takes the fused path
    fused_model = copy.deepcopy(train)
    module_result = reparameterize(fused_model, ConvertOptions(input_shape=(2, 3, 64, 64)), inplace=True)
    assert module_result.ok and len(module_result.blocks) == 22
    assert not any(hasattr(m, "rbr_dense") for m in fused_model.modules())
    module32 = rel_error(want32, eval_output(fused_model, x))
    assert module32 < 1e-5
    assert module_result.model_check is not None and module_result.model_check.rel_err < 1e-5
    # both trees write the same fused tensors
    for key, value in result.state_dict.items():
        assert torch.equal(value, module_result.state_dict[key]), key
    WORST.update({"22 blocks key tree fp32": key32, "22 blocks key tree vs fp64": key64,
                  "22 blocks module tree fp32": module32,
                  "22 blocks whole-model check": module_result.model_check.rel_err,
                  "22 blocks worst block": max(r.check.rel_err for r in module_result.blocks)})
