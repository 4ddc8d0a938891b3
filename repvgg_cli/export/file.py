"""``repvgg export``'s library side: :func:`export_file` exports a checkpoint's deploy model to an
ONNX graph (:mod:`.graph`), checks it in onnxruntime against torch and writes it only if it passes
(see :mod:`repvgg_cli.export`).
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..api import ConversionResult, ConvertOptions
from ..checks.model import flatten_outputs, infer_input_shape, model_dtype
from ..checks.tolerance import Tolerance, compare
from ..errors import InputError, UnsupportedError
from ..io.atomic import atomic_write, check_write_path
from ..io.read import load_checkpoint
from .graph import (
    DEFAULT_OPSET,
    EXPORTER,
    INPUT_NAME,
    SLIM_HINT,
    exporter_opsets,
    first_line,
    onnx_bytes,
    require_onnx,
    slim_graph,
    validate_graph,
    with_metadata,
)
from .model import deploy_model_from

SPATIAL_STEP = 32
"""With ``dynamic``, the second check's height and width are this much larger (a multiple of 32 keeps
every usual stride dividing the input)."""

DEFAULT_ONNX_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}
"""Default relative tolerance of onnxruntime vs torch, by the model's dtype (two float32 engines
sum in different orders, so looser than the fused-block check)."""


@dataclass(frozen=True)
class ExportOptions:
    """Options of an export.

    Attributes:
        opset: ONNX opset version.
        input_shape: the traced input ``N,C,H,W``; None: ``1, C, 224, 224`` (C from the first conv).
        dynamic_batch: make the batch dimension symbolic (checked with a second batch size).
        dynamic: make the batch, height and width symbolic (checked with a second batch size and a
            resolution :data:`SPATIAL_STEP` larger).
        half: export in float16 (checked against the float32 deploy model).
        slim: pass the graph through onnxslim before it is checked.
        rtol, atol: onnxruntime passes iff ``max_abs_err <= atol + rtol * max|torch|``; rtol None: by dtype.
        seed: seeds the check inputs (``seed``, ``seed + 1``).
        tolerance: the fusion checks' tolerance when the model is fused first.
    """

    opset: int = DEFAULT_OPSET
    input_shape: tuple[int, ...] | None = None
    dynamic_batch: bool = False
    dynamic: bool = False
    half: bool = False
    slim: bool = False
    rtol: float | None = None
    atol: float = 0.0
    seed: int = 0
    tolerance: Tolerance = field(default_factory=Tolerance)


@dataclass(frozen=True)
class OnnxCheck:
    """onnxruntime vs the torch deploy model on one seeded input."""

    seed: int
    input_shape: tuple[int, ...]
    max_abs_err: float
    scale: float
    rtol: float
    atol: float
    outputs: int = 1

    @property
    def rel_err(self) -> float:
        return self.max_abs_err / self.scale if self.scale > 0 else self.max_abs_err

    @property
    def ok(self) -> bool:
        return self.max_abs_err <= self.atol + self.rtol * self.scale


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_file` did.

    Attributes:
        source, output: the files.
        source_form: "pickled train model", "pickled deploy model", "train state dict" or "deploy state dict".
        conversion: the fusion (blocks and checks) when the model was fused here; None when it
            already was in deploy form.
        checks: onnxruntime vs torch, one per seeded input.
        opset, input_shape, dynamic_batch, dtype: as exported.
        exporter: which torch exporter made the graph.
        written: the output was written (every check passed).
        size, sha256: of the ONNX bytes (written or not).
        notes: loader notes (entry used, prefixes stripped, unpickling).
    """

    source: Path
    output: Path
    source_form: str
    conversion: ConversionResult | None
    checks: tuple[OnnxCheck, ...]
    opset: int
    input_shape: tuple[int, ...]
    dynamic_batch: bool
    dtype: str
    exporter: str
    written: bool
    size: int
    sha256: str
    onnxruntime_version: str
    notes: tuple[str, ...] = ()
    dynamic: bool = False
    half: bool = False
    slimmed: dict[str, Any] | None = None
    """With ``slim``: onnxslim's version and the graph's node count before and after."""

    @property
    def max_abs_err(self) -> float:
        return max((c.max_abs_err for c in self.checks), default=0.0)

    @property
    def rel_err(self) -> float:
        return max((c.rel_err for c in self.checks), default=0.0)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks) and (self.conversion is None or self.conversion.ok)


