"""Reading a checkpoint: the format by its bytes, safe loading, containers unwrapped.

:func:`load_checkpoint` is the one way the tool reads a file: safetensors through its own
reader (memory-mapped, private), torch zip and legacy files through :mod:`.unpickle`, then the
weights are found in their container (:mod:`.containers`) and a deploy file's metadata is
checked (:mod:`.metadata`).
"""

from __future__ import annotations

import os
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import InputError, one_line
from .containers import is_state_dict, pick_entry, prefix_notes, strip_prefixes, type_name, why_not_state_dict
from .digest import FileDigest
from .metadata import METADATA_KEY, check_metadata, metadata_from_module, metadata_from_state, parse_metadata
from .unpickle import torch_load


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
        notes: human-readable remarks (which entry was used and why).
    """

    path: Path
    format: str
    raw: Any
    entry: str | None
    state_dict: "OrderedDict[str, Tensor]"
    model: nn.Module | None = None
    stripped_prefixes: tuple[str, ...] = ()
    metadata: dict | None = None
    pickled: bool = False
    notes: tuple[str, ...] = ()
    file_size: int = 0
    digest: "FileDigest | str" = ""
    container_keys: tuple[str, ...] = field(default_factory=tuple)

    @property
    def sha256(self) -> str:
        """The file's sha256 (hashed in the background while it was loaded)."""
        return self.digest.value() if isinstance(self.digest, FileDigest) else self.digest


def sniff_format(path: Path) -> str:
    """Tell safetensors, torch zip and legacy torch pickles apart by their first bytes."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
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
    if head[:1] == b"\x80":
        return "torch-legacy"
    raise InputError(
        f"{path} is not a checkpoint: neither a torch file (.pt/.pth) nor safetensors",
    )


def _check_torch_zip(path: Path) -> None:
    """Refuse zip archives that are not ``torch.save`` checkpoints, e.g. ``torch.export`` programs.

    A ``.pt2`` file from ``torch.export.save`` has no ``data.pkl``; loading it means
    ``torch.export.load``, which unpickles. repvgg never calls it: it says what the file is.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except Exception:  # noqa: BLE001 - a damaged zip: torch's reader says what is wrong
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


def _load_safetensors(path: Path) -> tuple["OrderedDict[str, Tensor]", dict[str, str]]:
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


def load_checkpoint(
    path: str | os.PathLike,
    allow_pickle: bool = False,
    entry: str | None = None,
    digest: FileDigest | None = None,
) -> LoadedCheckpoint:
    """Read a checkpoint and find its weights.

    Args:
        path: a ``.pt``/``.pth`` (zip or legacy) or ``.safetensors`` file.
        allow_pickle: permit full unpickling (runs code from the file; only for trusted files).
        entry: the container entry to use; default: EMA weights if present, else the plain ones.
        digest: the file's sha256 already being computed (the CLI starts it before importing
            torch); None: start it here.
    Returns:
        A :class:`LoadedCheckpoint`.
    Raises:
        InputError: unreadable file, nothing usable inside; PickleRefusedError: needs --allow-pickle.
    """
    path = Path(path)
    fmt = sniff_format(path)
    size = path.stat().st_size
    if digest is None or digest.path != path:
        digest = FileDigest(path)
    if fmt == "safetensors":
        tensors, header = _load_safetensors(path)
        if entry is not None:
            raise InputError(f"{path} is a safetensors file: it has no container entries for --entry")
        metadata = parse_metadata(header[METADATA_KEY]) if METADATA_KEY in header else None
        check_metadata(path, metadata)
        state, stripped = strip_prefixes(tensors)
        return LoadedCheckpoint(path, fmt, tensors, None, state, None, stripped, metadata, False,
                                prefix_notes(stripped), size, digest, ())

    if fmt == "torch-zip":
        _check_torch_zip(path)
    raw, pickled = torch_load(path, allow_pickle, mmap=fmt == "torch-zip")
    notes: list[str] = []
    if pickled:
        notes.append("loaded with full unpickling (--allow-pickle)")
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
        where = f"entry {used!r}" if used else "the file"
        why = why_not_state_dict(value)
        if why is not None:
            raise InputError(f"{path}: {where} is not a state dict: {why}")
        raise InputError(f"{path}: {where} is {type_name(value)}, not a state dict of tensors")
    metadata = metadata or metadata_from_state(value)
    check_metadata(path, metadata)
    state, stripped = strip_prefixes(value)
    notes.extend(prefix_notes(stripped))
    return LoadedCheckpoint(path, fmt, raw, used, state, model, stripped, metadata, pickled,
                            tuple(notes), size, digest, container_keys)
