"""Two checkpoint files compared (:func:`diff_files`): key by key, or, when one is the train
form of the other's deploy form, block by block after fusing the train side through
:func:`repvgg_cli.api.convert_state_dict` (see :mod:`repvgg_cli.diff`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from ..api import ConvertOptions, convert_state_dict
from ..errors import InputError, PickleRefusedError, RepvggError
from ..io.read import load_checkpoint, sniff_format
from .compare import (
    KeyComparison,
    StateDiff,
    compare_tensors,
    comparison_json,
    diff_states,
    entry_json,
    finite_or_none,
    natural_key,
    natural_sorted,
    nbytes,
)
from .conversion import deploy_tensors

# -- a train form against a deploy form, block by block ----------------------------------------


@dataclass(frozen=True)
class BlockAgreement:
    """One block of the fused side against the other checkpoint's tensors under its deploy names.

    Attributes:
        name: the block (key prefix; "" for a root block).
        family: the family that fused it.
        eps_note: where its BN eps came from ("family default", "--bn-eps", …).
        tensors: its deploy keys, fused side as A, other side as B (missing keys are not here).
        missing: deploy keys the other checkpoint lacks.
        rtol, atol: the tolerance used (rtol by dtype unless given).
    """

    name: str
    family: str
    eps_note: str
    tensors: tuple[KeyComparison, ...]
    missing: tuple[str, ...]
    rtol: float
    atol: float

    @property
    def agree(self) -> bool:
        return not self.missing and bool(self.tensors) and all(c.within for c in self.tensors)

    @property
    def max_abs(self) -> float | None:
        values = [c.max_abs for c in self.tensors if c.max_abs is not None]
        return max(values) if values else None

    @property
    def max_rel(self) -> float | None:
        """The largest per-tensor relative difference (each to its own max ``|value|``)."""
        values = [c.max_rel for c in self.tensors if c.max_rel is not None]
        return max(values) if values else None

    @property
    def problem(self) -> str | None:
        if self.missing:
            return "missing in the other file: " + ", ".join(self.missing)
        problems = [f"{c.key}: {c.problem}" for c in self.tensors if c.problem]
        return "; ".join(problems) or None


def _default_rtol(*tensors: Tensor) -> float:
    """The tool's default rtol for the least precise of ``tensors`` (fp32 1e-5, fp16 4e-3, …)."""
    tolerance = ConvertOptions().tolerance
    return max(tolerance.rtol_for(t.dtype) for t in tensors)


def compare_blocks(results: Sequence[Any], other: Mapping[str, Tensor], rtol: float | None = None,
                   atol: float = 0.0) -> tuple[BlockAgreement, ...]:
    """Compare each fused block with ``other``'s tensors under the same deploy names.

    Args:
        results: fused blocks (``ConversionResult.blocks``: each with ``.block`` and ``.fused``).
        other: the deploy state dict to check.
        rtol: relative tolerance per tensor (to its own max ``|value|``); None: the tool's
            default for the dtype (fp32 1e-5, fp16 4e-3, bf16 3e-2, fp64 1e-9).
        atol: absolute tolerance.
    Returns:
        One :class:`BlockAgreement` per block, in natural order of block names.
    """
    agreements = []
    for result in sorted(results, key=lambda r: natural_key(r.block.name)):
        ours = deploy_tensors(result)
        present = [k for k in ours if k in other]
        block_rtol = rtol if rtol is not None else _default_rtol(*ours.values(), *(other[k] for k in present))
        tensors = tuple(compare_tensors(k, ours[k], other[k], block_rtol, atol) for k in natural_sorted(present))
        missing = tuple(natural_sorted(k for k in ours if k not in other))
        agreements.append(BlockAgreement(result.block.name, result.block.family, getattr(result.block, "eps_note", ""),
                                         tensors, missing, block_rtol, atol))
    return tuple(agreements)


