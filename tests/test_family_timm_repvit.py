"""timm's RepViT, SHViT and iFormer (the LeViT-descended ``c``/``bn`` families) through the CLI.

Models are timm's own (``timm.create_model``, nothing pretrained), shrunk by keyword arguments
(tests/family_zoo/timm_{repvit,shvit,iformer}.py), with every BN and every constant parameter
randomised. The reference deploy form is ``timm.utils.reparameterize_model`` of the same model:
the converted file must have exactly its keys (strict load) and give its outputs (fp32, rel
<= 1e-5). Families: timm_c_bn (ConvNorm / Conv2dNorm), timm_repvggdw (both layouts),
timm_repvit_classifier (one head or the distilled average), timm_shvit_residual,
timm_shvit_normlinear, timm_iformer_repcpe.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models import iformer, repvit, shvit
from torch import nn

from repvgg_cli.api import ConvertOptions, convert_state_dict, reparameterize
from repvgg_cli.errors import UnsupportedError
from repvgg_cli.families import FAMILIES, find_blocks
from repvgg_cli.families.keys import join
from repvgg_cli.pipeline.find import find_module_blocks
from tests.family_zoo import timm_iformer, timm_repvit, timm_shvit
from tests.family_zoo.seeded import train_form
from tests.helpers import error_lines, invoke

MINE = {"timm_c_bn", "timm_repvggdw", "timm_repvit_classifier", "timm_shvit_residual", "timm_shvit_normlinear",
        "timm_iformer_repcpe"}

MODELS = {
    "repvit_m0_9": (lambda: timm_repvit.small("repvit_m0_9"), 32),
    "repvit_m1 (legacy)": (lambda: timm_repvit.small("repvit_m1"), 32),
    "repvit headless": (lambda: timm_repvit.small("repvit_m0_9", num_classes=0, distillation=False), 32),
    "shvit_s1": (timm_shvit.small, 64),
    "iformer_t": (lambda: timm_iformer.small("iformer_t"), 64),
    "iformer_m_distilled": (lambda: timm_iformer.small("iformer_m_distilled"), 64),
}


def build(label: str, seed: int = 7) -> tuple[nn.Module, int]:
    factory, size = MODELS[label]
    return train_form(factory, seed), size


def family_of(module: nn.Module) -> str | None:
    """The family of a module that timm's reparameterize_model replaces by its fuse() result."""
    if type(module) in (repvit.ConvNorm, shvit.Conv2dNorm, iformer.ConvNorm):
        return "timm_c_bn"
    if type(module) is repvit.RepVggDw:
        return "timm_repvggdw"
    if type(module) in (repvit.RepVitClassifier, iformer.RepVitClassifier) and module.num_classes > 0:
        return "timm_repvit_classifier"
    if type(module) is shvit.Residual and type(module.m) is shvit.Conv2dNorm:
        return "timm_shvit_residual"
    if type(module) is shvit.NormLinear:
        return "timm_shvit_normlinear"
    if type(module) is iformer.RepCPE:
        return "timm_iformer_repcpe"
    return None


