"""``repvgg bench`` and ``repvgg export``: latency side by side, ONNX of the deploy model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import InputError
from .app import app, handle_errors, print_json, stderr_console, stdout_console
from .options import (
    Activity,
    AtolOption,
    DebugOption,
    EntryOption,
    JsonOption,
    ModelOption,
    PickleOption,
    QuietOption,
    RtolOption,
    parse_shape,
    wrote_lines,
)

if TYPE_CHECKING:
    from ..bench.results import BenchResult, Speedup, Timing
    from ..export.file import ExportResult

def _ms(value: float) -> str:
    return f"{value:.3f}"

def _num(value: float) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    return value if math.isfinite(value) else None

def _timing_json(t: Timing) -> dict[str, Any]:
    return {"median_ms": t.median_ms, "q1_ms": t.q1_ms, "q3_ms": t.q3_ms, "iqr_ms": t.iqr_ms, "min_ms": t.min_ms,
            "max_ms": t.max_ms, "samples_ms": list(t.samples_ms)}


def _speedup_json(s: Speedup) -> dict[str, Any]:
    from ..bench.results import INTERVAL

    return {"ratio": _num(s.ratio), "low": _num(s.low), "high": _num(s.high), "interval": INTERVAL,
            "method": "bootstrap of the ratio of medians", "conclusive": s.conclusive}


def bench_json(result: BenchResult, source: str) -> dict[str, Any]:
    """The bench report as one JSON-ready document."""
    from ..render.verify import model_check_json

    timing = _timing_json
    conversion = result.conversion
    onnx = result.onnx
    return {
        "command": "bench",
        "source": source,
        "device": result.device,
        "threads": result.threads,
        "input_shape": list(result.input_shape),
        "dtype": result.dtype,
        "warmup": result.warmup,
        "repeat": result.repeat,
        "tf32_disabled": result.tf32_disabled,
        "train": timing(result.train),
        "deploy": timing(result.deploy),
        "speedup": _num(result.speedup),
        "speedup_interval": _speedup_json(result.interval),
        "params": {"train": result.params_train, "deploy": result.params_deploy},
        "blocks": result.blocks,
        "reparameterized": "in place",
        "outputs_match": result.outputs_match,
        "failed_blocks": [r.block.name for r in conversion.failures],
        "model_check": model_check_json(conversion.model_check),
        "timed_outputs": {"max_abs_err": _num(result.timed_max_abs_err), "rel_err": _num(result.timed_rel_err)},
        "onnxruntime": None if onnx is None else {
            "version": onnx.version, "graph_optimization": onnx.optimization, "opset": onnx.opset,
            "train": timing(onnx.train), "deploy": timing(onnx.deploy), "speedup": _speedup_json(onnx.speedup),
            "outputs": {"max_abs_err": _num(onnx.max_abs_err), "rel_err": _num(onnx.rel_err)},
        },
    }

@app.command()
@handle_errors
def bench(
    checkpoint: Annotated[Path, typer.Argument(help="Train-form checkpoint: a pickled model, or a state dict with --model.")],
    allow_pickle: PickleOption = False,
    model: ModelOption = None,
    entry: EntryOption = None,
    batch: Annotated[int | None, typer.Option("--batch", help="Batch size (default 1).")] = None,
    resolution: Annotated[int | None, typer.Option("--resolution", help="Input height and width (default 224).")] = None,
    input_shape: Annotated[
        str | None, typer.Option("--input-shape", help="Full input shape N,C,H,W (instead of --batch/--resolution).")
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="torch intra-op threads (default: torch's).")] = None,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed forward passes before timing each form.")] = 3,
    repeat: Annotated[int, typer.Option("--repeat", help="Timed forward passes per form; the median is reported.")] = 10,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda (cuda:N); cuda only when available.")] = "cpu",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the timed input and of the whole-model check.")] = 0,
    rtol: RtolOption = None,
    atol: AtolOption = 0.0,
    onnx: Annotated[
        bool,
        typer.Option("--onnx", help="Also export both forms to ONNX and time them in onnxruntime with all its graph "
                                    "optimizations on (what fusing buys beyond the runtime's own conv+BN folding)."),
    ] = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Time the train-form and the deploy-form forward pass side by side (fused in place between)."""
    from ..bench.results import DEFAULT_RESOLUTION, BenchOptions
    from ..bench.run import bench_file
    from ..checks.tolerance import Tolerance

    shape = parse_shape(input_shape)
    if shape is not None and (batch is not None or resolution is not None):
        raise InputError("--input-shape gives the whole shape: do not combine it with --batch or --resolution")
    if shape is not None and len(shape) != 4:
        raise InputError(f"--input-shape {input_shape!r}: expected four integers N,C,H,W")
    if (batch is not None and batch < 1) or (resolution is not None and resolution < 1):
        raise InputError("--batch and --resolution must be at least 1")
    options = BenchOptions(
        batch=batch or 1, resolution=resolution or DEFAULT_RESOLUTION, input_shape=shape, threads=threads,
        warmup=warmup, repeat=repeat, device=device, seed=seed, tolerance=Tolerance(rtol=rtol, atol=atol), onnx=onnx,
    )
    with Activity(quiet) as activity:
        result = bench_file(checkpoint, options, allow_pickle=allow_pickle, entry=entry, model_spec=model,
                            steps=activity)
    if as_json:
        print_json(bench_json(result, str(checkpoint)))
    else:
        _print_bench(result, str(checkpoint))
    _bench_warnings(result)
    if not result.outputs_match:
        failed = [r.block.name or "<root>" for r in result.conversion.failures]
        detail = f"block(s) {', '.join(failed[:5])}" if failed else "the whole-model check"
        stderr_console().print(f"Error: not equivalent: {detail} exceed the tolerance", markup=False, highlight=False)
        raise typer.Exit(1)

