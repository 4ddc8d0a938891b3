"""repvgg_cli.verify, to the letter (issue 15: mutation score of verify).

The tiny sample converted once; then :func:`verify_deploy` and :func:`verify_against` called
directly on edited copies of the deploy state and metadata: each problem in its exact words,
which block a changed tensor is charged to, shapes, dtypes and NaN checks of the stored conv,
and the report's ``ok``.
"""

from __future__ import annotations

import copy
import json
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from repvgg_cli.api import convert_file
from repvgg_cli.checks.tolerance import BlockCheck, ModelCheck, Tolerance
from repvgg_cli.io.metadata import METADATA_KEY, tensor_sha256
from repvgg_cli.io.read import load_checkpoint
from repvgg_cli.pipeline.find import find as find_plan
from repvgg_cli.pipeline.options import ConvertOptions
from repvgg_cli.pipeline.read import Source
from repvgg_cli.verify import VerifyReport, _fused_from_file, verify_against, verify_deploy
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
