"""Batch conversion, step 4: every item converted, here or in worker processes, into one outcome."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from .job import ConvertJob, ItemOutcome, convert_one
from .plan import BatchItem, default_jobs
from .workers import main_module_importable, run_in_pool


@dataclass(frozen=True)
class BatchOutcome:
    """Every source's outcome, in plan order."""

    output_dir: Path
    items: tuple[ItemOutcome, ...]
    jobs: int = 1
    created_output_dir: bool = False

    @property
    def failures(self) -> tuple[ItemOutcome, ...]:
        return tuple(i for i in self.items if not i.ok)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def exit_code(self) -> int:
        """0 when every source converted; else the highest exit code among the failed sources."""
        return max((i.exit_code for i in self.failures), default=0)


def run_batch(
    items: Sequence[BatchItem],
    options: Any = None,
    jobs: int | None = None,
    allow_pickle: bool = False,
    entry: str | None = None,
    model_spec: str | None = None,
    force: bool = False,
    debug: bool = False,
    on_done: Callable[[ItemOutcome], None] | None = None,
) -> BatchOutcome:
    """Convert every item; with ``jobs > 1`` in that many worker processes.

    The output folder is created if missing (its parent must exist); if it was created and
    nothing was written into it, it is removed again.

    Args:
        items: from :func:`plan_batch`.
        options: used for every source: what :func:`convert_options` takes.
        jobs: worker processes (default :func:`default_jobs`); 1 (or one item, or a ``__main__``
            that workers cannot re-import, e.g. a script read from stdin) converts in this
            process, single-threaded like a worker, so the outputs are the same byte for byte.
        allow_pickle, entry, model_spec, force: as for :func:`repvgg_cli.api.convert_file`.
        debug: keep each failure's traceback.
        on_done: called with each outcome as it completes (in completion order), e.g. a progress bar.
    Returns:
        A :class:`BatchOutcome` with the items in plan order.
    """
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise InputError(f"--jobs {jobs}: give at least 1")
    items = list(items)
    if not items:
        raise InputError("nothing to convert")
    output_dir = items[0].output.parent
    created = not output_dir.exists()
    if created:
        output_dir.mkdir()
    tasks = [ConvertJob(item, options, allow_pickle, entry, model_spec, force, debug) for item in items]
    workers = min(jobs, len(tasks)) if main_module_importable() else 1
    try:
        outcomes = (_run_here(tasks, on_done) if workers == 1 else run_in_pool(tasks, workers, on_done))
    finally:
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()
    return BatchOutcome(output_dir, tuple(outcomes), workers, created and output_dir.exists())


def _run_here(tasks: list[ConvertJob], on_done: Callable[[ItemOutcome], None] | None) -> list[ItemOutcome]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outcomes = []
        for task in tasks:
            outcomes.append(convert_one(task))
            if on_done is not None:
                on_done(outcomes[-1])
        return outcomes
    finally:
        torch.set_num_threads(threads)
