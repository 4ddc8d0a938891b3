"""ultralytics RepVGGDW. (Not implemented yet: recognises nothing.)"""

from __future__ import annotations

from torch import nn

from .base import Block, Family, FamilyOptions, KeyView


class UltralyticsRepVGGDW(Family):
    name = "ultralytics_repvggdw"
    title = "ultralytics RepVGGDW"
    source = ""
    anchor = "\0never"
    train_keys = ""
    deploy_keys = ""

    def parse_keys(self, view: KeyView, options: FamilyOptions) -> Block | None:
        return None

    def matches_module(self, module: nn.Module) -> bool:
        return False
