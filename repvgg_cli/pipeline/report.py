"""Stage 6, report: what a conversion did, as one :class:`ConversionResult` (renderers print it)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from operator import attrgetter

from torch import Tensor, nn

from ..checks.tolerance import ModelCheck
from ..diff.compare import KeyComparison, bit_identical, compare_tensors, dtype_name
from ..diff.conversion import KeyDiff
from ..diff.conversion import key_diff as diff_keys
from ..families import unrecognised_blocks
from ..families.keys import join
from ..io.metadata import tensor_sha256
from .check import BlockResult
from .options import ConvertOptions
from .write import Written


@dataclass(frozen=True)
class KeyReport:
    """Source → output, key by key: what the conversion removed, added, kept, cast and dropped.

    Attributes:
        diff: per block (natural order of names) the keys removed (in the source's order) and
            added (in the output's); outside blocks (source order) the keys proven unchanged, the
            keys changed, those that could not be compared (``unverified``), the training-only
            keys dropped, and keys added. ``diff.changed`` never holds a cast (see :attr:`cast`).
        cast: keys outside blocks written in the dtype ``--dtype`` asked for, each proven to be
            the source tensor cast (so a cast is reported as a change, never as unchanged);
            ``max_abs`` is what the cast changed.
        proof: how unchanged keys were proven: ``"bytes"`` (the output's tensors compared with
            the source's byte for byte) or ``"sha256"`` (streamed output: the sha256 the writer
            recorded for each written tensor against the source tensor's own).
        unverified_reason: why :attr:`KeyDiff.unverified` keys could not be compared (None: none).
        source_keys, output_keys: the number of keys on each side.
    """

    diff: KeyDiff
    cast: tuple[KeyComparison, ...] = ()
    proof: str = "bytes"
    unverified_reason: str | None = None
    source_keys: int = 0
    output_keys: int = 0

    @property
    def totals(self) -> dict[str, int]:
        """Counts: removed, added, unchanged, cast, changed, unverified, dropped; keys and bytes of
        each side. ``removed + unchanged + cast + changed + unverified + dropped == source_keys``
        and ``added + unchanged + cast + changed + unverified == output_keys`` when every key is
        accounted for (see :attr:`balanced`)."""
        return {**self.diff.totals, "cast": len(self.cast), "source_keys": self.source_keys,
                "output_keys": self.output_keys, "bytes_before": self.diff.bytes_before,
                "bytes_after": self.diff.bytes_after}

    @property
    def balanced(self) -> bool:
        """Every source key and every output key is counted exactly once (see :attr:`totals`; a key
        a block reads and rewrites under the same name is one removed and one added)."""
        t = self.totals
        kept = t["unchanged"] + t["cast"] + t["changed"] + t["unverified"]
        return t["removed"] + kept + t["dropped"] == t["source_keys"] and t["added"] + kept == t["output_keys"]


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
        key_diff: source → output key by key (computed once, by the report stage).
    """

    mode: str
    state_dict: OrderedDict[str, Tensor]
    blocks: tuple[BlockResult, ...]
    model: nn.Module | None = None
    dropped_keys: tuple[str, ...] = ()
    passthrough_keys: int = 0
    model_check: ModelCheck | None = None
    notes: tuple[str, ...] = ()
    options: ConvertOptions = field(default_factory=ConvertOptions)
    unrecognised: tuple[tuple[str, str], ...] = ()
    written: bool = False
    key_diff: KeyReport | None = None

    @property
    def failures(self) -> tuple[BlockResult, ...]:
        return tuple(r for r in self.blocks if not r.check.ok)

    @property
    def ok(self) -> bool:
        return not self.failures and (self.model_check is None or self.model_check.ok)

    @property
    def eps_sensitive(self) -> tuple[tuple[str, float], ...]:
        """Blocks whose BN eps nobody decided (1e-5, PyTorch's default, was used) and whose output
        moves beyond their tolerance with 1e-3: ``(name, relative change)``."""
        return tuple((r.block.name, r.eps_sensitivity) for r in self.blocks
                     if r.eps_sensitivity is not None and r.eps_sensitivity > r.check.rtol)

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
        unrecognised=unrecognised, written=written.written, key_diff=key_report(written),
    )


# -- the key diff --------------------------------------------------------------------------------


def key_report(written: Written) -> KeyReport:
    """Source → output, key by key, with every key outside blocks compared rather than assumed.

    The source side is the source state dict where it still holds a tensor (the keys passed
    through and the training-only keys are never freed) and the write stage's stand-ins for the
    blocks' source tensors (shape and dtype, taken before they were freed); module tree, the
    model's state dict from before any block was switched. Keys outside blocks present on both
    sides are compared byte for byte; a streamed file holds data-free stand-ins, so there the
    sha256 the writer recorded for each tensor it wrote is compared with the source tensor's (or
    with its cast's, where ``--dtype`` casts it).
    """
    options = written.plan.options
    source, deploy = _source_side(written), written.state_dict
    diff = diff_keys(source, deploy, _blocks_for_diff(written))
    kept = _Kept(unchanged=list(diff.unchanged))
    for comparison in diff.changed:  # in memory: a cast is a change of its own kind, if it is exactly the cast
        kept.sort_compared(comparison, source[comparison.key], deploy[comparison.key], options)
    for key in diff.unverified:  # streamed: no data on the output side, the writer's digests instead
        kept.sort_by_digest(key, source[key], deploy[key], written.digests.get(key), options)
    reason = None
    if kept.unverified:
        reason = ("the output holds no data to compare (it was not written)" if not written.written
                  else "no tensor digest was recorded for them")
    at = {k: i for i, k in enumerate(source)}

    def in_source_order(items: list, key_of=lambda item: item) -> tuple:
        return tuple(sorted(items, key=lambda item: at.get(key_of(item), -1)))

    by_key = attrgetter("key")
    diff = replace(diff, blocks=tuple(_in_file_order(b, source, deploy) for b in diff.blocks),
                   unchanged=in_source_order(kept.unchanged), changed=in_source_order(kept.changed, by_key),
                   unverified=in_source_order(kept.unverified), dropped=in_source_order(list(diff.dropped), by_key))
    return KeyReport(diff, in_source_order(kept.cast, by_key), "sha256" if kept.by_digest else "bytes", reason,
                     len(source), len(deploy))


@dataclass
class _Kept:
    """Keys outside blocks on both sides, sorted by what the comparison proved."""

    unchanged: list[str] = field(default_factory=list)
    cast: list[KeyComparison] = field(default_factory=list)
    changed: list[KeyComparison] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    by_digest: bool = False

    def sort_compared(self, comparison: KeyComparison, source: Tensor, out: Tensor, options: ConvertOptions) -> None:
        """A key whose bytes differ: a cast if the output is exactly the source cast as asked."""
        expected = options.written(source)
        if expected.dtype != source.dtype and bit_identical(expected, out):
            self.cast.append(compare_tensors(comparison.key, source, expected))
        else:
            self.changed.append(comparison)

    def sort_by_digest(self, key: str, source: Tensor, out: Tensor, digest: str | None,
                       options: ConvertOptions) -> None:
        """A key with no data on the output side: the writer's sha256 against the source's."""
        if source.is_meta or digest is None:
            self.unverified.append(key)
            return
        self.by_digest = True
        expected = options.written(source)
        same_layout = expected.dtype == out.dtype and tuple(expected.shape) == tuple(out.shape)
        if not same_layout or tensor_sha256(expected) != digest:
            self.changed.append(_digest_mismatch(key, source, out))
        elif expected.dtype == source.dtype:
            self.unchanged.append(key)
        else:
            self.cast.append(compare_tensors(key, source, expected))


def _source_side(written: Written) -> OrderedDict[str, Tensor]:
    """The source state dict as it was, in its own order: tensors where the source still holds
    them, the write stage's stand-ins where it freed them."""
    plan = written.plan
    if plan.source.model is not None:
        return written.source_stand_ins
    state = plan.source.state or {}
    side: OrderedDict[str, Tensor] = OrderedDict()
    for key in plan.keys:
        tensor = state.get(key, written.source_stand_ins.get(key))
        if tensor is not None:
            side[key] = tensor
    return side


def _blocks_for_diff(written: Written) -> list:
    """The fused blocks; a conv→BN pair of the module tree (``--fuse-conv-bn``) names no source
    keys, so it gets its conv's and BN's (the BN's keys are removed, not dropped)."""
    pairs = {pair.name: pair for pair in written.plan.pairs}
    source = written.source_stand_ins if written.plan.source.model is not None else {}
    results = []
    for result in written.results:
        pair = pairs.get(result.block.name)
        if pair is not None and not result.block.source_keys:
            owner = pair.name[: len(pair.name) - len(pair.conv_attr)].rstrip(".")
            prefixes = tuple(join(owner, attr) + "." for attr in (pair.conv_attr, pair.bn_attr))
            keys = tuple(k for k in source if k.startswith(prefixes))
            result = replace(result, block=replace(result.block, source_keys=keys))
        results.append(result)
    return results


def _in_file_order(block, source: Mapping[str, Tensor], deploy: Mapping[str, Tensor]):
    """A block's removed keys in the source's order, its added keys in the output's."""
    source_at = {k: i for i, k in enumerate(source)}
    deploy_at = {k: i for i, k in enumerate(deploy)}
    return replace(block, removed=tuple(sorted(block.removed, key=lambda e: source_at.get(e.key, -1))),
                   added=tuple(sorted(block.added, key=lambda e: deploy_at.get(e.key, -1))))


def _digest_mismatch(key: str, source: Tensor, out: Tensor) -> KeyComparison:
    """A streamed key whose written bytes are not the source's (or its cast's): no values to
    measure, only the digests."""
    return KeyComparison(key, tuple(source.shape), tuple(out.shape), dtype_name(source), dtype_name(out),
                         bit_identical=False, max_abs=None, max_rel=None, within=False,
                         problem="the sha256 of the tensor written differs from the source tensor's")
