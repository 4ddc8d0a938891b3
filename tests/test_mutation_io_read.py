"""repvgg_cli.io.read, to the letter (issue 15: mutation score of the io layer).

What :func:`load_checkpoint` returns for each kind of file (every field of
:class:`LoadedCheckpoint`), each refusal in its words (the CLI's one-line errors), the sniffer's
decisions at their boundaries, and the checks that a source did not change while it was read.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from repvgg_cli.errors import InputError, PickleRefusedError
from repvgg_cli.io import read as rd
from repvgg_cli.io.digest import FileDigest, FileIdentity, file_identity
from repvgg_cli.io.metadata import METADATA_KEY, metadata_json
from repvgg_cli.io.read import (
    TORCH_SUFFIXES,
    LoadedCheckpoint,
    assert_unchanged,
    load_checkpoint,
    sniff_format,
    source_change,
    source_unchanged,
)


def _state() -> OrderedDict:
    g = torch.Generator().manual_seed(0)
    return OrderedDict([("conv.weight", torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)),
                        ("conv.bias", torch.randn(2, generator=g, dtype=torch.float64))])


def test_constants() -> None:
    assert TORCH_SUFFIXES == (".pt", ".pth", ".bin", ".ckpt") and rd._SNIFF_BYTES == 65536


# -- sniffing --------------------------------------------------------------------------------------------


def test_sniff_each_format(tmp_path: Path) -> None:
    st = tmp_path / "a.safetensors"
    save_file(_state(), str(st))
    assert sniff_format(st) == "safetensors"
    z = tmp_path / "a.pt"
    torch.save(_state(), z)
    assert sniff_format(z) == "torch-zip"
    legacy = tmp_path / "l.pt"
    torch.save(_state(), legacy, _use_new_zipfile_serialization=False)
    assert sniff_format(legacy) == "torch-legacy"


def test_sniff_safetensors_needs_the_brace_at_byte_8(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"\x02\0\0\0\0\0\0\0{}")
    assert sniff_format(path) == "safetensors"
    path.write_bytes(b"PK\x03\x04\0\0\0\0{")  # "PK" first, but a brace at byte 8: safetensors wins
    assert sniff_format(path) == "safetensors"
    path.write_bytes(b"PK\x03\x04\0\0\0\0")  # 8 bytes: no byte 8
    assert sniff_format(path) == "torch-zip"


def test_sniff_refusals_in_words(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        sniff_format(tmp_path)
    assert info.value.message == f"{tmp_path} is a directory, not a checkpoint file"
    with pytest.raises(InputError) as info:
        sniff_format(tmp_path / "missing.pt")
    assert info.value.message == f"{tmp_path / 'missing.pt'}: no such file"
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(InputError) as info:
        sniff_format(empty)
    assert info.value.message == f"{empty} is empty"
    text = tmp_path / "t.pt"
    text.write_bytes(b"hello world")
    with pytest.raises(InputError) as info:
        sniff_format(text)
    assert info.value.message == f"{text} is not a checkpoint: neither a torch file (.pt/.pth) nor safetensors"
    assert info.value.hint is None


def test_sniff_an_unreadable_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(b"x")

    def failing(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("builtins.open", failing)
    with pytest.raises(InputError) as info:
        sniff_format(path)
    assert info.value.message == f"{path}: cannot read: Permission denied"


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_plain_pickle_is_named_with_its_protocol(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps({"a": [1, 2]}, protocol=protocol))
    with pytest.raises(InputError) as info:
        sniff_format(path)
    assert info.value.message == (f"{path} is a plain Python pickle (protocol {protocol}), not a torch.save "
                                  "checkpoint: torch.load cannot read it")
    assert info.value.hint == ("load it in Python and save the weights with torch.save(state_dict, path) or as "
                               "safetensors")


def test_a_plain_pickle_of_protocol_0_and_1(tmp_path: Path) -> None:
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps([1], protocol=0))
    with pytest.raises(InputError, match=r"plain Python pickle \(protocol 0\)"):
        sniff_format(path)
    path.write_bytes(pickle.dumps([1], protocol=1))
    with pytest.raises(InputError, match=r"plain Python pickle \(protocol 1\)"):
        sniff_format(path)


def test_a_cut_pickle_and_a_long_one(tmp_path: Path) -> None:
    path = tmp_path / "p.pkl"
    data = pickle.dumps(list(range(100)), protocol=4)
    path.write_bytes(data[:-5])
    with pytest.raises(InputError) as info:
        sniff_format(path)
    assert info.value.message == f"{path} is not a readable checkpoint: it ends inside its first pickle (truncated?)"
    # longer than what is sniffed: its protocol is named from its first bytes
    long = pickle.dumps(b"x" * 70000, protocol=3)
    path.write_bytes(long)
    with pytest.raises(InputError) as info:
        sniff_format(path)
    assert info.value.message.startswith(f"{path} is a plain Python pickle (protocol 3)")
    for head in (b"\x80\x06" + b"x" * 10, b"\x80\x01" + b"x" * 10, b"\x80"):
        path.write_bytes(head)
        with pytest.raises(InputError) as info:
            sniff_format(path)
        assert info.value.message.endswith("neither a torch file (.pt/.pth) nor safetensors"), head


def test_a_long_unfinished_pickle_of_each_protocol(tmp_path: Path) -> None:
    path = tmp_path / "p.pkl"
    for protocol in (2, 5):
        path.write_bytes(b"\x80" + bytes([protocol]) + b"(" + b"K\x01" * 40000)  # MARK, 40000 ints, no STOP
        with pytest.raises(InputError) as info:
            sniff_format(path)
        assert info.value.message.startswith(f"{path} is a plain Python pickle (protocol {protocol})")


def test_legacy_protocol(tmp_path: Path) -> None:
    path = tmp_path / "l.pt"
    for protocol in (0, 1, 2, 4):
        torch.save(_state(), path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
        assert rd._legacy_protocol(path) == protocol
    path.write_bytes(b"\x80")
    assert rd._legacy_protocol(path) == 2  # not a pickle: left to torch
    path.write_bytes(pickle.dumps(rd.TORCH_SUFFIXES and 0x1950A86A20F9469CFC6C, protocol=0))
    assert rd._legacy_protocol(path) == 0  # the magic number alone: nothing follows


# -- torch zips that are not checkpoints -----------------------------------------------------------------


def _zip(path: Path, names: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name in names:
            archive.writestr(name, b"x")
    return path


def test_check_torch_zip(tmp_path: Path) -> None:
    rd._check_torch_zip(tmp_path / "x.pt", None)
    rd._check_torch_zip(tmp_path / "x.pt2", ["data.pkl"])
    rd._check_torch_zip(tmp_path / "x.pt", ["a/archive_format", "a/data.pkl"])
    message = (f"{tmp_path / 'x.pt2'} is a torch.export program (.pt2), not a checkpoint; repvgg does not load "
               ".pt2 archives (torch.export.load unpickles)")
    for path, names in ((tmp_path / "x.pt2", ["a/other"]), (tmp_path / "x.pt", ["archive_format"]),
                        (tmp_path / "x.pt", ["b/archive_format"])):
        with pytest.raises(InputError) as info:
            rd._check_torch_zip(path, names)
        assert info.value.message == message.replace("x.pt2", path.name)
        assert info.value.hint == "save the weights instead: torch.save(model.state_dict(), 'train.pt') or safetensors"
    with pytest.raises(InputError) as info:
        rd._check_torch_zip(tmp_path / "x.pt", ["a/data.pkl.bak", "xarchive_format"])
    assert info.value.message == f"{tmp_path / 'x.pt'} is a zip archive but not a torch checkpoint: it has no data.pkl"


def test_a_zip_without_a_pickle_is_refused_by_load(tmp_path: Path) -> None:
    path = _zip(tmp_path / "z.pt", ["a/version"])
    with pytest.raises(InputError, match="is a zip archive but not a torch checkpoint"):
        load_checkpoint(path)


# -- loading --------------------------------------------------------------------------------------------


def test_a_safetensors_file_loaded(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    state = OrderedDict((f"module.{k}", v) for k, v in _state().items())
    meta = {"blocks": []}
    save_file(state, str(path), metadata={METADATA_KEY: metadata_json(meta), "format": "pt"})
    loaded = load_checkpoint(str(path))
    size = path.stat().st_size
    assert loaded.path == path and loaded.format == "safetensors" and loaded.entry is None and loaded.model is None
    assert sorted(loaded.raw) == sorted(state)
    assert list(loaded.state_dict) == [k.removeprefix("module.") for k in loaded.raw]
    assert loaded.stripped_prefixes == ("module.",) and loaded.metadata == meta and loaded.pickled is False
    assert loaded.notes == ("stripped key prefix 'module.'",)
    assert loaded.file_size == size and loaded.data_bytes == size and loaded.container_keys == ()
    assert loaded.identity == file_identity(path) and loaded.mapped is True
    assert isinstance(loaded.digest, FileDigest)
    import hashlib

    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_safetensors_without_metadata_and_refusals(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_file(_state(), str(path))
    assert load_checkpoint(path).metadata is None
    with pytest.raises(InputError) as info:
        load_checkpoint(path, entry="ema")
    assert info.value.message == f"{path} is a safetensors file: it has no container entries for --entry"
    save_file({"c": torch.zeros(1, dtype=torch.float8_e4m3fn)}, str(path))
    with pytest.raises(InputError, match="key c holds a float8_e4m3fn tensor"):
        load_checkpoint(path)
    save_file(_state(), str(path), metadata={METADATA_KEY: '{"blocks": 1}'})
    with pytest.raises(InputError, match="metadata is malformed: blocks is a int 1"):
        load_checkpoint(path)


def test_an_empty_or_broken_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_file({}, str(path))
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    assert info.value.message == f"{path} holds no tensors"
    path.write_bytes(b"\x10\0\0\0\0\0\0\0{\"a\": broken}   ")
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    assert info.value.message.startswith(f"{path} is not a readable safetensors file: ")
    assert info.value.__suppress_context__


def test_a_torch_zip_state_dict_loaded(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    state = _state()
    torch.save(state, path)
    loaded = load_checkpoint(path)
    assert loaded.format == "torch-zip" and loaded.entry is None and loaded.model is None and loaded.pickled is False
    assert loaded.mapped is True and loaded.notes == () and loaded.container_keys == () and loaded.metadata is None
    assert loaded.data_bytes == sum(v.numel() * 8 for v in state.values())
    assert loaded.file_size == path.stat().st_size and loaded.identity == file_identity(path)
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in state.items())


def test_a_container_loaded(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    state = _state()
    torch.save({"epoch": 3, "state_dict": state, "ema": state, 5: "x",
                METADATA_KEY: metadata_json({"blocks": []})}, path)
    loaded = load_checkpoint(path)
    assert loaded.entry == "ema" and loaded.container_keys == ("epoch", "state_dict", "ema", "5", METADATA_KEY)
    assert loaded.notes == ("used EMA weights from 'ema' (also present: 'state_dict'; pick it with --entry "
                            "state_dict)",)
    assert loaded.metadata == {"blocks": []}
    assert load_checkpoint(path, entry="state_dict").entry == "state_dict"


def test_a_state_dict_with_entry_given_is_taken_as_a_container(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save(_state(), path)
    with pytest.raises(InputError) as info:
        load_checkpoint(path, entry="conv.bias")
    assert info.value.message == f"{path}: entry 'conv.bias' is a Tensor, not a state dict of tensors"


def test_metadata_entry_that_is_not_text_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    state = _state()
    state._metadata = OrderedDict([(METADATA_KEY, {"json": metadata_json({"tensors": {}})})])
    torch.save({"state_dict": state, METADATA_KEY: {"not": "text"}}, path)
    assert load_checkpoint(path).metadata == {"tensors": {}}  # from the state dict's _metadata


def test_refusals_of_what_the_file_holds(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    assert info.value.message == f"{path} holds a list, not a state dict, container or model"
    torch.save({"a": torch.zeros(1), "b": 1}, path)
    with pytest.raises(InputError) as info:
        load_checkpoint(path, entry="a")
    assert info.value.message == f"{path}: entry 'a' is a Tensor, not a state dict of tensors"
    torch.save({"w": {"a": torch.zeros(1), "b": 2}}, path)
    with pytest.raises(InputError) as info:
        load_checkpoint(path, entry="w")
    assert info.value.message == f"{path}: entry 'w' is not a state dict: key b holds a int, not a tensor"
    torch.save({"w": {}}, path)
    with pytest.raises(InputError) as info:
        load_checkpoint(path, entry="w")
    assert info.value.message == f"{path}: entry 'w' is a dict, not a state dict of tensors"
    torch.save({"state_dict": {"c": torch.zeros(1, dtype=torch.complex64)}}, path)
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    assert info.value.message.startswith(f"{path}: entry 'state_dict', key c holds a complex64 tensor")
    torch.save({"c": torch.zeros(1, dtype=torch.complex64)}, path)
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    assert info.value.message.startswith(f"{path}: key c holds a complex64 tensor")


def test_nesting_is_checked(tmp_path: Path) -> None:
    value: object = torch.zeros(1)
    for _ in range(101):
        value = [value]
    path = tmp_path / "deep.pt"
    torch.save({"w": torch.zeros(1), "deep": value}, path)
    with pytest.raises(InputError, match="entry 'deep' holds containers nested 102 deep"):
        load_checkpoint(path)


def test_a_pickled_module_loaded(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    model = nn.Linear(2, 1)
    model._repvgg_cli_metadata = metadata_json({"blocks": []})
    torch.save(model, path)
    with pytest.raises(PickleRefusedError):
        load_checkpoint(path)
    loaded = load_checkpoint(path, allow_pickle=True)
    assert loaded.pickled is True and isinstance(loaded.model, nn.Linear) and loaded.entry is None
    assert loaded.notes[0] == "loaded with full unpickling (--allow-pickle)"
    assert list(loaded.state_dict) == ["weight", "bias"] and loaded.metadata == {"blocks": []}
    torch.save({"model": model, "epoch": 1}, path)
    loaded = load_checkpoint(path, allow_pickle=True)
    assert loaded.entry == "model" and isinstance(loaded.model, nn.Linear) and loaded.metadata == {"blocks": []}
    assert loaded.notes == ("loaded with full unpickling (--allow-pickle)", "used entry 'model'")


def test_a_legacy_file_loaded(tmp_path: Path) -> None:
    path = tmp_path / "l.pt"
    state = OrderedDict((f"_orig_mod.{k}", v) for k, v in _state().items())
    torch.save(state, path, _use_new_zipfile_serialization=False)
    loaded = load_checkpoint(path)
    assert loaded.format == "torch-legacy" and loaded.mapped is False and loaded.data_bytes == path.stat().st_size
    assert loaded.notes == ("stripped key prefix '_orig_mod.'",) and loaded.stripped_prefixes == ("_orig_mod.",)
    torch.save(state, path, _use_new_zipfile_serialization=False, pickle_protocol=1)
    with pytest.raises(PickleRefusedError, match="pickle protocol 1"):
        load_checkpoint(path)
    assert load_checkpoint(path, allow_pickle=True).pickled is True


def test_a_zip_of_protocol_1_is_refused_and_without_layout_is_not(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "z.pt"
    torch.save(_state(), path, pickle_protocol=1)
    with pytest.raises(PickleRefusedError, match="pickle protocol 1"):
        load_checkpoint(path)
    monkeypatch.setattr(rd, "scan_zip", lambda p, size, budget: None)
    torch.save(_state(), path)
    loaded = load_checkpoint(path)
    assert loaded.mapped is False and loaded.data_bytes == path.stat().st_size and loaded.notes == ()


def test_a_zip_with_a_pickle_head_of_no_opcode_is_read(tmp_path: Path, monkeypatch) -> None:
    from repvgg_cli.io import ziprecords

    real = ziprecords.scan_zip

    def no_head(p, size, budget):
        layout = real(p, size, budget)
        return ziprecords.ZipLayout(layout.records, layout.unpacked_bytes, layout.not_mappable, b"")

    monkeypatch.setattr(rd, "scan_zip", no_head)
    path = tmp_path / "z.pt"
    torch.save(_state(), path)
    assert load_checkpoint(path).format == "torch-zip"


def test_a_deflated_zip_is_read_unmapped_with_a_note(tmp_path: Path) -> None:
    path = tmp_path / "z.pt"
    torch.save(_state(), path)
    deflated = tmp_path / "d.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
    loaded = load_checkpoint(deflated)
    assert loaded.mapped is False and loaded.notes[0].startswith("read without memory-mapping: deflate-compressed")
    assert loaded.data_bytes == 18 * 8 + 2 * 8
    with pytest.raises(InputError, match="would unpack to"):
        load_checkpoint(deflated, max_unpacked_bytes=10)


def test_a_mapped_load_whose_storages_do_not_line_up_is_read_again(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "z.pt"
    torch.save(_state(), path)
    monkeypatch.setattr(rd, "mapped_storage_problem", lambda *args: "it does not line up")
    loaded = load_checkpoint(path)
    assert loaded.mapped is False and loaded.notes == ("read without memory-mapping: it does not line up",)
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in _state().items())


def test_a_given_digest_is_used_only_for_its_own_file(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    torch.save(_state(), path)
    mine = FileDigest(path)
    assert load_checkpoint(path, digest=mine).digest is mine
    other = FileDigest(tmp_path / "a.pt")
    assert load_checkpoint(path, digest=other).digest is other  # equal path
    (tmp_path / "b.pt").write_bytes(b"x")
    theirs = FileDigest(tmp_path / "b.pt")
    assert load_checkpoint(path, digest=theirs).digest is not theirs


def test_the_source_is_watched_when_mapped(tmp_path: Path, monkeypatch) -> None:
    watched = []
    monkeypatch.setattr(rd.mapguard, "watch", lambda p, d, i: watched.append((p, d, i)) or True)
    for name, save in (("a.pt", lambda p: torch.save(_state(), p)), ("a.safetensors", lambda p: save_file(_state(), str(p))),
                       ("l.pt", lambda p: torch.save(_state(), p, _use_new_zipfile_serialization=False))):
        path = tmp_path / name
        save(path)
        load_checkpoint(path)
        status = os.stat(path)
        if name == "l.pt":
            assert watched[-1][0] != path
        else:
            assert watched[-1] == (path, status.st_dev, status.st_ino)


def test_torch_warnings_while_loading_are_notes(tmp_path: Path, monkeypatch) -> None:
    import warnings

    path = tmp_path / "a.pt"
    torch.save(_state(), path)
    real = rd.torch_load

    def warning_load(*args, **kwargs):
        warnings.warn("careful\nmore", UserWarning)
        return real(*args, **kwargs)

    monkeypatch.setattr(rd, "torch_load", warning_load)
    assert load_checkpoint(path).notes == ("while loading: UserWarning: careful",)
    legacy = tmp_path / "l.pt"
    torch.save(_state(), legacy, _use_new_zipfile_serialization=False)
    assert load_checkpoint(legacy).notes == ("while loading: UserWarning: careful",)


# -- changes while reading -------------------------------------------------------------------------------


def _loaded(path: Path, digest=None) -> LoadedCheckpoint:
    return LoadedCheckpoint(path=path, format="torch-zip", raw={}, entry=None, state_dict=OrderedDict(),
                            identity=file_identity(path), digest=digest if digest is not None else "")


def test_identity_now_and_check_same_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert rd._identity_now(path) == file_identity(path)
    with pytest.raises(InputError) as info:
        rd._identity_now(tmp_path / "missing")
    assert info.value.message == f"{tmp_path / 'missing'}: cannot read: No such file or directory"
    before = file_identity(path)
    rd._check_same_file(path, before)
    path.write_bytes(b"abcd")
    with pytest.raises(InputError) as info:
        rd._check_same_file(path, before)
    assert info.value.message == f"{path} changed while repvgg was reading it: its size went from 3 to 4 bytes"
    assert info.value.hint == "run the command again once the file is complete and no other process writes it"


def test_source_change_cases(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert source_change(LoadedCheckpoint(path=path, format="x", raw=None, entry=None, state_dict=OrderedDict())) is None
    loaded = _loaded(path)
    assert source_change(loaded) is None
    os.utime(path, ns=(1, 1))
    assert source_change(loaded) == "it was modified"
    loaded = _loaded(path)
    path.unlink()
    assert source_change(loaded) == "it can no longer be read (No such file or directory)"
    path.write_bytes(b"abc")
    loaded = _loaded(path)
    status = loaded.identity
    monkeypatch.setattr(rd.mapguard, "was_cut", lambda d, i: (d, i) == (status.device, status.inode))
    assert source_change(loaded) == "it was truncated while memory-mapped (the reads past its new end gave zeros)"


def test_source_change_asks_the_digest_of_the_same_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")

    class Digest:
        def __init__(self, p, identity):
            self.path, self._identity = p, identity

        def identity(self):
            return self._identity

    monkeypatch.setattr(rd, "FileDigest", Digest)
    now = file_identity(path)
    other = FileIdentity(now.device, now.inode, 99, now.mtime_ns, now.ctime_ns)
    assert source_change(_loaded(path, Digest(path, other))) == "its size went from 3 to 99 bytes"
    assert source_change(_loaded(path, Digest(tmp_path / "g", other))) is None
    assert source_change(_loaded(path, Digest(path, now))) is None


def test_assert_unchanged_and_sha256(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    loaded = _loaded(path, digest="cafe")
    assert_unchanged(loaded)
    assert loaded.sha256 == "cafe"
    path.write_bytes(b"abcdef")
    with pytest.raises(InputError) as info:
        assert_unchanged(loaded)
    assert info.value.message == (f"{path} changed while repvgg was reading it: its size went from 3 to 6 bytes; its "
                                  "contents and sha256 cannot be trusted")
    assert info.value.hint == "run the command again once the file is complete and no other process writes it"
    with pytest.raises(InputError):
        loaded.sha256


def test_source_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    loaded = _loaded(path)
    with source_unchanged(loaded):
        pass
    with pytest.raises(KeyError):  # the source did not change: the error is the work's own
        with source_unchanged(loaded):
            raise KeyError("k")
    with pytest.raises(InputError, match="changed while repvgg was reading it"):
        with source_unchanged(loaded):
            path.write_bytes(b"abcd")
            raise OSError(14, "Bad address")
    with pytest.raises(InputError, match="changed while repvgg was reading it"):
        with source_unchanged(loaded):
            pass  # changed before: refused at the end


# -- more of the same, to the letter ---------------------------------------------------------------------


def test_sniff_a_two_byte_pickle_start_is_a_cut_pickle(tmp_path: Path) -> None:
    path = tmp_path / "p.pkl"
    path.write_bytes(b"\x80\x03")  # PROTO 3 and nothing after: the shortest cut pickle
    with pytest.raises(InputError) as info:
        sniff_format(path)
    assert info.value.message == f"{path} is not a readable checkpoint: it ends inside its first pickle (truncated?)"


def test_sniff_decides_on_the_first_64_kib_only(tmp_path: Path) -> None:
    # a protocol 0 pickle (no 0x80 start) whose first opcode's text runs past 64 KiB: its first bytes are no
    # whole pickle, so it is named by them alone; the rest of the file is never read
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps("x" * 70000, protocol=0))
    with pytest.raises(InputError) as info:
        sniff_format(path)
    assert info.value.message == f"{path} is not a checkpoint: neither a torch file (.pt/.pth) nor safetensors"
    path.write_bytes(pickle.dumps("x" * 1000, protocol=0))  # the same, short enough: a plain pickle
    with pytest.raises(InputError, match=r"plain Python pickle \(protocol 0\)"):
        sniff_format(path)


def test_legacy_protocol_of_a_protocol_2_start_is_its_own(tmp_path: Path) -> None:
    path = tmp_path / "l.pt"
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))  # the magic number, nothing after it
    assert rd._legacy_protocol(path) == 2
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1, protocol=0))
    assert rd._legacy_protocol(path) == 2  # the next pickle's protocol matters only after a protocol 0/1 start
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=3))
    assert rd._legacy_protocol(path) == 3


def test_legacy_protocol_reads_the_first_64_kib_only(tmp_path: Path) -> None:
    path = tmp_path / "l.pt"
    path.write_bytes(pickle.dumps("x" * 70000, protocol=0))  # no whole pickle in the first 64 KiB: left to torch
    assert rd._legacy_protocol(path) == 2
    path.write_bytes(pickle.dumps("x" * 1000, protocol=0))  # a whole protocol 0 pickle, nothing after it
    assert rd._legacy_protocol(path) == 0


def test_safetensors_are_opened_for_torch_on_the_cpu(tmp_path: Path, monkeypatch) -> None:
    import safetensors

    path = tmp_path / "a.safetensors"
    save_file(_state(), str(path))
    real = safetensors.safe_open
    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", spy)
    loaded = load_checkpoint(path)
    assert calls == [((str(path),), {"framework": "pt", "device": "cpu"})]
    assert all(v.device.type == "cpu" and torch.equal(v, _state()[k]) for k, v in loaded.state_dict.items())


def test_an_unreadable_safetensors_file_names_the_reason(tmp_path: Path, monkeypatch) -> None:
    import safetensors

    path = tmp_path / "a.safetensors"
    save_file(_state(), str(path))

    def broken(*args, **kwargs):
        raise ValueError("header too large\nsecond line")

    monkeypatch.setattr(safetensors, "safe_open", broken)
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    assert info.value.message == f"{path} is not a readable safetensors file: header too large"


def test_warnings_while_reading_safetensors_are_notes(tmp_path: Path, monkeypatch) -> None:
    import warnings

    path = tmp_path / "a.safetensors"
    save_file(_state(), str(path))
    real = rd._load_safetensors

    def warning_load(p):
        warnings.warn("odd header", UserWarning)
        return real(p)

    monkeypatch.setattr(rd, "_load_safetensors", warning_load)
    assert load_checkpoint(path).notes == ("while loading: UserWarning: odd header",)


def test_safetensors_refusals_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_file({"c": torch.zeros(1, dtype=torch.float8_e4m3fn)}, str(path))
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    assert info.value.message.startswith(f"{path}: key c holds a float8_e4m3fn tensor")
    save_file(_state(), str(path), metadata={METADATA_KEY: '{"blocks": 1}'})
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    assert info.value.message.startswith(f"{path}: its repvgg_cli metadata is malformed: blocks is a int 1")


def test_torch_metadata_is_checked_and_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"state_dict": _state(), METADATA_KEY: '{"blocks": 1}'}, path)
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    assert info.value.message.startswith(f"{path}: its repvgg_cli metadata is malformed: blocks is a int 1")
    assert info.value.hint == "the file was changed after repvgg convert wrote it; convert the train-form source again"


def test_a_zip_of_protocol_1_in_words_and_read_when_allowed(tmp_path: Path) -> None:
    path = tmp_path / "z.pt"
    torch.save(_state(), path, pickle_protocol=1)
    with pytest.raises(PickleRefusedError) as info:
        load_checkpoint(path)
    assert info.value.message == (f"{path} was written with pickle protocol 1 (torch.save(..., pickle_protocol=1)); "
                                  "torch's safe loader reads protocol 2 and later only")
    loaded = load_checkpoint(path, allow_pickle=True)
    assert loaded.pickled is True and loaded.format == "torch-zip"
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in _state().items())


def test_a_legacy_file_of_protocol_1_in_words(tmp_path: Path) -> None:
    path = tmp_path / "l.pt"
    torch.save(_state(), path, _use_new_zipfile_serialization=False, pickle_protocol=1)
    with pytest.raises(PickleRefusedError) as info:
        load_checkpoint(path)
    assert info.value.message == (f"{path} was written with pickle protocol 1 (torch.save(..., pickle_protocol=1)); "
                                  "torch's safe loader reads protocol 2 and later only")


def test_the_mapped_storage_check_is_asked_about_this_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "z.pt"
    torch.save(_state(), path)
    real = rd.mapped_storage_problem
    calls = []

    def spy(tensors, layout, p, device, inode):
        calls.append((p, device, inode))
        return real(tensors, layout, p, device, inode)

    monkeypatch.setattr(rd, "mapped_storage_problem", spy)
    loaded = load_checkpoint(path)
    status = os.stat(path)
    assert calls == [(path, status.st_dev, status.st_ino)] and loaded.mapped is True


def _pointers_in_mappings_of(path: Path, loaded: LoadedCheckpoint) -> list[bool]:
    mappings = rd.mapguard.mappings_of(loaded.identity.device, loaded.identity.inode, path)
    return [any(m.start <= v.untyped_storage().data_ptr() < m.end for m in mappings) for v in loaded.state_dict.values()]


def test_a_read_again_after_a_storage_problem_is_not_mapped(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "z.pt"
    torch.save(_state(), path)
    loaded = load_checkpoint(path)
    assert _pointers_in_mappings_of(path, loaded) == [True, True]  # mapped: the tensors are the file's pages
    del loaded
    monkeypatch.setattr(rd, "mapped_storage_problem", lambda *args: "it does not line up")
    loaded = load_checkpoint(path)
    assert _pointers_in_mappings_of(path, loaded) == [False, False]  # read again: copies


def _deep(levels: int) -> object:
    value: object = torch.zeros(1)
    for _ in range(levels):
        value = [value]
    return value


def test_nesting_is_checked_after_a_read_again_and_in_legacy_files(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "deep.pt"
    torch.save({"w": torch.zeros(1), "deep": _deep(101)}, path)
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    assert info.value.message == (f"{path}: entry 'deep' holds containers nested 102 deep, more than the 100 "
                                  "repvgg reads")
    legacy = tmp_path / "deep_legacy.pt"
    torch.save({"w": torch.zeros(1), "deep": _deep(101)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match="entry 'deep' holds containers nested 102 deep"):
        load_checkpoint(legacy)
    monkeypatch.setattr(rd, "mapped_storage_problem", lambda *args: "it does not line up")
    with pytest.raises(InputError, match="entry 'deep' holds containers nested 102 deep"):
        load_checkpoint(path)


def test_the_full_unpickling_note_comes_first(tmp_path: Path, monkeypatch) -> None:
    import warnings

    path = tmp_path / "m.pt"
    torch.save(nn.Linear(2, 1), path)
    real = rd.torch_load

    def warning_load(*args, **kwargs):
        warnings.warn("careful", UserWarning)
        return real(*args, **kwargs)

    monkeypatch.setattr(rd, "torch_load", warning_load)
    assert load_checkpoint(path, allow_pickle=True).notes == ("loaded with full unpickling (--allow-pickle)",
                                                              "while loading: UserWarning: careful")


def test_a_missing_entry_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"state_dict": _state(), "epoch": 1}, path)
    with pytest.raises(InputError) as info:
        load_checkpoint(path, entry="ema")
    assert info.value.message == f"{path} has no entry 'ema'; it has: state_dict, epoch"


def test_raw_is_the_top_level_object(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"state_dict": _state(), "epoch": 7}, path)
    loaded = load_checkpoint(path)
    assert list(loaded.raw) == ["state_dict", "epoch"] and loaded.raw["epoch"] == 7
    assert torch.equal(loaded.raw["state_dict"]["conv.bias"], _state()["conv.bias"])
    legacy = tmp_path / "l.pt"
    torch.save(_state(), legacy, _use_new_zipfile_serialization=False)
    assert list(load_checkpoint(legacy).raw) == ["conv.weight", "conv.bias"]


def test_an_entry_named_with_the_empty_string_is_named_in_errors(tmp_path: Path) -> None:
    """``--entry ''`` picks an entry like any other name: errors about it say ``entry ''``, not "the
    file" (the entry's name is falsy, not absent)."""
    cases = [
        ({"": {"a": torch.zeros(1), "b": 2}, "x": 1},
         "{path}: entry '' is not a state dict: key b holds a int, not a tensor"),
        ({"": {}, "x": 1}, "{path}: entry '' is a dict, not a state dict of tensors"),
    ]
    for index, (container, expected) in enumerate(cases):
        path = tmp_path / f"c{index}.pt"
        torch.save(container, path)
        with pytest.raises(InputError) as info:
            load_checkpoint(path, entry="")
        assert info.value.message == expected.format(path=path)
    path = tmp_path / "complex.pt"
    torch.save({"": {"a": torch.zeros(2, dtype=torch.complex64)}}, path)
    with pytest.raises(InputError) as info:
        load_checkpoint(path, entry="")
    assert info.value.message.startswith(f"{path}: entry '', key a holds a complex64 tensor")
