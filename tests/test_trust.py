"""No silent wrong answer (issue 10): what the checkpoint cannot decide is never taken on trust.

Each test here fails on the code the issue was filed against:
* verify --against took eps, dropped keys, QARepVGG options from the file under test;
* a deploy header's geometry was trusted before allocating (a claimed dilation of 8000: 18 GB);
* BN eps nobody decided was used without a word; YOLOv6's 1e-3 was not recognised;
* a block with an identity BN was probed with unit-scale noise only;
* a float16 write that fails its check had no way out (--dtype).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from repvgg_cli import checks
from repvgg_cli.api import convert_state_dict
from repvgg_cli.checks.probe import branches_probe, eps_sensitivity
from repvgg_cli.pipeline.options import ConvertOptions
from tests import zoo
from tests.helpers import SAMPLES, error_lines, invoke

TINY = SAMPLES / "repvgg_tiny.pt"


def _metadata(path: Path) -> dict:
    size = struct.unpack("<Q", path.read_bytes()[:8])[0]
    return json.loads(json.loads(path.read_bytes()[8 : 8 + size])["__metadata__"]["repvgg_cli"])


def _rewrite_metadata(path: Path, edit) -> None:
    """Edit a safetensors file's repvgg metadata in place (keeping the data where it is)."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    metadata = json.loads(header["__metadata__"]["repvgg_cli"])
    edit(metadata)
    header["__metadata__"]["repvgg_cli"] = json.dumps(metadata, sort_keys=True, separators=(",", ":"))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size:])


# -- verify --against takes nothing from the file under test ------------------------------------


def test_verify_against_takes_eps_from_the_command_line_not_from_the_file(tmp_path: Path) -> None:
    deploy = tmp_path / "d.safetensors"
    assert invoke("convert", TINY, deploy, "--bn-eps", "0.5").exit_code == 0
    assert invoke("verify", deploy).exit_code == 0  # on its own: the file is what convert checked
    result = invoke("verify", deploy, "--against", TINY)
    assert result.exit_code == 1  # the source with eps 1e-5 is another model: the file says 0.5
    assert "the file says it was converted with --bn-eps 0.5" in result.stdout
    assert error_lines(result)[0].startswith("Error: verification failed: block(s) stage0")
    told = invoke("verify", deploy, "--against", TINY, "--bn-eps", "0.5")
    assert told.exit_code == 0, told.stdout + told.stderr


def test_verify_against_takes_the_dtype_from_the_command_line(tmp_path: Path) -> None:
    state = zoo.randomize_bn(zoo.repvgg("tiny_g2", num_classes=10), seed=3).half().state_dict()
    source, deploy = tmp_path / "half.pt", tmp_path / "d.safetensors"
    torch.save(state, source)
    assert invoke("convert", source, deploy, "--dtype", "float32").exit_code == 0
    assert {t.dtype for t in load_file(str(deploy)).values()} == {torch.float32}
    assert invoke("verify", deploy, "--against", source).exit_code == 1  # float16 expected: it says so
    assert invoke("verify", deploy, "--against", source, "--dtype", "float32").exit_code == 0


def test_verify_against_does_not_take_dropped_keys_from_the_file(tmp_path: Path) -> None:
    """The training-only keys dropped are the families' rule, recomputed from the source: a file
    that claims to have dropped a real key (and lacks it) fails."""
    state = zoo.repvgg("tiny").state_dict()
    state["stage2_aux.0.weight"] = torch.randn(4, 8, 3, 3)
    source, deploy = tmp_path / "s.pt", tmp_path / "d.safetensors"
    torch.save(state, source)
    assert invoke("convert", source, deploy).exit_code == 0
    assert invoke("verify", deploy, "--against", source).exit_code == 0  # the aux head is dropped by rule
    tensors = load_file(str(deploy))
    del tensors["linear.bias"]
    lying = tmp_path / "lying.safetensors"
    from safetensors.torch import save_file

    metadata = _metadata(deploy)
    metadata["dropped_keys"].append("linear.bias")
    save_file(tensors, str(lying), metadata={"format": "pt", "repvgg_cli": json.dumps(metadata)})
    result = invoke("verify", lying, "--against", source)
    assert result.exit_code == 1 and "key linear.bias of the source is missing" in result.stdout


