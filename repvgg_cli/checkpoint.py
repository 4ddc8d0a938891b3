"""Reading and writing checkpoints: safe by default, containers unwrapped, writes atomic.

Reading never unpickles arbitrary objects unless the caller opts in (``allow_pickle``):
``torch.load`` always gets ``weights_only=True`` explicitly, so no environment variable can
turn the safe path off. Writing goes to a temporary file in the output's folder and is moved
into place with ``os.replace``: a failure leaves no partial file and an existing output intact.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import mmap as mmap_module
import os
import pickle
import tempfile
import threading
import zipfile
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .digest import FileDigest, sha256_file  # noqa: F401 - sha256_file is part of this module's API
from .errors import InputError, OutputExistsError, PickleRefusedError, one_line

TENSOR_DIGESTS = "tensors"
"""The metadata field with ``{key: sha256}`` of every tensor as written (``verify`` checks them)."""

METADATA_KEY = "repvgg_cli"
"""Where convert records its metadata: a safetensors header entry, or a ``_metadata`` entry of a
``.pt`` state dict (a name no module prefix can take, so ``load_state_dict`` never reads it)."""

EMA_ENTRIES = ("ema", "model_ema", "state_dict_ema")
PLAIN_ENTRIES = ("state_dict", "model")
CONTAINER_ENTRIES = EMA_ENTRIES + PLAIN_ENTRIES
STRIPPABLE_PREFIXES = ("module.", "_orig_mod.")
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


def tensor_bytes(tensor: Tensor) -> memoryview:
    """A tensor's raw bytes (any dtype), without a copy when it is already contiguous on the CPU."""
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def tensor_sha256(tensor: Tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype)."""
    return hashlib.sha256(tensor_bytes(tensor)).hexdigest()


def tensor_digests(state: Mapping[str, Tensor]) -> dict[str, str]:
    """``{key: sha256}`` of every tensor, in the state dict's order."""
    return {key: tensor_sha256(value) for key, value in state.items()}


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


def _describe_unpickling_failure(error: Exception) -> str:
    text = str(error)
    for marker in ("Unsupported global: GLOBAL ", "Unsupported global: ", "GLOBAL "):
        if marker in text:
            name = text.split(marker, 1)[1].split()[0].rstrip(".,")
            return f"a pickled object of type {name}"
    # torch wraps the unpickler's own reason in a paragraph about its defaults: keep the reason
    detail = text.split("WeightsUnpickler error:", 1)[-1]
    first = next((line.strip() for line in detail.splitlines() if line.strip()), type(error).__name__)
    return f"pickled data the safe loader refuses ({first[:120]})"


_SAFE_GLOBALS_LOCK = threading.Lock()


@contextmanager
def _user_safe_globals_ignored(path: Path) -> Iterator[None]:
    """Empty torch's process-wide ``safe_globals`` allow-list while the weights-only load runs.

    Any code in the process (a library, a notebook cell) may have allow-listed classes or functions
    with ``torch.serialization.add_safe_globals`` or the ``safe_globals`` context manager; the
    weights-only unpickler would then construct or call them from a file. Only ``--allow-pickle``
    may permit that, so the list is set aside for the load and put back afterwards.
    """
    serialization = torch.serialization
    get = getattr(serialization, "get_safe_globals", None)
    clear = getattr(serialization, "clear_safe_globals", None)
    add = getattr(serialization, "add_safe_globals", None)
    if get is None or clear is None or add is None:  # torch < 2.4: no allow-list to honour
        yield
        return
    with _SAFE_GLOBALS_LOCK:
        saved = get()
        clear()
        try:
            if get():
                raise InputError(f"{path} was not read: torch's safe_globals allow-list could not be emptied "
                                 "for a safe load")
            yield
        finally:
            if saved:
                add(saved)


