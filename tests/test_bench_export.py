"""`repvgg bench` and `repvgg export` through Typer's CliRunner: exit codes, JSON fields, files written.

Models are pickles of tests.zoo classes (importable, so unpickling works in the runner).
No assertion depends on how fast anything ran: latencies are only checked to be positive and
consistent with the speedup reported.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from repvgg_cli.api import reparameterize
from repvgg_cli.cli import app
from tests import zoo
from tests.helpers import RUNNER, invoke
from tests.helpers import error_lines as errors

TINY_BLOCKS = 7
PLAIN_BLOCKS = 4
SMALL = ["--resolution", "32", "--warmup", "1", "--repeat", "3", "--threads", "1"]
SHAPE = ["--input-shape", "1,3,32,32"]
PIP_HINT = 'pip install -e ".[onnx]"'


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bench_export")
    torch.manual_seed(0)
    paths = {
        "tiny": folder / "tiny_train.pt",
        "tiny_deploy": folder / "tiny_deploy.pt",
        "plain_state": folder / "plain_state.pt",
    }
    torch.save(zoo.randomize_bn(zoo.repvgg("tiny"), seed=1), paths["tiny"])
    torch.save(zoo.repvgg("tiny", deploy=True), paths["tiny_deploy"])
    torch.save(zoo.randomize_bn(zoo.PlainNet(), seed=2).state_dict(), paths["plain_state"])
    return paths


def torch_deploy(path: Path) -> torch.nn.Module:
    """The pickled train model, fused by the library (the reference the ONNX file must match)."""
    model = torch.load(path, map_location="cpu", weights_only=False)
    return reparameterize(model.eval(), check_model=False).model.eval()


# -- bench -------------------------------------------------------------------------------------


def test_bench_json_pickled_model(files):
    result = invoke("bench", files["tiny"], "--allow-pickle", *SMALL, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["command"] == "bench"
    assert doc["device"] == "cpu" and doc["threads"] == 1
    assert doc["input_shape"] == [1, 3, 32, 32] and doc["dtype"] == "float32"
    assert doc["warmup"] == 1 and doc["repeat"] == 3
    for form in ("train", "deploy"):
        samples = doc[form]["samples_ms"]
        assert len(samples) == 3 and all(s > 0 for s in samples)
        assert doc[form]["median_ms"] == sorted(samples)[1]
        assert doc[form]["min_ms"] == min(samples)
    assert doc["speedup"] == pytest.approx(doc["train"]["median_ms"] / doc["deploy"]["median_ms"])
    assert doc["speedup"] > 0
    assert doc["params"] == {"train": params(zoo.repvgg("tiny")), "deploy": params(zoo.repvgg("tiny", deploy=True))}
    assert doc["params"]["train"] > doc["params"]["deploy"]
    assert doc["blocks"] == TINY_BLOCKS and doc["reparameterized"] == "in place"
    assert doc["outputs_match"] is True and doc["failed_blocks"] == []
    check = doc["model_check"]
    assert check["ok"] is True and check["input_shape"] == [1, 3, 32, 32] and check["dtype"] == "float64"
    assert 0 <= check["rel_err"] < 1e-6  # float32 fused weights, compared in float64
    assert doc["timed_outputs"]["rel_err"] < 1e-5
    assert doc["tf32_disabled"] is False


def test_bench_table_and_state_dict_with_model(files):
    result = invoke("bench", files["plain_state"], "--model", "tests.zoo:PlainNet", "--input-shape", "2,3,16,16",
                    "--warmup", "0", "--repeat", "2")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "input (2, 3, 16, 16) float32 on cpu" in out and "2 timed pass(es) per form after 0 warm-up" in out
    assert "speedup " in out and f"{PLAIN_BLOCKS} block(s) fused in place" in out
    assert "outputs match: yes" in out
    train = zoo.PlainNet()
    assert f"{params(train):,}" in out and f"{params(zoo.PlainNet(deploy=True)):,}" in out


def test_bench_refuses_pickle_without_allow_pickle(files):
    result = invoke("bench", files["tiny"], *SMALL)
    assert result.exit_code == 2
    assert len(errors(result)) == 1 and "loading it would run code" in errors(result)[0]
    assert "--allow-pickle" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_bench_cuda_without_gpu_exits_2(files, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke("bench", files["tiny"], "--allow-pickle", *SMALL, "--device", "cuda")
    assert result.exit_code == 2
    assert errors(result) and errors(result)[0].startswith("Error: --device cuda: CUDA is not available")
    assert "Hint: use --device cpu" in result.stderr


def test_bench_unknown_device_exits_2(files):
    result = invoke("bench", files["tiny"], "--allow-pickle", *SMALL, "--device", "tpu")
    assert result.exit_code == 2
    assert errors(result) == ["Error: --device 'tpu': use cpu or cuda (cuda:N)"]


def test_bench_deploy_form_exits_2(files):
    result = invoke("bench", files["tiny_deploy"], "--allow-pickle", *SMALL)
    assert result.exit_code == 2
    assert "already in deploy form" in errors(result)[0]


def test_bench_state_dict_without_model_exits_2(files):
    result = invoke("bench", files["plain_state"], *SMALL)
    assert result.exit_code == 2
    assert "holds a state dict, not a model" in errors(result)[0]
    assert "--model MODULE:CALLABLE" in result.stderr


def test_bench_shape_options_conflict(files):
    result = invoke("bench", files["tiny"], "--allow-pickle", "--input-shape", "1,3,32,32", "--batch", "2")
    assert result.exit_code == 2
    assert "do not combine it with --batch or --resolution" in errors(result)[0]


def test_bench_not_equivalent_exits_1(files):
    result = invoke("bench", files["tiny"], "--allow-pickle", *SMALL, "--rtol", "0", "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["outputs_match"] is False and doc["model_check"]["ok"] is False
    assert errors(result)[0].startswith("Error: not equivalent")


def test_bench_leaves_the_source_untouched(files):
    before = hashlib.sha256(files["tiny"].read_bytes()).hexdigest()
    assert invoke("bench", files["tiny"], "--allow-pickle", *SMALL, "--json").exit_code == 0
    assert hashlib.sha256(files["tiny"].read_bytes()).hexdigest() == before


# -- export ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ort():
    # The export tests are skipped only when the optional extra is not installed; CI installs it.
    pytest.importorskip("onnx")
    return pytest.importorskip("onnxruntime")


def run_onnx(ort, path: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def assert_close(reference: torch.Tensor, candidate: torch.Tensor, rtol: float = 1e-4) -> None:
    assert candidate.shape == reference.shape
    err = float((reference - candidate).abs().max())
    assert err <= rtol * float(reference.abs().max()), err


def test_export_pickled_train_model_matches_torch(files, ort, tmp_path):
    out = tmp_path / "tiny.onnx"
    result = invoke("export", files["tiny"], out, "--allow-pickle", *SHAPE, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["written"] is True and doc["source_form"] == "pickled train model"
    assert doc["fused_blocks"] == TINY_BLOCKS and doc["fusion_ok"] is True and doc["model_check"]["ok"] is True
    assert doc["opset"] == 17 and doc["input_shape"] == [1, 3, 32, 32] and doc["dynamic_batch"] is False
    assert "dynamo=False" in doc["exporter"]
    checks = doc["onnxruntime"]["checks"]
    assert [c["seed"] for c in checks] == [0, 1] and all(c["ok"] for c in checks)
    assert doc["onnxruntime"]["rel_err"] < 1e-4 and doc["onnxruntime"]["ok"] is True
    data = out.read_bytes()
    assert doc["size"] == len(data) and doc["sha256"] == hashlib.sha256(data).hexdigest()
    assert not [p for p in tmp_path.iterdir() if p.name != "tiny.onnx"]  # no temporary file left

    import onnx

    proto = onnx.load(str(out))
    assert proto.opset_import[0].version == 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["repvgg_cli.source_form"] == "pickled train model"
    assert meta["repvgg_cli.source_sha256"] == hashlib.sha256(files["tiny"].read_bytes()).hexdigest()
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    assert sum(n.op_type == "Conv" for n in proto.graph.node) == TINY_BLOCKS

    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        reference = torch_deploy(files["tiny"])(x)
    assert_close(reference, run_onnx(ort, out, x))


def test_export_dynamic_batch_and_opset(files, ort, tmp_path):
    out = tmp_path / "tiny_dyn.onnx"
    result = invoke("export", files["tiny"], out, "--allow-pickle", *SHAPE, "--dynamic-batch", "--opset", "13")
    assert result.exit_code == 0, result.stderr
    assert "opset 13" in result.stdout and "(dynamic batch)" in result.stdout
    assert "input (2, 3, 32, 32) seed 1" in result.stdout  # the second check runs another batch size
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = torch_deploy(files["tiny"])(x)
    assert_close(reference, run_onnx(ort, out, x))


def test_export_deploy_state_dict_with_train_factory(files, ort, tmp_path):
    deploy = tmp_path / "plain_deploy.safetensors"
    assert invoke("convert", files["plain_state"], deploy).exit_code == 0
    out = tmp_path / "plain.onnx"
    result = invoke("export", deploy, out, "--model", "tests.zoo:PlainNet", *SHAPE, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["source_form"] == "deploy state dict" and doc["fused_blocks"] == 0 and doc["written"] is True

    train = zoo.PlainNet()
    train.load_state_dict(torch.load(files["plain_state"], weights_only=True))
    reference_model = reparameterize(train, check_model=False).model.eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference = reference_model(x)
    assert_close(reference, run_onnx(ort, out, x))


def test_export_train_state_dict_and_deploy_pickle(files, ort, tmp_path):
    result = invoke("export", files["plain_state"], tmp_path / "a.onnx", "--model", "tests.zoo:PlainNet", *SHAPE,
                    "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["source_form"] == "train state dict" and doc["fused_blocks"] == PLAIN_BLOCKS
    result = invoke("export", files["tiny_deploy"], tmp_path / "b.onnx", "--allow-pickle", *SHAPE, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["source_form"] == "pickled deploy model" and doc["fused_blocks"] == 0 and doc["model_check"] is None


def test_export_is_deterministic(files, ort, tmp_path):
    one, two = tmp_path / "one.onnx", tmp_path / "two.onnx"
    for out in (one, two):
        assert invoke("export", files["tiny"], out, "--allow-pickle", *SHAPE).exit_code == 0
    assert one.read_bytes() == two.read_bytes()


def test_export_refuses_existing_output_without_force(files, ort, tmp_path):
    out = tmp_path / "exists.onnx"
    out.write_bytes(b"keep me")
    result = invoke("export", files["tiny"], out, "--allow-pickle", *SHAPE)
    assert result.exit_code == 2
    assert errors(result) == [f"Error: {out} exists"] and "Hint: pass --force to replace it" in result.stderr
    assert out.read_bytes() == b"keep me"
    result = invoke("export", files["tiny"], out, "--allow-pickle", *SHAPE, "--force")
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes() != b"keep me" and f"wrote {out}" in result.stdout


def test_export_refuses_a_symbolic_link_at_the_output_even_with_force(files, ort, tmp_path):
    """The output follows the rules of every path repvgg writes: never through or over a link."""
    target = tmp_path / "elsewhere.onnx"
    target.write_bytes(b"keep me")
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    result = invoke("export", files["tiny"], link, "--allow-pickle", *SHAPE, "--force")
    assert result.exit_code == 2
    assert errors(result) == [f"Error: {link} is a symbolic link; files are never written through or over one"]
    assert link.is_symlink() and target.read_bytes() == b"keep me"


def test_export_without_force_never_replaces_an_output_that_appears_meanwhile(files, ort, tmp_path, monkeypatch):
    """Two exports to one new path: the second to finish fails instead of replacing the first's."""
    from repvgg_cli.export import file as export_file_module

    out = tmp_path / "race.onnx"
    real = export_file_module.check_with_onnxruntime

    def check_then_someone_writes(*args, **kwargs):
        checks = real(*args, **kwargs)
        out.write_bytes(b"the other process's file")
        return checks

    monkeypatch.setattr(export_file_module, "check_with_onnxruntime", check_then_someone_writes)
    result = invoke("export", files["tiny"], out, "--allow-pickle", *SHAPE)
    assert result.exit_code == 2
    assert errors(result) == [(f"Error: {out} appeared while this command ran (another process wrote it); "
                               "it was left as it was")]
    assert out.read_bytes() == b"the other process's file"
    assert [p.name for p in tmp_path.iterdir()] == ["race.onnx"]  # no temporary file left


