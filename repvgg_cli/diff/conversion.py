"""What a conversion did to a state dict (:func:`key_diff`): per block the keys removed and
added, the keys outside blocks proven bit-identical by comparing their bytes, the training-only
keys dropped, bytes before and after; and its JSON (for the convert report).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .compare import (
    KeyComparison,
    KeyEntry,
    bit_identical,
    compare_tensors,
    comparison_json,
    entry_json,
    natural_key,
    natural_sorted,
    nbytes,
)


def deploy_tensors(result: Any) -> dict[str, Tensor]:
    """A fused block's deploy entries: the family's own naming, else ``<deploy_prefix>.weight/.bias``."""
    block, fused = result.block, result.fused
    if hasattr(block, "deploy_state"):
        return dict(block.deploy_state(fused))
    prefix = block.deploy_prefix + "." if block.deploy_prefix else ""
    return {prefix + "weight": fused.weight, prefix + "bias": fused.bias}


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
        return [k for k in deploy_tensors(item) if k in deploy]
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
                   tuple(added), sum(nbytes(t) for t in source_state.values()),
                   sum(nbytes(t) for t in deploy_state.values()))


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
