"""The public face of repvgg_cli: what the CLI does, callable from Python with the same words.

Every function here runs the pipeline (:mod:`repvgg_cli.pipeline`: read → find → fuse → check →
write → report) or the deploy-file checks (:mod:`repvgg_cli.verify`) and returns dataclasses;
nothing here prints.

Errors are :class:`~repvgg_cli.errors.RepvggError` subclasses. The library below this module words
its hints for the command line (``pass --force to replace it``); raised through a function of this
module they name the function's arguments instead (``pass force=True to replace it``), by one table,
:data:`API_WORDS`. The words follow the caller: when the caller is repvgg_cli itself (its CLI, its
batch workers) the flags stay, since those are what its user typed.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor, nn

from .checks.model import (
    compare_outputs,
    copy_model,
    infer_input_shape,
    leave_a_core,
    model_outputs,
)
from .checks.tolerance import ModelCheck, Tolerance
from .errors import InputError, RepvggError
from .io.digest import FileDigest
from .io.metadata import metadata_problem
from .io.read import LoadedCheckpoint, load_checkpoint
from .io.write import check_output_path
from .pipeline import ConversionResult, ConvertOptions, run
from .pipeline.find import find as find_plan
from .pipeline.read import Source, read_file, read_model, read_state
from .pipeline.write import File, Memory, Progress, Target
from .verify import VerifyReport, verify_against, verify_deploy

__all__ = ["API_WORDS", "ConversionResult", "ConvertOptions", "ConvertOutcome", "convert_file", "convert_state_dict",
           "reparameterize", "verify_file"]

P = ParamSpec("P")
R = TypeVar("R")

# -- the API's words -------------------------------------------------------------------------------

API_WORDS: dict[str, tuple[str, str]] = {
    # CLI flag: (what a caller of this module passes instead, how the flag's value is written in it)
    "--force": ("force=True", "none"),
    "--allow-pickle": ("allow_pickle=True", "none"),
    "--fold-post-bn": ("fold_post_bn=True", "none"),
    "--fuse-conv-bn": ("fuse_conv_bn=True", "none"),
    "--fsync": ("fsync=True", "none"),
    "--bn-eps": ("bn_eps={}", "number"),
    "--seed": ("seed={}", "number"),
    "--rtol": ("Tolerance(rtol={})", "number"),
    "--atol": ("Tolerance(atol={})", "number"),
    "--input-shape": ("input_shape={}", "shape"),
    "--entry": ("entry={}", "text"),
    "--model": ("model_spec={}", "text"),
    "--against": ("against={}", "text"),
    "--no-identity": ("no_identity=({},)", "text"),
    "--avg-branch": ("avg_branch=({},)", "text"),
    "--passthrough": ("passthrough=({},)", "text"),
    "--qa-variant": ("qa_variant={}", "text"),
    "--dtype": ("dtype={}", "text"),
    "--max-output-bytes": ("max_output_bytes={}", "number"),
}
"""How a hint worded for the command line reads through the Python API: each flag the library's
messages name, and the argument (of these functions or of :class:`ConvertOptions`) it stands for.
``{}`` takes the flag's value where the message gives one (``--bn-eps -1.0`` → ``bn_eps=-1.0``,
``--input-shape N,C,H,W`` → ``input_shape=(N, C, H, W)``), else ``...``."""

_ATOM = r"[^\s:;,()'\"]+(?::[^\s:;,()'\"]+)*"  # a value may hold colons (MODULE:CALLABLE), not end with one
_VALUE = rf"'[^']*'|\"[^\"]*\"|{_ATOM}(?:,{_ATOM})*"
_FLAG = re.compile(rf"(?<![\w-])(?P<flag>--[a-z][a-z0-9-]*)(?P<rest>[ =](?P<value>{_VALUE}))?")
_LOOKS_LIKE = {
    "number": re.compile(r"-?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?|-?nan|-?inf|[A-Z_]+|'.*'", re.IGNORECASE),
    "shape": re.compile(r"[A-Z\d]+(,[A-Z\d]+)*|'.*'"),
    "text": re.compile(r"(?!--).+"),
}
_NOT_VALUES = {"to", "and", "or", "with", "is", "are", "was", "matches", "match", "not", "for", "the", "a", "an",
               "if", "on", "in", "of", "only", "when", "from", "as", "instead", "must", "that", "which"}


def _api_value(value: str, kind: str) -> str:
    if kind == "shape" and "," in value and not value.startswith(("'", '"')):
        return "(" + ", ".join(value.split(",")) + ")"
    if kind == "text" and not value.startswith(("'", '"')) and not value.isupper():
        return repr(value)  # a name the message gives bare; NAME, TRAIN, GLOB stay placeholders
    return value


def _api_flag(match: re.Match) -> str:
    flag, rest, value = match.group("flag"), match.group("rest") or "", match.group("value")
    if flag not in API_WORDS:
        return match.group(0)
    template, kind = API_WORDS[flag]
    if kind == "none":
        return template + rest
    tail = ""
    if value is not None and value.endswith(".") and not value.startswith(("'", '"')):
        value, tail = value[:-1], "."  # the end of a sentence, not of the value
    if value is None or value.lower() in _NOT_VALUES or not _LOOKS_LIKE[kind].fullmatch(value):
        return template.format("...") + rest
    return template.format(_api_value(value, kind)) + tail


def api_words(text: str) -> str:
    """``text`` with every flag of :data:`API_WORDS` written as the Python API's argument."""
    return _FLAG.sub(_api_flag, text)


