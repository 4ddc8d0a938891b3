"""``repvgg diff`` and :mod:`repvgg_cli.diff`: key-by-key and block-by-block comparison of checkpoints.

The upstream deploy forms are made by the upstream projects' own conversion math: the official
RepVGG one rewritten here from DingXiaoH/RepVGG ``repvgg.py`` (``RepVGGBlock.get_equivalent_kernel_bias``,
``_fuse_bn_tensor``, ``_pad_1x1_to_3x3_tensor``, ``switch_to_deploy``, ``repvgg_model_convert``:
float32, BN folded per branch, the 1×1 kernel padded to 3×3, the identity as a one-hot 3×3
kernel ``K[i, i % (C/g), 1, 1] = 1``), and timm's own ``timm.utils.reparameterize_model``.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.byobnet import MobileOneBlock, RepVggBlock
from torch import nn

from tests import zoo
from repvgg_cli.api import convert_state_dict
from repvgg_cli.diff.compare import brace_keys, compare_tensors, diff_states, natural_sorted
from repvgg_cli.diff.conversion import key_diff
from repvgg_cli.diff.files import diff_files
from tests.helpers import cli_runner, error_lines, invoke

# -- the official RepVGG conversion, rewritten -------------------------------------------------


def official_fuse_branch(branch, in_channels: int, groups: int):
    """``_fuse_bn_tensor``: (kernel * gamma/std, beta - mean * gamma/std); None gives (0, 0)."""
    if branch is None:
        return 0, 0
    if isinstance(branch, nn.Sequential):
        kernel, bn = branch.conv.weight, branch.bn
    else:
        bn = branch
        per_group = in_channels // groups
        kernel = torch.zeros(in_channels, per_group, 3, 3, dtype=bn.weight.dtype)
        for i in range(in_channels):
            kernel[i, i % per_group, 1, 1] = 1
    std = (bn.running_var + bn.eps).sqrt()
    return kernel * (bn.weight / std).reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * bn.weight / std


def official_equivalent_kernel_bias(block):
    conv = block.rbr_dense.conv
    k3, b3 = official_fuse_branch(block.rbr_dense, conv.in_channels, conv.groups)
    k1, b1 = official_fuse_branch(block.rbr_1x1, conv.in_channels, conv.groups)
    kid, bid = official_fuse_branch(block.rbr_identity, conv.in_channels, conv.groups)
    return k3 + F.pad(k1, [1, 1, 1, 1]) + kid, b3 + b1 + bid


@torch.no_grad()
def official_model_convert(model: nn.Module) -> nn.Module:
    """``repvgg_model_convert``: a copy with every block switched to ``rbr_reparam``."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "rbr_dense"):
            kernel, bias = official_equivalent_kernel_bias(module)
            conv = module.rbr_dense.conv
            module.rbr_reparam = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                           conv.padding, conv.dilation, conv.groups, bias=True)
            module.rbr_reparam.weight.data = kernel
            module.rbr_reparam.bias.data = bias
            for name in ("rbr_dense", "rbr_1x1", "rbr_identity"):
                delattr(module, name)
    return model


