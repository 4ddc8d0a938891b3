"""The ``repvgg`` command line: parse, call the core, render, pick the exit code.

torch is imported only inside commands, so ``repvgg --help`` and ``--version`` stay fast.
Exit codes: 0 ok, 1 not equivalent, 2 bad input or usage, 3 unsupported structure, 4 a bug.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, NoReturn, Optional

import typer
from rich.console import Console

from . import __version__
from .io.digest import FileDigest
from .errors import InputError, RepvggError

app = typer.Typer(
    name="repvgg",
    help="Fuse RepVGG-style multi-branch checkpoints into deploy form, prove equivalence, report what was done.",
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

INTERNAL_ERROR = 4

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


def _stdout() -> Console:
    """Tables to stdout; piped output gets a wide fixed width instead of Rich's 80 columns."""
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
    return Console(soft_wrap=False, width=width)


def _stderr() -> Console:
    return Console(stderr=True, soft_wrap=True)


def _print_json(document: dict[str, Any]) -> None:
    typer.echo(json.dumps(document, indent=2))


def handle_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Turn expected errors into one ``Error: …`` line on stderr and their exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        debug = bool(kwargs.get("debug"))
        try:
            command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except RepvggError as error:
            if debug:
                traceback.print_exc()
            console = _stderr()
            console.print(f"Error: {error.message}", markup=False, highlight=False)
            if error.hint:
                console.print(f"Hint: {error.hint}", markup=False, highlight=False)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            _stderr().print("Interrupted; nothing was written.", markup=False)
            raise typer.Exit(130) from None
        except OSError as error:  # the environment, not a bug: disk full, permissions, a failed rename
            if debug:
                traceback.print_exc()
            where = f" {error.filename}" if getattr(error, "filename", None) else ""
            _stderr().print(f"Error: cannot read or write{where}: {error.strerror or error}; nothing was written",
                            markup=False, highlight=False)
            raise typer.Exit(InputError.exit_code) from None
        except Exception as error:  # noqa: BLE001 - anything else is a bug: say so in one line
            if debug:
                traceback.print_exc()
            text = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
            _stderr().print(
                f"Error: internal error {type(error).__name__}: {text} (a bug in repvgg_cli; rerun with --debug "
                "and report it)", markup=False, highlight=False,
            )
            raise typer.Exit(INTERNAL_ERROR) from None

    return wrapper


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"repvgg {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Fuse RepVGG-style multi-branch checkpoints into deploy form, prove equivalence, report what was done."""


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise InputError(f"--input-shape {text!r}: expected integers like 1,3,224,224") from None
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise InputError(f"--input-shape {text!r}: expected positive integers like 1,3,224,224")
    return shape