def _called_from_repvgg_cli(frame: object) -> bool:
    name = getattr(frame, "f_globals", {}).get("__name__", "") or ""
    return name == "repvgg_cli" or name.startswith("repvgg_cli.")


def in_api_words(function: Callable[P, R]) -> Callable[P, R]:
    """Errors raised through ``function`` name its arguments, not CLI flags (see :data:`API_WORDS`),
    unless repvgg_cli itself called it."""

    @functools.wraps(function)
    def public(*args: P.args, **kwargs: P.kwargs) -> R:
        if _called_from_repvgg_cli(sys._getframe(1)):
            return function(*args, **kwargs)
        try:
            return function(*args, **kwargs)
        except RepvggError as error:
            error.message = api_words(error.message)
            error.args = (error.message, *error.args[1:])
            if error.hint is not None:
                error.hint = api_words(error.hint)
            raise

    return public


# -- checks of the arguments -----------------------------------------------------------------------


def _checked_eps(eps: object) -> None:
    if eps is None:
        return
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise InputError(f"--bn-eps {eps!r}: BatchNorm eps must be a finite number >= 0",
                         hint="leave it out to use the family's default (1e-5; YOLO families 1e-3)")


def _checked_options(options: ConvertOptions | None) -> ConvertOptions:
    if options is None:
        return ConvertOptions()
    if not isinstance(options, ConvertOptions):
        raise InputError(f"options must be a ConvertOptions, not a {type(options).__name__}")
    _checked_eps(options.bn_eps)
    return options


def _run(source: Source, options: ConvertOptions, target: Target, progress: Progress | None,
         check_model: bool = True) -> ConversionResult:
    """The pipeline; a module tree on one torch thread fewer than the process has, as the key
    tree's streamed write runs (see :func:`repvgg_cli.checks.model.leave_a_core`)."""
    if source.model is None:
        return run(source, options, target, progress=progress, check_model=check_model)
    with leave_a_core():
        return run(source, options, target, progress=progress, check_model=check_model)


# -- the functions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvertOutcome:
    """What :func:`convert_file` did.

    Attributes:
        result: the conversion (blocks, checks, notes).
        loaded: the source as read (entry used, prefixes stripped, sha256).
        written: the output was written (False when a check failed: nothing is written then).
    """

    result: ConversionResult
    loaded: LoadedCheckpoint
    written: bool


