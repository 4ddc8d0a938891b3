"""``repvgg convert``: one source into one output, or many into a folder (batch)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import signals
from ..errors import InputError
from ..io.atomic import check_write_path, write_text
from ..io.digest import FileDigest
from .app import app, handle_errors, print_json, stderr_console, stdout_console
from .options import (
    Activity,
    AtolOption,
    AvgBranchOption,
    DebugOption,
    DtypeChoice,
    DtypeOption,
    EntryOption,
    EpsOption,
    FoldPostBnOption,
    JsonOption,
    NoIdentityOption,
    OutputFormat,
    PassthroughOption,
    PickleOption,
    QaVariantOption,
    QuietOption,
    RtolOption,
    first_names,
    parse_shape,
    progress_shown,
    reading,
    wrote_lines,
)


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
        str | None,
        typer.Option("--model", help="MODULE:CALLABLE building the train-form model; converts in the module tree."),
    ] = None,
    input_shape: Annotated[
        str | None, typer.Option("--input-shape", help="Whole-model probe N,C,H,W (module tree). Default: from the first conv, 64x64.")
    ] = None,
    fold_post_bn: FoldPostBnOption = False,
    no_identity: NoIdentityOption = None,
    avg_branch: AvgBranchOption = None,
    fuse_conv_bn: Annotated[
        bool, typer.Option("--fuse-conv-bn", help="Module tree: also fold the remaining conv→BN pairs that run in sequence.")
    ] = False,
    qa_variant: QaVariantOption = None,
    passthrough: PassthroughOption = None,
    dtype: DtypeOption = DtypeChoice.keep,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Read, find, fuse and check; print the report; write nothing.")
    ] = False,
    max_output_bytes: Annotated[
        int | None,
        typer.Option("--max-output-bytes", min=1, help="Refuse, before any work, an output larger than this "
                                                       "(default: 4x the source's bytes).", show_default=False),
    ] = None,
    report: Annotated[
        Path | None, typer.Option("--report", help="Also write the report to FILE.json, FILE.md or FILE.html.")
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", "-j", min=1, help="Batch: worker processes (default: min(4, CPU count)).", show_default=False),
    ] = None,
    out_format: Annotated[
        OutputFormat | None,
        typer.Option("--format", help="Batch: output format (default: each source's own).", show_default=False),
    ] = None,
    show_diff: Annotated[
        bool, typer.Option("--diff", help="List every key removed, added, kept and dropped, by block (the totals are "
                                          "always shown; --report files always hold the full list).")
    ] = False,
    as_json: JsonOption = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output (atomically).")] = False,
    fsync: Annotated[
        bool, typer.Option("--fsync", help="Flush each output to disk before renaming it into place (survives a power loss; waits for the disk).")
    ] = False,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Fuse every block, verify each against its train form, write the deploy checkpoint.

    Several sources, or a folder of them, are converted in parallel into an output folder as
    [bold]SOURCE.deploy.EXT[/] (see --jobs, --format).
    """
    from ..batch import convert_options

    sources, output, folder_output = _split_sources(paths)
    batch = len(sources) > 1 or sources[0].is_dir() or output.is_dir() or folder_output
    if report is not None and report.suffix not in (".json", ".md", ".html"):
        raise InputError(f"--report {report}: use a .json, .md or .html file name")
    if report is not None and batch and report.suffix == ".md":
        raise InputError(f"--report {report}: a batch report is .json or .html")
    if report is not None and not report.parent.is_dir():
        raise InputError(f"--report {report}: the folder {report.parent} does not exist")
    if show_diff and batch:
        raise InputError("--diff lists the keys of one conversion",
                         hint="a batch's key diffs are in --report FILE.json or FILE.html")
    if out_format is not None and not batch:
        raise InputError("--format is for batch conversion into a folder",
                         hint=f"for one file, the extension of {output} picks the format")
    option_fields = dict(bn_eps=bn_eps, tolerance=dict(rtol=rtol, atol=atol), seed=seed,
                         input_shape=parse_shape(input_shape), fold_post_bn=fold_post_bn,
                         no_identity=tuple(no_identity or ()), avg_branch=tuple(avg_branch or ()),
                         fuse_conv_bn=fuse_conv_bn, fsync=fsync,
                         qa_variant=qa_variant.value if qa_variant is not None else None,
                         passthrough=tuple(passthrough or ()), dtype=dtype.value, max_output_bytes=max_output_bytes)
    if dry_run and (batch or report is not None):
        raise InputError("--dry-run writes nothing: it is for one source, without --report",
                         hint="drop --dry-run to convert a batch or write a report")
    if batch:  # plain values: with worker processes, torch is imported only in them
        _convert_batch(sources, output, option_fields, jobs=jobs, out_format=out_format.value if out_format else None,
                       allow_pickle=allow_pickle, entry=entry, model_spec=model, force=force, report=report,
                       as_json=as_json, debug=debug, quiet=quiet)
        return
    source = sources[0]
    if report is not None:  # refused before any work: never a source, the output, a link; exists needs --force
        check_write_path(report, [source], force, others=[output], label="--report ")
    # Hash the source on a second core while torch is imported (a single-threaded couple of seconds).
    digest = FileDigest(source) if source.is_file() else None
    from ..api import convert_file
    from ..render.conversion import (
        conversion_json,
        conversion_markdown,
        conversion_table,
        conversion_totals,
    )
    from ..render.key_diff import key_diff_renderables
    from ..render.text import printable

    options = convert_options(option_fields)
    with Activity(quiet) as activity:
        reading(activity, source)
        outcome = convert_file(source, output, options, allow_pickle=allow_pickle, entry=entry, model_spec=model,
                               force=force, progress=activity.blocks, source_digest=digest, dry_run=dry_run)
    result = outcome.result
    loader_notes = [printable(note) for note in outcome.loaded.notes]
    for note in loader_notes:
        stderr_console().print(note, markup=False, highlight=False)
    document = conversion_json(result, str(source), str(output), written=outcome.written)
    if as_json:
        print_json(document)
    else:
        console = stdout_console()
        console.print(conversion_table(result))
        for line in conversion_totals(result):
            if line not in loader_notes:  # those went to stderr already
                console.print(line, highlight=False, markup=False)
        for renderable in key_diff_renderables(result, expanded=show_diff):
            console.print(renderable, highlight=False)
    if report is not None:
        if report.suffix == ".html":
            from ..html_report import conversion_html

            text = conversion_html(document)
        else:
            text = json.dumps(document, indent=2) + "\n" if report.suffix == ".json" else conversion_markdown(
                result, str(source), str(output))
        write_text(report, text, force=force)
    _warn_undecided_eps(result)
    if dry_run:
        stderr_console().print(f"--dry-run: nothing was written ({output} would have been)", markup=False,
                               highlight=False)
    wrote_lines(([output] if outcome.written else []) + ([report] if report is not None else []), as_json)
    if not result.ok:
        failed = [r.block.name or "<root>" for r in result.failures]
        detail = f"block(s) {first_names(failed)} exceed the tolerance" if failed else "the whole-model check failed"
        stderr_console().print(f"Error: not equivalent: {detail}; nothing was written",
                        markup=False, highlight=False)
        low = sorted({str(r.fused.weight.dtype).removeprefix("torch.") for r in result.failures
                      if str(r.fused.weight.dtype) in ("torch.float16", "torch.bfloat16")})
        if low:
            stderr_console().print(f"Hint: the fused weights were rounded to {'/'.join(low)}; --dtype float32 writes "
                                   "them in float32 (fusion is exact in float64)", markup=False, highlight=False)
        raise typer.Exit(1)