def _first_names(names: list[str], shown: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, d, e and 3 more``: a one-line list that never hides how many."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _progress(total: int):
    """A progress bar on stderr when there are many blocks; a no-op callback otherwise."""
    from rich.progress import Progress

    if total < 8:
        return None, (lambda name: None)
    progress = Progress(console=_stderr(), transient=True)
    task = progress.add_task("fusing", total=total)
    return progress, (lambda name: progress.update(task, advance=1, description=f"fusing {name}"))


class OutputFormat(str, Enum):
    """``--format`` of a batch: the format of every output."""

    safetensors = "safetensors"
    pt = "pt"


def _split_sources(paths: list[str]) -> tuple[list[Path], Path, bool]:
    """``SOURCE... OUTPUT`` arrives as one list (click allows one variadic argument): the last is the output.

    Returns the sources, the output, and whether the output was written as a folder (trailing slash).
    """
    if len(paths) < 2:
        raise InputError("convert needs SOURCE... OUTPUT: the output is missing",
                         hint="repvgg convert train.pt deploy.safetensors, or repvgg convert ckpts/ outdir/")
    separators = (os.sep, os.altsep) if os.altsep else (os.sep,)
    return [Path(p) for p in paths[:-1]], Path(paths[-1]), paths[-1].endswith(separators)


@app.command()
@handle_errors
def convert(
    paths: Annotated[
        list[str],
        typer.Argument(
            metavar="SOURCE... OUTPUT", show_default=False,
            help="Train-form checkpoint(s) (.pt, .pth, .safetensors) or folders of them, then the output: the deploy "
                 "checkpoint for one source file (the extension picks the format), else a folder (created if missing; "
                 "a trailing / makes it a folder for one file too).",
        ),
    ],
    bn_eps: EpsOption = None,
    rtol: RtolOption = None,
    atol: AtolOption = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every probe input.")] = 0,
    entry: EntryOption = None,
    allow_pickle: PickleOption = False,
    model: Annotated[
        Optional[str],
        typer.Option("--model", help="MODULE:CALLABLE building the train-form model; converts in the module tree."),
    ] = None,
    input_shape: Annotated[
        Optional[str], typer.Option("--input-shape", help="Whole-model probe N,C,H,W (module tree). Default: from the first conv, 64x64.")
    ] = None,
    fold_post_bn: Annotated[
        bool, typer.Option("--fold-post-bn", help="Fold a post-sum BN (QARepVGG) into the conv where nothing nonlinear sits between.")
    ] = False,
    no_identity: Annotated[
        Optional[list[str]],
        typer.Option("--no-identity", help="Glob of block names without a hidden (parameter-free) identity branch; repeatable."),
    ] = None,
    avg_branch: Annotated[
        Optional[list[str]],
        typer.Option("--avg-branch", help="Glob of block names with a hidden avg-pool branch (QARepVGGBlockV2); repeatable."),
    ] = None,
    fuse_conv_bn: Annotated[
        bool, typer.Option("--fuse-conv-bn", help="Module tree: also fold the remaining conv→BN pairs that run in sequence.")
    ] = False,
    report: Annotated[
        Optional[Path], typer.Option("--report", help="Also write the report to FILE.json, FILE.md or FILE.html.")
    ] = None,
    jobs: Annotated[
        Optional[int],
        typer.Option("--jobs", "-j", min=1, help="Batch: worker processes (default: min(4, CPU count)).", show_default=False),
    ] = None,
    out_format: Annotated[
        Optional[OutputFormat],
        typer.Option("--format", help="Batch: output format (default: each source's own).", show_default=False),
    ] = None,
    as_json: JsonOption = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output (atomically).")] = False,
    fsync: Annotated[
        bool, typer.Option("--fsync", help="Flush each output to disk before renaming it into place (survives a power loss; waits for the disk).")
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Fuse every block, verify each against its train form, write the deploy checkpoint.

    Several sources, or a folder of them, are converted in parallel into an output folder as
    [bold]SOURCE.deploy.EXT[/] (see --jobs, --format).
    """
    from .batch import convert_options

    sources, output, folder_output = _split_sources(paths)
    batch = len(sources) > 1 or sources[0].is_dir() or output.is_dir() or folder_output
    if report is not None and report.suffix not in (".json", ".md", ".html"):
        raise InputError(f"--report {report}: use a .json, .md or .html file name")
    if report is not None and batch and report.suffix == ".md":
        raise InputError(f"--report {report}: a batch report is .json or .html")
    if report is not None and not report.parent.is_dir():
        raise InputError(f"--report {report}: the folder {report.parent} does not exist")
    if out_format is not None and not batch:
        raise InputError("--format is for batch conversion into a folder",
                         hint=f"for one file, the extension of {output} picks the format")
    option_fields = dict(bn_eps=bn_eps, tolerance=dict(rtol=rtol, atol=atol), seed=seed,
                         input_shape=_parse_shape(input_shape), fold_post_bn=fold_post_bn,
                         no_identity=tuple(no_identity or ()), avg_branch=tuple(avg_branch or ()),
                         fuse_conv_bn=fuse_conv_bn, fsync=fsync)
    if batch:  # plain values: with worker processes, torch is imported only in them
        _convert_batch(sources, output, option_fields, jobs=jobs, out_format=out_format.value if out_format else None,
                       allow_pickle=allow_pickle, entry=entry, model_spec=model, force=force, report=report,
                       as_json=as_json, debug=debug)
        return
    source = sources[0]
    # Hash the source on a second core while torch is imported (a single-threaded couple of seconds).
    digest = FileDigest(source) if source.is_file() else None
    from .api import convert_file
    from .render import conversion_json, conversion_markdown, conversion_table, conversion_totals

    options = convert_options(option_fields)
    outcome = convert_file(source, output, options, allow_pickle=allow_pickle, entry=entry, model_spec=model,
                           force=force, progress=_progress, source_digest=digest)
    result = outcome.result
    for note in outcome.loaded.notes:
        _stderr().print(note, markup=False, highlight=False)
    document = conversion_json(result, str(source), str(output), written=outcome.written)
    if as_json:
        _print_json(document)
    else:
        console = _stdout()
        console.print(conversion_table(result))
        for line in conversion_totals(result):
            if line not in outcome.loaded.notes:  # those went to stderr already
                console.print(line, highlight=False)
        if outcome.written:
            console.print(f"wrote {output}", highlight=False, markup=False)
    if report is not None:
        if report.suffix == ".html":
            from .html_report import conversion_html

            text = conversion_html(document)
        else:
            text = json.dumps(document, indent=2) + "\n" if report.suffix == ".json" else conversion_markdown(
                result, str(source), str(output))
        report.write_text(text, encoding="utf-8")
    if not result.ok:
        failed = [r.block.name or "<root>" for r in result.failures]
        detail = f"block(s) {_first_names(failed)} exceed the tolerance" if failed else "the whole-model check failed"
        _stderr().print(f"Error: not equivalent: {detail}; nothing was written",
                        markup=False, highlight=False)
        raise typer.Exit(1)


def _convert_batch(sources: list[Path], output: Path, options: Any, *, jobs: int | None, out_format: str | None,
                   allow_pickle: bool, entry: str | None, model_spec: str | None, force: bool,
                   report: Path | None, as_json: bool, debug: bool) -> None:
    """Several sources (or folders) into one output folder: one progress bar, one summary, one exit code."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .batch import batch_json, batch_table, batch_totals, failed_sources, plan_batch, run_batch

    items = plan_batch(sources, output, out_format)
    with Progress(TextColumn("converting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=_stderr(), transient=True) as progress:
        task = progress.add_task("", total=len(items))
        done = lambda item: progress.update(task, advance=1, description=Path(item.source).name)  # noqa: E731
        try:
            outcome = run_batch(items, options, jobs=jobs, allow_pickle=allow_pickle, entry=entry,
                                model_spec=model_spec, force=force, debug=debug, on_done=done)
        except KeyboardInterrupt:
            progress.stop()
            _stderr().print("Interrupted; the outputs finished before are complete, no other was written.",
                            markup=False)
            raise typer.Exit(130) from None
    document = batch_json(outcome)
    if debug:
        for item in outcome.failures:
            if item.traceback:
                _stderr().print(f"{item.source}:\n{item.traceback}", markup=False, highlight=False)
    if as_json:
        _print_json(document)
    else:
        console = _stdout()
        console.print(batch_table(outcome))
        console.print(batch_totals(outcome), highlight=False, markup=False)
    if report is not None:
        if report.suffix == ".html":
            from .html_report import batch_html

            text = batch_html(document)
        else:
            text = json.dumps(document, indent=2) + "\n"
        report.write_text(text, encoding="utf-8")
    if not outcome.ok:
        _stderr().print(f"Error: {len(outcome.failures)} of {len(outcome.items)} source(s) failed: "
                        f"{_first_names(list(failed_sources(outcome)))}; nothing was written for them",
                        markup=False, highlight=False)
        raise typer.Exit(outcome.exit_code)


@app.command()
@handle_errors
def verify(
    deploy: Annotated[Path, typer.Argument(help="Deploy checkpoint written by repvgg convert.")],
    against: Annotated[Optional[Path], typer.Option("--against", help="Recompute from this train-form source.")] = None,
    bn_eps: EpsOption = None,
    rtol: RtolOption = None,
    atol: AtolOption = 0.0,
    entry: EntryOption = None,
    allow_pickle: PickleOption = False,
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", help="Whole-model probe N,C,H,W (pickled models).")] = None,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Re-check a deploy artifact: structure, integrity and numerical equivalence."""
    from .api import verify_file
    from .render import verify_json, verify_table
    from .verify import Tolerance

    report = verify_file(deploy, against=against, bn_eps=bn_eps, tolerance=Tolerance(rtol=rtol, atol=atol),
                         allow_pickle=allow_pickle, entry=entry, input_shape=_parse_shape(input_shape))
    if as_json:
        _print_json(verify_json(report, str(deploy), str(against) if against else None))
    else:
        console = _stdout()
        title = f"verify {deploy}" + (f" against {against}" if against else " (recorded probes)")
        console.print(verify_table(report, title))
        for problem in report.problems:
            console.print(f"problem: {problem}", markup=False, highlight=False)
        for note in report.notes:
            console.print(note, markup=False, highlight=False)
        if report.model_check is not None:
            mc = report.model_check
            console.print(f"whole model: rel err {mc.rel_err:.2e} (rtol {mc.rtol:g}) {'ok' if mc.ok else 'FAIL'}",
                          highlight=False)
        if report.ok:
            console.print(f"{len(report.blocks)} block(s) verified: equivalent", highlight=False)
    if not report.ok:
        failed = [c.name or "<root>" for c in report.failures]
        parts = []
        if failed:
            parts.append(f"block(s) {_first_names(failed)} failed")
        if report.problems:
            parts.append(report.problems[0])
        if report.model_check is not None and not report.model_check.ok:
            parts.append("the whole-model outputs differ")
        _stderr().print(f"Error: verification failed: {'; '.join(parts)}", markup=False, highlight=False)
        raise typer.Exit(1)


@app.command()
@handle_errors
def inspect(
    path: Annotated[Path, typer.Argument(help="Any checkpoint: train, deploy or neither.")],
    entry: EntryOption = None,
    allow_pickle: PickleOption = False,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """What is in a checkpoint: format, entry, dtypes, blocks by family, train or deploy form."""
    from .io.read import load_checkpoint
    from .inspection import summarize
    from .render import summary_json, summary_tree

    summary = summarize(load_checkpoint(path, allow_pickle=allow_pickle, entry=entry))
    if as_json:
        _print_json(summary_json(summary))
    else:
        _stdout().print(summary_tree(summary))


@app.command()
@handle_errors
def families(
    as_json: JsonOption = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the table as Markdown (the README's).")] = False,
    debug: DebugOption = False,
) -> None:
    """List every supported block family with its train and deploy key patterns."""
    from .render import families_markdown, families_rows, families_table

    if as_json:
        _print_json({"command": "families", "families": families_rows()})
    elif markdown:
        typer.echo(families_markdown())
    else:
        _stdout().print(families_table())


def main() -> NoReturn:
    """Console-script entry point: run the command, then end the process.

    Once the command is done (files written, closed and renamed, worker processes joined), the
    atexit handlers run and stdout/stderr are flushed, the process ends with ``os._exit``: what
    that skips is the interpreter freeing every module of torch and running libtorch's static
    destructors, which took about 0.7 s per process on the benchmark machine and does nothing a
    finished command needs. An exception other than an exit (a bug) propagates as usual.
    Embedding code should call :data:`app` instead (this never returns).
    """
    try:
        app(prog_name="repvgg")
        code = 0
    except SystemExit as stop:
        code = _exit_status(stop.code)
    end_process(code)


def _exit_status(value: object) -> int:
    """The status ``sys.exit(value)`` would give: None 0, an int itself, anything else printed, 1."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def end_process(code: int) -> NoReturn:
    """Run the atexit handlers, flush stdout/stderr and ``os._exit(code)`` (see :func:`main`);
    a flush that fails (a closed pipe) makes a 0 status 120, as Python's own exit does."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 120
    os._exit(code)


from . import cli_tools  # noqa: E402,F401 - registers the bench and export commands
