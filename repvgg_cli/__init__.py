"""repvgg_cli: fuse RepVGG-style multi-branch blocks into their deploy form, and prove it.

The public API (imported lazily, so the CLI starts without importing torch)::

    from repvgg_cli import reparameterize, convert_state_dict, convert_file, verify_file

    result = reparameterize(model)            # live model, in place; result.ok, result.blocks
    result = convert_state_dict(state_dict)   # plain state dict -> result.state_dict
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "reparameterize": "convert",
    "convert_state_dict": "convert",
    "ConvertOptions": "convert",
    "ConversionResult": "convert",
    "convert_file": "api",
    "verify_file": "api",
    "verify_deploy": "verify",
    "verify_against": "verify",
    "Tolerance": "verify",
    "load_checkpoint": "io.read",
    "summarize": "inspection",
    "fuse_branches": "fusion",
    "FAMILIES": "families",
    "RepvggError": "errors",
    "InputError": "errors",
    "UnsupportedError": "errors",
    "NotEquivalentError": "errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
