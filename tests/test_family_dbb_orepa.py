"""The DBB and OREPA families through the CLI, against the fixtures' own deploy forms.

The fixtures (tests/family_zoo/dbb.py, orepa.py) are rewrites of DingXiaoH/DiverseBranchBlock and
JUGGHM/OREPA_CVPR2022 with every layout upstream builds; their BN statistics and affine
parameters, DBB's idconv1 weights, OREPA's ``vector``s, zero/identity-initialised parameters and
the prior entries upstream leaves uninitialised are random. Key tree: a converted state dict
strict-loads into the fixture's deploy model, matches the train model and the fixture's rewrite of
upstream's own conversion. Module tree: a pickled train model converts the same way. Every block
is named by ``inspect`` and checked by ``verify --against``; the expression each family declares
is, run with torch's ops, the live block's own forward.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from repvgg_cli import semantics
from repvgg_cli.algebra.expression import ops_of
from repvgg_cli.api import ConvertOptions, convert_state_dict, reparameterize
from repvgg_cli.pipeline.find import find_module_blocks
from repvgg_cli.errors import InputError, UnsupportedError
from repvgg_cli.families import FamilyOptions, family_by_name, find_blocks
from tests.family_zoo import dbb as dbb_zoo
from tests.family_zoo import official as official_zoo
from tests.family_zoo import orepa as orepa_zoo
from tests.helpers import invoke

FP32_RTOL = 1e-5
TENSOR_RTOL = 1e-6

EXPECTED = {
    "dbb": {
        "body.stem": "dbb", "body.depthwise": "dbb", "body.pointwise": "dbb_convbn", "body.grouped5": "dbb",
        "body.depthwise_s2": "dbb", "body.wide_internal": "dbb", "body.kernel1": "dbb",
        "body.conv3": "dbb_convbn", "body.grouped_s2": "dbb",
    },
    "orepa": {
        "body.stem": "orepa_large", "body.orepa": "orepa", "body.expand": "orepa_1x1",
        "body.grouped_s2": "orepa", "body.depthwise": "orepa", "body.k5": "orepa", "body.reduce": "orepa_1x1",
        "body.large_base": "orepa_large_base", "body.repvgg_id": "orepa_repvgg", "body.repvgg_s2": "orepa_repvgg",
        "body.shortcut": "dbb_convbn",
    },
}
ZOOS = {"dbb": dbb_zoo, "orepa": orepa_zoo}
TRAIN_ONLY = ("dbb_origin", "dbb_avg", "dbb_1x1", "weight_orepa", "weight_or1x1", "weight_rbr", "rbr_dense",
              "rbr_1x1", "rbr_identity", "vector", "id_tensor", ".bn.", "large_base.weight0")


def rel(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    reference, candidate = reference.double(), candidate.double()
    return float((reference - candidate).abs().max() / reference.abs().max().clamp_min(1e-30))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def probe(z, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*z.INPUT_SHAPE, generator=torch.Generator().manual_seed(5), dtype=dtype)


def worst_tensor_error(converted: dict, upstream: dict) -> float:
    assert set(converted) == set(upstream)
    return max(rel(upstream[k], converted[k]) for k in upstream if upstream[k].is_floating_point())


# -- key tree, through the CLI --------------------------------------------------------------------


@pytest.mark.parametrize("project", ["dbb", "orepa"])
def test_cli_key_tree_loads_strictly_matches_the_model_and_upstreams_conversion(project, tmp_path):
    z = ZOOS[project]
    train = z.train_model()
    source, output = tmp_path / "train.pt", tmp_path / "deploy.safetensors"
    torch.save(train.state_dict(), source)
    result = invoke("convert", source, output, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["mode"] == "key tree"
    assert {b["name"]: b["family"] for b in report["blocks"]} == EXPECTED[project]
    assert {b["eps_from"] for b in report["blocks"]} == {f"{project} default"}

    converted = load_file(output)
    deploy = z.deploy_model()
    deploy.load_state_dict(converted, strict=True)
    x = probe(z)
    err = rel(run(train, x), run(deploy, x))
    assert err <= FP32_RTOL
    tensor_err = worst_tensor_error(converted, z.upstream_deploy(train).state_dict())
    assert tensor_err <= TENSOR_RTOL
    print(f"{project} key tree: output rel err {err:.1e}, worst tensor vs upstream {tensor_err:.1e}")


@pytest.mark.parametrize("project", ["dbb", "orepa"])
def test_inspect_names_the_family_of_every_block(project, tmp_path):
    z = ZOOS[project]
    source = tmp_path / "train.pt"
    torch.save(z.train_model().state_dict(), source)
    result = invoke("inspect", source, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["form"] == "train" and not summary["problems"] and not summary["unrecognised"]
    assert {b["name"]: b["family"] for b in summary["blocks"]} == EXPECTED[project]
    assert summary["other_prefixes"] == {"head": 2}


@pytest.mark.parametrize("project", ["dbb", "orepa"])
def test_verify_against_the_source_fails_for_each_broken_block(project, tmp_path):
    z = ZOOS[project]
    source, output, broken = tmp_path / "train.pt", tmp_path / "deploy.safetensors", tmp_path / "broken.safetensors"
    torch.save(z.train_model().state_dict(), source)
    assert invoke("convert", source, output).exit_code == 0
    good = invoke("verify", output, "--against", source, "--json")
    assert good.exit_code == 0, good.stderr
    assert {b["name"] for b in json.loads(good.stdout)["blocks"]} == set(EXPECTED[project])

    tensors = load_file(output)
    with safe_open(output, "pt") as f:
        metadata = f.metadata()
    # one corner tap of every block (a border tap of every k x k kernel) moved by 1% of the weight's scale
    weights = [k for k in tensors if k.endswith(("_reparam.weight", "conv.weight")) and not k.startswith("head")]
    assert len(weights) == len(EXPECTED[project])
    for key in weights:
        tensors[key][0, 0, 0, 0] += 0.01 * float(tensors[key].abs().max())
    save_file(tensors, broken, metadata=metadata)
    bad = invoke("verify", broken, "--against", source, "--json")
    assert bad.exit_code == 1
    failed = {b["name"] for b in json.loads(bad.stdout)["blocks"] if not b["ok"]}
    assert failed == set(EXPECTED[project])


# -- module tree --------------------------------------------------------------------------------


@pytest.mark.parametrize("project", ["dbb", "orepa"])
def test_cli_module_tree_converts_a_pickled_train_model(project, tmp_path):
    z = ZOOS[project]
    train = z.train_model()
    source, output = tmp_path / "model.pt", tmp_path / "deploy.pt"
    torch.save(train, source)
    shape = ",".join(str(d) for d in z.INPUT_SHAPE)  # OREPA's stem has no nn.Conv2d to guess channels from
    result = invoke("convert", source, output, "--allow-pickle", "--input-shape", shape, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["mode"] == "module tree"
    assert {b["name"]: b["family"] for b in report["blocks"]} == EXPECTED[project]

    deployed = torch.load(output, map_location="cpu", weights_only=False)
    assert type(deployed) is type(train)
    state = deployed.state_dict()
    assert not [k for k in state if any(part in k for part in TRAIN_ONLY)]
    fresh = z.deploy_model()
    fresh.load_state_dict(state, strict=True)
    x = probe(z)
    err = rel(run(train, x), run(deployed, x))
    assert err <= FP32_RTOL
    tensor_err = worst_tensor_error(state, z.upstream_deploy(train).state_dict())
    assert tensor_err <= TENSOR_RTOL
    print(f"{project} module tree: output rel err {err:.1e}, worst tensor vs upstream {tensor_err:.1e}")


@pytest.mark.parametrize("project", ["dbb", "orepa"])
def test_declared_expression_is_the_live_blocks_own_forward(project):
    """Each family's expression, read from the live block and run with torch's ops (the check of a
    composite block), equals the block's own forward (activation removed) on its real input."""
    z = ZOOS[project]
    model = z.train_model().double()
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: inputs.__setitem__(f"body.{n}", i[0]))
             for n, m in model.body.named_children()]
    run(model, probe(z, torch.float64))
    for hook in hooks:
        hook.remove()
    found = find_module_blocks(model)
    assert {name: family.name for name, _, family in found} == EXPECTED[project]
    for name, module, family in found:
        block = family.parse_module(name, module, FamilyOptions())
        linear = copy.deepcopy(module)
        for attribute in ("nonlinear", "nonlinearity"):
            if hasattr(linear, attribute):
                setattr(linear, attribute, nn.Identity())
        reference = run(linear, inputs[name])
        declared = semantics.run(ops_of(block.branches), inputs[name])
        assert declared.shape == reference.shape, name
        assert rel(reference, declared) <= 1e-12, name
        assert block.branches.composite == (family.name != "dbb_convbn"), name


