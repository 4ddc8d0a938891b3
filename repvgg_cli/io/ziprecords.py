"""The records of a torch zip checkpoint as stored: whether its tensors can be memory-mapped.

``torch.save`` stores every record uncompressed with its data aligned to 64 bytes (miniz's writer
pads the local header), so ``torch.load(mmap=True)`` can hand out the file's pages. That path
takes each tensor's bytes from its record's data offset, as many as the pickle says, whatever
the record's compression method or size (``torch/serialization.py``: ``_load``/``load_tensor``
slice ``overall_storage``). A checkpoint re-zipped by an archiver (deflate) is then read as
garbage, and a record shorter than its tensor lends it the next record's bytes. Without mmap,
torch's reader extracts each record by its method and checks its size (``get_storage_from_record``).

:func:`scan_zip` reads the central directory and every local header (no data) and says whether
mapping is safe: every record stored, unencrypted, its size consistent, tensor data aligned.
Otherwise the file is loaded without mmap, after bounding what deflate would unpack (a zip bomb
declares gigabytes from kilobytes). After a mapped load, :func:`mapped_storage_problem` checks
that every tensor's storage starts at a data record's first byte and fits in that record.

References: PKWARE APPNOTE.TXT (local file header: 30 bytes, then name and extra field); pytorch
``torch/serialization.py`` (``_load``) and ``caffe2/serialize/inline_container.cc`` (alignment).
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ..errors import InputError, one_line
from .mapguard import FileMapping, mappings_of

STORED, DEFLATED = zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED

METHOD_NAMES = {STORED: "stored", DEFLATED: "deflate", 9: "deflate64", 12: "bzip2", 14: "lzma",
                93: "zstandard", 95: "xz", 98: "PPMd"}

DATA_ALIGNMENT = 64
"""torch's writer aligns every tensor record's data to 64 bytes; other data is not mapped."""

DEFLATE_MAX_RATIO = 1032
"""The most deflate can expand: 258 bytes per one-bit match code, about 1032 to 1; a record that
declares more is malformed or hostile."""

UNPACK_FLOOR = 1 << 30
UNPACK_RATIO = 64
"""Default bound on the bytes a compressed checkpoint may unpack to: 64 times the file, at least 1 GiB."""

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")
_LOCAL_SIGNATURE = b"PK\x03\x04"
_PICKLE_HEAD = 4096


@dataclass(frozen=True)
class ZipRecord:
    """One record of the archive: name, compression method, sizes, where its data starts."""

    name: str
    method: int
    flags: int
    compressed_size: int
    size: int
    data_offset: int

    @property
    def is_tensor_data(self) -> bool:
        """A tensor's bytes: ``<archive>/data/<key>`` in torch's layout."""
        parts = self.name.split("/")
        return len(parts) == 3 and parts[1] == "data"


@dataclass(frozen=True)
class ZipLayout:
    """What :func:`scan_zip` found.

    Attributes:
        records: every record, in central-directory order.
        unpacked_bytes: the bytes every record declares uncompressed (what a load without mmap holds).
        not_mappable: why the tensors cannot be the file's pages (None: they can).
        pickle_head: the first bytes of ``data.pkl`` (b"" if there is none).
    """

    records: tuple[ZipRecord, ...]
    unpacked_bytes: int
    not_mappable: str | None
    pickle_head: bytes

    @property
    def names(self) -> list[str]:
        return [record.name for record in self.records]


def _method_name(method: int) -> str:
    return METHOD_NAMES.get(method, f"method {method}")


def _read_records(path: Path, archive: zipfile.ZipFile, file_size: int) -> list[ZipRecord]:
    records = []
    with open(path, "rb") as handle:
        fd = handle.fileno()
        for info in archive.infolist():
            header = os.pread(fd, _LOCAL_HEADER.size, info.header_offset)
            if len(header) < _LOCAL_HEADER.size or header[:4] != _LOCAL_SIGNATURE:
                raise InputError(f"{path}: zip record {info.filename} has no local header where the "
                                 "central directory says: the archive is damaged")
            fields = _LOCAL_HEADER.unpack(header)
            data_offset = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
            record = ZipRecord(info.filename, info.compress_type, info.flag_bits, info.compress_size,
                               info.file_size, data_offset)
            if data_offset + record.compressed_size > file_size:
                raise InputError(f"{path}: zip record {record.name} runs past the end of the file "
                                 f"({file_size} bytes): the file is truncated or damaged")
            records.append(record)
    return records


def _check_record(path: Path, record: ZipRecord) -> None:
    if record.flags & 0x1:
        raise InputError(f"{path}: zip record {record.name} is encrypted; torch cannot read it")
    if record.method not in (STORED, DEFLATED):
        raise InputError(
            f"{path}: zip record {record.name} is compressed with {_method_name(record.method)}; "
            "torch reads stored and deflate records only",
            hint="re-save the checkpoint with torch.save (it stores records uncompressed)",
        )
    if record.method == STORED and record.size != record.compressed_size:
        raise InputError(f"{path}: zip record {record.name} is stored uncompressed but declares "
                         f"{record.size} bytes in {record.compressed_size}: the archive is damaged")
    if record.method == DEFLATED and record.size > DEFLATE_MAX_RATIO * record.compressed_size + 1024:
        raise InputError(
            f"{path}: zip record {record.name} declares {record.size} bytes unpacked from "
            f"{record.compressed_size} compressed bytes, more than deflate can produce: "
            "the archive is malformed or hostile (a zip bomb)",
        )


def unpack_budget(file_size: int, max_unpacked_bytes: int | None = None) -> int:
    """The most bytes a compressed checkpoint of ``file_size`` bytes may unpack to."""
    if max_unpacked_bytes is not None:
        return max_unpacked_bytes
    return max(UNPACK_FLOOR, UNPACK_RATIO * file_size)


def _not_mappable(records: list[ZipRecord]) -> str | None:
    compressed = [r for r in records if r.method != STORED]
    if compressed:
        first = compressed[0]
        return (f"{_method_name(first.method)}-compressed zip records: {len(compressed)} of {len(records)} "
                f"(e.g. {first.name})")
    unaligned = [r for r in records if r.is_tensor_data and r.data_offset % DATA_ALIGNMENT]
    if unaligned:
        return (f"tensor records not {DATA_ALIGNMENT}-byte aligned as torch.save aligns them: {len(unaligned)} "
                f"(e.g. {unaligned[0].name}; the file was re-zipped)")
    return None


def scan_zip(path: Path, file_size: int, max_unpacked_bytes: int | None = None) -> ZipLayout | None:
    """Read a zip checkpoint's directory and local headers; refuse what no reader should unpack.

    Args:
        path: the file (already sniffed as a zip).
        file_size: its size in bytes.
        max_unpacked_bytes: the most its compressed records may unpack to; None:
            :func:`unpack_budget`'s default (64 times the file, at least 1 GiB).
    Returns:
        The layout, or None when Python's zip reader cannot parse the directory (torch's reader
        then says what is wrong; the file is not memory-mapped).
    Raises:
        InputError: encrypted records, a method torch cannot read, sizes deflate cannot produce,
            records past the end of the file, or more unpacked bytes than the budget.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None
    with archive:
        try:
            records = _read_records(path, archive, file_size)
        except OSError as error:
            raise InputError(f"{path}: cannot read: {one_line(error)}") from None
        for record in records:
            _check_record(path, record)
        unpacked = sum(record.size for record in records)
        if any(record.method != STORED for record in records) and unpacked > unpack_budget(file_size, max_unpacked_bytes):
            raise InputError(
                f"{path}: its compressed zip records would unpack to {unpacked} bytes from a {file_size}-byte file, "
                f"more than the {unpack_budget(file_size, max_unpacked_bytes)} bytes allowed (a zip bomb?)",
                hint="re-save the checkpoint with torch.save (uncompressed) if it is genuine",
            )
        head = b""
        pickle_record = next((r for r in records if r.name == "data.pkl" or r.name.endswith("/data.pkl")), None)
        if pickle_record is not None:
            try:
                with archive.open(pickle_record.name) as stream:
                    head = stream.read(_PICKLE_HEAD)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError):
                head = b""
    return ZipLayout(tuple(records), unpacked, _not_mappable(records), head)


