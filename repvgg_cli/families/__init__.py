"""The block families. Adding one: a new file here and one entry in :data:`FAMILIES`."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from ..errors import UnsupportedError
from .base import Block, Family, FamilyOptions, KeyView, join
from .official import OfficialRepVGG
from .plain import PlainBlock
from .timm_repvgg import TimmRepVggBlock
from .timm_mobileone import TimmMobileOneBlock
from .apple_mobileone import AppleMobileOneBlock
from .fastvit_large_kernel import FastVitLargeKernel
from .fastvit_repmixer import FastVitRepMixer
from .fastvit_repcpe import FastVitRepCPE
from .yolov7_repconv import Yolov7RepConv
from .ultralytics_repconv import UltralyticsRepConv
from .ultralytics_repvggdw import UltralyticsRepVGGDW
from .qarepvgg import QARepVGG
from .mmpretrain_repvgg import MmpretrainRepVGG
from .acnet import ACNetBlock

FAMILIES: tuple[Family, ...] = (
    # A family whose blocks enclose another family's (see Family.encloses) comes first.
    PlainBlock(),
    OfficialRepVGG(),
    FastVitRepMixer(),
    FastVitLargeKernel(),
    FastVitRepCPE(),
    TimmRepVggBlock(),
    TimmMobileOneBlock(),
    AppleMobileOneBlock(),
    Yolov7RepConv(),
    UltralyticsRepConv(),
    UltralyticsRepVGGDW(),
    QARepVGG(),
    MmpretrainRepVGG(),
    ACNetBlock(),
)


def family_by_name(name: str) -> Family:
    """The registered family called ``name``."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(name)


def find_blocks(
    state: Mapping[str, Tensor],
    options: FamilyOptions | None = None,
    families: tuple[Family, ...] = FAMILIES,
) -> list[Block]:
    """Every train-form block in a state dict, in key order.

    Raises:
        UnsupportedError: two blocks claim one key; a block's keys are malformed.
    """
    options = options or FamilyOptions()
    keys = list(state.keys())
    owner: dict[str, Block] = {}
    blocks: list[Block] = []
    by_name = {f.name: f for f in families}
    for family in families:
        for prefix in family.find_prefixes(keys):
            anchor = join(prefix, family.anchor)
            if anchor in owner and family.name in by_name[owner[anchor].family].encloses:
                continue  # part of an enclosing block (e.g. the MobileOne blocks inside a RepMixer)
            block = family.parse_keys(KeyView(state, prefix), options)
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


__all__ = ["Block", "FAMILIES", "Family", "FamilyOptions", "family_by_name", "find_blocks"]
