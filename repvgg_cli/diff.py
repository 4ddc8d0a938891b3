"""Compare checkpoints: key by key, or by what their re-parameterizable blocks compute.

Three questions, three functions, each returning dataclasses (nothing here prints):

* :func:`diff_states` — two state dicts key by key: keys only in A, only in B, and for keys in
  both their shapes, dtypes, bit identity and max abs / max rel difference.
* :func:`diff_files` — two checkpoint files. When one is a train form and the other a deploy
  form of the same model, the train side is fused with :func:`repvgg_cli.api.convert_state_dict`
  and each fused block is compared with the other file's tensors under the same deploy names
  (so a deploy file written by a project's own ``switch_to_deploy()`` — e.g. RepVGG's
  ``repvgg_model_convert`` in DingXiaoH/RepVGG ``repvgg.py``, or timm's
  ``timm.utils.reparameterize_model`` in huggingface/pytorch-image-models
  ``timm/utils/model.py`` — is checked block by block against this tool's fusion); otherwise
  key by key.
* :func:`key_diff` — what a conversion did to a state dict: per block the keys removed and
  added (shape, dtype), the keys outside blocks proven bit-identical by comparing their bytes,
  the training-only keys dropped, and bytes before → after (for the convert report).

Tolerances follow the tool's rule (see :class:`repvgg_cli.verify.Tolerance`): a tensor pair
agrees iff ``max|a - b| <= atol + rtol * scale`` with ``scale`` the largest finite ``|value|``
of either tensor; with ``rtol == atol == 0`` agreement means bit identity. A different shape or
dtype never agrees.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import InputError, RepvggError

# -- names -------------------------------------------------------------------------------------

_DIGITS = re.compile(r"(\d+)")

SHORT_DTYPES = {
    "float64": "f64", "float32": "f32", "float16": "f16", "bfloat16": "bf16", "int64": "i64",
    "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "bool",
}


def natural_key(name: str) -> tuple:
    """Sort key that orders digit runs by value: ``stages.2.9`` before ``stages.2.10``."""
    return tuple(int(part) if i % 2 else part for i, part in enumerate(_DIGITS.split(name)))


def natural_sorted(names: Iterable[str]) -> list[str]:
    """``names`` in natural order (see :func:`natural_key`)."""
    return sorted(names, key=natural_key)


def dtype_name(tensor: Tensor) -> str:
    """``float32``, ``int64``, …: the dtype without its ``torch.`` prefix."""
    return str(tensor.dtype).removeprefix("torch.")


def short_dtype(name: str) -> str:
    """``f32`` for ``float32`` and so on; unknown names unchanged."""
    return SHORT_DTYPES.get(name, name)


def shape_text(shape: Sequence[int]) -> str:
    """``[64,64,3,3]``; a scalar is ``[]``."""
    return "[" + ",".join(str(s) for s in shape) + "]"


def brace_keys(keys: Sequence[str]) -> list[str]:
    """Keys with a common parent written once: ``a.bn.{weight,bias}``; order kept, groups at
    their first member.

    Args:
        keys: full or local key names.
    Returns:
        One string per parent (a key alone under its parent stays as it is).
    """
    groups: dict[str, list[str]] = {}
    for key in keys:
        parent, _, leaf = key.rpartition(".")
        groups.setdefault(parent, []).append(leaf)
    lines = []
    for parent, leaves in groups.items():
        dot = parent + "." if parent else ""
        lines.append(dot + leaves[0] if len(leaves) == 1 else dot + "{" + ",".join(leaves) + "}")
    return lines


def _nbytes(tensor: Tensor) -> int:
    return int(tensor.numel()) * tensor.element_size()


# -- one key, one pair of tensors --------------------------------------------------------------


@dataclass(frozen=True)
class KeyEntry:
    """A key on one side only (or removed / added by a conversion)."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    @classmethod
    def of(cls, key: str, tensor: Tensor) -> KeyEntry:
        return cls(key, tuple(tensor.shape), dtype_name(tensor), _nbytes(tensor))


@dataclass(frozen=True)
class KeyComparison:
    """A key present in both checkpoints.

    Attributes:
        key: the key name.
        shape_a, shape_b, dtype_a, dtype_b: of each side.
        bit_identical: same dtype, same shape, same bytes.
        max_abs: ``max|a - b|`` in float64 (None: different shapes, or a side holds no data).
        max_rel: ``max_abs / scale``, scale the largest finite ``|value|`` of either side (None as max_abs).
        within: agrees within the tolerance it was compared with (see the module docstring).
        problem: why it cannot agree, if that is not just its values ("shape differs", …).
    """

    key: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    bit_identical: bool
    max_abs: float | None
    max_rel: float | None
    within: bool
    problem: str | None = None


