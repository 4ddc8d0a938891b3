"""repvgg_cli.io and api.convert_file at library level: loading, pickle safety, broken files, writing.

Every test works on copies in ``tmp_path`` or on the bundled samples (read only); the samples' bytes
are never changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tests import zoo
from repvgg_cli.io import metadata as io_metadata, safetensors_file, write as io_write
from repvgg_cli.api import convert_file, convert_state_dict
from repvgg_cli.pipeline.metadata import build_metadata
from repvgg_cli.io.digest import FileDigest
from repvgg_cli.io.containers import strip_prefixes
from repvgg_cli.io.digest import sha256_file
from repvgg_cli.io.metadata import METADATA_KEY, tensor_digests
from repvgg_cli.io.read import load_checkpoint
from repvgg_cli.io.write import check_output_path, save_state_dict
from repvgg_cli.errors import InputError, OutputExistsError, PickleRefusedError
from tests.helpers import SAMPLES, disk_full_at_write

TINY = SAMPLES / "repvgg_tiny.pt"
TINY_TRAIN = SAMPLES / "repvgg_tiny_train.pt"
TINY_ST = SAMPLES / "repvgg_tiny.safetensors"
PLAIN = SAMPLES / "plain_net.pt"

TINY_BLOCKS = ["stage0", "stage1.0", "stage2.0", "stage2.1", "stage3.0", "stage3.1", "stage4.0"]


def plain_state() -> "OrderedDict[str, torch.Tensor]":
    return torch.load(PLAIN, map_location="cpu", weights_only=True)


def assert_same_state(got, expected) -> None:
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert torch.equal(got[key], expected[key]), key


def shifted(state, delta: float):
    """A copy of ``state`` whose float tensors are moved by ``delta`` (stands for other weights)."""
    return OrderedDict((k, v + delta if v.is_floating_point() else v.clone()) for k, v in state.items())


# -- loading: formats ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "write", "fmt"),
    [
        (".pt", lambda sd, p: torch.save(sd, p), "torch-zip"),
        (".pt", lambda sd, p: torch.save(sd, p, _use_new_zipfile_serialization=False), "torch-legacy"),
        (".safetensors", lambda sd, p: save_file(dict(sd), str(p)), "safetensors"),
    ],
    ids=["zip", "legacy", "safetensors"],
)
def test_loads_each_format(tmp_path: Path, suffix, write, fmt) -> None:
    expected = plain_state()
    path = tmp_path / f"weights{suffix}"
    write(expected, path)
    loaded = load_checkpoint(path)
    assert loaded.format == fmt
    assert loaded.entry is None
    assert loaded.model is None
    assert loaded.pickled is False
    assert loaded.stripped_prefixes == ()
    assert loaded.metadata is None
    assert loaded.file_size == path.stat().st_size
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(loaded.state_dict) == 60
    assert_same_state(OrderedDict((k, loaded.state_dict[k]) for k in expected), expected)


def _safetensors_with_header_length(path: Path, length: int) -> torch.Tensor:
    """A valid safetensors file whose 8-byte header length is ``length`` (a multiple of 8)."""
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    entry = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    base = json.dumps({"__metadata__": {"pad": ""}, "w": entry}, separators=(",", ":"))
    header = json.dumps({"__metadata__": {"pad": "x" * (length - len(base))}, "w": entry}, separators=(",", ":"))
    assert len(header) == length
    path.write_bytes(length.to_bytes(8, "little") + header.encode() + tensor.numpy().tobytes())
    return tensor


@pytest.mark.parametrize("length", [0x3A80, 0x4B50], ids=["starts-0x80", "starts-PK"])
def test_safetensors_is_recognised_whatever_its_header_length_starts_with(tmp_path: Path, length: int) -> None:
    # The first byte of a safetensors file is the low byte of its header length: 0x80 looks like a
    # legacy torch pickle, "PK" like a zip. Found by converting repvgg_tiny.safetensors.
    path = tmp_path / "w.safetensors"
    tensor = _safetensors_with_header_length(path, length)
    assert path.read_bytes()[:2] == length.to_bytes(8, "little")[:2]
    loaded = load_checkpoint(path)
    assert loaded.format == "safetensors"
    assert list(loaded.state_dict) == ["w"]
    assert torch.equal(loaded.state_dict["w"], tensor)


def test_samples_load_as_their_formats() -> None:
    bare, train, st = load_checkpoint(TINY), load_checkpoint(TINY_TRAIN), load_checkpoint(TINY_ST)
    assert (bare.format, train.format, st.format) == ("torch-zip", "torch-zip", "safetensors")
    assert train.entry == "model"
    assert train.container_keys == ("model", "optimizer", "epoch")
    assert train.stripped_prefixes == ("module.",)
    assert train.notes == ("used entry 'model'", "stripped key prefix 'module.'")
    assert_same_state(train.state_dict, bare.state_dict)
    assert set(st.state_dict) == set(bare.state_dict)
    for key, value in bare.state_dict.items():
        assert torch.equal(st.state_dict[key], value), key


# -- loading: containers and prefixes -----------------------------------------------------------


@pytest.mark.parametrize("name", ["state_dict", "model", "ema", "state_dict_ema", "model_ema"])
def test_container_entry_is_found(tmp_path: Path, name: str) -> None:
    expected = plain_state()
    path = tmp_path / "c.pt"
    torch.save({"epoch": 7, name: expected, "optimizer": {"lr": 0.1}}, path)
    loaded = load_checkpoint(path)
    assert loaded.entry == name
    assert loaded.container_keys == ("epoch", name, "optimizer")
    assert loaded.notes == (f"used entry {name!r}",)
    assert_same_state(loaded.state_dict, expected)


@pytest.mark.parametrize(
    ("plain", "ema"),
    [("state_dict", "state_dict_ema"), ("model", "model_ema"), ("model", "ema"), ("state_dict", "ema")],
)
def test_ema_is_preferred_and_entry_picks_the_plain_weights(tmp_path: Path, plain: str, ema: str) -> None:
    weights, ema_weights = plain_state(), shifted(plain_state(), 0.5)
    path = tmp_path / "c.pt"
    torch.save({plain: weights, ema: ema_weights, "epoch": 3}, path)

    loaded = load_checkpoint(path)
    assert loaded.entry == ema
    assert_same_state(loaded.state_dict, ema_weights)
    assert loaded.notes == (f"used EMA weights from {ema!r} (also present: {plain!r}; pick it with --entry {plain})",)

    chosen = load_checkpoint(path, entry=plain)
    assert chosen.entry == plain
    assert_same_state(chosen.state_dict, weights)
    assert chosen.notes == (f"used entry {plain!r} (--entry)",)


def test_model_none_and_ema_present_uses_ema(tmp_path: Path) -> None:
    ema_weights = shifted(plain_state(), 0.25)
    path = tmp_path / "c.pt"
    torch.save({"model": None, "ema": ema_weights, "updates": 100}, path)
    loaded = load_checkpoint(path)
    assert loaded.entry == "ema"
    assert loaded.notes == ("used entry 'ema'",)
    assert_same_state(loaded.state_dict, ema_weights)
    with pytest.raises(InputError, match=r"entry 'model' is None"):
        load_checkpoint(path, entry="model")


def test_missing_entry_names_the_available_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"model": plain_state(), "optimizer": {}, "epoch": 1}, path)
    with pytest.raises(InputError) as info:
        load_checkpoint(path, entry="state_dict_ema")
    assert type(info.value) is InputError
    assert info.value.exit_code == 2
    assert str(path) in info.value.message
    assert "'state_dict_ema'" in info.value.message
    assert info.value.message.endswith("it has: model, optimizer, epoch")


def test_container_without_weights_says_so_and_hints_entry(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"epoch": 1, "optimizer": {"lr": 0.1}}, path)
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    assert info.value.message == f"{path} holds no state dict: top-level keys are epoch, optimizer"
    assert "--entry" in info.value.hint


def test_entry_on_safetensors_is_refused() -> None:
    with pytest.raises(InputError, match="safetensors file: it has no container entries"):
        load_checkpoint(TINY_ST, entry="model")


@pytest.mark.parametrize(
    ("prefix", "stripped"),
    [
        ("module.", ("module.",)),
        ("_orig_mod.", ("_orig_mod.",)),
        ("module._orig_mod.", ("module.", "_orig_mod.")),
        ("_orig_mod.module.", ("_orig_mod.", "module.")),
    ],
)
@pytest.mark.parametrize("container", [None, "state_dict"])
def test_prefixes_are_stripped(tmp_path: Path, prefix: str, stripped, container) -> None:
    expected = plain_state()
    prefixed = OrderedDict((prefix + k, v) for k, v in expected.items())
    path = tmp_path / "p.pt"
    torch.save(prefixed if container is None else {container: prefixed}, path)
    loaded = load_checkpoint(path)
    assert loaded.stripped_prefixes == stripped
    assert [n for n in loaded.notes if n.startswith("stripped")] == [f"stripped key prefix {p!r}" for p in stripped]
    assert_same_state(loaded.state_dict, expected)


def test_prefix_only_stripped_at_the_start_and_only_when_every_key_has_it(tmp_path: Path) -> None:
    t = torch.ones(2)
    middle = OrderedDict([("backbone.module.conv.weight", t), ("head._orig_mod.bias", t)])
    state, stripped = strip_prefixes(middle)
    assert stripped == ()
    assert list(state) == ["backbone.module.conv.weight", "head._orig_mod.bias"]

    partial = OrderedDict([("module.conv.weight", t), ("head.bias", t)])
    state, stripped = strip_prefixes(partial)
    assert stripped == ()
    assert list(state) == ["module.conv.weight", "head.bias"]

    # Only the leading one goes; the one inside the key stays.
    nested = OrderedDict([("module.backbone.module.conv.weight", t), ("module.head.bias", t)])
    state, stripped = strip_prefixes(nested)
    assert stripped == ("module.",)
    assert list(state) == ["backbone.module.conv.weight", "head.bias"]

    path = tmp_path / "m.pt"
    torch.save(middle, path)
    loaded = load_checkpoint(path)
    assert loaded.stripped_prefixes == ()
    assert list(loaded.state_dict) == ["backbone.module.conv.weight", "head._orig_mod.bias"]


# -- pickle safety -------------------------------------------------------------------------------


def _eval_model() -> nn.Module:
    torch.manual_seed(0)
    return zoo.randomize_bn(zoo.PlainNet()).eval()


@pytest.mark.parametrize("layout", ["bare", "container"])
def test_pickled_module_is_refused_then_allowed(tmp_path: Path, layout: str) -> None:
    model = _eval_model()
    path = tmp_path / "model.pt"
    torch.save(model if layout == "bare" else {"model": model, "epoch": 5}, path)

    with pytest.raises(PickleRefusedError) as info:
        load_checkpoint(path)
    error = info.value
    assert error.exit_code == 2
    assert error.message == (
        f"{path} holds a pickled object of type tests.zoo.PlainNet; loading it would run code from the file"
    )
    assert "--allow-pickle" in error.hint

    loaded = load_checkpoint(path, allow_pickle=True)
    assert isinstance(loaded.model, zoo.PlainNet)
    assert loaded.pickled is True
    assert loaded.entry == (None if layout == "bare" else "model")
    assert loaded.notes[0] == "loaded with full unpickling (--allow-pickle)"
    assert_same_state(loaded.state_dict, model.state_dict())


class TouchOnLoad:
    """Unpickling this creates ``marker``: the proof that code from a file ran."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "path-touch":
            return (pathlib.Path.touch, (pathlib.Path(self.marker),))
        return (os.system, (f"touch '{self.marker}'",))


