"""A conversion, in one direction: read → find → fuse → check → write → report.

Each stage is a function that takes the previous stage's value and returns its own; none calls
back up. Fusing, checking and writing run lazily, block by block, when the write stage drives
them, so a block's source tensors are freed and its fused conv written before the next block is
computed (see :mod:`.write` for the streamed safetensors output).

* :mod:`.read` — a file, state dict or model becomes a :class:`~.read.Source`;
* :mod:`.find` — the families find every block: a :class:`~.find.Plan`;
* :mod:`.fuse` — each block becomes one conv (:class:`~.fuse.Fused`);
* :mod:`.check` — each fused block against its train form, the whole model too (:class:`~.check.Checked`);
* :mod:`.write` — into memory or a file, atomically (:class:`~.write.Written`);
* :mod:`.report` — what was done (:class:`~.report.ConversionResult`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..io.atomic import add_commit_guard
from ..io.read import assert_unchanged, source_unchanged
from .check import BlockResult
from .check import check as check_stage
from .find import find as find_stage
from .fuse import fuse as fuse_stage
from .options import ConvertOptions
from .read import Source
from .report import ConversionResult
from .report import report as report_stage
from .write import Progress, Target
from .write import write as write_stage


def run(source: Source, options: ConvertOptions, target: Target, *, progress: Progress | None = None,
        check_model: bool = True) -> ConversionResult:
    """Convert ``source`` into ``target``: the six stages, in order (the stage functions keep the
    names of their modules, ``find.find``, ``fuse.fuse``, ...; here they are imported as ``*_stage``).

    A source read from a file must not change while it is read (its tensors may be the file's
    mapped pages): every file is checked before it is moved into place, and the run as a whole,
    so a changed source gives an error and no output.
    """
    with _source_guard(source):
        plan = find_stage(source, options)
        fused = fuse_stage(plan)
        checked = check_stage(fused, check_model=check_model)
        written = write_stage(checked, target, progress)
        return report_stage(written)


@contextmanager
def _source_guard(source: Source) -> Iterator[None]:
    if source.loaded is None:
        yield
        return
    loaded = source.loaded
    remove = add_commit_guard(lambda output: assert_unchanged(loaded))
    try:
        with source_unchanged(loaded):
            yield
    finally:
        remove()


__all__ = ["BlockResult", "ConversionResult", "ConvertOptions", "Source", "run"]
