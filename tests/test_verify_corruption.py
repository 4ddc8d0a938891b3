"""``repvgg verify`` catches every corruption of every fused tensor of both sample checkpoints.

tests/test_cli.py tampers with one block (stage2.1) and one passthrough key of the tiny sample.
Here every fused tensor (each block's weight and bias) of repvgg_tiny and plain_net is changed,
one at a time, in a ``.safetensors`` re-saved with the very same metadata header (and the tiny
sample also as ``.pt``):

* the largest-magnitude element by 1%: the sha256 and the numerical probe both fail, the block
  is named, and ``--against`` the train-form source fails it too;
* the same change with the recorded sha256 edited to match: the recorded probe alone catches it;
* one ULP on the smallest element: only the sha256 sees it (``--against`` is numerical by design
  and accepts a change far below the tolerance: shown for one tensor per sample);
* the key renamed (every one) or removed (one per sample; test_cli.py has more): exit 1 naming
  the block (``--against`` too: checked for a few).
Passthrough (non-block) tensors tampered, removed or renamed fail as well.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from repvgg_cli.io.metadata import METADATA_KEY, tensor_sha256
from tests.helpers import error_lines, invoke, SAMPLES

SOURCES = {"repvgg_tiny": SAMPLES / "repvgg_tiny.pt", "plain_net": SAMPLES / "plain_net.pt"}
BLOCKS = {
    "repvgg_tiny": [("stage0", "stage0.rbr_reparam"), ("stage1.0", "stage1.0.rbr_reparam"),
                    ("stage2.0", "stage2.0.rbr_reparam"), ("stage2.1", "stage2.1.rbr_reparam"),
                    ("stage3.0", "stage3.0.rbr_reparam"), ("stage3.1", "stage3.1.rbr_reparam"),
                    ("stage4.0", "stage4.0.rbr_reparam")],
    "plain_net": [(f"features.{i}", f"features.{i}") for i in (0, 2, 4, 6)],
}
PASSTHROUGH = {"repvgg_tiny": ["linear.weight", "linear.bias"], "plain_net": ["head.weight", "head.bias"]}
FUSED = [(sample, block, f"{prefix}.{part}") for sample, blocks in BLOCKS.items()
         for block, prefix in blocks for part in ("weight", "bias")]
FUSED_IDS = [key for _, _, key in FUSED]


def verify_json(path: Path, *extra: object) -> tuple[int, dict, list[str]]:
    """``repvgg verify PATH --json``: exit code, the document, the ``Error:`` lines."""
    result = invoke("verify", path, "--json", *extra)
    assert "Traceback" not in result.stdout + result.stderr
    return result.exit_code, json.loads(result.stdout), error_lines(result)


# -- files ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deploy(tmp_path_factory) -> dict[str, Path]:
    """Each sample converted to .safetensors, and the tiny one to .pt as well; all verify clean."""
    folder = tmp_path_factory.mktemp("deploy")
    paths = {}
    for sample, source in SOURCES.items():
        paths[sample] = folder / f"{sample}.safetensors"
        assert invoke("convert", source, paths[sample]).exit_code == 0
    paths["repvgg_tiny.pt"] = folder / "repvgg_tiny_deploy.pt"
    assert invoke("convert", SOURCES["repvgg_tiny"], paths["repvgg_tiny.pt"]).exit_code == 0
    for path in paths.values():
        code, document, errors = verify_json(path)
        assert (code, document["ok"], errors) == (0, True, [])
    return paths


def read(path: Path) -> tuple[OrderedDict[str, torch.Tensor], dict]:
    """Tensors and the repvgg_cli metadata record of a deploy file (.safetensors or .pt)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            tensors = OrderedDict((k, handle.get_tensor(k)) for k in handle.keys())  # noqa: SIM118 - not a dict
            header = handle.metadata()
        return tensors, json.loads(header[METADATA_KEY])
    state = torch.load(path, weights_only=True)
    return OrderedDict(state), json.loads(state._metadata[METADATA_KEY]["json"])


