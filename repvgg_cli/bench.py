"""Latency of a model's train-form forward pass against its fused deploy form, side by side.

The model is timed as it comes (train form, eval mode), then switched to its deploy form **in
place** by :func:`repvgg_cli.convert.reparameterize` (which also runs the whole-model check),
then timed again on the same input. The benchmark itself never copies the model; the
whole-model check casts a temporary float64 copy of it, one at a time, and drops it.

No printing here: :func:`bench_model` returns a frozen :class:`BenchResult`; the CLI renders it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .io.read import LoadedCheckpoint, load_checkpoint
from .convert import (
    ConversionResult,
    ConvertOptions,
    build_model,
    find_module_blocks,
    reparameterize,
)
from .errors import InputError
from .verify import Tolerance, compare_outputs, flatten_outputs, infer_input_shape

DEFAULT_RESOLUTION = 224


@dataclass(frozen=True)
class BenchOptions:
    """How to benchmark.

    Attributes:
        batch: batch size (used when ``input_shape`` is None).
        resolution: input height and width (used when ``input_shape`` is None).
        input_shape: the full input shape ``N,C,H,W``; None: ``batch, C, resolution, resolution``
            with C the first conv's input channels.
        threads: torch intra-op threads during the benchmark; None: leave torch's setting.
        warmup: untimed forward passes before timing each form.
        repeat: timed forward passes per form; the median is reported.
        device: ``cpu`` or ``cuda`` / ``cuda:N``.
        seed: seeds the timed input and the whole-model check.
        tolerance: pass/fail tolerance of the whole-model check.
    """

    batch: int = 1
    resolution: int = DEFAULT_RESOLUTION
    input_shape: tuple[int, ...] | None = None
    threads: int | None = None
    warmup: int = 3
    repeat: int = 10
    device: str = "cpu"
    seed: int = 0
    tolerance: Tolerance = field(default_factory=Tolerance)


@dataclass(frozen=True)
class Timing:
    """Per-pass wall-clock times of one form, in milliseconds."""

    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return float(statistics.median(self.samples_ms))

    @property
    def min_ms(self) -> float:
        return float(min(self.samples_ms))


@dataclass(frozen=True)
class BenchResult:
    """The benchmark of one model: both forms' latencies, parameter counts and equivalence.

    Attributes:
        input_shape: the timed input's shape.
        dtype: the model's (and input's) dtype.
        device: where the forward passes ran.
        threads: torch intra-op threads during the timing.
        warmup, repeat: as run.
        train, deploy: the latencies of each form.
        params_train, params_deploy: parameter counts of the whole model in each form.
        conversion: what reparameterize did (blocks, per-block checks, whole-model check).
        timed_max_abs_err, timed_scale: train vs deploy output of the timed input, in the model's
            own dtype on the timing device (informational; the whole-model check decides).
        tf32_disabled: on CUDA, TF32 was off for both forms.
    """

    input_shape: tuple[int, ...]
    dtype: str
    device: str
    threads: int
    warmup: int
    repeat: int
    train: Timing
    deploy: Timing
    params_train: int
    params_deploy: int
    conversion: ConversionResult
    timed_max_abs_err: float
    timed_scale: float
    tf32_disabled: bool = False

    @property
    def speedup(self) -> float:
        """Train-form median latency over deploy-form median latency."""
        return self.train.median_ms / self.deploy.median_ms if self.deploy.median_ms > 0 else float("inf")

    @property
    def timed_rel_err(self) -> float:
        return self.timed_max_abs_err / self.timed_scale if self.timed_scale > 0 else self.timed_max_abs_err

    @property
    def outputs_match(self) -> bool:
        """Every fused block passed and the whole-model check passed."""
        return self.conversion.ok

    @property
    def blocks(self) -> int:
        return len(self.conversion.blocks)


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
    if model_spec is None:
        raise InputError(
            f"{path} holds a state dict, not a model: there is no forward pass to run",
            hint="pass --model MODULE:CALLABLE that builds the train-form model, or a pickled model with --allow-pickle",
        )
    return build_model(model_spec, loaded.state_dict), loaded


def resolve_input_shape(model: nn.Module, options: BenchOptions) -> tuple[int, ...]:
    """``options.input_shape``, else ``(batch, C, resolution, resolution)`` with C from the first conv."""
    if options.input_shape is not None:
        return tuple(options.input_shape)
    try:
        channels = infer_input_shape(model)[1]
    except ValueError as error:
        raise InputError(str(error)) from None
    return (options.batch, channels, options.resolution, options.resolution)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


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


def time_forward(model: nn.Module, x: Tensor, warmup: int, repeat: int, device: torch.device) -> tuple[Timing, list[Tensor]]:
    """Run ``warmup`` untimed and ``repeat`` timed forward passes; return the timings and the last output.

    Args:
        model: in eval mode, on ``device``.
        x: the input, on ``device``.
        warmup: untimed passes first.
        repeat: timed passes (each timed on its own; CUDA is synchronized around each).
        device: where it runs.
    Returns:
        ``(Timing, flattened output tensors of the last pass)``.
    """
    sync = _synchronize(device)
    samples: list[float] = []
    output: object = None
    with torch.inference_mode():
        for _ in range(warmup):
            output = model(x)
        sync()
        for _ in range(repeat):
            start = time.perf_counter()
            output = model(x)
            sync()
            samples.append((time.perf_counter() - start) * 1000.0)
    return Timing(tuple(samples)), [t.detach() for t in flatten_outputs(output)]


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (buffers such as BN statistics not counted)."""
    return sum(int(p.numel()) for p in model.parameters())


def bench_model(model: nn.Module, options: BenchOptions | None = None) -> BenchResult:
    """Time the train-form model, reparameterize it in place, time the deploy form.

    The model is modified: on return it is in deploy form (``result.conversion.model``) and back
    on the CPU.

    Args:
        model: a train-form model with trained BN statistics.
        options: shape, threads, warmup/repeat, device, seed, tolerance.
    Returns:
        A :class:`BenchResult`.
    Raises:
        InputError: bad options, no CUDA, or no train-form block (nothing to compare).
    """
    options = options or BenchOptions()
    if options.repeat < 1 or options.warmup < 0:
        raise InputError("--repeat must be at least 1 and --warmup at least 0")
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
            train_timing, train_out = time_forward(model, x, options.warmup, options.repeat, device)
        except RuntimeError as error:
            raise InputError(f"the model cannot run on input {shape}: {_first_line(error)}",
                             hint="pass --input-shape N,C,H,W or --resolution") from None
        train_out = [t.cpu() for t in train_out]
        model.to("cpu")  # the whole-model check builds its probe on the CPU
        conversion = reparameterize(model, convert_options)
        deploy = conversion.model
        assert deploy is not None
        deploy.eval().to(device)
        deploy_timing, deploy_out = time_forward(deploy, x, options.warmup, options.repeat, device)
        deploy_out = [t.cpu() for t in deploy_out]
        deploy.to("cpu")
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
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def bench_file(
    path: str | Path,
    options: BenchOptions | None = None,
    allow_pickle: bool = False,
    entry: str | None = None,
    model_spec: str | None = None,
) -> BenchResult:
    """Load a checkpoint's model (see :func:`load_model`) and :func:`bench_model` it.

    The device is checked before the checkpoint is read, so a missing GPU fails fast.
    """
    options = options or BenchOptions()
    check_device(options.device)
    model, _ = load_model(path, allow_pickle=allow_pickle, entry=entry, model_spec=model_spec)
    return bench_model(model, options)
