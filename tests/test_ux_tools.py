"""bench and export as a person uses them: medians with their spread, the speedup with an interval
and a plain warning when it cannot tell, a deploy-form file named as such, onnxruntime timed with its
own optimizations (--onnx), and export's --half, --dynamic, --opset, --slim; progress on stderr
only on a terminal and never with --quiet."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repvgg_cli.bench import run as bench_run
from tests import zoo
from repvgg_cli.bench.results import Speedup, Timing, speedup_of
from repvgg_cli.api import reparameterize
from tests.helpers import ROOT, error_lines, invoke

SMALL = ["--input-shape", "1,3,32,32", "--warmup", "1", "--repeat", "5", "--threads", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ux_tools")
    paths = {"tiny": folder / "tiny_train.pt", "plain_state": folder / "plain_state.pt"}
    torch.save(zoo.randomize_bn(zoo.repvgg("tiny"), seed=3), paths["tiny"])
    torch.save(zoo.randomize_bn(zoo.PlainNet(), seed=4).state_dict(), paths["plain_state"])
    return paths


# -- bench statistics ----------------------------------------------------------------------------


def test_timing_spread_is_the_interquartile_range() -> None:
    t = Timing((5.0, 1.0, 3.0, 2.0, 4.0))
    assert (t.median_ms, t.q1_ms, t.q3_ms, t.iqr_ms, t.min_ms, t.max_ms) == (3.0, 2.0, 4.0, 2.0, 1.0, 5.0)


def test_speedup_interval_is_seeded_and_says_when_it_cannot_tell() -> None:
    slow, fast = Timing((10.0, 10.5, 9.8, 10.2, 10.1)), Timing((5.0, 5.2, 4.9, 5.1, 5.0))
    clear = speedup_of(slow, fast, seed=0)
    assert clear == speedup_of(slow, fast, seed=0)  # the same passes give the same interval
    assert clear.ratio == pytest.approx(10.1 / 5.0)
    assert 1.0 < clear.low <= clear.ratio <= clear.high and clear.conclusive
    noisy = speedup_of(Timing((4.0, 9.0, 5.0, 12.0, 6.0)), Timing((5.0, 3.0, 10.0, 6.0, 4.0)), seed=0)
    assert noisy.low < 1.0 < noisy.high and not noisy.conclusive


def test_bench_json_has_each_sides_spread_and_the_interval(files) -> None:
    result = invoke("bench", files["tiny"], "--allow-pickle", *SMALL, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    for form in ("train", "deploy"):
        side = doc[form]
        samples = sorted(side["samples_ms"])
        assert side["median_ms"] == samples[2] and side["min_ms"] == samples[0] and side["max_ms"] == samples[-1]
        assert side["q1_ms"] == samples[1] and side["q3_ms"] == samples[3]
        assert side["iqr_ms"] == pytest.approx(samples[3] - samples[1])
    interval = doc["speedup_interval"]
    assert interval["low"] <= interval["ratio"] <= interval["high"] and interval["interval"] == 0.95
    assert interval["ratio"] == pytest.approx(doc["speedup"])
    assert interval["conclusive"] == (not interval["low"] <= 1.0 <= interval["high"])
    assert doc["onnxruntime"] is None


def test_bench_warns_in_plain_words_when_the_spread_decides_nothing(files, monkeypatch) -> None:
    monkeypatch.setattr(bench_run, "speedup_of", lambda slow, fast, seed=0: Speedup(1.05, 0.9, 1.3))
    result = invoke("bench", files["tiny"], "--allow-pickle", *SMALL)
    assert result.exit_code == 0, result.stderr
    assert "speedup 1.05x (train median / deploy median; 95% interval 0.90x-1.30x)" in result.stdout
    assert ("warning: the spread of the passes is too wide to tell which form is faster (the interval 0.90x-1.30x "
            "includes 1x)") in result.stderr
    table = [line.split() for line in result.stdout.splitlines() if line.startswith(("train", "deploy"))]
    assert [row[0] for row in table] == ["train", "deploy"] and all(len(row) == 5 for row in table)


def test_bench_on_a_deploy_form_state_dict_says_it_is_deployed(files, tmp_path) -> None:
    deploy = tmp_path / "plain_deploy.safetensors"
    assert invoke("convert", files["plain_state"], deploy).exit_code == 0
    result = invoke("bench", deploy, "--model", "tests.zoo:PlainNet", *SMALL)
    assert result.exit_code == 2
    (line,) = error_lines(result)
    assert line.startswith(f"Error: {deploy} is already in deploy form (written by repvgg convert): 4 fused block(s)")
    assert "missing" not in result.stderr.lower()
    assert "Hint: bench the train-form checkpoint it was converted from" in result.stderr


def test_bench_onnx_times_both_graphs_in_onnxruntime(files) -> None:
    pytest.importorskip("onnxruntime")
    result = invoke("bench", files["tiny"], "--allow-pickle", *SMALL, "--onnx", "--json")
    assert result.exit_code == 0, result.stderr
    ort = json.loads(result.stdout)["onnxruntime"]
    assert ort["graph_optimization"] == "ORT_ENABLE_ALL"
    for form in ("train", "deploy"):
        assert len(ort[form]["samples_ms"]) == 5 and all(s > 0 for s in ort[form]["samples_ms"])
    assert ort["speedup"]["low"] <= ort["speedup"]["ratio"] <= ort["speedup"]["high"]
    assert ort["outputs"]["rel_err"] < 1e-4  # the deploy graph computes what the train graph computes
    table = invoke("bench", files["tiny"], "--allow-pickle", *SMALL, "--onnx")
    assert "train, onnxruntime" in table.stdout and "deploy, onnxruntime" in table.stdout
    assert "(ORT_ENABLE_ALL, opset 17): speedup" in table.stdout


# -- export options ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_modules():
    return pytest.importorskip("onnx"), pytest.importorskip("onnxruntime")


def reference(path: Path) -> torch.nn.Module:
    model = torch.load(path, map_location="cpu", weights_only=False)
    return reparameterize(model.eval(), check_model=False).model.eval()


def run_graph(ort, path: Path, x: torch.Tensor):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def test_export_half_is_float16_and_close_to_the_float32_model(files, onnx_modules, tmp_path) -> None:
    onnx, ort = onnx_modules
    out = tmp_path / "half.onnx"
    result = invoke("export", files["tiny"], out, "--allow-pickle", "--input-shape", "1,3,32,32", "--half", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["half"] is True and doc["dtype"] == "float16"
    graph = onnx.load(str(out))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7)).half()
    got = torch.from_numpy(run_graph(ort, out, x)).double()
    with torch.no_grad():
        want = reference(files["tiny"])(x.float()).double()
    assert float((got - want).abs().max() / want.abs().max()) < 1e-2
    assert all(c["rtol"] == 1e-2 for c in doc["onnxruntime"]["checks"])


def test_export_dynamic_makes_batch_and_spatial_axes_symbolic(files, onnx_modules, tmp_path) -> None:
    onnx, ort = onnx_modules
    out = tmp_path / "dynamic.onnx"
    result = invoke("export", files["tiny"], out, "--allow-pickle", "--input-shape", "1,3,32,32", "--dynamic",
                    "--opset", "13", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["dynamic"] is True and doc["opset"] == 13
    assert [c["input_shape"] for c in doc["onnxruntime"]["checks"]] == [[1, 3, 32, 32], [2, 3, 64, 64]]
    graph = onnx.load(str(out))
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    assert graph.opset_import[0].version == 13
    x = torch.randn(3, 3, 48, 40, generator=torch.Generator().manual_seed(8))
    got = torch.from_numpy(run_graph(ort, out, x))
    with torch.no_grad():
        want = reference(files["tiny"])(x)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4


def test_export_slim_runs_onnxslim_before_the_check(files, onnx_modules, tmp_path) -> None:
    onnx, ort = onnx_modules
    pytest.importorskip("onnxslim")
    out = tmp_path / "slim.onnx"
    result = invoke("export", files["tiny"], out, "--allow-pickle", "--input-shape", "1,3,32,32", "--slim", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    slimmed = doc["slimmed"]
    assert slimmed["nodes_after"] <= slimmed["nodes_before"] and slimmed["onnxslim"]
    assert len(onnx.load(str(out)).graph.node) == slimmed["nodes_after"]
    assert doc["onnxruntime"]["ok"] is True
    assert result.stderr.splitlines()[-1].startswith(f"wrote {out} (")


def test_export_slim_without_onnxslim_is_refused_before_any_work(files, onnx_modules, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxslim", None)
    out = tmp_path / "slim.onnx"
    result = invoke("export", files["tiny"], out, "--allow-pickle", "--slim")
    assert result.exit_code == 2 and not out.exists()
    assert error_lines(result)[0].startswith("Error: --slim needs onnxslim")
    assert 'Hint: install the optional extra: pip install -e ".[slim]"' in result.stderr


# -- progress ------------------------------------------------------------------------------------


def run_with_terminal_stderr(*args: object) -> tuple[int, str, str]:
    """The real entry point with stderr on a pseudo-terminal (stdout a pipe): (status, stdout, stderr)."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "100", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "repvgg_cli", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=slave, cwd=ROOT, env=env)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    stdout = process.stdout.read().decode()
    status = process.wait(timeout=300)
    os.close(master)
    return status, stdout, b"".join(chunks).decode(errors="replace")


def test_progress_on_a_terminal_only_and_never_with_quiet(files) -> None:
    args = ["bench", files["tiny"], "--allow-pickle", *SMALL]
    status, stdout, stderr = run_with_terminal_stderr(*args)
    assert status == 0, stderr
    for step in ("reading", "timing the train form", "fusing blocks in place", "timing the deploy form"):
        assert step in stderr, (step, stderr)
    assert "timing" not in stdout  # results on stdout, progress on stderr
    status, _, quiet = run_with_terminal_stderr(*args, "--quiet")
    assert status == 0 and "timing" not in quiet and "reading" not in quiet
    piped = invoke(*args)  # stderr not a terminal: no progress
    assert piped.exit_code == 0 and "timing" not in piped.stderr and "reading" not in piped.stderr
