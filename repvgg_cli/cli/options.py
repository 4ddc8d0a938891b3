"""Option types and small parsers shared by every command (each option is defined once)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from ..errors import InputError
from .app import stderr_console

DebugOption = Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")]

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]

PickleOption = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Allow full unpickling (runs code from the file). Only for files you trust."),
]

EntryOption = Annotated[
    Optional[str],
    typer.Option("--entry", help="Container entry holding the weights (default: EMA if present, else state_dict/model)."),
]

EpsOption = Annotated[
    Optional[float],
    typer.Option("--bn-eps", help="BatchNorm eps for state dicts (not stored in them). Default: the family's (1e-5; YOLO 1e-3)."),
]

RtolOption = Annotated[
    Optional[float],
    typer.Option("--rtol", help="Relative tolerance (to the output's max |value|). Default by dtype: fp64 1e-9, fp32 1e-5, fp16 4e-3, bf16 3e-2."),
]

AtolOption = Annotated[float, typer.Option("--atol", help="Absolute tolerance added to rtol * scale.")]


ModelOption = Annotated[
    Optional[str],
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
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more

def block_progress(total: int):
    """A progress bar on stderr when there are many blocks; a no-op callback otherwise."""
    from rich.progress import Progress

    if total < 8:
        return None, (lambda name: None)
    progress = Progress(console=stderr_console(), transient=True)
    task = progress.add_task("fusing", total=total)
    return progress, (lambda name: progress.update(task, advance=1, description=f"fusing {name}"))

class OutputFormat(str, Enum):
    """``--format`` of a batch: the format of every output."""

    safetensors = "safetensors"
    pt = "pt"
