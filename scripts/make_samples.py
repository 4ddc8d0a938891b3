#!/usr/bin/env python
"""Regenerate the bundled sample checkpoints in ``sample_checkpoints/`` bit-for-bit.

Usage::

    python scripts/make_samples.py [--out DIR]

Two small networks from :mod:`repvgg_cli.zoo` are trained for a few seeded SGD steps on a fixed
synthetic dataset (so every BatchNorm carries real running statistics, not mean 0 / var 1) and
then put in eval mode:

* ``repvgg_tiny*``: the official RepVGG layout, ``zoo.repvgg("tiny_g2", num_classes=10)``
  (grouped blocks, strided blocks without identity, blocks with identity);
* ``plain_net*``: the tutorial block network, ``zoo.PlainNet()``.

For each one three files are written: a bare state dict (``<name>.pt``), a training container
(``<name>_train.pt``: ``{"model": {"module." + k: v}, "optimizer": ..., "epoch": N}``, the prefix
as DistributedDataParallel writes it) and a ``<name>.safetensors``. ``SHA256SUMS`` (sha256sum
format, sorted by name) lists them all.

Everything runs on the CPU with one thread and deterministic algorithms, so a rerun with the same
torch/safetensors versions on the same kind of CPU reproduces the files byte for byte.
``torch.save`` names the zip archive's inner folder after the file it writes, so each file is
always written under its final name.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from repvgg_cli import zoo

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "sample_checkpoints"

NUM_CLASSES = 10
IMAGE_SIZE = 32
DATASET_SIZE = 256
BATCH_SIZE = 16
EPOCHS = 2  # 2 * 256 / 16 = 32 SGD steps
DATA_SEED = 1234

# name -> (model seed, constructor)
MODELS = {
    "repvgg_tiny": (0, lambda: zoo.repvgg("tiny_g2", num_classes=NUM_CLASSES)),
    "plain_net": (1, lambda: zoo.PlainNet(num_classes=NUM_CLASSES)),
}


def _dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic dataset: images with a per-channel offset/scale, and labels."""
    g = torch.Generator().manual_seed(DATA_SEED)
    images = torch.randn(DATASET_SIZE, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    images = images * torch.tensor([0.8, 1.1, 1.3]).view(1, 3, 1, 1) + torch.tensor([0.2, -0.1, 0.4]).view(1, 3, 1, 1)
    labels = torch.randint(0, NUM_CLASSES, (DATASET_SIZE,), generator=g)
    return images, labels


def _train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.optim.Optimizer:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(DATASET_SIZE, generator=g)
        for start in range(0, DATASET_SIZE, BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(images[idx]), labels[idx])
            loss.backward()
            optimizer.step()
    model.eval()
    return optimizer


def _write_pt(obj: object, path: Path) -> None:
    # Always under the final file name: the zip's inner folder is named after it.
    torch.save(obj, path)


def build(out: Path) -> list[Path]:
    """Train both sample models and write their files into ``out``; return the paths written."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = _dataset()
    written: list[Path] = []
    for name, (seed, make) in MODELS.items():
        torch.manual_seed(seed)
        model = make()
        optimizer = _train(model, images, labels, seed)
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
