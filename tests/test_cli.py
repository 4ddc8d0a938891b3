"""The ``repvgg`` command line through Typer's CliRunner: exit codes, streams, files written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from repvgg_cli import __version__
from repvgg_cli.io.metadata import METADATA_KEY, tensor_sha256
from repvgg_cli.cli import app
from repvgg_cli.render.text import human_size
from tests import zoo
from tests.helpers import SAMPLES, disk_full_at_write, error_lines, invoke

TINY = SAMPLES / "repvgg_tiny.pt"
TINY_TRAIN = SAMPLES / "repvgg_tiny_train.pt"
TINY_ST = SAMPLES / "repvgg_tiny.safetensors"
PLAIN = SAMPLES / "plain_net.pt"

TINY_BLOCKS = ["stage0", "stage1.0", "stage2.0", "stage2.1", "stage3.0", "stage3.1", "stage4.0"]
PLAIN_BLOCKS = ["features.0", "features.2", "features.4", "features.6"]
BLOCKS = {"repvgg_tiny": (TINY_BLOCKS, "official"), "plain_net": (PLAIN_BLOCKS, "plain")}
SAMPLE_FILES = [f"{name}{end}" for name in BLOCKS for end in (".pt", "_train.pt", ".safetensors")]


def assert_clean_failure(result, code: int) -> None:
    """Exit ``code``, exactly one ``Error:`` line on stderr, no traceback anywhere."""
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert len(error_lines(result)) == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_plain_net() -> nn.Module:
    """A ``--model`` factory: the train-form network of the plain_net sample."""
    return zoo.PlainNet()


def make_wrong_net() -> nn.Module:
    """A ``--model`` factory whose keys do not match plain_net.pt."""
    return zoo.repvgg("tiny_g2", num_classes=10)


NOT_CALLABLE = 42


def model_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def rel_err(want: torch.Tensor, got: torch.Tensor) -> float:
    return float((want.double() - got.double()).abs().max() / want.double().abs().max())


# -- convert -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("sample", SAMPLE_FILES)
def test_convert_each_sample(tmp_path: Path, sample: str, suffix: str) -> None:
    blocks, family = BLOCKS[sample.split(".")[0].removesuffix("_train")]
    output = tmp_path / f"deploy{suffix}"
    result = invoke("convert", SAMPLES / sample, output)
    assert result.exit_code == 0, result.stderr
    assert output.is_file() and output.stat().st_size > 10_000
    assert error_lines(result) == []
    lines = result.stdout.splitlines()
    assert lines[0].strip() == "Fused blocks"
    rows = [line.split() for line in lines if line.strip().split(" ")[0] in blocks]
    assert [row[0] for row in rows] == blocks
    assert all(row[1] == family and row[-1] == "ok" for row in rows)
    assert f"{len(blocks)} block(s) fused (key tree), 0 failed" in result.stdout
    assert lines[-1] == f"wrote {output} ({human_size(output.stat().st_size)})"
    # the samples are official/plain layouts, shared by projects whose BN eps differ: say so
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning: BN eps")]
    assert len(warnings) == 1 and f"used for {len(blocks)} block(s)" in warnings[0] and "--bn-eps" in warnings[0]
    others = [line for line in result.stderr.splitlines() if not line.startswith("Warning: BN eps")]
    if sample.endswith("_train.pt"):
        assert "used entry 'model'" in result.stderr
        assert "stripped key prefix 'module.'" in result.stderr
    else:
        assert others == []
    quiet = invoke("convert", SAMPLES / sample, output, "--force", "--bn-eps", "1e-5")
    assert quiet.exit_code == 0 and "Warning: BN eps" not in quiet.stderr  # decided by the flag


def test_convert_json_is_one_document(tmp_path: Path) -> None:
    output = tmp_path / "deploy.safetensors"
    result = invoke("convert", TINY_TRAIN, output, "--json")
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert document["command"] == "convert"
    assert document["ok"] is True and document["written"] is True
    assert document["output"] == str(output) and document["source"] == str(TINY_TRAIN)
    assert document["mode"] == "key tree"
    assert [b["name"] for b in document["blocks"]] == TINY_BLOCKS
    assert {b["family"] for b in document["blocks"]} == {"official"}
    for block in document["blocks"]:
        assert isinstance(block["rel_err"], float) and 0 < block["rel_err"] < 1e-5
        assert isinstance(block["max_abs_err"], float) and block["max_abs_err"] < 1e-5
        assert block["ok"] is True and block["rtol"] == 1e-5
    assert document["totals"]["blocks"] == 7 and document["totals"]["failed"] == 0
    assert document["totals"]["params_before"] > document["totals"]["params_after"] > 0
    assert document["totals"]["passthrough_keys"] == 2
    assert document["notes"] == ["used entry 'model'", "stripped key prefix 'module.'"]
    assert output.is_file()
    assert "used entry 'model'" in result.stderr  # progress notes stay off stdout


def test_convert_reports(tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "a.safetensors", tmp_path / "b.pt"
    report_json, report_md = tmp_path / "r.json", tmp_path / "r.md"
    assert invoke("convert", PLAIN, out_json, "--report", report_json).exit_code == 0
    assert invoke("convert", PLAIN, out_md, "--report", report_md).exit_code == 0
    document = json.loads(report_json.read_text(encoding="utf-8"))
    assert document["ok"] is True
    assert [b["name"] for b in document["blocks"]] == PLAIN_BLOCKS
    assert all(b["family"] == "plain" and b["rel_err"] < 1e-5 for b in document["blocks"])
    markdown = report_md.read_text(encoding="utf-8")
    assert markdown.startswith("# repvgg convert report\n")
    assert "- result: equivalent" in markdown
    assert all(f"| `{name}` | plain |" in markdown for name in PLAIN_BLOCKS)


@pytest.mark.parametrize("report", ["r.txt", "missing-folder/r.json"])
def test_convert_bad_report_name_is_a_usage_error(tmp_path: Path, report: str) -> None:
    output = tmp_path / "deploy.pt"
    result = invoke("convert", PLAIN, output, "--report", tmp_path / report)
    assert_clean_failure(result, 2)
    assert error_lines(result)[0].startswith(f"Error: --report {tmp_path / report}: ")
    assert not output.exists()
    assert sorted(os.listdir(tmp_path)) == []


def test_existing_output_needs_force(tmp_path: Path) -> None:
    output = tmp_path / "deploy.safetensors"
    output.write_bytes(b"an older artifact")
    result = invoke("convert", TINY, output)
    assert_clean_failure(result, 2)
    assert result.stderr.splitlines() == [f"Error: {output} exists", "Hint: pass --force to replace it"]
    assert output.read_bytes() == b"an older artifact"

    result = invoke("convert", TINY, output, "--force")
    assert result.exit_code == 0
    fresh = tmp_path / "fresh" / "deploy.safetensors"
    fresh.parent.mkdir()
    assert invoke("convert", TINY, fresh).exit_code == 0
    assert output.read_bytes() == fresh.read_bytes()


def test_output_equal_to_source_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "train.pt"
    shutil.copyfile(PLAIN, source)
    digest = sha256(source)
    for extra in ([], ["--force"]):
        result = invoke("convert", source, source, *extra)
        assert_clean_failure(result, 2)
        assert error_lines(result) == [f"Error: {source} is the source checkpoint; it is never overwritten"]
    assert sha256(source) == digest
    assert os.listdir(tmp_path) == ["train.pt"]


def test_missing_source(tmp_path: Path) -> None:
    result = invoke("convert", tmp_path / "nope.pt", tmp_path / "out.pt")
    assert_clean_failure(result, 2)
    assert error_lines(result) == [f"Error: {tmp_path / 'nope.pt'}: no such file"]
    assert result.stdout == ""


def test_not_a_checkpoint_is_one_error_line(tmp_path: Path) -> None:
    source = tmp_path / "notes.pt"
    source.write_text("these are not weights\n", encoding="utf-8")
    result = invoke("convert", source, tmp_path / "out.pt")
    assert_clean_failure(result, 2)
    assert result.stderr == f"Error: {source} is not a checkpoint: neither a torch file (.pt/.pth) nor safetensors\n"
    assert result.stdout == ""
    assert not (tmp_path / "out.pt").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    source = tmp_path / "notes.pt"
    source.write_text("these are not weights\n", encoding="utf-8")
    result = invoke("convert", source, tmp_path / "out.pt", "--debug")
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert "repvgg_cli.errors.InputError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("Error: ")


def test_unexpected_exception_is_exit_4_with_one_line(tmp_path: Path, monkeypatch) -> None:
    import repvgg_cli.api

    def broken(*args, **kwargs):
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr(repvgg_cli.api, "convert_file", broken)
    result = invoke("convert", PLAIN, tmp_path / "out.pt")
    assert_clean_failure(result, 4)
    assert error_lines(result)[0].startswith("Error: internal error ZeroDivisionError: float division by zero")
    result = invoke("convert", PLAIN, tmp_path / "out.pt", "--debug")
    assert result.exit_code == 4
    assert "Traceback (most recent call last)" in result.stderr


def test_pickled_model_needs_allow_pickle(tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    torch.save(zoo.PlainNet(), source)
    result = invoke("convert", source, tmp_path / "out.pt")
    assert_clean_failure(result, 2)
    assert error_lines(result) == [
        f"Error: {source} holds a pickled object of type tests.zoo.PlainNet; loading it would run code from the file"
    ]
    assert "--allow-pickle" in result.stderr
    assert not (tmp_path / "out.pt").exists()


def _without_stats(state: dict, bn: str) -> "OrderedDict[str, torch.Tensor]":
    """As if ``bn`` had been built with track_running_stats=False: no running stats in the file."""
    stats = tuple(f"{bn}.{s}" for s in ("running_mean", "running_var", "num_batches_tracked"))
    return OrderedDict((k, v) for k, v in state.items() if k not in stats)


def _unsupported(kind: str) -> tuple["OrderedDict[str, torch.Tensor]", str]:
    state = torch.load(TINY, weights_only=True)
    if kind == "identity-bn-without-stats":
        return _without_stats(state, "stage2.1.rbr_identity"), "stage2.1.rbr_identity has no running statistics"
    if kind == "dense-bn-without-stats":
        return _without_stats(state, "stage3.1.rbr_dense.bn"), "stage3.1.rbr_dense.bn has no running statistics"
    if kind == "model-with-track_running_stats-false":
        model = zoo.PlainNet()
        model.features[2].identity = nn.BatchNorm2d(16, track_running_stats=False)
        return OrderedDict(model.state_dict()), "features.2.identity has no running statistics"
    if kind == "half-converted":
        state["stage2.1.rbr_reparam.weight"] = torch.zeros(32, 32, 3, 3)
        state["stage2.1.rbr_reparam.bias"] = torch.zeros(32)
        return state, "already has the deploy key stage2.1.rbr_reparam.weight"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["identity-bn-without-stats", "dense-bn-without-stats", "model-with-track_running_stats-false", "half-converted"],
)
def test_unsupported_structure_is_exit_3(tmp_path: Path, kind: str) -> None:
    state, message = _unsupported(kind)
    source = tmp_path / "train.pt"
    torch.save(state, source)
    result = invoke("convert", source, tmp_path / "out.safetensors")
    assert_clean_failure(result, 3)
    assert message in error_lines(result)[0]
    assert os.listdir(tmp_path) == ["train.pt"]


def test_not_equivalent_is_exit_1_and_writes_nothing(tmp_path: Path) -> None:
    output = tmp_path / "deploy.safetensors"
    result = invoke("convert", PLAIN, output, "--rtol", "1e-30", "--atol", "0")
    assert_clean_failure(result, 1)
    rows = [line.split() for line in result.stdout.splitlines() if line.strip().split(" ")[0] in PLAIN_BLOCKS]
    assert [row[0] for row in rows] == PLAIN_BLOCKS
    assert all(row[-1] == "FAIL" for row in rows)
    # float32 storage leaves ~1e-8 relative error: real, tiny, and above a 1e-30 tolerance
    assert all(1e-10 < float(row[-2]) < 1e-6 for row in rows)
    assert "4 block(s) fused (key tree), 4 failed" in result.stdout
    assert "wrote" not in result.stdout
    assert error_lines(result) == [
        "Error: not equivalent: block(s) features.0, features.2, features.4, features.6 exceed the tolerance; "
        "nothing was written"
    ]
    assert os.listdir(tmp_path) == []


def test_not_equivalent_names_how_many_blocks_failed(tmp_path: Path) -> None:
    result = invoke("convert", TINY, tmp_path / "deploy.pt", "--rtol", "1e-30", "--json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["ok"] is False and document["written"] is False
    assert [b["ok"] for b in document["blocks"]] == [False] * 7
    assert document["totals"]["failed"] == 7
    assert error_lines(result) == [
        "Error: not equivalent: block(s) stage0, stage1.0, stage2.0, stage2.1, stage3.0 and 2 more exceed the "
        "tolerance; nothing was written"
    ]
    assert os.listdir(tmp_path) == []


# -- pickled models and --model ------------------------------------------------------------------


def test_convert_pickled_model_with_allow_pickle(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = zoo.randomize_bn(zoo.PlainNet()).eval()
    source, output = tmp_path / "model.pt", tmp_path / "out.pt"
    torch.save(model, source)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    want = model_output(model, x)

    result = invoke("convert", source, output, "--allow-pickle", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["mode"] == "module tree"
    assert [b["name"] for b in document["blocks"]] == PLAIN_BLOCKS
    assert document["model_check"]["ok"] is True and document["model_check"]["rel_err"] < 1e-5

    deploy = torch.load(output, weights_only=False)
    assert isinstance(deploy, zoo.PlainNet)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in deploy.modules()) == 4
    assert rel_err(want, model_output(deploy, x)) < 1e-5

    refused = invoke("convert", source, tmp_path / "other.pt")
    assert_clean_failure(refused, 2)
    assert "--allow-pickle" in refused.stderr
    assert not (tmp_path / "other.pt").exists()


def test_convert_with_model_factory(tmp_path: Path) -> None:
    output = tmp_path / "out.pt"
    result = invoke("convert", PLAIN, output, "--model", "tests.test_cli:make_plain_net")
    assert result.exit_code == 0, result.stderr
    assert "4 block(s) fused (module tree), 0 failed" in result.stdout
    assert "whole model (float64, input (2, 3, 64, 64))" in result.stdout

    train = make_plain_net()
    train.load_state_dict(torch.load(PLAIN, weights_only=True), strict=True)
    deploy = zoo.PlainNet(deploy=True)
    assert deploy.load_state_dict(torch.load(output, weights_only=True), strict=True) == ([], [])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert rel_err(model_output(train, x), model_output(deploy, x)) < 1e-5


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.test_cli", "expected MODULE:CALLABLE"),
        ("tests.test_cli:no_such_factory", "has no attribute no_such_factory"),
        ("no_such_module_for_repvgg_tests:build", "cannot import no_such_module_for_repvgg_tests"),
        ("tests.test_cli:NOT_CALLABLE", "NOT_CALLABLE is not callable"),
        ("tests.test_cli:make_wrong_net", "the checkpoint does not load into --model tests.test_cli:make_wrong_net"),
    ],
)
def test_convert_with_bad_model_spec(tmp_path: Path, spec: str, message: str) -> None:
    result = invoke("convert", PLAIN, tmp_path / "out.pt", "--model", spec)
    assert_clean_failure(result, 2)
    assert message in error_lines(result)[0]
    assert os.listdir(tmp_path) == []


# -- verify --------------------------------------------------------------------------------------


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())


def scale_largest(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    changed = tensor.clone()
    flat = changed.view(-1)
    index = int(flat.abs().argmax())
    flat[index] = flat[index] * factor
    return changed


@pytest.fixture(scope="module")
def deploy_st(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("deploy") / "tiny.safetensors"
    result = invoke("convert", TINY, path)
    assert result.exit_code == 0, result.stderr
    return path


def test_fresh_deploy_file_verifies(deploy_st: Path) -> None:
    result = invoke("verify", deploy_st)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert "7 block(s) verified: equivalent" in result.stdout
    result = invoke("verify", deploy_st, "--against", TINY)
    assert result.exit_code == 0, result.stderr
    assert "7 block(s) verified: equivalent" in result.stdout
    document = json.loads(invoke("verify", deploy_st, "--json").stdout)
    assert document["ok"] is True and document["failed_blocks"] == [] and document["problems"] == []
    assert [b["name"] for b in document["blocks"]] == TINY_BLOCKS
    assert all(b["rel_err"] < 1e-5 for b in document["blocks"])


def test_deploy_pt_from_a_container_verifies(tmp_path: Path) -> None:
    output = tmp_path / "deploy.pt"
    assert invoke("convert", TINY_TRAIN, output).exit_code == 0
    assert invoke("verify", output).exit_code == 0
    assert invoke("verify", output, "--against", TINY_TRAIN).exit_code == 0
    assert invoke("verify", output, "--against", TINY).exit_code == 0


def test_verify_against_takes_the_entry_from_the_command_line_not_from_the_file(tmp_path: Path) -> None:
    weights = torch.load(PLAIN, weights_only=True)
    ema = OrderedDict((k, v + 0.5 if v.is_floating_point() else v.clone()) for k, v in weights.items())
    source = tmp_path / "ema.pt"
    torch.save({"model": weights, "model_ema": ema}, source)
    for entry in (["--entry", "model"], []):
        output = tmp_path / f"deploy{len(entry)}.safetensors"
        assert invoke("convert", source, output, *entry).exit_code == 0
        result = invoke("verify", output, "--against", source, *entry)  # --entry picks the source's weights
        assert result.exit_code == 0, result.stderr
    # the file's word is not taken: without --entry the source's EMA weights are compared, and fail,
    # with a note naming what the file says it was converted with
    result = invoke("verify", tmp_path / "deploy2.safetensors", "--against", source)
    assert result.exit_code == 1 and "the file says it was converted with --entry model" in result.stdout
    # and a file that says another entry cannot make a check pass
    tensors, metadata = read_safetensors(tmp_path / "deploy2.safetensors")
    record = json.loads(metadata[METADATA_KEY])
    record["source"]["entry"] = "model_ema"
    save_file(tensors, str(tmp_path / "mislabelled.safetensors"), metadata={**metadata, METADATA_KEY: json.dumps(record)})
    assert invoke("verify", tmp_path / "mislabelled.safetensors", "--against", source).exit_code == 1


def _tampered(deploy_st: Path, tmp_path: Path, key: str, fix_hash: bool = False, drop: bool = False) -> Path:
    tensors, metadata = read_safetensors(deploy_st)
    if drop:
        del tensors[key]
    else:
        tensors[key] = scale_largest(tensors[key], 1.01)
        assert int((tensors[key] != read_safetensors(deploy_st)[0][key]).sum()) == 1
    if fix_hash:
        record = json.loads(metadata[METADATA_KEY])
        assert record["tensors"][key] != tensor_sha256(tensors[key])
        record["tensors"][key] = tensor_sha256(tensors[key])
        metadata = {**metadata, METADATA_KEY: json.dumps(record)}
    path = tmp_path / "tampered.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("against", [False, True], ids=["recorded", "against-source"])
def test_tampered_block_weight_fails_verify(deploy_st: Path, tmp_path: Path, against: bool) -> None:
    path = _tampered(deploy_st, tmp_path, "stage2.1.rbr_reparam.weight")
    result = invoke("verify", path, *(["--against", TINY] if against else []))
    assert_clean_failure(result, 1)
    assert error_lines(result) == ["Error: verification failed: block(s) stage2.1 failed"]
    row = next(line.split() for line in result.stdout.splitlines() if line.strip().startswith("stage2.1 "))
    assert "FAIL" in row
    others = [line.split() for line in result.stdout.splitlines() if line.strip().split(" ")[0] in TINY_BLOCKS]
    assert sum("FAIL" in r for r in others) == 1


@pytest.mark.parametrize("against", [False, True], ids=["recorded", "against-source"])
def test_tampered_block_with_matching_hash_is_caught_by_the_probe(deploy_st: Path, tmp_path: Path, against) -> None:
    path = _tampered(deploy_st, tmp_path, "stage2.1.rbr_reparam.weight", fix_hash=True)
    result = invoke("verify", path, "--json", *(["--against", TINY] if against else []))
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["ok"] is False
    assert document["failed_blocks"] == ["stage2.1"]
    block = next(b for b in document["blocks"] if b["name"] == "stage2.1")
    assert block["problem"] is None  # the hash matches: only the numbers give it away
    assert block["rel_err"] > 1e-4 > 1e-5 == block["rtol"]
    assert document["problems"] == []
    assert error_lines(result) == ["Error: verification failed: block(s) stage2.1 failed"]


def test_tampered_passthrough_tensor_fails_verify(deploy_st: Path, tmp_path: Path) -> None:
    path = _tampered(deploy_st, tmp_path, "linear.weight")
    result = invoke("verify", path)
    assert_clean_failure(result, 1)
    assert error_lines(result) == [
        "Error: verification failed: tensor linear.weight differs from what convert wrote (sha256)"
    ]
    result = invoke("verify", path, "--against", TINY)
    assert_clean_failure(result, 1)
    assert error_lines(result) == ["Error: verification failed: key linear.weight differs from the source"]


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("stage3.0.rbr_reparam.bias",
         "Error: verification failed: block(s) stage3.0 failed; 1 key(s) convert wrote are missing, "
         "e.g. stage3.0.rbr_reparam.bias"),
        ("linear.bias", "Error: verification failed: 1 key(s) convert wrote are missing, e.g. linear.bias"),
    ],
)
def test_missing_key_fails_verify(deploy_st: Path, tmp_path: Path, key: str, message: str) -> None:
    path = _tampered(deploy_st, tmp_path, key, drop=True)
    result = invoke("verify", path)
    assert_clean_failure(result, 1)
    assert error_lines(result) == [message]
    assert invoke("verify", path, "--against", TINY).exit_code == 1


def test_verify_without_metadata_needs_against(deploy_st: Path, tmp_path: Path) -> None:
    tensors, _ = read_safetensors(deploy_st)
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare), metadata={"format": "pt"})
    for path in (bare, TINY_ST):
        result = invoke("verify", path)
        assert_clean_failure(result, 2)
        assert error_lines(result) == [f"Error: {path} has no repvgg_cli metadata, so it cannot be checked on its own"]
        assert "Hint: pass --against TRAIN to recompute from the train-form source" in result.stderr
    result = invoke("verify", bare, "--against", TINY)
    assert result.exit_code == 0, result.stderr
    assert "7 block(s) verified: equivalent" in result.stdout


# -- inspect, families, version, help ------------------------------------------------------------


def test_inspect_json_train_file() -> None:
    result = invoke("inspect", TINY_TRAIN, "--json")
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert document["command"] == "inspect"
    assert document["form"] == "train"
    assert document["format"] == "torch-zip"
    assert document["entry"] == "model"
    assert document["container_keys"] == ["model", "optimizer", "epoch"]
    assert [b["name"] for b in document["blocks"]] == TINY_BLOCKS
    assert {(b["family"], b["form"]) for b in document["blocks"]} == {("official", "train")}
    assert document["unfused_blocks"] == TINY_BLOCKS
    assert document["metadata"] is None
    assert document["sha256"] == sha256(TINY_TRAIN)
    assert document["other_prefixes"] == {"linear": 2}


def test_inspect_json_deploy_file(deploy_st: Path) -> None:
    document = json.loads(invoke("inspect", deploy_st, "--json").stdout)
    assert document["form"] == "deploy"
    assert document["format"] == "safetensors"
    assert [b["name"] for b in document["blocks"]] == TINY_BLOCKS
    assert {b["form"] for b in document["blocks"]} == {"deploy"}
    assert document["unfused_blocks"] == []
    metadata = document["metadata"]
    assert metadata["tool"] == "repvgg_cli" and metadata["version"] == __version__
    assert metadata["blocks"] == 7
    assert metadata["source"]["name"] == "repvgg_tiny.pt"
    assert metadata["source"]["sha256"] == sha256(TINY)
    assert 0 < metadata["worst_rel_err"] < 1e-5


@pytest.mark.parametrize(("sample", "line"), [("plain_net.pt", "plain blocks (train form): 4"),
                                              ("repvgg_tiny.safetensors", "official blocks (train form): 7")])
def test_inspect_tree(sample: str, line: str) -> None:
    result = invoke("inspect", SAMPLES / sample)
    assert result.exit_code == 0
    assert str(SAMPLES / sample) in result.stdout.splitlines()[0]
    assert line in result.stdout
    assert "form: train" in result.stdout


def test_families_json() -> None:
    result = invoke("families", "--json")
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    names = [f["name"] for f in document["families"]]
    assert {"plain", "official"} <= set(names)
    assert len(names) == len(set(names))
    official = next(f for f in document["families"] if f["name"] == "official")
    assert official["deploy_keys"] == "rbr_reparam.{weight,bias}"


def test_version_and_help() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"repvgg {__version__}\n"
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("convert", "verify", "inspect", "families"):
        assert command in result.stdout
    assert invoke("convert", "--help").exit_code == 0


def test_a_disk_error_while_writing_is_exit_2_not_a_bug(tmp_path, monkeypatch):
    """Disk full / permission errors are the environment's: one line, exit 2, nothing left behind."""
    calls = disk_full_at_write(monkeypatch, 3)  # the streamed file is half written by then
    output = tmp_path / "deploy.safetensors"
    result = CliRunner().invoke(app, ["convert", str(SAMPLES / "plain_net.pt"), str(output)])
    assert len(calls) == 3
    assert result.exit_code == 2
    assert "No space left on device" in result.output and "Traceback" not in result.output
    assert not output.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_fsync_flushes_the_output_before_the_rename_only_when_asked(tmp_path, monkeypatch, suffix):
    import os as os_module

    from repvgg_cli.io import atomic as checkpoint

    synced: list[str] = []
    real_fsync, real_replace = os_module.fsync, checkpoint.move_into_place

    def fsync(fd):
        synced.append(os_module.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst, *args):
        synced.append(f"rename {os_module.fspath(dst)}")
        real_replace(src, dst, *args)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint, "move_into_place", replace)
    plain, durable = tmp_path / f"plain{suffix}", tmp_path / f"durable{suffix}"
    assert CliRunner().invoke(app, ["convert", str(SAMPLES / "plain_net.pt"), str(plain)]).exit_code == 0
    assert synced == [f"rename {plain}"]
    synced.clear()
    assert CliRunner().invoke(app, ["convert", str(SAMPLES / "plain_net.pt"), str(durable), "--fsync"]).exit_code == 0
    assert len(synced) == 2 and synced[1] == f"rename {durable}"
    assert synced[0].startswith(str(tmp_path / f".{durable.name}.")) and synced[0].endswith(".tmp")
    assert load_file(str(durable)) if suffix == ".safetensors" else torch.load(durable, weights_only=True)


