"""Pins of what convert writes for the bundled samples.

Reshaping the core (issue 11) must not change a single output byte. The pins in
``tests/pins/sample_outputs.json`` were taken from the code before that work began; every case
below is converted again and compared with them.

Part of an output is arithmetic whose last bits depend on the CPU's kernels: the recorded probe
outputs and errors are float64 sums whose order differs between AVX2 and AVX-512 (the tensors
are not: fusion is element-wise). So each output is pinned three ways:

* its tensors (the sha256 of each, as the file records them) and its metadata without those
  measured numbers: byte-identical everywhere;
* the measured numbers: equal to the pinned ones within float64 noise (rel 1e-9 of a value,
  abs 1e-12 of an error that is itself tiny);
* the whole file's sha256: identical wherever the measured numbers came out bit-identical (the
  machine the pins were taken on, and any with the same kernels).

Regenerate (only when an output is meant to change, and say why in the commit):
``REPVGG_WRITE_PINS=1 python -m pytest tests/test_output_pins.py``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers import SAMPLES, invoke

PINS = Path(__file__).resolve().parent / "pins" / "sample_outputs.json"
WRITE = os.environ.get("REPVGG_WRITE_PINS") == "1"

MEASURED_BLOCK_FIELDS = ("max_abs_err", "rel_err", "cast_abs_err")
MEASURED_MODEL_FIELDS = ("max_abs_err", "rel_err")


def tiny_official_repvgg() -> nn.Module:
    """The repvgg_tiny sample's train-form model, built by the test (``--model``, module tree)."""
    from tests import zoo

    return zoo.repvgg("tiny_g2", num_classes=10)


CASES: dict[str, list[str]] = {}
for _name in ("repvgg_tiny", "plain_net"):
    for _source in (f"{_name}.pt", f"{_name}_train.pt", f"{_name}.safetensors"):
        for _ext in (".safetensors", ".pt"):
            CASES[f"{_source}->{_ext}"] = [_source, _ext]
CASES["repvgg_tiny.pt->.safetensors --seed 7"] = ["repvgg_tiny.pt", ".safetensors", "--seed", "7"]
CASES["repvgg_tiny.pt->.safetensors --bn-eps 1e-3"] = ["repvgg_tiny.pt", ".safetensors", "--bn-eps", "1e-3"]
CASES["plain_net.safetensors->.pt --rtol 1e-4"] = ["plain_net.safetensors", ".pt", "--rtol", "1e-4"]
CASES["repvgg_tiny.pt->.safetensors --model"] = [
    "repvgg_tiny.pt", ".safetensors", "--model", "tests.test_output_pins:tiny_official_repvgg"]
CASES["repvgg_tiny.pt->.pt --model"] = [
    "repvgg_tiny.pt", ".pt", "--model", "tests.test_output_pins:tiny_official_repvgg"]


def _metadata_of(path: Path) -> dict:
    """The repvgg_cli metadata of an output, read with safetensors/torch directly."""
    if path.suffix == ".safetensors":
        size = struct.unpack("<Q", path.read_bytes()[:8])[0]
        header = json.loads(path.read_bytes()[8 : 8 + size])
        return json.loads(header["__metadata__"]["repvgg_cli"])
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    state = loaded if hasattr(loaded, "_metadata") else next(v for v in loaded.values() if hasattr(v, "_metadata"))
    return json.loads(state._metadata["repvgg_cli"]["json"])


def _split_measured(metadata: dict) -> tuple[dict, dict[str, float | list[float]]]:
    """The metadata without CPU-dependent numbers, and those numbers by a path-like name."""
    fixed = json.loads(json.dumps(metadata))
    measured: dict[str, float | list[float]] = {}
    for record in fixed.get("blocks", []):
        for field in MEASURED_BLOCK_FIELDS:
            measured[f"{record['name']}.{field}"] = record.pop(field)
        raw = base64.b64decode(record["probe"].pop("reference"))
        measured[f"{record['name']}.probe"] = list(struct.unpack(f"<{len(raw) // 8}d", raw))
    check = fixed.get("model_check")
    if check is not None:
        for field in MEASURED_MODEL_FIELDS:
            measured[f"model_check.{field}"] = check.pop(field)
    return fixed, measured


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _describe(path: Path) -> dict:
    metadata = _metadata_of(path)
    fixed, measured = _split_measured(metadata)
    return {
        "sha256": _sha(path.read_bytes()),
        "tensors": fixed.pop("tensors"),
        "metadata": _sha(json.dumps(fixed, sort_keys=True).encode()),
        "measured": measured,
    }


def _convert(case: str, tmp_path: Path) -> Path:
    source, ext, *options = CASES[case]
    output = tmp_path / f"out{ext}"
    result = invoke("convert", SAMPLES / source, output, *options)
    assert result.exit_code == 0, result.stderr
    return output


@pytest.fixture(scope="module")
def pins() -> dict:
    if WRITE:
        return {}
    return json.loads(PINS.read_text(encoding="utf-8"))


@pytest.fixture(scope="module", autouse=True)
def _write_pins(pins: dict):
    yield
    if WRITE:
        PINS.parent.mkdir(exist_ok=True)
        PINS.write_text(json.dumps(dict(sorted(pins.items())), indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _close(pinned: float | list[float], value: float | list[float], field: str) -> bool:
    if isinstance(pinned, list):
        return len(pinned) == len(value) and all(abs(a - b) <= 1e-9 * max(1.0, abs(a)) for a, b in zip(pinned, value))
    if pinned is None or value is None:
        return pinned == value
    return abs(pinned - value) <= 1e-12 + 1e-6 * abs(pinned)  # an error is a difference of O(1) values


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_is_pinned(case: str, pins: dict, tmp_path: Path) -> None:
    described = _describe(_convert(case, tmp_path))
    if WRITE:
        pins[case] = described
        return
    pinned = pins[case]
    assert described["tensors"] == pinned["tensors"], "a written tensor changed"
    assert described["metadata"] == pinned["metadata"], "the metadata changed"
    assert described["measured"].keys() == pinned["measured"].keys()
    off = [k for k in pinned["measured"] if not _close(pinned["measured"][k], described["measured"][k], k)]
    assert not off, f"measured numbers moved beyond float64 noise: {off[:5]}"
    if described["measured"] == pinned["measured"]:  # the same arithmetic: the very same bytes
        assert described["sha256"] == pinned["sha256"]


def test_every_case_is_pinned(pins: dict) -> None:
    if not WRITE:
        assert sorted(pins) == sorted(CASES)
