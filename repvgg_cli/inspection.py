"""Summarise a checkpoint: what is in it, which blocks, train or deploy form, what can fuse."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import Tensor

from .errors import RepvggError
from .families import FAMILIES, find_blocks, unrecognised_blocks
from .families.base import Block
from .families.keys import join
from .io.read import LoadedCheckpoint


@dataclass(frozen=True)
class BlockInfo:
    """One block as inspect reports it."""

    name: str
    family: str
    form: str
    in_channels: int | None
    out_channels: int
    kernel: tuple[int, int]
    groups: int | None
    identity: bool | None
    branches: tuple[str, ...] = ()
    deploy_prefix: str | None = None


@dataclass(frozen=True)
class CheckpointSummary:
    """What ``repvgg inspect`` reports about a checkpoint."""

    path: str
    format: str
    file_size: int
    sha256: str
    container_keys: tuple[str, ...]
    entry: str | None
    notes: tuple[str, ...]
    pickled_model: str | None
    num_tensors: int
    num_params: int
    dtypes: dict[str, int]
    form: str
    blocks: tuple[BlockInfo, ...]
    other_keys: int
    other_prefixes: dict[str, int]
    metadata: dict | None
    problems: tuple[str, ...] = ()
    unrecognised: tuple[tuple[str, str], ...] = ()

    @property
    def train_blocks(self) -> tuple[BlockInfo, ...]:
        return tuple(b for b in self.blocks if b.form == "train")

    @property
    def deploy_blocks(self) -> tuple[BlockInfo, ...]:
        return tuple(b for b in self.blocks if b.form == "deploy")


def _train_info(block: Block) -> BlockInfo:
    b = block.branches
    known_groups = b.groups_known
    return BlockInfo(
        name=block.name,
        family=block.family,
        form="train",
        in_channels=b.resolved_in_channels if known_groups or b.in_channels else None,
        out_channels=b.out_channels,
        kernel=b.kernel_size,
        groups=b.resolved_groups if known_groups else None,
        identity=b.identity is not None,
        branches=block.branch_labels,
    )


def _deploy_blocks(state, metadata: dict | None) -> list[BlockInfo]:
    recorded = ("name", "family", "out_channels", "kernel", "deploy_prefix")
    if metadata and metadata.get("blocks") and all(all(f in r for f in recorded) for r in metadata["blocks"]):
        return [
            BlockInfo(r["name"], r["family"], "deploy", r.get("in_channels"), r["out_channels"],
                      tuple(r["kernel"]), r.get("groups"), None, tuple(r.get("branches", ())), r["deploy_prefix"])
            for r in metadata["blocks"]
        ]
    keys = list(state.keys())
    by_prefix: dict[str, list] = {}
    for family in FAMILIES:
        for prefix in family.find_deploy_prefixes(keys):
            by_prefix.setdefault(prefix, []).append(family)
    infos = []
    for prefix, families in by_prefix.items():
        anchor = families[0].deploy_anchor
        w = state[f"{prefix}.{anchor}" if prefix else anchor]
        if not isinstance(w, Tensor) or w.dim() != 4:
            continue
        names = [f.name for f in families]
        leaf = anchor.rsplit(".", 1)[0]
        label = names[0] if len(names) == 1 else f"one of {len(names)} families writing {leaf}"
        infos.append(BlockInfo(prefix, label, "deploy", None, int(w.shape[0]), (int(w.shape[2]), int(w.shape[3])),
                               None, None, (), join(prefix, anchor.rsplit(".", 1)[0])))
    return infos


def summarize(loaded: LoadedCheckpoint) -> CheckpointSummary:
    """Build the summary ``repvgg inspect`` prints.

    Args:
        loaded: a checkpoint from :func:`repvgg_cli.io.read.load_checkpoint`.
    Returns:
        A :class:`CheckpointSummary`; malformed blocks are listed in ``problems``, not raised.
    """
    state = loaded.state_dict
    problems: list[str] = []
    try:
        found = find_blocks(state)
        train = [_train_info(b) for b in found]
        in_blocks = {k for b in found for k in b.source_keys}
    except RepvggError as error:
        train, in_blocks = [], set()
        problems.append(error.message)
    deploy = _deploy_blocks(state, loaded.metadata)
    for info in deploy:
        in_blocks.update(join(info.deploy_prefix or "", part) for part in ("weight", "bias"))
    if train and deploy:
        form = "mixed"
    elif train:
        form = "train"
    elif deploy:
        form = "deploy"
    else:
        form = "no re-parameterizable blocks"
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in state.values())
    others = [k for k in state if k not in in_blocks]
    prefixes = Counter(k.split(".", 1)[0] if "." in k else "(top level)" for k in others)
    return CheckpointSummary(
        path=str(loaded.path),
        format=loaded.format,
        file_size=loaded.file_size,
        sha256=loaded.sha256,
        container_keys=loaded.container_keys,
        entry=loaded.entry,
        notes=loaded.notes,
        pickled_model=type(loaded.model).__name__ if loaded.model is not None else None,
        num_tensors=len(state),
        num_params=sum(int(t.numel()) for k, t in state.items() if t.is_floating_point() and not k.endswith(("running_mean", "running_var"))),
        dtypes=dict(sorted(dtypes.items())),
        form=form,
        blocks=tuple(train + deploy),
        other_keys=len(others),
        other_prefixes=dict(sorted(prefixes.items())),
        metadata=loaded.metadata,
        problems=tuple(problems),
        unrecognised=tuple(unrecognised_blocks(state, in_blocks)),
    )
