"""Batch conversion, step 2: one source converted by :func:`repvgg_cli.api.convert_file`, into a
small picklable outcome (runs in a worker process, or in the parent with one job)."""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any

from ..errors import RepvggError, one_line
from .plan import BatchItem

INTERNAL_ERROR = 4


def convert_options(fields: Any = None):
    """A :class:`repvgg_cli.api.ConvertOptions` from itself or from its fields as plain values.

    Args:
        fields: None (the defaults), a ``ConvertOptions``, or a mapping of its fields with
            ``tolerance`` given as ``{"rtol": ..., "atol": ...}``. Plain values let the parent of
            the workers stay free of torch.
    Returns:
        The options.
    """
    from ..checks.tolerance import Tolerance
    from ..pipeline.options import ConvertOptions

    if fields is None or isinstance(fields, ConvertOptions):
        return fields or ConvertOptions()
    values = dict(fields)
    if isinstance(values.get("tolerance"), dict):
        values["tolerance"] = Tolerance(**values["tolerance"])
    return ConvertOptions(**values)


@dataclass(frozen=True)
class ConvertJob:
    """Everything a worker needs to convert one source; small and picklable."""

    item: BatchItem
    options: Any  # what convert_options takes: ConvertOptions or its fields as plain values
    allow_pickle: bool = False
    entry: str | None = None
    model_spec: str | None = None
    force: bool = False
    debug: bool = False


@dataclass(frozen=True)
class ItemOutcome:
    """What happened to one source: a small, picklable summary plus its JSON report.

    Attributes:
        exit_code: 0 converted and written; else the code the single-file command would exit with.
        error, hint: the one-line message of a failure (None when ok).
        document: :func:`repvgg_cli.render.conversion_json` of the conversion, None when it raised.
        traceback: the worker's traceback of an error (only with ``debug``).
    """

    source: str
    output: str
    exit_code: int
    written: bool
    blocks: int = 0
    failed_blocks: int = 0
    worst_rel_err: float | None = None
    error: str | None = None
    hint: str | None = None
    document: dict | None = None
    traceback: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def _not_equivalent_message(document: dict) -> str:
    failed = [b["name"] or "<root>" for b in document["blocks"] if not b["ok"]]
    shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
    detail = f"block(s) {shown}" if failed else "the whole-model check"
    return f"not equivalent: {detail} exceed the tolerance; nothing was written"


def _worst_rel_err(document: dict) -> float | None:
    errors = [b["rel_err"] for b in document["blocks"]]
    if any(e is None for e in errors):  # JSON null: inf or nan
        return float("inf")
    return max(errors, default=0.0)


def convert_one(job: ConvertJob) -> ItemOutcome:
    """Convert one source with :func:`repvgg_cli.api.convert_file`; never raises an expected error.

    Args:
        job: the source, output and options.
    Returns:
        An :class:`ItemOutcome`; a failure carries the exit code and message the single-file
        command would have given, and its output is not written.
    """
    from .. import api
    from ..render.conversion import conversion_json

    source, output = job.item.source, job.item.output
    try:
        outcome = api.convert_file(source, output, convert_options(job.options), allow_pickle=job.allow_pickle,
                                   entry=job.entry, model_spec=job.model_spec, force=job.force)
    except RepvggError as error:
        return ItemOutcome(str(source), str(output), error.exit_code, False, error=error.message, hint=error.hint,
                           traceback=traceback.format_exc() if job.debug else None)
    except Exception as error:  # noqa: BLE001 - a bug: reported for this source, the others go on
        message = (f"internal error {type(error).__name__}: {one_line(error, '')} (a bug in repvgg_cli; rerun with "
                   "--debug and report it)")
        return ItemOutcome(str(source), str(output), INTERNAL_ERROR, False, error=message,
                           traceback=traceback.format_exc() if job.debug else None)
    document = conversion_json(outcome.result, str(source), str(output), written=outcome.written)
    ok = outcome.result.ok and outcome.written
    return ItemOutcome(
        str(source), str(output), 0 if ok else 1, outcome.written,
        blocks=len(document["blocks"]), failed_blocks=document["totals"]["failed"],
        worst_rel_err=_worst_rel_err(document), error=None if ok else _not_equivalent_message(document),
        document=document,
    )