# -- verify bounds its work -------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "message"), [
    ("dilation", [8000, 8000], "spans 16001 pixels, over 4096"),
    ("kernel", [5000, 5000], "spans 5000 pixels, over 4096"),
    ("padding", [900, 900], "padding [900, 900] is wider than the kernel's extent"),
    ("stride", [100000, 1], "stride [100000, 1] is over 4096"),
])
def test_a_header_claiming_an_absurd_geometry_is_refused_before_any_allocation(
        tmp_path: Path, field: str, value, message: str) -> None:
    deploy = tmp_path / "d.safetensors"
    assert invoke("convert", TINY, deploy).exit_code == 0

    def edit(metadata: dict) -> None:
        metadata["blocks"][0][field] = value

    _rewrite_metadata(deploy, edit)
    result = invoke("verify", deploy)
    assert result.exit_code == 2
    assert message in error_lines(result)[0] and "(block stage0)" in error_lines(result)[0]


# -- eps: decided, or said to be undecided --------------------------------------------------------


def test_undecided_eps_is_reported_with_the_blocks_it_changes(tmp_path: Path) -> None:
    result = invoke("convert", TINY, tmp_path / "d.safetensors", "--json")
    document = json.loads(result.stdout)
    assert document["bn_eps"]["source"] == ["default"]
    assert {s["block"] for s in document["bn_eps"]["sensitive"]} == {b["name"] for b in document["blocks"]}
    assert all(s["rel_change_with_1e-3"] > b["rtol"] for s, b in zip(document["bn_eps"]["sensitive"],
                                                                       document["blocks"]))
    assert "pass --bn-eps" in result.stderr
    metadata = _metadata(tmp_path / "d.safetensors")
    assert {b["eps_source"] for b in metadata["blocks"]} == {"default"}


def test_an_eps_the_architecture_decides_is_used_and_not_warned_about(tmp_path: Path) -> None:
    """YOLOv6's RepVGGBlock has the official block's keys exactly; the whole layout says YOLOv6,
    whose BNs all have eps 1e-3 (with 1e-5 the blocks are off by up to 1e-3 relative)."""
    from tests.family_zoo import yolov6

    state = yolov6.train_model("repvgg").state_dict()
    result = convert_state_dict(state)
    official = [r for r in result.blocks if r.block.family == "official"]
    assert official and {r.block.eps_source for r in official} == {"family"}
    assert {r.block.eps_note for r in official} == {"yolov6 default"}
    assert all(bn.eps == 1e-3 for r in official for c in r.block.branches.convs for bn in [c.bn] if bn is not None)
    assert result.eps_sensitive == ()
    torch.save(state, tmp_path / "v6.pt")
    cli = invoke("convert", tmp_path / "v6.pt", tmp_path / "d.pt")
    assert cli.exit_code == 0 and "Warning: BN eps" not in cli.stderr