def expected_blocks(model: nn.Module, prefix: str = "") -> dict[str, str]:
    """Every site of timm's walk, outermost first (what a fused module holds is not visited)."""
    found: dict[str, str] = {}
    for name, child in model.named_children():
        family = family_of(child)
        if family is not None:
            found[join(prefix, name)] = family
        else:
            found.update(expected_blocks(child, join(prefix, name)))
    return found


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def rel(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    reference, candidate = reference.detach().double(), candidate.detach().double()
    return float((reference - candidate).abs().max() / reference.abs().max().clamp_min(1e-30))


def probe(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("label", list(MODELS))
def test_cli_converts_state_dict_into_timms_deploy_keys(label, tmp_path):
    model, size = build(label)
    source, target = tmp_path / "train.pt", tmp_path / "deploy.safetensors"
    torch.save(model.state_dict(), source)
    expected = expected_blocks(model)
    assert expected and set(expected.values()) <= MINE

    result = invoke("convert", source, target, "--json")
    assert result.exit_code == 0, result.stderr[-2000:]
    assert {b["name"]: b["family"] for b in json.loads(result.stdout)["blocks"]} == expected

    deploy = timm.utils.reparameterize_model(copy.deepcopy(model))
    deploy.load_state_dict(load_file(str(target)), strict=True)
    x = probe(size)
    assert rel(forward(model, x), forward(deploy, x)) <= 1e-5

    inspected = invoke("inspect", source, "--json")
    assert inspected.exit_code == 0, inspected.stderr[-2000:]
    assert {b["name"]: b["family"] for b in json.loads(inspected.stdout)["blocks"]} == expected


def test_distilled_head_is_the_average_of_both_heads():
    """The classifier block alone: deploy weight = (W_h diag(s_h) + W_d diag(s_d)) / 2, bias likewise."""
    model, _ = build("iformer_m_distilled")
    head = model.head
    result = convert_state_dict(model.state_dict(), ConvertOptions())
    weight, bias = result.state_dict["head.weight"].double(), result.state_dict["head.bias"].double()
    expected_w, expected_b = 0, 0
    for norm_linear in (head.head, head.head_dist):
        bn, linear = norm_linear.bn, norm_linear.l
        s = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
        t = bn.bias.double() - bn.running_mean.double() * s
        expected_w = expected_w + linear.weight.double() * s / 2
        expected_b = expected_b + (linear.bias.double() + linear.weight.double() @ t) / 2
    assert weight.shape == (5, 32) and rel(expected_w, weight) <= 1e-6 and rel(expected_b, bias) <= 1e-6


def timms_module_types(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


@pytest.mark.parametrize("label", ["repvit_m1 (legacy)", "shvit_s1", "iformer_m_distilled"])
def test_module_tree_leaves_the_modules_timms_reparameterize_leaves(label):
    model, size = build(label, seed=9)
    timms_own = timm.utils.reparameterize_model(copy.deepcopy(model))
    result = reparameterize(copy.deepcopy(model), ConvertOptions(input_shape=(1, 3, size, size)))
    assert result.ok and result.model_check is not None and result.model_check.ok
    assert {r.block.name: r.block.family for r in result.blocks} == expected_blocks(model)
    assert timms_module_types(result.model) == timms_module_types(timms_own)
    ours, theirs = result.model.state_dict(), timms_own.state_dict()
    assert list(ours) == list(theirs)
    assert all(rel(theirs[k], ours[k]) <= 1e-5 for k in theirs if theirs[k].is_floating_point())
    x = probe(size)
    assert rel(forward(model, x), forward(result.model, x)) <= 1e-5


def test_pickled_timm_model_converts_with_allow_pickle(tmp_path):
    model, size = build("iformer_t", seed=11)
    source, target = tmp_path / "model.pt", tmp_path / "deploy.safetensors"
    torch.save(model, source)
    result = invoke("convert", source, target, "--allow-pickle", "--json")
    assert result.exit_code == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["mode"] == "module tree"
    assert {b["name"]: b["family"] for b in report["blocks"]} == expected_blocks(model)
    deploy = timm.utils.reparameterize_model(copy.deepcopy(model))
    deploy.load_state_dict(load_file(str(target)), strict=True)
    x = probe(size)
    assert rel(forward(model, x), forward(deploy, x)) <= 1e-5


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "fastvit_t8", "efficientvit_m0", "tiny_vit_5m_224",
                                  "levit_128s"])
def test_other_timm_models_are_not_claimed(name):
    torch.manual_seed(0)
    state = timm.create_model(name, pretrained=False).state_dict()
    assert not {b.family for b in find_blocks(state)} & MINE


def test_c_bn_pairs_outside_these_architectures_are_not_claimed():
    """The layout alone says nothing: a c/bn pair, even under RepViT's names, needs the whole model."""
    pair = nn.Sequential(OrderedDict(c=nn.Conv2d(4, 8, 3, bias=False), bn=nn.BatchNorm2d(8)))
    state = {f"stem.conv1.{k}": v for k, v in pair.state_dict().items()}
    assert find_blocks(state) == []
    model, _ = build("repvit_m0_9")
    renamed = {k.replace("token_mixer", "mixer"): v for k, v in model.state_dict().items()}
    assert find_blocks(renamed) == []
    # a live c/bn Sequential that is not timm's class is left alone too
    assert find_module_blocks(nn.Sequential(pair)) == []


def test_families_are_registered_and_only_switched_on_in_their_architectures():
    registered = {f.name: f for f in FAMILIES if f.name in MINE}
    assert set(registered) == MINE
    assert all(set(f.only_in) <= {"repvit", "shvit", "iformer"} and f.only_in for f in registered.values())


def test_non_depthwise_repvggdw_in_a_state_dict_is_refused_with_the_key(tmp_path):
    model, _ = build("repvit_m0_9")
    state = model.state_dict()
    key = "stages.0.blocks.0.token_mixer.conv.c.weight"
    state[key] = torch.randn(8, 2, 3, 3)
    source = tmp_path / "train.pt"
    torch.save(state, source)
    result = invoke("convert", source, tmp_path / "out.safetensors")
    assert result.exit_code == 3
    assert any(key in line and "depthwise" in line for line in error_lines(result)), result.stderr


def test_repcpe_with_a_layer_scale_is_refused_in_both_trees():
    model, _ = build("iformer_t")
    site = "stages.2.blocks.0"
    assert type(model.get_submodule(site)) is iformer.RepCPE
    state = model.state_dict()
    state[f"{site}.cpe.gamma"] = torch.rand(1, 24, 1, 1)
    with pytest.raises(UnsupportedError, match=rf"unexpected key {site}\.cpe\.gamma"):
        convert_state_dict(state, ConvertOptions())
    model.get_submodule(site).cpe.gamma = nn.Parameter(torch.rand(1, 24, 1, 1))
    with pytest.raises(UnsupportedError, match="layer scale"):
        reparameterize(model, ConvertOptions(input_shape=(1, 3, 64, 64)))
