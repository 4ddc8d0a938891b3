"""``repvgg bench`` and ``repvgg export``: latency side by side, ONNX of the deploy model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from ..errors import InputError
from .app import app, handle_errors, print_json, stderr_console, stdout_console
from .options import AtolOption, DebugOption, EntryOption, JsonOption, ModelOption, PickleOption, RtolOption, parse_shape

if TYPE_CHECKING:
    from ..bench import BenchResult
    from ..export import ExportResult

def _ms(value: float) -> str:
    return f"{value:.3f}"

def _num(value: float) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    return value if math.isfinite(value) else None

def bench_json(result: BenchResult, source: str) -> dict[str, Any]:
    """The bench report as one JSON-ready document."""
    from ..render import model_check_json

    def timing(t) -> dict[str, Any]:
        return {"median_ms": t.median_ms, "min_ms": t.min_ms, "samples_ms": list(t.samples_ms)}

    conversion = result.conversion
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
        "params": {"train": result.params_train, "deploy": result.params_deploy},
        "blocks": result.blocks,
        "reparameterized": "in place",
        "outputs_match": result.outputs_match,
        "failed_blocks": [r.block.name for r in conversion.failures],
        "model_check": model_check_json(conversion.model_check),
        "timed_outputs": {"max_abs_err": _num(result.timed_max_abs_err), "rel_err": _num(result.timed_rel_err)},
    }

@app.command()
@handle_errors
def bench(
    checkpoint: Annotated[Path, typer.Argument(help="Train-form checkpoint: a pickled model, or a state dict with --model.")],
    allow_pickle: PickleOption = False,
    model: ModelOption = None,
    entry: EntryOption = None,
    batch: Annotated[Optional[int], typer.Option("--batch", help="Batch size (default 1).")] = None,
    resolution: Annotated[Optional[int], typer.Option("--resolution", help="Input height and width (default 224).")] = None,
    input_shape: Annotated[
        Optional[str], typer.Option("--input-shape", help="Full input shape N,C,H,W (instead of --batch/--resolution).")
    ] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch intra-op threads (default: torch's).")] = None,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed forward passes before timing each form.")] = 3,
    repeat: Annotated[int, typer.Option("--repeat", help="Timed forward passes per form; the median is reported.")] = 10,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda (cuda:N); cuda only when available.")] = "cpu",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the timed input and of the whole-model check.")] = 0,
    rtol: RtolOption = None,
    atol: AtolOption = 0.0,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Time the train-form and the deploy-form forward pass side by side (fused in place between)."""
    from ..bench import DEFAULT_RESOLUTION, BenchOptions, bench_file
    from ..verify import Tolerance

    shape = parse_shape(input_shape)
    if shape is not None and (batch is not None or resolution is not None):
        raise InputError("--input-shape gives the whole shape: do not combine it with --batch or --resolution")
    if shape is not None and len(shape) != 4:
        raise InputError(f"--input-shape {input_shape!r}: expected four integers N,C,H,W")
    if (batch is not None and batch < 1) or (resolution is not None and resolution < 1):
        raise InputError("--batch and --resolution must be at least 1")
    options = BenchOptions(
        batch=batch or 1, resolution=resolution or DEFAULT_RESOLUTION, input_shape=shape, threads=threads,
        warmup=warmup, repeat=repeat, device=device, seed=seed, tolerance=Tolerance(rtol=rtol, atol=atol),
    )
    result = bench_file(checkpoint, options, allow_pickle=allow_pickle, entry=entry, model_spec=model)
    if as_json:
        print_json(bench_json(result, str(checkpoint)))
    else:
        _print_bench(result, str(checkpoint))
    if not result.outputs_match:
        failed = [r.block.name or "<root>" for r in result.conversion.failures]
        detail = f"block(s) {', '.join(failed[:5])}" if failed else "the whole-model check"
        stderr_console().print(f"Error: not equivalent: {detail} exceed the tolerance", markup=False, highlight=False)
        raise typer.Exit(1)