def test_eps_sensitivity_is_what_the_block_computes_with_the_other_eps() -> None:
    torch.manual_seed(0)
    block = zoo.randomize_bn(zoo.OfficialBlock(8, 8), seed=4).eval()
    from repvgg_cli.families.modules import ModuleView
    from repvgg_cli.families import family_by_name

    branches = family_by_name("official").expression(ModuleView(block, "b"))
    x = branches_probe(branches, checks.block_seed(0, "b"))  # both samples, as the check
    block = block.double()

    def branches_sum(t):  # the block's linear part: what is fused (ReLU and SE come after)
        return block.rbr_dense(t) + block.rbr_1x1(t) + block.rbr_identity(t)

    with torch.no_grad():
        base = branches_sum(x)
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eps = 1e-3
        other = branches_sum(x)
    centre = (base.shape[2] // 2, base.shape[3] // 2)
    want = float((base - other)[:, :, centre[0], centre[1]].abs().max() / base[:, :, centre[0], centre[1]].abs().max())
    got = eps_sensitivity("b", branches, 0)
    assert got == pytest.approx(want, rel=1e-6)


# -- the probe sees data like the model's own -----------------------------------------------------


def test_a_block_with_an_identity_bn_is_also_probed_with_its_input_statistics() -> None:
    torch.manual_seed(0)
    block = zoo.randomize_bn(zoo.OfficialBlock(8, 8), seed=5).eval()
    with torch.no_grad():
        block.rbr_identity.running_mean.copy_(torch.linspace(-40, 40, 8))
        block.rbr_identity.running_var.copy_(torch.linspace(1, 400, 8))
    from repvgg_cli.families import family_by_name
    from repvgg_cli.families.modules import ModuleView

    branches = family_by_name("official").expression(ModuleView(block, "b"))
    x = branches_probe(branches, 0)
    assert x.shape[0] == 2
    assert torch.equal(x[:1], checks.block_probe(8, (3, 3), (1, 1), 0, padding=(1, 1)))  # what a file records
    sample = x[1]
    assert float(sample.mean((1, 2))[0]) < -20 and float(sample.mean((1, 2))[-1]) > 20
    # the statistics sample makes the reported error the error on such data (here larger: the
    # inputs are far from unit scale, and the fp16 rounding of the weights shows with them)
    from repvgg_cli.families import find_blocks
    from repvgg_cli.fusion.sum import fuse_branches

    state = {f"b.{k}": v.half() for k, v in block.state_dict().items()}
    found = find_blocks(state)[0]
    fused64 = fuse_branches(found.branches)
    shipped = fused64.to(torch.float16)
    both = checks.check_block("b", found.branches, fused64, shipped, 0, checks.Tolerance())
    import repvgg_cli.checks.probe as probe_module

    original = probe_module.branches_probe
    try:
        probe_module.branches_probe = lambda branches, seed: original(branches, seed)[:1]
        unit_only = checks.check_block("b", found.branches, fused64, shipped, 0, checks.Tolerance())
    finally:
        probe_module.branches_probe = original
    assert both.max_abs_err >= unit_only.max_abs_err and both.scale > unit_only.scale  # the sample counts
    assert torch.equal(both.reference, unit_only.reference)  # what the file records: the first sample


def test_a_failed_half_precision_write_says_how_to_write_it_exactly(tmp_path: Path) -> None:
    state = zoo.randomize_bn(zoo.repvgg("tiny_g2", num_classes=10), seed=3).half().state_dict()
    source = tmp_path / "half.pt"
    torch.save(state, source)
    failed = invoke("convert", source, tmp_path / "a.safetensors", "--rtol", "1e-6")
    assert failed.exit_code == 1 and not (tmp_path / "a.safetensors").exists()
    assert "Hint: the fused weights were rounded to float16; --dtype float32" in failed.stderr
    fine = invoke("convert", source, tmp_path / "b.safetensors", "--rtol", "1e-6", "--dtype", "float32")
    assert fine.exit_code == 0, fine.stderr


def test_dtype_writes_every_floating_tensor_in_the_dtype_asked() -> None:
    state = zoo.randomize_bn(zoo.repvgg("tiny_g2", num_classes=10), seed=3).state_dict()
    result = convert_state_dict(state, ConvertOptions(dtype="bfloat16"))
    floating = {t.dtype for t in result.state_dict.values() if t.is_floating_point()}
    assert floating == {torch.bfloat16}
    assert all(r.check.ok and r.check.rtol == checks.default_rtol(torch.bfloat16) for r in result.blocks)
