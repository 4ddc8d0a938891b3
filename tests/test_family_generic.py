"""The generic family (issue 12, "Generic fusion"): blocks no family knows, read from their traced
forward and fused into one conv each.

The block types are written only for these tests (tests/family_zoo/generic.py: the issue's
conv3x3+BN / conv1x3+BN / conv3x1+BN / avgpool+BN / identity BN block, layer scales and an SE, a
1x1->3x3 sequence, depthwise and grouped blocks). Pickled whole inside a small network they go
through ``repvgg convert --allow-pickle`` to a pickled deploy model and to ``.safetensors``: one
conv per block, outputs equal to the train model's, every block reported as ``generic`` with its
branches. Blocks that must not be claimed (a ResNet basic block, a ReLU inside a branch, a
remainder that reads the input or cannot be traced, a sum that is not one conv, another family's
block, a wrapper or a network of blocks) are left as they are, and the model still matches.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models.resnet import BasicBlock
from torch import nn

from tests import zoo
from repvgg_cli.api import reparameterize
from repvgg_cli.families import FAMILIES, family_by_name
from repvgg_cli.families.generic.deploy import GenericDeploy
from repvgg_cli.families.generic.read import read_block
from repvgg_cli.pipeline.find import find_module_blocks
from repvgg_cli.pipeline.options import ConvertOptions
from tests.family_zoo import generic as z
from tests.family_zoo.seeded import train_form
from tests.helpers import invoke

SHAPE = "2,3,16,16"
GENERIC = family_by_name("generic")


def rel(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    reference, candidate = reference.double(), candidate.double()
    return float((reference - candidate).abs().max() / reference.abs().max())


def probe(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*z.INPUT_SHAPE, generator=torch.Generator().manual_seed(5), dtype=dtype)


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def convert(model: nn.Module, folder, output: str, *extra: str):
    """``repvgg convert model.pt OUTPUT --allow-pickle --json`` on the pickled model."""
    source = folder / "train_model.pt"
    torch.save(model, source)
    target = folder / output
    result = invoke("convert", source, target, "--allow-pickle", "--input-shape", SHAPE, "--json", *extra)
    assert result.exit_code == 0, result.stderr
    return target, json.loads(result.stdout)


def convs_outside_post(block: nn.Module) -> list[nn.Conv2d]:
    return [m for name, m in block.named_modules() if isinstance(m, nn.Conv2d) and not name.startswith("post")]


EXPECTED_NOTES = {
    "blocks.0": "generic block: 3x3+bn, 1x3+bn, 3x1+bn, avgpool3+bn, id+bn; after the sum: ReLU",
    "blocks.1": "generic block: 3x3/s2+bn, 1x3/s2+bn, 3x1/s2+bn; after the sum: ReLU",
    "blocks.2": "generic block: 3x3+bn, 1x1+bn+scale, id; after the sum: GELU, SqueezeExcite, mul",
    "blocks.3": "generic block: 1x1->3x3+bn, 3x3+bn, id+bn; after the sum: SiLU",
    "blocks.4": "generic block: 3x3/dw+bn, 1x1/dw+bn, id+bn; after the sum: ReLU",
    "blocks.5": "generic block: 3x3/s2/g4+bn, 1x1/s2/g4+bn; after the sum: ReLU",
}


def test_pickled_network_converts_to_one_conv_per_block_and_matches(tmp_path):
    train = z.train_model()
    output, document = convert(train, tmp_path, "deploy_model.pt")
    assert document["ok"] and document["mode"] == "module tree"
    assert {b["name"]: b["family"] for b in document["blocks"]} == {f"blocks.{i}": "generic" for i in range(6)}
    assert all(b["ok"] and b["rel_err"] <= 1e-6 for b in document["blocks"])
    by_name = {b["name"]: b for b in document["blocks"]}
    assert by_name["blocks.0"]["branches"] == ["3x3+bn", "1x3+bn", "3x1+bn", "3x3+bn", "id+bn"]
    assert by_name["blocks.5"]["groups"] == 4 and by_name["blocks.5"]["stride"] == [2, 2]
    assert by_name["blocks.4"]["groups"] == 16
    assert by_name["blocks.2"]["bn_eps"] == [pytest.approx(1e-3)] and by_name["blocks.2"]["eps_from"] == "module"
    for name, note in EXPECTED_NOTES.items():
        assert f"{note} ({name})" in document["notes"]

    deploy = torch.load(output, weights_only=False)
    for index, block in enumerate(deploy.blocks):
        assert isinstance(block, GenericDeploy), index
        assert convs_outside_post(block) == [block.conv], index
        assert not any(isinstance(m, nn.BatchNorm2d) for m in block.modules()), index
        assert tuple(block.conv.kernel_size) == (3, 3)
    assert isinstance(deploy.blocks[0].post, torch.fx.GraphModule)
    x = probe()
    err = rel(run(train, x), run(deploy, x))
    assert err <= 1e-5, err


def test_safetensors_output_strict_loads_into_the_deploy_form_and_matches(tmp_path):
    train = z.train_model()
    output, document = convert(train, tmp_path, "deploy.safetensors")
    assert {b["family"] for b in document["blocks"]} == {"generic"} and len(document["blocks"]) == 6
    state = load_file(output)
    assert sorted(k for k in state if k.startswith("blocks.0.")) == ["blocks.0.conv.bias", "blocks.0.conv.weight"]
    assert "blocks.2.post.se.fc1.weight" in state and "blocks.2.post.ls" in state
    deploy = z.deploy_model()
    deploy.load_state_dict(state, strict=True)
    x = probe()
    err = rel(run(train, x), run(deploy, x))
    assert err <= 1e-5, err


def test_float64_library_conversion_matches_to_1e_9():
    train = z.train_model().double()
    x = probe(torch.float64)
    reference = run(train, x)
    result = reparameterize(copy.deepcopy(train), ConvertOptions(input_shape=z.INPUT_SHAPE))
    assert result.ok and result.model_check is not None and result.model_check.ok
    assert [r.block.family for r in result.blocks] == ["generic"] * 6
    assert max(r.check.rel_err for r in result.blocks) <= 1e-12
    assert rel(reference, run(result.model, x)) <= 1e-9
    deploy = z.deploy_model().double()
    deploy.load_state_dict(result.state_dict, strict=True)
    assert rel(reference, run(deploy, x)) <= 1e-9


def test_a_wrong_fusion_is_visible():
    """The comparison can fail: one block's fused bias changed by a little breaks the match."""
    train = z.train_model().double()
    x = probe(torch.float64)
    result = reparameterize(copy.deepcopy(train), ConvertOptions(input_shape=z.INPUT_SHAPE))
    with torch.no_grad():
        result.model.blocks[3].conv.bias[0] += 1e-3
    assert rel(run(train, x), run(result.model, x)) > 1e-7


