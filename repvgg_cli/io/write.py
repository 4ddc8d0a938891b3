"""Writing checkpoints: state dicts and pickled models in the source's layout, atomically.

Every file goes through :func:`.atomic.atomic_write` (a temporary file moved into place, no
replacement without ``force``); :func:`check_output_path` refuses a bad output before any work.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from .atomic import atomic_write, check_write_path
from .containers import CONTAINER_ENTRIES
from .metadata import METADATA_KEY, metadata_json
from .read import TORCH_SUFFIXES, LoadedCheckpoint
from .safetensors_file import write_safetensors

__all__ = ["atomic_write", "check_output_path", "check_write_path", "save_model", "save_state_dict", "save_torch"]


def check_output_path(output: Path, sources: list[Path], force: bool) -> None:
    """:func:`check_write_path` for a checkpoint, whose extension must name its format."""
    check_write_path(output, sources, force)
    if output.suffix not in TORCH_SUFFIXES + (".safetensors",):
        raise InputError(
            f"{output}: unknown output format {output.suffix or '(no extension)'!r}",
            hint="name the output .safetensors, .pt or .pth",
        )


def save_state_dict(
    output: Path,
    state: Mapping[str, Tensor],
    metadata: Mapping,
    container: Mapping | None = None,
    entry: str | None = None,
    fsync: bool = False,
) -> None:
    """Write a deploy state dict atomically; the extension picks the format.

    Args:
        output: ``.safetensors`` (metadata in the header) or ``.pt``/``.pth``.
        state: the deploy state dict (fresh, contiguous tensors).
        metadata: what to record (tool version, source hash, options, per-block results).
        container: for ``.pt``: the source's container, so the output loads the same way
            (the state dict goes back into ``entry``; other weight entries are dropped).
        entry: the container entry the weights came from.
        fsync: flush the file to disk before it is renamed into place (see :func:`atomic_write`).
    """
    text = metadata_json(metadata)
    if output.suffix == ".safetensors":
        header_metadata = {"format": "pt", METADATA_KEY: text}
        atomic_write(output, lambda tmp: write_safetensors(tmp, state, header_metadata), fsync=fsync)
        return
    deploy: OrderedDict[str, Tensor] = OrderedDict(state)
    # Only our entry: the source's module versions name modules (and prefixes) that are gone.
    deploy._metadata = OrderedDict()  # type: ignore[attr-defined]
    deploy._metadata[METADATA_KEY] = {"json": text}  # type: ignore[attr-defined]
    payload: Any = deploy
    if container is not None and entry is not None:
        payload = {entry: deploy}
        for key, value in container.items():
            if key != entry and key not in CONTAINER_ENTRIES and key != "optimizer" and key != METADATA_KEY:
                payload[key] = value
    save_torch(output, payload, fsync=fsync)


def save_torch(output: Path, payload: Any, fsync: bool = False) -> None:
    """``torch.save`` streamed into the temporary file.

    Given an open file (not a path), torch names the zip's inner folder ``archive`` whatever the
    file is called, so the bytes do not depend on the temporary file's random name.
    """

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)

    atomic_write(output, write, fsync=fsync)


def save_model(output: Path, model: nn.Module, loaded: LoadedCheckpoint, metadata: Mapping,
               fsync: bool = False) -> None:
    """Write a pickled deploy model in the layout the source had (bare module or container)."""
    text = metadata_json(metadata)
    if isinstance(loaded.raw, Mapping) and loaded.entry is not None:
        payload: Any = {loaded.entry: model}
        for key, value in loaded.raw.items():
            if key not in CONTAINER_ENTRIES and key not in ("optimizer", METADATA_KEY):
                payload[key] = value
        payload[METADATA_KEY] = text
    else:
        model._repvgg_cli_metadata = text  # type: ignore[attr-defined]
        payload = model
    save_torch(output, payload, fsync=fsync)
