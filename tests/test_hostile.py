"""Hostile checkpoints: a file whose unpickling would run code is refused, and the code never runs.

Each payload, when unpickled, creates a marker file: its absence after a command is the proof that
nothing from the file ran. The payloads are refused by ``repvgg inspect``, ``convert`` and
``verify`` (the installed console script in a subprocess, and the Typer app through CliRunner)
without ``--allow-pickle``: exit 2, one ``Error:`` line naming the file, no traceback, no output.
The same holds with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in the environment, and after the process
has allow-listed the payload with torch's process-wide ``add_safe_globals`` / ``safe_globals``
(which is no substitute for the explicit opt-in). ``.pt2`` programs are refused without ever
being handed to ``torch.export.load``. Controls show each payload is live when unpickling is allowed.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from repvgg_cli.io import read as checkpoint
from repvgg_cli.io.read import load_checkpoint
from repvgg_cli.errors import InputError, PickleRefusedError
from tests.helpers import invoke, SAMPLES

PLAIN = SAMPLES / "plain_net.pt"
REPVGG = Path(sys.executable).with_name("repvgg")
FORCE_UNSAFE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


# -- payloads ----------------------------------------------------------------------------------


def touch_marker(path: str) -> dict:
    """What a hostile pickle calls: proof that code from the file ran."""
    pathlib.Path(path).touch()
    return {}


class CallsOnLoad:
    """Unpickles by calling a function: ``os.system``, ``pathlib.Path.touch`` or :func:`touch_marker`."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "os-system":
            return (os.system, (f"touch '{self.marker}'",))
        if self.how == "path-touch":
            return (pathlib.Path.touch, (pathlib.Path(self.marker),))
        return (touch_marker, (str(self.marker),))


class BuildsOnLoad:
    """Unpickles by constructing an instance and setting its state: ``__setstate__`` runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __setstate__(self, state: dict) -> None:
        pathlib.Path(state["marker"]).touch()
        self.__dict__.update(state)


def plain_state() -> "OrderedDict[str, torch.Tensor]":
    return torch.load(PLAIN, map_location="cpu", weights_only=True)


def hostile_file(folder: Path, how: str, layout: str, legacy: bool = False,
                 name: str = "hostile.pt") -> tuple[Path, Path]:
    """A checkpoint carrying a payload alone, nested in a container, or deep inside one."""
    marker = folder / f"marker-{how}-{layout}"
    payload = BuildsOnLoad(marker) if how == "builds" else CallsOnLoad(marker, how)
    if layout == "bare":
        obj: object = payload
    elif layout == "container":
        obj = {"state_dict": plain_state(), "epoch": 3, "extra": payload}
    else:  # deep: inside a list inside a dict inside the weights' own entry
        obj = {"model": {**plain_state(), "meta": [1, {"callback": payload}]}, "optimizer": {}}
    path = folder / name
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()
    return path, marker


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_refused(exit_code: int, stdout: str, stderr: str, path: Path) -> None:
    """Exit 2, one ``Error:`` line naming the file and what it holds, the hint, no traceback."""
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert exit_code == 2, (stdout, stderr)
    assert len(errors) == 1, stderr
    assert errors[0].startswith(f"Error: {path} holds ")
    assert errors[0].endswith("; loading it would run code from the file")
    assert "Hint: if you trust this file, pass --allow-pickle (see README: Safety)" in stderr.splitlines()
    assert "Traceback" not in stdout + stderr


@pytest.fixture(scope="module")
def deploy(tmp_path_factory) -> Path:
    """plain_net's deploy file, for ``verify DEPLOY --against HOSTILE``."""
    path = tmp_path_factory.mktemp("deploy") / "deploy.safetensors"
    assert invoke("convert", PLAIN, path).exit_code == 0
    return path


def commands(path: Path, folder: Path, deploy: Path) -> dict[str, list[object]]:
    """Every command that reads ``path``; ``verify --against`` reads it as the train-form source."""
    return {
        "inspect": ["inspect", path],
        "convert": ["convert", path, folder / "out.safetensors"],
        "verify": ["verify", path],
        "verify --against": ["verify", deploy, "--against", path],
    }


# -- the command line, in process --------------------------------------------------------------


@pytest.mark.parametrize("force_unsafe_env", [False, True], ids=["default-env", FORCE_UNSAFE])
@pytest.mark.parametrize("layout", ["bare", "container", "deep"])
@pytest.mark.parametrize(("how", "legacy"), [("os-system", False), ("path-touch", True)], ids=["os-system-zip",
                                                                                          "path-touch-legacy"])
def test_every_command_refuses_a_hostile_pickle(tmp_path, monkeypatch, deploy, how, layout, legacy,
                                                 force_unsafe_env) -> None:
    if force_unsafe_env:
        monkeypatch.setenv(FORCE_UNSAFE, "1")
    path, marker = hostile_file(tmp_path, how, layout, legacy)
    digest = sha256(path)
    for name, args in commands(path, tmp_path, deploy).items():
        result = invoke(*args)
        assert_refused(result.exit_code, result.stdout, result.stderr, path)
        assert not marker.exists(), name
    assert os.listdir(tmp_path) == ["hostile.pt"]
    assert sha256(path) == digest


