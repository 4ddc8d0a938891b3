"""repvgg_cli.io.write, to the letter (issue 15: mutation score of the io layer).

What each writer puts in the file: the safetensors header's metadata, a ``.pt`` state dict's
``_metadata`` and the container entries it keeps or drops, a pickled model's layout; the refusal
of an unknown extension; ``fsync`` passed on; bytes that do not depend on the temporary name.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from repvgg_cli.errors import InputError, OutputExistsError
from repvgg_cli.io import atomic
from repvgg_cli.io.metadata import METADATA_KEY, metadata_json
from repvgg_cli.io.read import LoadedCheckpoint
from repvgg_cli.io.write import check_output_path, save_model, save_state_dict, save_torch

META = {"b": 1, "a": [1.5, "x"]}


def _state() -> OrderedDict:
    g = torch.Generator().manual_seed(0)
    return OrderedDict([("z.weight", torch.randn(2, 3, generator=g, dtype=torch.float64)),
                        ("a.bias", torch.randn(2, generator=g, dtype=torch.float64))])


@pytest.mark.parametrize("name", ["o.pt", "o.pth", "o.bin", "o.ckpt", "o.safetensors"])
def test_known_output_extensions_are_accepted(tmp_path: Path, name: str) -> None:
    check_output_path(tmp_path / name, [], force=False)


@pytest.mark.parametrize(("name", "said"), [("o.onnx", "'.onnx'"), ("noext", "'(no extension)'"),
                                            ("o.PT", "'.PT'")])
def test_an_unknown_output_extension_is_refused(tmp_path: Path, name: str, said: str) -> None:
    with pytest.raises(InputError) as info:
        check_output_path(tmp_path / name, [], force=False)
    assert info.value.message == f"{tmp_path / name}: unknown output format {said}"
    assert info.value.hint == "name the output .safetensors, .pt or .pth"


def test_check_output_path_checks_the_path_first(tmp_path: Path) -> None:
    out = tmp_path / "o.pt"
    out.write_bytes(b"x")
    with pytest.raises(OutputExistsError):
        check_output_path(out, [], force=False)
    check_output_path(out, [], force=True)
    with pytest.raises(OutputExistsError, match="source checkpoint"):
        check_output_path(out, [out], force=True)


def test_safetensors_output_records_format_and_metadata(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    state = _state()
    save_state_dict(out, state, META)
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", METADATA_KEY: metadata_json(META)}
        assert list(handle.keys()) == sorted(state)
        for key, value in state.items():
            assert torch.equal(handle.get_tensor(key), value)


def test_pt_output_is_the_state_dict_with_only_our_metadata_entry(tmp_path: Path) -> None:
    out = tmp_path / "o.pt"
    state = _state()
    state._metadata = OrderedDict([("", {"version": 1}), ("z", {"version": 2})])
    save_state_dict(out, state, META)
    loaded = torch.load(out, weights_only=True)
    assert type(loaded) is OrderedDict and list(loaded) == list(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert dict(loaded._metadata) == {METADATA_KEY: {"json": metadata_json(META)}}


CONTAINER = {"state_dict": {"old": torch.zeros(1)}, "ema": {"e": torch.zeros(1)}, "model_ema": 1,
             "state_dict_ema": 2, "model": 3, "optimizer": {"lr": 1}, METADATA_KEY: "old metadata",
             "epoch": 7, "config": {"arch": "x"}}


def test_pt_output_in_the_sources_container_keeps_only_the_other_entries(tmp_path: Path) -> None:
    out = tmp_path / "o.pt"
    save_state_dict(out, _state(), META, container=CONTAINER, entry="state_dict")
    loaded = torch.load(out, weights_only=True)
    assert list(loaded) == ["state_dict", "epoch", "config"]
    assert loaded["epoch"] == 7 and loaded["config"] == {"arch": "x"}
    assert list(loaded["state_dict"]) == list(_state())
    assert dict(loaded["state_dict"]._metadata) == {METADATA_KEY: {"json": metadata_json(META)}}


def test_pt_output_with_another_entry_name(tmp_path: Path) -> None:
    out = tmp_path / "o.pt"
    save_state_dict(out, _state(), META, container={"weights": {}, "epoch": 1}, entry="weights")
    loaded = torch.load(out, weights_only=True)
    assert list(loaded) == ["weights", "epoch"] and list(loaded["weights"]) == list(_state())


@pytest.mark.parametrize(("container", "entry"), [(CONTAINER, None), (None, "state_dict")])
def test_pt_output_without_a_container_and_an_entry_is_the_bare_state_dict(tmp_path: Path, container, entry) -> None:
    out = tmp_path / "o.pt"
    save_state_dict(out, _state(), META, container=container, entry=entry)
    loaded = torch.load(out, weights_only=True)
    assert list(loaded) == list(_state())


@pytest.mark.parametrize("name", ["o.pt", "o.safetensors"])
@pytest.mark.parametrize("fsync", [False, True])
def test_fsync_is_passed_on(tmp_path: Path, monkeypatch, name: str, fsync: bool) -> None:
    calls = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    save_state_dict(tmp_path / name, _state(), META, fsync=fsync)
    assert len(calls) == (1 if fsync else 0)


@pytest.mark.parametrize("fsync", [False, True])
def test_fsync_is_passed_on_by_save_torch_and_save_model(tmp_path: Path, monkeypatch, fsync: bool) -> None:
    calls = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    save_torch(tmp_path / "a.pt", {"x": 1}, fsync=fsync)
    loaded = LoadedCheckpoint(path=tmp_path / "s.pt", format="torch-zip", raw=nn.Linear(1, 1), entry=None,
                              state_dict=OrderedDict())
    save_model(tmp_path / "b.pt", nn.Linear(1, 1), loaded, META, fsync=fsync)
    assert len(calls) == (2 if fsync else 0)


def test_save_torch_bytes_do_not_depend_on_the_temporary_name(tmp_path: Path) -> None:
    payload = {"w": torch.arange(6.0)}
    save_torch(tmp_path / "one.pt", payload)
    save_torch(tmp_path / "two.pt", payload)
    assert (tmp_path / "one.pt").read_bytes() == (tmp_path / "two.pt").read_bytes()
    assert b"archive/" in (tmp_path / "one.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "one.pt", weights_only=True)["w"], torch.arange(6.0))


def test_save_model_in_a_container(tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    raw = {"model": nn.Linear(2, 1), "ema": 1, "optimizer": 2, METADATA_KEY: "old", "epoch": 3, "state_dict": 4}
    loaded = LoadedCheckpoint(path=tmp_path / "s.pt", format="torch-zip", raw=raw, entry="model",
                              state_dict=OrderedDict())
    out = tmp_path / "o.pt"
    save_model(out, model, loaded, META)
    back = torch.load(out, weights_only=False)
    assert list(back) == ["model", "epoch", METADATA_KEY]
    assert back[METADATA_KEY] == metadata_json(META) and back["epoch"] == 3
    assert torch.equal(back["model"].weight, model.weight)
    assert not hasattr(back["model"], "_repvgg_cli_metadata")


def test_save_model_bare(tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    for raw, entry in ((model, None), ({"model": model}, None)):
        loaded = LoadedCheckpoint(path=tmp_path / "s.pt", format="torch-zip", raw=raw, entry=entry,
                                  state_dict=OrderedDict())
        out = tmp_path / f"o{entry}{type(raw).__name__}.pt"
        save_model(out, model, loaded, META)
        back = torch.load(out, weights_only=False)
        assert isinstance(back, nn.Linear) and back._repvgg_cli_metadata == metadata_json(META)


def test_no_fsync_unless_asked(tmp_path: Path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: calls.append(fd))
    save_state_dict(tmp_path / "a.pt", _state(), META)
    save_state_dict(tmp_path / "a.safetensors", _state(), META)
    save_torch(tmp_path / "b.pt", {"x": 1})
    loaded = LoadedCheckpoint(path=tmp_path / "s.pt", format="torch-zip", raw=nn.Linear(1, 1), entry=None,
                              state_dict=OrderedDict())
    save_model(tmp_path / "c.pt", nn.Linear(1, 1), loaded, META)
    assert calls == [] and len(os.listdir(tmp_path)) == 4
