"""The fastvit families against timm's own fastvit modules and ``timm.utils.reparameterize_model``.

Key tree: a converted state dict must load with ``strict=True`` into the model timm itself
re-parameterizes (its deploy convention) and match the train model. Module tree: the switched
model must match, and its state must be timm's deploy layout too. Every BN has random running
statistics and every layer scale random values of both signs (timm initialises them to 1e-5,
which would hide a wrong fusion of the RepMixer).

The whole-network tests (fastvit_t8, and a small FastVit with RepCPE, attention and SE) also need
the ``timm_mobileone`` family: timm's stem, patch-embedding 1×1 and head blocks are MobileOneBlocks.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from functools import partial

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models import fastvit as tf
from timm.utils import reparameterize_model
from torch import nn
from typer.testing import CliRunner

from tests import zoo
from repvgg_cli.cli import app
from repvgg_cli.api import ConvertOptions, convert_state_dict, reparameterize
from repvgg_cli.pipeline.find import find_module_blocks
from repvgg_cli.errors import InputError, UnsupportedError
from repvgg_cli.families import find_blocks

TRAIN_FORM_PARTS = ("large_conv", "small_conv", "mixer", "norm.identity", "pos_enc", "conv_kxk", "conv_scale")


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random BN statistics, layer scales and RepCPE convs; eval mode."""
    zoo.randomize_bn(model, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5 + 0.3)
        for module in model.modules():
            if isinstance(module, tf.RepConditionalPosEnc):
                module.pos_enc.weight.copy_(torch.randn(module.pos_enc.weight.shape, generator=generator) * 0.2)
                module.pos_enc.bias.copy_(torch.randn(module.pos_enc.bias.shape, generator=generator) * 0.5)
    return model.eval()


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    reference, candidate = reference.double(), candidate.double()
    return float((reference - candidate).abs().max() / reference.abs().max().clamp_min(1e-30))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def family_counts(families) -> Counter:
    return Counter(families)


# -- single timm modules (float64) --------------------------------------------------------------


def timm_blocks() -> dict[str, nn.Module]:
    return {
        "repmixer_k3": tf.RepMixer(8, kernel_size=3),
        "repmixer_k5_no_layer_scale": tf.RepMixer(6, kernel_size=5, layer_scale_init_value=None),
        "large_kernel_patch_embed": tf.ReparamLargeKernelConv(
            8, 16, kernel_size=7, stride=2, group_size=1, small_kernel=3, use_se=True, act_layer=nn.GELU
        ),
        "large_kernel_dense_s1": tf.ReparamLargeKernelConv(4, 6, kernel_size=5, stride=1, group_size=0, small_kernel=3),
        "repcpe_7x7": tf.RepConditionalPosEnc(8, spatial_shape=(7, 7)),
        "repcpe_3x3": tf.RepConditionalPosEnc(5, spatial_shape=3),
    }


FAMILY_OF = {"repmixer": "fastvit_repmixer", "large": "fastvit_large_kernel", "repcpe": "fastvit_repcpe"}


@pytest.mark.parametrize("kind", list(timm_blocks()))
def test_timm_block_key_tree_matches_timm_reparameterize(kind):
    torch.manual_seed(0)
    train = randomize(nn.Sequential(timm_blocks()[kind]), seed=3).double()
    deploy = reparameterize_model(train)  # timm's own fusion, on a copy
    result = convert_state_dict(train.state_dict())
    assert result.ok
    assert [r.block.family for r in result.blocks] == [FAMILY_OF[kind.split("_")[0]]]
    assert sorted(result.state_dict) == sorted(deploy.state_dict())  # timm's deploy keys exactly
    for key, tensor in deploy.state_dict().items():
        assert relative_error(tensor, result.state_dict[key]) < 1e-12, key
    deploy.load_state_dict(result.state_dict, strict=True)
    x = torch.randn(2, _in_channels(train[0]), 15, 15, dtype=torch.float64)
    assert relative_error(run(train, x), run(deploy, x)) < 1e-9


