"""What many test files share: where the samples are, and running the CLI in-process."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from repvgg_cli.io import safetensors_file
from repvgg_cli.cli import app

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_checkpoints"


def cli_runner(columns: int = 200) -> CliRunner:
    """A runner that keeps stdout and stderr apart, with a wide terminal (tables do not wrap)."""
    try:  # click < 8.2 mixes stderr into stdout unless told not to
        return CliRunner(mix_stderr=False, env={"COLUMNS": str(columns)})
    except TypeError:  # click >= 8.2: stdout and stderr are always kept apart
        return CliRunner(env={"COLUMNS": str(columns)})


RUNNER = cli_runner()


def invoke(*args: object, runner: CliRunner = RUNNER):
    """Run ``repvgg ARGS...``; an exception that is not an exit is re-raised (a bug, not an error)."""
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def disk_full_at_write(monkeypatch, n: int) -> list[int]:
    """Make the n-th streamed write fail with ENOSPC (the file is partly written by then).

    Returns:
        The offsets of the writes tried, in order.
    """
    import errno

    real = safetensors_file._pwrite_all
    offsets: list[int] = []

    def write(fd, data, offset):
        offsets.append(offset)
        if len(offsets) == n:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(safetensors_file, "_pwrite_all", write)
    return offsets