def write(source: Path, tensors: OrderedDict[str, torch.Tensor], record: dict | None, target: Path) -> Path:
    """Re-save ``tensors`` in ``source``'s format with its metadata header (or ``record``, edited)."""
    if source.suffix == ".safetensors":
        with safe_open(str(source), framework="pt") as handle:
            header = dict(handle.metadata())
        if record is not None:
            header[METADATA_KEY] = json.dumps(record)
        save_file(dict(tensors), str(target), metadata=header)
    else:
        original = torch.load(source, weights_only=True)
        state = OrderedDict(tensors)
        state._metadata = OrderedDict(original._metadata)  # type: ignore[attr-defined]
        if record is not None:
            state._metadata[METADATA_KEY] = {"json": json.dumps(record)}  # type: ignore[attr-defined]
        torch.save(state, target)
    return target


def scaled_largest(tensor: torch.Tensor, factor: float = 1.01) -> torch.Tensor:
    changed = tensor.clone()
    flat = changed.view(-1)
    index = int(flat.abs().argmax())
    flat[index] = flat[index] * factor
    return changed


def one_ulp_on_smallest(tensor: torch.Tensor) -> torch.Tensor:
    """The smallest non-zero element moved one float away from zero."""
    changed = tensor.clone()
    flat = changed.view(-1)
    magnitude = flat.abs().masked_fill(flat == 0, float("inf"))
    index = int(magnitude.argmin())
    away = torch.tensor(float("inf") if float(flat[index]) > 0 else float("-inf"), dtype=flat.dtype)
    flat[index] = torch.nextafter(flat[index], away)
    return changed


def tampered(path: Path, key: str, change, tmp_path: Path, fix_hash: bool = False) -> Path:
    tensors, record = read(path)
    before = tensors[key]
    tensors[key] = change(before)
    assert int((tensors[key] != before).sum()) == 1 and tensors[key].dtype == before.dtype
    if fix_hash:
        assert record["tensors"][key] != tensor_sha256(tensors[key])
        record["tensors"][key] = tensor_sha256(tensors[key])
    return write(path, tensors, record if fix_hash else None, tmp_path / f"tampered{path.suffix}")


def assert_names_only(block: str, code: int, document: dict, errors: list[str]) -> dict:
    assert code == 1 and document["ok"] is False
    assert document["failed_blocks"] == [block]
    assert len(errors) == 1 and errors[0].startswith(f"Error: verification failed: block(s) {block} failed")
    return next(b for b in document["blocks"] if b["name"] == block)


# -- every fused tensor -----------------------------------------------------------------------------


@pytest.mark.parametrize(("sample", "block", "key"), FUSED, ids=FUSED_IDS)
def test_one_percent_on_the_largest_element_fails_and_names_the_block(deploy, tmp_path, sample, block, key):
    path = tampered(deploy[sample], key, scaled_largest, tmp_path)
    row = assert_names_only(block, *verify_json(path))
    assert row["problem"] == f"{key} differs from what convert wrote (sha256)"
    assert row["rel_err"] > row["rtol"] == 1e-5
    row = assert_names_only(block, *verify_json(path, "--against", SOURCES[sample]))
    assert row["problem"] is None and row["rel_err"] > 1e-5


@pytest.mark.parametrize(("sample", "block", "key"), FUSED, ids=FUSED_IDS)
def test_a_matching_forged_hash_is_still_caught_by_the_recorded_probe(deploy, tmp_path, sample, block, key):
    path = tampered(deploy[sample], key, scaled_largest, tmp_path, fix_hash=True)
    row = assert_names_only(block, *verify_json(path))
    assert row["problem"] is None  # every hash matches: only the numbers give it away
    assert row["rel_err"] > 2 * row["rtol"]  # stage2.0's weight is the closest call: 2.1e-05


@pytest.mark.parametrize(("sample", "block", "key"), FUSED, ids=FUSED_IDS)
def test_one_ulp_on_the_smallest_element_is_caught_by_the_hash(deploy, tmp_path, sample, block, key):
    path = tampered(deploy[sample], key, one_ulp_on_smallest, tmp_path)
    row = assert_names_only(block, *verify_json(path))
    assert row["problem"] == f"{key} differs from what convert wrote (sha256)"
    assert row["rel_err"] < 1e-6  # numerically invisible
    if key.endswith(("stage0.rbr_reparam.weight", "features.0.weight")):
        # --against recomputes numbers and compares them within the tolerance: by design it accepts this
        code, document, errors = verify_json(path, "--against", SOURCES[sample])
        assert (code, document["ok"], errors) == (0, True, [])


RENAMED = [("renamed", *case) for case in FUSED] + [("removed", *FUSED[0]), ("removed", *FUSED[-1])]


