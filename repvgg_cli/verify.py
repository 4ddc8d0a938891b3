"""``repvgg verify``: re-check a deploy file on its own (from what convert recorded in it) or
against the train-form source it came from.

The numbers come from :mod:`repvgg_cli.checks`; this module decides what to compare.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .checks.probe import check_block, fused_probe
from .checks.tolerance import (
    FLOAT64,
    BlockCheck,
    ModelCheck,
    Tolerance,
    compare,
    decode_tensor,
)
from .errors import RepvggError
from .families import find_blocks
from .fusion.sum import fuse_branches
from .fusion.values import FusedConv
from .io.metadata import TENSOR_DIGESTS, tensor_sha256


@dataclass(frozen=True)
class VerifyReport:
    """The re-check of a deploy artifact: per-block results and file-level problems."""

    blocks: tuple[BlockCheck, ...]
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    against: str | None = None
    model_check: ModelCheck | None = None

    @property
    def failures(self) -> tuple[BlockCheck, ...]:
        return tuple(b for b in self.blocks if not b.ok)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.failures and (self.model_check is None or self.model_check.ok)


def _fused_from_file(state, record: dict) -> tuple[FusedConv | None, str | None]:
    """The fused conv stored for one recorded block, or the reason it cannot be read."""
    prefix = record["deploy_prefix"]
    names = {part: f"{prefix}.{part}" if prefix else part for part in ("weight", "bias")}
    for key in names.values():
        if key not in state:
            return None, f"key {key} is missing"
        if not isinstance(state[key], Tensor) or not state[key].is_floating_point():
            return None, f"key {key} is not a floating-point tensor"
    weight, bias = state[names["weight"]], state[names["bias"]]
    groups = int(record["groups"] or 1)  # unknown groups: convert checked with 1 (the kernel does not depend on them)
    expected_w = (record["out_channels"], record["in_per_group"], *record["kernel"])
    stored = record.get("weight_shape")  # a linear layer's (out, in): the 1x1 conv it is
    if tuple(weight.shape) != tuple(stored or expected_w):
        return None, f"{names['weight']} has shape {tuple(weight.shape)}, convert wrote {tuple(stored or expected_w)}"
    if stored:
        weight = weight.reshape(expected_w)
    if tuple(bias.shape) != (record["out_channels"],):
        return None, f"{names['bias']} has shape {tuple(bias.shape)}, convert wrote ({record['out_channels']},)"
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        return None, f"{prefix or '<root>'} holds NaN or Inf"
    fused = FusedConv(
        weight=weight, bias=bias, stride=tuple(record["stride"] or (1, 1)), padding=tuple(record["padding"]),
        dilation=tuple(record["dilation"]), groups=groups, padding_mode=record.get("padding_mode", "zeros"),
    )
    return fused, None


def verify_deploy(state, metadata: dict, tolerance: Tolerance | None = None) -> VerifyReport:
    """Re-check a deploy state dict on its own, from what convert recorded in it.

    Checks structure (no train-form block left, every recorded key present with the recorded
    shape, finite values), integrity (every tensor's sha256 as written) and equivalence (the
    stored fused conv on each block's seeded probe against the recorded train-form output).

    Args:
        state: the deploy state dict.
        metadata: the ``repvgg_cli`` metadata convert wrote into the file.
        tolerance: rtol/atol (rtol None: by each block's dtype).
    Returns:
        A :class:`VerifyReport`.
    """
    tolerance = tolerance or Tolerance()
    problems: list[str] = []
    try:
        left = find_blocks(state)
    except RepvggError as error:
        left = []
        problems.append(f"a train-form block is left, and malformed: {error.message}")
    problems += [f"unfused {b.family} block left: {b.name or '<root>'}" for b in left]

    recorded_hashes: dict = metadata.get(TENSOR_DIGESTS, {})
    written = list(recorded_hashes)
    missing = [k for k in written if k not in state]
    extra = [k for k in state if k not in recorded_hashes]
    if missing:
        problems.append(f"{len(missing)} key(s) convert wrote are missing, e.g. {missing[0]}")
    if extra:
        problems.append(f"{len(extra)} key(s) convert did not write, e.g. {extra[0]}")
    block_keys: dict[str, str] = {}
    for record in metadata.get("blocks", []):
        prefix = record["deploy_prefix"]
        for part in ("weight", "bias"):
            block_keys[f"{prefix}.{part}" if prefix else part] = record["name"]
    changed = [k for k in written if k in state and isinstance(state[k], Tensor)
               and tensor_sha256(state[k]) != recorded_hashes[k]]
    for key in changed:
        if key not in block_keys:
            problems.append(f"tensor {key} differs from what convert wrote (sha256)")

    checks: list[BlockCheck] = []
    for record in metadata.get("blocks", []):
        name = record["name"]
        fused, problem = _fused_from_file(state, record)
        if fused is None:
            checks.append(BlockCheck(name, float("inf"), 0.0, tolerance.rtol_for(torch.float32), tolerance.atol,
                                     problem=problem))
            continue
        probe = record["probe"]
        reference = decode_tensor(probe["reference"], probe["shape"])
        err, scale = compare(reference, fused_probe(fused, int(probe["seed"])))
        tampered = [k for k in changed if block_keys.get(k) == name]
        checks.append(BlockCheck(
            name, err, scale, tolerance.rtol_for(fused.weight.dtype), tolerance.atol,
            problem=f"{tampered[0]} differs from what convert wrote (sha256)" if tampered else None,
        ))
    return VerifyReport(blocks=tuple(checks), problems=tuple(problems))


def verify_against(deploy_state, plan, seed: int = 0) -> VerifyReport:
    """Re-check a deploy state dict against the train-form source it came from.

    Nothing is taken from the file under test that could change the answer: the blocks, their
    eps, the training-only keys dropped and the dtype written are what the plan says (the
    source's keys read by the families with the options given, exactly as for convert); every
    block is fused again from its train-form tensors and compared with the conv stored in the
    file; every other source key must be there, equal to the source (cast as ``--dtype`` says).

    Args:
        deploy_state: the deploy file's state dict.
        plan: the find stage's plan of the train-form source (:func:`repvgg_cli.pipeline.find.find`).
        seed: seeds the probes.
    """
    options = plan.options
    tolerance = options.tolerance
    state = plan.source.state
    problems: list[str] = []
    checks: list[BlockCheck] = []
    accounted: set[str] = set()
    for block in plan.blocks:
        half = block.dtype not in (torch.float32, torch.float64)
        try:  # fused as convert fuses (float64 kept only for half precision, to measure the cast)
            fused = fuse_branches(block.branches, dtype=FLOAT64 if half else block.dtype)
        except RepvggError as error:  # name the block, as convert does
            message = error.message if error.message.startswith("block ") else f"block {block.name or '<root>'}: {error.message}"
            raise type(error)(message, error.hint) from None
        record = {
            "deploy_prefix": block.deploy_prefix, "groups": fused.groups, "out_channels": fused.out_channels,
            "in_per_group": int(fused.weight.shape[1]), "kernel": list(fused.kernel_size), "stride": list(fused.stride),
            "padding": list(fused.padding), "dilation": list(fused.dilation), "padding_mode": fused.padding_mode,
            "weight_shape": list(block.weight_shape) if block.weight_shape is not None else None,
        }
        accounted.update(block.deploy_state(fused))
        shipped, problem = _fused_from_file(deploy_state, record)
        if shipped is None:
            checks.append(BlockCheck(block.name, float("inf"), 0.0, tolerance.rtol_for(block.dtype),
                                     tolerance.atol, problem=problem))
            continue
        if shipped.weight.dtype != block.dtype:
            checks.append(BlockCheck(block.name, float("inf"), 0.0, tolerance.rtol_for(block.dtype), tolerance.atol,
                                     problem=f"{block.deploy_prefix} is {str(shipped.weight.dtype).removeprefix('torch.')}"
                                             f", the source's blocks are written as "
                                             f"{str(block.dtype).removeprefix('torch.')} (see --dtype)"))
            continue
        checks.append(check_block(block.name, block.branches, fused if half else None, shipped, seed, tolerance))
    consumed = {k for b in plan.blocks for k in b.source_keys} | set(plan.dropped)
    for key, value in state.items():
        if key in consumed:
            continue
        accounted.add(key)
        written = options.written(value) if isinstance(value, Tensor) else value
        if key not in deploy_state:
            problems.append(f"key {key} of the source is missing")
        elif not (isinstance(written, Tensor) and isinstance(deploy_state[key], Tensor)
                  and written.shape == deploy_state[key].shape and written.dtype == deploy_state[key].dtype
                  and torch.equal(written, deploy_state[key])):
            problems.append(f"key {key} differs from the source")
    extra = [k for k in deploy_state if k not in accounted]
    if extra:
        problems.append(f"{len(extra)} key(s) neither from the source nor a fused block, e.g. {extra[0]}")
    return VerifyReport(blocks=tuple(checks), problems=tuple(problems))