def _in_channels(block: nn.Module) -> int:
    for module in block.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise AssertionError("no conv")


@pytest.mark.parametrize("kind", list(timm_blocks()))
def test_timm_block_module_tree_takes_timm_deploy_path(kind):
    torch.manual_seed(0)
    train = randomize(nn.Sequential(timm_blocks()[kind]), seed=5).double()
    x = torch.randn(2, _in_channels(train[0]), 13, 13, dtype=torch.float64)
    reference = run(train, x)
    result = reparameterize(copy.deepcopy(train), ConvertOptions(input_shape=tuple(x.shape)))
    assert result.ok and [r.block.family for r in result.blocks] == [FAMILY_OF[kind.split("_")[0]]]
    block = result.model[0]
    assert isinstance(block.reparam_conv, nn.Conv2d)
    assert not any(hasattr(block, part) for part in ("large_conv", "small_conv", "mixer", "norm", "layer_scale", "pos_enc"))
    assert relative_error(reference, run(result.model, x)) < 1e-9
    reparameterize_model(train).load_state_dict(result.state_dict, strict=True)


def test_repmixer_encloses_its_mobileone_blocks():
    train = randomize(nn.Sequential(tf.RepMixer(8, kernel_size=3)), seed=7)
    blocks = find_blocks(train.state_dict())
    assert [(b.name, b.family) for b in blocks] == [("0", "fastvit_repmixer")]
    found = find_module_blocks(train)
    assert [(name, family.name) for name, _, family in found] == [("0", "fastvit_repmixer")]


def test_repmixer_folds_layer_scale_with_both_signs():
    """A wrong sign on the subtracted norm branch or a dropped layer scale must not match."""
    train = randomize(nn.Sequential(tf.RepMixer(8, kernel_size=3)), seed=9).double()
    (block,) = find_blocks(train.state_dict())
    scales = [b.scale for b in block.branches.convs]
    gamma = train[0].layer_scale.gamma.reshape(-1)
    assert sum(1 for s in scales if torch.equal(s, gamma)) == 3  # mixer: 3x3, 1x1, identity BN
    assert sum(1 for s in scales if torch.equal(s, -gamma)) == 1  # norm: identity BN
    assert block.branches.identity is not None and block.branches.identity.bn is None


def test_repmixer_with_se_in_mixer_is_refused():
    train = randomize(nn.Sequential(tf.RepMixer(8, kernel_size=3)), seed=11)
    state = dict(train.state_dict())
    state["0.mixer.se.fc1.weight"] = torch.zeros(2, 8, 1, 1)
    with pytest.raises(UnsupportedError, match="unexpected key 0.mixer.se.fc1.weight"):
        convert_state_dict(state)
    train[0].mixer.act = nn.GELU()
    with pytest.raises(UnsupportedError, match="must be linear"):
        reparameterize(train, ConvertOptions(input_shape=(1, 8, 8, 8)))


def test_large_kernel_with_activation_inside_branch_is_refused():
    train = randomize(nn.Sequential(tf.ReparamLargeKernelConv(4, 4, 5, 1, 1, small_kernel=3)), seed=13)
    train[0].small_conv.bn.act = nn.ReLU()
    with pytest.raises(UnsupportedError, match="only a linear branch"):
        reparameterize(train, ConvertOptions(input_shape=(1, 4, 8, 8)))


def test_pos_enc_with_company_or_dense_is_not_a_repcpe():
    cpe = randomize(nn.Sequential(tf.RepConditionalPosEnc(8, spatial_shape=3)), seed=15)
    state = dict(cpe.state_dict())
    state["0.proj.weight"] = torch.zeros(8, 8, 1, 1)
    assert find_blocks(state) == []
    dense = {"pos_enc.weight": torch.randn(4, 4, 3, 3), "pos_enc.bias": torch.randn(4)}
    assert find_blocks(dense) == []
    with pytest.raises(InputError, match="no re-parameterizable block found"):
        convert_state_dict(state)  # nothing claimed: and nothing to fuse is an error


