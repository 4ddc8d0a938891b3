"""What a conversion is asked to do (the options every stage reads)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..checks.tolerance import Tolerance
from ..errors import InputError
from ..families import FamilyOptions

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


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
        passthrough: globs of branch-like keys meant to stay as they are (else they are refused).
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
    passthrough: tuple[str, ...] = ()
    """Globs of keys or block prefixes that look like branches but are meant to stay unfused."""
    qa_variant: str | None = None
    """``"v1"`` or ``"v2"``: the QARepVGG block a state dict holds (None: refuse to guess)."""
    dtype: str = "keep"
    """The dtype of every floating tensor written: ``keep`` (the source's), float32, float16, bfloat16."""
    max_output_bytes: int | None = None
    """Refuse an output larger than this before any work (None: 4x the source's bytes)."""

    @property
    def target_dtype(self) -> torch.dtype | None:
        """The dtype every floating tensor is written in (None: each keeps the source's)."""
        if self.dtype == "keep":
            return None
        if self.dtype not in DTYPES:
            raise InputError(f"dtype {self.dtype!r}: use keep, float32, float16 or bfloat16")
        return DTYPES[self.dtype]

    def written_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a tensor of ``dtype`` is written in."""
        target = self.target_dtype
        return dtype if target is None or not dtype.is_floating_point else target

    def written(self, tensor: Tensor) -> Tensor:
        """``tensor`` as it is written: cast to :attr:`target_dtype` if it is floating."""
        dtype = self.written_dtype(tensor.dtype)
        return tensor if dtype == tensor.dtype else tensor.to(dtype)

    @property
    def family_options(self) -> FamilyOptions:
        return FamilyOptions(bn_eps=self.bn_eps, fold_post_bn=self.fold_post_bn, no_identity=self.no_identity,
                             avg_branch=self.avg_branch, qa_variant=self.qa_variant)
