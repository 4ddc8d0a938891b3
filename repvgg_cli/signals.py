"""Signals that stop a command: SIGINT, SIGTERM and SIGHUP all clean up the same way.

Python turns SIGINT (Ctrl-C) into ``KeyboardInterrupt``; SIGTERM (``kill``, a job scheduler, a
container stopping) and SIGHUP (the terminal closing) would end the process where it stands and
leave a temporary file behind. :func:`install` (called by the ``repvgg`` entry point and by batch
workers, never on import) makes them raise :class:`Terminated`, a ``KeyboardInterrupt``, so
every ``except``/``finally`` that cleans up after Ctrl-C does the same for them: an atomic write
removes its temporary file, a batch stops its workers. The process then exits with 128 + the
signal's number, as a shell reports a process killed by it: 130 SIGINT, 143 SIGTERM, 129 SIGHUP.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

SIGHUP = getattr(signal, "SIGHUP", None)  # not on Windows
TERMINATING = tuple(s for s in (signal.SIGTERM, SIGHUP) if s is not None)
STOPPING = (signal.SIGINT, *TERMINATING)

_NAMES = {signal.SIGINT: "Interrupted", signal.SIGTERM: "Terminated (SIGTERM)"}
if SIGHUP is not None:
    _NAMES[SIGHUP] = "Hung up (SIGHUP)"


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived; handled wherever a Ctrl-C is.

    Attributes:
        signum: the signal's number.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []


def _raise_terminated_once(signum: int, frame: object) -> None:
    """The first SIGTERM/SIGHUP raises; later ones are only recorded, so they cannot cut the clean-up short."""
    _received.append(signum)
    if len(_received) == 1:
        raise Terminated(signum)


def install() -> None:
    """Make SIGTERM and SIGHUP raise :class:`Terminated` in the main thread (from the main thread only).

    Python runs a signal handler between any two bytecodes, a finalizer's included, and an
    exception raised in a finalizer is printed and dropped: the signal is recorded (see
    :func:`received`) so later checks still stop (no file is moved into place after it, see
    :func:`repvgg_cli.io.atomic.atomic_write`), and the dropped interrupt is not printed.
    """
    for signum in TERMINATING:
        signal.signal(signum, _raise_terminated_once)
    quiet_dropped_interrupts()


def quiet_dropped_interrupts() -> None:
    """Print nothing for an interrupt raised inside a finalizer (Python drops it there anyway)."""
    if getattr(sys.unraisablehook, "_repvgg_quiet", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous(unraisable)

    hook._repvgg_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def check() -> None:
    """Raise :class:`Terminated` if a SIGTERM/SIGHUP was received (its first raise may have been dropped)."""
    if _received:
        raise Terminated(_received[0])


def received() -> int | None:
    """The first SIGTERM/SIGHUP that :func:`install`'s handler received, or None."""
    return _received[0] if _received else None


def signal_number(error: BaseException) -> int:
    """The signal behind an interrupt: :class:`Terminated`'s own, else SIGINT (a plain KeyboardInterrupt)."""
    return getattr(error, "signum", signal.SIGINT)


def exit_status(error: BaseException) -> int:
    """128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + int(signal_number(error))


def describe(error: BaseException) -> str:
    """``Interrupted``, ``Terminated (SIGTERM)`` or ``Hung up (SIGHUP)``: the start of the one-line message."""
    signum = signal_number(error)
    return _NAMES.get(signum, f"Stopped by {signal.Signals(signum).name}")


@contextlib.contextmanager
def held(redeliver: bool = True) -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP while the block runs (e.g. while worker processes start).

    Args:
        redeliver: at the end, send the first signal held to this process again, so the handler
            in place (whatever it is) acts on it; False drops them (the process is stopping anyway).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held_signals: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: held_signals.append(signum)) for s in STOPPING}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held_signals and redeliver:
            signal.raise_signal(held_signals[0])
