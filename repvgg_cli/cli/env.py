"""``repvgg env``: the versions and settings a bug report needs, in one block to paste."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

from .. import __version__
from .app import app, handle_errors, print_json, stdout_console
from .options import DebugOption, JsonOption

PACKAGES = ("torch", "timm", "onnx", "onnxruntime", "onnxslim", "safetensors", "numpy", "typer", "rich")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """What ``repvgg env`` reports: versions, the torch build and devices, threads."""
    import torch

    cpus = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on every platform
        usable = cpus
    cuda = torch.cuda.is_available()
    return {
        "command": "env",
        "repvgg_cli": __version__,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "executable": sys.executable,
        "packages": {name: _installed(name) for name in PACKAGES},
        "torch": {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "cuda_available": cuda,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            "default_dtype": str(torch.get_default_dtype()).replace("torch.", ""),
        },
        "threads": {
            "torch_intra_op": torch.get_num_threads(),
            "torch_inter_op": torch.get_num_interop_threads(),
            "cpu_count": cpus,
            "usable_cpus": usable,
            "environment": {name: os.environ[name] for name in THREAD_VARIABLES if name in os.environ},
        },
    }


def environment_lines(info: dict[str, Any]) -> list[str]:
    """The report as ``name: value`` lines; a package that is not installed says so."""
    torch_info, threads = info["torch"], info["threads"]
    cuda = (f"CUDA {torch_info['cuda']}, " if torch_info["cuda"] else "CPU build, ") + (
        f"{len(torch_info['gpus'])} GPU(s): {', '.join(torch_info['gpus'])}" if torch_info["cuda_available"]
        else "no GPU visible")
    lines = [
        f"repvgg_cli: {info['repvgg_cli']}",
        f"python: {info['python']} ({info['executable']})",
        f"platform: {info['platform']}",
    ]
    for name, version in info["packages"].items():
        if name == "torch":  # torch's own version string names its build (+cpu, +cu130)
            lines.append(f"torch: {torch_info['version']} ({cuda})")
        else:
            lines.append(f"{name}: {version or 'not installed'}")
    variables = ", ".join(f"{k}={v}" for k, v in threads["environment"].items()) or "none set"
    lines.append(f"threads: torch {threads['torch_intra_op']} intra-op, {threads['torch_inter_op']} inter-op; "
                 f"{threads['usable_cpus']} of {threads['cpu_count']} CPU(s) usable; {variables}")
    return lines


@app.command()
@handle_errors
def env(as_json: JsonOption = False, debug: DebugOption = False) -> None:
    """Versions of repvgg_cli, Python, torch, timm, onnx, onnxruntime, and threads: paste it into a bug report."""
    info = environment()
    if as_json:
        print_json(info)
        return
    console = stdout_console()
    for line in environment_lines(info):
        console.print(line, markup=False, highlight=False)
