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
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import select
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import signals
from .errors import InputError, RepvggError, one_line
from .io.atomic import add_commit_guard, same_file, temp_files

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")
FORMAT_SUFFIXES = {"safetensors": ".safetensors", "pt": ".pt"}
DEPLOY_MARK = ".deploy"
INTERNAL_ERROR = 4


# -- the plan ----------------------------------------------------------------------------------


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


# -- one conversion (runs in a worker) ---------------------------------------------------------


def convert_options(fields: Any = None):
    """A :class:`repvgg_cli.api.ConvertOptions` from itself or from its fields as plain values.

    Args:
        fields: None (the defaults), a ``ConvertOptions``, or a mapping of its fields with
            ``tolerance`` given as ``{"rtol": ..., "atol": ...}``. Plain values let the parent of
            the workers stay free of torch.
    Returns:
        The options.
    """
    from .pipeline.options import ConvertOptions
    from .verify import Tolerance

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
    from . import api
    from .render import conversion_json

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


class ParentGone(KeyboardInterrupt):
    """The batch that started this worker has stopped: nothing more is written."""


@dataclass
class _WorkerState:
    """What a worker's signal handler and commit guard need to know."""

    converting: bool = False
    stopping: bool = False
    parent_gone: Callable[[], bool] = lambda: False


_worker = _WorkerState()


def _worker_starts(parent_pid: int) -> None:
    """Pool initializer of each worker process.

    One torch thread (N jobs use N cores, not N x cores). SIGINT is ignored: it is the parent's to
    handle (a terminal sends it to the whole process group). SIGTERM and SIGHUP during a conversion
    raise :class:`repvgg_cli.signals.Terminated`, so its temporary file is removed, then the worker
    exits; between conversions the worker exits at once. A thread waits for the parent to exit and
    then sends this worker SIGTERM, and every rename into place first checks that the parent is
    alive (for the moment between the parent's end and that signal).
    """
    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in signals.TERMINATING:
        signal.signal(signum, _worker_stops)
    signals.quiet_dropped_interrupts()
    gone, wait = _parent_watch(parent_pid)
    _worker.parent_gone = gone
    add_commit_guard(_parent_alive)
    threading.Thread(target=_stop_when_parent_exits, args=(wait,), name="repvgg-parent-watch", daemon=True).start()


def _worker_stops(signum: int, frame: object) -> None:
    if _worker.stopping:
        return
    if not _worker.converting:
        os._exit(128 + signum)
    _worker.stopping = True
    raise signals.Terminated(signum)


def _parent_alive(output: Path) -> None:
    """Commit guard: no rename once the parent is gone, or once this worker is stopping (the
    handler's exception can be dropped, raised inside a finalizer)."""
    if _worker.stopping or _worker.parent_gone():
        raise ParentGone(f"the batch stopped; {output} was not written")


def _stop_when_parent_exits(wait: Callable[[], None]) -> None:
    wait()
    os.kill(os.getpid(), signal.SIGTERM)


def _parent_watch(parent_pid: int) -> tuple[Callable[[], bool], Callable[[], None]]:
    """Whether process ``parent_pid`` has exited, and a wait for it: its pidfd becomes readable then
    (Linux); elsewhere ``kill(pid, 0)`` once a second, which a recycled pid could fool."""
    try:
        pidfd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        return (lambda: True), (lambda: None)
    except (AttributeError, OSError):
        def no_such_process() -> bool:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                return True
            except OSError:
                return False
            return False

        def wait_polling() -> None:
            while not no_such_process():
                time.sleep(1.0)

        return no_such_process, wait_polling
    return (lambda: bool(select.select([pidfd], [], [], 0)[0])), (lambda: select.select([pidfd], [], [])[0] and None)


def _convert_in_worker(job: ConvertJob) -> ItemOutcome:
    """:func:`convert_one` in a worker; a stop (a signal, the parent gone) ends the worker once its
    temporary file is removed, instead of reporting back to a parent that no longer waits."""
    try:
        _worker.converting = True
        if _worker.parent_gone():
            raise ParentGone("the batch stopped")
        outcome = convert_one(job)
        _worker.converting = False
        if _worker.stopping:  # the stop surfaced as another error (torch turns one inside torch.save into a RuntimeError)
            os._exit(128 + signal.SIGTERM)
        return outcome
    except KeyboardInterrupt as stop:
        os._exit(signals.exit_status(stop))
    except BaseException:
        _worker.converting = False
        raise


def _main_module_importable() -> bool:
    """Workers re-import ``__main__`` from its file; code read from stdin has none (``python - <script``)."""
    import sys

    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        return True
    path = getattr(main, "__file__", None)
    return path is None or os.path.isfile(path)


