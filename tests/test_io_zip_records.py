"""Zip records read by their real compression method (issue 10, "Compressed zip records").

torch.load(mmap=True) takes each tensor's bytes from its record's data offset whatever the
record's compression, so a checkpoint re-zipped with deflate used to load as garbage (or fail with
a misleading message) and convert wrote garbage with exit 0. A RepVGG state dict whose identity-BN
biases are zero is the issue's case: only those records compress, only those are deflated.
Each test here failed on the code before the change: the deflated files loaded with wrong values,
the bomb was handed to torch, the short record lent its tensor the next record's bytes.
"""

from __future__ import annotations

import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import zoo
from repvgg_cli.api import convert_file
from repvgg_cli.errors import InputError
from repvgg_cli.io.read import load_checkpoint
from repvgg_cli.io.ziprecords import scan_zip
from tests.helpers import error_lines, invoke


def repvgg_state() -> OrderedDict[str, torch.Tensor]:
    """A tiny official-layout RepVGG, float64, random BN statistics, identity-BN biases zero."""
    torch.manual_seed(0)
    model = zoo.randomize_bn(zoo.repvgg("tiny"), seed=3).double()
    state = model.state_dict()
    zeroed = [k for k in state if k.endswith("rbr_identity.bias")]
    assert zeroed
    for key in zeroed:
        state[key].zero_()
    return OrderedDict((k, v.clone()) for k, v in state.items())


def rezip(source: Path, target: Path, deflate) -> int:
    """Copy ``source``'s records into ``target``, deflating those ``deflate(name, data)`` picks
    (as an archiver would); returns how many were deflated."""
    count = 0
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = old.read(info)
            packed = deflate(info.filename, data)
            count += packed
            new.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED if packed else zipfile.ZIP_STORED)
    return count


def all_zero(name: str, data: bytes) -> bool:
    return "/data/" in name and len(data) > 0 and data.count(0) == len(data)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("zips")
    state = repvgg_state()
    original = folder / "train.pt"
    torch.save(state, original)
    some, every = folder / "some-deflated.pt", folder / "all-deflated.pt"
    assert 0 < rezip(original, some, all_zero) < len(state)
    assert rezip(original, every, lambda name, data: True) == len(zipfile.ZipFile(original).infolist())
    return {"original": original, "some": some, "all": every}


def assert_same_tensors(got, expected) -> None:
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("which", ["some", "all"])
def test_deflated_records_load_exactly(files, which: str) -> None:
    expected = repvgg_state()
    loaded = load_checkpoint(files[which])
    assert_same_tensors(loaded.state_dict, expected)
    assert not loaded.mapped
    assert any(note.startswith("read without memory-mapping: deflate-compressed zip records: ") for note in loaded.notes)
    # torch's own reader agrees (the control: the file is a valid checkpoint)
    assert_same_tensors(torch.load(files[which], map_location="cpu", weights_only=True), expected)


def test_torch_save_files_are_still_mapped(files) -> None:
    loaded = load_checkpoint(files["original"])
    assert loaded.mapped and not any("memory-mapping" in n for n in loaded.notes)
    assert_same_tensors(loaded.state_dict, repvgg_state())