@in_api_words
def convert_state_dict(state: Mapping[str, Tensor], options: ConvertOptions | None = None,
                       progress: Progress | None = None) -> ConversionResult:
    """Fuse every block of a state dict (key tree): no model code needed.

    Args:
        state: a train-form state dict; ``module.``/``_orig_mod.`` prefixes (DDP, ``torch.compile``)
            are stripped as the CLI strips them (the result's ``notes`` say so). It is not changed.
        options: BN eps (``bn_eps``: a state dict does not store it), tolerance, seed, ...
        progress: optional progress-bar factory ``total -> (context, advance(name))``.
    Returns:
        A :class:`ConversionResult` whose ``state_dict`` loads with ``strict=True`` into the
        deploy form of each family's model.
    Raises:
        InputError: bad input or options (exit code 2); UnsupportedError: a structure that cannot
        be fused (3).

    Example:
        >>> from torch import nn
        >>> from repvgg_cli import ConvertOptions, convert_state_dict
        >>> def block():                              # the tutorial block's layers, by their names
        ...     return nn.ModuleDict({"conv3x3": nn.Conv2d(4, 4, 3, padding=1, bias=False), "bn3x3": nn.BatchNorm2d(4),
        ...                           "conv1x1": nn.Conv2d(4, 4, 1, bias=False), "bn1x1": nn.BatchNorm2d(4),
        ...                           "identity": nn.BatchNorm2d(4)})
        >>> train = nn.Sequential(block(), nn.ReLU(), block())
        >>> state = {"module." + k: v for k, v in train.state_dict().items()}   # saved from DDP
        >>> result = convert_state_dict(state, ConvertOptions(bn_eps=1e-5))
        >>> result.ok, len(result.blocks), result.notes[0]
        (True, 2, "stripped key prefix 'module.'")
        >>> deploy = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        >>> deploy.load_state_dict(result.state_dict, strict=True)       # each block became one conv
        <All keys matched successfully>
    """
    options = _checked_options(options)
    return _run(read_state(state), options, Memory(), progress)


@in_api_words
def reparameterize(model: nn.Module, options: ConvertOptions | None = None, check_model: bool = True,
                   progress: Progress | None = None, inplace: bool = False) -> ConversionResult:
    """Switch every block of a live model to its deploy form, and check it.

    By default a copy is converted, as timm's ``reparameterize_model`` does, and ``model`` is left
    as it was (its train/eval mode too); ``inplace=True`` switches ``model`` itself (no copy: for a
    model you are done training, or a large one). The model returned is in eval mode: the BN
    running statistics are what is fused.

    Args:
        model: a train-form model holding trained BN statistics.
        options: tolerance, seed, ``input_shape`` of the whole-model check (default: from the first
            conv, ``(2, C, 64, 64)``).
        check_model: also compare the whole model's eval output before and after on a seeded input
            (float64, where the model runs in float64). Each block is checked either way.
        progress: optional progress-bar factory ``total -> (context, advance(name))``.
        inplace: switch ``model`` itself instead of a copy.
    Returns:
        A :class:`ConversionResult` with ``model`` (the deploy model, in eval mode; ``model`` itself
        when ``inplace``, unless ``model`` is one block whose deploy form is another module, such as a
        plain block that becomes a Conv2d: always use ``result.model``), its deploy ``state_dict``,
        every block's check and ``model_check``.
    Raises:
        InputError: bad input or options (exit code 2); UnsupportedError: a block that cannot be
        fused (3).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from repvgg_cli import reparameterize
        >>> class Block(nn.Module):     # the tutorial block: 3x3 conv+BN, 1x1 conv+BN, identity BN, summed
        ...     def __init__(self, c: int) -> None:
        ...         super().__init__()
        ...         self.conv3x3, self.bn3x3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        ...         self.conv1x1, self.bn1x1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        ...         self.identity = nn.BatchNorm2d(c)
        ...     def forward(self, x):
        ...         return self.bn3x3(self.conv3x3(x)) + self.bn1x1(self.conv1x1(x)) + self.identity(x)
        >>> model = nn.Sequential(Block(4), nn.ReLU(), Block(4)).eval()
        >>> result = reparameterize(model)
        >>> result.ok, len(result.blocks), result.model_check.dtype
        (True, 2, 'float64')
        >>> deploy = result.model                            # a converted copy
        >>> type(model[0]).__name__, type(deploy[0]).__name__
        ('Block', 'Conv2d')
        >>> x = torch.randn(1, 4, 16, 16)
        >>> torch.allclose(deploy(x), model(x), rtol=1e-4, atol=1e-5)
        True
        >>> reparameterize(model, inplace=True).model is model  # no copy: the model itself
        True
    """
    options = _checked_options(options)
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module, not a {type(model).__name__}")
    target = model if inplace else copy_model(model)  # copy.deepcopy's copy, in half the time
    return _run(read_model(target), options, Memory(), progress, check_model=check_model)


