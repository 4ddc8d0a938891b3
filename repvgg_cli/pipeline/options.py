"""What a conversion is asked to do (the options every stage reads)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..checks.tolerance import Tolerance
from ..families import FamilyOptions


@dataclass(frozen=True)
class ConvertOptions:
    """Options of a conversion.

    Attributes:
        bn_eps: BN eps for the key tree (a state dict does not store it); None: the family default.
        tolerance: pass/fail tolerance of the checks.
        seed: seeds every probe input.
        input_shape: whole-model probe shape (module tree); None: inferred from the first conv.
        fold_post_bn: fold a post-sum BN (QARepVGG) into the conv where nothing nonlinear sits between.
        no_identity: globs of block names without a hidden identity branch (QARepVGG key tree).
        avg_branch: globs of block names with a hidden avg-pool branch (QARepVGGBlockV2 key tree).
        fuse_conv_bn: module tree: also fold the conv→BN pairs that run in sequence.
        fsync: flush the written file to disk before renaming it into place (survives a power loss).
    """

    bn_eps: float | None = None
    tolerance: Tolerance = field(default_factory=Tolerance)
    seed: int = 0
    input_shape: tuple[int, ...] | None = None
    fold_post_bn: bool = False
    no_identity: tuple[str, ...] = ()
    avg_branch: tuple[str, ...] = ()
    fuse_conv_bn: bool = False
    fsync: bool = False

    @property
    def family_options(self) -> FamilyOptions:
        return FamilyOptions(bn_eps=self.bn_eps, fold_post_bn=self.fold_post_bn, no_identity=self.no_identity,
                             avg_branch=self.avg_branch)
