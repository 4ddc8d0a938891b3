"""Generic fusion, part 2: the deploy form of a generic block, the fused conv then the traced
remainder after the sum (:func:`repvgg_cli.families.generic.read.post_module` builds that remainder).
"""

from __future__ import annotations

from torch import Tensor, nn


class GenericDeploy(nn.Module):
    """The deploy form of a generic block: the fused conv, then what followed the sum.

    Args:
        conv: the fused ``nn.Conv2d``.
        post: the traced remainder after the sum (``nn.Identity`` when nothing followed it).
    """

    def __init__(self, conv: nn.Conv2d, post: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = conv
        self.post = post if post is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.post(self.conv(x))
