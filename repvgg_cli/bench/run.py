"""Run a benchmark: load the model, time its train form, reparameterize it in place, time its
deploy form (in torch, and with ``onnx`` both forms' graphs in onnxruntime). See
:mod:`repvgg_cli.bench`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..api import ConvertOptions, reparameterize
from ..checks.model import (
    compare_outputs,
    flatten_outputs,
    infer_input_shape,
    model_dtype,
)
from ..errors import InputError
from ..export.graph import (
    DEFAULT_OPSET,
    INPUT_NAME,
    first_line,
    onnx_bytes,
    require_onnx,
)
from ..inspection import summarize
from ..io.read import LoadedCheckpoint, load_checkpoint
from ..pipeline.find import find_module_blocks
from ..pipeline.read import build_model
from .results import (
    NO_STEPS,
    BenchOptions,
    BenchResult,
    OnnxBench,
    Steps,
    Timing,
    speedup_of,
)


def check_device(device: str) -> torch.device:
    """Resolve ``cpu`` / ``cuda`` / ``cuda:N``; refuse CUDA when it is not available.

    Raises:
        InputError: an unknown device, or CUDA requested without a usable GPU.
    """
    if device != "cpu" and device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise InputError(f"--device {device!r}: use cpu or cuda (cuda:N)")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            built = "this torch build has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
            raise InputError(f"--device {device}: CUDA is not available ({built})", hint="use --device cpu")
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    return torch.device(device)


def load_model(
    path: str | Path,
    allow_pickle: bool = False,
    entry: str | None = None,
    model_spec: str | None = None,
) -> tuple[nn.Module, LoadedCheckpoint]:
    """The live model of a checkpoint: its pickled module, or ``model_spec`` built and loaded strictly.

    Args:
        path: the checkpoint.
        allow_pickle: permit full unpickling (needed for a pickled module).
        entry: container entry to use.
        model_spec: ``MODULE:CALLABLE`` building the train-form model the state dict loads into.
    Returns:
        ``(model, loaded)``.
    Raises:
        InputError: a state dict without ``model_spec`` (no model code to run).
    """
    loaded = load_checkpoint(path, allow_pickle=allow_pickle, entry=entry)
    if loaded.model is not None:
        return loaded.model, loaded
    refuse_deploy_form(loaded)
    if model_spec is None:
        raise InputError(
            f"{path} holds a state dict, not a model: there is no forward pass to run",
            hint="pass --model MODULE:CALLABLE that builds the train-form model, or a pickled model with --allow-pickle",
        )
    return build_model(model_spec, loaded.state_dict), loaded


def refuse_deploy_form(loaded: LoadedCheckpoint) -> None:
    """A state dict already in deploy form (fused blocks, no train-form block) has no train form
    to time against: say so, instead of the missing-keys error loading it into a train model gives.

    Raises:
        InputError: the checkpoint is in deploy form.
    """
    try:
        summary = summarize(loaded)
    except Exception:  # noqa: BLE001 - only a better message is at stake: loading decides the rest
        return
    if summary.form != "deploy":
        return
    by = " (written by repvgg convert)" if summary.metadata else ""
    raise InputError(
        f"{loaded.path} is already in deploy form{by}: {len(summary.deploy_blocks)} fused block(s), no train-form "
        "block, so there is no train form to time against",
        hint="bench the train-form checkpoint it was converted from",
    )


def resolve_input_shape(model: nn.Module, options: BenchOptions) -> tuple[int, ...]:
    """``options.input_shape``, else ``(batch, C, resolution, resolution)`` with C from the first conv."""
    if options.input_shape is not None:
        return tuple(options.input_shape)
    try:
        channels = infer_input_shape(model)[1]
    except ValueError as error:
        raise InputError(str(error)) from None
    return (options.batch, channels, options.resolution, options.resolution)


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@contextmanager
def _tf32_off(device: torch.device) -> Iterator[bool]:
    """On CUDA, disable TF32 for matmul and cuDNN (so both forms compute in true float32)."""
    if device.type != "cuda":
        yield False
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield True
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _synchronize(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_forward(model: nn.Module, x: Tensor, warmup: int, repeat: int, device: torch.device,
                 steps: Steps = NO_STEPS, label: str = "") -> tuple[Timing, list[Tensor]]:
    """Run ``warmup`` untimed and ``repeat`` timed forward passes; return the timings and the last output.

    Args:
        model: in eval mode, on ``device``.
        x: the input, on ``device``.
        warmup: untimed passes first.
        repeat: timed passes (each timed on its own; CUDA is synchronized around each).
        device: where it runs.
        steps: progress (one step per pass, counted outside the timed region).
        label: what is timed, for the progress display.
    Returns:
        ``(Timing, flattened output tensors of the last pass)``.
    """
    sync = _synchronize(device)
    samples: list[float] = []
    output: object = None
    steps.step(f"timing {label}: {warmup} warm-up and {repeat} timed pass(es)", total=warmup + repeat)
    with torch.inference_mode():
        for _ in range(warmup):
            output = model(x)
            steps.advance()
        sync()
        for _ in range(repeat):
            start = time.perf_counter()
            output = model(x)
            sync()
            samples.append((time.perf_counter() - start) * 1000.0)
            steps.advance()
    return Timing(tuple(samples)), [t.detach() for t in flatten_outputs(output)]


def _onnx_session(data: bytes, threads: int) -> tuple[Any, Any]:
    _, onnxruntime = require_onnx()
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return onnxruntime, onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def time_onnx(data: bytes, x: Tensor, warmup: int, repeat: int, threads: int, steps: Steps = NO_STEPS,
              label: str = "") -> tuple[Timing, list[Any]]:
    """Time an ONNX graph in onnxruntime (CPU, ``ORT_ENABLE_ALL``) as :func:`time_forward` times torch."""
    _, session = _onnx_session(data, threads)
    feed = {INPUT_NAME: x.cpu().numpy()}
    samples: list[float] = []
    output: list[Any] = []
    steps.step(f"timing {label}: {warmup} warm-up and {repeat} timed pass(es)", total=warmup + repeat)
    for _ in range(warmup):
        output = session.run(None, feed)
        steps.advance()
    for _ in range(repeat):
        start = time.perf_counter()
        output = session.run(None, feed)
        samples.append((time.perf_counter() - start) * 1000.0)
        steps.advance()
    return Timing(tuple(samples)), output


def _export_for_bench(model: nn.Module, x: Tensor, outputs: int, steps: Steps, label: str) -> bytes:
    steps.step(f"exporting the {label} to ONNX")
    return onnx_bytes(model, x, DEFAULT_OPSET, False, outputs)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (buffers such as BN statistics not counted)."""
    return sum(int(p.numel()) for p in model.parameters())


