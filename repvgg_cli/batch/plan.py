"""Batch conversion, step 1: the plan, which sources and which output names, refused as a whole
on a usage problem before anything is converted."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..io.atomic import same_file

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")
FORMAT_SUFFIXES = {"safetensors": ".safetensors", "pt": ".pt"}
DEPLOY_MARK = ".deploy"


@dataclass(frozen=True)
class BatchItem:
    """One source and the output it is converted to."""

    source: Path
    output: Path


def default_jobs() -> int:
    """Worker processes when ``--jobs`` is not given: ``min(4, cpu count)``."""
    return max(1, min(4, os.cpu_count() or 1))


def is_deploy_name(path: Path) -> bool:
    """True for names this command writes (``<stem>.deploy<ext>``): skipped when a folder is scanned."""
    return Path(path.stem).suffix == DEPLOY_MARK


def checkpoints_in(folder: Path) -> list[Path]:
    """The checkpoint files directly in ``folder`` (not recursive), sorted by name.

    ``.pt``, ``.pth`` and ``.safetensors`` files count; earlier outputs (``*.deploy.*``) do not.
    """
    return sorted(
        (p for p in folder.iterdir()
         if p.suffix in CHECKPOINT_SUFFIXES and p.is_file() and not is_deploy_name(p)),
        key=lambda p: p.name,
    )


def output_name(source: Path, fmt: str | None = None) -> str:
    """``<stem>.deploy<ext>``: ``ext`` is the source's own unless ``fmt`` (``safetensors``/``pt``) says otherwise."""
    suffix = FORMAT_SUFFIXES[fmt] if fmt is not None else source.suffix
    if suffix not in CHECKPOINT_SUFFIXES:
        suffix = ".safetensors"
    return f"{source.stem}{DEPLOY_MARK}{suffix}"


def plan_batch(sources: Sequence[Path], output_dir: Path, fmt: str | None = None) -> list[BatchItem]:
    """Expand folders, name every output, and refuse a plan that cannot work.

    Args:
        sources: files and/or folders; a folder stands for :func:`checkpoints_in` it. Files are
            taken as given (a missing or unreadable one fails on its own when converted).
        output_dir: the folder the outputs go to (need not exist yet; its parent must).
        fmt: ``safetensors`` or ``pt`` to choose the output format; None keeps each source's.
    Returns:
        The items in the order given (folders expanded in name order), duplicates removed.
    Raises:
        InputError: an empty folder, an output folder that is a file or named like a checkpoint,
            a missing parent folder, two sources that would write the same output, or an output
            that is one of the sources (same path, or the same file through a link).
    """
    if fmt is not None and fmt not in FORMAT_SUFFIXES:
        raise InputError(f"--format {fmt!r}: use one of {', '.join(FORMAT_SUFFIXES)}")
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"{output_dir} is a file; with several sources or a folder, OUTPUT must be a folder")
    if not output_dir.exists() and output_dir.suffix in CHECKPOINT_SUFFIXES:
        raise InputError(
            f"{output_dir} is named like a checkpoint file, but several sources need an output folder",
            hint="give a folder as the last argument (it is created if missing)",
        )
    if not output_dir.exists() and not output_dir.absolute().parent.is_dir():
        raise InputError(f"{output_dir.absolute().parent} does not exist",
                         hint="the output folder is created if missing, but not its parent")
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            found = checkpoints_in(source)
            if not found:
                raise InputError(f"{source} holds no checkpoint (*.pt, *.pth, *.safetensors)")
            files.extend(found)
        else:
            files.append(source)
    items: list[BatchItem] = []
    seen: dict[Path, Path] = {}
    claimed: dict[str, Path] = {}
    for source in files:
        key = source.resolve()
        if key in seen:
            continue
        seen[key] = source
        name = output_name(source, fmt)
        if name in claimed:
            raise InputError(
                f"{claimed[name]} and {source} would both be written to {output_dir / name}",
                hint="convert them into different folders" + ("" if fmt is None else " or drop --format"),
            )
        claimed[name] = source
        items.append(BatchItem(source, output_dir / name))
    for item in items:
        for source in files:
            if same_file(item.output, source):
                raise InputError(
                    f"{item.output} is the output of {item.source} and also a source of this batch; "
                    "it is never overwritten",
                    hint="convert into another folder",
                )
    return items
