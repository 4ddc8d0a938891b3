"""repvgg_cli.io.ziprecords, to the letter (issue 15: mutation score of the io layer).

Zip files built with :mod:`zipfile` (and one with ``torch.save``): each refusal of
:func:`scan_zip` in its words and at its boundary, where each record's data starts, why a file
is not mappable, the pickle's first bytes, and the storage checks after a mapped load.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch

from repvgg_cli.errors import InputError
from repvgg_cli.io import ziprecords as zr
from repvgg_cli.io.mapguard import FileMapping
from repvgg_cli.io.ziprecords import ZipLayout, ZipRecord, mapped_storage_problem, scan_zip, unpack_budget


def test_constants() -> None:
    assert zr.STORED == 0 and zr.DEFLATED == 8
    assert zr.METHOD_NAMES == {0: "stored", 8: "deflate", 9: "deflate64", 12: "bzip2", 14: "lzma", 93: "zstandard",
                               95: "xz", 98: "PPMd"}
    assert zr.DATA_ALIGNMENT == 64 and zr.DEFLATE_MAX_RATIO == 1032
    assert zr.UNPACK_FLOOR == 1 << 30 and zr.UNPACK_RATIO == 64
    assert zr._LOCAL_HEADER.size == 30 and zr._LOCAL_SIGNATURE == b"PK\x03\x04" and zr._PICKLE_HEAD == 4096


def _record(name="a/data/0", method=0, flags=0, compressed=10, size=10, offset=64) -> ZipRecord:
    return ZipRecord(name, method, flags, compressed, size, offset)


@pytest.mark.parametrize(("name", "tensor"), [("archive/data/0", True), ("x/data/12", True), ("data/0", False),
                                              ("a/data/0/b", False), ("a/dat/0", False), ("a/data.pkl", False)])
def test_is_tensor_data(name: str, tensor: bool) -> None:
    assert _record(name=name).is_tensor_data is tensor


def test_layout_names_and_method_names() -> None:
    layout = ZipLayout((_record(name="x"), _record(name="y")), 20, None, b"")
    assert layout.names == ["x", "y"]
    assert zr._method_name(12) == "bzip2" and zr._method_name(77) == "method 77"


# -- one record --------------------------------------------------------------------------------------


def test_check_record_refusals_in_words(tmp_path: Path) -> None:
    p = tmp_path / "c.pt"
    with pytest.raises(InputError) as info:
        zr._check_record(p, _record(flags=0x9))
    assert info.value.message == f"{p}: zip record a/data/0 is encrypted; torch cannot read it"
    zr._check_record(p, _record(flags=0x8))  # another flag bit: fine
    with pytest.raises(InputError) as info:
        zr._check_record(p, _record(method=12))
    assert info.value.message == (f"{p}: zip record a/data/0 is compressed with bzip2; torch reads stored and "
                                  "deflate records only")
    assert info.value.hint == "re-save the checkpoint with torch.save (it stores records uncompressed)"
    with pytest.raises(InputError) as info:
        zr._check_record(p, _record(size=11, compressed=10))
    assert info.value.message == (f"{p}: zip record a/data/0 is stored uncompressed but declares 11 bytes in 10: "
                                  "the archive is damaged")


def test_the_deflate_ratio_at_its_boundary(tmp_path: Path) -> None:
    p = tmp_path / "c.pt"
    zr._check_record(p, _record(method=8, compressed=10, size=1032 * 10 + 1024))
    zr._check_record(p, _record(method=8, compressed=10, size=5))  # deflate may grow a record: sizes differ
    with pytest.raises(InputError) as info:
        zr._check_record(p, _record(method=8, compressed=10, size=1032 * 10 + 1025))
    assert info.value.message == (f"{p}: zip record a/data/0 declares 11345 bytes unpacked from 10 compressed bytes, "
                                  "more than deflate can produce: the archive is malformed or hostile (a zip bomb)")


def test_unpack_budget() -> None:
    assert unpack_budget(10, 5) == 5 and unpack_budget(10, 0) == 0
    assert unpack_budget(10) == 1 << 30
    assert unpack_budget(16 << 20) == 1 << 30  # 64 x 16 MiB: the floor exactly
    assert unpack_budget((16 << 20) + 1) == 64 * ((16 << 20) + 1)


def test_not_mappable_reasons() -> None:
    stored = [_record(name="a/data.pkl", offset=30), _record(offset=64), _record(name="a/data/1", offset=128)]
    assert zr._not_mappable(stored) is None
    assert zr._not_mappable(stored + [_record(name="a/version", offset=3)]) is None  # only tensor data is aligned
    compressed = stored + [_record(name="a/data/2", method=8), _record(name="a/data/3", method=12)]
    assert zr._not_mappable(compressed) == "deflate-compressed zip records: 2 of 5 (e.g. a/data/2)"
    unaligned = stored + [_record(name="a/data/4", offset=65), _record(name="a/data/5", offset=100)]
    assert zr._not_mappable(unaligned) == ("tensor records not 64-byte aligned as torch.save aligns them: 2 "
                                           "(e.g. a/data/4; the file was re-zipped)")
    assert zr._not_mappable([]) is None


# -- whole archives ------------------------------------------------------------------------------------


def _zip(path: Path, entries: list[tuple[str, bytes, int]], extra: bytes = b"") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data, method in entries:
            info = zipfile.ZipInfo(name)
            info.compress_type = method
            info.extra = extra
            archive.writestr(info, data)
    return path


def test_scan_finds_each_records_data(tmp_path: Path) -> None:
    entries = [("arch/data.pkl", b"\x80\x02pickle" * 10, 0), ("arch/data/0", b"A" * 100, 0),
               ("arch/data/1", b"B" * 7, 8), ("arch/version", b"3\n", 0)]
    path = _zip(tmp_path / "z.pt", entries, extra=b"\xfe\xca\x03\x00abc")  # an extra field moves the data
    size = path.stat().st_size
    layout = scan_zip(path, size)
    assert layout is not None and layout.names == [e[0] for e in entries]
    raw = path.read_bytes()
    for record, (name, data, method) in zip(layout.records, entries):
        assert (record.name, record.method, record.size) == (name, method, len(data))
        if method == 0:
            assert raw[record.data_offset:record.data_offset + len(data)] == data
            assert record.compressed_size == len(data)
    assert layout.unpacked_bytes == sum(len(e[1]) for e in entries)
    assert layout.pickle_head == entries[0][1]
    assert layout.not_mappable == "deflate-compressed zip records: 1 of 4 (e.g. arch/data/1)"


def test_the_pickle_head_is_its_first_4096_bytes_of_a_top_level_or_archive_pickle(tmp_path: Path) -> None:
    data = bytes(range(256)) * 20
    top = _zip(tmp_path / "t.pt", [("x", b"1", 0), ("data.pkl", data, 8)])
    assert scan_zip(top, top.stat().st_size).pickle_head == data[:4096]
    none = _zip(tmp_path / "n.pt", [("data.pkl.bak", data, 0), ("xdata.pkl", data, 0)])
    assert scan_zip(none, none.stat().st_size).pickle_head == b""
    first = _zip(tmp_path / "f.pt", [("a/data.pkl", b"first", 0), ("b/data.pkl", b"second", 0)])
    assert scan_zip(first, first.stat().st_size).pickle_head == b"first"


def test_an_unreadable_pickle_record_gives_an_empty_head(tmp_path: Path, monkeypatch) -> None:
    path = _zip(tmp_path / "z.pt", [("a/data.pkl", b"pickle", 0)])

    def broken(self, *args, **kwargs):
        raise zipfile.BadZipFile("bad")

    monkeypatch.setattr(zipfile.ZipFile, "open", broken)
    layout = scan_zip(path, path.stat().st_size)
    assert layout is not None and layout.pickle_head == b""


def test_not_a_zip_is_none(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(b"PK\x03\x04 not really")
    assert scan_zip(path, path.stat().st_size) is None
    assert scan_zip(tmp_path / "missing.pt", 0) is None


def test_a_damaged_local_header_is_refused(tmp_path: Path) -> None:
    path = _zip(tmp_path / "z.pt", [("a/data/0", b"x" * 50, 0), ("a/data/1", b"y" * 50, 0)])
    raw = bytearray(path.read_bytes())
    second = raw.index(b"PK\x03\x04", 4)
    raw[second:second + 4] = b"XXXX"
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError) as info:
        scan_zip(path, len(raw))
    assert info.value.message == (f"{path}: zip record a/data/1 has no local header where the central directory "
                                  "says: the archive is damaged")


def test_a_local_header_cut_short_is_refused(tmp_path: Path, monkeypatch) -> None:
    path = _zip(tmp_path / "z.pt", [("a/data/0", b"x" * 50, 0)])
    real = os.pread
    monkeypatch.setattr(zr.os, "pread", lambda fd, n, offset: real(fd, n, offset)[:29])
    with pytest.raises(InputError, match="has no local header"):
        scan_zip(path, path.stat().st_size)


def test_a_record_past_the_end_is_refused_at_its_boundary(tmp_path: Path) -> None:
    path = _zip(tmp_path / "z.pt", [("a/data/0", b"x" * 50, 0)])
    layout = scan_zip(path, path.stat().st_size)
    end = layout.records[0].data_offset + 50
    assert scan_zip(path, end) is not None  # the record ends exactly at the given size
    with pytest.raises(InputError) as info:
        scan_zip(path, end - 1)
    assert info.value.message == (f"{path}: zip record a/data/0 runs past the end of the file ({end - 1} bytes): "
                                  "the file is truncated or damaged")


def test_an_os_error_while_reading_headers_is_an_input_error(tmp_path: Path, monkeypatch) -> None:
    path = _zip(tmp_path / "z.pt", [("a/data/0", b"x", 0)])

    def failing(fd, n, offset):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(zr.os, "pread", failing)
    with pytest.raises(InputError) as info:
        scan_zip(path, path.stat().st_size)
    assert info.value.message == f"{path}: cannot read: [Errno 5] Input/output error"
    assert info.value.__suppress_context__


def test_each_record_is_checked(tmp_path: Path) -> None:
    path = _zip(tmp_path / "z.pt", [("a/data/0", b"x", 0), ("a/data/1", b"y" * 10, zipfile.ZIP_BZIP2)])
    with pytest.raises(InputError, match="a/data/1 is compressed with bzip2"):
        scan_zip(path, path.stat().st_size)


def test_the_unpack_budget_applies_to_compressed_archives_only(tmp_path: Path) -> None:
    data = b"\0" * 5000
    stored = _zip(tmp_path / "s.pt", [("a/data/0", data, 0)])
    assert scan_zip(stored, stored.stat().st_size, max_unpacked_bytes=10) is not None
    deflated = _zip(tmp_path / "d.pt", [("a/data/0", data, 8), ("a/data/1", b"1", 0)])
    size = deflated.stat().st_size
    assert scan_zip(deflated, size, max_unpacked_bytes=5001).unpacked_bytes == 5001  # exactly the budget
    with pytest.raises(InputError) as info:
        scan_zip(deflated, size, max_unpacked_bytes=5000)
    assert info.value.message == (f"{deflated}: its compressed zip records would unpack to 5001 bytes from a "
                                  f"{size}-byte file, more than the 5000 bytes allowed (a zip bomb?)")
    assert info.value.hint == "re-save the checkpoint with torch.save (uncompressed) if it is genuine"


# -- storages after a mapped load -----------------------------------------------------------------------


def test_storages_are_distinct_non_empty_and_the_largest_view_wins() -> None:
    a = torch.zeros(8, dtype=torch.float64)
    found = zr._storages([a[:2], a, torch.zeros(0), torch.zeros(2, device="meta"), torch.zeros(2, 2).to_sparse()])
    assert found == {a.untyped_storage().data_ptr(): 64}


def test_storages_keep_the_larger_size_for_one_address(monkeypatch) -> None:
    class Fake:
        def __init__(self, n):
            self.n = n

        def untyped_storage(self):
            return self

        def data_ptr(self):
            return 1000

        def nbytes(self):
            return self.n

    assert zr._storages([Fake(8), Fake(16), Fake(4)]) == {1000: 16}
    assert zr._storages([Fake(0)]) == {}


def test_mapping_containing_is_half_open() -> None:
    mappings = [FileMapping(100, 200, 0, 1, 2, "p"), FileMapping(200, 300, 4096, 1, 2, "p")]
    assert zr._mapping_containing(mappings, 99) is None
    assert zr._mapping_containing(mappings, 100) is mappings[0]
    assert zr._mapping_containing(mappings, 199) is mappings[0]
    assert zr._mapping_containing(mappings, 200) is mappings[1]
    assert zr._mapping_containing(mappings, 300) is None


def test_storage_problem_in_words() -> None:
    records = {64: _record(size=16, offset=64)}
    assert zr._storage_problem(records, 64, 16) is None
    assert zr._storage_problem(records, 64, 17) == "record a/data/0 holds 16 bytes but its tensor's storage needs 17"
    assert zr._storage_problem(records, 65, 1) == "a tensor's bytes start at offset 65, which is no tensor record's data"


def _records(sizes: list[int]) -> dict[int, ZipRecord]:
    return {64 * (i + 1): _record(name=f"a/data/{i}", size=s, compressed=s, offset=64 * (i + 1))
            for i, s in enumerate(sizes)}


def test_without_maps_the_lowest_storage_is_tried_against_the_first_16_records() -> None:
    base = 10_000
    records = _records([1] * 15 + [100] + [1, 200])
    # only the 16th record fits the storage: found within the first 16
    assert zr._problem_without_maps(records, {base + 64 * 16: 100}) is None
    # only the 18th fits: not tried
    assert zr._problem_without_maps(records, {base + 64 * 18: 200}) == (
        "the tensors' storages do not line up with the archive's tensor records")
    records = _records([1] * 16 + [100])
    assert zr._problem_without_maps(records, {base + 64 * 17: 100}) is not None  # the 17th: not tried


def test_without_maps_every_storage_must_line_up() -> None:
    records = _records([16, 32, 8])
    base = 50_000
    assert zr._problem_without_maps(records, {base + 64: 16, base + 192: 8}) is None
    assert zr._problem_without_maps(records, {base + 64: 16, base + 193: 8}) is not None
    assert zr._problem_without_maps(records, {base + 64: 16, base + 192: 9}) is not None


def _layout_of(path: Path) -> ZipLayout:
    return scan_zip(path, path.stat().st_size)


def test_mapped_storage_problem_after_a_real_mapped_load(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "m.pt"
    torch.save({"a": torch.arange(16, dtype=torch.float64), "b": torch.ones(3)}, path)
    layout = _layout_of(path)
    status = path.stat()
    state = torch.load(path, mmap=True, weights_only=True)
    tensors = list(state.values())
    assert mapped_storage_problem(tensors, layout, path, status.st_dev, status.st_ino) is None
    assert mapped_storage_problem([], layout, path, status.st_dev, status.st_ino) is None
    # a storage made in memory is in no mapping of the file: not checked
    assert mapped_storage_problem(tensors + [torch.zeros(5)], layout, path, status.st_dev, status.st_ino) is None
    # a record that declares fewer bytes than the storage holds
    short = ZipLayout(tuple(ZipRecord(r.name, r.method, r.flags, r.compressed_size, r.size - 1, r.data_offset)
                            if r.size == 128 else r for r in layout.records), 0, None, b"")
    problem = mapped_storage_problem(tensors, short, path, status.st_dev, status.st_ino)
    assert problem is not None and problem.endswith("holds 127 bytes but its tensor's storage needs 128")
    # without /proc/self/maps: the storages are lined up with the records by their lowest address
    monkeypatch.setattr(zr, "mappings_of", lambda device, inode, p: [])
    assert mapped_storage_problem(tensors, layout, path, status.st_dev, status.st_ino) is None
    assert mapped_storage_problem(tensors, short, path, status.st_dev, status.st_ino) == (
        "the tensors' storages do not line up with the archive's tensor records")
    del state, tensors


def test_mapped_storage_problem_reads_the_mappings_of_this_file(tmp_path: Path, monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(zr, "mappings_of", lambda device, inode, p: seen.append((device, inode, p)) or [])
    layout = ZipLayout((_record(offset=64, size=8),), 8, None, b"")
    t = torch.zeros(1, dtype=torch.float64)
    mapped_storage_problem([t], layout, tmp_path / "x", 7, 9)
    assert seen == [(7, 9, tmp_path / "x")]
    # only tensor data records count: a storage lined up with another record is a problem
    other = ZipLayout((_record(name="a/data.pkl", offset=64, size=8),), 8, None, b"")
    assert mapped_storage_problem([t], other, tmp_path / "x", 7, 9) is not None


# -- details the tests above leave open -------------------------------------------------------------------


def test_a_refused_record_from_scan_zip_names_the_file(tmp_path: Path) -> None:
    path = _zip(tmp_path / "bz.pt", [("a/data/0", b"y" * 10, zipfile.ZIP_BZIP2)])
    with pytest.raises(InputError) as info:
        scan_zip(path, path.stat().st_size)
    assert info.value.message == (f"{path}: zip record a/data/0 is compressed with bzip2; "
                                  "torch reads stored and deflate records only")


def test_a_one_byte_storage_counts() -> None:
    t = torch.ones(1, dtype=torch.uint8)
    assert zr._storages([t]) == {t.untyped_storage().data_ptr(): 1}
    b = torch.ones(1, dtype=torch.bool)
    assert zr._storages([b, t]) == {b.untyped_storage().data_ptr(): 1, t.untyped_storage().data_ptr(): 1}


def test_a_tensor_without_a_storage_does_not_hide_the_ones_after_it() -> None:
    sparse = torch.zeros(2, 2).to_sparse()
    with pytest.raises((RuntimeError, NotImplementedError)):
        sparse.untyped_storage()
    a, b = torch.zeros(3, dtype=torch.float64), torch.zeros(2, dtype=torch.float32)
    assert zr._storages([sparse, a, sparse, b]) == {a.untyped_storage().data_ptr(): 24,
                                                     b.untyped_storage().data_ptr(): 8}


def test_a_storage_outside_the_files_mappings_does_not_end_the_check(tmp_path: Path, monkeypatch) -> None:
    # the first storage is in no mapping of the file (made in memory); the second is in one,
    # at an offset that is no tensor record's data: that is still found
    outside, inside = torch.zeros(4, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    pointer = inside.untyped_storage().data_ptr()
    mapping = FileMapping(pointer, pointer + 16, 100, 7, 9, str(tmp_path / "x"))  # file offset 100 at `pointer`
    monkeypatch.setattr(zr, "mappings_of", lambda device, inode, p: [mapping])
    layout = ZipLayout((_record(offset=64, size=16),), 16, None, b"")
    assert mapped_storage_problem([outside, inside], layout, tmp_path / "x", 7, 9) == (
        "a tensor's bytes start at offset 100, which is no tensor record's data")
    # lined up with the record (offset 64, 16 bytes): no problem, the outside storage unchecked
    mapping = FileMapping(pointer, pointer + 16, 64, 7, 9, str(tmp_path / "x"))
    monkeypatch.setattr(zr, "mappings_of", lambda device, inode, p: [mapping])
    assert mapped_storage_problem([outside, inside], layout, tmp_path / "x", 7, 9) is None
