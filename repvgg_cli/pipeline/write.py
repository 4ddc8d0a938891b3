"""Stage 5, write: drive the checked blocks into a deploy state dict, a model, or a file.

:func:`write` iterates the check stage's results (so it is what makes fusion and checking run) and
puts each block where its :class:`Target` says:

* :class:`Memory`: the deploy state dict (key tree: in the source's key order, every other key the
  very same tensor) or the switched model, for the library;
* :class:`File`: a checkpoint on disk, only if every check passes. A state dict into
  ``.safetensors`` is streamed: the file's layout is planned before the first block is fused, each
  chunk of a fused weight goes to a writer thread as soon as it is computed (two weight buffers are
  reused from block to block), unchanged tensors are queued first, the header with the metadata
  comes last, and a failed check removes the temporary file. Everything else is built in memory and
  saved (``torch.save`` cannot stream). Either way the file appears atomically.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checks.tolerance import ModelCheck
from ..families import Block
from ..fusion.values import FusedConv, as_meta, map_branch_tensors
from ..io import write as io_write
from ..io.limits import check_output_size, check_safetensors_limits
from ..io.metadata import METADATA_KEY, TENSOR_DIGESTS, metadata_json, tensor_digests
from ..io.read import LoadedCheckpoint
from ..io.safetensors_file import SafetensorsStream
from .check import BlockResult, Checked
from .find import Plan
from .fuse import RowSink, planned_weight_shape
from .metadata import build_metadata, metadata_reserve

Progress = Callable[[int], tuple[object, Callable[[str], None]]]
"""``total -> (context manager or None, advance(block_name))``: how callers show progress."""


@dataclass(frozen=True)
class Memory:
    """Keep the deploy form in memory (the library's :func:`~repvgg_cli.api.convert_state_dict`
    and :func:`~repvgg_cli.api.reparameterize`)."""


@dataclass(frozen=True)
class File:
    """Write the deploy checkpoint to ``output`` (its extension picks the format), only if every
    check passes; the source file's name, hash, entry and container go into it."""

    output: Path
    loaded: LoadedCheckpoint
    fsync: bool = False


Target = Memory | File


@dataclass
class Written:
    """The write stage's output.

    Attributes:
        plan: the plan.
        results: every block's result (tensors of a streamed output replaced by data-free stand-ins).
        state_dict: the deploy state dict (streamed: data-free stand-ins of what was written).
        model: module tree: the deploy model.
        model_check: the whole-model comparison (module tree).
        written: the file was written (a :class:`File` target whose checks all passed).
    """

    plan: Plan
    results: tuple[BlockResult, ...]
    state_dict: OrderedDict[str, Tensor]
    model: nn.Module | None = None
    model_check: ModelCheck | None = None
    written: bool = False
    passthrough: int = 0
    extra_notes: tuple[str, ...] = field(default_factory=tuple)
    source_stand_ins: OrderedDict[str, Tensor] = field(default_factory=OrderedDict)
    """The source keys the report's key diff cannot read once blocks are fused (see :func:`source_stand_ins`)."""
    digests: dict[str, str] = field(default_factory=dict)
    """Streamed file: ``{key: sha256}`` of every tensor as the writer wrote it (the metadata's tensor digests)."""

    @property
    def ok(self) -> bool:
        return all(r.check.ok for r in self.results) and (self.model_check is None or self.model_check.ok)


def write(checked: Checked, target: Target, progress: Progress | None = None) -> Written:
    """The write stage (see the module docstring)."""
    plan = checked.fused.plan
    if isinstance(target, File) and plan.source.model is None:
        _check_budget(plan, target)  # before anything is fused or allocated
    stand_ins = source_stand_ins(plan)  # before any block's source tensors are freed or switched
    if isinstance(target, File) and plan.source.model is None and target.output.suffix == ".safetensors":
        written = _stream(checked, target, progress)
        written.source_stand_ins = stand_ins
        return written
    written = _in_memory(checked, progress)
    written.source_stand_ins = stand_ins
    if isinstance(target, File) and written.ok:
        _save(written, target)
        written.written = True
    return written


