"""repvgg_cli.verify, to the letter (issue 15: mutation score of verify).

The tiny sample converted once; then :func:`verify_deploy` and :func:`verify_against` called
directly on edited copies of the deploy state and metadata: each problem in its exact words,
which block a changed tensor is charged to, shapes, dtypes and NaN checks of the stored conv,
and the report's ``ok``. Hand-built blocks and plans (float64, dilated, reflect-padded, a linear
layer's 2-D weight, a root block) cover what the sample does not; the tiny sample in float16
covers the cast measured against the float64 fusion.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from repvgg_cli.api import convert_file
from repvgg_cli.checks.probe import check_block, fused_probe
from repvgg_cli.checks.tolerance import BlockCheck, ModelCheck, Tolerance, encode_tensor
from repvgg_cli.errors import InputError, RepvggError, UnsupportedError
from repvgg_cli.families.base import Block
from repvgg_cli.fusion.sum import fuse_branches
from repvgg_cli.fusion.values import BatchNorm, Branches, ConvBranch
from repvgg_cli.io.metadata import METADATA_KEY, tensor_sha256
from repvgg_cli.io.read import load_checkpoint
from repvgg_cli.pipeline.find import Plan
from repvgg_cli.pipeline.find import find as find_plan
from repvgg_cli.pipeline.options import ConvertOptions
from repvgg_cli.pipeline.read import Source
from repvgg_cli.verify import (
    VerifyReport,
    _fused_from_file,
    verify_against,
    verify_deploy,
)
from tests.helpers import SAMPLES

TINY = SAMPLES / "repvgg_tiny.pt"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> tuple[OrderedDict, dict]:
    path = tmp_path_factory.mktemp("verify") / "tiny.safetensors"
    convert_file(TINY, path)
    with safe_open(str(path), framework="pt") as handle:
        state = OrderedDict((k, handle.get_tensor(k)) for k in handle.keys())  # noqa: SIM118 - not a dict
        metadata = json.loads(handle.metadata()[METADATA_KEY])
    return state, metadata


@pytest.fixture
def tiny(deployed) -> tuple[OrderedDict, dict]:
    state, metadata = deployed
    return OrderedDict((k, v.clone()) for k, v in state.items()), copy.deepcopy(metadata)


def _record(metadata: dict, name: str) -> dict:
    return next(r for r in metadata["blocks"] if r["name"] == name)


def test_a_clean_deploy_state_passes(tiny) -> None:
    state, metadata = tiny
    report = verify_deploy(state, metadata)
    assert report.ok and report.problems == () and len(report.blocks) == len(metadata["blocks"]) == 7
    assert [b.name for b in report.blocks] == [r["name"] for r in metadata["blocks"]]
    for check in report.blocks:
        assert check.ok and check.problem is None and check.rtol == 1e-5 and check.atol == 0.0
        assert check.max_abs_err < 1e-5 * check.scale and check.scale > 0


def test_tolerance_is_passed_on(tiny) -> None:
    state, metadata = tiny
    report = verify_deploy(state, metadata, Tolerance(rtol=0.5, atol=0.25))
    assert all(b.rtol == 0.5 and b.atol == 0.25 for b in report.blocks)


def test_a_changed_block_tensor_is_charged_to_its_block(tiny) -> None:
    state, metadata = tiny
    key = "stage2.1.rbr_reparam.weight"
    state[key] = state[key].clone()
    state[key].view(-1)[0] += 1e-3
    report = verify_deploy(state, metadata)
    assert not report.ok and report.problems == ()
    bad = [b for b in report.blocks if b.problem is not None]
    assert [(b.name, b.problem) for b in bad] == [("stage2.1", f"{key} differs from what convert wrote (sha256)")]


def test_a_changed_passthrough_tensor_is_a_problem(tiny) -> None:
    state, metadata = tiny
    state["linear.bias"] = state["linear.bias"] + 1
    report = verify_deploy(state, metadata)
    assert report.problems == ("tensor linear.bias differs from what convert wrote (sha256)",)
    assert all(b.ok for b in report.blocks) and not report.ok


def test_missing_and_extra_keys(tiny) -> None:
    state, metadata = tiny
    del state["linear.weight"]
    del state["linear.bias"]
    state["extra.a"] = torch.zeros(1)
    state["extra.b"] = torch.zeros(1)
    report = verify_deploy(state, metadata)
    first = next(k for k in metadata["tensors"] if k.startswith("linear."))
    assert report.problems == (f"2 key(s) convert wrote are missing, e.g. {first}",
                               "2 key(s) convert did not write, e.g. extra.a")


def test_a_missing_block_key_fails_its_block_in_words(tiny) -> None:
    state, metadata = tiny
    del state["stage1.0.rbr_reparam.bias"]
    report = verify_deploy(state, metadata)
    bad = [b for b in report.blocks if not b.ok]
    assert len(bad) == 1 and bad[0].name == "stage1.0"
    assert bad[0].problem == "key stage1.0.rbr_reparam.bias is missing"
    assert bad[0].max_abs_err == math.inf and bad[0].scale == 0.0 and bad[0].rtol == 1e-5 and bad[0].atol == 0.0
    assert report.problems == ("1 key(s) convert wrote are missing, e.g. stage1.0.rbr_reparam.bias",)


def test_a_left_train_form_block_is_named(tiny) -> None:
    state, metadata = tiny
    source = load_checkpoint(TINY).state_dict
    for key in [k for k in source if k.startswith("stage1.0.")]:
        state[key] = source[key]
    report = verify_deploy(state, metadata)
    assert report.problems[0] == "unfused official block left: stage1.0"


def test_a_malformed_left_block_is_a_problem(tiny, monkeypatch) -> None:
    from repvgg_cli import verify as verify_module
    from repvgg_cli.errors import UnsupportedError

    def broken(state):
        raise UnsupportedError("block x: bad shapes")

    monkeypatch.setattr(verify_module, "find_blocks", broken)
    state, metadata = tiny
    report = verify_deploy(state, metadata)
    assert report.problems == ("a train-form block is left, and malformed: block x: bad shapes",)


def test_fused_from_file_refusals_in_words(tiny) -> None:
    state, metadata = tiny
    record = copy.deepcopy(_record(metadata, "stage2.1"))
    prefix = record["deploy_prefix"]
    fused, problem = _fused_from_file(state, record)
    assert problem is None and torch.equal(fused.weight, state[f"{prefix}.weight"])
    assert fused.stride == tuple(record["stride"] or (1, 1)) and fused.padding == tuple(record["padding"])
    assert fused.dilation == tuple(record["dilation"]) and fused.groups == (record.get("groups") or 1)
    assert fused.padding_mode == record.get("padding_mode", "zeros")

    s = OrderedDict(state)
    s[f"{prefix}.weight"] = s[f"{prefix}.weight"].to(torch.int64)
    assert _fused_from_file(s, record) == (None, f"key {prefix}.weight is not a floating-point tensor")
    s = OrderedDict(state)
    s[f"{prefix}.bias"] = [1.0]
    assert _fused_from_file(s, record) == (None, f"key {prefix}.bias is not a floating-point tensor")
    s = OrderedDict(state)
    s[f"{prefix}.weight"] = s[f"{prefix}.weight"][:, :, :2]
    shape = tuple(s[f"{prefix}.weight"].shape)
    expected = (record["out_channels"], record["in_per_group"], *record["kernel"])
    assert _fused_from_file(s, record) == (None, f"{prefix}.weight has shape {shape}, convert wrote {expected}")
    s = OrderedDict(state)
    s[f"{prefix}.bias"] = s[f"{prefix}.bias"][:-1]
    out = record["out_channels"]
    assert _fused_from_file(s, record) == (None, f"{prefix}.bias has shape ({out - 1},), convert wrote ({out},)")
    for part in ("weight", "bias"):
        s = OrderedDict(state)
        s[f"{prefix}.{part}"] = s[f"{prefix}.{part}"].clone()
        s[f"{prefix}.{part}"].view(-1)[-1] = float("nan")
        assert _fused_from_file(s, record) == (None, f"{prefix} holds NaN or Inf"), part
        s[f"{prefix}.{part}"].view(-1)[-1] = float("inf")
        assert _fused_from_file(s, record) == (None, f"{prefix} holds NaN or Inf"), part


def test_fused_from_file_defaults_and_root_prefix() -> None:
    weight, bias = torch.randn(2, 3, 1, 1, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    record = {"deploy_prefix": "", "groups": None, "out_channels": 2, "in_per_group": 3, "kernel": [1, 1],
              "stride": None, "padding": [0, 0], "dilation": [1, 1]}
    fused, problem = _fused_from_file({"weight": weight, "bias": bias}, record)
    assert problem is None and fused.groups == 1 and fused.stride == (1, 1) and fused.padding_mode == "zeros"
    bad = {"weight": weight, "bias": bias.clone()}
    bad["bias"][0] = float("nan")
    assert _fused_from_file(bad, record) == (None, "<root> holds NaN or Inf")
    assert _fused_from_file({"weight": weight}, record) == (None, "key bias is missing")
    grouped = dict(record, groups=2, out_channels=2, in_per_group=3, stride=[2, 1], padding_mode="reflect")
    fused, _ = _fused_from_file({"weight": weight, "bias": bias}, grouped)
    assert fused.groups == 2 and fused.stride == (2, 1) and fused.padding_mode == "reflect"


def test_fused_from_file_of_a_linear_layer() -> None:
    weight, bias = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    record = {"deploy_prefix": "fc", "groups": 1, "out_channels": 4, "in_per_group": 3, "kernel": [1, 1],
              "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "weight_shape": [4, 3]}
    fused, problem = _fused_from_file({"fc.weight": weight, "fc.bias": bias}, record)
    assert problem is None and fused.weight.shape == (4, 3, 1, 1) and torch.equal(fused.weight.view(4, 3), weight)
    as_conv = weight.view(4, 3, 1, 1)
    assert _fused_from_file({"fc.weight": as_conv, "fc.bias": bias}, record) == (
        None, "fc.weight has shape (4, 3, 1, 1), convert wrote (4, 3)")


def test_a_wrong_stored_conv_fails_its_probe(tiny) -> None:
    state, metadata = tiny
    key = "stage3.0.rbr_reparam.bias"
    state[key] = state[key] * 1.01
    metadata["tensors"][key] = tensor_sha256(state[key])  # the sha256 edited to match: the probe alone sees it
    report = verify_deploy(state, metadata)
    bad = [b for b in report.blocks if not b.ok]
    assert [b.name for b in bad] == ["stage3.0"] and bad[0].problem is None
    assert bad[0].max_abs_err > 1e-5 * bad[0].scale


def test_report_ok() -> None:
    good = BlockCheck("a", 0.0, 1.0, 1e-9, 0.0)
    bad = BlockCheck("b", 1.0, 1.0, 1e-9, 0.0)
    assert VerifyReport(blocks=(good,)).ok and VerifyReport(blocks=()).ok
    assert VerifyReport(blocks=(good, bad)).failures == (bad,) and not VerifyReport(blocks=(good, bad)).ok
    assert not VerifyReport(blocks=(good,), problems=("x",)).ok
    model_ok = ModelCheck((1,), "float64", 0.0, 1.0, 1e-9, 0.0)
    model_bad = ModelCheck((1,), "float64", 1.0, 1.0, 1e-9, 0.0)
    assert VerifyReport(blocks=(good,), model_check=model_ok).ok
    assert not VerifyReport(blocks=(good,), model_check=model_bad).ok
    report = VerifyReport(blocks=(good,))
    assert report.problems == () and report.notes == () and report.against is None and report.model_check is None


# -- against the source ----------------------------------------------------------------------------------


def _plan(options: ConvertOptions | None = None):
    source = load_checkpoint(TINY)
    return find_plan(Source(state=OrderedDict(source.state_dict), loaded=source), options or ConvertOptions())


def test_against_a_clean_deploy_state(tiny) -> None:
    state, _ = tiny
    report = verify_against(state, _plan())
    assert report.ok and report.problems == () and len(report.blocks) == 7
    assert all(b.problem is None for b in report.blocks)


def test_against_missing_changed_and_extra_keys(tiny) -> None:
    state, _ = tiny
    del state["linear.weight"]
    state["linear.bias"] = state["linear.bias"] + 1
    state["extra.a"] = torch.zeros(1)
    state["extra.b"] = torch.zeros(1)
    report = verify_against(state, _plan())
    assert report.problems == ("key linear.weight of the source is missing", "key linear.bias differs from the source",
                               "2 key(s) neither from the source nor a fused block, e.g. extra.a")


@pytest.mark.parametrize("change", ["dtype", "shape", "not a tensor"])
def test_against_a_passthrough_key_of_another_kind(tiny, change: str) -> None:
    state, _ = tiny
    value = state["linear.bias"]
    state["linear.bias"] = {"dtype": value.double(), "shape": value.reshape(1, -1),
                            "not a tensor": value.tolist()}[change]
    assert verify_against(state, _plan()).problems == ("key linear.bias differs from the source",)


def test_against_a_block_stored_in_another_dtype(tiny) -> None:
    state, _ = tiny
    prefix = "stage2.0.rbr_reparam"
    for part in ("weight", "bias"):
        state[f"{prefix}.{part}"] = state[f"{prefix}.{part}"].double()
    report = verify_against(state, _plan())
    bad = [b for b in report.blocks if not b.ok]
    assert [b.name for b in bad] == ["stage2.0"]
    assert bad[0].problem == f"{prefix} is float64, the source's blocks are written as float32 (see --dtype)"
    assert bad[0].max_abs_err == math.inf and bad[0].rtol == 1e-5


def test_against_a_missing_block_key(tiny) -> None:
    state, _ = tiny
    del state["stage4.0.rbr_reparam.weight"]
    report = verify_against(state, _plan(ConvertOptions(tolerance=Tolerance(rtol=0.1, atol=0.5))))
    bad = [b for b in report.blocks if not b.ok]
    assert [(b.name, b.problem, b.rtol, b.atol) for b in bad] == [
        ("stage4.0", "key stage4.0.rbr_reparam.weight is missing", 0.1, 0.5)]


def test_against_a_changed_block(tiny) -> None:
    state, _ = tiny
    key = "stage3.1.rbr_reparam.weight"
    state[key] = state[key] * 1.01
    report = verify_against(state, _plan())
    bad = [b for b in report.blocks if not b.ok]
    assert [b.name for b in bad] == ["stage3.1"]


def test_against_a_half_precision_deploy(tmp_path: Path) -> None:
    path = tmp_path / "half.safetensors"
    convert_file(TINY, path, options=ConvertOptions(dtype="float16"))
    with safe_open(str(path), framework="pt") as handle:
        state = OrderedDict((k, handle.get_tensor(k)) for k in handle.keys())  # noqa: SIM118
    report = verify_against(state, _plan(ConvertOptions(dtype="float16")))
    assert report.ok, report
    assert all(b.rtol == 4e-3 for b in report.blocks)
    assert all(b.cast_abs_err > 0 for b in report.blocks)  # the cast measured against the float64 fusion


# -- synthetic blocks: geometry the tiny sample does not have ----------------------------------------------
# A hand-built plan (one Block per case: its branches, deploy prefix, dtype, linear weight shape) and the
# deploy state convert would write for it, so each record field verify_against derives is exercised.


def _bn(channels: int, generator: torch.Generator, dtype: torch.dtype) -> BatchNorm:
    def rand(low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(channels, generator=generator, dtype=torch.float64)).to(dtype)

    return BatchNorm(running_mean=rand(-0.5, 0.5), running_var=rand(0.5, 2.0), eps=1e-5,
                     weight=rand(0.5, 1.5), bias=rand(-0.3, 0.3))


def _synthetic_block(name: str, prefix: str, *, kernel: int = 3, cin: int = 3, cout: int = 4,
                     dilation: tuple[int, int] = (1, 1), padding_mode: str = "zeros",
                     dtype: torch.dtype = torch.float64, weight_shape: tuple[int, ...] | None = None,
                     seed: int = 0) -> Block:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(cout, cin, kernel, kernel, generator=generator, dtype=torch.float64).to(dtype)
    branches = Branches(convs=(ConvBranch(weight=weight, bn=_bn(cout, generator, dtype), dilation=dilation),),
                        dilation=dilation, padding_mode=padding_mode)
    keys = tuple(f"{name}.conv.{part}" for part in ("weight", "bn.running_mean", "bn.running_var", "bn.weight",
                                                    "bn.bias"))
    return Block(name=name, family="synthetic", branches=branches, source_keys=keys, deploy_prefix=prefix,
                 dtype=dtype, weight_shape=weight_shape)


def _synthetic_plan(*blocks: Block, extra: dict | None = None,
                    options: ConvertOptions | None = None) -> tuple[Plan, OrderedDict]:
    """The plan of a source holding ``blocks`` (and ``extra`` passthrough keys), and its deploy state."""
    source: OrderedDict = OrderedDict()
    deploy: OrderedDict = OrderedDict()
    for block in blocks:
        conv = block.branches.convs[0]
        values = (conv.weight, conv.bn.running_mean, conv.bn.running_var, conv.bn.weight, conv.bn.bias)
        source.update(zip(block.source_keys, values))
        deploy.update(block.deploy_state(fuse_branches(block.branches, dtype=block.dtype)))
    for key, value in (extra or {}).items():
        source[key] = value
        if isinstance(value, torch.Tensor):
            deploy[key] = value.clone()
    plan = Plan(source=Source(state=source), options=options or ConvertOptions(), blocks=list(blocks))
    return plan, deploy


def test_fused_from_file_keeps_the_recorded_dilation() -> None:
    weight, bias = torch.randn(2, 3, 3, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    record = {"deploy_prefix": "c", "groups": 1, "out_channels": 2, "in_per_group": 3, "kernel": [3, 3],
              "stride": [1, 1], "padding": [2, 3], "dilation": [2, 3]}
    fused, problem = _fused_from_file({"c.weight": weight, "c.bias": bias}, record)
    assert problem is None and fused.dilation == (2, 3) and fused.padding == (2, 3)


def test_against_a_clean_synthetic_source_passes_in_float64() -> None:
    block = _synthetic_block("a", "a.conv")
    plan, deploy = _synthetic_plan(block, extra={"head.bias": torch.randn(4, dtype=torch.float64)})
    report = verify_against(deploy, plan)
    assert report.ok and report.problems == () and [b.name for b in report.blocks] == ["a"]
    check = report.blocks[0]
    assert check.problem is None and check.rtol == 1e-9 and check.atol == 0.0
    assert check.max_abs_err <= 1e-12 * check.scale and check.scale > 0


def test_against_a_dilated_block() -> None:
    """The shipped conv is read with the dilation the source block has: with 1 its probe would differ."""
    block = _synthetic_block("d", "d.conv", dilation=(2, 2))
    plan, deploy = _synthetic_plan(block)
    report = verify_against(deploy, plan)
    assert report.ok and report.blocks[0].max_abs_err <= 1e-12 * report.blocks[0].scale


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_against_a_block_with_another_padding_mode(mode: str) -> None:
    """The shipped conv pads as the source block does (read as zeros, its border outputs would differ)."""
    block = _synthetic_block("p", "p.conv", padding_mode=mode)
    plan, deploy = _synthetic_plan(block)
    report = verify_against(deploy, plan)
    assert report.ok, report
    assert report.blocks[0].max_abs_err <= 1e-12 * report.blocks[0].scale


def test_against_a_linear_layer_block() -> None:
    """A block whose deploy weight is a linear layer's (out, in): read back as the 1x1 conv it is."""
    block = _synthetic_block("fc", "fc", kernel=1, cin=3, cout=5, weight_shape=(5, 3))
    plan, deploy = _synthetic_plan(block)
    assert deploy["fc.weight"].shape == (5, 3)
    report = verify_against(deploy, plan)
    assert report.ok and report.problems == () and report.blocks[0].problem is None
    deploy["fc.weight"] = deploy["fc.weight"].reshape(5, 3, 1, 1)  # a conv's 4-D weight where a linear's was
    report = verify_against(deploy, plan)
    assert [b.problem for b in report.blocks] == ["fc.weight has shape (5, 3, 1, 1), convert wrote (5, 3)"]


