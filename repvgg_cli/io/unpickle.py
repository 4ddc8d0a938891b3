"""``torch.load`` without running code from the file, unless the user opts in.

``weights_only=True`` is always passed explicitly (no environment variable can turn it off), and
torch's process-wide ``safe_globals`` allow-list is emptied for the duration of each safe load.
Full unpickling happens only with ``allow_pickle`` (``--allow-pickle``), never as a fallback.

Pickles the loader cannot read get a message that says why, not "would run code": a plain
Python pickle (no ``torch.save`` magic number: torch cannot load it at all), files written with
pickle protocol 0 or 1, which torch's weights-only unpickler does not read (protocol 1 loads
with full unpickling; protocol 0 not even then: torch's persistent ids must be tuples), and
opcodes it lacks (FRAME, from protocol 4 on: named with the protocol that brought them).
Warnings torch raises while loading are returned as notes (one line each), not printed.

References: pytorch ``torch/serialization.py`` (``_legacy_load``: the magic number
0x1950a86a20f9469cfc6c, ``persistent_load``), ``torch/_weights_only_unpickler.py``; Python's
``pickletools`` (the protocol each opcode needs).
"""

from __future__ import annotations

import contextlib
import io
import mmap as mmap_module
import pickle
import pickletools
import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, PickleRefusedError, one_line

TORCH_MAGIC = 0x1950A86A20F9469CFC6C
"""The number ``torch.save``'s legacy (non-zip) format pickles first."""


@dataclass(frozen=True)
class PickleStart:
    """What the first pickle of a stream says: its protocol, and whether it is torch's magic number."""

    protocol: int
    torch_magic: bool
    end: int


_NOT_A_PICKLE = (ValueError, EOFError, UnicodeDecodeError, struct.error)
"""What ``pickletools.genops`` raises on bytes that are not (a whole) pickle."""


def first_pickle(data: bytes) -> PickleStart | None:
    """Read the first pickle in ``data`` up to its STOP, without running it.

    Returns:
        Its protocol (the PROTO opcode's, else the highest any opcode needs: 0 or 1), whether
        its one value is torch's magic number, and where it ends; None when ``data`` does not
        hold a whole pickle (text, other binary data, or a pickle longer than ``data``).
    """
    protocol, values = 0, []
    try:
        for opcode, arg, position in pickletools.genops(io.BytesIO(data)):
            if opcode.name == "STOP":
                magic = (len(values) == 1 and values[0][0] in ("LONG", "LONG1", "LONG4", "INT")
                         and values[0][1] == TORCH_MAGIC)
                return PickleStart(protocol, magic, position + 1)
            protocol = max(protocol, int(arg) if opcode.name == "PROTO" else min(opcode.proto, 1))
            if opcode.name not in ("PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                values.append((opcode.name, arg))
    except _NOT_A_PICKLE:
        pass
    return None


def pickle_stream_protocol(data: bytes) -> int | None:
    """The protocol of a pickle stream's first bytes (``data.pkl``, or a legacy file's second pickle).

    Returns:
        The PROTO opcode's protocol; for a stream without one, 1 if any opcode read (up to the
        first STOP or the end of ``data``) is a binary one, else 0; None for no opcode at all.
    """
    if data[:1] == b"\x80" and len(data) > 1:
        return data[1]
    protocol = None
    try:
        for opcode, _, _ in pickletools.genops(io.BytesIO(data)):
            protocol = max(protocol or 0, min(opcode.proto, 1))
            if opcode.name == "STOP":
                break
    except _NOT_A_PICKLE:
        pass
    return protocol


def old_protocol_error(path: Path, protocol: int, allow_pickle: bool) -> InputError | None:
    """The error for a file written with pickle protocol 0 or 1 (None for protocol 2 and later,
    or for protocol 1 when full unpickling is allowed)."""
    if protocol >= 2:
        return None
    if protocol == 0:
        return InputError(
            f"{path} was written with pickle protocol 0 (torch.save(..., pickle_protocol=0)), which torch.load "
            "cannot read back, not even with full unpickling",
            hint="re-save the weights from the code that wrote them with torch.save's default protocol, "
                 "or as safetensors",
        )
    if allow_pickle:
        return None
    return PickleRefusedError(
        f"{path} was written with pickle protocol 1 (torch.save(..., pickle_protocol=1)); torch's safe loader "
        "reads protocol 2 and later only",
        hint="re-save it with torch.save's default protocol, or, if you trust this file, pass --allow-pickle "
             "(it is then fully unpickled)",
    )


@contextmanager
def warnings_as_notes(notes: list[str]) -> Iterator[None]:
    """Collect the warnings raised inside (torch's, while loading) into ``notes``: one line each,
    ``while loading: <Category>: <first line>``, each once, in order; none is printed. Warnings
    the process's filters ignore stay ignored; one a filter turns into an error still raises."""
    with warnings.catch_warnings(record=True) as caught:  # the active filters still decide what is shown
        try:
            yield
        finally:
            for warning in caught:
                line = f"while loading: {warning.category.__name__}: {one_line(warning.message)}"
                if line not in notes:
                    notes.append(line)


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


def _unsupported_opcode(error: Exception) -> pickletools.OpcodeInfo | None:
    """The opcode torch's weights-only unpickler stopped at for want of support (FRAME in a
    protocol 4 pickle, INT in a protocol 1 one), if that is what ``error`` says."""
    text = str(error)
    marker = "Unsupported operand "
    if marker not in text:
        return None
    code = text.split(marker, 1)[1].split()[0].rstrip(".,")
    if not code.isdigit() or int(code) > 255:
        return None
    return next((op for op in pickletools.opcodes if ord(op.code) == int(code)), None)


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


def torch_load(path: Path, allow_pickle: bool, mmap: bool = False) -> tuple[Any, bool]:
    """``torch.load`` safely; unpickle fully only when ``allow_pickle`` (and say so)."""
    try:
        with _user_safe_globals_ignored(path):
            return _load_torch_file(path, weights_only=True, mmap=mmap), False
    except pickle.UnpicklingError as error:
        opcode = _unsupported_opcode(error)
        if opcode is not None and not allow_pickle:
            raise PickleRefusedError(
                f"{path} uses pickle opcode {opcode.name} (pickle protocol {opcode.proto} and later), which torch's "
                "safe loader does not read",
                hint="re-save it with torch.save's default pickle protocol, or, if you trust this file, pass "
                     "--allow-pickle (it is then fully unpickled)",
            ) from None
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