# -- what is read, what is not claimed, what is refused -------------------------------------------------


def test_orepa_stored_constants_are_read_not_recomputed():
    """``avg_avg`` is float32(1/k²) and the k > 3 prior partly arbitrary: both are read. In float64
    the conversion is exact; with 1/k² recomputed in float64 it would be off by ~1e-9."""
    train = orepa_zoo.train_model().double()
    state = train.state_dict()
    generator = torch.Generator().manual_seed(9)
    prior = state["body.k5.weight_orepa_prior"]
    outside = torch.ones_like(prior, dtype=torch.bool)
    outside[:, :3, :3] = False
    prior[outside] = torch.randn(int(outside.sum()), generator=generator, dtype=prior.dtype)  # the model's too
    x = probe(orepa_zoo, torch.float64)
    deploy = orepa_zoo.deploy_model().double()
    deploy.load_state_dict(convert_state_dict(state).state_dict, strict=True)
    assert rel(run(train, x), run(deploy, x)) <= 1e-12

    exact = dict(state)
    for key in [k for k in state if k.endswith("_avg_avg")]:
        exact[key] = torch.full_like(state[key], 1.0 / state[key].shape[-1] ** 2)
    assert any(not torch.equal(exact[k], state[k]) for k in state)
    deploy.load_state_dict(convert_state_dict(exact).state_dict, strict=True)
    assert rel(run(train, x), run(deploy, x)) > 1e-11