def bit_identical(a: Tensor, b: Tensor) -> bool:
    """Same dtype, shape and bytes (NaNs with the same bits are identical; -0.0 is not 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.is_meta or b.is_meta:
        return False
    if a.numel() == 0:
        return True
    try:
        return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))
    except RuntimeError:  # a dtype that has no byte view (quantized, …): compare values
        return bool(torch.equal(a, b))


def _abs_difference(a: Tensor, b: Tensor) -> tuple[float, float]:
    """``(max|a - b|, scale)`` in float64; equal values (inf, NaN with NaN) differ by 0, a NaN
    against a number by inf."""
    if a.numel() == 0:
        return 0.0, 0.0
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    same = (a64 == b64) | (torch.isnan(a64) & torch.isnan(b64))
    difference = torch.where(same, torch.zeros((), dtype=torch.float64), (a64 - b64).abs())
    max_abs = float(torch.nan_to_num(difference, nan=math.inf).max())
    magnitudes = torch.cat([a64.reshape(-1).abs(), b64.reshape(-1).abs()])
    finite = magnitudes[torch.isfinite(magnitudes)]
    return max_abs, float(finite.max()) if finite.numel() else 0.0


def compare_tensors(key: str, a: Tensor, b: Tensor, rtol: float = 0.0, atol: float = 0.0) -> KeyComparison:
    """Compare one pair of tensors.

    Args:
        key: the name to report.
        a, b: the tensors.
        rtol: relative to the larger max ``|value|`` of the two; with ``atol`` 0 too, agreement
            means bit identity.
        atol: absolute tolerance added to ``rtol * scale``.
    Returns:
        A :class:`KeyComparison`.
    """
    identical = bit_identical(a, b)
    problem = None
    max_abs = max_rel = None
    scale = 0.0
    if a.is_meta or b.is_meta:
        problem = "holds no data (meta tensor): not compared"
    elif a.shape != b.shape:
        problem = "shape differs"
    elif a.is_complex() or b.is_complex():
        problem = None if identical else "complex values differ"
    else:
        max_abs, scale = _abs_difference(a, b)
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
        if a.dtype != b.dtype:
            problem = "dtype differs"
    if problem is not None or max_abs is None or (rtol == 0 and atol == 0):
        within = identical
    else:
        within = max_abs <= atol + rtol * scale
    return KeyComparison(key, tuple(a.shape), tuple(b.shape), dtype_name(a), dtype_name(b), identical,
                         max_abs, max_rel, within, problem)


# -- two state dicts, key by key ---------------------------------------------------------------


@dataclass(frozen=True)
class StateDiff:
    """Two state dicts compared key by key (every list in natural key order).

    Attributes:
        only_a: keys only in A.
        only_b: keys only in B.
        shared: every key in both, compared.
        rtol, atol: the tolerance the shared keys were compared with.
    """

    only_a: tuple[KeyEntry, ...]
    only_b: tuple[KeyEntry, ...]
    shared: tuple[KeyComparison, ...]
    rtol: float = 0.0
    atol: float = 0.0

    @property
    def different(self) -> tuple[KeyComparison, ...]:
        """Shared keys that do not agree within the tolerance."""
        return tuple(c for c in self.shared if not c.within)

    @property
    def identical_count(self) -> int:
        """Shared keys that are bit-identical."""
        return sum(c.bit_identical for c in self.shared)

    @property
    def same(self) -> bool:
        """Same keys, every one within the tolerance."""
        return not self.only_a and not self.only_b and not self.different


def diff_states(a: Mapping[str, Tensor], b: Mapping[str, Tensor], rtol: float = 0.0, atol: float = 0.0) -> StateDiff:
    """Compare two state dicts key by key.

    Args:
        a, b: the state dicts (prefixes already stripped).
        rtol, atol: tolerance of each shared key (see :func:`compare_tensors`); 0 and 0: bit identity.
    Returns:
        A :class:`StateDiff`.
    """
    if rtol < 0 or atol < 0 or math.isnan(rtol) or math.isnan(atol):
        raise InputError(f"--rtol {rtol:g} / --atol {atol:g}: tolerances must be non-negative numbers")
    only_a = tuple(KeyEntry.of(k, a[k]) for k in natural_sorted(k for k in a if k not in b))
    only_b = tuple(KeyEntry.of(k, b[k]) for k in natural_sorted(k for k in b if k not in a))
    shared = tuple(compare_tensors(k, a[k], b[k], rtol, atol) for k in natural_sorted(k for k in a if k in b))
    return StateDiff(only_a, only_b, shared, rtol, atol)


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
    from .pipeline.options import ConvertOptions

    tolerance = ConvertOptions().tolerance
    return max(tolerance.rtol_for(t.dtype) for t in tensors)


def _deploy_tensors(result: Any) -> dict[str, Tensor]:
    """A fused block's deploy entries: the family's own naming, else ``<deploy_prefix>.weight/.bias``."""
    block, fused = result.block, result.fused
    if hasattr(block, "deploy_state"):
        return dict(block.deploy_state(fused))
    prefix = block.deploy_prefix + "." if block.deploy_prefix else ""
    return {prefix + "weight": fused.weight, prefix + "bias": fused.bias}


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
        ours = _deploy_tensors(result)
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
    from .api import ConvertOptions, convert_state_dict

    try:
        result = convert_state_dict(train, ConvertOptions(bn_eps=bn_eps))
    except RepvggError as error:
        return None, f"{label} was not fused: {error.message}"
    for block in result.blocks:
        deployed = _deploy_tensors(block)
        if all(k in deploy for k in deployed) and not any(k in deploy for k in block.block.source_keys
                                                          if k not in deployed):
            return result, None
    if result.blocks and not any(k in deploy for r in result.blocks for k in r.block.source_keys):
        other = "B" if label == "A" else "A"
        example = next(iter(_deploy_tensors(result.blocks[0])), "")
        return None, (f"{label} is a train form ({len(result.blocks)} block(s)) but {other} has none of its blocks in "
                      f"either form (no {example}): compared key by key")
    return None, None


def _side(loaded: Any, role: str = "") -> CheckpointSide:
    state = loaded.state_dict
    return CheckpointSide(str(loaded.path), loaded.format, loaded.entry, len(state),
                          sum(_nbytes(t) for t in state.values()), loaded.sha256, role, tuple(loaded.notes))


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
            block_keys = {k for r in result.blocks for k in _deploy_tensors(r)}
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
    from dataclasses import replace

    from .errors import PickleRefusedError
    from .io.read import load_checkpoint

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
    from .io.read import sniff_format

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


# -- what a conversion did to a state dict -----------------------------------------------------


@dataclass(frozen=True)
class BlockKeys:
    """The keys one block removed and added (full key names, natural order)."""

    name: str
    family: str
    removed: tuple[KeyEntry, ...]
    added: tuple[KeyEntry, ...]


@dataclass(frozen=True)
class KeyDiff:
    """Source state dict → deploy state dict, as a conversion changed it.

    Attributes:
        blocks: per block, keys removed and added (a key a block both reads and writes is in both).
        unchanged: keys outside blocks present on both sides and bit-identical (compared).
        changed: keys outside blocks present on both sides that are NOT bit-identical.
        unverified: keys outside blocks whose tensor on a side holds no data (meta): not compared.
        dropped: source keys outside blocks that the deploy side lacks (training-only keys).
        added: deploy keys outside blocks that the source lacks.
        bytes_before, bytes_after: tensor bytes of the source and deploy state dicts.
    """

    blocks: tuple[BlockKeys, ...]
    unchanged: tuple[str, ...]
    changed: tuple[KeyComparison, ...]
    unverified: tuple[str, ...]
    dropped: tuple[KeyEntry, ...]
    added: tuple[KeyEntry, ...]
    bytes_before: int
    bytes_after: int

    @property
    def removed_count(self) -> int:
        return sum(len(b.removed) for b in self.blocks)

    @property
    def added_count(self) -> int:
        return sum(len(b.added) for b in self.blocks) + len(self.added)

    @property
    def totals(self) -> dict[str, int]:
        """Counts: removed, added, unchanged, changed, unverified, dropped."""
        return {"removed": self.removed_count, "added": self.added_count, "unchanged": len(self.unchanged),
                "changed": len(self.changed), "unverified": len(self.unverified), "dropped": len(self.dropped)}


def _block_of(item: Any) -> Any:
    return item.block if hasattr(item, "block") and hasattr(item, "fused") else item


def _block_deploy_keys(item: Any, source: Mapping[str, Tensor], deploy: Mapping[str, Tensor]) -> list[str]:
    """A block's deploy keys: exact from a fused result; for a bare block, the deploy keys under
    its deploy prefix that the source does not have."""
    if hasattr(item, "fused") and hasattr(item, "block"):
        return [k for k in _deploy_tensors(item) if k in deploy]
    prefix = item.deploy_prefix
    return [k for k in deploy if k not in source and (not prefix or k == prefix or k.startswith(prefix + "."))]


def key_diff(source_state: Mapping[str, Tensor], deploy_state: Mapping[str, Tensor], blocks: Sequence[Any]) -> KeyDiff:
    """What a conversion did to a state dict, key by key, with the untouched keys compared.

    Args:
        source_state: the train-form state dict (prefixes stripped).
        deploy_state: the converted state dict (in memory, or read back from the written file;
            data-free meta tensors are reported as unverified, not assumed unchanged).
        blocks: the fused blocks: ``ConversionResult.blocks`` items (``.block`` and ``.fused``:
            exact deploy keys), or bare :class:`~repvgg_cli.families.base.Block` objects (deploy
            keys: the new keys under ``deploy_prefix``).
    Returns:
        A :class:`KeyDiff` (``totals``: the counts of each list).
    """
    per_block = []
    claimed: set[str] = set()
    for item in sorted(blocks, key=lambda i: natural_key(_block_of(i).name)):
        block = _block_of(item)
        added_keys = _block_deploy_keys(item, source_state, deploy_state)
        removed_keys = [k for k in block.source_keys if k in source_state and (k not in deploy_state or k in added_keys)]
        claimed.update(block.source_keys, added_keys)
        per_block.append(BlockKeys(
            block.name, block.family,
            tuple(KeyEntry.of(k, source_state[k]) for k in natural_sorted(removed_keys)),
            tuple(KeyEntry.of(k, deploy_state[k]) for k in natural_sorted(added_keys)),
        ))
    unchanged, changed, unverified, dropped = [], [], [], []
    for key in natural_sorted(k for k in source_state if k not in claimed):
        if key not in deploy_state:
            dropped.append(KeyEntry.of(key, source_state[key]))
            continue
        before, after = source_state[key], deploy_state[key]
        if before.is_meta or after.is_meta:
            unverified.append(key)
        elif bit_identical(before, after):
            unchanged.append(key)
        else:
            changed.append(compare_tensors(key, before, after))
    added = [KeyEntry.of(k, deploy_state[k]) for k in natural_sorted(k for k in deploy_state
                                                                     if k not in claimed and k not in source_state)]
    return KeyDiff(tuple(per_block), tuple(unchanged), tuple(changed), tuple(unverified), tuple(dropped),
                   tuple(added), sum(_nbytes(t) for t in source_state.values()),
                   sum(_nbytes(t) for t in deploy_state.values()))


# -- JSON --------------------------------------------------------------------------------------


def _num(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def entry_json(entry: KeyEntry) -> dict[str, Any]:
    return {"key": entry.key, "shape": list(entry.shape), "dtype": entry.dtype}


def comparison_json(c: KeyComparison) -> dict[str, Any]:
    return {"key": c.key, "shape_a": list(c.shape_a), "shape_b": list(c.shape_b), "dtype_a": c.dtype_a,
            "dtype_b": c.dtype_b, "bit_identical": c.bit_identical, "max_abs": _num(c.max_abs),
            "max_rel": _num(c.max_rel), "within": c.within, "problem": c.problem}


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
             "max_abs": _num(b.max_abs), "max_rel": _num(b.max_rel), "rtol": b.rtol, "atol": b.atol,
             "missing": list(b.missing), "problem": b.problem, "tensors": [comparison_json(c) for c in b.tensors]}
            for b in diff.blocks
        ],
        "dropped": list(diff.dropped),
        "notes": list(diff.notes),
    }


def key_diff_json(diff: KeyDiff) -> dict[str, Any]:
    """A :class:`KeyDiff` as a JSON-ready document (for the convert report)."""
    return {
        "blocks": [{"name": b.name, "family": b.family, "removed": [entry_json(e) for e in b.removed],
                    "added": [entry_json(e) for e in b.added]} for b in diff.blocks],
        "unchanged": list(diff.unchanged),
        "changed": [comparison_json(c) for c in diff.changed],
        "unverified": list(diff.unverified),
        "dropped": [entry_json(e) for e in diff.dropped],
        "added": [entry_json(e) for e in diff.added],
        "bytes_before": diff.bytes_before,
        "bytes_after": diff.bytes_after,
        "totals": dict(diff.totals),
    }
