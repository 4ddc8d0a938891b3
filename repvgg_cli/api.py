"""File-level operations the CLI is a thin shell over, usable from Python as well."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .io import write as io_write
from .io.metadata import METADATA_KEY, TENSOR_DIGESTS, metadata_json, metadata_problem, tensor_digests
from .io.read import LoadedCheckpoint, load_checkpoint
from .io.safetensors_file import SafetensorsStream
from .io.write import check_output_path, save_model, save_state_dict
from .io.digest import FileDigest
from .convert import (
    ConversionResult,
    ConvertOptions,
    Progress,
    build_metadata,
    build_model,
    convert_state_dict,
    reparameterize,
)
from .errors import InputError, RepvggError
from .families import FamilyOptions
from .verify import ModelCheck, Tolerance, VerifyReport, compare_outputs, infer_input_shape, model_outputs
from .verify import verify_against, verify_deploy



@dataclass(frozen=True)
class ConvertOutcome:
    """What :func:`convert_file` did: the result, and whether the output was written."""

    result: ConversionResult
    loaded: LoadedCheckpoint
    written: bool


def convert_file(
    source: str | Path,
    output: str | Path,
    options: ConvertOptions | None = None,
    allow_pickle: bool = False,
    entry: str | None = None,
    model_spec: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    source_digest: FileDigest | None = None,
) -> ConvertOutcome:
    """Load ``source``, fuse and verify every block, and write ``output`` only if all checks pass.

    Args:
        source: the train-form checkpoint (never modified).
        output: ``.safetensors`` or ``.pt``/``.pth``; must not exist unless ``force``.
        options: eps, tolerance, seed, input shape.
        allow_pickle: permit full unpickling of the source (trusted files only).
        entry: container entry to use.
        model_spec: ``MODULE:CALLABLE`` building the train-form model (module tree).
        force: replace an existing output (atomically).
        progress: optional progress-bar factory ``total -> (context, advance(name))``.
        source_digest: the source's sha256 already being computed (see :class:`FileDigest`).
    Returns:
        A :class:`ConvertOutcome`; ``written`` is False when verification failed.
    """
    source, output = Path(source), Path(output)
    options = options or ConvertOptions()
    check_output_path(output, [source], force)
    loaded = load_checkpoint(source, allow_pickle=allow_pickle, entry=entry, digest=source_digest)
    if loaded.model is None and model_spec is None and output.suffix == ".safetensors":
        return _convert_streaming(loaded, source, output, options, progress)
    with errors_name(source):
        if loaded.model is not None or model_spec is not None:
            model = loaded.model if loaded.model is not None else build_model(model_spec, loaded.state_dict)
            result = reparameterize(model, options, progress=progress)
        else:
            _forget_raw_weights(loaded)
            result = convert_state_dict(loaded.state_dict, options, progress=progress, release=True)
    result = replace(result, notes=tuple(loaded.notes) + result.notes)
    if not result.ok:
        return ConvertOutcome(result, loaded, written=False)
    metadata = {**build_metadata(result, source.name, loaded.sha256, loaded.entry, loaded.stripped_prefixes),
                TENSOR_DIGESTS: tensor_digests(result.state_dict)}
    if loaded.model is not None and output.suffix != ".safetensors":
        save_model(output, result.model, loaded, metadata, fsync=options.fsync)
    else:
        container = loaded.raw if loaded.entry is not None and output.suffix != ".safetensors" else None
        save_state_dict(output, result.state_dict, metadata, container=container, entry=loaded.entry,
                        fsync=options.fsync)
    return ConvertOutcome(result, loaded, written=True)


class _NotEquivalent(Exception):
    """Aborts a streamed write (the temporary file is removed) when a block fails its check."""

    def __init__(self, result: ConversionResult) -> None:
        super().__init__("not equivalent")
        self.result = result


def _convert_streaming(loaded: LoadedCheckpoint, source: Path, output: Path, options: ConvertOptions,
                       progress: Progress | None) -> ConvertOutcome:
    """Key tree into safetensors: each block is written as soon as it is fused and checked (no
    copy of the deploy model in memory); the header, with the metadata, comes last. A block
    that fails its check leaves nothing behind, as does any error."""
    written: list[ConversionResult] = []

    def write(tmp: Path) -> None:
        streams: list[SafetensorsStream] = []

        def open_sink(layout, reserve: int) -> SafetensorsStream:
            streams.append(SafetensorsStream(tmp, layout, reserve, flush=options.fsync))
            return streams[0]

        try:
            with errors_name(source):
                _forget_raw_weights(loaded)
                result = convert_state_dict(loaded.state_dict, options, progress=progress, release=True,
                                            open_sink=open_sink)
            result = replace(result, notes=tuple(loaded.notes) + result.notes)
            if not result.ok:
                raise _NotEquivalent(result)
            stream = streams[0]
            metadata = build_metadata(result, source.name, loaded.sha256, loaded.entry, loaded.stripped_prefixes)
            metadata[TENSOR_DIGESTS] = stream.wait()
            stream.finish({"format": "pt", METADATA_KEY: metadata_json(metadata)})
            written.append(result)
        finally:
            for stream in streams:
                stream.close()

    # Leave a core to the writer and hash threads: torch's intra-op threads on small chunked ops
    # only stall behind them (B3, 2 cores, 6 paired rounds: 5.48 s with one torch thread, 5.93 s with two).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    try:
        io_write.atomic_write(output, write, fsync=options.fsync)  # by module: tests inject failures there
    except _NotEquivalent as failed:
        return ConvertOutcome(failed.result, loaded, written=False)
    finally:
        torch.set_num_threads(threads)
    return ConvertOutcome(written[0], loaded, written=True)


@contextmanager
def errors_name(path: Path) -> Iterator[None]:
    """Errors raised about a file's contents (a block, a key) say which file they are about."""
    try:
        yield
    except RepvggError as error:
        if str(path) in error.message:
            raise
        raise type(error)(f"{path}: {error.message}", error.hint) from None