def test_against_a_missing_float64_block_key() -> None:
    """A block that cannot be read fails with an infinite error, scale 0 and its dtype's rtol."""
    first, second = _synthetic_block("a", "a.conv", seed=1), _synthetic_block("b", "b.conv", seed=2)
    plan, deploy = _synthetic_plan(first, second)
    del deploy["a.conv.bias"]
    report = verify_against(deploy, plan)
    assert report.blocks[0] == BlockCheck("a", math.inf, 0.0, 1e-9, 0.0, problem="key a.conv.bias is missing")
    assert report.blocks[1].name == "b" and report.blocks[1].ok and report.problems == ()


def test_against_a_float64_block_stored_as_float32_and_the_blocks_after_it() -> None:
    """The dtype refusal in full (inf, scale 0, the source dtype's rtol, the atol given); later blocks are still checked."""
    first, second = _synthetic_block("a", "a.conv", seed=1), _synthetic_block("b", "b.conv", seed=2)
    plan, deploy = _synthetic_plan(first, second)
    for part in ("weight", "bias"):
        deploy[f"a.conv.{part}"] = deploy[f"a.conv.{part}"].float()
    report = verify_against(deploy, plan)
    problem = "a.conv is float32, the source's blocks are written as float64 (see --dtype)"
    assert report.blocks[0] == BlockCheck("a", math.inf, 0.0, 1e-9, 0.0, problem=problem)
    assert len(report.blocks) == 2 and report.blocks[1].name == "b" and report.blocks[1].ok
    plan, deploy = _synthetic_plan(first, second, options=ConvertOptions(tolerance=Tolerance(atol=0.125)))
    deploy["a.conv.weight"] = deploy["a.conv.weight"].float()
    report = verify_against(deploy, plan)
    assert report.blocks[0] == BlockCheck("a", math.inf, 0.0, 1e-9, 0.125, problem=problem)