@pytest.mark.parametrize("which", ["some", "all"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_deflated_records_convert_to_what_the_original_converts_to(tmp_path: Path, files, which: str,
                                                                   suffix: str) -> None:
    reference = tmp_path / f"reference{suffix}"
    output = tmp_path / f"deploy{suffix}"
    assert convert_file(files["original"], reference).written
    outcome = convert_file(files[which], output)
    assert outcome.written and outcome.result.ok
    read = load_file if suffix == ".safetensors" else (lambda p: torch.load(p, weights_only=True))
    expected = {k: v for k, v in read(reference).items() if isinstance(v, torch.Tensor)}
    got = {k: v for k, v in read(output).items() if isinstance(v, torch.Tensor)}
    assert len(expected) > 10
    assert_same_tensors(got, expected)


def test_every_command_reads_deflated_records(tmp_path: Path, files) -> None:
    deploy = tmp_path / "deploy.safetensors"
    result = invoke("convert", files["all"], deploy)
    assert result.exit_code == 0, result.stderr
    assert "read without memory-mapping" in result.stderr
    for args in (["verify", deploy, "--against", files["all"]], ["verify", deploy, "--against", files["some"]],
                 ["inspect", files["some"]]):
        result = invoke(*args)
        assert result.exit_code == 0, (args, result.stderr)


def test_re_zipped_stored_records_are_read_unaligned_without_mapping(tmp_path: Path, files) -> None:
    path = tmp_path / "stored.pt"
    rezip(files["original"], path, lambda name, data: False)
    layout = scan_zip(path, path.stat().st_size)
    assert layout is not None and "not 64-byte aligned" in layout.not_mappable
    loaded = load_checkpoint(path)
    assert not loaded.mapped
    assert_same_tensors(loaded.state_dict, repvgg_state())


# -- bounded: bombs, lies, records that are too short ------------------------------------------


def central_entries(data: bytes):
    """``(offset, name)`` of every central-directory entry."""
    position = data.find(b"PK\x01\x02")
    while position >= 0:
        length = struct.unpack_from("<H", data, position + 28)[0]
        yield position, bytes(data[position + 46:position + 46 + length]).decode()
        position = data.find(b"PK\x01\x02", position + 46 + length)


def forge_sizes(path: Path, claim) -> None:
    """Rewrite the uncompressed size each record declares, in its local header and the central
    directory: ``claim(name, compressed_size)`` gives the new size, None leaves it."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        infos = {info.filename: info for info in archive.infolist()}
    for position, name in list(central_entries(data)):
        size = claim(name, infos[name].compress_size)
        if size is not None:
            struct.pack_into("<I", data, position + 24, size)
            struct.pack_into("<I", data, infos[name].header_offset + 22, size)
    path.write_bytes(bytes(data))


def deflated_zeros(path: Path, numel: int) -> str:
    """A checkpoint with one float64 tensor of zeros, its record deflated; returns its record name."""
    plain = path.with_name("plain-" + path.name)
    torch.save({"zeros": torch.zeros(numel, dtype=torch.float64)}, plain)
    rezip(plain, path, lambda name, data: "/data/" in name)
    return next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("/data/0"))


def test_a_zip_bomb_is_refused_before_unpacking(tmp_path: Path) -> None:
    path = tmp_path / "bomb.pt"
    deflated_zeros(path, 4 << 20)  # 32 MiB of zeros in a few tens of KiB
    assert path.stat().st_size < 100_000
    with pytest.raises(InputError) as info:
        load_checkpoint(path, max_unpacked_bytes=8 << 20)
    assert info.value.exit_code == 2
    assert "would unpack to 33554" in info.value.message and "more than the 8388608 bytes allowed" in info.value.message
    assert torch.equal(load_checkpoint(path).state_dict["zeros"], torch.zeros(4 << 20, dtype=torch.float64))


def test_a_size_deflate_cannot_produce_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lie.pt"
    name = deflated_zeros(path, 1024)
    forge_sizes(path, lambda record, _: 0xFFFF_0000 if record == name else None)  # 4 GiB from a few bytes
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    assert f"zip record {name} declares 4294901760 bytes unpacked" in info.value.message
    assert "more than deflate can produce" in info.value.message
    result = invoke("inspect", path)
    assert result.exit_code == 2 and len(error_lines(result)) == 1


def test_many_records_over_the_default_budget_are_refused(tmp_path: Path) -> None:
    # each record claims 1000x its compressed size (deflate could): together more than 1 GiB
    plain, path = tmp_path / "plain.pt", tmp_path / "many.pt"
    generator = torch.Generator().manual_seed(0)
    torch.save({f"t{i}": torch.randn(128, dtype=torch.float64, generator=generator) for i in range(1100)}, plain)
    rezip(plain, path, lambda name, data: "/data/" in name)
    forge_sizes(path, lambda name, compressed: 1000 * compressed if "/data/" in name else None)
    assert path.stat().st_size < 2 << 20
    with pytest.raises(InputError, match=r"would unpack to \d+ bytes from a \d+-byte file, more than the 1073741824"):
        load_checkpoint(path)


def test_a_record_that_unpacks_to_more_than_it_declares_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "longer.pt"
    name = deflated_zeros(path, 1024)
    forge_sizes(path, lambda record, _: 8 * 1024 - 8 if record == name else None)
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    assert info.value.message.startswith(f"{path} is not a readable torch checkpoint")


def test_a_stored_record_shorter_than_its_tensor_is_refused_not_read_past(tmp_path: Path) -> None:
    """A mapped load slices the file by the pickle's size: the short record lent its tensor the
    next record's bytes. The check after mapping sends it to torch's own reader, which refuses."""
    source = tmp_path / "ok.pt"
    torch.save(OrderedDict([("a", torch.arange(4, dtype=torch.float64)),
                            ("b", torch.arange(100, 132, dtype=torch.float64))]), source)
    path = tmp_path / "short.pt"
    with zipfile.ZipFile(source) as old:
        records = [(info.filename, old.read(info)) for info in old.infolist()]
    # the same layout torch writes (aligned, stored), but record data/0 two values short
    with zipfile.ZipFile(path, "w") as new:
        for name, data in records:
            if name.endswith("/data/0"):
                data = data[:16]
            padding = -(new.fp.tell() + 30 + len(name.encode()) + 4) % 64
            info = zipfile.ZipInfo(name)
            info.extra = struct.pack("<HH", 0x4650, padding) + b"\0" * padding  # torch's writer pads alike
            new.writestr(info, data)
    layout = scan_zip(path, path.stat().st_size)
    assert layout is not None and layout.not_mappable is None  # it looks mappable...
    with pytest.raises(InputError, match="record size .16 bytes. does not match expected size .32 bytes"):
        load_checkpoint(path)  # ...but its sizes are checked