def tiny_official() -> nn.Module:
    torch.manual_seed(0)
    model = zoo.repvgg("tiny_g2", num_classes=10, use_se=True)
    zoo.randomize_bn(model, seed=3)
    with torch.no_grad():  # the SE and head biases start random already; make sure nothing is zero
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def save(state, path):
    torch.save({k: v.detach().clone() for k, v in state.items()}, path)
    return path


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(model, train.pt, official deploy.pt, deploy state)."""
    folder = tmp_path_factory.mktemp("official")
    model = tiny_official()
    deploy = official_model_convert(model).state_dict()
    zoo.repvgg("tiny_g2", num_classes=10, use_se=True, deploy=True).load_state_dict(deploy, strict=True)
    return model, save(model.state_dict(), folder / "train.pt"), save(deploy, folder / "upstream_deploy.pt"), deploy


def official_blocks(model) -> list[str]:
    return natural_sorted(name for name, m in model.named_modules() if hasattr(m, "rbr_dense"))


# -- key by key --------------------------------------------------------------------------------


def test_identical_files_exit_0(official):
    model, train, _, _ = official
    result = invoke("diff", train, train)
    assert result.exit_code == 0, result.output
    assert f"Identical: {len(model.state_dict())} key(s) bit-identical." in result.stdout


def test_one_changed_element_exits_1_and_names_the_key_and_the_difference(official, tmp_path):
    model, train, _, _ = official
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = "stage3.1.rbr_1x1.bn.running_mean"
    before = float(state[key][2])
    state[key][2] += 0.25
    changed = save(state, tmp_path / "changed.pt")

    result = invoke("diff", train, changed)
    assert result.exit_code == 1, result.output
    assert key in result.stdout and f"1 of {len(state)} shared key(s) differ" in result.stdout
    report = json.loads(invoke("diff", train, changed, "--json").stdout)
    (different,) = [k for k in report["shared"] if not k["within"]]
    assert different["key"] == key and not different["bit_identical"]
    assert different["max_abs"] == pytest.approx(abs(float(torch.tensor(before + 0.25)) - before), rel=1e-6)
    scale = max(float(state[key].abs().max()), float(model.state_dict()[key].abs().max()))
    assert different["max_rel"] == pytest.approx(different["max_abs"] / scale, rel=1e-12)
    # a tolerance that covers the change makes it the same; one that does not, still different
    assert invoke("diff", train, changed, "--atol", "0.26").exit_code == 0
    assert invoke("diff", train, changed, "--atol", "0.24").exit_code == 1


def test_keys_only_on_one_side_shape_and_dtype_changes(tmp_path):
    generator = torch.Generator().manual_seed(1)
    a = {"w": torch.randn(4, 3, generator=generator), "only_a": torch.randn(2, generator=generator),
         "d": torch.randn(3, generator=generator), "s": torch.randn(5, generator=generator)}
    b = {"w": a["w"].clone(), "only_b": torch.zeros(7, dtype=torch.int64), "d": a["d"].double(), "s": a["s"][:4].clone()}
    diff = diff_states(a, b)
    assert [e.key for e in diff.only_a] == ["only_a"] and [(e.key, e.shape, e.dtype) for e in diff.only_b] == [
        ("only_b", (7,), "int64")]
    by_key = {c.key: c for c in diff.shared}
    assert by_key["w"].bit_identical and by_key["w"].within and by_key["w"].max_abs == 0
    assert by_key["d"].problem == "dtype differs" and not by_key["d"].within and by_key["d"].max_abs == 0
    assert by_key["s"].problem == "shape differs" and by_key["s"].max_abs is None and not by_key["s"].within
    assert not diff.same and {c.key for c in diff.different} == {"d", "s"}
    # a tolerance never excuses a different dtype or shape
    assert {c.key for c in diff_states(a, b, rtol=1.0, atol=1.0).different} == {"d", "s"}


def test_bit_identity_is_bits_not_values():
    zero, negative_zero = torch.zeros(3), torch.tensor([0.0, -0.0, 0.0])
    exact = compare_tensors("z", zero, negative_zero)
    assert exact.max_abs == 0 and not exact.bit_identical and not exact.within
    assert compare_tensors("z", zero, negative_zero, atol=1e-30).within
    nan = torch.tensor([1.0, math.nan])
    assert compare_tensors("n", nan, nan.clone()).within
    other = compare_tensors("n", nan, torch.tensor([1.0, 2.0]), rtol=1.0, atol=1.0)
    assert other.max_abs == math.inf and not other.within
    a, b = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([1.0, -2.0 - 2e-6], dtype=torch.float64)
    close = compare_tensors("c", a, b)
    assert close.max_abs == pytest.approx(2e-6, rel=1e-9) and close.max_rel == pytest.approx(2e-6 / (2.0 + 2e-6), rel=1e-9)
    assert not close.within  # no tolerance given: bit identity
    assert compare_tensors("c", a, b, rtol=close.max_rel * (1 + 1e-9)).within
    assert not compare_tensors("c", a, b, rtol=close.max_rel * (1 - 1e-9)).within


def test_natural_order_of_keys_and_blocks():
    names = ["stages.2.10.w", "stages.2.9.w", "stages.10.0.w", "stages.2.1.w", "head.w"]
    assert natural_sorted(names) == ["head.w", "stages.2.1.w", "stages.2.9.w", "stages.2.10.w", "stages.10.0.w"]
    a = {n: torch.ones(1) for n in names}
    b = {n: torch.full((1,), 2.0) for n in names}
    assert [c.key for c in diff_states(a, b).shared] == natural_sorted(names)


def test_markup_in_key_names_is_printed_as_text_and_tables_fit_80_columns(tmp_path):
    long = "model.backbone.[bold]encoder[/bold].layers.12.attention.output.dense.weight"
    a = {long: torch.ones(3), "x.[red]y": torch.ones(2), "[/]": torch.ones(1)}
    b = {long: torch.full((3,), 1.5), "x.[red]y": torch.ones(2), "[link=file:///etc]z": torch.ones(1)}
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(a, str(pa))
    save_file(b, str(pb))
    result = invoke("diff", pa, pb, runner=cli_runner(columns=80))
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" in result.stdout and ".output.dense.weight" in result.stdout  # shortened in the middle, end kept
    assert "[/]" in result.stdout and "[link=file:///etc]z" in result.stdout
    wide = invoke("diff", pa, pb, runner=cli_runner(columns=200))
    assert long in wide.stdout


# -- train form against upstream deploy forms, block by block ---------------------------------


def test_train_against_the_official_conversion_agrees_block_by_block(official):
    model, train, upstream, _ = official
    result = invoke("diff", train, upstream, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["mode"] == "fused" and report["fused_side"] == "A" and report["same"]
    assert [b["name"] for b in report["blocks"]] == official_blocks(model)
    for block in report["blocks"]:
        assert block["agree"] and block["family"] == "official" and block["rtol"] == 1e-5
        assert [t["key"] for t in block["tensors"]] == [f"{block['name']}.rbr_reparam.{p}" for p in ("bias", "weight")]
        # fp32 vs fp32 of the same math: a few ulps, and never bit-for-bit by chance across all blocks
        assert block["max_rel"] is not None and block["max_rel"] <= 1e-6
    assert any(b["max_abs"] > 0 for b in report["blocks"])  # two computations, really compared
    others = {k["key"] for k in report["shared"]}
    assert others == {"linear.weight", "linear.bias"} | {
        f"{b}.se.{c}.{p}" for b in official_blocks(model) for c in ("down", "up") for p in ("weight", "bias")}
    assert all(k["bit_identical"] for k in report["shared"])
    assert report["only_in_a"] == [] and report["only_in_b"] == [] and report["dropped"] == []

    text = invoke("diff", train, upstream, runner=cli_runner(columns=80))
    assert text.exit_code == 0
    assert "Agree: all 7 fused block(s) of A agree with B" in " ".join(text.stdout.split())


def test_deploy_keys_of_another_layout_are_compared_key_by_key_with_a_note(official, tmp_path):
    _, train, _, deploy = official
    renamed = save({k.replace("rbr_reparam", "fused"): v for k, v in deploy.items()}, tmp_path / "renamed.pt")
    diff = diff_files(train, renamed)
    assert diff.mode == "keys" and not diff.same and diff.keys.only_b and diff.keys.only_a
    assert "A is a train form (7 block(s)) but B has none of its blocks in either form (no stage0.rbr_reparam.weight)" in (
        diff.notes[0])


def test_deploy_first_fuses_the_second_file(official):
    _, train, upstream, _ = official
    report = json.loads(invoke("diff", upstream, train, "--json").stdout)
    assert report["mode"] == "fused" and report["fused_side"] == "B" and report["same"]
    assert report["a"]["role"] == "deploy" and report["b"]["role"] == "train (fused here)"


def test_tampered_official_deploy_names_the_block(official, tmp_path):
    _, train, _, deploy = official
    tampered = {k: v.clone() for k, v in deploy.items()}
    tampered["stage2.1.rbr_reparam.weight"] *= 1.001
    path = save(tampered, tmp_path / "tampered.pt")

    result = invoke("diff", train, path, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    bad = [b for b in report["blocks"] if not b["agree"]]
    assert [b["name"] for b in bad] == ["stage2.1"]
    assert bad[0]["max_rel"] == pytest.approx(1e-3, rel=2e-3)
    (weight,) = [t for t in bad[0]["tensors"] if not t["within"]]
    assert weight["key"] == "stage2.1.rbr_reparam.weight"

    text = invoke("diff", train, path, runner=cli_runner(columns=80)).stdout
    assert max(len(line) for line in text.splitlines()) <= 80
    summary = "Differ: 1 of 7 fused block(s) of A differ from B (stage2.1; rtol 1e-05, max rel 1.0e-03)"
    assert "DIFFERS" in text and summary in " ".join(text.split())


def test_missing_deploy_key_is_reported_for_its_block(official, tmp_path):
    _, train, _, deploy = official
    partial = {k: v for k, v in deploy.items() if k != "stage3.0.rbr_reparam.bias"}
    diff = diff_files(train, save(partial, tmp_path / "partial.pt"))
    (bad,) = diff.disagreeing_blocks
    assert bad.name == "stage3.0" and bad.missing == ("stage3.0.rbr_reparam.bias",) and not diff.same


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0"])
def test_train_against_timms_reparameterize_model_agrees_block_by_block(name, tmp_path):
    torch.manual_seed(0)
    model = zoo.randomize_bn(timm.create_model(name, pretrained=False), seed=5).eval()
    with torch.no_grad():  # timm zero-initialises the head bias: give it values
        model.get_classifier().bias.uniform_(-0.5, 0.5)
    deploy = timm.utils.reparameterize_model(copy.deepcopy(model)).state_dict()
    train_path = tmp_path / "train.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(train_path))
    deploy_path = save(deploy, tmp_path / "timm_deploy.pt")

    diff = diff_files(train_path, deploy_path)
    timm_blocks = natural_sorted(n for n, m in model.named_modules() if isinstance(m, (RepVggBlock, MobileOneBlock)))
    assert diff.mode == "fused" and diff.same, diff.disagreeing_blocks[:1]
    assert [b.name for b in diff.blocks] == timm_blocks
    assert all(b.agree and b.rtol == 1e-5 and b.max_rel <= 1e-6 for b in diff.blocks)
    assert sum(b.max_abs > 0 for b in diff.blocks) > 0
    assert diff.keys.shared and all(c.bit_identical for c in diff.keys.shared)


# -- JSON, errors ------------------------------------------------------------------------------


def test_json_document_structure(official, tmp_path):
    model, train, upstream, deploy = official
    report = json.loads(invoke("diff", train, upstream, "--json").stdout)
    assert set(report) == {"command", "a", "b", "mode", "fused_side", "same", "summary", "rtol", "atol",
                           "only_in_a", "only_in_b", "shared", "blocks", "dropped", "notes"}
    assert report["command"] == "diff" and report["rtol"] == 0 and report["atol"] == 0
    assert set(report["a"]) == {"path", "format", "entry", "keys", "bytes", "sha256", "role", "notes"}
    assert report["a"]["keys"] == len(model.state_dict()) and report["b"]["keys"] == len(deploy) == 7 * 2 + 7 * 4 + 2 and len(report["a"]["sha256"]) == 64
    assert set(report["shared"][0]) == {"key", "shape_a", "shape_b", "dtype_a", "dtype_b", "bit_identical", "max_abs",
                                        "max_rel", "within", "problem"}
    assert set(report["blocks"][0]) == {"name", "family", "eps_note", "agree", "max_abs", "max_rel", "rtol", "atol",
                                        "missing", "problem", "tensors"}
    assert report["summary"].startswith("Agree: all 7 fused block(s) of A agree with B (rtol 1e-05, max rel ")


def test_unreadable_file_exits_2(official, tmp_path):
    _, train, _, _ = official
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    result = invoke("diff", train, junk)
    assert result.exit_code == 2 and error_lines(result)
    assert invoke("diff", train, tmp_path / "missing.pt").exit_code == 2


def test_entry_applies_to_torch_files_and_is_refused_for_two_safetensors(official, tmp_path):
    model, _, _, _ = official
    state = {k: v.clone() for k, v in model.state_dict().items()}
    container = tmp_path / "container.pt"
    torch.save({"model": state, "epoch": 3}, container)
    flat = tmp_path / "flat.safetensors"
    save_file(state, str(flat))
    plain = save(state, tmp_path / "plain.pt")
    for other in (flat, plain):  # the entry applies to the container; the state dict is used as it is
        result = invoke("diff", container, other, "--entry", "model")
        assert result.exit_code == 0, result.output
    assert "--entry model not used: the file is a plain state dict" in result.stderr  # a note: stderr
    assert "--entry" not in result.stdout
    for a, b in ((flat, flat), (plain, flat)):
        result = invoke("diff", a, b, "--entry", "model")
        assert result.exit_code == 2 and "is a container with entries" in result.stderr
    result = invoke("diff", container, plain, "--entry", "ema")
    assert result.exit_code == 2 and error_lines(result)


# -- key_diff: what a conversion did ----------------------------------------------------------


def test_key_diff_lists_removed_added_unchanged_and_catches_a_flipped_passthrough_value():
    model = tiny_official()
    source = model.state_dict()
    result = convert_state_dict(source)
    report = key_diff(source, result.state_dict, result.blocks)

    assert [b.name for b in report.blocks] == official_blocks(model)
    grouped = next(b for b in report.blocks if b.name == "stage3.0")  # groups 2, no identity
    removed = {e.key: (e.shape, e.dtype) for e in grouped.removed}
    assert removed == {k: (tuple(source[k].shape), "float32" if source[k].is_floating_point() else "int64")
                       for k in source if k.startswith("stage3.0.rbr_")}
    assert len(removed) == 2 * (1 + 5)
    assert [(e.key, e.shape, e.dtype) for e in grouped.added] == [
        ("stage3.0.rbr_reparam.bias", (64,), "float32"), ("stage3.0.rbr_reparam.weight", (64, 16, 3, 3), "float32")]
    passthrough = [k for k in source if ".rbr_" not in k]
    assert set(report.unchanged) == set(passthrough) and not report.changed and not report.dropped
    assert report.totals == {"removed": sum(len(b.removed) for b in report.blocks), "added": 14,
                             "unchanged": len(passthrough), "changed": 0, "unverified": 0, "dropped": 0}
    assert report.bytes_before == sum(t.numel() * t.element_size() for t in source.values())
    assert report.bytes_after == sum(t.numel() * t.element_size() for t in result.state_dict.values())

    flipped = dict(result.state_dict)
    flipped["stage1.0.se.up.bias"] = flipped["stage1.0.se.up.bias"].clone()
    flipped["stage1.0.se.up.bias"][0] = -flipped["stage1.0.se.up.bias"][0]
    del flipped["linear.bias"]
    flipped["extra.scale"] = torch.ones(2)
    changed = key_diff(source, flipped, result.blocks)
    assert [c.key for c in changed.changed] == ["stage1.0.se.up.bias"] and changed.changed[0].max_abs > 0
    assert "stage1.0.se.up.bias" not in changed.unchanged
    assert [e.key for e in changed.dropped] == ["linear.bias"] and [e.key for e in changed.added] == ["extra.scale"]

    bare = key_diff(source, result.state_dict, [r.block for r in result.blocks])  # Block objects, no fused result
    assert [[e.key for e in b.added] for b in bare.blocks] == [[e.key for e in b.added] for b in report.blocks]


def test_brace_keys_groups_siblings():
    keys = ["rbr_dense.conv.weight", "rbr_dense.bn.weight", "rbr_dense.bn.bias", "rbr_dense.bn.running_mean", "top"]
    assert brace_keys(keys) == ["rbr_dense.conv.weight", "rbr_dense.bn.{weight,bias,running_mean}", "top"]
