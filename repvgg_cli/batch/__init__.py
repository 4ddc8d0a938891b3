"""Batch conversion: many sources into one output folder, in parallel worker processes.

The plan (which sources, which output names) is made up front and refused as a whole on a usage
problem (exit 2): no checkpoint in a folder, two sources that would write the same output, an
output that is a file. Each source is then converted on its own by
:func:`repvgg_cli.api.convert_file` - verified, written atomically, its source untouched - and a
failure of one source never stops the others. Workers are started with the ``forkserver`` context
(``spawn`` where there is none): forking a process that has run torch is not safe. Each worker runs
torch single-threaded, so N jobs use N cores and the outputs do not depend on the number of jobs.

SIGINT, SIGTERM or SIGHUP to the parent stops the batch: the parent terminates its workers (each
removes its temporary file) and waits for them before it exits. A worker never moves a file into
place once its parent is gone (killed outright, so it could not stop them): it checks before
every rename.

The steps, one module each: :mod:`.plan`, :mod:`.job` (one conversion), :mod:`.workers` (the
processes), :mod:`.run` (the batch), :mod:`.report`.
"""

from __future__ import annotations

from .job import INTERNAL_ERROR, ConvertJob, ItemOutcome, convert_one, convert_options
from .plan import (
    CHECKPOINT_SUFFIXES,
    DEPLOY_MARK,
    FORMAT_SUFFIXES,
    BatchItem,
    checkpoints_in,
    default_jobs,
    is_deploy_name,
    output_name,
    plan_batch,
)
from .report import batch_json, batch_table, batch_totals, failed_sources
from .run import BatchOutcome, run_batch

__all__ = [
    "CHECKPOINT_SUFFIXES", "DEPLOY_MARK", "FORMAT_SUFFIXES", "INTERNAL_ERROR", "BatchItem", "BatchOutcome", "ConvertJob",
    "ItemOutcome", "batch_json", "batch_table", "batch_totals", "checkpoints_in", "convert_one", "convert_options",
    "default_jobs", "failed_sources", "is_deploy_name", "output_name", "plan_batch", "run_batch",
]
