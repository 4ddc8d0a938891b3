"""BatchNorm variants inside blocks, module tree: what fuses, what is refused, and why.

Fusion reads a BN's tensors (running statistics, eps, affine parameters); the whole-model check
runs the model's own forward. Findings with torch 2.x on CPU:

* ``nn.SyncBatchNorm`` builds on CPU and its forward runs on CPU (eval, and train without a
  process group), so blocks converted with ``convert_sync_batchnorm`` fuse and check like plain
  ones. Should a forward refuse the device, fusion still works (it only reads tensors) and the
  whole-model check reports a clean input error instead of a traceback.
* A plain subclass (``class MyBN(nn.BatchNorm2d)``) fuses; timm's ``BatchNormAct2d`` fuses when its
  ``act`` is ``nn.Identity`` (``apply_act=False``; a ``Dropout`` is the identity in eval) and is
  refused (exit 3) when an activation sits inside the branch.
* ``track_running_stats=False`` is refused with the reason (exit 3); ``momentum=None`` (a
  cumulative average) is an ordinary BN in eval and fuses.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from timm.layers import BatchNormAct2d
from timm.models.byobnet import RepVggBlock
from torch import Tensor, nn

from tests import zoo
from repvgg_cli.api import ConvertOptions, convert_state_dict, reparameterize
from repvgg_cli.errors import InputError, UnsupportedError
from tests.helpers import error_lines, invoke


SHAPE = (2, 3, 16, 16)


class MyBN(nn.BatchNorm2d):
    """A plain subclass, as projects write them (e.g. to tag layers for weight decay)."""


class DoubledBN(nn.BatchNorm2d):
    """A subclass whose forward is not a BN's: nothing in its tensors says so."""

    def forward(self, x: Tensor) -> Tensor:
        return 2.0 * super().forward(x)


def rel_error(reference: Tensor, candidate: Tensor) -> float:
    reference, candidate = reference.double(), candidate.double()
    return float((reference - candidate).abs().max() / reference.abs().max())


