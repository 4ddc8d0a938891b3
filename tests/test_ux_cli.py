"""The command line as a person meets it: -h, usage errors, shell completion, --json that stays
one document while model code prints, and names that are shown exactly as they are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, SAMPLES, error_lines, invoke

COMMANDS = ["convert", "verify", "inspect", "families", "bench", "export", "env"]


def run_repvgg(*args: object, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real entry point in a new process (so file-descriptor-level writes are caught)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "repvgg_cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=300)


# -- -h, usage errors, completion ---------------------------------------------------------------


@pytest.mark.parametrize("command", [[], *[[c] for c in COMMANDS]])
def test_dash_h_is_help(command: list[str]) -> None:
    short, long = invoke(*command, "-h"), invoke(*command, "--help")
    assert short.exit_code == 0 and long.exit_code == 0
    assert short.stdout == long.stdout and "Usage: repvgg" in short.stdout


@pytest.mark.parametrize("args, message", [
    (["convert", "a.pt", "b.pt", "--no-such-option"], "Error: No such option: --no-such-option"),
    (["no-such-command"], "Error: No such command 'no-such-command'."),
    (["convert"], "Error: Missing argument 'SOURCE... OUTPUT'."),
    (["convert", "a.pt", "b.pt", "--jobs", "0"], "Error: Invalid value for '--jobs'"),
    (["bench", "a.pt", "--repeat", "many"], "Error: Invalid value for '--repeat'"),
])
def test_usage_errors_are_one_line_with_exit_2(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.splitlines()
    assert error_lines(result) == [lines[0]] and lines[0].startswith(message), result.stderr
    assert lines[1:] == [f"Hint: see 'repvgg{' ' + args[0] if args[0] != 'no-such-command' else ''} --help'"]
    assert not any(c in result.stderr for c in "╭╰│─"), "no box"
    assert result.stdout == ""


def test_usage_error_from_the_real_entry_point() -> None:
    result = run_repvgg("inspect", "--bogus")
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == "Error: No such option: --bogus"
    assert "Traceback" not in result.stderr and "╭" not in result.stderr


def test_shell_completion_is_available() -> None:
    assert "--install-completion" in invoke("--help").stdout
    script = run_repvgg("--show-completion", "bash")
    assert script.returncode == 0 and "_REPVGG_COMPLETE=complete_bash" in script.stdout
    # what bash asks when the user presses TAB after `repvgg con`
    answer = run_repvgg(env={"_REPVGG_COMPLETE": "complete_bash", "COMP_WORDS": "repvgg con", "COMP_CWORD": "1"})
    assert answer.returncode == 0 and answer.stdout.split() == ["convert"]


# -- --json: one document on stdout, whatever model code prints ----------------------------------

NOISY_MODEL = '''
import os, sys
from tests import zoo
print("import-time print")
os.write(1, b"import-time write to fd 1\\n")


class Noisy(zoo.PlainNet):
    def __init__(self):
        super().__init__()
        print("constructor print")
        sys.stdout.write("constructor sys.stdout.write\\n")

    def forward(self, x):
        print("forward print")
        os.write(1, b"forward write to fd 1\\n")
        return super().forward(x)


def make():
    return Noisy()
'''


@pytest.mark.parametrize("command", ["convert", "bench"])
def test_json_stdout_is_one_document_while_model_code_prints(tmp_path: Path, command: str) -> None:
    (tmp_path / "noisy_model.py").write_text(NOISY_MODEL, encoding="utf-8")
    source = SAMPLES / "plain_net.pt"
    if command == "convert":  # a failing check (exit 1) still gives its one document
        args = ["convert", source, tmp_path / "deploy.safetensors", "--model", "noisy_model:make", "--json", "--rtol", "0"]
    else:
        args = ["bench", source, "--model", "noisy_model:make", "--json", "--input-shape", "1,3,16,16",
                "--warmup", "0", "--repeat", "2", "--threads", "1"]
    result = run_repvgg(*args, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert result.returncode == (1 if command == "convert" else 0), result.stderr
    document = json.loads(result.stdout)  # the whole of stdout is one JSON document
    assert document["command"] == command
    if command == "convert":
        assert document["ok"] is False and not (tmp_path / "deploy.safetensors").exists()
    for text in ("import-time print", "import-time write to fd 1", "constructor print",
                 "constructor sys.stdout.write", "forward print", "forward write to fd 1"):
        assert text in result.stderr, text
        assert text not in result.stdout


# -- repvgg env ---------------------------------------------------------------------------------


def test_env_names_every_version_and_the_threads() -> None:
    import importlib.metadata

    import torch

    import repvgg_cli

    result = invoke("env")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"repvgg_cli: {repvgg_cli.__version__}"
    assert any(line.startswith(f"torch: {torch.__version__} (") for line in lines)
    for name in ("timm", "onnx", "onnxruntime"):
        try:
            want = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            want = "not installed"
        assert f"{name}: {want}" in lines
    assert any(line.startswith(f"threads: torch {torch.get_num_threads()} intra-op") for line in lines)
    document = json.loads(invoke("env", "--json").stdout)
    assert document["torch"]["version"] == torch.__version__
    assert document["threads"]["torch_intra_op"] == torch.get_num_threads()
    assert document["packages"]["timm"] == importlib.metadata.version("timm")