def _warn_undecided_eps(result: Any) -> None:
    """A state dict stores no BN eps: where nothing decided it and 1e-3 would change blocks, say so."""
    sensitive = result.eps_sensitive
    if not sensitive:
        return
    undecided = sum(1 for r in result.blocks if r.eps_sensitivity is not None)
    shown = ", ".join(f"{name or '<root>'} (rel {rel:.1e})" for name, rel in sensitive[:4])
    more = f" and {len(sensitive) - 4} more" if len(sensitive) > 4 else ""
    stderr_console().print(
        f"Warning: BN eps is not stored in a state dict and nothing in this one says which project wrote it, so "
        f"PyTorch's default 1e-5 was used for {undecided} block(s); with 1e-3 (the YOLO families') "
        f"{len(sensitive)} of them compute differently beyond the tolerance: {shown}{more}. If the model was "
        "trained with another eps, pass --bn-eps.", markup=False, highlight=False)

def _convert_batch(sources: list[Path], output: Path, options: Any, *, jobs: int | None, out_format: str | None,
                   allow_pickle: bool, entry: str | None, model_spec: str | None, force: bool,
                   report: Path | None, as_json: bool, debug: bool, quiet: bool = False) -> None:
    """Several sources (or folders) into one output folder: one progress bar, one summary, one exit code."""
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from ..batch import (
        batch_json,
        batch_table,
        batch_totals,
        failed_sources,
        plan_batch,
        run_batch,
    )
    from ..render.text import printable

    items = plan_batch(sources, output, out_format)
    if report is not None:
        check_write_path(report, [i.source for i in items], force, others=[i.output for i in items], label="--report ")
    with Progress(TextColumn("converting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=stderr_console(), transient=True,
                  disable=not progress_shown(quiet)) as progress:
        task = progress.add_task("", total=len(items))
        done = lambda item: progress.update(task, advance=1, description=escape(printable(Path(item.source).name)))
        try:
            outcome = run_batch(items, options, jobs=jobs, allow_pickle=allow_pickle, entry=entry,
                                model_spec=model_spec, force=force, debug=debug, on_done=done)
        except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM, SIGHUP: the workers are stopped by now
            progress.stop()
            stderr_console().print(f"{signals.describe(stop)}; the outputs finished before are complete, "
                                   "no other was written.", markup=False)
            raise typer.Exit(signals.exit_status(stop)) from None
    document = batch_json(outcome)
    if debug:
        for item in outcome.failures:
            if item.traceback:
                stderr_console().print(f"{item.source}:\n{item.traceback}", markup=False, highlight=False)
    if as_json:
        print_json(document)
    else:
        console = stdout_console()
        console.print(batch_table(outcome))
        console.print(batch_totals(outcome), highlight=False, markup=False)
    if report is not None:
        if report.suffix == ".html":
            from ..html_report import batch_html

            text = batch_html(document)
        else:
            text = json.dumps(document, indent=2) + "\n"
        write_text(report, text, force=force)
    wrote_lines([Path(item.output) for item in outcome.items if item.written] + ([report] if report is not None else []),
                as_json)
    if not outcome.ok:
        stderr_console().print(f"Error: {len(outcome.failures)} of {len(outcome.items)} source(s) failed: "
                        f"{first_names(list(failed_sources(outcome)))}; nothing was written for them",
                        markup=False, highlight=False)
        raise typer.Exit(outcome.exit_code)
