"""The public face of repvgg_cli: what the CLI does, callable from Python with the same words.

Every function here runs the pipeline (:mod:`repvgg_cli.pipeline`: read → find → fuse → check →
write → report) or the deploy-file checks (:mod:`repvgg_cli.verify`) and returns dataclasses;
nothing here prints.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .checks.model import compare_outputs, infer_input_shape, model_outputs
from .checks.tolerance import ModelCheck, Tolerance
from .errors import InputError, RepvggError
from .families import FamilyOptions
from .io.digest import FileDigest
from .io.metadata import metadata_problem
from .io.read import LoadedCheckpoint, load_checkpoint
from .io.write import check_output_path
from .pipeline import ConversionResult, ConvertOptions, run
from .pipeline.read import read_file, read_model, read_state
from .pipeline.write import File, Memory, Progress
from .verify import VerifyReport, verify_against, verify_deploy

__all__ = ["ConversionResult", "ConvertOptions", "ConvertOutcome", "convert_file", "convert_state_dict",
           "reparameterize", "verify_file"]


@dataclass(frozen=True)
class ConvertOutcome:
    """What :func:`convert_file` did: the result, and whether the output was written."""

    result: ConversionResult
    loaded: LoadedCheckpoint
    written: bool


def convert_state_dict(state: Mapping[str, Tensor], options: ConvertOptions | None = None,
                       progress: Progress | None = None) -> ConversionResult:
    """Fuse every block of a state dict (key tree): no model code needed.

    Args:
        state: a train-form state dict; ``module.``/``_orig_mod.`` prefixes are stripped as the CLI
            strips them (the result says so in its notes). It is not changed.
        options: eps, tolerance, seed.
        progress: optional progress-bar factory ``total -> (context, advance(name))``.
    Returns:
        A :class:`ConversionResult` whose ``state_dict`` loads with ``strict=True`` into the
        deploy form of each family's model.

    Example::

        result = convert_state_dict(torch.load("train.pt", weights_only=True))
        assert result.ok
        torch.save(result.state_dict, "deploy.pt")
    """
    return run(read_state(state), options or ConvertOptions(), Memory(), progress=progress)


def reparameterize(model: nn.Module, options: ConvertOptions | None = None, check_model: bool = True,
                   progress: Progress | None = None, inplace: bool = True) -> ConversionResult:
    """Switch every block of a live model to its deploy form, and check it.

    Args:
        model: a train-form model (its BN running statistics are used).
        options: tolerance, seed, whole-model input shape.
        check_model: compare the whole model's eval output before and after on seeded inputs.
        progress: optional progress-bar factory.
        inplace: change ``model`` itself; by default a copy is converted (as timm's
            ``reparameterize_model`` does) and ``model`` is left as it was.
    Returns:
        A :class:`ConversionResult` with ``model`` (the deploy model, in eval mode) and its deploy
        ``state_dict``.

    Example::

        result = reparameterize(model)
        assert result.ok, [r.block.name for r in result.failures]
        deploy_model = result.model
    """
    target = model if inplace else copy.deepcopy(model)
    return run(read_model(target), options or ConvertOptions(), Memory(), progress=progress,
               check_model=check_model)


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

    Example::

        outcome = convert_file("train.pt", "deploy.safetensors")
        assert outcome.written
    """
    source, output = Path(source), Path(output)
    options = options or ConvertOptions()
    check_output_path(output, [source], force)
    src = read_file(source, allow_pickle=allow_pickle, entry=entry, model_spec=model_spec, digest=source_digest)
    with errors_name(source):
        result = run(src, options, File(output, src.loaded, fsync=options.fsync), progress=progress)
    return ConvertOutcome(result, src.loaded, written=result.written)


@contextmanager
def errors_name(path: Path) -> Iterator[None]:
    """Errors raised about a file's contents (a block, a key) say which file they are about."""
    try:
        yield
    except RepvggError as error:
        if str(path) in error.message:
            raise
        raise type(error)(f"{path}: {error.message}", error.hint) from None


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