def bench_model(model: nn.Module, options: BenchOptions | None = None, steps: Steps = NO_STEPS) -> BenchResult:
    """Time the train-form model, reparameterize it in place, time the deploy form.

    The model is modified: on return it is in deploy form (``result.conversion.model``) and back
    on the CPU.

    Args:
        model: a train-form model with trained BN statistics.
        options: shape, threads, warmup/repeat, device, seed, tolerance, onnx.
        steps: where progress goes (see :class:`Steps`).
    Returns:
        A :class:`BenchResult`.
    Raises:
        InputError: bad options, no CUDA, or no train-form block (nothing to compare).
    """
    options = options or BenchOptions()
    if options.repeat < 1 or options.warmup < 0:
        raise InputError("--repeat must be at least 1 and --warmup at least 0")
    if options.onnx:
        require_onnx()
        if options.device != "cpu":
            raise InputError("--onnx times onnxruntime on the CPU: use it with --device cpu")
    if options.threads is not None and options.threads < 1:
        raise InputError("--threads must be at least 1")
    device = check_device(options.device)
    model.eval()
    if not find_module_blocks(model):
        raise InputError(
            "the model has no train-form block: it is already in deploy form (or holds no "
            "re-parameterizable block), so there is nothing to compare",
            hint="bench a train-form checkpoint; `repvgg inspect` shows what a checkpoint holds",
        )
    shape = resolve_input_shape(model, options)
    dtype = model_dtype(model)
    generator = torch.Generator().manual_seed(options.seed)
    x_cpu = torch.randn(*shape, generator=generator, dtype=torch.float32).to(dtype)
    params_train = count_parameters(model)
    check_shape = (1, *shape[1:])
    convert_options = ConvertOptions(tolerance=options.tolerance, seed=options.seed, input_shape=check_shape)
    with _torch_threads(options.threads) as threads, _tf32_off(device) as tf32_disabled:
        x = x_cpu.to(device)
        model.to(device)
        try:
            train_timing, train_out = time_forward(model, x, options.warmup, options.repeat, device, steps,
                                                   "the train form")
        except RuntimeError as error:
            raise InputError(f"the model cannot run on input {shape}: {first_line(error)}",
                             hint="pass --input-shape N,C,H,W or --resolution") from None
        train_out = [t.cpu() for t in train_out]
        model.to("cpu")  # the whole-model check builds its probe on the CPU
        train_graph = _export_for_bench(model, x_cpu, len(train_out), steps, "train form") if options.onnx else None

        def fusing(total: int) -> tuple[None, Callable[[str], None]]:
            steps.step("fusing blocks in place", total=total)
            return None, lambda name: steps.advance()

        conversion = reparameterize(model, convert_options, progress=fusing, inplace=True)  # the model timed, no copy
        deploy = conversion.model
        assert deploy is not None
        deploy.eval().to(device)
        deploy_timing, deploy_out = time_forward(deploy, x, options.warmup, options.repeat, device, steps,
                                                 "the deploy form")
        deploy_out = [t.cpu() for t in deploy_out]
        deploy.to("cpu")
        onnx = None
        if train_graph is not None:
            deploy_graph = _export_for_bench(deploy, x_cpu, len(deploy_out), steps, "deploy form")
            onnx = _bench_onnx(train_graph, deploy_graph, x_cpu, options, threads, steps)
    err, scale = compare_outputs(train_out, deploy_out)
    return BenchResult(
        input_shape=tuple(shape),
        dtype=str(dtype).replace("torch.", ""),
        device=str(device),
        threads=threads,
        warmup=options.warmup,
        repeat=options.repeat,
        train=train_timing,
        deploy=deploy_timing,
        params_train=params_train,
        params_deploy=count_parameters(deploy),
        conversion=conversion,
        timed_max_abs_err=err,
        timed_scale=scale,
        tf32_disabled=tf32_disabled,
        speedup_interval=speedup_of(train_timing, deploy_timing, options.seed),
        onnx=onnx,
        seed=options.seed,
    )


