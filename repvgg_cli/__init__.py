"""repvgg_cli: fuse RepVGG-style multi-branch blocks into their deploy form, and prove it.

The public API (imported lazily, so the CLI starts without importing torch)::

    from repvgg_cli import reparameterize, convert_state_dict, convert_file, verify_file

    result = reparameterize(model)            # live model -> a converted copy: result.model, result.ok
    result = convert_state_dict(state_dict)   # plain state dict -> result.state_dict
    outcome = convert_file("train.pt", "deploy.safetensors")   # what `repvgg convert` does
    report = verify_file("deploy.safetensors")                 # what `repvgg verify` does

Errors raised through these functions name their arguments (``force=True``), not CLI flags; see
:mod:`repvgg_cli.api`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "reparameterize": "api",
    "convert_state_dict": "api",
    "convert_file": "api",
    "verify_file": "api",
    "ConvertOptions": "api",
    "ConversionResult": "api",
    "ConvertOutcome": "api",
    "VerifyReport": "verify",
    "verify_deploy": "verify",
    "verify_against": "verify",
    "Tolerance": "checks.tolerance",
    "load_checkpoint": "io.read",
    "summarize": "inspection",
    "fuse_branches": "fusion.sum",
    "FAMILIES": "families",
    "RepvggError": "errors",
    "InputError": "errors",
    "UnsupportedError": "errors",
    "PickleRefusedError": "errors",
    "OutputExistsError": "errors",
    "NotEquivalentError": "errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