def test_against_a_source_value_that_is_not_a_tensor() -> None:
    """A non-tensor source entry is compared as it is (no dtype cast): absent, or anything in its place."""
    block = _synthetic_block("a", "a.conv")
    plan, deploy = _synthetic_plan(block, extra={"epoch": 7})
    assert verify_against(deploy, plan).problems == ("key epoch of the source is missing",)
    deploy["epoch"] = torch.tensor(7)
    assert verify_against(deploy, plan).problems == ("key epoch differs from the source",)


def test_against_seeds_the_probes_with_0_by_default(tiny) -> None:
    state, _ = tiny
    default, zero, one = (verify_against(state, _plan(), **seed) for seed in ({}, {"seed": 0}, {"seed": 1}))
    assert default.blocks == zero.blocks
    assert all(torch.equal(a.reference, b.reference) for a, b in zip(default.blocks, zero.blocks))
    assert not any(torch.equal(a.reference, b.reference) for a, b in zip(default.blocks, one.blocks))


def test_against_measures_the_half_precision_cast_against_the_float64_fusion(tmp_path: Path) -> None:
    """For float16 blocks the cast error is the shipped conv against the float64 fusion (not the whole error)."""
    path = tmp_path / "half.safetensors"
    convert_file(TINY, path, options=ConvertOptions(dtype="float16"))
    with safe_open(str(path), framework="pt") as handle:
        state = OrderedDict((k, handle.get_tensor(k)) for k in handle.keys())  # noqa: SIM118
    plan = _plan(ConvertOptions(dtype="float16"))
    report = verify_against(state, plan, seed=3)
    expected = []
    for block in plan.blocks:
        fused64 = fuse_branches(block.branches, dtype=torch.float64)
        shipped = dataclasses.replace(fused64, weight=state[f"{block.deploy_prefix}.weight"],
                                      bias=state[f"{block.deploy_prefix}.bias"])
        expected.append(check_block(block.name, block.branches, fused64, shipped, 3, Tolerance()))
    assert report.blocks == tuple(expected)
    assert any(b.cast_abs_err != b.max_abs_err for b in report.blocks)  # the two measures do differ