def _bench_onnx(train_graph: bytes, deploy_graph: bytes, x: Tensor, options: BenchOptions, threads: int,
                steps: Steps) -> OnnxBench:
    onnxruntime, _ = _onnx_session(deploy_graph, threads)
    train, train_out = time_onnx(train_graph, x, options.warmup, options.repeat, threads, steps,
                                 "the train form in onnxruntime")
    deploy, deploy_out = time_onnx(deploy_graph, x, options.warmup, options.repeat, threads, steps,
                                   "the deploy form in onnxruntime")
    err, scale = compare_outputs([torch.from_numpy(a) for a in train_out], [torch.from_numpy(a) for a in deploy_out])
    return OnnxBench(train=train, deploy=deploy, speedup=speedup_of(train, deploy, options.seed),
                     version=str(onnxruntime.__version__), optimization="ORT_ENABLE_ALL", opset=DEFAULT_OPSET,
                     max_abs_err=err, scale=scale)


def bench_file(
    path: str | Path,
    options: BenchOptions | None = None,
    allow_pickle: bool = False,
    entry: str | None = None,
    model_spec: str | None = None,
    steps: Steps = NO_STEPS,
) -> BenchResult:
    """Load a checkpoint's model (see :func:`load_model`) and :func:`bench_model` it.

    The device is checked before the checkpoint is read, so a missing GPU fails fast.
    """
    options = options or BenchOptions()
    check_device(options.device)
    steps.step(f"reading {path}")
    model, _ = load_model(path, allow_pickle=allow_pickle, entry=entry, model_spec=model_spec)
    return bench_model(model, options, steps)
