"""Reading a checkpoint: the format by its bytes, safe loading, containers unwrapped.

:func:`load_checkpoint` is the one way the tool reads a file: safetensors through its own
reader (memory-mapped, private), torch zip and legacy files through :mod:`.unpickle`, then the
weights are found in their container (:mod:`.containers`), checked for what repvgg can read
(:mod:`.contents`), and a deploy file's metadata is checked (:mod:`.metadata`).

A torch zip is memory-mapped only when every record is stored as ``torch.save`` stores it
(:mod:`.ziprecords`); a re-zipped (deflate) archive is read by each record's real method. The
file's identity (inode, size, times) is noted before reading and compared after loading, with
the digest's, and again by :func:`assert_unchanged` when a conversion ends, so a source that
changes while it is read is refused, and the sha256 recorded is that of the bytes read; a mapped
source truncated meanwhile reads as zeros instead of killing the process (:mod:`.mapguard`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import InputError, one_line
from . import mapguard
from .containers import (
    is_state_dict,
    pick_entry,
    prefix_notes,
    strip_prefixes,
    type_name,
    why_not_state_dict,
)
from .contents import Walk, check_nesting, check_tensors, walk
from .digest import FileDigest, FileIdentity
from .metadata import (
    METADATA_KEY,
    check_metadata,
    metadata_from_module,
    metadata_from_state,
    parse_metadata,
)
from .unpickle import (
    first_pickle,
    old_protocol_error,
    pickle_stream_protocol,
    torch_load,
    warnings_as_notes,
)
from .ziprecords import mapped_storage_problem, scan_zip

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint read from disk, unwrapped down to the weights that matter.

    Attributes:
        path: the file.
        format: "safetensors", "torch-zip" or "torch-legacy".
        raw: the top-level object as loaded (container, state dict or module).
        entry: the container entry used (None: the file is the state dict or module itself).
        state_dict: the weights, prefixes stripped, in file order.
        model: the pickled module, when the entry is one (only with allow_pickle).
        stripped_prefixes: the key prefixes removed (``module.``, ``_orig_mod.``).
        metadata: what repvgg recorded in a deploy file, else None.
        pickled: True when the file needed (and was allowed) full unpickling.
        notes: human-readable remarks (which entry was used and why; warnings torch raised
            while loading, one line each; why a zip was not memory-mapped).
        file_size: the file's size in bytes.
        digest: its sha256, being computed in the background (or the hex string).
        container_keys: the top-level keys of a container file.
        identity: the file's identity when it was read (see :func:`assert_unchanged`).
        mapped: whether the tensors are the file's pages (memory-mapped, private).
        data_bytes: the bytes of tensor data the file unpacks to (for a compressed zip, more
            than ``file_size``; the base of an output budget).
    """

    path: Path
    format: str
    raw: Any
    entry: str | None
    state_dict: OrderedDict[str, Tensor]
    model: nn.Module | None = None
    stripped_prefixes: tuple[str, ...] = ()
    metadata: dict | None = None
    pickled: bool = False
    notes: tuple[str, ...] = ()
    file_size: int = 0
    digest: FileDigest | str = ""
    container_keys: tuple[str, ...] = field(default_factory=tuple)
    identity: FileIdentity | None = None
    mapped: bool = False
    data_bytes: int = 0

    @property
    def sha256(self) -> str:
        """The file's sha256 (hashed in the background while it was loaded).

        Raises:
            InputError: the file changed since it was read (:func:`assert_unchanged`), so the
                digest may not be that of the bytes read.
        """
        value = self.digest.value() if isinstance(self.digest, FileDigest) else self.digest
        assert_unchanged(self)
        return value


def source_change(loaded: LoadedCheckpoint) -> str | None:
    """How the file changed since :func:`load_checkpoint` read it, in words; None if it did not.

    Compares the identity noted before reading with the file now and with the one the digest
    saw while hashing (which waits for the digest), and asks :mod:`.mapguard` whether a read of
    the mapped file ran past its end.
    """
    if loaded.identity is None:
        return None
    before = loaded.identity
    if mapguard.was_cut(before.device, before.inode):
        return "it was truncated while memory-mapped (the reads past its new end gave zeros)"
    try:
        now = FileIdentity.of(os.stat(loaded.path))
    except OSError as error:
        return f"it can no longer be read ({error.strerror or error})"
    change = before.difference(now)
    if change is None and isinstance(loaded.digest, FileDigest) and loaded.digest.path == loaded.path:
        change = before.difference(loaded.digest.identity())
    return change


def assert_unchanged(loaded: LoadedCheckpoint) -> None:
    """Refuse a source that changed while it was read (call it once the last byte is used).

    The bytes read, the sha256 recorded and the file on disk then agree: the identity (device,
    inode, size, mtime and ctime in ns) is the same before the load, after it, while hashing,
    and now, and no read of a mapped page ran past a new end of the file.

    Raises:
        InputError: naming the file and how it changed.
    """
    change = source_change(loaded)
    if change is not None:
        raise InputError(
            f"{loaded.path} changed while repvgg was reading it: {change}; its contents and sha256 cannot be trusted",
            hint="run the command again once the file is complete and no other process writes it",
        )