@pytest.mark.parametrize(("how", "sample", "block", "key"), RENAMED, ids=[f"{c[0]}-{c[3]}" for c in RENAMED])
def test_a_removed_or_renamed_fused_key_fails_and_names_the_block(deploy, tmp_path, how, sample, block, key):
    tensors, _ = read(deploy[sample])
    value = tensors.pop(key)
    if how == "renamed":
        tensors[f"{key}_renamed"] = value
    path = write(deploy[sample], tensors, None, tmp_path / "broken.safetensors")
    code, document, errors = verify_json(path)
    row = assert_names_only(block, code, document, errors)
    assert row["problem"] == f"key {key} is missing"
    expected = [f"1 key(s) convert wrote are missing, e.g. {key}"]
    if how == "renamed":
        expected.append(f"1 key(s) convert did not write, e.g. {key}_renamed")
    assert document["problems"] == expected
    if how == "removed" or key in ("stage2.1.rbr_reparam.weight", "features.4.bias"):
        code, document, errors = verify_json(path, "--against", SOURCES[sample])
        assert code == 1 and document["failed_blocks"] == [block]


@pytest.mark.parametrize("key", [k for _, _, k in FUSED if k.startswith("stage")])
def test_every_fused_tensor_of_a_pt_deploy_file(deploy, tmp_path, key):
    block = key.rsplit(".rbr_reparam.", 1)[0]
    path = tampered(deploy["repvgg_tiny.pt"], key, scaled_largest, tmp_path)
    row = assert_names_only(block, *verify_json(path))
    assert row["problem"] == f"{key} differs from what convert wrote (sha256)"
    forged = tampered(deploy["repvgg_tiny.pt"], key, scaled_largest, tmp_path, fix_hash=True)
    row = assert_names_only(block, *verify_json(forged))
    assert row["problem"] is None and row["rel_err"] > 2e-5


# -- passthrough tensors ----------------------------------------------------------------------------

PASSTHROUGH_CASES = [(sample, key) for sample, keys in PASSTHROUGH.items() for key in keys]


@pytest.mark.parametrize(("sample", "key"), PASSTHROUGH_CASES, ids=[k for _, k in PASSTHROUGH_CASES])
def test_a_tampered_passthrough_tensor_fails(deploy, tmp_path, sample, key):
    for change in (scaled_largest, one_ulp_on_smallest):
        path = tampered(deploy[sample], key, change, tmp_path)
        code, document, errors = verify_json(path)
        assert (code, document["failed_blocks"]) == (1, [])
        assert document["problems"] == [f"tensor {key} differs from what convert wrote (sha256)"]
        assert errors == [f"Error: verification failed: tensor {key} differs from what convert wrote (sha256)"]
        code, document, errors = verify_json(path, "--against", SOURCES[sample])
        assert code == 1 and document["problems"] == [f"key {key} differs from the source"]


@pytest.mark.parametrize(("sample", "key"), PASSTHROUGH_CASES, ids=[k for _, k in PASSTHROUGH_CASES])
def test_a_removed_or_renamed_passthrough_key_fails(deploy, tmp_path, sample, key):
    for renamed in (False, True):
        tensors, _ = read(deploy[sample])
        value = tensors.pop(key)
        if renamed:
            tensors[f"{key}_renamed"] = value
        path = write(deploy[sample], tensors, None, tmp_path / "broken.safetensors")
        code, document, errors = verify_json(path)
        assert code == 1 and document["failed_blocks"] == []
        assert document["problems"][0] == f"1 key(s) convert wrote are missing, e.g. {key}"
        assert len(errors) == 1
        code, document, _ = verify_json(path, "--against", SOURCES[sample])
        assert code == 1 and f"key {key} of the source is missing" in document["problems"]


def test_a_passthrough_tensor_with_a_forged_hash_needs_against(deploy, tmp_path):
    """The limit of a self-check: a non-block tensor has no probe, so a change whose sha256 is also
    rewritten in the (unsigned) metadata passes ``verify`` on its own; ``--against`` catches it."""
    path = tampered(deploy["repvgg_tiny"], "linear.weight", scaled_largest, tmp_path, fix_hash=True)
    code, document, errors = verify_json(path)
    assert (code, document["ok"], errors) == (0, True, [])
    code, document, errors = verify_json(path, "--against", SOURCES["repvgg_tiny"])
    assert code == 1 and document["problems"] == ["key linear.weight differs from the source"]
