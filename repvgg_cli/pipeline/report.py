"""Stage 6, report: what a conversion did, as one :class:`ConversionResult` (renderers print it)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..checks.tolerance import ModelCheck
from ..families import unrecognised_blocks
from .check import BlockResult
from .options import ConvertOptions
from .write import Written


@dataclass(frozen=True)
class ConversionResult:
    """The outcome of a conversion.

    Attributes:
        mode: "key tree" or "module tree".
        state_dict: the deploy state dict (data-free stand-ins where the output was streamed).
        blocks: every block's result, in order.
        model: module tree: the deploy model.
        dropped_keys: training-only keys left out.
        passthrough_keys: keys copied unchanged (key tree).
        model_check: the whole-model comparison (module tree).
        notes: what reading and the families noted.
        options: the options used.
        unrecognised: groups of keys that look like branches no family claims.
        written: a file was written.
    """

    mode: str
    state_dict: "OrderedDict[str, Tensor]"
    blocks: tuple[BlockResult, ...]
    model: nn.Module | None = None
    dropped_keys: tuple[str, ...] = ()
    passthrough_keys: int = 0
    model_check: ModelCheck | None = None
    notes: tuple[str, ...] = ()
    options: ConvertOptions = field(default_factory=ConvertOptions)
    unrecognised: tuple[tuple[str, str], ...] = ()
    written: bool = False

    @property
    def failures(self) -> tuple[BlockResult, ...]:
        return tuple(r for r in self.blocks if not r.check.ok)

    @property
    def ok(self) -> bool:
        return not self.failures and (self.model_check is None or self.model_check.ok)

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.blocks)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.blocks)


def block_notes(results: tuple[BlockResult, ...] | list[BlockResult]) -> tuple[str, ...]:
    """What families noted about individual blocks, each note once with the blocks it concerns."""
    by_note: dict[str, list[str]] = {}
    for r in results:
        for note in r.block.notes:
            by_note.setdefault(note, []).append(r.block.name or "<root>")
    return tuple(
        f"{note} ({', '.join(names[:4])}{' …' if len(names) > 4 else ''})" for note, names in by_note.items()
    )


def report(written: Written) -> ConversionResult:
    """The report stage."""
    plan = written.plan
    unrecognised = plan.unrecognised
    if plan.source.model is not None:
        unrecognised = tuple(unrecognised_blocks(written.state_dict, set()))
    return ConversionResult(
        mode=plan.mode, state_dict=written.state_dict, blocks=written.results, model=written.model,
        dropped_keys=plan.dropped, passthrough_keys=written.passthrough, model_check=written.model_check,
        notes=plan.source.notes + block_notes(written.results), options=plan.options,
        unrecognised=unrecognised, written=written.written,
    )