@pytest.mark.parametrize("how", ["os-system", "path-touch", "builds"])
def test_the_payload_is_live_when_unpickling_is_allowed(tmp_path: Path, how: str) -> None:
    # The control: the same file does run its code with --allow-pickle, so the absence of the
    # marker above means the file was refused, not that the payload was a dud.
    path, marker = hostile_file(tmp_path, how, "container")
    result = invoke("inspect", path, "--allow-pickle")
    assert marker.exists()
    assert result.exit_code == 0, result.stderr
    assert "entry used: state_dict" in result.stdout


def test_the_refusal_names_what_the_file_holds(tmp_path: Path) -> None:
    path, _ = hostile_file(tmp_path, "builds", "bare")
    with pytest.raises(PickleRefusedError) as info:
        load_checkpoint(path)
    assert info.value.message == (
        f"{path} holds a pickled object of type tests.test_hostile.BuildsOnLoad; "
        "loading it would run code from the file"
    )
    path, _ = hostile_file(tmp_path, "os-system", "bare", name="system.pt")
    with pytest.raises(PickleRefusedError) as info:
        load_checkpoint(path)
    assert info.value.message == (
        f"{path} holds a pickled object of type {os.system.__module__}.system; loading it would run code from the file"
    )


# -- the installed console script ----------------------------------------------------------------


