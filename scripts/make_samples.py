#!/usr/bin/env python
"""Regenerate the bundled sample checkpoints in ``sample_checkpoints/`` bit-for-bit.

Usage::

    python scripts/make_samples.py [--out DIR]

Two small networks from ``tests/zoo.py`` (the clone's reference networks) are built with seeded weights, given random BN
affine parameters, and run in train mode over a fixed synthetic dataset in float64 (so every
BatchNorm carries the real running statistics of its input, not mean 0 / var 1), then rounded
to float32 and put in eval mode:

* ``repvgg_tiny*``: the official RepVGG layout, ``zoo.repvgg("tiny_g2", num_classes=10)``
  (grouped blocks, strided blocks without identity, blocks with identity);
* ``plain_net*``: the tutorial block network, ``zoo.PlainNet()``.

For each one three files are written: a bare state dict (``<name>.pt``), a training container
(``<name>_train.pt``: ``{"model": {"module." + k: v}, "optimizer": ..., "epoch": N}``, the prefix
as DistributedDataParallel writes it) and a ``<name>.safetensors``. ``SHA256SUMS`` (sha256sum
format, sorted by name) lists them all.

Everything runs on the CPU with one thread and deterministic algorithms, from ``torch.rand`` only
(drawn one value at a time on every CPU), with no gradient step, and the float64 statistics are
rounded to float32: a rerun with the same torch/safetensors versions reproduces the files byte
for byte on any x86-64 CPU (checked with ``ATEN_CPU_CAPABILITY``/``MKL_ENABLE_INSTRUCTIONS``/
``ONEDNN_MAX_CPU_ISA`` forcing AVX2, AVX512 and default kernels).
``torch.save`` names the zip archive's inner folder after the file it writes, so each file is
always written under its final name.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a clone: its tests package holds the reference networks
from tests import zoo  # noqa: E402

DEFAULT_OUT = ROOT / "sample_checkpoints"

NUM_CLASSES = 10
IMAGE_SIZE = 32
DATASET_SIZE = 256
BATCH_SIZE = 16
EPOCHS = 2  # 2 * 256 / 16 = 32 train-mode passes (BN momentum 0.1: the statistics settle)
DATA_SEED = 1234

# name -> (model seed, constructor)
MODELS = {
    "repvgg_tiny": (0, lambda: zoo.repvgg("tiny_g2", num_classes=NUM_CLASSES)),
    "plain_net": (1, lambda: zoo.PlainNet(num_classes=NUM_CLASSES)),
}


def _dataset() -> torch.Tensor:
    """A fixed synthetic dataset in float64: uniform noise with a per-channel offset and scale.

    Only ``torch.rand`` is used: its CPU kernel draws one value at a time, so it gives the same
    numbers on every CPU (``randn`` has vectorised paths that differ in the last bits).
    """
    g = torch.Generator().manual_seed(DATA_SEED)
    images = torch.rand(DATASET_SIZE, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g, dtype=torch.float64) * 2 - 1
    scale = torch.tensor([0.8, 1.1, 1.3], dtype=torch.float64).view(1, 3, 1, 1)
    offset = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64).view(1, 3, 1, 1)
    return images * scale + offset


def _init_parameters(model: nn.Module, seed: int) -> None:
    """Seeded parameters drawn in float64 and rounded to float32 (torch's own float32 init differs
    in the last bit between CPU kernels): conv and linear weights and biases uniform in
    ``±1/sqrt(fan_in)`` (PyTorch's default bound), BN affine parameters away from 1 and 0 (as
    training leaves them)."""
    g = torch.Generator().manual_seed(seed)

    def uniform(shape: torch.Size, low: float, high: float) -> torch.Tensor:
        return (torch.rand(shape, generator=g, dtype=torch.float64) * (high - low) + low).float()

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(uniform(module.weight.shape, 0.5, 1.5))
                module.bias.copy_(uniform(module.bias.shape, -0.3, 0.3))
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                module.weight.copy_(uniform(module.weight.shape, -bound, bound))
                if module.bias is not None:
                    module.bias.copy_(uniform(module.bias.shape, -bound, bound))
            elif any(True for _ in module.parameters(recurse=False)):
                raise TypeError(f"no seeded init for {type(module).__name__}")


def _collect_statistics(model: nn.Module, images: torch.Tensor) -> torch.optim.Optimizer:
    """Run the data through the model in train mode, in float64, so every BN's running statistics
    are the real statistics of its input; then round the model back to float32.

    No weight is updated: a gradient step would make the weights depend on the CPU's summation
    order. The float64 statistics differ between CPUs only in their last bits, far below float32's
    resolution, so the float32 files are the same everywhere.
    """
    model.double().train()
    with torch.no_grad():
        for _ in range(EPOCHS):
            for start in range(0, DATASET_SIZE, BATCH_SIZE):
                model(images[start : start + BATCH_SIZE])
    model.float().eval()
    # a training container holds an optimizer with its state: momentum buffers, seeded
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(DATA_SEED + 1)
    for parameter in model.parameters():
        buffer = (torch.rand(parameter.shape, generator=g, dtype=torch.float64) * 2e-3 - 1e-3).float()
        optimizer.state[parameter]["momentum_buffer"] = buffer
    return optimizer


def _write_pt(obj: object, path: Path) -> None:
    # Always under the final file name: the zip's inner folder is named after it.
    torch.save(obj, path)


def build(out: Path) -> list[Path]:
    """Train both sample models and write their files into ``out``; return the paths written."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out.mkdir(parents=True, exist_ok=True)
    images = _dataset()
    written: list[Path] = []
    for name, (seed, make) in MODELS.items():
        torch.manual_seed(seed)
        model = make()
        _init_parameters(model, seed)
        optimizer = _collect_statistics(model, images)
        sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}

        path = out / f"{name}.pt"
        _write_pt(sd, path)
        written.append(path)

        path = out / f"{name}_train.pt"
        _write_pt({"model": {"module." + k: v for k, v in sd.items()}, "optimizer": optimizer.state_dict(), "epoch": EPOCHS}, path)
        written.append(path)

        path = out / f"{name}.safetensors"
        save_file(sd, str(path))
        written.append(path)

    sums = out / "SHA256SUMS"
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in sorted(written, key=lambda p: p.name)]
    sums.write_text("".join(lines), encoding="utf-8")
    written.append(sums)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    for path in build(args.out):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