# -- the real process: main() ends it with os._exit once the command is done ---------------------


def _run_main(tmp_path: Path, *args: object, code: str = "") -> subprocess.CompletedProcess[str]:
    """``repvgg ARGS`` through ``repvgg_cli.cli.main`` in a fresh interpreter, ``code`` run first."""
    script = (f"import sys\n{code}\nfrom repvgg_cli.cli import main\n"
              f"sys.argv = ['repvgg', *{[str(a) for a in args]!r}]\nmain()\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as usual
    return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**env, "COLUMNS": "200"})


def test_the_process_ends_with_the_commands_status_output_and_files(tmp_path: Path) -> None:
    """Ending with os._exit loses nothing: the exit status, every line of stdout and stderr (not
    a terminal, so block-buffered), the written file, and the atexit handlers (they run first)."""
    marker = tmp_path / "atexit-ran"
    handler = f"import atexit, pathlib\natexit.register(pathlib.Path({str(marker)!r}).touch)"
    out = tmp_path / "deploy.safetensors"
    done = _run_main(tmp_path, "convert", SAMPLES / "repvgg_tiny_train.pt", out, "--json", code=handler)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # the whole document arrived
    assert report["ok"] is True and out.is_file() and marker.exists()
    with safe_open(str(out), framework="pt") as handle:  # the file is whole: header, metadata, digest
        metadata = json.loads(handle.metadata()[METADATA_KEY])
    assert metadata["source"]["sha256"] == hashlib.sha256((SAMPLES / "repvgg_tiny_train.pt").read_bytes()).hexdigest()

    marker.unlink()
    said = "import atexit, sys\natexit.register(sys.stdout.write, 'said at exit')"  # buffered: needs the flush
    failed = _run_main(tmp_path, "convert", tmp_path / "missing.pt", tmp_path / "x.safetensors",
                       code=f"{handler}\n{said}")
    assert failed.returncode == 2 and failed.stderr.startswith("Error: ") and marker.exists()
    assert failed.stdout.endswith("said at exit")
    assert not (tmp_path / "x.safetensors").exists()
    usage = _run_main(tmp_path, "convert")
    assert usage.returncode == 2 and "Missing argument" in usage.stderr
    version = _run_main(tmp_path, "--version")
    assert version.returncode == 0 and __version__ in version.stdout


def test_exit_statuses_follow_sys_exit() -> None:
    from repvgg_cli.cli.app import _exit_status

    assert _exit_status(None) == 0 and _exit_status(3) == 3
    assert _exit_status("a message") == 1