# -- whole timm networks ------------------------------------------------------------------------


def fastvit_t8() -> nn.Module:
    return randomize(timm.create_model("fastvit_t8", pretrained=False), seed=1)


def small_fastvit() -> nn.Module:
    """RepCPE (7×7 and 3×3), attention stage, SE patch embedding with act, no-layer-scale variant off."""
    model = tf.FastVit(
        layers=(1, 1, 1, 1),
        embed_dims=(16, 32, 64, 64),
        mlp_ratios=(2, 2, 2, 2),
        downsamples=(False, True, True, True),
        se_downsamples=(False, False, True, True),
        pos_embs=(None, None, partial(tf.RepConditionalPosEnc, spatial_shape=(3, 3)),
                  partial(tf.RepConditionalPosEnc, spatial_shape=(7, 7))),
        token_mixers=("repmixer", "repmixer", "repmixer", "attention"),
        repmixer_kernel_size=5,
        lkc_use_act=True,
        num_classes=10,
    )
    return randomize(model, seed=2)


@pytest.fixture(scope="module")
def t8() -> nn.Module:
    return fastvit_t8()


X64 = (1, 3, 64, 64)


def test_fastvit_t8_cli_key_tree_loads_into_timm_deploy_and_matches(t8, tmp_path):
    source, output = tmp_path / "fastvit_t8.safetensors", tmp_path / "fastvit_t8_deploy.safetensors"
    save_file({k: v.contiguous() for k, v in t8.state_dict().items()}, str(source))
    result = CliRunner().invoke(app, ["convert", str(source), str(output), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    counts = family_counts(b["family"] for b in report["blocks"])
    assert counts.get("fastvit_repmixer") == 10 and counts.get("fastvit_large_kernel") == 3
    deploy = reparameterize_model(t8)
    deploy.load_state_dict(load_file(str(output)), strict=True)
    x = torch.randn(*X64, generator=torch.Generator().manual_seed(0))
    error = relative_error(run(t8, x), run(deploy, x))
    assert error < 1e-5, error


def test_fastvit_t8_module_tree_matches(t8):
    x = torch.randn(*X64, generator=torch.Generator().manual_seed(0))
    reference = run(t8, x)
    result = reparameterize(copy.deepcopy(t8), ConvertOptions(input_shape=X64))
    assert result.ok and result.model_check is not None and result.model_check.ok
    counts = family_counts(r.block.family for r in result.blocks)
    assert counts.get("fastvit_repmixer") == 10 and counts.get("fastvit_large_kernel") == 3
    error = relative_error(reference, run(result.model, x))
    assert error < 1e-5, error


def test_fastvit_t8_module_tree_is_timm_deploy_layout(t8):
    result = reparameterize(copy.deepcopy(t8), ConvertOptions(input_shape=X64), check_model=False)
    leftover = [k for k in result.state_dict if any(f".{p}." in f".{k}" for p in TRAIN_FORM_PARTS)]
    assert not leftover, f"train-form keys left (unfused blocks): {leftover[:4]} ..."
    reparameterize_model(t8).load_state_dict(result.state_dict, strict=True)


def test_small_fastvit_with_repcpe_attention_and_se_both_trees():
    train = small_fastvit()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reference = run(train, x)
    converted = convert_state_dict(train.state_dict())
    assert converted.ok
    counts = family_counts(r.block.family for r in converted.blocks)
    assert (counts.get("fastvit_repmixer"), counts.get("fastvit_large_kernel"), counts.get("fastvit_repcpe")) == (3, 3, 2)
    deploy = reparameterize_model(train)
    deploy.load_state_dict(converted.state_dict, strict=True)
    assert relative_error(reference, run(deploy, x)) < 1e-5
    switched = reparameterize(copy.deepcopy(train), ConvertOptions(input_shape=(1, 3, 64, 64)))
    assert switched.ok
    assert relative_error(reference, run(switched.model, x)) < 1e-5
    reparameterize_model(train).load_state_dict(switched.state_dict, strict=True)