def _load_torch_file(path: Path, weights_only: bool, mmap: bool) -> Any:
    """``torch.load`` a file already sniffed as a torch checkpoint.

    torch hands a path ending in ``.safetensors`` to safetensors whatever the bytes say, so such a
    name is read through an open file; any other name goes by path (torch's C++ reader, faster).
    A zip checkpoint read by path is memory-mapped (``mmap``): the tensors are the file's pages,
    not a copy of them, mapped private (copy-on-write), so the file is never written to,
    whatever ``torch.serialization.set_default_mmap_options`` says elsewhere in the process.
    """
    if str(path).endswith(".safetensors"):
        with open(path, "rb") as handle:
            return torch.load(handle, map_location="cpu", weights_only=weights_only, mmap=False)
    if not mmap:
        return torch.load(str(path), map_location="cpu", weights_only=weights_only, mmap=False)
    with _private_mmap():
        return torch.load(str(path), map_location="cpu", weights_only=weights_only, mmap=True)


def _private_mmap() -> Any:
    options = getattr(torch.serialization, "set_default_mmap_options", None)
    if options is None:  # older torch: mmap is always MAP_PRIVATE
        return contextlib.nullcontext()
    return options(mmap_module.MAP_PRIVATE)


def _torch_load(path: Path, allow_pickle: bool, mmap: bool = False) -> tuple[Any, bool]:
    """``torch.load`` safely; unpickle fully only when ``allow_pickle`` (and say so)."""
    try:
        with _user_safe_globals_ignored(path):
            return _load_torch_file(path, weights_only=True, mmap=mmap), False
    except pickle.UnpicklingError as error:
        what = _describe_unpickling_failure(error)
        if not allow_pickle:
            raise PickleRefusedError(
                f"{path} holds {what}; loading it would run code from the file",
                hint="if you trust this file, pass --allow-pickle (see README: Safety)",
            ) from None
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - the weights-only loader runs no code from the file
        raise InputError(f"{path} is not a readable torch checkpoint: {one_line(error)}") from None
    try:
        return _load_torch_file(path, weights_only=False, mmap=mmap), True
    except Exception as error:  # noqa: BLE001 - an allowed unpickle can raise anything
        raise InputError(f"{path}: unpickling failed: {one_line(error)}") from None


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


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items()
    )