def _print_bench(result: BenchResult, source: str) -> None:
    from rich.table import Table

    console = stdout_console()
    title = (f"bench {source}: input {tuple(result.input_shape)} {result.dtype} on {result.device}, "
             f"{result.threads} thread(s), median of {result.repeat} after {result.warmup} warm-up")
    console.print(title, highlight=False, markup=False)
    table = Table()
    for column in ("form", "median ms", "min ms", "parameters"):
        table.add_column(column, justify="left" if column == "form" else "right")
    table.add_row("train", _ms(result.train.median_ms), _ms(result.train.min_ms), f"{result.params_train:,}")
    table.add_row("deploy", _ms(result.deploy.median_ms), _ms(result.deploy.min_ms), f"{result.params_deploy:,}")
    console.print(table)
    console.print(f"speedup {result.speedup:.2f}x (train median / deploy median); "
                  f"{result.blocks} block(s) fused in place", highlight=False)
    mc = result.conversion.model_check
    if mc is not None:
        console.print(f"outputs match: {'yes' if result.outputs_match else 'NO'} (whole model, {mc.dtype}, input "
                      f"{tuple(mc.input_shape)}: max abs err {mc.max_abs_err:.2e}, rel err {mc.rel_err:.2e}, "
                      f"rtol {mc.rtol:g})", highlight=False)
    console.print(f"timed outputs ({result.dtype}, {result.device}): max abs diff {result.timed_max_abs_err:.2e}, "
                  f"rel {result.timed_rel_err:.2e}" + ("; TF32 off" if result.tf32_disabled else ""), highlight=False)

def export_json(result: ExportResult) -> dict[str, Any]:
    """The export report as one JSON-ready document."""
    from ..render import model_check_json

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
        Optional[str], typer.Option("--input-shape", help="Traced input N,C,H,W. Default: 1,C,224,224 (C from the first conv).")
    ] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Make the batch dimension symbolic.")] = False,
    rtol: Annotated[
        Optional[float],
        typer.Option("--rtol", help="onnxruntime vs torch, relative to max |torch output|. Default: fp32 1e-4, fp16 1e-2, fp64 1e-9."),
    ] = None,
    atol: AtolOption = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the check inputs (seed, seed+1) and fusion probes.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output (atomically).")] = False,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Export the deploy-form model to ONNX (fusing first if needed), checked with onnxruntime."""
    from ..export import ExportOptions, export_file

    shape = parse_shape(input_shape)
    if shape is not None and len(shape) != 4:
        raise InputError(f"--input-shape {input_shape!r}: expected four integers N,C,H,W")
    options = ExportOptions(opset=opset, input_shape=shape, dynamic_batch=dynamic_batch, rtol=rtol, atol=atol,
                            seed=seed)
    result = export_file(source, output, options, allow_pickle=allow_pickle, entry=entry, model_spec=model,
                         force=force)
    for note in result.notes:
        stderr_console().print(note, markup=False, highlight=False)
    if as_json:
        print_json(export_json(result))
    else:
        _print_export(result)
    if not result.written:
        what = "the fused model differs from its train form" if result.conversion is not None and not \
            result.conversion.ok else "onnxruntime's output differs from torch's"
        stderr_console().print(f"Error: not equivalent: {what} beyond the tolerance; nothing was written",
                        markup=False, highlight=False)
        raise typer.Exit(1)

def _print_export(result: ExportResult) -> None:
    console = stdout_console()
    conversion = result.conversion
    if conversion is None:
        console.print(f"{result.source}: {result.source_form}, exported as is", highlight=False, markup=False)
    else:
        line = f"{result.source}: {result.source_form}, {len(conversion.blocks)} block(s) fused"
        mc = conversion.model_check
        if mc is not None:
            line += (f"; whole model ({mc.dtype}) max abs err {mc.max_abs_err:.2e}, rel err {mc.rel_err:.2e} "
                     f"{'ok' if mc.ok else 'FAIL'}")
        console.print(line, highlight=False, markup=False)
    console.print(f"{result.exporter}, opset {result.opset}, input {tuple(result.input_shape)} {result.dtype}"
                  + (" (dynamic batch)" if result.dynamic_batch else ""), highlight=False, markup=False)
    for c in result.checks:
        console.print(f"onnxruntime {result.onnxruntime_version} vs torch, input {tuple(c.input_shape)} seed {c.seed}: "
                      f"max abs err {c.max_abs_err:.2e}, rel err {c.rel_err:.2e} (rtol {c.rtol:g}, atol {c.atol:g}) "
                      f"{'ok' if c.ok else 'FAIL'}", highlight=False, markup=False)
    if result.written:
        console.print(f"wrote {result.output} ({result.size:,} bytes)", highlight=False, markup=False)
