"""Patterns around the families: unrecognised multi-branch blocks, --fuse-conv-bn, dropped aux heads."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from tests import zoo
from repvgg_cli.cli import app
from repvgg_cli.api import ConvertOptions, convert_state_dict, reparameterize
from repvgg_cli.errors import InputError
from repvgg_cli.families import unrecognised_blocks


def renamed_plain_state(blocks: tuple[str, ...] = ("features.0", "features.2", "features.4", "features.6")
                        ) -> dict[str, torch.Tensor]:
    """A plain-block net whose branches (in ``blocks``) carry names no family knows: parallel conv+BN pairs."""
    state = zoo.randomize_bn(zoo.PlainNet(), seed=5).state_dict()
    names = {"conv3x3": "convk", "bn3x3": "bnk", "conv1x1": "convp", "bn1x1": "bnp"}
    out = {}
    for key, value in state.items():
        if key.rsplit(".", 2)[0] in blocks:
            for old, new in names.items():
                key = key.replace(f".{old}.", f".{new}.")
        out[key] = value
    return out


def test_unknown_parallel_branches_are_refused_not_passed_through(tmp_path):
    state = renamed_plain_state(("features.2",))
    with pytest.raises(InputError) as refused:
        convert_state_dict(state)
    assert refused.value.exit_code == 2
    assert "1 group(s) of keys look like re-parameterization branches that no family claims: features.2 " \
           "(parallel conv+BN branches convk (3x3), convp (1x1))" in refused.value.message
    assert "passthrough=('features.2*',)" in refused.value.hint  # the library's words; the CLI's below
    torch.save(state, tmp_path / "odd.pt")
    runner = CliRunner()
    converted = runner.invoke(app, ["convert", str(tmp_path / "odd.pt"), str(tmp_path / "out.pt")])
    assert converted.exit_code == 2 and not (tmp_path / "out.pt").exists()
    assert "features.2 (parallel conv+BN branches" in converted.stderr
    assert "--passthrough 'features.2*'" in converted.stderr
    # said to stay: the other blocks are fused, these keys pass through as they are
    allowed = runner.invoke(app, ["convert", str(tmp_path / "odd.pt"), str(tmp_path / "out.pt"), "--json",
                                  "--passthrough", "features.2*"])
    assert allowed.exit_code == 0, allowed.stderr
    assert [b["name"] for b in json.loads(allowed.stdout)["blocks"]] == ["features.0", "features.4", "features.6"]
    written = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(written["features.2.convk.weight"], state["features.2.convk.weight"])
    inspected = runner.invoke(app, ["inspect", str(tmp_path / "odd.pt"), "--json"])
    assert inspected.exit_code == 0
    assert [u["prefix"] for u in json.loads(inspected.stdout)["unrecognised"]] == ["features.2"]
    table = runner.invoke(app, ["inspect", str(tmp_path / "odd.pt")], env={"COLUMNS": "200"})
    assert "not recognised: features.2" in table.stdout


def test_branch_names_no_family_claims_are_refused():
    """Keys named like a project's branches (DBB, OREPA, RepLKNet, RepGhost ...) that no family claims."""
    state = zoo.randomize_bn(zoo.PlainNet(), seed=5).state_dict()
    for extra in ({"head2.dbb_avg.conv.weight": torch.zeros(4, 4, 1, 1)},
                  {"x.lkb_origin.conv.weight": torch.zeros(4, 4, 7, 7)},
                  {"x.weight_or1x1_l2i_conv1": torch.zeros(4, 4, 1, 1)},
                  {"g.fusion_bn.0.running_var": torch.ones(4), "g.fusion_bn.0.running_mean": torch.zeros(4)}):
        with pytest.raises(InputError, match="look like re-parameterization branches"):
            convert_state_dict({**state, **extra})