# -- a block that cannot be fused: its name in the error, the hint kept ----------------------------------


def _failing_fusion(monkeypatch, error: RepvggError) -> None:
    from repvgg_cli import verify as verify_module

    def fail(branches, dtype=None):
        raise error

    monkeypatch.setattr(verify_module, "fuse_branches", fail)


@pytest.mark.parametrize("kind", [UnsupportedError, InputError])
def test_against_names_the_block_that_cannot_be_fused(tiny, monkeypatch, kind) -> None:
    state, _ = tiny
    _failing_fusion(monkeypatch, kind("the branches are misaligned", "see --bn-eps"))
    with pytest.raises(kind) as caught:
        verify_against(state, _plan())
    assert type(caught.value) is kind
    assert caught.value.message == str(caught.value) == "block stage0: the branches are misaligned"
    assert caught.value.hint == "see --bn-eps" and caught.value.__suppress_context__


def test_against_keeps_a_message_that_already_names_its_block(tiny, monkeypatch) -> None:
    state, _ = tiny
    _failing_fusion(monkeypatch, UnsupportedError("block x.y: mixed groups"))
    with pytest.raises(UnsupportedError) as caught:
        verify_against(state, _plan())
    assert caught.value.message == "block x.y: mixed groups" and caught.value.hint is None