def source_stand_ins(plan: Plan) -> OrderedDict[str, Tensor]:
    """What the report's key diff needs of the source tensors the conversion frees or replaces:
    key tree, a data-free stand-in (shape, dtype) of every block's source tensor (every other key
    stays in the source); module tree, the model's state dict before any block is switched (the
    same tensors, so the keys passed through can be compared with the output's)."""
    if plan.source.model is not None:
        return OrderedDict((k, v.detach()) for k, v in plan.source.model.state_dict().items())
    state = plan.source.state
    return OrderedDict((k, as_meta(state[k])) for b in plan.blocks for k in b.source_keys if k in state)


def _check_budget(plan: Plan, target: File) -> None:
    """Refuse an output over its budget (4x the source's bytes, or ``max_output_bytes``): an
    expanded view or many views of one storage would otherwise be written out in full. A ``.pt``
    output keeps shared storages shared."""
    loaded = target.loaded
    source_bytes = max(loaded.file_size, getattr(loaded, "data_bytes", 0) or 0)
    check_output_size(plan.source.state, source_bytes, plan.options.max_output_bytes,
                      keep_aliasing=target.output.suffix != ".safetensors")


# -- in memory ------------------------------------------------------------------------------------


def _light(result: BlockResult, tensors_too: bool) -> BlockResult:
    """Keep shapes, dtypes and eps for the report, not the source tensors: they can be freed."""
    block = replace(result.block, branches=map_branch_tensors(result.block.branches, as_meta))
    if not tensors_too:
        return replace(result, block=block)
    fused = replace(result.fused, weight=as_meta(result.fused.weight), bias=as_meta(result.fused.bias))
    return replace(result, block=block, fused=fused)


def _drive(checked: Checked, progress: Progress | None, each: Callable, **kwargs) -> list[BlockResult]:
    """Iterate the checked blocks (this is what runs fusion and checks), with a progress bar."""
    plan = checked.fused.plan
    total = len(plan.blocks) + len(plan.modules) + len(plan.pairs)
    context, advance = progress(total) if progress is not None else (None, None)
    results: list[BlockResult] = []
    with context if context is not None else _Nothing():
        for item, result in checked.results(**kwargs):
            results.append(each(item, result))
            if advance is not None:
                advance(result.block.name)
    return results


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _assemble(plan: Plan, results: list[BlockResult], streamed: bool) -> tuple[OrderedDict[str, Tensor], int]:
    """The deploy state dict in the source's key order: each block's deploy keys where its first
    source key was, every passthrough key as the very same tensor (streamed: a stand-in)."""
    state = plan.source.state
    first_key = {r.block.source_keys[0]: r for r in results if r.block.source_keys}
    passthrough = set(plan.passthrough)
    deploy: OrderedDict[str, Tensor] = OrderedDict()
    count = 0
    for key in plan.keys:
        if key in first_key:
            deploy.update(first_key[key].block.deploy_state(first_key[key].fused))
        elif key in passthrough:
            tensor = plan.options.written(state[key])
            deploy[key] = as_meta(tensor) if streamed else tensor
            count += 1
    return deploy, count


def _in_memory(checked: Checked, progress: Progress | None) -> Written:
    plan = checked.fused.plan
    results = _drive(checked, progress, lambda item, result: _light(result, tensors_too=False))
    if plan.source.model is not None:
        model = checked.model
        state = OrderedDict((k, v.detach()) for k, v in model.state_dict().items())
        return Written(plan, tuple(results), state, model=model, model_check=checked.model_check)
    state, passthrough = _assemble(plan, results, streamed=False)
    return Written(plan, tuple(results), state, passthrough=passthrough)


def metadata_of(written: Written, loaded: LoadedCheckpoint) -> dict:
    """The metadata a deploy file of ``written`` records (the tensor digests are the writer's)."""
    plan = written.plan
    return build_metadata(
        mode=plan.mode, options=plan.options, blocks=written.results, dropped=plan.dropped,
        model_check=written.model_check, source_name=loaded.path.name, source_sha256=loaded.sha256,
        entry=loaded.entry, stripped=loaded.stripped_prefixes,
    )


def _save(written: Written, target: File) -> None:
    loaded, output = target.loaded, target.output
    metadata = {**metadata_of(written, loaded), TENSOR_DIGESTS: tensor_digests(written.state_dict)}
    if loaded.model is not None and output.suffix != ".safetensors":
        io_write.save_model(output, written.model, loaded, metadata, fsync=target.fsync)
        return
    container = loaded.raw if loaded.entry is not None and output.suffix != ".safetensors" else None
    io_write.save_state_dict(output, written.state_dict, metadata, container=container, entry=loaded.entry,
                             fsync=target.fsync)


