"""Devices: checkpoints saved on a GPU load on a CPU-only machine; GPU math settings change nothing.

There is no GPU here. A checkpoint "saved on CUDA" is simulated faithfully: ``torch.save`` writes
each storage with the location tag that ``torch.serialization.location_tag`` returns, so the file
is written by torch itself with every storage tagged ``cuda:0``, exactly as a GPU run writes it.
The test first proves the simulation is real (a plain ``torch.load`` of it fails on this machine)
and then runs ``repvgg inspect`` / ``convert`` / ``verify`` on it (the loader maps to the CPU).

TF32: every check runs on the CPU in float64, so ``allow_tf32`` (or a reduced float32 matmul
precision) cannot change a verdict. The test spies on every convolution, BN and linear call.
"""

from __future__ import annotations

import copy
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests import zoo
from repvgg_cli.io.metadata import METADATA_KEY
from repvgg_cli.api import ConvertOptions, convert_state_dict, reparameterize
from tests.helpers import invoke, SAMPLES


def save_as_if_on_cuda(obj: object, path: Path, zip_format: bool = True) -> Path:
    """``torch.save`` with every storage tagged ``cuda:0`` (what a save from a GPU writes)."""
    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    finally:
        torch.serialization.location_tag = original
    return path


def assert_tagged_cuda(path: Path) -> None:
    """The file really says cuda: its pickle names ``cuda:0`` and a plain load fails here."""
    data = path.read_bytes()
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(path) as archive:
            pickle = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        assert b"cuda:0" in pickle and b"X\x03\x00\x00\x00cpu" not in pickle
    else:
        assert b"cuda:0" in data
    assert not torch.cuda.is_available()
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=False)  # our own file; a plain load, as a user would try


def on_cpu(tensors) -> bool:
    return all(t.device.type == "cpu" for t in tensors)


