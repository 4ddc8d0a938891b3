"""The ONNX graph in memory: torch's TorchScript exporter into bytes, ``onnx.checker``, metadata
properties, onnxslim. onnx, onnxruntime and onnxslim are optional extras, imported only where a
graph is made or read (:func:`require_onnx`, :func:`slim_graph`), so the package imports without them.

Sources: pytorch/pytorch ``torch/onnx/utils.py`` (``export``: ``dynamic_axes``, ``opset_version``),
onnx/onnx ``onnx/checker.py``, inisis/OnnxSlim ``onnxslim/__init__.py`` (``slim``).
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError, UnsupportedError

DEFAULT_OPSET = 17
EXPORTER = "torch.onnx.export(dynamo=False) (TorchScript exporter)"
INPUT_NAME = "input"
ONNX_HINT = 'install the optional extra: pip install -e ".[onnx]" (from the clone)'
SLIM_HINT = 'install the optional extra: pip install -e ".[slim]" (from the clone)'


def require_onnx() -> tuple[Any, Any]:
    """Import onnx and onnxruntime, or explain how to install them.

    Raises:
        InputError: either is missing (exit 2), with the pip hint.
    """
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise InputError(f"export needs onnx and onnxruntime: {error}", hint=ONNX_HINT) from None
    return onnx, onnxruntime


def exporter_opsets() -> tuple[int, int]:
    """The opsets the installed torch's TorchScript exporter supports (it only warns beyond them)."""
    try:
        from torch.onnx import _constants

        return int(_constants.ONNX_MIN_OPSET), int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):
        return 7, 20


def _output_names(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output{i}" for i in range(count)]


def onnx_bytes(model: nn.Module, x: Tensor, opset: int, dynamic_batch: bool, outputs: int,
               dynamic_spatial: bool = False) -> bytes:
    """Export ``model`` traced on ``x`` with the TorchScript exporter, into memory.

    Args:
        dynamic_batch: the batch axis of the input and every output is symbolic.
        dynamic_spatial: the input's height and width are symbolic too.

    Raises:
        UnsupportedError: the exporter refused the model or the opset.
    """
    names = _output_names(outputs)
    dynamic_axes = None
    if dynamic_batch or dynamic_spatial:
        dynamic_axes = {name: {0: "batch"} for name in [INPUT_NAME, *names]}
        if dynamic_spatial:
            dynamic_axes[INPUT_NAME] = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter announces its own deprecation
            torch.onnx.export(
                model, (x,), buffer, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                output_names=names, dynamic_axes=dynamic_axes, do_constant_folding=True,
            )
    except Exception as error:  # noqa: BLE001 - the exporter raises many types for one cause
        raise UnsupportedError(f"torch.onnx.export (opset {opset}) failed: {first_line(error)}") from None
    return buffer.getvalue()


def validate_graph(onnx: Any, data: bytes) -> None:
    """Run ``onnx.checker`` on the graph.

    Raises:
        UnsupportedError: the checker rejects it.
    """
    try:
        onnx.checker.check_model(onnx.load_from_string(data))
    except Exception as error:  # noqa: BLE001 - onnx raises ValidationError and friends
        raise UnsupportedError(f"the exported ONNX graph is invalid: {first_line(error)}") from None


def with_metadata(onnx: Any, data: bytes, metadata: dict[str, str]) -> bytes:
    """Add ``metadata_props`` (sorted, so equal inputs give equal bytes); the graph is unchanged."""
    proto = onnx.load_from_string(data)
    for key in sorted(metadata):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, metadata[key]
    return proto.SerializeToString()


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def slim_graph(data: bytes) -> tuple[bytes, dict[str, Any]]:
    """Pass the graph through onnxslim (constant folding, dead and redundant node removal).

    Returns:
        The slimmed graph and ``{"onnxslim": version, "nodes_before": n, "nodes_after": m}``.
    Raises:
        InputError: onnxslim is not installed; UnsupportedError: it failed on the graph.
    """
    try:
        import onnx
        import onnxslim
    except ImportError as error:
        raise InputError(f"--slim needs onnxslim: {error}", hint=SLIM_HINT) from None
    proto = onnx.load_from_string(data)
    before = len(proto.graph.node)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):  # it may print a summary
            warnings.simplefilter("ignore")
            slimmed = onnxslim.slim(proto)
    except Exception as error:  # noqa: BLE001 - a third-party optimizer raises anything
        raise UnsupportedError(f"onnxslim failed on the exported graph: {first_line(error)}",
                               hint="export without --slim") from None
    if slimmed is None:
        raise UnsupportedError("onnxslim returned no graph", hint="export without --slim")
    version = getattr(onnxslim, "__version__", None) or _installed_version("onnxslim")
    return slimmed.SerializeToString(), {"onnxslim": version, "nodes_before": before,
                                         "nodes_after": len(slimmed.graph.node)}


def _installed_version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