def test_the_block_alone_pickled_whole_becomes_one_generic_deploy(tmp_path):
    block = train_form(lambda: z.AcBlock(8, 8), seed=3)
    source = tmp_path / "block.pt"
    torch.save(block, source)
    result = invoke("convert", source, tmp_path / "block_deploy.pt", "--allow-pickle", "--input-shape", "2,8,9,9",
                    "--json")
    assert result.exit_code == 0, result.stderr
    assert [(b["name"], b["family"]) for b in json.loads(result.stdout)["blocks"]] == [("", "generic")]
    deploy = torch.load(tmp_path / "block_deploy.pt", weights_only=False)
    assert isinstance(deploy, GenericDeploy) and convs_outside_post(deploy) == [deploy.conv]
    x = torch.randn(2, 8, 9, 9, generator=torch.Generator().manual_seed(1))
    assert rel(run(block, x), run(deploy, x)) <= 1e-5


def test_the_generic_family_is_registered_last_and_reads_no_state_dict():
    assert FAMILIES[-1].name == "generic"
    assert GENERIC.find_prefixes(list(z.train_model().state_dict())) == []


# -- what must not be claimed ----------------------------------------------------------------------


class ReluInBranch(nn.Module):
    """3x3 conv+BN plus ReLU(1x1 conv+BN): one branch is not linear."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dense, self.point = z.conv_bn(c, c, 3, 1, 1), z.conv_bn(c, c, 1)

    def forward(self, x):
        return F.relu(self.dense(x) + F.relu(self.point(x)))


class ResidualAfterAct(nn.Module):
    """ReLU(3x3 + 1x1) + x: what follows the sum reads the input too."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dense, self.point = z.conv_bn(c, c, 3, 1, 1), z.conv_bn(c, c, 1)

    def forward(self, x):
        return F.relu(self.dense(x) + self.point(x)) + x


