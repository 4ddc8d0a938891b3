"""The contract every registered family must meet, run over the registry automatically.

Each family has a module in tests/family_zoo/ named after it (or named in
``tests.family_zoo.ZOO_OF`` when one upstream model holds several families), holding a small
train-form model with randomised BN statistics (``train_model``), the same model's own deploy
form (``deploy_model``), the BN ``EPS`` it trains with and an ``INPUT_SHAPE``. Every block found
in it belongs to the family, or to the module's ``FAMILIES`` (a set of names) when it has one;
``OPTIONS`` holds what a state dict cannot tell and the conversion must be told (e.g. the
QARepVGG variant).
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

from repvgg_cli.api import ConvertOptions, convert_state_dict, reparameterize
from repvgg_cli.families import FAMILIES

NAMES = [f.name for f in FAMILIES]


def zoo_for(name: str):
    from tests.family_zoo import ZOO_OF

    module = ZOO_OF.get(name, name)
    try:
        return importlib.import_module(f"tests.family_zoo.{module}")
    except ModuleNotFoundError:
        pytest.fail(f"family {name!r} has no toy models in tests/family_zoo/{module}.py")


def options_of(z) -> dict:
    """What the key tree must be told for the zoo's model (``OPTIONS`` in the zoo module)."""
    return dict(getattr(z, "OPTIONS", {}))


def families_of(z, name: str) -> set[str]:
    return set(getattr(z, "FAMILIES", {name}))


def key_tree_finds_none(z, name: str) -> bool:
    """A module-tree-only family (``MODULE_TREE_ONLY`` in its zoo: the generic family, read from a
    live block's traced forward): its zoo's state dict holds no block of it (asserted), nothing else to check."""
    if not getattr(z, "MODULE_TREE_ONLY", False):
        return False
    from repvgg_cli.families import find_blocks

    found = find_blocks(z.train_model().state_dict())
    assert not [b.name for b in found if b.family in families_of(z, name)]
    return True


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.eval()(x)
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def assert_close(reference: list[torch.Tensor], candidate: list[torch.Tensor], rtol: float) -> float:
    assert len(reference) == len(candidate)
    worst = 0.0
    for r, c in zip(reference, candidate):
        rel = float((r.double() - c.double()).abs().max() / r.double().abs().max().clamp_min(1e-30))
        worst = max(worst, rel)
    assert worst <= rtol, f"relative error {worst:.3e} > {rtol:g}"
    return worst


@pytest.mark.parametrize("name", NAMES)
def test_key_tree_loads_strictly_into_deploy_form_and_matches(name):
    z = zoo_for(name)
    if key_tree_finds_none(z, name):
        return
    torch.manual_seed(0)
    train = z.train_model().double()
    state = train.state_dict()
    result = convert_state_dict(state, ConvertOptions(bn_eps=z.EPS, **options_of(z)))
    assert result.ok, [(r.block.name, r.check.rel_err) for r in result.failures]
    assert result.blocks, "the toy model has no block of this family"
    assert {r.block.family for r in result.blocks} == families_of(z, name)
    deploy = z.deploy_model().double()
    deploy.load_state_dict(result.state_dict, strict=True)
    x = torch.randn(*z.INPUT_SHAPE, dtype=torch.float64)
    assert_close(outputs(train, x), outputs(deploy, x), rtol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_module_tree_switches_blocks_and_matches(name):
    z = zoo_for(name)
    torch.manual_seed(0)
    train = z.train_model()
    x = torch.randn(*z.INPUT_SHAPE)
    reference = outputs(train, x)
    result = reparameterize(copy.deepcopy(train), ConvertOptions(input_shape=z.INPUT_SHAPE, **options_of(z)))
    assert result.ok and result.model_check is not None and result.model_check.ok
    assert result.blocks and {r.block.family for r in result.blocks} == families_of(z, name)
    assert_close(reference, outputs(result.model, x), rtol=1e-5)
    deploy = z.deploy_model()
    deploy.load_state_dict(result.state_dict, strict=True)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_eps_is_caught(name):
    """Fusing with an eps far from the model's must break equivalence (when the blocks have BNs)."""
    z = zoo_for(name)
    if key_tree_finds_none(z, name):
        return
    train = z.train_model().double()
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in train.modules())
    result = convert_state_dict(train.state_dict(), ConvertOptions(bn_eps=z.EPS * 1e3 + 0.5, **options_of(z)))
    deploy = z.deploy_model().double()
    deploy.load_state_dict(result.state_dict, strict=True)
    x = torch.randn(*z.INPUT_SHAPE, dtype=torch.float64)
    if has_bn:
        with pytest.raises(AssertionError):
            assert_close(outputs(train, x), outputs(deploy, x), rtol=1e-6)
    else:
        assert_close(outputs(train, x), outputs(deploy, x), rtol=1e-9)
