"""sha256 of files, computed on a background thread (no torch import: the CLI starts hashing a
source before it imports torch, so the hash is ready by the time the file is read)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from ..errors import InputError, one_line

CHUNK = 4 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FileDigest:
    """The sha256 of a file, computed on a background thread from the moment it is created.

    Importing torch and loading a checkpoint keep one core busy at a time, so the hash costs no
    wall time on a second core (the CLI starts it before importing torch). The thread is a
    daemon, so an error exit never waits for a large file to be hashed.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._value: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="repvgg-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = sha256_file(self.path)
        except BaseException as error:  # noqa: BLE001 - re-raised by value()
            self._error = error

    def value(self) -> str:
        """The hex digest (waits for the thread if it is still reading)."""
        self._thread.join()
        if self._error is not None:
            raise InputError(f"{self.path} could not be read: {one_line(self._error)}")
        assert self._value is not None
        return self._value
