"""The Typer app every command registers on, the error-to-exit-code table, and the entry point.

torch is imported only inside commands, so ``repvgg --help`` and ``--version`` stay fast.
Exit codes: 0 ok, 1 not equivalent, 2 bad input or usage, 3 unsupported structure, 4 a bug.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import typer
import typer.core
from rich.console import Console

from .. import __version__, signals
from ..errors import InputError, RepvggError

# Typer >= 0.2x vendors click as typer._click; older Typer uses click itself.
_click: Any = getattr(typer.core, "_click", None)
if _click is None:  # pragma: no cover - older Typer
    import click as _click

USAGE_ERROR = 2
INTERNAL_ERROR = 4

_documents: list[str] | None = None
"""While a ``--json`` command runs (see :func:`json_stdout`): the documents it printed, written
to stdout once the command is done."""


@contextmanager
def json_stdout() -> Iterator[None]:
    """While a ``--json`` command runs, stdout carries nothing but the JSON document.

    Model code run by a command (an imported ``--model`` module, a constructor, ``forward``, C
    extensions) may print. Until the command is done, ``sys.stdout`` is ``sys.stderr`` and file
    descriptor 1 is a copy of descriptor 2, so every such print goes to stderr; :func:`print_json`
    holds the document back, and it is written to the real stdout when the command ends (an error
    exit included).
    """
    global _documents
    real = sys.stdout
    try:
        real.flush()
        fd = real.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream (Typer's test runner): no descriptor
        fd = None
    saved = None
    if fd is not None:
        sys.stderr.flush()
        saved = os.dup(fd)
        os.dup2(sys.stderr.fileno(), fd)
    outer, _documents = _documents, []
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        sys.stdout = real
        if saved is not None:
            os.dup2(saved, fd)
            os.close(saved)
        documents, _documents = _documents, outer
        for text in documents:
            real.write(text + "\n")
        real.flush()


class RepvggCommand(typer.core.TyperCommand):
    """Every command: with ``--json`` it runs inside :func:`json_stdout`."""

    def invoke(self, ctx: Any) -> Any:
        if ctx.params.get("as_json"):
            with json_stdout():
                return super().invoke(ctx)
        return super().invoke(ctx)


class RepvggGroup(typer.core.TyperGroup):
    """The ``repvgg`` group: a usage error is one ``Error: …`` line (and a hint) with exit 2, like
    every other error, instead of Typer's boxed panel."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            value = super().main(*args, standalone_mode=False, **kwargs)
        except _click.exceptions.ClickException as error:
            if type(error).__name__ == "NoArgsIsHelpError":  # the help was printed already
                sys.exit(error.exit_code)
            _print_usage_error(error)
            sys.exit(USAGE_ERROR)
        except typer.Abort:
            stderr_console().print("Error: aborted", markup=False, highlight=False)
            sys.exit(1)
        # Without standalone mode an exit (typer.Exit, --help) comes back as its code; a command's
        # own return value (always None here) means success.
        sys.exit(value if isinstance(value, int) else 0)


def _print_usage_error(error: Any) -> None:
    from ..render.text import printable

    console = stderr_console()
    message = " ".join(printable(line.strip()) for line in error.format_message().splitlines() if line.strip())
    console.print(f"Error: {message}", markup=False, highlight=False)
    ctx = getattr(error, "ctx", None)
    if ctx is not None:
        console.print(f"Hint: see '{printable(ctx.command_path)} --help'", markup=False, highlight=False)


class RepvggTyper(typer.Typer):
    """A Typer app whose commands are :class:`RepvggCommand`s unless told otherwise."""

    def command(self, *args: Any, cls: Any = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or RepvggCommand, **kwargs)