def _hostile(tmp_path: Path, how: str, layout: str, legacy: bool) -> tuple[Path, Path]:
    marker = tmp_path / "marker"
    payload = TouchOnLoad(marker, how)
    obj = payload if layout == "bare" else {"state_dict": plain_state(), "extra": payload}
    path = tmp_path / "hostile.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()
    return path, marker


@pytest.mark.parametrize("force_unsafe_env", [False, True], ids=["default-env", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("layout", ["bare", "container"])
@pytest.mark.parametrize("how", ["path-touch", "os-system"])
def test_hostile_pickle_is_refused_without_running(tmp_path, monkeypatch, how, layout, legacy, force_unsafe_env) -> None:
    if force_unsafe_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path, marker = _hostile(tmp_path, how, layout, legacy)
    with pytest.raises(PickleRefusedError) as info:
        load_checkpoint(path)
    assert info.value.exit_code == 2
    assert info.value.message.startswith(f"{path} holds ")
    assert "--allow-pickle" in info.value.hint
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
@pytest.mark.parametrize("how", ["path-touch", "os-system"])
def test_hostile_payload_is_live(tmp_path: Path, monkeypatch, how: str) -> None:
    # The control for the test above: the payload does run when unpickling is allowed, and the
    # environment variable does turn torch's own default off (the loader must not rely on it).
    path, marker = _hostile(tmp_path, how, "container", legacy=False)
    loaded = load_checkpoint(path, allow_pickle=True)
    assert marker.exists()
    assert loaded.entry == "state_dict"
    marker.unlink()
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    torch.load(path, map_location="cpu")
    assert marker.exists()


# -- broken files --------------------------------------------------------------------------------


def _broken(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"broken-{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        data = bytearray(random.Random(1234).randbytes(4096))
        data[0], data[8] = 0x13, 0x00  # neither a pickle, a zip nor a safetensors header
        path.write_bytes(bytes(data))
    elif kind == "text":
        path.write_text("epoch,loss\n1,0.53\n2,0.41\n", encoding="utf-8")
    elif kind == "truncated-zip":
        data = PLAIN.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated-legacy":
        torch.save(plain_state(), path, _use_new_zipfile_serialization=False)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated-safetensors":
        path = tmp_path / "broken.safetensors"
        data = (SAMPLES / "plain_net.safetensors").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "directory":
        path = tmp_path / "folder.pt"
        path.mkdir()
    elif kind == "missing":
        path = tmp_path / "does-not-exist.pt"
    return path


BROKEN = ["empty", "random", "text", "truncated-zip", "truncated-legacy", "truncated-safetensors", "directory",
          "missing"]


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_file_is_one_line_input_error(tmp_path: Path, kind: str) -> None:
    path = _broken(tmp_path, kind)
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    error = info.value
    assert not isinstance(error, PickleRefusedError)
    assert error.exit_code == 2
    assert error.message.startswith(str(path))
    assert "\n" not in error.message
    assert 0 < len(error.message) < 400


def test_broken_file_messages_say_what_is_wrong(tmp_path: Path) -> None:
    messages = {}
    for kind in ("empty", "text", "directory", "missing", "truncated-safetensors"):
        path = _broken(tmp_path, kind)
        with pytest.raises(InputError) as info:
            load_checkpoint(path)
        messages[kind] = info.value.message.replace(str(path), "<p>")
    assert messages == {
        "empty": "<p> is empty",
        "text": "<p> is not a checkpoint: neither a torch file (.pt/.pth) nor safetensors",
        "directory": "<p> is a directory, not a checkpoint file",
        "missing": "<p>: no such file",
        "truncated-safetensors": messages["truncated-safetensors"],
    }
    assert messages["truncated-safetensors"].startswith("<p> is not a readable safetensors file: ")


# -- writing -------------------------------------------------------------------------------------

METADATA = {
    "tool": "repvgg_cli",
    "blocks": [{"name": "stage0", "rel_err": 3.25e-08, "kernel": [3, 3]}],
    "options": {"bn_eps": None, "rtol": 1e-5, "no_identity": ["a*", "é"]},
    "count": 7,
}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_save_state_dict_round_trips_with_metadata(tmp_path: Path, suffix: str) -> None:
    state = plain_state()
    output = tmp_path / f"out{suffix}"
    save_state_dict(output, state, METADATA)
    loaded = load_checkpoint(output)
    assert loaded.metadata == METADATA
    assert loaded.format == ("safetensors" if suffix == ".safetensors" else "torch-zip")
    if suffix == ".safetensors":
        assert set(loaded.state_dict) == set(state)
        assert_same_state(OrderedDict((k, loaded.state_dict[k]) for k in state), state)
        assert load_file(str(output)).keys() == state.keys()
    else:
        assert_same_state(loaded.state_dict, state)
        raw = torch.load(output, weights_only=True)
        assert json.loads(raw._metadata[METADATA_KEY]["json"]) == METADATA


def test_save_state_dict_handles_shared_storage_for_safetensors(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32)
    state = OrderedDict([("a", base[:6].view(2, 3)), ("b", base[6:].view(2, 3)), ("c", base[:6].view(2, 3))])
    output = tmp_path / "shared.safetensors"
    save_state_dict(output, state, {"n": 1})
    loaded = load_file(str(output))
    assert torch.equal(loaded["a"], base[:6].view(2, 3))
    assert torch.equal(loaded["b"], base[6:].view(2, 3))
    assert torch.equal(loaded["c"], loaded["a"])


def _tiny_train_model() -> nn.Module:
    model = zoo.repvgg("tiny_g2", num_classes=10)
    model.load_state_dict(torch.load(TINY, weights_only=True), strict=True)
    return model.eval()


def test_deploy_pt_loads_strictly_into_the_deploy_model(tmp_path: Path) -> None:
    output = tmp_path / "deploy.pt"
    outcome = convert_file(TINY, output)
    assert outcome.written and outcome.result.ok
    assert [r.block.name for r in outcome.result.blocks] == TINY_BLOCKS

    state = torch.load(output, weights_only=True)
    assert isinstance(state, OrderedDict)
    assert list(state._metadata) == [METADATA_KEY]
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    deploy = zoo.repvgg("tiny_g2", num_classes=10, deploy=True).eval()
    missing, unexpected = deploy.load_state_dict(state, strict=True)
    assert (missing, unexpected) == ([], [])

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = _tiny_train_model()(x), deploy(x)
    assert float((want - got).abs().max() / want.abs().max()) < 1e-5

    metadata = load_checkpoint(output).metadata
    assert metadata["source"] == {"name": "repvgg_tiny.pt", "sha256": sha256_file(TINY), "entry": None,
                                  "stripped_prefixes": []}
    assert [b["name"] for b in metadata["blocks"]] == TINY_BLOCKS


def test_deploy_safetensors_loads_strictly_into_the_deploy_model(tmp_path: Path) -> None:
    output = tmp_path / "deploy.safetensors"
    convert_file(TINY_ST, output)
    deploy = zoo.repvgg("tiny_g2", num_classes=10, deploy=True)
    assert deploy.load_state_dict(load_file(str(output)), strict=True) == ([], [])
    metadata = load_checkpoint(output).metadata
    assert metadata["source"]["name"] == "repvgg_tiny.safetensors"
    assert len(metadata["tensors"]) == 16


def test_container_source_gives_a_container_output(tmp_path: Path) -> None:
    output = tmp_path / "deploy.pt"
    convert_file(TINY_TRAIN, output)
    raw = torch.load(output, weights_only=True)
    assert list(raw) == ["model", "epoch"]
    assert raw["epoch"] == 2
    assert not any(k.startswith("module.") for k in raw["model"])
    deploy = zoo.repvgg("tiny_g2", num_classes=10, deploy=True)
    assert deploy.load_state_dict(raw["model"], strict=True) == ([], [])

    loaded = load_checkpoint(output)
    assert loaded.entry == "model"
    assert loaded.metadata["source"] == {"name": "repvgg_tiny_train.pt", "sha256": sha256_file(TINY_TRAIN),
                                         "entry": "model", "stripped_prefixes": ["module."]}


def test_container_source_to_safetensors_is_a_flat_state_dict(tmp_path: Path) -> None:
    output = tmp_path / "deploy.safetensors"
    convert_file(TINY_TRAIN, output)
    tensors = load_file(str(output))
    assert len(tensors) == 16
    assert "stage2.1.rbr_reparam.weight" in tensors
    assert not any(k.startswith("module.") for k in tensors)


# -- atomic writes -------------------------------------------------------------------------------


class DiskFull(OSError):
    pass


def _fail_after_writing(monkeypatch) -> list[Path]:
    """Make every atomic write fail once its temporary file holds the full payload."""
    real = io_write.atomic_write
    temps: list[Path] = []

    def failing_atomic_write(output: Path, write, fsync: bool = False) -> None:
        def write_then_fail(tmp: Path) -> None:
            write(tmp)
            temps.append(tmp)
            assert tmp.stat().st_size > 1000
            raise DiskFull(28, "No space left on device")

        real(output, write_then_fail, fsync=fsync)

    monkeypatch.setattr(io_write, "atomic_write", failing_atomic_write)
    return temps


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("existing", [False, True], ids=["new-output", "existing-output"])
def test_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch, suffix: str, existing: bool) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    output = folder / f"deploy{suffix}"
    if existing:
        output.write_bytes(b"previous deploy artifact\x00\x01")
    before = sorted(os.listdir(folder))
    temps = _fail_after_writing(monkeypatch)
    with pytest.raises(DiskFull):
        convert_file(TINY, output, force=True)
    assert len(temps) == 1 and temps[0].parent == folder
    assert not temps[0].exists()
    assert sorted(os.listdir(folder)) == before
    if existing:
        assert output.read_bytes() == b"previous deploy artifact\x00\x01"
    else:
        assert not output.exists()


def test_failed_serialisation_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    real_write = io_write.write_safetensors

    def broken_write(path, state, metadata):
        real_write(path, state, metadata)
        with open(path, "r+b") as handle:
            handle.truncate(100)  # half written, then the disk fails
        raise RuntimeError("serialisation failed")

    monkeypatch.setattr(io_write, "write_safetensors", broken_write)
    output = tmp_path / "deploy.safetensors"
    with pytest.raises(RuntimeError, match="serialisation failed"):
        save_state_dict(output, plain_state(), {"n": 1})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]
)
def test_safetensors_writer_round_trips_through_the_safetensors_library(tmp_path: Path, dtype) -> None:
    from safetensors import safe_open

    gen = torch.Generator().manual_seed(3)
    base = torch.randn(3, 4, 2, 2, generator=gen) * 10
    shared = base.to(dtype)
    state = {"a.weight": shared, "a.view": shared[1], "empty": torch.zeros(0, 3).to(dtype), "scalar": shared[0, 0, 0, 0]}
    path = tmp_path / "x.safetensors"
    safetensors_file.write_safetensors(path, state, {"z": "1", "a": "2"})
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"a": "2", "z": "1"}
        assert sorted(handle.keys()) == sorted(state)
        for key, value in state.items():
            loaded = handle.get_tensor(key)
            assert loaded.dtype == dtype and loaded.shape == value.shape
            assert torch.equal(loaded, value)
    first = path.read_bytes()
    safetensors_file.write_safetensors(path, dict(state), {"a": "2", "z": "1"})
    assert path.read_bytes() == first