class DataDependent(nn.Module):
    """A branch on the sum's values after the sum: torch.fx cannot trace it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dense, self.point = z.conv_bn(c, c, 3, 1, 1), z.conv_bn(c, c, 1)

    def forward(self, x):
        y = self.dense(x) + self.point(x)
        if y.mean() > 0:
            return F.relu(y)
        return torch.tanh(y)


class BiasBeforePaddedConv(nn.Module):
    """A 1x1 conv with a bias before a padded 3x3: not one conv at the border (the algebra refuses)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(c, c, 1, bias=True), nn.Conv2d(c, c, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(c))
        self.dense = z.conv_bn(c, c, 3, 1, 1)

    def forward(self, x):
        return F.relu(self.seq(x) + self.dense(x))


class SumOnly(nn.Module):
    """3x3 conv+BN plus 1x1 conv+BN, nothing after the sum."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dense, self.point = z.conv_bn(c, c, 3, 1, 1), z.conv_bn(c, c, 1)

    def forward(self, x):
        return self.dense(x) + self.point(x)


class Wrapper(nn.Module):
    """ReLU around a child that sums: the child is the block, not the wrapper."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.inner = SumOnly(c)

    def forward(self, x):
        return torch.relu(self.inner(x))


class ChildSumPlusInput(nn.Module):
    """ReLU(child's sum + x): a sum is written here too, so this module is the block (the child inside it)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.inner = SumOnly(c)

    def forward(self, x):
        return F.relu(self.inner(x) + x)


class ThroughSuper(z.AcBlock):
    """The sum is in the parent class's forward."""

    def forward(self, x):
        return super().forward(x) * 0.5


class ThroughHelper(SumOnly):
    """The sum is in a helper method the forward calls."""

    def _summed(self, x):
        return self.dense(x) + self.point(x)

    def forward(self, x):
        return torch.tanh(self._summed(x))


