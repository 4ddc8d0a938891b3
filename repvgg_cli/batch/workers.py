"""Batch conversion, step 3: the worker processes, how they start, stop and outlive no parent.

Workers are started with the ``forkserver`` context (``spawn`` where there is none): forking a
process that has run torch is not safe. Each runs torch single-threaded. A stop (SIGINT, SIGTERM or
SIGHUP to the parent) terminates the workers, each removing its temporary file; a worker whose
parent is gone never moves a file into place.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import signals
from ..errors import one_line
from ..io.atomic import add_commit_guard, temp_files
from .job import INTERNAL_ERROR, ConvertJob, ItemOutcome, convert_one


class ParentGone(KeyboardInterrupt):
    """The batch that started this worker has stopped: nothing more is written."""


@dataclass
class _WorkerState:
    """What a worker's signal handler and commit guard need to know."""

    converting: bool = False
    stopping: bool = False
    parent_gone: Callable[[], bool] = lambda: False


_worker = _WorkerState()


def worker_starts(parent_pid: int) -> None:
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
    gone, wait = parent_watch(parent_pid)
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


def parent_watch(parent_pid: int) -> tuple[Callable[[], bool], Callable[[], None]]:
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


def convert_in_worker(job: ConvertJob) -> ItemOutcome:
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


def main_module_importable() -> bool:
    """Workers re-import ``__main__`` from its file; code read from stdin has none (``python - <script``)."""
    import sys

    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        return True
    path = getattr(main, "__file__", None)
    return path is None or os.path.isfile(path)


def pool_context() -> multiprocessing.context.BaseContext:
    """``forkserver`` (torch preloaded once in the server, workers fork from it), else ``spawn``.

    The server is started with SIGINT ignored, which it inherits: Ctrl-C goes to the parent alone,
    which stops the workers (see :func:`stop_workers`), instead of tracebacks from every process.
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


def run_in_pool(tasks: list[ConvertJob], workers: int,
                 on_done: Callable[[ItemOutcome], None] | None) -> list[ItemOutcome]:
    results: dict[int, ItemOutcome] = {}
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=pool_context(),
                                                  initializer=worker_starts, initargs=(os.getpid(),))
    try:
        with signals.held():  # submit starts the workers; a half-started pool cannot shut down cleanly
            futures = {pool.submit(convert_in_worker, task): index for index, task in enumerate(tasks)}
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
        stop_workers(pool, {task.item.output.parent for task in tasks})
        raise
    pool.shutdown(wait=True)
    return [results[index] for index in range(len(tasks))]


STOP_WAIT_S = 10.0


def stop_workers(pool: concurrent.futures.ProcessPoolExecutor, folders: set[Path]) -> None:
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