# -- streamed -------------------------------------------------------------------------------------


class _NotEquivalent(Exception):
    """Aborts a streamed write (the temporary file is removed) when a block fails its check."""


def planned_deploy_state(block: Block, shape: tuple[int, ...]) -> tuple[dict[str, Tensor], str | None]:
    """The block's deploy keys with data-free tensors of the shape and dtype they will have, and
    the key that holds the fused weight itself (not reshaped or split by the family), whose rows
    can be streamed as they are fused (None if no key does)."""
    planned = FusedConv(weight=torch.empty(shape, dtype=block.dtype, device="meta"),
                        bias=torch.empty(shape[0], dtype=block.dtype, device="meta"))
    state = block.deploy_state(planned)
    return state, next((key for key, tensor in state.items() if tensor is planned.weight), None)


def _layout(plan: Plan) -> tuple[OrderedDict[str, tuple[torch.dtype, tuple[int, ...]]], dict[str, str | None]]:
    """Every tensor of the output, in file order, with its dtype and shape; and per block the
    key whose rows are streamed."""
    state = plan.source.state
    by_first_key = {b.source_keys[0]: b for b in plan.blocks if b.source_keys}
    passthrough = set(plan.passthrough)
    layout: OrderedDict[str, tuple[torch.dtype, tuple[int, ...]]] = OrderedDict()
    weight_keys: dict[str, str | None] = {}
    for key in plan.keys:
        if key in by_first_key:
            block = by_first_key[key]
            planned, weight_keys[block.name] = planned_deploy_state(block, planned_weight_shape(block))
            layout.update((k, (t.dtype, tuple(t.shape))) for k, t in planned.items())
        elif key in passthrough:
            layout[key] = (plan.options.written_dtype(state[key].dtype), tuple(state[key].shape))
    return layout, weight_keys


def _stream(checked: Checked, target: File, progress: Progress | None) -> Written:
    plan = checked.fused.plan
    state = plan.source.state
    layout, weight_keys = _layout(plan)
    check_safetensors_limits(layout)  # a header no reader would open is refused before any work
    reserve = metadata_reserve(plan.blocks, list(layout), plan.dropped)
    done: list[Written] = []

    def fill(tmp: Path) -> None:
        stream = SafetensorsStream(tmp, layout, reserve, flush=target.fsync)
        try:
            for key in plan.passthrough:  # first: the writer has them to do while the first block is fused
                stream.put(key, plan.options.written(state[key]))

            def sink_for(block: Block) -> RowSink | None:
                key = weight_keys.get(block.name)
                if key is None:
                    return None
                return lambda start, stop, rows: stream.put_rows(key, rows, start)

            def each(item, result: BlockResult) -> BlockResult:
                streamed = weight_keys.get(item.block.name)
                futures = [stream.put(k, t) for k, t in item.block.deploy_state(item.shipped).items() if k != streamed]
                if item.slot is not None:
                    item.slot.busy.extend(f for f in futures if f is not None)
                return _light(result, tensors_too=True)

            results = _drive(checked, progress, each, sink_for=sink_for, reuse_buffers=True)
            deploy, passthrough = _assemble(plan, results, streamed=True)
            written = Written(plan, tuple(results), deploy, passthrough=passthrough)
            done.append(written)
            if not written.ok:
                raise _NotEquivalent()
            metadata = metadata_of(written, target.loaded)
            metadata[TENSOR_DIGESTS] = written.digests = stream.wait()
            stream.finish({"format": "pt", METADATA_KEY: metadata_json(metadata)})
        finally:
            stream.close()

    # Leave a core to the writer and hash threads: torch's intra-op threads on small chunked ops
    # only stall behind them (B3, 2 cores, 6 paired rounds: 5.48 s with one torch thread, 5.93 s with two).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    try:
        io_write.atomic_write(target.output, fill, fsync=target.fsync)  # by module: tests inject failures there
    except _NotEquivalent:
        return done[0]
    finally:
        torch.set_num_threads(threads)
    done[0].written = True
    return done[0]
