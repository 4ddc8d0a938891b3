"""``repvgg verify``: re-check a deploy artifact, on its own or against its source."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
    PassthroughOption,
    PickleOption,
    QaVariantOption,
    QuietOption,
    RtolOption,
    first_names,
    parse_shape,
)


@app.command()
@handle_errors
def verify(
    deploy: Annotated[Path, typer.Argument(help="Deploy checkpoint written by repvgg convert.")],
    against: Annotated[Path | None, typer.Option("--against", help="Recompute from this train-form source.")] = None,
    bn_eps: EpsOption = None,
    rtol: RtolOption = None,
    atol: AtolOption = 0.0,
    entry: EntryOption = None,
    allow_pickle: PickleOption = False,
    input_shape: Annotated[str | None, typer.Option("--input-shape", help="Whole-model probe N,C,H,W (pickled models).")] = None,
    fold_post_bn: FoldPostBnOption = False,
    no_identity: NoIdentityOption = None,
    avg_branch: AvgBranchOption = None,
    qa_variant: QaVariantOption = None,
    passthrough: PassthroughOption = None,
    dtype: DtypeOption = DtypeChoice.keep,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Re-check a deploy artifact: structure, integrity and numerical equivalence.

    On its own, from what convert recorded in it. With --against, from the train-form source,
    with the options given here (as for convert), nothing taken from the file under test.
    """
    from ..api import ConvertOptions, verify_file
    from ..checks.tolerance import Tolerance
    from ..render.text import printable
    from ..render.verify import verify_json, verify_table

    with Activity(quiet) as activity:
        activity.step(f"verifying {deploy}" + (f" against {against}" if against else "") + " (reading, checking)")
        options = ConvertOptions(fold_post_bn=fold_post_bn, no_identity=tuple(no_identity or ()),
                                 avg_branch=tuple(avg_branch or ()),
                                 qa_variant=qa_variant.value if qa_variant is not None else None,
                                 passthrough=tuple(passthrough or ()), dtype=dtype.value)
        report = verify_file(deploy, against=against, bn_eps=bn_eps, tolerance=Tolerance(rtol=rtol, atol=atol),
                             allow_pickle=allow_pickle, entry=entry, input_shape=parse_shape(input_shape),
                             options=options)
    if as_json:
        print_json(verify_json(report, str(deploy), str(against) if against else None))
    else:
        console = stdout_console()
        title = f"verify {deploy}" + (f" against {against}" if against else " (recorded probes)")
        console.print(printable(title), markup=False, highlight=False, soft_wrap=True)
        console.print(verify_table(report))
        for problem in report.problems:
            console.print(f"problem: {printable(problem)}", markup=False, highlight=False)
        for note in report.notes:
            console.print(printable(note), markup=False, highlight=False)
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
            parts.append(f"block(s) {first_names(failed)} failed")
        if report.problems:
            parts.append(report.problems[0])
        if report.model_check is not None and not report.model_check.ok:
            parts.append("the whole-model outputs differ")
        stderr_console().print(f"Error: verification failed: {printable('; '.join(parts))}", markup=False,
                               highlight=False)
        raise typer.Exit(1)
