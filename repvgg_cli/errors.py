"""Typed errors of repvgg_cli. Each carries the exit code the CLI uses for it."""

from __future__ import annotations


class RepvggError(Exception):
    """Base class of every expected failure. ``exit_code`` picks the CLI's exit status."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class InputError(RepvggError):
    """Bad input or usage: unreadable file, missing key, bad option (exit 2)."""

    exit_code = 2


class PickleRefusedError(InputError):
    """The file needs unpickling of arbitrary objects and --allow-pickle was not given."""


class OutputExistsError(InputError):
    """The output exists and --force was not given, or it would overwrite the source."""


class UnsupportedError(RepvggError):
    """A structure the tool recognises but cannot fuse (exit 3)."""

    exit_code = 3


class NotEquivalentError(RepvggError):
    """Verification found a fused result that does not match its train form (exit 1)."""

    exit_code = 1


def one_line(error: BaseException, default: str | None = None) -> str:
    """The first line of an exception's message (at most 300 characters); if it has none,
    ``default`` (None: the exception's type name)."""
    text = str(error).strip()
    if text:
        return text.splitlines()[0][:300]
    return type(error).__name__ if default is None else default