@pytest.mark.parametrize(
    ("sample", "zip_format"),
    [("repvgg_tiny", True), ("repvgg_tiny", False), ("plain_net", True), ("repvgg_tiny_train", True)],
    ids=["tiny-zip", "tiny-legacy", "plain-zip", "train-container-zip"],
)
def test_a_checkpoint_saved_on_cuda_converts_on_the_cpu(tmp_path: Path, sample: str, zip_format: bool) -> None:
    original = torch.load(SAMPLES / f"{sample}.pt", weights_only=True)
    source = save_as_if_on_cuda(original, tmp_path / f"{sample}_cuda.pt", zip_format)
    assert_tagged_cuda(source)

    inspected = invoke("inspect", source, "--json")
    assert inspected.exit_code == 0, inspected.stderr
    assert json.loads(inspected.stdout)["form"] == "train"

    for suffix, checks in ((".safetensors", ((), ("--against", source), ("--against", SAMPLES / f"{sample}.pt"))),
                           (".pt", ((),))):
        output = tmp_path / f"deploy{suffix}"
        converted = invoke("convert", source, output, "--json")
        assert converted.exit_code == 0, converted.stderr
        assert json.loads(converted.stdout)["ok"] is True
        for args in checks:
            checked = invoke("verify", output, *args)
            assert checked.exit_code == 0, checked.stdout + checked.stderr
    if sample == "repvgg_tiny_train":  # a container keeps its layout; its tensors are on the CPU
        written = torch.load(tmp_path / "deploy.pt", weights_only=True)
        assert on_cpu(v for entry in written.values() if isinstance(entry, dict) for v in entry.values())
    # the same deploy weights as from the CPU-saved original
    reference = tmp_path / "reference.safetensors"
    assert invoke("convert", SAMPLES / f"{sample}.pt", reference).exit_code == 0
    from safetensors.torch import load_file

    got, want = load_file(tmp_path / "deploy.safetensors"), load_file(reference)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_deploy_file_moved_through_a_gpu_still_verifies(tmp_path: Path) -> None:
    output = tmp_path / "deploy.pt"
    assert invoke("convert", SAMPLES / "repvgg_tiny.pt", output).exit_code == 0
    state = torch.load(output, weights_only=True)
    assert METADATA_KEY in state._metadata
    resaved = save_as_if_on_cuda(state, tmp_path / "deploy_cuda.pt")  # _metadata travels with the OrderedDict
    assert_tagged_cuda(resaved)
    result = invoke("verify", resaved, "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["failed_blocks"] == []
    # and the integrity check is still live on it
    state["stage1.0.rbr_reparam.bias"] = state["stage1.0.rbr_reparam.bias"] * 1.01
    tampered = save_as_if_on_cuda(state, tmp_path / "tampered_cuda.pt")
    document = json.loads(invoke("verify", tampered, "--json").stdout)
    assert document["failed_blocks"] == ["stage1.0"]


def test_a_pickled_model_saved_on_cuda_converts_with_allow_pickle(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = zoo.randomize_bn(zoo.PlainNet(), seed=4)
    source = save_as_if_on_cuda(model, tmp_path / "model_cuda.pt")
    assert_tagged_cuda(source)
    refused = invoke("convert", source, tmp_path / "deploy.pt")
    assert refused.exit_code == 2  # a pickled module: refused unless opted in
    result = invoke("convert", source, tmp_path / "deploy.pt", "--allow-pickle", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model_check"]["ok"] is True
    deploy = torch.load(tmp_path / "deploy.pt", weights_only=False)
    assert isinstance(deploy, zoo.PlainNet) and on_cpu(deploy.state_dict().values())
    checked = invoke("verify", tmp_path / "deploy.pt", "--against", source, "--allow-pickle")
    assert checked.exit_code == 0, checked.stdout + checked.stderr
    assert "whole model: rel err" in checked.stdout


# -- TF32 -----------------------------------------------------------------------------------------


@pytest.fixture
def gpu_math_settings_on():
    """Every knob that lets float32 math lose precision, turned on; restored afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("medium")
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[0], saved[1]
    torch.set_float32_matmul_precision(saved[2])


class Spy:
    """Records ``(function, device, dtype)`` of every conv2d / batch_norm / linear call."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[str, str, torch.dtype]] = []
        for name in ("conv2d", "batch_norm", "linear"):
            monkeypatch.setattr(F, name, self.wrap(name, getattr(F, name)))

    def wrap(self, name, function):
        def spied(x, weight, *args, **kwargs):
            tensors = [t for t in (x, weight) if isinstance(t, torch.Tensor)]
            for t in tensors:
                self.calls.append((name, t.device.type, t.dtype))
            return function(x, weight, *args, **kwargs)

        return spied

    def kinds(self) -> set[tuple[str, str, torch.dtype]]:
        return set(self.calls)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return zoo.randomize_bn(zoo.repvgg("tiny", num_classes=10), seed=2)


def run_checks() -> tuple[list[float], float, list[float]]:
    model = tiny_model()
    key_tree = convert_state_dict(model.state_dict())
    module_tree = reparameterize(copy.deepcopy(model), ConvertOptions(input_shape=(2, 3, 32, 32)))
    assert key_tree.ok and module_tree.ok
    return ([r.check.max_abs_err for r in key_tree.blocks], module_tree.model_check.max_abs_err,
            [r.check.max_abs_err for r in module_tree.blocks])


def test_checks_run_on_the_cpu_in_float64_whatever_the_tf32_settings(monkeypatch, gpu_math_settings_on) -> None:
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    spy = Spy(monkeypatch)
    with_tf32 = run_checks()
    assert spy.calls, "the spy saw nothing: the checks no longer go through torch.nn.functional"
    kinds = spy.kinds()
    assert {(name, device) for name, device, _ in kinds} >= {("conv2d", "cpu"), ("batch_norm", "cpu"), ("linear", "cpu")}
    assert kinds == {(name, "cpu", torch.float64) for name, _, _ in kinds}, kinds
    assert module_tree_dtype() == "float64"

    monkeypatch.undo()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    assert run_checks() == with_tf32  # bit-for-bit the same numbers


def module_tree_dtype() -> str:
    result = reparameterize(tiny_model(), ConvertOptions(input_shape=(1, 3, 32, 32)))
    return result.model_check.dtype


def test_verify_of_a_file_runs_in_float64_on_the_cpu(monkeypatch, gpu_math_settings_on, tmp_path: Path) -> None:
    output = tmp_path / "deploy.safetensors"
    assert invoke("convert", SAMPLES / "repvgg_tiny.pt", output).exit_code == 0
    spy = Spy(monkeypatch)
    for args in ((), ("--against", SAMPLES / "repvgg_tiny.pt")):
        assert invoke("verify", output, *args).exit_code == 0
    assert spy.kinds() and spy.kinds() == {(name, "cpu", torch.float64) for name, _, _ in spy.kinds()}