def test_atomic_write_cleans_up_when_interrupted(tmp_path: Path) -> None:
    output = tmp_path / "x.pt"
    output.write_bytes(b"old")

    def interrupted(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io_write.atomic_write(output, interrupted)
    assert os.listdir(tmp_path) == ["x.pt"]
    assert output.read_bytes() == b"old"


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.safetensors"
        convert_file(TINY, fresh)
        assert fresh.stat().st_mode & 0o777 == 0o644  # mkstemp's 0600 would hide it from other users
        replaced = tmp_path / "replaced.pt"
        replaced.write_bytes(b"old")
        os.chmod(replaced, 0o640)
        convert_file(TINY, replaced, force=True)
        assert replaced.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


# -- output path checks --------------------------------------------------------------------------


def test_check_output_path_refuses_the_source(tmp_path: Path, monkeypatch) -> None:
    source = tmp_path / "train.pt"
    shutil.copyfile(PLAIN, source)
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "link.pt"
    link.symlink_to(source)
    (tmp_path / "sub").mkdir()
    for output in (source, Path("train.pt"), tmp_path / "sub" / ".." / "train.pt", link):
        for force in (False, True):
            with pytest.raises(OutputExistsError) as info:
                check_output_path(output, [source], force=force)
            assert info.value.message == f"{output} is the source checkpoint; it is never overwritten"
            assert info.value.exit_code == 2


def test_check_output_path_refuses_an_existing_output_without_force(tmp_path: Path) -> None:
    output = tmp_path / "deploy.safetensors"
    output.write_bytes(b"x")
    with pytest.raises(OutputExistsError) as info:
        check_output_path(output, [PLAIN], force=False)
    assert info.value.message == f"{output} exists"
    assert info.value.hint == "pass --force to replace it"
    check_output_path(output, [PLAIN], force=True)
    check_output_path(tmp_path / "new.pt", [PLAIN], force=False)


@pytest.mark.parametrize(
    ("name", "message"),
    [("deploy.onnx", "unknown output format '.onnx'"), ("nofolder/deploy.pt", "does not exist"),
     ("deploy", "unknown output format '(no extension)'")],
)
def test_check_output_path_refuses_bad_outputs(tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_output_path(tmp_path / name, [PLAIN], force=False)


def test_convert_file_refuses_an_existing_output_and_keeps_its_bytes(tmp_path: Path) -> None:
    output = tmp_path / "deploy.pt"
    output.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError):
        convert_file(TINY, output)
    assert output.read_bytes() == b"keep me"
    assert convert_file(TINY, output, force=True).written
    assert load_checkpoint(output).metadata["tool"] == "repvgg_cli"


# -- determinism and the source ------------------------------------------------------------------


@pytest.mark.parametrize("source", [TINY, TINY_TRAIN, TINY_ST], ids=lambda p: p.name)
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_same_input_gives_byte_identical_output(tmp_path: Path, source: Path, suffix: str) -> None:
    outputs = []
    for i in range(3):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        outputs.append(folder / f"deploy{suffix}")
        convert_file(source, outputs[-1])
    convert_file(source, outputs[0], force=True)
    data = [p.read_bytes() for p in outputs]
    assert data[0] == data[1] == data[2]
    if suffix == ".safetensors":
        length = int.from_bytes(data[0][:8], "little")
        header = json.loads(data[0][8 : 8 + length])
        assert list(header["__metadata__"]) == ["format", METADATA_KEY]
        assert header["__metadata__"]["format"] == "pt"


def test_safetensors_metadata_order_does_not_depend_on_the_writer(tmp_path: Path, monkeypatch) -> None:
    # safetensors keeps metadata in a Rust HashMap: its order changes from call to call. Simulate
    # both orders and check the bytes written are the same.
    import safetensors.torch

    real = safetensors.torch.save
    state = plain_state()
    results = []
    for reverse in (False, True):
        def ordered_save(tensors, metadata=None, _reverse=reverse):
            data = real(tensors, metadata=metadata)
            length = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + length])
            items = list(header["__metadata__"].items())
            header["__metadata__"] = dict(reversed(items) if _reverse else items)
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)
            return len(text).to_bytes(8, "little") + text + data[8 + length :]

        monkeypatch.setattr(safetensors.torch, "save", ordered_save)
        output = tmp_path / f"o{int(reverse)}.safetensors"
        save_state_dict(output, state, METADATA)
        results.append(output.read_bytes())
    assert results[0] == results[1]
    assert load_checkpoint(tmp_path / "o1.safetensors").metadata == METADATA