def test_convbn_is_claimed_only_inside_a_dbb_or_orepa_model():
    plain = nn.Sequential()
    plain.add_module("a", dbb_zoo.ConvBN(3, 8, 3, 1, 1, 1, 1))
    plain.add_module("b", dbb_zoo.ConvBN(8, 8, 1, 1, 0, 1, 1))
    dbb_zoo.zoo.randomize_bn(plain, seed=3)
    state = plain.state_dict()
    assert not [b for b in find_blocks(state) if b.family == "dbb_convbn"]
    with pytest.raises(InputError, match="no re-parameterizable block found"):
        convert_state_dict(state)  # nothing claimed: and nothing to fuse is an error

    with_dbb = nn.Sequential(plain, dbb_zoo.DiverseBranchBlock(8, 8, 3, 1, 1))
    families = {b.name: b.family for b in find_blocks(with_dbb.state_dict())}
    assert families == {"0.a": "dbb_convbn", "0.b": "dbb_convbn", "1": "dbb"}

    class ConvBN(nn.Sequential):  # timm starnet's: no switch_to_deploy
        def __init__(self) -> None:
            super().__init__()
            self.add_module("conv", nn.Conv2d(3, 8, 3, padding=1))
            self.add_module("bn", nn.BatchNorm2d(8))

    family = family_by_name("dbb_convbn")
    assert not family.matches_module(ConvBN())
    assert family.matches_module(plain.a) and family.matches_module(orepa_zoo.ConvBN(3, 8, 1))
    assert not find_module_blocks(nn.Sequential(ConvBN()))


def test_official_repvgg_and_repvgg_block_orepa_do_not_claim_each_other():
    official, orepa_vgg = family_by_name("official"), family_by_name("orepa_repvgg")
    block = orepa_zoo.RepVGGBlock_OREPA(8, 8, 3, 1, 1)
    assert orepa_vgg.matches_module(block) and not official.matches_module(block)
    official_model = official_zoo.train_model()
    assert not any(orepa_vgg.matches_module(m) for m in official_model.modules())
    assert {b.family for b in find_blocks(official_model.state_dict())} == {"official"}
    assert {b.family for b in find_blocks(nn.Sequential(block).state_dict())} == {"orepa_repvgg"}


def test_refusals_name_the_reason():
    alone = nn.Sequential(orepa_zoo.OREPA(8, 8, 3, 1, 1, weight_only=True))
    with pytest.raises(UnsupportedError, match="weight-only OREPA"):
        convert_state_dict(alone.state_dict())

    state = dbb_zoo.train_model().state_dict()
    state["body.stem.dbb_1x1_kxk.conv1.weight"] = torch.zeros(3, 3, 1, 1)
    with pytest.raises(UnsupportedError, match=r"body\.stem \(dbb\): unexpected key body\.stem\.dbb_1x1_kxk\.conv1"):
        convert_state_dict(state)

    model = dbb_zoo.train_model()
    model.body.depthwise.dbb_avg.avg.count_include_pad = False
    with pytest.raises(UnsupportedError, match="body.depthwise: dbb_avg.avg must count the zero padding"):
        reparameterize(model, ConvertOptions(input_shape=dbb_zoo.INPUT_SHAPE))