def test_export_check_failure_writes_nothing(files, ort, tmp_path):
    out = tmp_path / "strict.onnx"
    result = invoke("export", files["tiny"], out, "--allow-pickle", *SHAPE, "--rtol", "0", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["written"] is False
    assert errors(result) == [
        "Error: not equivalent: onnxruntime's output differs from torch's beyond the tolerance; nothing was written"
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{plain_state}", "{out}"], "holds a state dict, not a model"),
        (["{tiny}", "{tmp}/x.pt", "--allow-pickle"], "the output must be an .onnx file"),
        (["{tiny}", "{out}"], "loading it would run code"),
        (["{tiny}", "{out}", "--allow-pickle", "--opset", "6"], "supports opsets 7 to"),
        (["{tiny}", "{out}", "--allow-pickle", "--opset", "99"], "supports opsets 7 to"),
        (["{tiny}", "{out}", "--allow-pickle", "--input-shape", "1,3,32"], "expected four integers N,C,H,W"),
        (["{tiny}", "{tmp}/missing/x.onnx", "--allow-pickle"], "does not exist"),
        (["{plain_state}", "{out}", "--model", "tests.zoo:repvgg"], "loads neither into --model"),
    ],
)
def test_export_bad_input_exits_2(files, ort, tmp_path, args, message):
    names = {"plain_state": files["plain_state"], "tiny": files["tiny"], "out": tmp_path / "o.onnx", "tmp": tmp_path}
    result = invoke("export", *[a.format(**names) for a in args])
    assert result.exit_code == 2, result.stderr
    assert len(errors(result)) == 1 and message in errors(result)[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "o.onnx").exists()


def test_export_without_the_onnx_extra_exits_2_with_hint(files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    out = tmp_path / "x.onnx"
    result = invoke("export", files["tiny"], out, "--allow-pickle", *SHAPE)
    assert result.exit_code == 2
    assert errors(result)[0].startswith("Error: export needs onnx and onnxruntime")
    assert f"Hint: install the optional extra: {PIP_HINT}" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("command", ["bench", "export"])
def test_every_option_in_the_readme_section_exists(command):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split(f"### `repvgg {command} ", 1)[1].split("\n#", 1)[0]
    options = set(re.findall(r"`(--[a-z-]+)", section))
    assert len(options) >= 10
    help_text = RUNNER.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).stdout
    for option in options:
        assert option in help_text, (command, option)