@contextmanager
def source_unchanged(loaded: LoadedCheckpoint) -> Iterator[None]:
    """Run the work that reads ``loaded``'s tensors; when it ends, refuse a source that changed.

    An error raised inside (an ``OSError`` "Bad address" from writing pages of a truncated
    mapped file, a check that failed on zeros) is replaced by the source-change error when the
    source changed meanwhile, since that is the cause; otherwise it propagates unchanged.

    Raises:
        InputError: the source changed (see :func:`assert_unchanged`).
    """
    try:
        yield
    except Exception:
        if source_change(loaded) is not None:
            assert_unchanged(loaded)
        raise
    assert_unchanged(loaded)


_SNIFF_BYTES = 1 << 16


def sniff_format(path: Path) -> str:
    """Tell safetensors, torch zip and legacy torch pickles apart by their first bytes.

    Raises:
        InputError: not a file, empty, a plain Python pickle (not ``torch.save``'s), or no
            checkpoint format at all.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except IsADirectoryError:
        raise InputError(f"{path} is a directory, not a checkpoint file") from None
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror or error}") from None
    if len(head) == 0:
        raise InputError(f"{path} is empty")
    # safetensors first: its first 8 bytes are the header length, which may begin with 0x80 or "PK".
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK":
        return "torch-zip"
    start = first_pickle(head)
    if start is not None and start.torch_magic:
        return "torch-legacy"
    if start is not None or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5):
        protocol = start.protocol if start is not None else head[1]
        if start is None and len(head) < _SNIFF_BYTES:
            raise InputError(f"{path} is not a readable checkpoint: it ends inside its first pickle (truncated?)")
        raise InputError(
            f"{path} is a plain Python pickle (protocol {protocol}), not a torch.save checkpoint: "
            "torch.load cannot read it",
            hint="load it in Python and save the weights with torch.save(state_dict, path) or as safetensors",
        )
    raise InputError(
        f"{path} is not a checkpoint: neither a torch file (.pt/.pth) nor safetensors",
    )


def _legacy_protocol(path: Path) -> int:
    """The pickle protocol of a legacy torch file: its first pickle's, or for protocol 0/1
    (whose magic number pickles alike) the next pickle's."""
    with open(path, "rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    start = first_pickle(head)
    if start is None or start.protocol >= 2:
        return start.protocol if start is not None else 2
    following = pickle_stream_protocol(head[start.end:])
    return 0 if following is None else following


def _check_torch_zip(path: Path, names: list[str] | None) -> None:
    """Refuse zip archives that are not ``torch.save`` checkpoints, e.g. ``torch.export`` programs.

    A ``.pt2`` file from ``torch.export.save`` has no ``data.pkl``; loading it means
    ``torch.export.load``, which unpickles. repvgg never calls it: it says what the file is.
    """
    if names is None:  # a damaged zip: torch's reader says what is wrong
        return
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return
    if path.suffix == ".pt2" or any(n == "archive_format" or n.endswith("/archive_format") for n in names):
        raise InputError(
            f"{path} is a torch.export program (.pt2), not a checkpoint; repvgg does not load .pt2 archives "
            "(torch.export.load unpickles)",
            hint="save the weights instead: torch.save(model.state_dict(), 'train.pt') or safetensors",
        )
    raise InputError(f"{path} is a zip archive but not a torch checkpoint: it has no data.pkl")


def _load_safetensors(path: Path) -> tuple[OrderedDict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        tensors: OrderedDict[str, Tensor] = OrderedDict()
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise InputError(f"{path} is not a readable safetensors file: {one_line(error)}") from None
    if not tensors:
        raise InputError(f"{path} holds no tensors")
    return tensors, dict(header)


def _identity_now(path: Path) -> FileIdentity:
    try:
        return FileIdentity.of(os.stat(path))
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror or error}") from None


def _check_same_file(path: Path, before: FileIdentity) -> None:
    change = before.difference(_identity_now(path))
    if change is not None:
        raise InputError(f"{path} changed while repvgg was reading it: {change}",
                         hint="run the command again once the file is complete and no other process writes it")


def _torch_zip(path: Path, identity: FileIdentity, allow_pickle: bool, max_unpacked_bytes: int | None,
               notes: list[str]) -> tuple[Any, bool, bool, int, Walk]:
    """Load a torch zip: memory-mapped when its records allow, else each record by its method.

    Returns:
        The loaded object, whether it was fully unpickled, whether it is mapped, its data bytes,
        and what :func:`walk` found in it.
    """
    layout = scan_zip(path, identity.size, max_unpacked_bytes)
    _check_torch_zip(path, layout.names if layout is not None else None)
    if layout is not None:
        protocol = pickle_stream_protocol(layout.pickle_head)
        error = old_protocol_error(path, 2 if protocol is None else protocol, allow_pickle)
        if error is not None:
            raise error
    data_bytes = sum(r.size for r in layout.records if r.is_tensor_data) if layout is not None else identity.size
    mapped = layout is not None and layout.not_mappable is None
    if layout is not None and not mapped:
        notes.append(f"read without memory-mapping: {layout.not_mappable}")
    raw, pickled = torch_load(path, allow_pickle, mmap=mapped)
    found = walk(raw)
    if mapped:
        assert layout is not None
        problem = mapped_storage_problem(found.tensors, layout, path, identity.device, identity.inode)
        if problem is not None:
            notes.append(f"read without memory-mapping: {problem}")
            del raw, found
            raw, pickled = torch_load(path, allow_pickle, mmap=False)
            found, mapped = walk(raw), False
    return raw, pickled, mapped, data_bytes, found


def load_checkpoint(
    path: str | os.PathLike,
    allow_pickle: bool = False,
    entry: str | None = None,
    digest: FileDigest | None = None,
    max_unpacked_bytes: int | None = None,
) -> LoadedCheckpoint:
    """Read a checkpoint and find its weights.

    Args:
        path: a ``.pt``/``.pth`` (zip or legacy) or ``.safetensors`` file.
        allow_pickle: permit full unpickling (runs code from the file; only for trusted files).
        entry: the container entry to use; default: EMA weights if present, else the plain ones.
        digest: the file's sha256 already being computed (the CLI starts it before importing
            torch); None: start it here.
        max_unpacked_bytes: the most a zip with compressed records may unpack to (None: 64 times
            the file, at least 1 GiB; see :func:`repvgg_cli.io.ziprecords.unpack_budget`).
    Returns:
        A :class:`LoadedCheckpoint`.
    Raises:
        InputError: unreadable file, nothing usable inside, a tensor or container repvgg cannot
            read (naming the key), a zip bomb, a file that changed while it was read;
            PickleRefusedError: needs --allow-pickle.
    """
    path = Path(path)
    fmt = sniff_format(path)
    identity = _identity_now(path)
    if digest is None or digest.path != path:
        digest = FileDigest(path)
    if fmt in ("safetensors", "torch-zip"):
        mapguard.watch(path, identity.device, identity.inode)
    notes: list[str] = []
    if fmt == "safetensors":
        with warnings_as_notes(notes):
            tensors, header = _load_safetensors(path)
        _check_same_file(path, identity)
        if entry is not None:
            raise InputError(f"{path} is a safetensors file: it has no container entries for --entry")
        check_tensors(path, tensors)
        metadata = parse_metadata(header[METADATA_KEY]) if METADATA_KEY in header else None
        check_metadata(path, metadata)
        state, stripped = strip_prefixes(tensors)
        return LoadedCheckpoint(path, fmt, tensors, None, state, None, stripped, metadata, False,
                                tuple(notes) + prefix_notes(stripped), identity.size, digest, (),
                                identity, True, identity.size)

    with warnings_as_notes(notes):
        if fmt == "torch-zip":
            raw, pickled, mapped, data_bytes, found = _torch_zip(path, identity, allow_pickle, max_unpacked_bytes,
                                                                 notes)
        else:
            error = old_protocol_error(path, _legacy_protocol(path), allow_pickle)
            if error is not None:
                raise error
            raw, pickled = torch_load(path, allow_pickle, mmap=False)
            mapped, data_bytes, found = False, identity.size, walk(raw)
    _check_same_file(path, identity)
    check_nesting(path, found)
    del found
    if pickled:
        notes.insert(0, "loaded with full unpickling (--allow-pickle)")
    model: nn.Module | None = None
    used: str | None = None
    container_keys: tuple[str, ...] = ()
    metadata = None
    if isinstance(raw, nn.Module):
        model, value = raw, raw
    elif is_state_dict(raw) and entry is None:
        value = raw
    elif isinstance(raw, Mapping):
        container_keys = tuple(str(k) for k in raw.keys())
        used, value, picked_notes = pick_entry(raw, entry, path)
        notes.extend(picked_notes)
        if isinstance(raw.get(METADATA_KEY), str):
            metadata = parse_metadata(raw[METADATA_KEY])
    else:
        raise InputError(f"{path} holds a {type(raw).__name__}, not a state dict, container or model")

    if isinstance(value, nn.Module):
        model = value
        value = value.state_dict()
        metadata = metadata or metadata_from_module(model)
    elif not is_state_dict(value):
        where = f"entry {used!r}"  # a bare state dict or a model never gets here: the value is an entry
        why = why_not_state_dict(value)
        if why is not None:
            raise InputError(f"{path}: {where} is not a state dict: {why}")
        raise InputError(f"{path}: {where} is {type_name(value)}, not a state dict of tensors")
    check_tensors(path, value, f"entry {used!r}, " if used is not None else "")
    metadata = metadata or metadata_from_state(value)
    check_metadata(path, metadata)
    state, stripped = strip_prefixes(value)
    notes.extend(prefix_notes(stripped))
    return LoadedCheckpoint(path, fmt, raw, used, state, model, stripped, metadata, pickled,
                            tuple(notes), identity.size, digest, container_keys, identity, mapped, data_bytes)
