"""Tensors and containers repvgg cannot read are refused with the key, never crash (issue 10,
"Bounded on hostile input").

A weights-only load builds meta, sparse (COO, CSR), nested, complex, float8 and quantized
tensors, and containers ten thousand deep. Before the change ``inspect`` accepted them all and
``convert`` crashed with an internal error (exit 4: "Cannot copy out of meta tensor", "Sparse CSR
tensors do not have is_contiguous", a RecursionError re-saving a deep container) or wrote complex
and float8 tensors through. Now both commands exit 2 with one ``Error:`` line naming the key.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from tests import zoo
from repvgg_cli.errors import InputError
from repvgg_cli.io.read import load_checkpoint
from tests.helpers import error_lines, invoke

BAD = "odd.weight"

pytestmark = [  # torch's own notices when the fixtures build these tensors
    pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage"),
]

KINDS = {
    "meta": (lambda: torch.empty(4, device="meta"), "a meta tensor"),
    "sparse-coo": (lambda: torch.eye(4, dtype=torch.float64).to_sparse(), "a sparse tensor (layout sparse_coo)"),
    "sparse-csr": (lambda: torch.eye(4, dtype=torch.float64).to_sparse_csr(), "a sparse tensor (layout sparse_csr)"),
    "nested": (lambda: torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)]), "a nested tensor"),
    "complex64": (lambda: torch.zeros(4, dtype=torch.complex64), "a complex64 tensor"),
    "complex128": (lambda: torch.zeros(4, dtype=torch.complex128), "a complex128 tensor"),
    "float8": (lambda: torch.zeros(4).to(torch.float8_e4m3fn), "a float8_e4m3fn tensor"),
    "float8-e5m2": (lambda: torch.zeros(4).to(torch.float8_e5m2), "a float8_e5m2 tensor"),
    "quantized": (lambda: torch.quantize_per_tensor(torch.zeros(4), 0.1, 0, torch.qint8),
                  "a quantized tensor (qint8)"),
}


def block_state() -> OrderedDict[str, torch.Tensor]:
    """One official RepVGG block with random BN statistics (a checkpoint convert would fuse)."""
    torch.manual_seed(0)
    block = zoo.randomize_bn(zoo.OfficialBlock(8, 8, stride=1), seed=1).double()
    return OrderedDict((f"stage1.0.{k}", v) for k, v in block.state_dict().items())


@pytest.fixture(scope="module")
def kind_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("kinds")
    files = {}
    for name, (make, _) in KINDS.items():
        state = block_state()
        state[BAD] = make()
        files[name] = folder / f"{name}.pt"
        torch.save(state, files[name])
    return files


@pytest.mark.parametrize("kind", list(KINDS))
def test_inspect_and_convert_refuse_the_tensor_naming_its_key(tmp_path: Path, kind_files, kind: str) -> None:
    path, what = kind_files[kind], KINDS[kind][1]
    for args in (["inspect", path], ["convert", path, tmp_path / "out.safetensors"],
                 ["convert", path, tmp_path / "out.pt"]):
        result = invoke(*args)
        errors = error_lines(result)
        assert result.exit_code == 2, (args, result.stderr)
        assert len(errors) == 1 and errors[0].startswith(f"Error: {path}: key {BAD} holds {what}"), errors
        assert "Traceback" not in result.stdout + result.stderr
    assert not list(tmp_path.iterdir())


def test_a_key_in_a_container_entry_is_named_with_its_entry(tmp_path: Path) -> None:
    path = tmp_path / "container.pt"
    state = block_state()
    state[BAD] = torch.zeros(2, dtype=torch.complex64)
    torch.save({"model": state, "epoch": 3}, path)
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    assert info.value.message.startswith(f"{path}: entry 'model', key {BAD} holds a complex64 tensor")


def test_safetensors_sources_are_checked_alike(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "f8.safetensors"
    save_file({**block_state(), BAD: torch.zeros(4).to(torch.float8_e4m3fn)}, path)
    result = invoke("inspect", path)
    assert result.exit_code == 2
    assert error_lines(result)[0].startswith(f"Error: {path}: key {BAD} holds a float8_e4m3fn tensor")


def test_readable_dtypes_still_load(tmp_path: Path) -> None:
    path = tmp_path / "fine.pt"
    state = block_state()
    extra = {"a": torch.zeros(3, dtype=torch.bfloat16), "b": torch.ones(2, dtype=torch.bool),
             "c": torch.arange(3, dtype=torch.uint8), "d": torch.zeros(2, dtype=torch.float16),
             "e": torch.arange(2, dtype=torch.int32), "f": torch.zeros(1, 2).expand(3, 2)}
    torch.save({**state, **extra}, path)
    loaded = load_checkpoint(path)
    for key, value in extra.items():
        assert torch.equal(loaded.state_dict[key], value), key


# -- deep containers -----------------------------------------------------------------------------


def _save_deep(path: Path, kind: str, depth: int) -> None:
    """torch.save itself recurses once per level: save from a thread with room for it."""
    errors = []

    def save() -> None:
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(depth * 4 + 1000)
        try:
            nested: object = {"leaf": torch.zeros(1)} if kind == "dict" else [torch.zeros(1)]
            for _ in range(depth):
                nested = {"k": nested} if kind == "dict" else [nested]
            torch.save({"state_dict": block_state(), "config": nested}, path)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            sys.setrecursionlimit(limit)

    size = threading.stack_size(256 << 20)
    try:
        thread = threading.Thread(target=save)
        thread.start()
        thread.join()
    finally:
        threading.stack_size(size)
    assert not errors, errors


@pytest.fixture(scope="module")
def deep_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("deep")
    files = {}
    for kind in ("dict", "list"):
        files[kind] = folder / f"deep-{kind}.pt"
        _save_deep(files[kind], kind, 10_000)
    return files


@pytest.mark.parametrize("kind", ["dict", "list"])
def test_containers_ten_thousand_deep_are_refused_naming_the_entry(tmp_path: Path, deep_files, kind: str) -> None:
    path = deep_files[kind]
    for args in (["inspect", path], ["convert", path, tmp_path / "out.safetensors"],
                 ["convert", path, tmp_path / "out.pt"]):
        result = invoke(*args)
        errors = error_lines(result)
        assert result.exit_code == 2, (args, result.stderr)
        assert errors == [(f"Error: {path}: entry 'config' holds containers nested 10002 deep, more than the 100 "
                          "repvgg reads")], errors
    assert not list(tmp_path.iterdir())


def test_a_self_referencing_container_loads(tmp_path: Path) -> None:
    """A list that contains itself pickles (memo) and unpickles weights-only: the walk ends."""
    loop: list = [1]
    loop.append(loop)
    path = tmp_path / "loop.pt"
    torch.save({"state_dict": block_state(), "loop": loop}, path)
    loaded = load_checkpoint(path)
    assert loaded.entry == "state_dict" and loaded.raw["loop"][1] is loaded.raw["loop"]