def _storages(tensors: Iterable[Tensor]) -> dict[int, int]:
    """``{data_ptr: nbytes}`` of the distinct non-empty CPU storages behind ``tensors``."""
    found: dict[int, int] = {}
    for tensor in tensors:
        try:  # sparse tensors have no storage of their own; meta storages have no address
            storage = tensor.untyped_storage()
            pointer, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):
            continue
        if pointer and nbytes and found.get(pointer, 0) < nbytes:
            found[pointer] = nbytes
    return found


def _mapping_containing(mappings: list[FileMapping], pointer: int) -> FileMapping | None:
    return next((m for m in mappings if m.start <= pointer < m.end), None)


def mapped_storage_problem(tensors: Iterable[Tensor], layout: ZipLayout, path: Path, device: int,
                           inode: int) -> str | None:
    """After a memory-mapped load: does every storage start at a tensor record's data and fit in it?

    torch's mmap path slices the mapped file at each record's data offset by the size the pickle
    declares, without comparing it with the record's size. Storages not in a mapping of this
    file (made by an allowed unpickle, not read from the file) are not checked.

    Returns:
        None when every storage is within its record, else what is wrong (one line).
    """
    records = {r.data_offset: r for r in layout.records if r.is_tensor_data}
    storages = _storages(tensors)
    if not storages:
        return None
    mappings = mappings_of(device, inode, path)
    if mappings:
        for pointer, nbytes in storages.items():
            mapping = _mapping_containing(mappings, pointer)
            if mapping is None:
                continue
            problem = _storage_problem(records, pointer - mapping.base, nbytes)
            if problem is not None:
                return problem
        return None
    return _problem_without_maps(records, storages)


def _storage_problem(records: dict[int, ZipRecord], offset: int, nbytes: int) -> str | None:
    record = records.get(offset)
    if record is None:
        return f"a tensor's bytes start at offset {offset}, which is no tensor record's data"
    if nbytes > record.size:
        return f"record {record.name} holds {record.size} bytes but its tensor's storage needs {nbytes}"
    return None


def _problem_without_maps(records: dict[int, ZipRecord], storages: dict[int, int]) -> str | None:
    """No ``/proc/self/maps``: the lowest storage belongs to one of the first records; try those."""
    lowest = min(storages)
    for offset in sorted(records)[:16]:
        base = lowest - offset
        if all(_storage_problem(records, pointer - base, nbytes) is None for pointer, nbytes in storages.items()):
            return None
    return "the tensors' storages do not line up with the archive's tensor records"