def _forget_raw_weights(loaded: LoadedCheckpoint) -> None:
    """Drop the loaded object's own references to the weights (``state_dict`` keeps them), so a
    block's source tensors are freed as soon as it is fused. Other container entries stay."""
    inner = loaded.raw.get(loaded.entry) if loaded.entry is not None and isinstance(loaded.raw, dict) else loaded.raw
    if isinstance(inner, dict) and inner is not loaded.state_dict:
        inner.clear()


def verify_file(
    deploy: str | Path,
    against: str | Path | None = None,
    bn_eps: float | None = None,
    tolerance: Tolerance | None = None,
    allow_pickle: bool = False,
    entry: str | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> VerifyReport:
    """Re-check a deploy file on its own (from its recorded probes) or against its source.

    Args:
        deploy: the deploy checkpoint.
        against: the train-form source to recompute from; None: use the recorded probes.
        bn_eps: eps for the source's blocks (default: what convert recorded, else the family's).
        tolerance: rtol/atol.
        allow_pickle, entry: as for loading.
        input_shape: whole-model probe when both files hold pickled models.
    Returns:
        A :class:`VerifyReport`.
    """
    tolerance = tolerance or Tolerance()
    loaded = load_checkpoint(deploy, allow_pickle=allow_pickle, entry=entry)
    metadata = loaded.metadata
    if against is None:
        if metadata is None or "blocks" not in metadata:
            raise InputError(
                f"{deploy} has no repvgg_cli metadata, so it cannot be checked on its own",
                hint="pass --against TRAIN to recompute from the train-form source",
            )
        problem = metadata_problem(metadata, complete=True)
        if problem is not None:
            raise InputError(
                f"{deploy}: its repvgg_cli metadata is malformed: {problem}",
                hint="the file was changed after repvgg convert wrote it; convert the train-form source again",
            )
        with errors_name(Path(deploy)):
            report = verify_deploy(loaded.state_dict, metadata, tolerance)
        return replace(report, notes=loaded.notes)
    source = load_checkpoint(against, allow_pickle=allow_pickle, entry=None)
    recorded_entry = ((metadata or {}).get("source") or {}).get("entry")
    if recorded_entry and source.entry not in (None, recorded_entry) and recorded_entry in source.container_keys:
        # convert was told --entry; the default pick (EMA first) would compare other weights
        source = load_checkpoint(against, allow_pickle=allow_pickle, entry=recorded_entry)
    recorded = (metadata or {}).get("options") or {}
    family_options = FamilyOptions(
        bn_eps=bn_eps if bn_eps is not None else recorded.get("bn_eps"),
        fold_post_bn=bool(recorded.get("fold_post_bn", False)),
        no_identity=tuple(recorded.get("no_identity", ())),
        avg_branch=tuple(recorded.get("avg_branch", ())),
    )
    dropped = tuple((metadata or {}).get("dropped_keys", ()))
    train_state = source.state_dict
    if source.model is not None and loaded.model is not None:
        train_state = source.model.state_dict()
    with errors_name(Path(against)):  # the blocks checked are the source's
        report = verify_against(loaded.state_dict, train_state, family_options, tolerance, dropped=dropped)
    model_check = None
    if source.model is not None and loaded.model is not None:
        model_check = _compare_models(source.model, loaded.model, input_shape, tolerance)
    return replace(report, against=str(against), model_check=model_check, notes=loaded.notes)


def _compare_models(train, deploy, input_shape, tolerance: Tolerance) -> ModelCheck:
    shape = input_shape or infer_input_shape(train)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference, dtype = model_outputs(train, x)
    candidate, _ = model_outputs(deploy, x)
    err, scale = compare_outputs(reference, candidate)
    param = next((p for p in deploy.parameters() if p.is_floating_point()), None)
    rtol = tolerance.rtol_for(param.dtype if param is not None else torch.float32)
    return ModelCheck(tuple(shape), dtype, err, scale, rtol, tolerance.atol, len(reference))