@in_api_words
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
    dry_run: bool = False,
) -> ConvertOutcome:
    """Load ``source``, fuse and check every block, and write ``output`` only if every check passes:
    ``repvgg convert SOURCE OUTPUT``.

    Args:
        source: the train-form checkpoint (never modified).
        output: ``.safetensors`` or ``.pt``/``.pth``; must not exist unless ``force``.
        options: BN eps, tolerance, seed, input shape, ...
        allow_pickle: permit full unpickling of the source (runs code from the file: trusted
            files only). Without it a file that needs it is refused.
        entry: the container entry holding the weights (default: EMA weights if present).
        model_spec: ``MODULE:CALLABLE`` building the train-form model the state dict loads into
            (then converted as a module tree, with the whole-model check).
        force: replace an existing output (atomically).
        progress: optional progress-bar factory ``total -> (context, advance(name))``.
        source_digest: the source's sha256 already being computed (see :class:`FileDigest`).
        dry_run: read, find, fuse and check, and write nothing (``output`` is not even checked).
    Returns:
        A :class:`ConvertOutcome`; ``written`` is False when a check failed (or ``dry_run``).
    Raises:
        OutputExistsError: ``output`` exists and ``force`` is False; PickleRefusedError: the file
        needs ``allow_pickle=True``; InputError, UnsupportedError: as the CLI's exit codes 2 and 3.

    Example:
        >>> from repvgg_cli import convert_file
        >>> outcome = convert_file("sample_checkpoints/repvgg_tiny_train.pt", "deploy.safetensors")
        >>> outcome.written, outcome.result.ok, outcome.loaded.stripped_prefixes
        (True, True, ('module.',))
        >>> convert_file("sample_checkpoints/repvgg_tiny_train.pt", "deploy.safetensors")
        Traceback (most recent call last):
        ...
        repvgg_cli.errors.OutputExistsError: deploy.safetensors exists
        >>> convert_file("sample_checkpoints/repvgg_tiny_train.pt", "deploy.safetensors", force=True).written
        True
    """
    source, output = Path(source), Path(output)
    options = _checked_options(options)
    if not dry_run:
        check_output_path(output, [source], force)
    src = read_file(source, allow_pickle=allow_pickle, entry=entry, model_spec=model_spec, digest=source_digest)
    target = Memory() if dry_run else File(output, src.loaded, fsync=options.fsync)
    with errors_name(source):
        result = _run(src, options, target, progress)
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