def test_against_names_a_root_block_that_cannot_be_fused(monkeypatch) -> None:
    plan, deploy = _synthetic_plan(_synthetic_block("", ""))
    _failing_fusion(monkeypatch, UnsupportedError("blocked", "h"))
    with pytest.raises(UnsupportedError) as caught:
        verify_against(deploy, plan)
    assert (caught.value.message, caught.value.hint) == ("block <root>: blocked", "h")


# -- verify_deploy: root blocks, float64 files, metadata without tensors or blocks -----------------------


def _synthetic_deploy(prefix: str, dtype: torch.dtype = torch.float64) -> tuple[OrderedDict, dict]:
    """A deploy state of one fused conv at ``prefix`` and the metadata convert would record for it."""
    block = _synthetic_block(prefix or "root", prefix, dtype=dtype, seed=5)
    fused = fuse_branches(block.branches, dtype=dtype)
    state = OrderedDict(block.deploy_state(fused))
    seed = 12345
    reference = fused_probe(fuse_branches(block.branches), seed)
    record = {"name": prefix, "deploy_prefix": prefix, "groups": 1, "out_channels": 4, "in_per_group": 3,
              "kernel": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "padding_mode": "zeros",
              "probe": {"seed": seed, "shape": list(reference.shape), "reference": encode_tensor(reference)}}
    metadata = {"tensors": {k: tensor_sha256(v) for k, v in state.items()}, "blocks": [record]}
    return state, metadata