@dataclass(frozen=True)
class CheckpointSide:
    """One of the two files as read.

    Attributes:
        path: as given.
        format: "safetensors", "torch-zip" or "torch-legacy".
        entry: the container entry used (None: the file is the state dict itself).
        keys: number of tensors.
        nbytes: bytes of tensor data.
        sha256: the file's digest.
        role: "train (fused here)", "deploy" or "" (key-by-key comparison).
        notes: what loading said (entry chosen, prefixes stripped).
    """

    path: str
    format: str
    entry: str | None
    keys: int
    nbytes: int
    sha256: str
    role: str = ""
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class FileDiff:
    """Two checkpoints compared.

    Attributes:
        a, b: the files.
        mode: "keys" (key by key) or "fused" (one side fused, blocks compared by what they compute).
        fused_side: "A" or "B" in fused mode, else None.
        keys: the key-by-key comparison; in fused mode of the keys outside fused blocks
            (fused side after fusion against the other side).
        blocks: in fused mode, each fused block against the other side.
        dropped: in fused mode, training-only keys the fusion dropped from the fused side.
        notes: why the comparison took the form it did, and anything else worth saying.
    """

    a: CheckpointSide
    b: CheckpointSide
    mode: str
    keys: StateDiff
    fused_side: str | None = None
    blocks: tuple[BlockAgreement, ...] = ()
    dropped: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    block_rtol: float | None = None
    block_atol: float = 0.0

    @property
    def disagreeing_blocks(self) -> tuple[BlockAgreement, ...]:
        return tuple(b for b in self.blocks if not b.agree)

    @property
    def same(self) -> bool:
        """Exit 0: every key (and in fused mode every block) agrees within its tolerance."""
        return self.keys.same and not self.disagreeing_blocks


def _fused_against(train: Mapping[str, Tensor], deploy: Mapping[str, Tensor], bn_eps: float | None,
                   label: str) -> tuple[Any | None, str | None]:
    """Fuse ``train`` if it is the train form of what ``deploy`` holds: at least one of its blocks
    has every deploy key in ``deploy`` and none of its train keys there. Returns the conversion
    (None: not this way round) and a note on why not, when that is worth saying."""
    try:
        result = convert_state_dict(train, ConvertOptions(bn_eps=bn_eps))
    except RepvggError as error:
        return None, f"{label} was not fused: {error.message}"
    for block in result.blocks:
        deployed = deploy_tensors(block)
        if all(k in deploy for k in deployed) and not any(k in deploy for k in block.block.source_keys
                                                          if k not in deployed):
            return result, None
    if result.blocks and not any(k in deploy for r in result.blocks for k in r.block.source_keys):
        other = "B" if label == "A" else "A"
        example = next(iter(deploy_tensors(result.blocks[0])), "")
        return None, (f"{label} is a train form ({len(result.blocks)} block(s)) but {other} has none of its blocks in "
                      f"either form (no {example}): compared key by key")
    return None, None


def _side(loaded: Any, role: str = "") -> CheckpointSide:
    state = loaded.state_dict
    return CheckpointSide(str(loaded.path), loaded.format, loaded.entry, len(state),
                          sum(nbytes(t) for t in state.values()), loaded.sha256, role, tuple(loaded.notes))


