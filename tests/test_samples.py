"""The bundled sample checkpoints: reproducible bit-for-bit by scripts/make_samples.py, and sane."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import zoo

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_samples.py"
SAMPLES = ROOT / "sample_checkpoints"

EXPECTED = [
    "SHA256SUMS",
    "plain_net.pt",
    "plain_net.safetensors",
    "plain_net_train.pt",
    "repvgg_tiny.pt",
    "repvgg_tiny.safetensors",
    "repvgg_tiny_train.pt",
]
MODELS = {
    "repvgg_tiny": lambda: zoo.repvgg("tiny_g2", num_classes=10),
    "plain_net": lambda: zoo.PlainNet(),
}


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("samples")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(ROOT),
    )
    return out, proc


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bare(name: str) -> dict[str, torch.Tensor]:
    return torch.load(SAMPLES / f"{name}.pt", map_location="cpu", weights_only=True)


def test_script_runs_quietly(regenerated: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, proc = regenerated
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert len(lines) == len(EXPECTED)
    assert all(line.startswith("wrote ") for line in lines)
    assert sorted(p.name for p in out.iterdir()) == EXPECTED


def test_regenerated_files_are_byte_identical(regenerated: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, proc = regenerated
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in SAMPLES.iterdir()) == EXPECTED
    for name in EXPECTED:
        assert (out / name).read_bytes() == (SAMPLES / name).read_bytes(), f"{name} differs from the committed sample"


def test_sha256sums_match() -> None:
    entries = [line.split("  ", 1) for line in (SAMPLES / "SHA256SUMS").read_text(encoding="utf-8").splitlines()]
    names = [name for _, name in entries]
    assert names == sorted(names)
    assert names == [n for n in EXPECTED if n != "SHA256SUMS"]
    for digest, name in entries:
        assert _sha256(SAMPLES / name) == digest, name


def test_folder_under_5mb() -> None:
    total = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert total < 5 * 1024 * 1024


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bn_statistics_are_trained(name: str) -> None:
    sd = _bare(name)
    means = [v for k, v in sd.items() if k.endswith("running_mean")]
    variances = [v for k, v in sd.items() if k.endswith("running_var")]
    assert means and len(means) == len(variances)
    for mean, var in zip(means, variances):
        assert mean.abs().max().item() > 1e-3
        assert (var - 1).abs().max().item() > 1e-3
    counts = [v.item() for k, v in sd.items() if k.endswith("num_batches_tracked")]
    assert counts and all(c > 0 for c in counts)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_files_load_and_agree(name: str) -> None:
    sd = _bare(name)
    st = load_file(str(SAMPLES / f"{name}.safetensors"))
    assert st.keys() == sd.keys()
    for k in sd:
        assert torch.equal(st[k], sd[k]), k

    train = torch.load(SAMPLES / f"{name}_train.pt", map_location="cpu", weights_only=True)
    assert set(train) == {"model", "optimizer", "epoch"}
    assert isinstance(train["epoch"], int) and train["epoch"] > 0
    assert set(train["optimizer"]) == {"state", "param_groups"}
    assert train["optimizer"]["state"], "optimizer state (momentum buffers) expected"
    assert all(k.startswith("module.") for k in train["model"])
    stripped = {k[len("module."):]: v for k, v in train["model"].items()}
    assert stripped.keys() == sd.keys()
    for k in sd:
        assert torch.equal(stripped[k], sd[k]), k

    model = MODELS[name]()
    model.load_state_dict(sd, strict=True)
    model.load_state_dict(st, strict=True)


def test_repvgg_sample_covers_block_kinds() -> None:
    sd = _bare("repvgg_tiny")
    blocks = list(dict.fromkeys(k.rsplit(".rbr_dense.", 1)[0] for k in sd if ".rbr_dense." in k))  # network order
    with_identity = [b for b in blocks if f"{b}.rbr_identity.running_var" in sd]
    without_identity = [b for b in blocks if f"{b}.rbr_identity.running_var" not in sd]
    # A block is grouped when its kernel sees fewer channels than the previous block puts out.
    grouped = [
        b
        for prev, b in zip(blocks, blocks[1:])
        if sd[f"{b}.rbr_dense.conv.weight"].shape[1] < sd[f"{prev}.rbr_dense.conv.weight"].shape[0]
    ]
    assert with_identity and without_identity
    assert grouped == ["stage2.0", "stage3.0"]  # layers 2 and 4 of tiny_g2