def _pool_context() -> multiprocessing.context.BaseContext:
    """``forkserver`` (torch preloaded once in the server, workers fork from it), else ``spawn``.

    The server is started with SIGINT ignored, which it inherits: Ctrl-C goes to the parent alone,
    which stops the workers (see :func:`_stop_workers`), instead of tracebacks from every process.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["repvgg_cli.api", "repvgg_cli.render"])
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGINT, previous)
    return context


# -- the batch ---------------------------------------------------------------------------------


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
    workers = min(jobs, len(tasks)) if _main_module_importable() else 1
    try:
        outcomes = (_run_here(tasks, on_done) if workers == 1 else _run_in_pool(tasks, workers, on_done))
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


def _run_in_pool(tasks: list[ConvertJob], workers: int,
                 on_done: Callable[[ItemOutcome], None] | None) -> list[ItemOutcome]:
    results: dict[int, ItemOutcome] = {}
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context(),
                                                  initializer=_worker_starts, initargs=(os.getpid(),))
    try:
        with signals.held():  # submit starts the workers; a half-started pool cannot shut down cleanly
            futures = {pool.submit(_convert_in_worker, task): index for index, task in enumerate(tasks)}
        for future in concurrent.futures.as_completed(futures):
            index = futures[future]
            try:
                outcome = future.result()
            except Exception as error:  # noqa: BLE001 - the worker process died (killed, out of memory)
                task = tasks[index]
                outcome = ItemOutcome(
                    str(task.item.source), str(task.item.output), INTERNAL_ERROR, False,
                    error=f"worker failed: {type(error).__name__}: {one_line(error, '')}",
                )
            results[index] = outcome
            if on_done is not None:
                on_done(outcome)
            signals.check()  # a stop whose exception was dropped (raised inside a finalizer)
    except BaseException:
        _stop_workers(pool, {task.item.output.parent for task in tasks})
        raise
    pool.shutdown(wait=True)
    return [results[index] for index in range(len(tasks))]


STOP_WAIT_S = 10.0


def _stop_workers(pool: concurrent.futures.ProcessPoolExecutor, folders: set[Path]) -> None:
    """Stop every worker now: SIGTERM (each removes its temporary file and exits), a wait of at most
    :data:`STOP_WAIT_S`, then SIGKILL for any still running and removal of its temporary files.
    Further signals meanwhile are dropped: the batch is stopping already."""
    with signals.held(redeliver=False):
        processes = list((getattr(pool, "_processes", None) or {}).values())
        for process in processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + STOP_WAIT_S
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
                for folder in folders:
                    for tmp in temp_files(folder, process.pid):
                        tmp.unlink(missing_ok=True)
        pool.shutdown(wait=True, cancel_futures=True)


# -- reporting ---------------------------------------------------------------------------------


def _num(value: float | None) -> float | None:
    return value if value is not None and value == value and abs(value) != float("inf") else None


def batch_json(outcome: BatchOutcome) -> dict[str, Any]:
    """The batch as one JSON document: per source its summary and full convert report."""
    return {
        "command": "convert", "batch": True, "ok": outcome.ok, "exit_code": outcome.exit_code,
        "output_dir": str(outcome.output_dir), "jobs": outcome.jobs,
        "items": [
            {"source": i.source, "output": i.output, "ok": i.ok, "written": i.written, "exit_code": i.exit_code,
             "blocks": i.blocks, "failed_blocks": i.failed_blocks, "worst_rel_err": _num(i.worst_rel_err),
             "error": i.error, "hint": i.hint, "report": i.document}
            for i in outcome.items
        ],
        "totals": {
            "sources": len(outcome.items), "converted": len(outcome.items) - len(outcome.failures),
            "failed": len(outcome.failures), "blocks": sum(i.blocks for i in outcome.items),
        },
    }


def _err(value: float | None) -> str:
    if value is None:
        return ""
    return "inf" if value != value or abs(value) == float("inf") else f"{value:.1e}"


def batch_table(outcome: BatchOutcome):
    """Summary table: source, output, blocks, worst relative error, status or error."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title="Batch conversion", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("source", overflow="fold")
    table.add_column("output", overflow="fold")
    table.add_column("blocks", justify="right", no_wrap=True)
    table.add_column("worst rel err", justify="right", no_wrap=True)
    table.add_column("status", overflow="fold")
    for i in outcome.items:
        hint = f" (hint: {i.hint})" if i.hint else ""
        status = Text("ok", style="green") if i.ok else Text(f"FAIL (exit {i.exit_code}): {i.error}{hint}", style="red")
        table.add_row(Text(i.source), Text(i.output if i.written else "-"), str(i.blocks) if i.document else "",
                      _err(i.worst_rel_err), status)
    return table


def batch_totals(outcome: BatchOutcome) -> str:
    """One line under the table."""
    converted = len(outcome.items) - len(outcome.failures)
    return (f"{converted} of {len(outcome.items)} source(s) converted into {outcome.output_dir}, "
            f"{len(outcome.failures)} failed ({outcome.jobs} job(s))")


def failed_sources(outcome: BatchOutcome) -> Iterable[str]:
    return (f"{i.source} (exit {i.exit_code})" for i in outcome.failures)