def diff_loaded(a: Any, b: Any, rtol: float | None = None, atol: float = 0.0, bn_eps: float | None = None,
                fuse: bool = True) -> FileDiff:
    """Compare two loaded checkpoints (:class:`repvgg_cli.io.read.LoadedCheckpoint`).

    Args:
        a, b: the checkpoints.
        rtol: None: keys bit-identical (0), fused blocks by dtype (fp32 1e-5); else both.
        atol: absolute tolerance of keys and blocks.
        bn_eps: BN eps for fusing a train-form side (None: the family default).
        fuse: try fusing a train-form side against a deploy-form other side (False: keys only).
    Returns:
        A :class:`FileDiff`.
    """
    key_rtol = 0.0 if rtol is None else rtol
    sa, sb = a.state_dict, b.state_dict
    notes: list[str] = []
    if fuse and set(sa) != set(sb):
        for label, train, deploy in (("A", sa, sb), ("B", sb, sa)):
            result, note = _fused_against(train, deploy, bn_eps, label)
            if note:
                notes.append(note)
            if result is None:
                continue
            block_keys = {k for r in result.blocks for k in deploy_tensors(r)}
            fused_rest = {k: v for k, v in result.state_dict.items() if k not in block_keys}
            other_rest = {k: v for k, v in deploy.items() if k not in block_keys}
            if label == "A":
                keys = diff_states(fused_rest, other_rest, key_rtol, atol)
                sides = (_side(a, "train (fused here)"), _side(b, "deploy"))
            else:
                keys = diff_states(other_rest, fused_rest, key_rtol, atol)
                sides = (_side(a, "deploy"), _side(b, "train (fused here)"))
            failed = [r.block.name or "<root>" for r in result.blocks if not getattr(getattr(r, "check", None), "ok", True)]
            if failed:
                notes.append(f"this tool's own check failed for block(s) {', '.join(failed)} of {label}")
            notes.extend(result.notes)
            return FileDiff(*sides, mode="fused", keys=keys, fused_side=label,
                            blocks=compare_blocks(result.blocks, deploy, rtol, atol),
                            dropped=tuple(natural_sorted(result.dropped_keys)), notes=tuple(notes),
                            block_rtol=rtol, block_atol=atol)
    return FileDiff(_side(a), _side(b), mode="keys", keys=diff_states(sa, sb, key_rtol, atol), notes=tuple(notes))


def _load_side(path: str | os.PathLike, fmt: str, entry: str | None, allow_pickle: bool) -> tuple[Any, bool]:
    """Load one file; ``entry`` applies to a torch container, a plain state dict is used as it is
    (noted). Returns the checkpoint and whether ``entry`` was used."""
    if entry is None or fmt == "safetensors":
        return load_checkpoint(path, allow_pickle=allow_pickle), False
    try:
        return load_checkpoint(path, allow_pickle=allow_pickle, entry=entry), True
    except PickleRefusedError:
        raise
    except InputError:
        plain = load_checkpoint(path, allow_pickle=allow_pickle)
        if plain.entry is not None or plain.container_keys:  # a container without that entry: say so
            raise
    note = f"--entry {entry} not used: the file is a plain state dict"
    return replace(plain, notes=(*plain.notes, note)), False


def diff_files(a_path: str | os.PathLike, b_path: str | os.PathLike, rtol: float | None = None, atol: float = 0.0,
               bn_eps: float | None = None, allow_pickle: bool = False, entry: str | None = None,
               fuse: bool = True) -> FileDiff:
    """Read two checkpoints the way every command does and compare them (see :func:`diff_loaded`).

    Args:
        a_path, b_path: any supported checkpoint files.
        rtol, atol, bn_eps, fuse: as for :func:`diff_loaded`.
        allow_pickle: permit full unpickling of both files (only for trusted files).
        entry: the container entry of each torch container; a safetensors file or a plain state
            dict has none and is used as it is. An error when neither file has one.
    Returns:
        A :class:`FileDiff`.
    Raises:
        InputError: a file is unreadable or holds no state dict, a container lacks ``entry``;
        PickleRefusedError: needs --allow-pickle.
    """
    paths = (a_path, b_path)
    sides = [_load_side(p, sniff_format(p), entry, allow_pickle) for p in paths]
    if entry is not None and not any(used for _, used in sides):
        raise InputError(f"--entry {entry}: neither {a_path} nor {b_path} is a container with entries",
                         hint="drop --entry: both files are state dicts already")
    return diff_loaded(sides[0][0], sides[1][0], rtol=rtol, atol=atol, bn_eps=bn_eps, fuse=fuse)