@pytest.mark.parametrize("source", [TINY, TINY_TRAIN, TINY_ST], ids=lambda p: p.name)
def test_convert_leaves_the_source_untouched(tmp_path: Path, source: Path) -> None:
    digest, mtime = sha256_file(source), source.stat().st_mtime_ns
    expected = {line.split("  ")[1]: line.split("  ")[0]
                for line in (SAMPLES / "SHA256SUMS").read_text(encoding="utf-8").splitlines()}
    assert digest == expected[source.name]
    convert_file(source, tmp_path / "a.pt")
    convert_file(source, tmp_path / "a.safetensors")
    assert sha256_file(source) == digest
    assert source.stat().st_mtime_ns == mtime


# -- streamed safetensors, background hashing, memory-mapped loading ------------------------------


def _layout(state) -> "OrderedDict[str, tuple[torch.dtype, tuple[int, ...]]]":
    return OrderedDict((k, (v.dtype, tuple(v.shape))) for k, v in state.items())


def _stream(path: Path, state, order: list[str], metadata: dict[str, str], reserve: int) -> dict[str, str]:
    path.touch()
    with safetensors_file.SafetensorsStream(path, _layout(state), reserve) as stream:
        for key in order:
            stream.put(key, state[key])
        digests = stream.wait()
        stream.finish(metadata)
    return digests