def check_onnx_output(output: Path, source: Path, force: bool) -> None:
    """Refuse a non-.onnx name, then what no command writes (:func:`~repvgg_cli.io.atomic.check_write_path`:
    the source, a symbolic link, a folder, a missing folder, an existing file without ``force``)."""
    if output.suffix.lower() != ".onnx":
        raise InputError(f"{output}: the output must be an .onnx file")
    check_write_path(output, [source], force)


def check_with_onnxruntime(
    onnxruntime: Any,
    data: bytes,
    model: nn.Module,
    shapes: list[tuple[int, ...]],
    options: ExportOptions,
    dtype: torch.dtype,
    graph_dtype: torch.dtype | None = None,
) -> tuple[OnnxCheck, ...]:
    """Run the graph in onnxruntime (CPU) and the torch model on the same seeded inputs.

    Args:
        dtype: the torch model's dtype.
        graph_dtype: the graph's input dtype when it differs (``half``): the input is drawn, cast to
            it for the graph, and the same rounded values go to the torch model in ``dtype``.
    Returns:
        One :class:`OnnxCheck` per shape, seeded ``seed``, ``seed + 1``, …
    """
    graph_dtype = graph_dtype or dtype
    session_options = onnxruntime.SessionOptions()
    session_options.intra_op_num_threads = torch.get_num_threads()
    session_options.log_severity_level = 3
    try:
        session = onnxruntime.InferenceSession(data, session_options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types
        raise UnsupportedError(f"onnxruntime cannot load the exported graph (opset {options.opset}): "
                               f"{first_line(error)}") from None
    rtol = options.rtol if options.rtol is not None else DEFAULT_ONNX_RTOL.get(graph_dtype, 1e-4)
    checks = []
    for i, shape in enumerate(shapes):
        seed = options.seed + i
        fed = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(graph_dtype)
        x = fed.to(dtype)
        try:
            with torch.no_grad():
                reference = [t.detach().cpu() for t in flatten_outputs(model(x))]
        except RuntimeError as error:
            raise InputError(f"the deploy model cannot run on the check input {shape}: {first_line(error)}",
                             hint="with --dynamic the second check is larger in batch and resolution; pass "
                                  "--input-shape N,C,H,W or export without --dynamic") from None
        try:
            produced = session.run(None, {INPUT_NAME: fed.numpy()})
        except Exception as error:  # noqa: BLE001
            raise UnsupportedError(f"onnxruntime failed on input {shape}: {first_line(error)}") from None
        if len(produced) != len(reference):
            raise UnsupportedError(f"the graph returns {len(produced)} tensors, torch returns {len(reference)}")
        err, scale = 0.0, 0.0
        for r, p in zip(reference, produced):
            e, s = compare(r, torch.from_numpy(p))
            err, scale = max(err, e), max(scale, s)
        checks.append(OnnxCheck(seed, tuple(shape), err, scale, rtol, options.atol, len(reference)))
    return tuple(checks)


class _NoSteps:
    def step(self, description: str, total: int | None = None) -> None:
        return None

    def advance(self, description: str | None = None) -> None:
        return None


def export_file(
    source: str | Path,
    output: str | Path,
    options: ExportOptions | None = None,
    allow_pickle: bool = False,
    entry: str | None = None,
    model_spec: str | None = None,
    force: bool = False,
    steps: Any = None,
) -> ExportResult:
    """Export a checkpoint's deploy model to ONNX, check it in onnxruntime, write it only if it passes.

    Args:
        source: a pickled model (train or deploy form; needs ``allow_pickle``), or a train or deploy
            state dict with ``model_spec``.
        output: the ``.onnx`` file; must not exist unless ``force``.
        options: opset, input shape, dynamic batch, tolerances, seed.
        allow_pickle, entry: as for loading.
        model_spec: ``MODULE:CALLABLE`` building the train-form model.
        force: replace an existing output (atomically).
        steps: where progress goes (an object with ``step(description, total=None)`` and
            ``advance()``, as :class:`repvgg_cli.bench.results.Steps`); None: nowhere.
    Returns:
        An :class:`ExportResult`; ``written`` is False when a check failed.
    Raises:
        InputError: onnx/onnxruntime missing, bad input, existing output; UnsupportedError: the
        exporter, onnx.checker or onnxruntime refused the graph.
    """
    source, output = Path(source), Path(output)
    options = options or ExportOptions()
    steps = steps or _NoSteps()
    onnx, onnxruntime = require_onnx()
    if options.slim:
        try:
            import onnxslim  # noqa: F401 - refused before any work when it is missing
        except ImportError as error:
            raise InputError(f"--slim needs onnxslim: {error}", hint=SLIM_HINT) from None
    check_onnx_output(output, source, force)
    if (options.rtol is not None and options.rtol < 0) or options.atol < 0:
        raise InputError("--rtol and --atol must not be negative")
    low, high = exporter_opsets()
    if not low <= options.opset <= high:
        raise InputError(f"--opset {options.opset}: torch {torch.__version__}'s TorchScript exporter supports "
                         f"opsets {low} to {high}")
    steps.step(f"reading {source}")
    loaded = load_checkpoint(source, allow_pickle=allow_pickle, entry=entry)
    convert_options = ConvertOptions(tolerance=options.tolerance, seed=options.seed, input_shape=options.input_shape)
    steps.step("fusing and checking (train form) or loading (deploy form)")
    model, form, conversion = deploy_model_from(loaded, model_spec, convert_options)
    model.eval()
    if options.input_shape is not None:
        shape = tuple(options.input_shape)
    else:
        try:
            shape = (1, infer_input_shape(model)[1], 224, 224)
        except ValueError as error:
            raise InputError(str(error)) from None
    dtype = model_dtype(model)
    if dtype not in (torch.float32, torch.float64, torch.float16):
        raise UnsupportedError(f"export of a {str(dtype).replace('torch.', '')} model: onnxruntime is checked "
                               "with numpy inputs, which have no such dtype", hint="cast the model to float32 first")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(options.seed), dtype=torch.float32).to(dtype)
    try:
        with torch.no_grad():
            outputs = len(flatten_outputs(model(x)))
    except RuntimeError as error:
        raise InputError(f"the deploy model cannot run on input {shape}: {first_line(error)}",
                         hint="pass --input-shape N,C,H,W") from None
    if outputs == 0:
        raise UnsupportedError("the model returns no tensor to export")
    graph_dtype = torch.float16 if options.half else dtype
    exported = copy.deepcopy(model).to(graph_dtype) if graph_dtype != dtype else model
    steps.step(f"exporting to ONNX (opset {options.opset})")
    dynamic_batch = options.dynamic_batch or options.dynamic
    data = onnx_bytes(exported, x.to(graph_dtype), options.opset, dynamic_batch, outputs,
                      dynamic_spatial=options.dynamic)
    del exported
    slimmed = None
    if options.slim:
        steps.step("slimming the graph (onnxslim)")
        data, slimmed = slim_graph(data)
    validate_graph(onnx, data)
    shapes = [shape, shape]
    if dynamic_batch:
        shapes[1] = (shape[0] + 1, *shape[1:])
    if options.dynamic:
        shapes[1] = (shape[0] + 1, shape[1], shape[2] + SPATIAL_STEP, shape[3] + SPATIAL_STEP)
    steps.step("checking the graph in onnxruntime against torch")
    checks = check_with_onnxruntime(onnxruntime, data, model, shapes, options, dtype, graph_dtype)
    metadata = {
        "repvgg_cli.version": __version__,
        "repvgg_cli.source": source.name,
        "repvgg_cli.source_sha256": loaded.sha256,
        "repvgg_cli.source_form": form,
        "repvgg_cli.dtype": str(graph_dtype).replace("torch.", ""),
        "repvgg_cli.onnxruntime_max_abs_err": repr(max(c.max_abs_err for c in checks)),
        "repvgg_cli.onnxruntime_rel_err": repr(max(c.rel_err for c in checks)),
    }
    data = with_metadata(onnx, data, metadata)
    result = ExportResult(
        source=source, output=output, source_form=form, conversion=conversion, checks=checks,
        opset=options.opset, input_shape=shape, dynamic_batch=dynamic_batch,
        dtype=str(graph_dtype).replace("torch.", ""), exporter=EXPORTER, written=False, size=len(data),
        sha256=hashlib.sha256(data).hexdigest(), onnxruntime_version=str(onnxruntime.__version__),
        notes=loaded.notes, dynamic=options.dynamic, half=options.half, slimmed=slimmed,
    )
    if not result.ok:
        return result
    atomic_write(output, lambda tmp: tmp.write_bytes(data), replace=force)  # without force: create, never replace
    return replace(result, written=True)