def test_the_installed_command_refuses_hostile_pickles(tmp_path: Path) -> None:
    """The real ``repvgg`` in subprocesses (side by side), with the environment variable that turns
    torch's own weights-only default off: inspect, convert, verify, each refused."""
    runs = {}
    for name, how, layout, legacy, argv in [
        ("inspect", "os-system", "bare", False, lambda p: ["inspect", p]),
        ("convert", "path-touch", "container", True, lambda p: ["convert", p, tmp_path / "convert" / "out.pt"]),
        ("verify", "os-system", "deep", False, lambda p: ["verify", p]),
    ]:
        folder = tmp_path / name.replace(" ", "")
        folder.mkdir()
        path, marker = hostile_file(folder, how, layout, legacy)
        env = {**os.environ, FORCE_UNSAFE: "1", "COLUMNS": "200"}
        process = subprocess.Popen([str(REPVGG), *map(str, argv(path))], cwd=tmp_path, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        runs[name] = (process, path, marker, folder)
    for name, (process, path, marker, folder) in runs.items():
        stdout, stderr = process.communicate(timeout=300)
        assert_refused(process.returncode, stdout, stderr, path)
        assert not marker.exists(), name
        assert os.listdir(folder) == ["hostile.pt"], name


# -- torch's process-wide allow-list is no opt-in ----------------------------------------------


@pytest.mark.parametrize("how", ["calls", "builds"])
def test_an_allow_list_entry_does_not_let_a_payload_through(tmp_path: Path, deploy: Path, how: str) -> None:
    allowed = touch_marker if how == "calls" else BuildsOnLoad
    path, marker = hostile_file(tmp_path, how, "container")
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([allowed])
    try:
        listed = set(torch.serialization.get_safe_globals())
        assert allowed in listed
        with pytest.raises(PickleRefusedError) as info:
            load_checkpoint(path)
        assert not marker.exists()
        assert info.value.message.startswith(f"{path} holds a pickled object of type tests.test_hostile.")
        for args in commands(path, tmp_path, deploy).values():
            result = invoke(*args)
            assert_refused(result.exit_code, result.stdout, result.stderr, path)
        assert not marker.exists()
        # the user's list is given back as it was, after refusals and after successful loads
        assert set(torch.serialization.get_safe_globals()) == listed
        assert len(load_checkpoint(PLAIN).state_dict) == 60
        assert set(torch.serialization.get_safe_globals()) == listed
        # the control: torch itself, told the same list, runs the payload
        torch.load(path, map_location="cpu", weights_only=True)
        assert marker.exists()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def test_the_safe_globals_context_manager_does_not_let_a_payload_through(tmp_path: Path) -> None:
    # torch itself allow-lists some classes when imported (exceptions, NestedTensor, ...): the
    # list is compared with what it held before, not with an empty one
    baseline = set(torch.serialization.get_safe_globals())
    path, marker = hostile_file(tmp_path, "builds", "deep")
    with torch.serialization.safe_globals([BuildsOnLoad]):
        with pytest.raises(PickleRefusedError):
            load_checkpoint(path)
        assert not marker.exists()
        assert set(torch.serialization.get_safe_globals()) == baseline | {BuildsOnLoad}
    assert set(torch.serialization.get_safe_globals()) == baseline


def test_the_allow_list_is_restored_when_the_load_itself_fails(tmp_path: Path) -> None:
    baseline = set(torch.serialization.get_safe_globals())
    broken = tmp_path / "broken.pt"
    broken.write_bytes(PLAIN.read_bytes()[:5000])
    with torch.serialization.safe_globals([BuildsOnLoad, touch_marker]):
        with pytest.raises(InputError, match="is not a readable torch checkpoint"):
            load_checkpoint(broken)
        assert set(torch.serialization.get_safe_globals()) == baseline | {BuildsOnLoad, touch_marker}
    assert set(torch.serialization.get_safe_globals()) == baseline


def test_a_loader_that_cannot_empty_the_allow_list_refuses(tmp_path: Path, monkeypatch) -> None:
    # If torch's list ever cannot be emptied, the safe load does not run at all.
    baseline = set(torch.serialization.get_safe_globals())
    monkeypatch.setattr(torch.serialization, "clear_safe_globals", lambda: None)
    with torch.serialization.safe_globals([BuildsOnLoad]):
        with pytest.raises(InputError, match="safe_globals allow-list could not be emptied"):
            checkpoint.load_checkpoint(PLAIN)
        assert set(torch.serialization.get_safe_globals()) == baseline | {BuildsOnLoad}
    monkeypatch.undo()
    assert len(load_checkpoint(PLAIN).state_dict) == 60
    assert set(torch.serialization.get_safe_globals()) == baseline


# -- .pt2 archives (torch.export) --------------------------------------------------------------


def rigged_pt2(folder: Path) -> tuple[Path, Path]:
    """An archive in the layout ``torch.export.save`` writes (torch 2.14: ``<name>/archive_format``,
    ``models/``, ``data/weights/``, ``data/sample_inputs/``) whose inner files are hostile pickles."""
    inner, marker = hostile_file(folder, "path-touch", "bare", name="inner.pt")
    payload = inner.read_bytes()
    inner.unlink()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in [("archive_format", b"pt2"), ("archive_version", b"0"), ("byteorder", b"little"),
                           ("models/model.json", b"{}"), ("data/weights/weight_0", payload),
                           ("data/sample_inputs/model.pt", payload)]:
            archive.writestr(f"rigged/{name}", data)
    path = folder / "rigged.pt2"
    path.write_bytes(buffer.getvalue())
    return path, marker


@pytest.mark.parametrize("allow_pickle", [False, True], ids=["default", "--allow-pickle"])
def test_pt2_archives_are_refused_by_every_command(tmp_path: Path, deploy: Path, allow_pickle: bool) -> None:
    rigged, marker = rigged_pt2(tmp_path)
    renamed = tmp_path / "program.zip"  # what the archive is, not its name, decides
    renamed.write_bytes(rigged.read_bytes())
    for path in (rigged, renamed):
        for name, args in commands(path, tmp_path, deploy).items():
            result = invoke(*args, *(["--allow-pickle"] if allow_pickle else []))
            errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
            assert result.exit_code == 2, (name, result.stderr)
            assert errors == [f"Error: {path} is a torch.export program (.pt2), not a checkpoint; repvgg does not "
                              "load .pt2 archives (torch.export.load unpickles)"], name
            assert "Traceback" not in result.stdout + result.stderr
    assert not marker.exists()
    assert sorted(os.listdir(tmp_path)) == ["program.zip", "rigged.pt2"]


def test_a_pt2_name_on_a_checkpoint_is_read_by_the_safe_loader_only(tmp_path: Path) -> None:
    weights = tmp_path / "weights.pt2"
    torch.save(plain_state(), weights)
    assert len(load_checkpoint(weights).state_dict) == 60
    path, marker = hostile_file(tmp_path, "os-system", "container", name="hostile.pt2")
    result = invoke("inspect", path)
    assert_refused(result.exit_code, result.stdout, result.stderr, path)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin", ".ckpt"])
def test_the_file_name_never_picks_the_loader(tmp_path: Path, suffix: str) -> None:
    # torch.load given a path ending in .safetensors hands it to safetensors; repvgg reads what the
    # bytes are, so a hostile torch pickle is refused as one whatever it is called.
    path, marker = hostile_file(tmp_path, "path-touch", "container", name=f"hostile{suffix}")
    with pytest.raises(PickleRefusedError):
        load_checkpoint(path)
    assert not marker.exists()
    state = tmp_path / f"state{suffix}"
    torch.save(plain_state(), state)
    assert load_checkpoint(state).format == "torch-zip"


@pytest.mark.filterwarnings("ignore:`torch.jit")  # deprecated, but still what many deployments hold
@pytest.mark.filterwarnings("ignore:'torch.load' received a zip file that looks like a TorchScript")
@pytest.mark.parametrize("allow_pickle", [False, True], ids=["default", "--allow-pickle"])
def test_torchscript_archives_are_refused_not_run(tmp_path: Path, allow_pickle: bool) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 4, 3)), str(path))
    with pytest.raises(InputError) as info:
        load_checkpoint(path, allow_pickle=allow_pickle)
    assert not isinstance(info.value, PickleRefusedError)
    assert info.value.message.startswith(f"{path} is not a readable torch checkpoint: Cannot use ``weights_only=True`` "
                                         "with TorchScript archives")