class FlatPair(nn.Module):
    """Two sums in one forward, one after the other: a network of blocks, not one block."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = z.conv_bn(c, c, 3, 1, 1), z.conv_bn(c, c, 1)
        self.c, self.d = z.conv_bn(c, c, 3, 1, 1), z.conv_bn(c, c, 1)

    def forward(self, x):
        y = F.relu(self.a(x) + self.b(x))
        return F.relu(self.c(y) + self.d(y))


class MixedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(
            BasicBlock(16, 16), ReluInBranch(16), ResidualAfterAct(16), DataDependent(16),
            BiasBeforePaddedConv(16), zoo.OfficialBlock(16, 16), Wrapper(16), FlatPair(16), z.AcBlock(16, 16),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


UNCLAIMED = {0: BasicBlock, 1: ReluInBranch, 2: ResidualAfterAct, 3: DataDependent, 4: BiasBeforePaddedConv,
             7: FlatPair}


def test_blocks_that_are_not_sums_of_linear_branches_are_left_alone(tmp_path):
    train = train_form(MixedNet, seed=7)
    output, document = convert(train, tmp_path, "mixed_deploy.pt")
    assert {b["name"]: b["family"] for b in document["blocks"]} == {
        "blocks.5": "official", "blocks.6.inner": "generic", "blocks.8": "generic",
    }
    assert "generic block: 3x3+bn, 1x1+bn (blocks.6.inner)" in document["notes"]
    deploy = torch.load(output, weights_only=False)
    for index, kind in UNCLAIMED.items():
        assert type(deploy.blocks[index]) is kind, index
        assert type(deploy.blocks[index]) is type(train.blocks[index])
    assert isinstance(deploy.blocks[6], Wrapper) and isinstance(deploy.blocks[6].inner, GenericDeploy)
    assert isinstance(deploy.blocks[6].inner.post, nn.Identity)
    assert hasattr(deploy.blocks[5], "rbr_reparam") and not hasattr(deploy.blocks[5], "rbr_dense")
    x = probe()
    err = rel(run(train, x), run(deploy, x))
    assert err <= 1e-5, err


@pytest.mark.parametrize("module", [
    nn.Conv2d(8, 8, 3, padding=1),
    nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
    BasicBlock(8, 8),
    ReluInBranch(8), ResidualAfterAct(8), DataDependent(8), BiasBeforePaddedConv(8), Wrapper(8), FlatPair(8),
    zoo.OfficialBlock(8, 8), zoo.PlainBlock(8, 8),
    z.GenericNet(),
], ids=lambda m: type(m).__name__)
def test_not_claimed(module):
    assert not GENERIC.matches_module(module.eval())


@pytest.mark.parametrize("factory", [lambda: z.AcBlock(8, 8), lambda: z.ScaledBlock(8), lambda: z.SeqBlock(8),
                                     lambda: z.GroupedBlock(8, 8, groups=8), lambda: SumOnly(8),
                                     lambda: ChildSumPlusInput(8), lambda: ThroughSuper(8, 8),
                                     lambda: ThroughHelper(8)])
def test_claimed(factory):
    assert GENERIC.matches_module(factory().eval())


def test_a_sum_written_around_a_child_sum_is_one_block():
    model = train_form(lambda: nn.Sequential(ChildSumPlusInput(8), Wrapper(8)), seed=2).eval()
    found = find_module_blocks(model)
    assert [(name, family.name) for name, _, family in found] == [("0", "generic"), ("1.inner", "generic")]
    x = torch.randn(2, 8, 7, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    reference = run(model.double(), x)
    result = reparameterize(model, ConvertOptions(input_shape=(2, 8, 7, 7)))
    assert result.ok and [r.block.branch_labels for r in result.blocks] == [("3x3+bn", "1x1+bn", "id"),
                                                                            ("3x3+bn", "1x1+bn")]
    assert isinstance(result.model[0], GenericDeploy) and isinstance(result.model[1].inner, GenericDeploy)
    assert rel(reference, run(result.model, x)) <= 1e-9


def test_a_block_with_a_forward_hook_is_not_claimed():
    block = z.AcBlock(8, 8).eval()
    assert GENERIC.matches_module(block)
    block.register_forward_hook(lambda module, args, out: out * 2)
    assert not GENERIC.matches_module(block)


class CachingBlock(SumOnly):
    """A forward that stores what it computed on the module (a cache, timm LeViT-attention style):
    a trace would store proxies there."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.cache: dict = {}
        self.calls = 0

    def forward(self, x):
        self.calls = self.calls + 1
        y = self.dense(x) + self.point(x)
        self.cache["last"] = y
        return y


def test_a_forward_that_changes_its_module_is_not_claimed_and_is_put_back():
    block = CachingBlock(8).eval()
    before = dict(block.__dict__)
    assert not GENERIC.matches_module(block)
    assert block.cache == {} and block.calls == 0 and dict(block.__dict__) == before
    assert read_block(block) is None


def test_official_and_plain_blocks_stay_their_families_own():
    model = nn.Sequential(zoo.OfficialBlock(8, 8), zoo.PlainBlock(8, 8), z.AcBlock(8, 8)).eval()
    assert [(name, family.name) for name, _, family in find_module_blocks(model)] == [
        ("0", "official"), ("1", "plain"), ("2", "generic")]


def test_the_trace_reads_branches_and_channels():
    reading = read_block(z.GroupedBlock(8, 12, stride=2, groups=4).eval())
    assert reading is not None and reading.channels == 8
    kinds = [step.kind for step in reading.steps.values()]
    assert kinds.count("conv") == 2 and kinds.count("bn") == 2 and kinds.count("sum") == 1
