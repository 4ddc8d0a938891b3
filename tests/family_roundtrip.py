"""The CLI round trip shared by tests/test_family_largekernel.py and tests/test_family_apple_mm.py.

A zoo module (tests/family_zoo/) gives a float32 train model with random BN statistics and
constants, the project's own deploy model and the project's own conversion (``upstream_deploy``).
Here: its state dict (or the pickled model) goes through ``repvgg convert``, the output is loaded
strictly into the deploy model, and outputs and tensors are compared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tests.helpers import invoke


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.eval()(x)
    return [out] if isinstance(out, torch.Tensor) else list(out)


def rel(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    reference, candidate = reference.double(), candidate.double()
    return float((reference - candidate).abs().max() / reference.abs().max().clamp_min(1e-30))


def worst(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    assert len(reference) == len(candidate)
    return max(rel(r, c) for r, c in zip(reference, candidate))


def probe(z, seed: int = 7) -> torch.Tensor:
    return torch.randn(*z.INPUT_SHAPE, generator=torch.Generator().manual_seed(seed))


@dataclass
class Converted:
    """One key-tree conversion through the CLI."""

    train: nn.Module
    source: Path
    state: dict[str, torch.Tensor]
    document: dict

    @property
    def families(self) -> dict[str, str]:
        return {b["name"]: b["family"] for b in self.document["blocks"]}


def convert_state_dict_file(z, folder: Path) -> Converted:
    """``repvgg convert train.pt deploy.pt --json`` on the zoo's float32 train state dict."""
    train = z.train_model()
    source, output = folder / "train.pt", folder / "deploy.pt"
    torch.save(train.state_dict(), source)
    result = invoke("convert", source, output, "--json")
    assert result.exit_code == 0, result.stderr
    return Converted(train, source, torch.load(output, weights_only=True), json.loads(result.stdout))


def convert_pickled_model(z, folder: Path) -> tuple[nn.Module, nn.Module, dict]:
    """``repvgg convert model.pt deploy.pt --allow-pickle`` on the pickled train model: (train,
    the deploy model written, the JSON document)."""
    train = z.train_model()
    source, output = folder / "model.pt", folder / "deploy_model.pt"
    torch.save(train, source)
    shape = ",".join(str(n) for n in z.INPUT_SHAPE)
    result = invoke("convert", source, output, "--allow-pickle", "--input-shape", shape, "--json")
    assert result.exit_code == 0, result.stderr
    return train, torch.load(output, weights_only=False), json.loads(result.stdout)


def inspect_families(path: Path) -> dict[str, str]:
    """``repvgg inspect --json``: block name -> family."""
    result = invoke("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["form"] == "train"
    return {b["name"]: b["family"] for b in document["blocks"]}


def assert_strict_load_and_match(z, train: nn.Module, state: dict[str, torch.Tensor]) -> float:
    """``state`` loads with ``strict=True`` into the zoo's deploy model, whose float32 outputs match
    the train model's (rel <= 1e-5); returns the worst relative error."""
    deploy = z.deploy_model()
    deploy.load_state_dict(state, strict=True)
    x = probe(z)
    err = worst(outputs(train, x), outputs(deploy, x))
    assert err <= 1e-5, err
    return err


def assert_equals_upstream(z, train: nn.Module, state: dict[str, torch.Tensor]) -> float:
    """The same keys as the project's own conversion, every tensor within rel 1e-6."""
    reference = z.upstream_deploy(train).state_dict()
    assert sorted(state) == sorted(reference)
    errors = {}
    for key, tensor in reference.items():
        if tensor.is_floating_point():
            errors[key] = rel(tensor, state[key]) if tensor.abs().max() > 0 else float((state[key] != 0).any())
        else:
            assert torch.equal(tensor, state[key]), key
    bad = {k: e for k, e in errors.items() if e > 1e-6}
    assert not bad, bad
    return max(errors.values())
