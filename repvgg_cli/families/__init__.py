"""The block families. Adding one: a new file here and one entry in :data:`FAMILIES`."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from ..errors import UnsupportedError
from .base import Block, Family, KeyView
from .official import OfficialRepVGG
from .plain import PlainBlock

FAMILIES: tuple[Family, ...] = (
    PlainBlock(),
    OfficialRepVGG(),
)


def family_by_name(name: str) -> Family:
    """The registered family called ``name``."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(name)


def find_blocks(
    state: Mapping[str, Tensor],
    bn_eps: float | None = None,
    families: tuple[Family, ...] = FAMILIES,
) -> list[Block]:
    """Every train-form block in a state dict, in key order.

    Raises:
        UnsupportedError: two blocks claim one key; a block's keys are malformed.
    """
    keys = list(state.keys())
    owner: dict[str, Block] = {}
    blocks: list[Block] = []
    for family in families:
        for prefix in family.find_prefixes(keys):
            block = family.parse_keys(KeyView(state, prefix), bn_eps)
            if block is None:
                continue
            for key in block.source_keys:
                if key in owner:
                    other = owner[key]
                    raise UnsupportedError(
                        f"key {key} is claimed by two blocks: {other.name or '<root>'} ({other.family}) "
                        f"and {block.name or '<root>'} ({block.family})"
                    )
                owner[key] = block
            blocks.append(block)
    position = {k: i for i, k in enumerate(keys)}
    blocks.sort(key=lambda b: position[b.source_keys[0]] if b.source_keys else -1)
    return blocks


__all__ = ["Block", "FAMILIES", "Family", "family_by_name", "find_blocks"]