def test_deploy_a_float64_root_block() -> None:
    state, metadata = _synthetic_deploy("")
    assert list(state) == ["weight", "bias"]
    report = verify_deploy(state, metadata)
    assert report.ok and report.problems == ()
    assert report.blocks[0].rtol == 1e-9 and report.blocks[0].max_abs_err <= 1e-12 * report.blocks[0].scale


@pytest.mark.parametrize("part", ["weight", "bias"])
def test_deploy_a_changed_root_block_tensor_is_charged_to_the_block(part: str) -> None:
    state, metadata = _synthetic_deploy("")
    state[part] = state[part].clone()
    state[part].view(-1)[0] += 1.0
    report = verify_deploy(state, metadata)
    assert report.problems == ()
    assert [(b.name, b.problem) for b in report.blocks] == [("", f"{part} differs from what convert wrote (sha256)")]


def test_a_changed_block_bias_is_charged_to_its_block(tiny) -> None:
    state, metadata = tiny
    key = "stage2.1.rbr_reparam.bias"
    state[key] = state[key] + 1e-3
    report = verify_deploy(state, metadata)
    assert report.problems == ()
    assert [(b.name, b.problem) for b in report.blocks if b.problem] == [
        ("stage2.1", f"{key} differs from what convert wrote (sha256)")]