@pytest.mark.parametrize("reserve", [1 << 16, 0], ids=["room-to-spare", "no-room: data moved"])
def test_streamed_safetensors_in_any_order_read_back_exactly(tmp_path: Path, reserve: int) -> None:
    state = plain_state()
    order = list(state)
    random.Random(3).shuffle(order)
    metadata = {"format": "pt", METADATA_KEY: json.dumps({"pad": "x" * 5000, "é": 1})}
    path = tmp_path / "streamed.safetensors"
    digests = _stream(path, state, order, metadata, reserve)
    assert digests == {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in state.items()}
    assert_same_state(OrderedDict((k, load_file(str(path))[k]) for k in state), state)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == metadata
        assert list(handle.keys()) == sorted(state)
    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    assert header_length % 8 == 0
    header = data[8 : 8 + header_length]
    assert json.loads(header)["__metadata__"] == metadata
    padding = len(header) - len(header.rstrip(b" "))
    # the room left for the metadata is padded with spaces; without room the data moved up instead
    assert padding >= reserve - len(json.dumps(metadata)) - 100 if reserve else padding < 8
    sizes = [v.numel() * v.element_size() for v in state.values()]
    assert len(data) == 8 + header_length + sum(sizes)


def test_streamed_safetensors_refuse_what_the_layout_does_not_say(tmp_path: Path) -> None:
    state = plain_state()
    key, other = list(state)[:2]
    path = tmp_path / "s.safetensors"
    path.touch()
    with safetensors_file.SafetensorsStream(path, _layout(state), 1024) as stream:
        with pytest.raises(RuntimeError, match="not in the layout"):
            stream.put("nope", state[key])
        with pytest.raises(RuntimeError, match="the layout says"):
            stream.put(key, state[key].double())
        stream.put(key, state[key]).result()
        with pytest.raises(RuntimeError, match="written twice"):
            stream.put(key, state[key])
        with pytest.raises(RuntimeError, match=f"were not written, e.g. {other}"):
            stream.finish({"format": "pt"})