@in_api_words
def verify_file(
    deploy: str | Path,
    against: str | Path | None = None,
    bn_eps: float | None = None,
    tolerance: Tolerance | None = None,
    allow_pickle: bool = False,
    entry: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    options: ConvertOptions | None = None,
) -> VerifyReport:
    """Re-check a deploy file on its own (from the probes it records) or against its train-form
    source: ``repvgg verify DEPLOY [--against TRAIN]``.

    Against a source, nothing that could change the answer is taken from the file under test:
    the source's blocks are found and fused with ``options`` (and ``bn_eps``, ``tolerance``), as
    convert would with the same options; what the file records about its own conversion only
    appears in a note when it differs.

    Args:
        deploy: the deploy checkpoint.
        against: the train-form source to recompute every block from; None: use the probes and
            tensor digests the file records.
        bn_eps: eps for the source's blocks (default: what convert recorded, else the family's).
        tolerance: rtol/atol (default: by the dtype stored).
        allow_pickle: permit full unpickling (trusted files only).
        entry: the container entry holding the weights: of ``deploy`` on its own, of ``against``
            when there is one.
        input_shape: the whole-model probe when both files hold pickled models.
        options: against a source: what its blocks need that a state dict does not store (eps,
            QARepVGG variant, ``--passthrough`` globs, ``dtype`` written, ...), as for convert.
    Returns:
        A :class:`VerifyReport`: ``ok``, ``failures``, ``problems``.
    Raises:
        InputError: the file cannot be checked on its own (no or malformed metadata: pass
        ``against``), or bad input.

    Example:
        >>> from repvgg_cli import convert_file, verify_file
        >>> convert_file("sample_checkpoints/plain_net.pt", "plain.safetensors").written
        True
        >>> verify_file("plain.safetensors").ok
        True
        >>> verify_file("plain.safetensors", against="sample_checkpoints/plain_net.pt").ok
        True
    """
    _checked_eps(bn_eps)
    tolerance = tolerance or Tolerance()
    loaded = load_checkpoint(deploy, allow_pickle=allow_pickle, entry=None if against is not None else entry)
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
    options = replace(options or ConvertOptions(), tolerance=tolerance)
    if bn_eps is not None:
        options = replace(options, bn_eps=bn_eps)
    source = load_checkpoint(against, allow_pickle=allow_pickle, entry=entry)
    train_state = source.state_dict
    if source.model is not None and loaded.model is not None:
        train_state = source.model.state_dict()
    with errors_name(Path(against)):  # the blocks checked are the source's
        plan = find_plan(Source(state=OrderedDict(train_state), loaded=source), options)
        report = verify_against(loaded.state_dict, plan)
    model_check = None
    if source.model is not None and loaded.model is not None:
        model_check = _compare_models(source.model, loaded.model, input_shape, tolerance)
    notes = loaded.notes + _recorded_differs(metadata, options, source)
    return replace(report, against=str(against), model_check=model_check, notes=notes)


def _recorded_differs(metadata: dict | None, options: ConvertOptions, source: LoadedCheckpoint) -> tuple[str, ...]:
    """What the file says about its own conversion where it differs from what this check used
    (taken from the command line, never from the file): a hint for a failure, nothing more."""
    recorded = (metadata or {}).get("options") or {}
    if not isinstance(recorded, dict):
        return ()
    said = {"bn_eps": options.bn_eps, "fold_post_bn": options.fold_post_bn, "qa_variant": options.qa_variant,
            "no_identity": list(options.no_identity), "avg_branch": list(options.avg_branch), "dtype": options.dtype}
    flags = {"bn_eps": "--bn-eps", "fold_post_bn": "--fold-post-bn", "qa_variant": "--qa-variant",
             "no_identity": "--no-identity", "avg_branch": "--avg-branch", "dtype": "--dtype"}
    differ = [f"{flags[k]} {recorded[k]}" for k in said if k in recorded and recorded[k] != said[k]
              and not (k == "dtype" and recorded[k] is None)]
    entry = ((metadata or {}).get("source") or {}).get("entry")
    if isinstance(entry, str) and entry != source.entry:
        differ.append(f"--entry {entry}")
    if not differ:
        return ()
    return (f"the file says it was converted with {', '.join(differ)}; this check took its options from the command "
            "line (nothing from the file under test): pass them if you trust the file's word",)


def _compare_models(train: nn.Module, deploy: nn.Module, input_shape: tuple[int, ...] | None,
                    tolerance: Tolerance) -> ModelCheck:
    """Both pickled models on one seeded float64 input (float32 where float64 fails)."""
    try:
        shape = input_shape or infer_input_shape(train)
    except ValueError as error:
        raise InputError(str(error)) from None
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    try:
        reference, dtype = model_outputs(train, x)
        candidate, _ = model_outputs(deploy, x)
    except RuntimeError as error:
        raise InputError(f"the models cannot run on input {tuple(shape)}: {error}",
                         hint="pass --input-shape N,C,H,W") from None
    problem = None
    try:
        err, scale = compare_outputs(reference, candidate)
    except ValueError as error:  # another number of outputs, or other shapes
        err, scale, problem = float("inf"), 0.0, f"the deploy model's outputs differ in shape: {error}"
    param = next((p for p in deploy.parameters() if p.is_floating_point()), None)
    rtol = tolerance.rtol_for(param.dtype if param is not None else torch.float32)
    return ModelCheck(input_shape=tuple(shape), dtype=dtype, max_abs_err=err, scale=scale, rtol=rtol,
                      atol=tolerance.atol, outputs=len(reference), problem=problem)