def _spread(t: Timing) -> str:
    return f"{_ms(t.q1_ms)}-{_ms(t.q3_ms)}"


def _speedup_line(what: str, s: Speedup) -> str:
    from ..bench.results import INTERVAL

    line = (f"{what}speedup {s.ratio:.2f}x (train median / deploy median; {INTERVAL:.0%} interval "
            f"{s.low:.2f}x-{s.high:.2f}x)")
    return line


def _inconclusive(what: str, s: Speedup) -> str | None:
    if s.conclusive:
        return None
    return (f"warning: {what}the spread of the passes is too wide to tell which form is faster (the interval "
            f"{s.low:.2f}x-{s.high:.2f}x includes 1x); run more passes (--repeat) on a quieter machine")


def _print_bench(result: BenchResult, source: str) -> None:
    from rich.table import Table

    from ..render.text import printable

    console = stdout_console()
    title = (f"bench {printable(source)}: input {tuple(result.input_shape)} {result.dtype} on {result.device}, "
             f"{result.threads} thread(s), {result.repeat} timed pass(es) per form after {result.warmup} warm-up")
    console.print(title, highlight=False, markup=False, soft_wrap=True)
    table = Table(box=None, pad_edge=False)
    for column in ("form", "median ms", "IQR ms", "min-max ms", "parameters"):
        table.add_column(column, justify="left" if column == "form" else "right")
    rows = [("train", result.train, f"{result.params_train:,}"), ("deploy", result.deploy, f"{result.params_deploy:,}")]
    if result.onnx is not None:
        rows += [("train, onnxruntime", result.onnx.train, ""), ("deploy, onnxruntime", result.onnx.deploy, "")]
    for form, t, params in rows:
        table.add_row(form, _ms(t.median_ms), _spread(t), f"{_ms(t.min_ms)}-{_ms(t.max_ms)}", params)
    console.print(table)
    console.print(_speedup_line("", result.interval) + f"; {result.blocks} block(s) fused in place", highlight=False,
                  markup=False)
    if result.onnx is not None:
        o = result.onnx
        console.print(_speedup_line(f"onnxruntime {o.version} ({o.optimization}, opset {o.opset}): ", o.speedup)
                      + f"; deploy vs train graph output: rel err {o.rel_err:.2e}", highlight=False, markup=False)
    mc = result.conversion.model_check
    if mc is not None:
        console.print(f"outputs match: {'yes' if result.outputs_match else 'NO'} (whole model, {mc.dtype}, input "
                      f"{tuple(mc.input_shape)}: max abs err {mc.max_abs_err:.2e}, rel err {mc.rel_err:.2e}, "
                      f"rtol {mc.rtol:g})", highlight=False, markup=False)
    console.print(f"timed outputs ({result.dtype}, {result.device}): max abs diff {result.timed_max_abs_err:.2e}, "
                  f"rel {result.timed_rel_err:.2e}" + ("; TF32 off" if result.tf32_disabled else ""), highlight=False,
                  markup=False)


def _bench_warnings(result: BenchResult) -> None:
    """On stderr: a plain warning for each comparison the spread of the passes leaves undecided."""
    warnings = [_inconclusive("", result.interval)]
    if result.onnx is not None:
        warnings.append(_inconclusive("onnxruntime: ", result.onnx.speedup))
    for warning in warnings:
        if warning:
            stderr_console().print(warning, highlight=False, markup=False)


def export_json(result: ExportResult) -> dict[str, Any]:
    """The export report as one JSON-ready document."""
    from ..render.verify import model_check_json

    conversion = result.conversion
    return {
        "command": "export",
        "source": str(result.source),
        "output": str(result.output),
        "written": result.written,
        "source_form": result.source_form,
        "exporter": result.exporter,
        "opset": result.opset,
        "input_shape": list(result.input_shape),
        "dynamic_batch": result.dynamic_batch,
        "dynamic": result.dynamic,
        "half": result.half,
        "slimmed": result.slimmed,
        "dtype": result.dtype,
        "fused_blocks": len(conversion.blocks) if conversion is not None else 0,
        "fusion_ok": conversion.ok if conversion is not None else None,
        "model_check": model_check_json(conversion.model_check) if conversion is not None else None,
        "onnxruntime": {
            "version": result.onnxruntime_version,
            "ok": all(c.ok for c in result.checks),
            "max_abs_err": _num(result.max_abs_err),
            "rel_err": _num(result.rel_err),
            "checks": [
                {"seed": c.seed, "input_shape": list(c.input_shape), "outputs": c.outputs,
                 "max_abs_err": _num(c.max_abs_err), "rel_err": _num(c.rel_err), "rtol": c.rtol, "atol": c.atol,
                 "ok": c.ok}
                for c in result.checks
            ],
        },
        "size": result.size,
        "sha256": result.sha256,
        "notes": list(result.notes),
    }

