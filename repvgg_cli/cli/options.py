"""Option types and small parsers shared by every command (each option is defined once)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import InputError
from .app import stderr_console, stdout_console

DebugOption = Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")]

QuietOption = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="No progress display on stderr (there is none anyway when stderr is not a terminal)."),
]

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]

PickleOption = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Allow full unpickling (runs code from the file). Only for files you trust."),
]

EntryOption = Annotated[
    str | None,
    typer.Option("--entry", help="Container entry holding the weights (default: EMA if present, else state_dict/model)."),
]

EpsOption = Annotated[
    float | None,
    typer.Option("--bn-eps", help="BatchNorm eps for state dicts (not stored in them). Default: the family's (1e-5; YOLO 1e-3)."),
]

RtolOption = Annotated[
    float | None,
    typer.Option("--rtol", help="Relative tolerance (to the output's max |value|). Default by dtype: fp64 1e-9, fp32 1e-5, fp16 4e-3, bf16 3e-2."),
]

AtolOption = Annotated[float, typer.Option("--atol", help="Absolute tolerance added to rtol * scale.")]


ModelOption = Annotated[
    str | None,
    typer.Option("--model", help="MODULE:CALLABLE building the train-form model the state dict loads into."),
]


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise InputError(f"--input-shape {text!r}: expected integers like 1,3,224,224") from None
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise InputError(f"--input-shape {text!r}: expected positive integers like 1,3,224,224")
    return shape

def first_names(names: list[str], shown: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, d, e and 3 more``: a one-line list that never hides how many."""
    from ..render.text import printable

    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(printable(n) for n in names[:shown]) + more


def progress_shown(quiet: bool) -> bool:
    """Progress goes to stderr only when it is a terminal (not a pipe, a file or a test runner),
    not ``TERM=dumb``, and the user did not pass ``--quiet``."""
    try:
        terminal = sys.stderr.isatty()
    except (AttributeError, ValueError):
        terminal = False
    return not quiet and terminal and os.environ.get("TERM") != "dumb"


class Activity:
    """Progress on stderr for every step that can take more than a second.

    One line, redrawn in place and removed at the end: a spinner, what is being done (reading a
    checkpoint, fusing block N of M, the whole-model check, timing a form, exporting, onnxruntime),
    a bar and a count where the work is counted, and the time elapsed. With ``--quiet``, or when
    stderr is not a terminal, it draws nothing (the methods still accept every call).

    Use as a context manager around the command's work; :meth:`step` names a new step,
    :meth:`advance` counts one unit of it, :meth:`blocks` is the ``progress`` factory that
    :func:`repvgg_cli.api.convert_file` and the core's fusing loops call.
    """

    def __init__(self, quiet: bool = False) -> None:
        self.shown = progress_shown(quiet)
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> Activity:
        if self.shown:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(), console=stderr_console(),
                                      transient=True)
            self._progress.start()
            self._task = self._progress.add_task("starting", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def step(self, description: str, total: int | None = None) -> None:
        """A new step: ``description`` (plain text, shown as it is) and, if counted, its total."""
        if self._progress is not None:
            from rich.markup import escape

            from ..render.text import printable

            self._progress.reset(self._task, total=total, description=escape(printable(description)))

    def advance(self, description: str | None = None) -> None:
        """One more unit of the current step done (and what comes next, if given)."""
        if self._progress is not None:
            from rich.markup import escape

            from ..render.text import printable

            if description is None:
                self._progress.update(self._task, advance=1)
            else:
                self._progress.update(self._task, advance=1, description=escape(printable(description)))

    def blocks(self, total: int) -> tuple[None, Callable[[str], None]]:
        """The ``progress`` factory of the fusing loops: "fusing block i/N", then "checking"."""
        self.step("fusing blocks", total=total)
        done = [0]

        def advance(name: str) -> None:
            done[0] += 1
            self.advance(f"fused {name or '<root>'}" if done[0] < total
                         else "checking and writing (whole-model check where there is a model)")

        return None, advance


def reading(activity: Activity, path: Path) -> None:
    """Name the checkpoint being read (and its size) as the current step."""
    from ..render.text import human_size

    try:
        size = f" ({human_size(path.stat().st_size)})"
    except OSError:
        size = ""
    activity.step(f"reading {path}{size}")


def wrote_lines(paths: Iterable[Path], as_json: bool = False) -> None:
    """The command's last lines: ``wrote PATH (SIZE)`` for every file it wrote, on stdout (on
    stderr with ``--json``, where stdout holds only the document)."""
    from ..render.text import human_size, printable

    console = stderr_console() if as_json else stdout_console()
    for path in paths:
        try:
            size = path.stat().st_size
        except OSError:
            continue
        console.print(f"wrote {printable(path)} ({human_size(size)})", markup=False,
                      highlight=False, soft_wrap=True)

class OutputFormat(str, Enum):
    """``--format`` of a batch: the format of every output."""

    safetensors = "safetensors"
    pt = "pt"


class QaVariant(str, Enum):
    """``--qa-variant``: which QARepVGG block a state dict holds (its weights cannot tell)."""

    v1 = "v1"
    v2 = "v2"


class DtypeChoice(str, Enum):
    """``--dtype``: the dtype of every floating tensor written."""

    keep = "keep"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


# What a state dict does not store and the user decides (convert and verify --against alike).
FoldPostBnOption = Annotated[
    bool, typer.Option("--fold-post-bn", help="Fold a post-sum BN (QARepVGG) into the conv where nothing nonlinear "
                                              "sits between.")
]
NoIdentityOption = Annotated[
    list[str] | None,
    typer.Option("--no-identity", help="Glob of block names without a hidden (parameter-free) identity branch; "
                                       "repeatable."),
]
AvgBranchOption = Annotated[
    list[str] | None,
    typer.Option("--avg-branch", help="Glob of block names with a hidden avg-pool branch (QARepVGGBlockV2); "
                                      "repeatable."),
]
QaVariantOption = Annotated[
    QaVariant | None,
    typer.Option("--qa-variant", help="QARepVGG blocks of a state dict are QARepVGGBlock (v1) or QARepVGGBlockV2 "
                                      "(v2, a hidden avg-pool branch): the weights cannot tell.", show_default=False),
]
PassthroughOption = Annotated[
    list[str] | None,
    typer.Option("--passthrough", help="Glob of keys or block names that look like branches but are meant to stay "
                                       "unfused (else refused); repeatable."),
]
DtypeOption = Annotated[
    DtypeChoice, typer.Option("--dtype", help="dtype of every floating tensor written: keep (the source's), "
                                              "float32, float16 or bfloat16. Fusion is float64 either way.")
]