def test_deploy_metadata_without_tensor_digests_or_blocks(tiny) -> None:
    state, metadata = tiny
    report = verify_deploy(state, {"blocks": metadata["blocks"]})
    assert report.problems == (f"{len(state)} key(s) convert did not write, e.g. {next(iter(state))}",)
    assert len(report.blocks) == 7 and all(b.ok for b in report.blocks)
    report = verify_deploy(state, {"tensors": metadata["tensors"]})
    assert report.blocks == () and report.problems == () and report.ok
    report = verify_deploy(state, {})
    assert report.blocks == () and len(report.problems) == 1


def test_an_unfused_root_block_left_is_named_root() -> None:
    source = load_checkpoint(TINY).state_dict
    left = OrderedDict((k.removeprefix("stage1.0."), v) for k, v in source.items() if k.startswith("stage1.0."))
    report = verify_deploy(left, {"tensors": {}, "blocks": []})
    assert report.problems[0] == "unfused official block left: <root>"


def test_deploy_an_unreadable_block_reports_float32s_default_rtol(tiny, monkeypatch) -> None:
    """Its dtype cannot be read, so its rtol is float32's default, whatever that table says (not the fallback's)."""
    from repvgg_cli.checks import tolerance as tolerance_module

    monkeypatch.setitem(tolerance_module.DEFAULT_RTOL, torch.float32, 0.25)
    state, metadata = tiny
    del state["stage1.0.rbr_reparam.weight"]
    bad = [b for b in verify_deploy(state, metadata).blocks if not b.ok]
    assert [(b.name, b.rtol, b.max_abs_err, b.scale) for b in bad] == [("stage1.0", 0.25, math.inf, 0.0)]
