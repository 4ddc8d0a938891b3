"""What a benchmark is asked for and what it found: options, per-pass timings with their spread,
the speedup with its seeded bootstrap interval, the result of one model.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..api import ConversionResult
from ..checks.tolerance import Tolerance

DEFAULT_RESOLUTION = 224
BOOTSTRAP_ROUNDS = 2000
INTERVAL = 0.95


class Steps(Protocol):
    """Where progress goes (the CLI's progress display); every method may do nothing."""

    def step(self, description: str, total: int | None = None) -> None: ...

    def advance(self, description: str | None = None) -> None: ...


class _NoSteps:
    def step(self, description: str, total: int | None = None) -> None:
        return None

    def advance(self, description: str | None = None) -> None:
        return None


NO_STEPS: Steps = _NoSteps()


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
    onnx: bool = False


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return float(sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low))


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

    @property
    def max_ms(self) -> float:
        return float(max(self.samples_ms))

    @property
    def q1_ms(self) -> float:
        return _quantile(sorted(self.samples_ms), 0.25)

    @property
    def q3_ms(self) -> float:
        return _quantile(sorted(self.samples_ms), 0.75)

    @property
    def iqr_ms(self) -> float:
        """Interquartile range: the spread of the middle half of the passes."""
        return self.q3_ms - self.q1_ms


@dataclass(frozen=True)
class Speedup:
    """``slow`` median over ``fast`` median, with a bootstrap interval.

    Attributes:
        ratio: the ratio of the two medians.
        low, high: the central :data:`INTERVAL` of the ratio of medians over
            :data:`BOOTSTRAP_ROUNDS` seeded resamples (with replacement) of each form's passes.
    """

    ratio: float
    low: float
    high: float

    @property
    def conclusive(self) -> bool:
        """The interval does not include 1: one form is faster beyond the spread of the passes."""
        return not (self.low <= 1.0 <= self.high)


def speedup_of(slow: Timing, fast: Timing, seed: int = 0) -> Speedup:
    """The speedup of ``fast`` over ``slow`` with a seeded bootstrap interval (see :class:`Speedup`)."""
    ratio = slow.median_ms / fast.median_ms if fast.median_ms > 0 else float("inf")
    rng = random.Random(seed)
    a, b = list(slow.samples_ms), list(fast.samples_ms)
    ratios = []
    for _ in range(BOOTSTRAP_ROUNDS):
        num = statistics.median(rng.choices(a, k=len(a)))
        den = statistics.median(rng.choices(b, k=len(b)))
        ratios.append(num / den if den > 0 else float("inf"))
    ratios.sort()
    tail = (1.0 - INTERVAL) / 2
    return Speedup(ratio, _quantile(ratios, tail), _quantile(ratios, 1.0 - tail))


@dataclass(frozen=True)
class OnnxBench:
    """Both forms as ONNX graphs, timed in onnxruntime with every graph optimization on.

    Attributes:
        train, deploy: the latencies of each graph.
        speedup: train over deploy, with its interval.
        version: onnxruntime's version; optimization: the graph optimization level used.
        opset: the ONNX opset of both graphs.
        max_abs_err, scale: the deploy graph's output against the train graph's, same input.
    """

    train: Timing
    deploy: Timing
    speedup: Speedup
    version: str
    optimization: str
    opset: int
    max_abs_err: float
    scale: float

    @property
    def rel_err(self) -> float:
        return self.max_abs_err / self.scale if self.scale > 0 else self.max_abs_err


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
    speedup_interval: Speedup | None = None
    onnx: OnnxBench | None = None
    seed: int = 0

    @property
    def speedup(self) -> float:
        """Train-form median latency over deploy-form median latency."""
        return self.train.median_ms / self.deploy.median_ms if self.deploy.median_ms > 0 else float("inf")

    @property
    def interval(self) -> Speedup:
        """The speedup with its bootstrap interval."""
        return self.speedup_interval or speedup_of(self.train, self.deploy, self.seed)

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
