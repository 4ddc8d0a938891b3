"""``torch.load`` without running code from the file, unless the user opts in.

``weights_only=True`` is always passed explicitly (no environment variable can turn it off), and
torch's process-wide ``safe_globals`` allow-list is emptied for the duration of each safe load.
Full unpickling happens only with ``allow_pickle`` (``--allow-pickle``), never as a fallback.
"""

from __future__ import annotations

import contextlib
import mmap as mmap_module
import pickle
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, PickleRefusedError, one_line


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


def torch_load(path: Path, allow_pickle: bool, mmap: bool = False) -> tuple[Any, bool]:
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