def test_nothing_to_fuse_is_an_error_that_says_why(tmp_path):
    with pytest.raises(InputError, match="no re-parameterizable block found among its 4 keys"):
        convert_state_dict({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2),
                            "c.weight": torch.zeros(2, 2, 3, 3), "c.bias": torch.zeros(2)})
    deploy = zoo.repvgg("tiny", deploy=True).state_dict()
    with pytest.raises(InputError, match=r"already in deploy form \(\d+ deploy-form block\(s\) of official"):
        convert_state_dict(deploy)
    runner = CliRunner()
    torch.save(deploy, tmp_path / "deploy.pt")
    result = runner.invoke(app, ["convert", str(tmp_path / "deploy.pt"), str(tmp_path / "out.pt")])
    assert result.exit_code == 2 and "already in deploy form" in result.stderr
    assert not (tmp_path / "out.pt").exists()
    with pytest.raises(InputError, match="has no block any family knows"):
        reparameterize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


def test_recognised_blocks_and_ordinary_networks_are_not_reported():
    assert convert_state_dict(zoo.PlainNet().state_dict()).unrecognised == ()
    # A ResNet-style bottleneck: sequential conv+BN pairs (conv1, conv2, ...), with or without a third conv
    bottleneck = {
        "conv1.weight": torch.zeros(16, 16, 1, 1), "bn1.running_var": torch.ones(16), "bn1.running_mean": torch.zeros(16),
        "conv2.weight": torch.zeros(16, 16, 3, 3), "bn2.running_var": torch.ones(16), "bn2.running_mean": torch.zeros(16),
        "conv3.weight": torch.zeros(64, 16, 1, 1), "bn3.running_var": torch.ones(64), "bn3.running_mean": torch.zeros(64),
    }
    assert unrecognised_blocks(bottleneck, set()) == []
    del bottleneck["conv3.weight"]
    assert unrecognised_blocks(bottleneck, set()) == []
    # the same pair under branch names is reported
    renamed = {k.replace("conv1", "conv_a").replace("bn1", "bn_a").replace("conv2", "conv_b").replace("bn2", "bn_b"): v
               for k, v in bottleneck.items()}
    assert [p for p, _ in unrecognised_blocks(renamed, set())] == [""]


def test_fuse_conv_bn_folds_sequential_pairs_and_checks_them():
    torch.manual_seed(0)
    model = zoo.randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4, bias=False), nn.BatchNorm2d(8, affine=False),
        zoo.PlainBlock(8, 8),
    ), seed=3).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = model(x)
    plain = reparameterize(__import__("copy").deepcopy(model), ConvertOptions())
    assert [r.block.family for r in plain.blocks] == ["plain"]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in plain.model.modules()) == 2
    result = reparameterize(model, ConvertOptions(fuse_conv_bn=True))
    assert result.ok and [r.block.family for r in result.blocks] == ["plain", "conv+bn", "conv+bn"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    with torch.no_grad():
        rel = float((result.model(x) - reference).abs().max() / reference.abs().max())
    assert rel < 1e-5
    assert result.model_check is not None and result.model_check.rel_err < 1e-6


def test_repvggplus_aux_heads_are_dropped_and_reported():
    state = zoo.repvgg("tiny").state_dict()
    state["stage2_aux.0.weight"] = torch.randn(4, 8, 3, 3)
    state["stage3_first_aux.linear.bias"] = torch.randn(10)
    result = convert_state_dict(state)
    assert result.dropped_keys == ("stage2_aux.0.weight", "stage3_first_aux.linear.bias")
    assert not any("_aux" in k for k in result.state_dict)
    deploy = zoo.repvgg("tiny", deploy=True)
    deploy.load_state_dict(result.state_dict, strict=True)


def test_fuse_conv_bn_switches_ultralytics_conv_to_its_fused_forward():
    from tests.family_zoo.ultralytics_repconv import Conv

    torch.manual_seed(1)
    model = zoo.randomize_bn(nn.Sequential(Conv(3, 8, 3, 2), Conv(8, 8, 1, 1)), seed=4).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = model(x)
    result = reparameterize(model, ConvertOptions(fuse_conv_bn=True))
    assert result.ok and [r.block.family for r in result.blocks] == ["conv+bn", "conv+bn"]
    for conv in result.model:
        assert not hasattr(conv, "bn") and conv.forward == conv.forward_fuse
    with torch.no_grad():
        rel = float((result.model(x) - reference).abs().max() / reference.abs().max())
    assert rel < 1e-5