def with_bns(model: nn.Module, make) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` child of ``model`` by ``make(num_features)`` (in place)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.BatchNorm2d:
                setattr(module, name, make(child.num_features))
    return model


def official_net() -> nn.Sequential:
    """Official-layout blocks: strided, with identity, grouped."""
    torch.manual_seed(0)
    return nn.Sequential(zoo.OfficialBlock(3, 8, stride=2), zoo.OfficialBlock(8, 8), zoo.OfficialBlock(8, 8, groups=2))


def plain_net() -> nn.Module:
    torch.manual_seed(0)
    return zoo.PlainNet(channels=(3, 8, 8), strides=(2, 1))


def bn_types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def converts(model: nn.Module) -> float:
    """Module-tree conversion of ``model`` (BN statistics randomised); returns the whole-model rel err."""
    train = zoo.randomize_bn(model, seed=5).eval()
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = train(x)
    result = reparameterize(copy.deepcopy(train), ConvertOptions(input_shape=SHAPE))
    assert result.ok, [(r.block.name, r.check.rel_err) for r in result.failures]
    assert result.blocks and max(r.check.rel_err for r in result.blocks) < 1e-6
    assert not bn_types(result.model), "every BN was inside a block and is gone"
    with torch.no_grad():
        assert rel_error(want, result.model(x)) < 1e-5
    assert result.model_check is not None and result.model_check.dtype == "float64"
    return result.model_check.rel_err


# -- SyncBatchNorm --------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [official_net, plain_net], ids=["official", "plain"])
def test_sync_batch_norm_blocks_fuse_on_cpu(build) -> None:
    model = nn.SyncBatchNorm.convert_sync_batchnorm(build())
    assert bn_types(model) == {nn.SyncBatchNorm}
    # eval-mode forward works on CPU (the fusion would not need it; the whole-model check does)
    with torch.no_grad():
        assert model.eval()(torch.randn(*SHAPE)).shape[0] == 2
    assert converts(model) < 1e-6


def test_sync_batch_norm_through_the_cli_with_a_pickled_model(tmp_path: Path) -> None:
    model = zoo.randomize_bn(nn.SyncBatchNorm.convert_sync_batchnorm(official_net()), seed=2)
    source, output = tmp_path / "sync.pt", tmp_path / "deploy.pt"
    torch.save(model, source)
    result = invoke("convert", source, output, "--allow-pickle", "--input-shape", "2,3,16,16")
    assert result.exit_code == 0, result.stdout + result.stderr
    result = invoke("verify", output, "--against", source, "--allow-pickle", "--input-shape", "2,3,16,16")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "3 block(s) verified: equivalent" in result.stdout


def test_a_bn_whose_forward_refuses_the_device_still_fuses(monkeypatch) -> None:
    """As if SyncBatchNorm's forward refused CPU (old torch did: 'expected input tensor to be on GPU')."""
    train = zoo.randomize_bn(nn.SyncBatchNorm.convert_sync_batchnorm(official_net()), seed=3).eval()
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = train(x)

    def refuse(self, input: Tensor) -> Tensor:
        raise ValueError("SyncBatchNorm expected input tensor to be on GPU")

    monkeypatch.setattr(nn.SyncBatchNorm, "forward", refuse)
    with pytest.raises(InputError, match="the train-form model cannot run on input .*expected input tensor to be on GPU"):
        reparameterize(copy.deepcopy(train))  # the whole-model check needs a forward: a clean exit 2
    deploy = copy.deepcopy(train)
    result = reparameterize(deploy, check_model=False, inplace=True)  # fusion and the per-block checks read tensors only
    assert result.ok and len(result.blocks) == 3 and result.model_check is None
    monkeypatch.undo()
    with torch.no_grad():
        assert rel_error(want, deploy(x)) < 1e-5


# -- subclasses -----------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [official_net, plain_net], ids=["official", "plain"])
@pytest.mark.parametrize(
    "make",
    [MyBN, lambda n: BatchNormAct2d(n, apply_act=False), lambda n: BatchNormAct2d(n, apply_act=False, drop_layer=nn.Dropout)],
    ids=["subclass", "BatchNormAct2d-no-act", "BatchNormAct2d-dropout"],
)
def test_linear_batch_norm_subclasses_fuse(build, make) -> None:
    model = with_bns(build(), make)
    assert bn_types(model) and nn.BatchNorm2d not in bn_types(model)
    assert converts(model) < 1e-6


@pytest.mark.parametrize(("build", "where"), [(official_net, "block 0: 0.rbr_dense.bn"),
                                             (plain_net, "block features.0: features.0.bn3x3")],
                         ids=["official", "plain"])
def test_an_activation_inside_a_branch_is_refused(build, where: str) -> None:
    model = zoo.randomize_bn(with_bns(build(), lambda n: BatchNormAct2d(n, apply_act=True)))
    with pytest.raises(UnsupportedError) as caught:
        reparameterize(model)
    assert caught.value.exit_code == 3
    assert caught.value.message == (f"{where} applies ReLU after the BatchNorm, inside the branch; a branch with "
                                    "an activation before the sum cannot be fused")


def test_timm_repvgg_block_with_an_activation_inside_a_branch_is_refused() -> None:
    torch.manual_seed(0)
    block = zoo.randomize_bn(RepVggBlock(8, 8))
    assert type(block.conv_kxk.bn) is BatchNormAct2d and isinstance(block.conv_kxk.bn.act, nn.Identity)
    assert reparameterize(copy.deepcopy(block), ConvertOptions(input_shape=(2, 8, 8, 8))).ok
    block.conv_kxk.bn.act = nn.ReLU()
    with pytest.raises(UnsupportedError, match=r"block <root>: conv_kxk\.bn applies ReLU inside the branch"):
        reparameterize(block, ConvertOptions(input_shape=(2, 8, 8, 8)))


def test_an_activation_inside_a_branch_is_exit_3_on_the_cli(tmp_path: Path) -> None:
    model = zoo.randomize_bn(with_bns(plain_net(), lambda n: BatchNormAct2d(n, apply_act=True)))
    source = tmp_path / "act.pt"
    torch.save(model, source)
    result = invoke("convert", source, tmp_path / "out.safetensors", "--allow-pickle")
    assert result.exit_code == 3, result.stdout + result.stderr
    errors = error_lines(result)
    assert len(errors) == 1 and errors[0].startswith("Error: ") and errors[0].endswith(
        "block features.0: features.0.bn3x3 applies ReLU after the BatchNorm, inside the branch; "
        "a branch with an activation before the sum cannot be fused")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["act.pt"]


def test_a_subclass_with_its_own_forward_is_caught_by_the_whole_model_check(tmp_path: Path) -> None:
    """A BN subclass that computes something else cannot be told from its tensors: the per-block check
    (which runs BN semantics) passes, the whole-model check (the model's own forward) fails: exit 1."""
    model = zoo.randomize_bn(with_bns(official_net(), DoubledBN))
    result = reparameterize(copy.deepcopy(model), ConvertOptions(input_shape=SHAPE))
    assert not result.failures
    assert result.model_check is not None and not result.model_check.ok and result.model_check.rel_err > 0.1
    source = tmp_path / "doubled.pt"
    torch.save(model, source)
    cli = invoke("convert", source, tmp_path / "out.pt", "--allow-pickle", "--input-shape", "2,3,16,16")
    assert cli.exit_code == 1
    assert len(error_lines(cli)) == 1 and error_lines(cli)[0].startswith("Error: not equivalent: the whole-model check")
    assert not (tmp_path / "out.pt").exists()


# -- running statistics ---------------------------------------------------------------------------


def test_track_running_stats_false_is_refused_with_the_reason(tmp_path: Path) -> None:
    model = plain_net()
    model.features[2].bn1x1 = nn.BatchNorm2d(8, track_running_stats=False)
    zoo.randomize_bn(model)
    with pytest.raises(UnsupportedError) as caught:
        reparameterize(copy.deepcopy(model))
    assert caught.value.exit_code == 3
    assert caught.value.message == (
        "block features.2: features.2.bn1x1 has track_running_stats=False: it normalises with batch "
        "statistics and cannot be folded into a conv")
    source = tmp_path / "batch_stats.pt"
    torch.save(model, source)
    result = invoke("convert", source, tmp_path / "out.pt", "--allow-pickle")
    assert result.exit_code == 3
    errors = error_lines(result)
    assert len(errors) == 1 and errors[0].startswith("Error: ") and errors[0].endswith(caught.value.message)
    assert "Traceback" not in result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch_stats.pt"]
    refused = invoke("convert", source, tmp_path / "out.pt")  # and without --allow-pickle: refused first
    assert refused.exit_code == 2


def test_momentum_none_cumulative_statistics_fuse() -> None:
    model = with_bns(official_net(), lambda n: nn.BatchNorm2d(n, momentum=None))
    stem_bn = model[0].rbr_dense.bn
    batches = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) * (1 + i) for i in range(4)]
    means = []
    model.train()
    with torch.no_grad():
        for x in batches:
            means.append(model[0].rbr_dense.conv(x).mean((0, 2, 3)))
            model(x)
    # momentum=None: the running mean is the plain average of the batch means
    assert int(stem_bn.num_batches_tracked) == 4
    torch.testing.assert_close(stem_bn.running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.3)
    model.eval()
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = model(x)
    key_tree = convert_state_dict(model.state_dict())  # the same tensors as any BN's state dict
    assert key_tree.ok and len(key_tree.blocks) == 3
    result = reparameterize(copy.deepcopy(model), ConvertOptions(input_shape=SHAPE))
    assert result.ok and result.model_check.rel_err < 1e-6
    with torch.no_grad():
        assert rel_error(want, result.model(x)) < 1e-5
    for key, value in key_tree.state_dict.items():
        assert torch.equal(value, result.state_dict[key]), key
