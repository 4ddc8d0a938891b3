"""The block families. Adding one: a new file here and one entry in :data:`FAMILIES`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from torch import Tensor

from ..errors import UnsupportedError
from .acnet import ACNetBlock
from .apple_fastvit import AppleRepCPE, AppleRepMixer
from .apple_mobileone import AppleMobileOneBlock
from .architectures import ARCHITECTURES, Architecture, detect_architecture
from .base import Block, Family, FamilyOptions
from .dbb import DbbConvBN, DiverseBranchBlock
from .fastvit_large_kernel import FastVitLargeKernel
from .fastvit_repcpe import FastVitRepCPE
from .fastvit_repmixer import FastVitRepMixer
from .generic.family import GenericBlock  # registered last: only what no family claims
from .keys import KeyView, join
from .mmpretrain_mobileone import MmpretrainMobileOne
from .mmpretrain_repvgg import MmpretrainRepVGG
from .official import OfficialRepVGG
from .orepa import Orepa, Orepa1x1, OrepaLargeConv, OrepaLargeConvBase, OrepaRepVGG
from .plain import PlainBlock
from .qarepvgg import QARepVGG
from .replknet import RepLKNetLargeKernel
from .timm_c_bn import TimmCBn
from .timm_efficientvim import TimmEfficientVimConv, TimmEfficientVimDwconv
from .timm_ghost import (
    TimmGhostV3Cheap,
    TimmGhostV3Dw,
    TimmGhostV3Primary,
    TimmRepGhost,
)
from .timm_iformer import TimmIformerRepCPE
from .timm_lcnetv2 import TimmLcnetV2RepDw
from .timm_mobileone import TimmMobileOneBlock
from .timm_nextvit import TimmNextVitPreBn
from .timm_pairs import (
    TimmConvNorm,
    TimmLevitConvNorm,
    TimmLevitLinearNorm,
    TimmNormLinear,
)
from .timm_repvgg import TimmRepVggBlock
from .timm_repvit import TimmRepVggDw, TimmRepVitClassifier
from .timm_shvit import TimmShvitNormLinear, TimmShvitResidual
from .ultralytics_repconv import UltralyticsRepConv
from .ultralytics_repvggdw import UltralyticsRepVGGDW
from .unclaimed import unclaimed_branches
from .unireplknet import UniRepLKNetDwconv, UniRepLKNetFfn
from .yolov6_convmodule import Yolov6ConvModule
from .yolov7_repconv import Yolov7RepConv

_DECLARED: tuple[Family, ...] = (
    # A family whose blocks enclose another family's (see Family.encloses) comes first.
    PlainBlock(),
    OfficialRepVGG(),
    FastVitRepMixer(),
    FastVitLargeKernel(),
    FastVitRepCPE(),
    AppleRepMixer(),  # encloses apple_mobileone blocks (mixer, norm)
    TimmRepVggBlock(),
    TimmMobileOneBlock(),
    AppleMobileOneBlock(),
    Yolov7RepConv(),
    UltralyticsRepConv(),
    UltralyticsRepVGGDW(),
    QARepVGG(),
    Yolov6ConvModule(),
    MmpretrainRepVGG(),
    MmpretrainMobileOne(),
    RepLKNetLargeKernel(),
    UniRepLKNetDwconv(),
    UniRepLKNetFfn(),
    AppleRepCPE(),
    ACNetBlock(),
    DiverseBranchBlock(),  # DBB, OREPA large kernels and RepVGGBlock_OREPA enclose ConvBN / OREPA blocks
    OrepaLargeConv(),
    OrepaLargeConvBase(),
    OrepaRepVGG(),
    Orepa(),
    Orepa1x1(),
    DbbConvBN(),
    # timm RepGhostNet / GhostNetV3 (timm_ghost.py; GhostNetV3 sites are matched at their children, timm_sites.py)
    TimmRepGhost(),
    TimmGhostV3Primary(),
    TimmGhostV3Cheap(),
    TimmGhostV3Dw(),
    TimmLcnetV2RepDw(),
    TimmEfficientVimDwconv(),  # only inside efficientvim, like the next (architectures.py)
    TimmEfficientVimConv(),
    TimmNextVitPreBn(),  # only inside nextvit
    # timm LeViT / EfficientViT / TinyViT pairs: only inside their architectures (see architectures.py)
    TimmLevitConvNorm(),
    TimmLevitLinearNorm(),
    TimmNormLinear(),
    TimmConvNorm(),
    # timm RepViT / SHViT / iFormer (the c/bn ConvNorm family last: the others enclose its pairs)
    TimmRepVggDw(),
    TimmRepVitClassifier(),
    TimmShvitResidual(),
    TimmShvitNormLinear(),
    TimmIformerRepCPE(),
    TimmCBn(),
)

FAMILIES: tuple[Family, ...] = (
    *_DECLARED,
    GenericBlock(others=_DECLARED),  # last: a traced block no family above claims (module tree only)
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
    if options.architecture is None:
        options = replace(options, architecture=detect_architecture(keys))
    architecture = options.architecture.name if options.architecture is not None else None
    owner: dict[str, Block] = {}
    blocks: list[Block] = []
    by_name = {f.name: f for f in families}
    for family in families:
        if family.only_in and architecture not in family.only_in:
            continue
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
            twin = next((b for b in blocks if b.name == block.name), None)
            if twin is not None:
                raise UnsupportedError(
                    f"block {block.name or '<root>'} is claimed by two families: {twin.family} "
                    f"({twin.source_keys[0] if twin.source_keys else ''}) and {block.family} "
                    f"({block.source_keys[0] if block.source_keys else ''})"
                )
            blocks.append(block)
    position = {k: i for i, k in enumerate(keys)}
    blocks.sort(key=lambda b: position[b.source_keys[0]] if b.source_keys else -1)
    return blocks


__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "Architecture",
    "Block",
    "Family",
    "FamilyOptions",
    "detect_architecture",
    "family_by_name",
    "find_blocks",
]


def unrecognised_blocks(state: Mapping[str, Tensor], claimed: set[str]) -> list[tuple[str, str]]:
    """Groups of keys no family claims that look like re-parameterization branches (see
    :func:`.unclaimed.unclaimed_branches`): convert refuses them, inspect lists them."""
    return unclaimed_branches(state, claimed)