app = RepvggTyper(
    name="repvgg",
    cls=RepvggGroup,
    help="Fuse RepVGG-style multi-branch checkpoints into deploy form, prove equivalence, report what was done.",
    add_completion=True,
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def stdout_console() -> Console:
    """Tables to stdout; piped output gets a wide fixed width instead of Rich's 80 columns."""
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
    return Console(soft_wrap=False, width=width)

def stderr_console() -> Console:
    return Console(stderr=True, soft_wrap=True)

def print_json(document: dict[str, Any]) -> None:
    """The command's JSON document on stdout (held back until the command ends, see :func:`json_stdout`)."""
    text = json.dumps(document, indent=2)
    if _documents is not None:
        _documents.append(text)
    else:
        typer.echo(text)

def _stopped_by_signal() -> None:
    """End as the SIGTERM/SIGHUP received, if one was: it can come out of a library as another
    error (torch turns a KeyboardInterrupt raised inside torch.save into a RuntimeError)."""
    if signals.received() is not None:
        stop = signals.Terminated(signals.received())
        stderr_console().print(f"{signals.describe(stop)}; nothing was written.", markup=False)
        raise typer.Exit(signals.exit_status(stop)) from None


def handle_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Turn expected errors into one ``Error: …`` line on stderr and their exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        debug = bool(kwargs.get("debug"))
        try:
            command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except RepvggError as error:
            if debug:
                traceback.print_exc()
            from ..render.text import (
                printable,  # names and paths in messages: one line, no terminal escapes
            )

            console = stderr_console()
            console.print(f"Error: {printable(error.message)}", markup=False, highlight=False)
            if error.hint:
                console.print(f"Hint: {printable(error.hint)}", markup=False, highlight=False)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt as stop:  # Ctrl-C, and SIGTERM/SIGHUP under main(): see repvgg_cli.signals
            stderr_console().print(f"{signals.describe(stop)}; nothing was written.", markup=False)
            raise typer.Exit(signals.exit_status(stop)) from None
        except OSError as error:  # the environment, not a bug: disk full, permissions, a failed rename
            _stopped_by_signal()
            if debug:
                traceback.print_exc()
            from ..render.text import printable

            where = f" {error.filename}" if getattr(error, "filename", None) else ""
            stderr_console().print(printable(f"Error: cannot read or write{where}: {error.strerror or error}; "
                                             "nothing was written"), markup=False, highlight=False)
            raise typer.Exit(InputError.exit_code) from None
        except Exception as error:  # noqa: BLE001 - anything else is a bug: say so in one line
            _stopped_by_signal()
            if debug:
                traceback.print_exc()
            from ..render.text import printable

            text = printable(str(error).strip().splitlines()[0][:300]) if str(error).strip() else ""
            stderr_console().print(
                f"Error: internal error {type(error).__name__}: {text} (a bug in repvgg_cli; rerun with --debug "
                "and report it)", markup=False, highlight=False,
            )
            raise typer.Exit(INTERNAL_ERROR) from None

    return wrapper

def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"repvgg {__version__}")
        raise typer.Exit()

@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Fuse RepVGG-style multi-branch checkpoints into deploy form, prove equivalence, report what was done."""

def main() -> NoReturn:
    """Console-script entry point: run the command, then end the process.

    Once the command is done (files written, closed and renamed, worker processes joined), the
    atexit handlers run and stdout/stderr are flushed, the process ends with ``os._exit``: what
    that skips is the interpreter freeing every module of torch and running libtorch's static
    destructors, which took about 0.7 s per process on the benchmark machine and does nothing a
    finished command needs. An exception other than an exit (a bug) propagates as usual.
    Embedding code should call :data:`app` instead (this never returns).

    SIGTERM and SIGHUP clean up as Ctrl-C does (temporary files removed, batch workers stopped)
    and the status is 128 + the signal's number (143, 129; Ctrl-C 130), even where one arrives
    outside a command (click would make it 1).
    """
    signals.install()
    try:
        app(prog_name="repvgg")
        code = 0
    except SystemExit as stop:
        code = _exit_status(stop.code)
    if signals.received() is not None:
        code = 128 + signals.received()
    end_process(code)

def _exit_status(value: object) -> int:
    """The status ``sys.exit(value)`` would give: None 0, an int itself, anything else printed, 1."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1

def end_process(code: int) -> NoReturn:
    """Run the atexit handlers, flush stdout/stderr and ``os._exit(code)`` (see :func:`main`);
    a flush that fails (a closed pipe) makes a 0 status 120, as Python's own exit does."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 120
    os._exit(code)