def test_a_failed_streamed_write_stops_the_rest_and_is_raised(tmp_path: Path, monkeypatch) -> None:
    state = plain_state()
    calls = disk_full_at_write(monkeypatch, 2)
    path = tmp_path / "s.safetensors"
    path.touch()
    with safetensors_file.SafetensorsStream(path, _layout(state), 1024) as stream:
        futures = [stream.put(k, v) for k, v in state.items()]
        with pytest.raises(OSError, match="No space left"):
            stream.wait()
    assert len(calls) == 2 and len(futures) == len(state) > 2


@pytest.mark.parametrize("rows_per_chunk", [None, 3], ids=["default-chunks", "3-row-chunks"])
def test_streamed_convert_writes_what_the_in_memory_path_writes(tmp_path: Path, monkeypatch,
                                                                rows_per_chunk: int | None) -> None:
    """`convert` into safetensors streams block by block through two reused buffers, each fused
    weight chunk by chunk as it is written; the tensors and metadata are those of converting in
    memory and saving the state dict."""
    from repvgg_cli.fusion import sum as fusion_sum

    if rows_per_chunk is not None:
        monkeypatch.setattr(fusion_sum, "chunk_rows", lambda row_numel: rows_per_chunk)
    parts: dict[str, list[int]] = {}
    real_put_rows = safetensors_file.SafetensorsStream.put_rows

    def spy(self, key, rows, start):
        parts.setdefault(key, []).append(start)
        return real_put_rows(self, key, rows, start)

    monkeypatch.setattr(safetensors_file.SafetensorsStream, "put_rows", spy)
    streamed = tmp_path / "streamed.safetensors"
    outcome = convert_file(TINY_TRAIN, streamed)
    weights = {k for r in outcome.result.blocks for k, t in r.block.deploy_state(r.fused).items() if t.dim() == 4}
    assert set(parts) == weights  # every fused weight went out in row chunks
    for key, starts in parts.items():
        out = outcome.result.state_dict[key].shape[0]
        step = rows_per_chunk or out
        assert starts == list(range(0, out, step)), key
    assert outcome.written and outcome.result.ok
    assert all(t.device.type == "meta" for t in outcome.result.state_dict.values())
    loaded = load_checkpoint(TINY_TRAIN)
    result = convert_state_dict(loaded.state_dict)
    in_memory = tmp_path / "in_memory.safetensors"
    metadata = build_metadata(mode=result.mode, options=result.options, blocks=result.blocks,
                              dropped=result.dropped_keys, model_check=result.model_check,
                              source_name=TINY_TRAIN.name, source_sha256=loaded.sha256, entry=loaded.entry,
                              stripped=loaded.stripped_prefixes)
    save_state_dict(in_memory, result.state_dict, {**metadata, io_metadata.TENSOR_DIGESTS: tensor_digests(result.state_dict)})
    a, b = load_checkpoint(streamed), load_checkpoint(in_memory)
    assert_same_state(a.state_dict, b.state_dict)
    data = streamed.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert list(header)[1:] == list(result.state_dict)  # file order: the source's, blocks in place
    assert a.metadata == b.metadata and len(a.metadata["tensors"]) == len(result.state_dict)