def summary_line(diff: FileDiff) -> str:
    """One sentence: identical or not, and the numbers that say why."""
    keys = diff.keys
    rest = []
    if keys.only_a:
        rest.append(f"{len(keys.only_a)} key(s) only in A")
    if keys.only_b:
        rest.append(f"{len(keys.only_b)} key(s) only in B")
    if keys.different:
        worst = max(keys.different, key=lambda c: (c.max_abs is not None, c.max_abs or 0.0))
        size = f", largest at {worst.key}: max abs {format_number(worst.max_abs)}" if worst.max_abs is not None else ""
        rest.append(f"{len(keys.different)} of {len(keys.shared)} shared key(s) differ{size}")
    tolerance = ("bit-identical" if keys.rtol == 0 and keys.atol == 0
                 else f"within rtol {keys.rtol:g}, atol {keys.atol:g}")
    if diff.mode == "fused":
        fused, other = diff.fused_side, "B" if diff.fused_side == "A" else "A"
        bad = diff.disagreeing_blocks
        worst_rel = max((b.max_rel for b in diff.blocks if b.max_rel is not None), default=None)
        rtols = sorted({b.rtol for b in diff.blocks})
        rtol_text = "rtol " + "/".join(f"{r:g}" for r in rtols)
        numbers = f"{rtol_text}, max rel {format_number(worst_rel)}"
        if bad:
            names = [b.name or "<root>" for b in bad]
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            blocks = f"{len(bad)} of {len(diff.blocks)} fused block(s) of {fused} differ from {other} ({shown}; {numbers})"
        else:
            blocks = f"all {len(diff.blocks)} fused block(s) of {fused} agree with {other} ({numbers})"
        others = f"{len(keys.shared) - len(keys.different)} other key(s) {tolerance}"
        verdict = "Agree" if diff.same else "Differ"
        return f"{verdict}: {blocks}; {others}" + ("; " + "; ".join(rest) if rest else "") + "."
    if diff.same:
        identical = keys.identical_count
        detail = "" if identical == len(keys.shared) else f" ({identical} bit-identical)"
        return f"Identical: {len(keys.shared)} key(s) {tolerance}{detail}."
    return "Different: " + "; ".join(rest) + "."


def format_number(value: float | None) -> str:
    """``1.0e-05``; zero ``0``, None ``-``, infinity ``inf``."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return "inf" if math.isinf(value) else f"{value:.1e}"


def file_diff_json(diff: FileDiff) -> dict[str, Any]:
    """The ``repvgg diff --json`` document (JSON has no inf/NaN: such numbers are null)."""

    def side(s: CheckpointSide) -> dict[str, Any]:
        return {"path": s.path, "format": s.format, "entry": s.entry, "keys": s.keys, "bytes": s.nbytes,
                "sha256": s.sha256, "role": s.role or None, "notes": list(s.notes)}

    return {
        "command": "diff",
        "a": side(diff.a),
        "b": side(diff.b),
        "mode": diff.mode,
        "fused_side": diff.fused_side,
        "same": diff.same,
        "summary": summary_line(diff),
        "rtol": diff.keys.rtol,
        "atol": diff.keys.atol,
        "only_in_a": [entry_json(e) for e in diff.keys.only_a],
        "only_in_b": [entry_json(e) for e in diff.keys.only_b],
        "shared": [comparison_json(c) for c in diff.keys.shared],
        "blocks": [
            {"name": b.name, "family": b.family, "eps_note": b.eps_note, "agree": b.agree,
             "max_abs": finite_or_none(b.max_abs), "max_rel": finite_or_none(b.max_rel), "rtol": b.rtol, "atol": b.atol,
             "missing": list(b.missing), "problem": b.problem, "tensors": [comparison_json(c) for c in b.tensors]}
            for b in diff.blocks
        ],
        "dropped": list(diff.dropped),
        "notes": list(diff.notes),
    }