@app.command()
@handle_errors
def export(
    source: Annotated[Path, typer.Argument(help="A pickled model (train or deploy form), or a state dict with --model.")],
    output: Annotated[Path, typer.Argument(help="The .onnx file to write.")],
    allow_pickle: PickleOption = False,
    model: ModelOption = None,
    entry: EntryOption = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset version.")] = 17,
    input_shape: Annotated[
        str | None, typer.Option("--input-shape", help="Traced input N,C,H,W. Default: 1,C,224,224 (C from the first conv).")
    ] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Make the batch dimension symbolic.")] = False,
    dynamic: Annotated[
        bool, typer.Option("--dynamic", help="Make the batch, height and width symbolic (checked at a second batch size "
                                             "and a resolution 32 larger).")
    ] = False,
    half: Annotated[
        bool, typer.Option("--half", help="Export in float16 (checked against the float32 deploy model).")
    ] = False,
    slim: Annotated[
        bool, typer.Option("--slim", help="Pass the graph through onnxslim before it is checked (extra: .[slim]).")
    ] = False,
    rtol: Annotated[
        float | None,
        typer.Option("--rtol", help="onnxruntime vs torch, relative to max |torch output|. Default: fp32 1e-4, fp16 1e-2, fp64 1e-9."),
    ] = None,
    atol: AtolOption = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the check inputs (seed, seed+1) and fusion probes.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output (atomically).")] = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Export the deploy-form model to ONNX (fusing first if needed), checked with onnxruntime."""
    from ..export.file import ExportOptions, export_file

    shape = parse_shape(input_shape)
    if shape is not None and len(shape) != 4:
        raise InputError(f"--input-shape {input_shape!r}: expected four integers N,C,H,W")
    options = ExportOptions(opset=opset, input_shape=shape, dynamic_batch=dynamic_batch, dynamic=dynamic, half=half,
                            slim=slim, rtol=rtol, atol=atol, seed=seed)
    with Activity(quiet) as activity:
        result = export_file(source, output, options, allow_pickle=allow_pickle, entry=entry, model_spec=model,
                             force=force, steps=activity)
    from ..render.text import printable

    for note in result.notes:
        stderr_console().print(printable(note), markup=False, highlight=False)
    if as_json:
        print_json(export_json(result))
    else:
        _print_export(result)
    wrote_lines([result.output] if result.written else [], as_json)
    if not result.written:
        what = "the fused model differs from its train form" if result.conversion is not None and not \
            result.conversion.ok else "onnxruntime's output differs from torch's"
        stderr_console().print(f"Error: not equivalent: {what} beyond the tolerance; nothing was written",
                        markup=False, highlight=False)
        raise typer.Exit(1)

def _print_export(result: ExportResult) -> None:
    from ..render.text import printable

    console = stdout_console()
    conversion = result.conversion
    if conversion is None:
        console.print(f"{printable(result.source)}: {result.source_form}, exported as is", highlight=False,
                      markup=False)
    else:
        line = f"{printable(result.source)}: {result.source_form}, {len(conversion.blocks)} block(s) fused"
        mc = conversion.model_check
        if mc is not None:
            line += (f"; whole model ({mc.dtype}) max abs err {mc.max_abs_err:.2e}, rel err {mc.rel_err:.2e} "
                     f"{'ok' if mc.ok else 'FAIL'}")
        console.print(line, highlight=False, markup=False)
    dynamic = " (dynamic batch, height and width)" if result.dynamic else " (dynamic batch)" if result.dynamic_batch else ""
    console.print(f"{result.exporter}, opset {result.opset}, input {tuple(result.input_shape)} {result.dtype}{dynamic}",
                  highlight=False, markup=False)
    if result.slimmed is not None:
        s = result.slimmed
        console.print(f"onnxslim {s['onnxslim']}: {s['nodes_before']} → {s['nodes_after']} nodes", highlight=False,
                      markup=False)
    for c in result.checks:
        console.print(f"onnxruntime {result.onnxruntime_version} vs torch, input {tuple(c.input_shape)} seed {c.seed}: "
                      f"max abs err {c.max_abs_err:.2e}, rel err {c.rel_err:.2e} (rtol {c.rtol:g}, atol {c.atol:g}) "
                      f"{'ok' if c.ok else 'FAIL'}", highlight=False, markup=False)