def _what(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def _not_a_state_dict(value: Any) -> str | None:
    """Why a mapping that holds some tensors is no state dict (its first bad entry), else None."""
    if not isinstance(value, Mapping) or not any(isinstance(v, Tensor) for v in value.values()):
        return None
    for key, item in value.items():
        if not isinstance(key, str):
            return f"its key {key!r} is {_what(key)}, not a string"
        if not isinstance(item, Tensor):
            return f"key {key} holds {_what(item)}, not a tensor"
    return None


def _pick_entry(raw: Mapping, entry: str | None, path: Path) -> tuple[str, Any, tuple[str, ...]]:
    """Choose the container entry holding the weights; EMA first unless told otherwise."""
    usable = [k for k in CONTAINER_ENTRIES if k in raw and (_is_state_dict(raw[k]) or isinstance(raw[k], nn.Module))]
    if entry is not None:
        if entry not in raw:
            raise InputError(
                f"{path} has no entry {entry!r}; it has: {', '.join(map(str, raw.keys()))}"
            )
        if raw[entry] is None:
            raise InputError(f"{path}: entry {entry!r} is None")
        return entry, raw[entry], (f"used entry {entry!r} (--entry)",)
    if not usable:
        for where, value in [("the file", raw)] + [(f"entry {k!r}", raw[k]) for k in CONTAINER_ENTRIES if k in raw]:
            why = _not_a_state_dict(value)
            if why is not None:
                raise InputError(f"{path}: {where} is not a state dict: {why}")
        if not raw:
            raise InputError(f"{path} holds an empty dict: no weights")
        keys = ", ".join(map(str, list(raw.keys())[:12]))
        raise InputError(
            f"{path} holds no state dict: top-level keys are {keys}",
            hint="pass --entry NAME to pick the entry that holds the weights",
        )
    chosen = usable[0]
    notes = [f"used entry {chosen!r}"]
    others = [k for k in usable[1:]]
    if chosen in EMA_ENTRIES and any(k in PLAIN_ENTRIES for k in others):
        plain = next(k for k in others if k in PLAIN_ENTRIES)
        notes = [f"used EMA weights from {chosen!r} (also present: {plain!r}; pick it with --entry {plain})"]
    return chosen, raw[chosen], tuple(notes)


def strip_prefixes(state: Mapping[str, Tensor]) -> tuple["OrderedDict[str, Tensor]", tuple[str, ...]]:
    """Remove ``module.`` / ``_orig_mod.`` when every key starts with it (repeatedly, as prefixes only)."""
    keys = list(state.keys())
    stripped: list[str] = []
    changed = True
    while changed and keys:
        changed = False
        for prefix in STRIPPABLE_PREFIXES:
            if all(k.startswith(prefix) and len(k) > len(prefix) for k in keys):
                keys = [k[len(prefix):] for k in keys]
                stripped.append(prefix)
                changed = True
    if not stripped:
        return OrderedDict(state), ()
    return OrderedDict(zip(keys, state.values())), tuple(stripped)


def _metadata_from_state(state: Any) -> dict | None:
    meta = getattr(state, "_metadata", None)
    if isinstance(meta, Mapping) and METADATA_KEY in meta:
        entry = meta[METADATA_KEY]
        text = entry.get("json") if isinstance(entry, Mapping) else None
        if isinstance(text, str):
            return _parse_metadata(text)
    return None


def _parse_metadata(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


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
        metadata = _parse_metadata(header[METADATA_KEY]) if METADATA_KEY in header else None
        _check_metadata(path, metadata)
        state, stripped = strip_prefixes(tensors)
        return LoadedCheckpoint(path, fmt, tensors, None, state, None, stripped, metadata, False,
                                _prefix_notes(stripped), size, digest, ())

    if fmt == "torch-zip":
        _check_torch_zip(path)
    raw, pickled = _torch_load(path, allow_pickle, mmap=fmt == "torch-zip")
    notes: list[str] = []
    if pickled:
        notes.append("loaded with full unpickling (--allow-pickle)")
    model: nn.Module | None = None
    used: str | None = None
    container_keys: tuple[str, ...] = ()
    metadata = None
    if isinstance(raw, nn.Module):
        model, value = raw, raw
    elif _is_state_dict(raw) and entry is None:
        value = raw
    elif isinstance(raw, Mapping):
        container_keys = tuple(str(k) for k in raw.keys())
        used, value, picked_notes = _pick_entry(raw, entry, path)
        notes.extend(picked_notes)
        if isinstance(raw.get(METADATA_KEY), str):
            metadata = _parse_metadata(raw[METADATA_KEY])
    else:
        raise InputError(f"{path} holds a {type(raw).__name__}, not a state dict, container or model")

    if isinstance(value, nn.Module):
        model = value
        value = value.state_dict()
        metadata = metadata or _metadata_from_module(model)
    elif not _is_state_dict(value):
        where = f"entry {used!r}" if used else "the file"
        why = _not_a_state_dict(value)
        if why is not None:
            raise InputError(f"{path}: {where} is not a state dict: {why}")
        raise InputError(f"{path}: {where} is {_what(value)}, not a state dict of tensors")
    metadata = metadata or _metadata_from_state(value)
    _check_metadata(path, metadata)
    state, stripped = strip_prefixes(value)
    notes.extend(_prefix_notes(stripped))
    return LoadedCheckpoint(path, fmt, raw, used, state, model, stripped, metadata, pickled,
                            tuple(notes), size, digest, container_keys)


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _check_metadata(path: Path, metadata: dict | None) -> None:
    """Refuse metadata whose structure ``verify``/``inspect`` cannot trust (an edited deploy file)."""
    problem = metadata_problem(metadata) if metadata is not None else None
    if problem is not None:
        raise InputError(
            f"{path}: its repvgg_cli metadata is malformed: {problem}",
            hint="the file was changed after repvgg convert wrote it; convert the train-form source again",
        )


def _is_int(value: Any, least: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (least is None or value >= least)


def _is_pair(value: Any, least: int) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_int(v, least) for v in value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{_what(value)} {text if len(text) <= 40 else text[:37] + '...'}"


def metadata_problem(metadata: Any, complete: bool = False) -> str | None:
    """What is wrong with the structure of repvgg's deploy metadata (the fields readers use).

    Args:
        metadata: the parsed ``repvgg_cli`` metadata of a deploy file.
        complete: also require every field ``verify`` re-checks a block from (name, deploy_prefix,
            shapes, geometry, probe); otherwise only the fields present are checked.
    Returns:
        One line naming the first malformed field, or None when every field readers use is well-formed.
    """
    if not isinstance(metadata, Mapping):
        return f"it is {_what(metadata)}, not an object"
    source = metadata.get("source")
    options = metadata.get("options")
    checks: list[tuple[str, Any, Callable[[Any], bool], str]] = [
        ("blocks", metadata.get("blocks", []), lambda v: isinstance(v, list), "a list"),
        (TENSOR_DIGESTS, metadata.get(TENSOR_DIGESTS, {}),
         lambda v: isinstance(v, Mapping) and all(isinstance(h, str) for h in v.values()),
         "an object of sha256 strings"),
        ("source", source, lambda v: v is None or isinstance(v, Mapping), "an object"),
        ("options", options, lambda v: v is None or isinstance(v, Mapping), "an object"),
        ("dropped_keys", metadata.get("dropped_keys", []), _is_str_list, "a list of strings"),
        ("model_check", metadata.get("model_check"), lambda v: v is None or isinstance(v, Mapping), "an object"),
    ]
    if isinstance(source, Mapping):
        checks.append(("source.entry", source.get("entry"), lambda v: v is None or isinstance(v, str), "a string"))
    if isinstance(options, Mapping):
        checks += [
            ("options.bn_eps", options.get("bn_eps"), lambda v: v is None or _is_number(v), "a number"),
            ("options.no_identity", options.get("no_identity", []), _is_str_list, "a list of strings"),
            ("options.avg_branch", options.get("avg_branch", []), _is_str_list, "a list of strings"),
        ]
    for field_name, value, valid, expected in checks:
        if not valid(value):
            return f"{field_name} is {_shown(value)}, not {expected}"
    for index, record in enumerate(metadata.get("blocks", [])):
        problem = _block_record_problem(record, complete)
        if problem is not None:
            return f"blocks[{index}] {problem}"
    return None


_RECORD_FIELDS: tuple[tuple[str, bool, Callable[[Any], bool], str], ...] = (
    # (field, required, valid, what it should be)
    ("name", True, lambda v: isinstance(v, str), "a string"),
    ("family", True, lambda v: isinstance(v, str), "a string"),
    ("deploy_prefix", True, lambda v: isinstance(v, str), "a string"),
    ("out_channels", True, lambda v: _is_int(v, 1), "a positive integer"),
    ("in_per_group", True, lambda v: _is_int(v, 1), "a positive integer"),
    ("kernel", True, lambda v: _is_pair(v, 1), "two positive integers"),
    ("padding", True, lambda v: _is_pair(v, 0), "two non-negative integers"),
    ("dilation", True, lambda v: _is_pair(v, 1), "two positive integers"),
    ("probe", True, lambda v: isinstance(v, Mapping), "an object"),
    ("groups", False, lambda v: v is None or _is_int(v, 1), "a positive integer"),
    ("in_channels", False, lambda v: v is None or _is_int(v, 1), "a positive integer"),
    ("stride", False, lambda v: v is None or _is_pair(v, 1), "two positive integers"),
    ("padding_mode", False, lambda v: v in PADDING_MODES, f"one of {', '.join(PADDING_MODES)}"),
    ("branches", False, _is_str_list, "a list of strings"),
    ("rel_err", False, lambda v: v is None or _is_number(v), "a number"),
)


def _block_record_problem(record: Any, complete: bool) -> str | None:
    if not isinstance(record, Mapping):
        return f"is {_what(record)}, not an object"
    name = record.get("name")
    where = f" (block {name})" if isinstance(name, str) else ""
    for field_name, required, valid, expected in _RECORD_FIELDS:
        if field_name not in record:
            if required and complete:
                return f"{field_name} is missing{where}"
        elif not valid(record[field_name]):
            return f"{field_name} is {_shown(record[field_name])}, not {expected}{where}"
    out = record.get("out_channels")
    groups = record.get("groups") or 1
    if out is not None and out % groups:
        return f"groups {groups} does not divide out_channels {out}{where}"
    if "probe" not in record or out is None:
        return f"out_channels is missing{where}" if "probe" in record else None
    probe = record["probe"]
    if not _is_int(probe.get("seed"), 0):
        return f"probe.seed is {_shown(probe.get('seed'))}, not a non-negative integer{where}"
    if probe.get("shape") != [1, out]:
        return f"probe.shape is {_shown(probe.get('shape'))}, not [1, {out}]{where}"
    reference = probe.get("reference")
    try:
        size = len(base64.b64decode(reference.encode("ascii"), validate=True)) if isinstance(reference, str) else -1
    except ValueError:  # binascii.Error and UnicodeEncodeError are ValueErrors
        size = -1
    if size != 8 * out:
        return f"probe.reference is not {out} base64-encoded float64 values{where}"
    return None


def _prefix_notes(stripped: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"stripped key prefix {p!r}" for p in stripped)


def _metadata_from_module(model: nn.Module) -> dict | None:
    text = getattr(model, "_repvgg_cli_metadata", None)
    return _parse_metadata(text) if isinstance(text, str) else None


# -- writing -----------------------------------------------------------------------------------


def check_output_path(output: Path, sources: list[Path], force: bool) -> None:
    """Refuse to overwrite a source, or an existing output without ``force``."""
    for source in sources:
        if output.exists() and source.exists() and os.path.samefile(output, source):
            raise OutputExistsError(f"{output} is the source checkpoint; it is never overwritten")
    if output.exists() and not force:
        raise OutputExistsError(f"{output} exists", hint="pass --force to replace it")
    if output.exists() and output.is_dir():
        raise InputError(f"{output} is a directory")
    if not output.parent.exists():
        raise InputError(f"{output.parent} does not exist")
    if output.suffix not in TORCH_SUFFIXES + (".safetensors",):
        raise InputError(
            f"{output}: unknown output format {output.suffix or '(no extension)'!r}",
            hint="name the output .safetensors, .pt or .pth",
        )


def atomic_write(output: Path, write: Callable[[Path], None], fsync: bool = False) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``output``, then ``os.replace`` it into place.

    Any failure removes the temporary file and leaves ``output`` as it was. With ``fsync`` the
    file is flushed to disk before the rename, so it survives a power loss too (as torch.save and
    safetensors, the default leaves that to the operating system: it costs waiting for the disk).
    """
    handle, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as check:
                os.fsync(check.fileno())
        os.chmod(tmp, _new_file_mode(output))
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _new_file_mode(output: Path) -> int:
    """The mode ``open()`` would give a new file (mkstemp's is 0600); a replaced output keeps its own."""
    try:
        return output.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def metadata_json(metadata: Mapping) -> str:
    """Canonical JSON (sorted keys, no spaces) so equal metadata gives equal bytes."""
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"), allow_nan=True)


def save_state_dict(
    output: Path,
    state: Mapping[str, Tensor],
    metadata: Mapping,
    container: Mapping | None = None,
    entry: str | None = None,
    fsync: bool = False,
) -> None:
    """Write a deploy state dict atomically; the extension picks the format.

    Args:
        output: ``.safetensors`` (metadata in the header) or ``.pt``/``.pth``.
        state: the deploy state dict (fresh, contiguous tensors).
        metadata: what to record (tool version, source hash, options, per-block results).
        container: for ``.pt``: the source's container, so the output loads the same way
            (the state dict goes back into ``entry``; other weight entries are dropped).
        entry: the container entry the weights came from.
        fsync: flush the file to disk before it is renamed into place (see :func:`atomic_write`).
    """
    text = metadata_json(metadata)
    if output.suffix == ".safetensors":
        header_metadata = {"format": "pt", METADATA_KEY: text}
        atomic_write(output, lambda tmp: write_safetensors(tmp, state, header_metadata), fsync=fsync)
        return
    deploy: OrderedDict[str, Tensor] = OrderedDict(state)
    # Only our entry: the source's module versions name modules (and prefixes) that are gone.
    deploy._metadata = OrderedDict()  # type: ignore[attr-defined]
    deploy._metadata[METADATA_KEY] = {"json": text}  # type: ignore[attr-defined]
    payload: Any = deploy
    if container is not None and entry is not None:
        payload = {entry: deploy}
        for key, value in container.items():
            if key != entry and key not in CONTAINER_ENTRIES and key != "optimizer" and key != METADATA_KEY:
                payload[key] = value
    save_torch(output, payload, fsync=fsync)


def save_torch(output: Path, payload: Any, fsync: bool = False) -> None:
    """``torch.save`` streamed into the temporary file.

    Given an open file (not a path), torch names the zip's inner folder ``archive`` whatever the
    file is called, so the bytes do not depend on the temporary file's random name.
    """

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)

    atomic_write(output, write, fsync=fsync)


SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.complex64: "C64",
}


def write_safetensors(path: Path, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file, streaming each tensor's bytes (no copy of the whole model).

    The format (8-byte little-endian header length, a JSON header of dtype/shape/offsets per
    tensor plus ``__metadata__``, then the raw bytes) is written here rather than through
    ``safetensors.torch.save_file`` for two reasons: that function first copies every tensor
    into a Python ``bytes`` object (doubling peak memory), and it stores ``__metadata__`` in a
    hash map whose order changes from run to run. Tensors keep the state dict's order; the
    metadata keys are sorted; the files read back with ``safetensors.safe_open``.
    """
    for key, tensor in state.items():
        if not isinstance(tensor, Tensor):
            raise InputError(f"cannot write {key}: a {type(tensor).__name__}, not a tensor")
    tensors = [tensor.detach().cpu().contiguous() for tensor in state.values()]
    entries, _ = _tensor_table({key: (t.dtype, tuple(t.shape)) for key, t in zip(state, tensors)})
    header = {"__metadata__": dict(sorted(metadata.items())), **entries}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        for tensor in tensors:
            if tensor.numel():
                handle.write(tensor_bytes(tensor))


Layout = Mapping[str, "tuple[torch.dtype, tuple[int, ...]]"]
"""Every tensor of a file to be written, in file order: ``{key: (dtype, shape)}``."""


def _tensor_table(layout: Layout) -> tuple[dict[str, dict[str, Any]], int]:
    """The safetensors header entries of ``layout`` (dtype code, shape, offsets into the data
    section, in layout order) and the data section's size."""
    entries: dict[str, dict[str, Any]] = {}
    offset = 0
    for key, (dtype, shape) in layout.items():
        if dtype not in SAFETENSORS_DTYPES:
            raise InputError(f"cannot write {key} as safetensors: dtype {dtype} has no safetensors code")
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        entries[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    return entries, offset


class SafetensorsStream:
    """Write a safetensors file tensor by tensor, in any order, as the tensors are produced.

    ``repvgg convert`` writes each fused block as soon as it is checked and reuses its memory
    for the next one, so no copy of the deploy model is ever held (nor written in one go).
    The layout (every key's dtype and shape) is fixed first; the data section starts after room
    reserved for the header, whose ``__metadata__`` is known only at the end: :meth:`finish`
    pads the header with spaces (the format allows it) or, if the room was too small, moves the
    data. Tensors are written on a writer thread (while the caller computes the next block),
    each hashed on another thread while its bytes are written; with ``flush`` a flusher thread
    starts putting them on disk, so a final fsync has little left to wait for.

    Args:
        path: an existing, empty file (the temporary file of :func:`atomic_write`).
        layout: ``{key: (dtype, shape)}`` in file order.
        reserve: bytes to reserve for ``__metadata__``.
        flush: start writing each tensor to disk as soon as it is written (for a durable file:
            the final fsync then has little left to wait for).
    """

    def __init__(self, path: Path, layout: Layout, reserve: int, flush: bool = False) -> None:
        self.path = Path(path)
        self._layout = {key: (dtype, tuple(int(d) for d in shape)) for key, (dtype, shape) in layout.items()}
        self._entries, self._data_size = _tensor_table(self._layout)
        table = len(json.dumps(self._entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
        self._room = _round_up(table + max(0, reserve) + 64, 8)
        self.digests: dict[str, str] = {}
        self._queued: set[str] = set()
        self._partial: dict[str, tuple[Any, int]] = {}  # put in rows: key -> (sha256 so far, next row)
        self._failed: BaseException | None = None
        self._futures: list[Future] = []
        self._fd = os.open(self.path, os.O_RDWR)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="repvgg-write")
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="repvgg-hash")
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="repvgg-flush")
        self._flushing: Any = None
        self._flush = flush

    def put(self, key: str, tensor: Tensor) -> Future:
        """Queue one tensor of the layout (each exactly once) for writing on the writer thread.

        Returns:
            A future that is done once the tensor's bytes are written and hashed: only then may
            the caller reuse its memory (its result raises what the write raised, e.g. disk full).
        """
        dtype, shape = self._expect(key, None)
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"{key} is {tensor.dtype} {tuple(tensor.shape)}; the layout says {dtype} {shape}")
        return self._queue(key, tensor_bytes(tensor), hashlib.sha256(), 0, True)

    def put_rows(self, key: str, rows: Tensor, start: int) -> Future:
        """Queue the leading-dimension slice ``start:start + len(rows)`` of one tensor of the
        layout: its slices in order, from the first, so each is written and hashed while the
        caller computes the next (a large weight need not be finished before it is written).

        Returns:
            A future as :meth:`put`'s, for this slice's memory.
        """
        dtype, shape = self._expect(key, start)
        stop = start + int(rows.shape[0]) if rows.dim() else -1
        if rows.dtype != dtype or not shape or tuple(rows.shape[1:]) != shape[1:] or stop > shape[0]:
            raise RuntimeError(f"rows {start}:{stop} of {key} are {rows.dtype} {tuple(rows.shape)}; "
                               f"the layout says {dtype} {shape}")
        digest = self._partial.pop(key, (hashlib.sha256(), 0))[0]
        last = stop == shape[0]
        if not last:
            self._partial[key] = (digest, stop)
        offset = start * math.prod(shape[1:]) * rows.element_size()
        return self._queue(key, tensor_bytes(rows), digest, offset, last)

    def _expect(self, key: str, start: int | None) -> tuple[torch.dtype, tuple[int, ...]]:
        """The layout of ``key``, if writing it (from row ``start``; None: whole) is what comes next."""
        if key not in self._layout or key in self._queued or (start is None and key in self._partial):
            raise RuntimeError(f"{key} is not in the layout, or was written twice")
        expected = self._partial.get(key, (None, 0))[1]
        if start is not None and start != expected:
            raise RuntimeError(f"rows of {key} must come in order: row {start}, expected {expected}")
        return self._layout[key]

    def _queue(self, key: str, data: memoryview, digest: Any, offset: int, last: bool) -> Future:
        if last:
            self._queued.add(key)
        future = self._writer.submit(self._write_rows, key, data, digest, offset, last)
        self._futures.append(future)
        return future

    def _write_rows(self, key: str, data: memoryview, digest: Any, offset: int, last: bool) -> None:
        """Writer thread: ``data`` at ``offset`` into ``key``'s bytes, hashed on the hasher thread
        meanwhile (hashlib and pwrite both release the GIL); after a failed write (disk full...)
        the rest is not tried."""
        if self._failed is not None:
            raise self._failed
        try:
            hashed = self._hasher.submit(digest.update, data)  # the hasher runs one task at a time, in order
            _pwrite_all(self._fd, data, 8 + self._room + self._entries[key]["data_offsets"][0] + offset)
            hashed.result()
            if last:
                self.digests[key] = digest.hexdigest()
        except BaseException as error:
            self._failed = error
            raise
        if self._flush and (self._flushing is None or self._flushing.done()):
            self._flushing = self._flusher.submit(os.fdatasync, self._fd)

    def wait(self) -> dict[str, str]:
        """Wait until every queued tensor is written (raising what a write raised); its digests."""
        for future in self._futures:
            future.result()
        return dict(self.digests)

    def finish(self, metadata: Mapping[str, str]) -> None:
        """Write the header (with ``metadata`` as ``__metadata__``) once every tensor is in."""
        self.wait()
        missing = [key for key in self._layout if key not in self.digests]
        if missing:
            raise RuntimeError(f"{len(missing)} tensor(s) of the layout were not written, e.g. {missing[0]}")
        header = {"__metadata__": dict(sorted(metadata.items())), **self._entries}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > self._room:  # the metadata outgrew its room: move the data up
            self._wait_flush()
            room = _round_up(len(text), 8)
            _shift(self._fd, 8 + self._room, self._data_size, room - self._room)
            self._room = room
        text += b" " * (self._room - len(text))
        _pwrite_all(self._fd, memoryview(len(text).to_bytes(8, "little") + text), 0)
        os.ftruncate(self._fd, 8 + self._room + self._data_size)
        self._wait_flush()

    def _wait_flush(self) -> None:
        if self._flushing is not None:
            self._flushing.result()

    def close(self) -> None:
        """Stop the threads and close the file (also after an error)."""
        self._writer.shutdown(wait=True)
        self._hasher.shutdown(wait=True)
        self._flusher.shutdown(wait=True)
        os.close(self._fd)

    def __enter__(self) -> "SafetensorsStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    data = memoryview(data).cast("B")
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _shift(fd: int, start: int, size: int, delta: int, chunk: int = 16 << 20) -> None:
    """Move ``size`` bytes at ``start`` up by ``delta`` bytes, last chunk first."""
    end = size
    while end > 0:
        n = min(chunk, end)
        _pwrite_all(fd, memoryview(os.pread(fd, n, start + end - n)), start + delta + end - n)
        end -= n


def save_model(output: Path, model: nn.Module, loaded: "LoadedCheckpoint", metadata: Mapping,
               fsync: bool = False) -> None:
    """Write a pickled deploy model in the layout the source had (bare module or container)."""
    text = metadata_json(metadata)
    if isinstance(loaded.raw, Mapping) and loaded.entry is not None:
        payload: Any = {loaded.entry: model}
        for key, value in loaded.raw.items():
            if key not in CONTAINER_ENTRIES and key not in ("optimizer", METADATA_KEY):
                payload[key] = value
        payload[METADATA_KEY] = text
    else:
        model._repvgg_cli_metadata = text  # type: ignore[attr-defined]
        payload = model
    save_torch(output, payload, fsync=fsync)
