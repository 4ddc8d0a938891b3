"""Old pickle protocols and plain pickles get accurate messages; torch's warnings become notes
(issue 10, "torch's own warnings ... legacy pickle protocols 0 and 1").

Before the change a legacy ``torch.save(..., pickle_protocol=0 or 1)`` file was "not a checkpoint:
neither a torch file nor safetensors", a zip checkpoint with protocol 0/1 "holds pickled data the
safe loader refuses (Unsupported operand 73); loading it would run code", and a plain pickle
"would run code" too (the code ran with --allow-pickle, then torch failed on its magic number).
A warning torch raised while loading was printed raw on stderr.
"""

from __future__ import annotations

import importlib
import pickle
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from tests import zoo
from repvgg_cli.errors import InputError, PickleRefusedError
from repvgg_cli.io.read import load_checkpoint
from tests.helpers import error_lines, invoke


def block_state() -> OrderedDict[str, torch.Tensor]:
    torch.manual_seed(0)
    block = zoo.randomize_bn(zoo.OfficialBlock(4, 4), seed=2).double()
    return OrderedDict((f"stage1.0.{k}", v) for k, v in block.state_dict().items())


PROTOCOL_0 = ("was written with pickle protocol 0 (torch.save(..., pickle_protocol=0)), which torch.load cannot "
              "read back, not even with full unpickling")
PROTOCOL_1 = ("was written with pickle protocol 1 (torch.save(..., pickle_protocol=1)); torch's safe loader reads "
              "protocol 2 and later only")


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
@pytest.mark.parametrize("protocol", [0, 1])
def test_old_protocols_are_named(tmp_path: Path, protocol: int, legacy: bool) -> None:
    path = tmp_path / "old.pt"
    torch.save(block_state(), path, _use_new_zipfile_serialization=not legacy, pickle_protocol=protocol)
    result = invoke("inspect", path)
    assert result.exit_code == 2
    assert error_lines(result) == [(f"Error: {path} {PROTOCOL_0 if protocol == 0 else PROTOCOL_1}")]
    error_type = InputError if protocol == 0 else PickleRefusedError
    with pytest.raises(error_type) as info:
        load_checkpoint(path)
    assert "--allow-pickle" in info.value.hint if protocol == 1 else "re-save" in info.value.hint
    if protocol == 0:  # not even full unpickling reads it: the same message
        with pytest.raises(InputError, match="protocol 0"):
            load_checkpoint(path, allow_pickle=True)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_protocol_1_loads_when_unpickling_is_allowed(tmp_path: Path, legacy: bool) -> None:
    path = tmp_path / "old.pt"
    expected = block_state()
    torch.save(expected, path, _use_new_zipfile_serialization=not legacy, pickle_protocol=1)
    loaded = load_checkpoint(path, allow_pickle=True)
    assert loaded.pickled
    for key, value in expected.items():
        assert torch.equal(loaded.state_dict[key], value), key


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_protocols_2_and_3_load_safely(tmp_path: Path, legacy: bool) -> None:
    expected = block_state()
    for protocol in (2, 3):
        path = tmp_path / f"p{protocol}.pt"
        torch.save(expected, path, _use_new_zipfile_serialization=not legacy, pickle_protocol=protocol)
        loaded = load_checkpoint(path)
        assert not loaded.pickled
        for key, value in expected.items():
            assert torch.equal(loaded.state_dict[key], value), key


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
@pytest.mark.parametrize("protocol", [4, 5])
def test_protocols_4_and_5_are_named_by_the_opcode_the_safe_loader_lacks(tmp_path: Path, protocol: int,
                                                                         legacy: bool) -> None:
    path = tmp_path / "new.pt"
    expected = block_state()
    torch.save(expected, path, _use_new_zipfile_serialization=not legacy, pickle_protocol=protocol)
    result = invoke("inspect", path)
    assert result.exit_code == 2
    assert error_lines(result) == [(f"Error: {path} uses pickle opcode FRAME (pickle protocol 4 and later), which "
                                   "torch's safe loader does not read")]
    assert "would run code" not in result.stderr
    loaded = load_checkpoint(path, allow_pickle=True)
    for key, value in expected.items():
        assert torch.equal(loaded.state_dict[key], value), key