def test_background_digest_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(3 << 20) + b"tail")
    assert FileDigest(path).value() == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(InputError, match="could not be read"):
        FileDigest(tmp_path / "missing.bin").value()
    # a digest started for another file is not used by mistake
    loaded = load_checkpoint(TINY, digest=FileDigest(path))
    assert loaded.sha256 == hashlib.sha256(TINY.read_bytes()).hexdigest()


def test_zip_checkpoints_are_memory_mapped_private_and_never_written(tmp_path: Path) -> None:
    """Loaded tensors are the file's pages (no copy), mapped copy-on-write: writing to them,
    even with torch's default mmap flags switched to MAP_SHARED, leaves the file as it was."""
    import mmap

    source = tmp_path / "train.pt"
    shutil.copy(TINY_TRAIN, source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        loaded = load_checkpoint(source)
    weights = [t for t in loaded.state_dict.values() if t.is_floating_point()]
    maps = Path("/proc/self/maps").read_text().splitlines()
    assert any(line.endswith(str(source.resolve())) for line in maps)  # the file is mapped
    for t in weights:
        t.add_(1.0)
    del loaded, weights
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest


def test_streamed_convert_gives_its_core_back(tmp_path: Path, monkeypatch) -> None:
    """Streaming runs torch on one thread fewer (the writer needs a core) and restores the count,
    after a failed check too."""
    from repvgg_cli.api import ConvertOptions
    from repvgg_cli.pipeline import fuse
    from repvgg_cli.checks.tolerance import Tolerance

    seen: list[int] = []
    real = fuse.fuse_one

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(fuse, "fuse_one", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert convert_file(TINY_TRAIN, tmp_path / "a.safetensors").written
        failed = convert_file(TINY_TRAIN, tmp_path / "b.safetensors",
                              ConvertOptions(tolerance=Tolerance(rtol=1e-30)))
        assert not failed.written and not (tmp_path / "b.safetensors").exists()
        assert seen and set(seen) == {2} and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_safetensors_sources_are_memory_mapped_private_and_never_written(tmp_path: Path) -> None:
    """safetensors' own reader already maps the file copy-on-write (no copy of the source is
    held): the tensors are the file's pages, and writing to them leaves the file as it was."""
    source = tmp_path / "train.safetensors"
    save_file({k: v.clone() for k, v in load_checkpoint(TINY_TRAIN).state_dict.items()}, source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    loaded = load_checkpoint(source)
    maps = [line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(str(source.resolve()))]
    assert maps and all(line.split()[1].endswith("p") for line in maps)  # mapped, and private
    for t in loaded.state_dict.values():
        if t.is_floating_point():
            t.add_(1.0)
    del loaded
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest


def test_streamed_rows_write_and_hash_what_a_whole_put_does(tmp_path: Path) -> None:
    """A tensor put as slices of its rows, in order, gives the same bytes and sha256 as one put;
    slices out of order, with a gap, of the wrong shape, or mixed with a whole put are refused."""
    state = OrderedDict([("w", torch.randn(7, 3, 2, 2)), ("b", torch.randn(7)), ("e", torch.zeros(0, 4))])
    whole, rows = tmp_path / "whole.safetensors", tmp_path / "rows.safetensors"
    expected = _stream(whole, state, list(state), {"format": "pt"}, 256)
    rows.touch()
    with safetensors_file.SafetensorsStream(rows, _layout(state), 256) as stream:
        with pytest.raises(RuntimeError, match="must come in order"):
            stream.put_rows("w", state["w"][2:4], 2)
        for start, stop in [(0, 2), (2, 3), (3, 7)]:
            stream.put_rows("w", state["w"][start:stop], start)
        with pytest.raises(RuntimeError, match="written twice"):
            stream.put_rows("w", state["w"][0:1], 0)
        stream.put_rows("b", state["b"][:5], 0)
        with pytest.raises(RuntimeError, match="must come in order"):
            stream.put_rows("b", state["b"][6:], 6)
        with pytest.raises(RuntimeError, match="written twice"):
            stream.put("b", state["b"])
        with pytest.raises(RuntimeError, match="the layout says"):
            stream.put_rows("e", torch.zeros(1, 3), 0)
        with pytest.raises(RuntimeError, match="were not written, e.g. b"):
            stream.finish({"format": "pt"})
        stream.put_rows("b", state["b"][5:], 5)
        stream.put_rows("e", state["e"], 0)
        assert stream.wait() == expected
        stream.finish({"format": "pt"})
    assert rows.read_bytes() == whole.read_bytes()