class Marker:
    """Unpickling this creates a file: proof that code from the pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("protocol", [0, 1, 2, 4])
def test_a_plain_pickle_is_named_and_never_unpickled(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps({"weights": [1.0, 2.0], "hook": Marker(marker)}, protocol=protocol))
    for allow in ([], ["--allow-pickle"]):
        result = invoke("inspect", path, *allow)
        assert result.exit_code == 2
        assert error_lines(result) == [(f"Error: {path} is a plain Python pickle (protocol {protocol}), not a "
                                       "torch.save checkpoint: torch.load cannot read it")]
    assert not marker.exists()


def test_text_and_truncated_pickles_are_not_called_plain_pickles(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("epoch,loss\n1,0.53\n", encoding="utf-8")
    with pytest.raises(InputError, match="is not a checkpoint: neither a torch file"):
        load_checkpoint(text)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(pickle.dumps(list(range(100)), protocol=4)[:50])
    with pytest.raises(InputError, match="ends inside its first pickle"):
        load_checkpoint(cut)


# -- torch's warnings --------------------------------------------------------------------------


SOURCE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
'''


@pytest.fixture
def changed_module_file(tmp_path: Path, monkeypatch) -> Path:
    """A legacy pickled model whose class's source changed since it was saved: torch warns
    (SourceChangeWarning) once per class while loading it with full unpickling."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "warned_net.py").write_text(SOURCE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module("warned_net")
    try:
        model = nn.Sequential(module.Net(), module.Net())  # two of them: one note
        path = tmp_path / "model.pt"
        torch.save(model, path, _use_new_zipfile_serialization=False)
        (folder / "warned_net.py").write_text(SOURCE + "        # tuned\n", encoding="utf-8")
        importlib.reload(module)
        yield path
    finally:
        sys.modules.pop("warned_net", None)


def test_torch_warnings_become_one_note_each(changed_module_file: Path) -> None:
    with warnings.catch_warnings(record=True) as leaked:
        warnings.simplefilter("always")
        loaded = load_checkpoint(changed_module_file, allow_pickle=True)
    assert [str(w.message) for w in leaked] == []
    notes = [n for n in loaded.notes if n.startswith("while loading: ")]
    assert notes == [("while loading: SourceChangeWarning: source code of class 'warned_net.Net' has changed. you "
                     "can retrieve the original source code by accessing the object's source attribute or set "
                     "`torch.nn.Module.dump_patches = True` and use the patch tool to revert the changes.")]
    assert loaded.notes[0] == "loaded with full unpickling (--allow-pickle)"


def test_the_cli_shows_the_note_not_the_raw_warning(changed_module_file: Path) -> None:
    result = invoke("inspect", changed_module_file, "--allow-pickle")
    assert result.exit_code == 0, result.stderr
    output = result.stdout + result.stderr
    assert "SourceChangeWarning: source code of class 'warned_net.Net' has changed" in output
    assert "warnings.warn(" not in output and ".py:" not in result.stderr  # no "file.py:123: ...Warning" line


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_a_warning_of_the_safe_loader_is_a_note_once(tmp_path: Path, legacy: bool) -> None:
    """torch's weights-only unpickler warns about protocol 3 (once per unpickler it runs: three
    times for a legacy file); the note says it once and nothing reaches stderr."""
    path = tmp_path / "p3.pt"
    torch.save(block_state(), path, _use_new_zipfile_serialization=not legacy, pickle_protocol=3)
    with warnings.catch_warnings(record=True) as leaked:
        warnings.simplefilter("always")
        loaded = load_checkpoint(path)
    assert leaked == []
    notes = [n for n in loaded.notes if n.startswith("while loading: ")]
    assert notes == [("while loading: UserWarning: Detected pickle protocol 3 in the checkpoint, which was not the "
                     "default pickle protocol used by `torch.load` (2). The weights_only Unpickler might not support "
                     "all instructions implemented by this protocol, please file an issue for adding support if you "
                     "encounter this.")]
    result = invoke("convert", path, tmp_path / "deploy.safetensors")
    assert "UserWarning: Detected pickle protocol 3" in result.stderr
    assert "torch/serialization.py" not in result.stderr and "warnings.warn" not in result.stderr
