"""The pipeline's stages and the public API over them, to the letter (issue 15: mutation score of
the pipeline row): the API's flag -> argument rewording, the recorded-vs-given options note,
conv->BN pairs and module blocks found, planned shapes, the metadata a deploy file records and the
room reserved for it, the output-size budget, what the in-memory write keeps and passes through,
what is handed to the savers, and the report's notes.

Fast: tiny float64 models and state dicts, stage functions called directly.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from repvgg_cli import api
from repvgg_cli.api import api_words, convert_state_dict, reparameterize
from repvgg_cli.checks.tolerance import Tolerance
from repvgg_cli.errors import InputError, UnsupportedError
from repvgg_cli.pipeline import write as write_stage
from repvgg_cli.pipeline.check import Checked, check
from repvgg_cli.pipeline.find import find, find_conv_bn_pairs, find_module_blocks
from repvgg_cli.pipeline.fuse import fuse, planned_weight_shape
from repvgg_cli.pipeline.metadata import block_record, build_metadata, metadata_reserve
from repvgg_cli.pipeline.options import ConvertOptions
from repvgg_cli.pipeline.read import read_state
from repvgg_cli.pipeline.report import block_notes
from repvgg_cli.pipeline.write import File, planned_deploy_state
from tests.zoo import PlainNet, randomize_bn


def plain_state() -> OrderedDict:
    """features.0: 3->4 (no identity: groups not known from keys), features.2: 4->4 with identity."""
    torch.manual_seed(0)
    model = randomize_bn(PlainNet((3, 4, 4), (1, 1), num_classes=2)).double()
    return OrderedDict(model.state_dict())


# -- the API's words ------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "words"), [
    ("pass --force to replace it", "pass force=True to replace it"),
    ("pass --force now", "pass force=True now"),  # a flag without value keeps the next word as it is
    ("pass --fsync", "pass fsync=True"),
    ("pass --input-shape N,C,H,W", "pass input_shape=(N, C, H, W)"),
    ("with --input-shape 1,3,8,8.", "with input_shape=(1, 3, 8, 8)."),
    ("with --input-shape 8", "with input_shape=8"),
    ("with --input-shape '1,3,8,8'", "with input_shape='1,3,8,8'"),  # quoted: left as the message wrote it
    ("pass --entry ema", "pass entry='ema'"),
    ("pass --entry NAME", "pass entry=NAME"),
    ('pass --model "pkg:make"', 'pass model_spec="pkg:make"'),
    ("pass --model 'pkg:make'", "pass model_spec='pkg:make'"),
    ("pass --no-identity stage1", "pass no_identity=('stage1',)"),
    ("--bn-eps -1.0: bad", "bn_eps=-1.0: bad"),
    ("pass --bn-eps with a value", "pass bn_eps=... with a value"),
    ("pass --rtol 1e-3.", "pass Tolerance(rtol=1e-3)."),
    ("pass --unknown-flag 3", "pass --unknown-flag 3"),
])
def test_api_words(text: str, words: str) -> None:
    assert api_words(text) == words


def test_api_errors_name_arguments() -> None:
    with pytest.raises(InputError) as caught:
        convert_state_dict(plain_state(), ConvertOptions(bn_eps=-1.0))
    assert caught.value.message == "bn_eps=-1.0: BatchNorm eps must be a finite number >= 0"


# -- recorded options vs the ones given --------------------------------------------------------------

def _loaded(entry=None):
    return SimpleNamespace(entry=entry)


NOTE_TAIL = ("; this check took its options from the command line (nothing from the file under test): "
             "pass them if you trust the file's word")


def test_recorded_same_as_given_says_nothing() -> None:
    meta = {"options": {"bn_eps": None, "fold_post_bn": False, "no_identity": [], "avg_branch": [],
                        "qa_variant": None, "dtype": None}, "source": {"entry": None}}
    assert api._recorded_differs(meta, ConvertOptions(), _loaded()) == ()
    assert api._recorded_differs(None, ConvertOptions(), _loaded()) == ()
    assert api._recorded_differs({"options": [1]}, ConvertOptions(), _loaded()) == ()


def test_recorded_differences_named_by_flag() -> None:
    meta = {"options": {"bn_eps": 0.001, "fold_post_bn": True, "no_identity": ["a"], "dtype": "float16"},
            "source": {"entry": "ema"}}
    notes = api._recorded_differs(meta, ConvertOptions(), _loaded("model"))
    assert notes == ("the file says it was converted with --bn-eps 0.001, --fold-post-bn True, --no-identity ['a'], "
                     "--dtype float16, --entry ema" + NOTE_TAIL,)
    # only the entry differs
    assert api._recorded_differs({"source": {"entry": "ema"}}, ConvertOptions(), _loaded(None)) == (
        "the file says it was converted with --entry ema" + NOTE_TAIL,)
    assert api._recorded_differs({"source": {"entry": "ema"}}, ConvertOptions(), _loaded("ema")) == ()
    assert api._recorded_differs({"source": None, "options": {"bn_eps": 0.1}}, ConvertOptions(bn_eps=0.1),
                                 _loaded("x")) == ()


# -- whole-model comparisons ----------------------------------------------------------------------

def test_api_compare_models() -> None:
    torch.manual_seed(1)
    train = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1)).double()
    deploy = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1)).double()
    deploy.load_state_dict(train.state_dict())
    check64 = api._compare_models(train, deploy, (1, 2, 5, 5), Tolerance())
    assert (check64.input_shape, check64.dtype, check64.max_abs_err, check64.outputs, check64.problem) == (
        (1, 2, 5, 5), "float64", 0.0, 1, None)
    assert check64.rtol == Tolerance().rtol_for(torch.float64) != Tolerance().rtol_for(torch.float32)
    assert api._compare_models(train.float(), deploy.float(), (1, 2, 5, 5), Tolerance()).rtol == \
        Tolerance().rtol_for(torch.float32)
    assert api._compare_models(train, deploy, (1, 2, 5, 5), Tolerance(rtol=0.5, atol=0.25)).atol == 0.25
    with pytest.raises(InputError) as caught:
        api._compare_models(train, deploy, (1, 5, 5, 5), Tolerance())
    assert caught.value.message.startswith("the models cannot run on input (1, 5, 5, 5): ")
    assert caught.value.hint == "pass --input-shape N,C,H,W"


def test_checked_compare_models_and_train_outputs() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1)).double()
    options = ConvertOptions(input_shape=(1, 2, 4, 4), seed=3)
    x, shape, reference = Checked._train_outputs(model, options)
    assert shape == (1, 2, 4, 4) and x.dtype == torch.float64
    assert torch.equal(x, torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    result = Checked._compare_models(model, (x, shape, reference), options)
    assert (result.input_shape, result.dtype, result.max_abs_err, result.outputs, result.problem) == (
        (1, 2, 4, 4), "float64", 0.0, 1, None)
    assert result.atol == options.tolerance.atol and result.rtol == options.tolerance.rtol_for(torch.float64)
    with pytest.raises(InputError) as caught:
        Checked._train_outputs(model, replace(options, input_shape=(1, 7, 4, 4)))
    assert caught.value.message.startswith("the train-form model cannot run on input (1, 7, 4, 4): ")
    assert caught.value.hint == "pass --input-shape N,C,H,W"


# -- find ----------------------------------------------------------------------------------------------

class _ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

    def forward_fuse(self, x):
        return self.conv(x)


def test_conv_bn_pairs() -> None:
    model = nn.Sequential(OrderedDict(
        body=nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1),
                           nn.ReLU(), nn.BatchNorm2d(2)),
        head=_ConvBn(), skipped=nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))))
    pairs = find_conv_bn_pairs(model, ["skipped"])
    assert [(p.name, p.conv_attr, p.bn_attr, p.switch_forward) for p in pairs] == [
        ("body.0", "0", "1", False), ("head.conv", "conv", "bn", True)]
    assert pairs[0].owner is model.body and pairs[1].owner is model.head


class _Family:
    def __init__(self, name: str, kind: type) -> None:
        self.name, self.kind = name, kind

    def matches_module(self, module) -> bool:
        return isinstance(module, self.kind)


def test_module_blocks_claimed_by_two_or_more_families() -> None:
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU())
    one = (_Family("a", nn.Conv2d),)
    assert [(n, f.name) for n, _, f in find_module_blocks(model, one)] == [("0", "a")]
    for families in [(_Family("a", nn.Conv2d), _Family("b", nn.Conv2d)),
                     (_Family("a", nn.Conv2d), _Family("b", nn.Conv2d), _Family("c", nn.Conv2d))]:
        with pytest.raises(UnsupportedError) as caught:
            find_module_blocks(model, families)
        assert caught.value.message == "module 0 is claimed by two families: a and b"
    with pytest.raises(UnsupportedError) as caught:
        find_module_blocks(model, (_Family("a", nn.Sequential), _Family("b", nn.Module)))
    assert caught.value.message == "module <root> is claimed by two families: a and b"


# -- fuse: planned shapes --------------------------------------------------------------------------

def _plan(state=None, **options):
    return find(read_state(state if state is not None else plain_state()), ConvertOptions(bn_eps=1e-5, **options))


def test_planned_weight_shape_and_its_error() -> None:
    plan = _plan()
    assert [planned_weight_shape(b) for b in plan.blocks] == [(4, 3, 3, 3), (4, 4, 3, 3)]
    block = plan.blocks[1]
    conv = block.branches.convs[1]
    odd = replace(conv, weight=torch.zeros(4, 2, 1, 1, dtype=torch.float64))
    bad = replace(block, branches=replace(block.branches, convs=(block.branches.convs[0], odd)))
    with pytest.raises(UnsupportedError) as caught:
        planned_weight_shape(bad)
    assert caught.value.message == "block features.2: branches disagree on input channels per group: [2, 4]"


def test_planned_deploy_state_is_data_free() -> None:
    block = _plan().blocks[1]
    state, weight_key = planned_deploy_state(block, (4, 4, 3, 3))
    assert weight_key == "features.2.weight"
    assert {k: (tuple(t.shape), t.dtype, t.is_meta) for k, t in state.items()} == {
        "features.2.weight": ((4, 4, 3, 3), torch.float64, True),
        "features.2.bias": ((4,), torch.float64, True)}


def test_streamed_blocks_hold_their_buffer() -> None:
    fused = fuse(_plan())
    items = list(fused.blocks(reuse_buffers=True))
    assert [i.slot is not None for i in items] == [True, True]
    assert items[0].slot is not items[1].slot  # two buffers, alternating
    for item in items:  # each fused weight lives in its buffer, not in memory of its own
        assert item.shipped.weight.data_ptr() == item.slot.tensor.data_ptr()


def test_module_tree_upcast_before_fusing() -> None:
    torch.manual_seed(4)
    model = randomize_bn(PlainNet((3, 4, 4), (1, 1), num_classes=2)).eval()
    result = reparameterize(model, ConvertOptions(dtype="float64", input_shape=(1, 3, 6, 6)))
    assert {p.dtype for p in result.model.parameters()} == {torch.float64}
    assert [r.fused.weight.dtype for r in result.blocks] == [torch.float64, torch.float64]
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the caller's model is untouched


# -- metadata ----------------------------------------------------------------------------------------

def test_block_records() -> None:
    result = convert_state_dict(plain_state(), ConvertOptions(bn_eps=1e-5, seed=7))
    first, second = (block_record(r, 7) for r in result.blocks)
    # features.0 has no identity: its groups (and so in_channels) are not known from a state dict
    assert (first["in_channels"], first["groups"], first["in_per_group"], first["out_channels"]) == (None, None, 3, 4)
    assert (second["in_channels"], second["groups"], second["in_per_group"]) == (4, 1, 4)
    assert {k: v for k, v in second.items() if k not in ("probe", "max_abs_err", "rel_err", "cast_abs_err")} == {
        "name": "features.2", "family": "plain", "deploy_prefix": "features.2",
        "branches": ["3x3+bn", "1x1+bn", "id+bn"], "in_channels": 4, "in_per_group": 4, "out_channels": 4,
        "kernel": [3, 3], "groups": 1, "stride": None, "padding": [1, 1], "dilation": [1, 1],
        "padding_mode": "zeros", "dtype": "float64", "eps": [1e-05], "eps_from": "--bn-eps", "eps_source": "flag",
        "params_before": 184, "params_after": 148}


def test_build_metadata_exact() -> None:
    options = ConvertOptions(bn_eps=1e-3, fold_post_bn=True, no_identity=("x*",), avg_branch=("y*",),
                             fuse_conv_bn=True, tolerance=Tolerance(rtol=1e-4, atol=1e-6), seed=5)
    check = SimpleNamespace(input_shape=(1, 3, 8, 8), dtype="float64", max_abs_err=0.5, rel_err=0.25)
    meta = build_metadata(mode="key tree", options=options, blocks=[], dropped=["aux.w"], model_check=check,
                          source_name="a.pt", source_sha256="ab", entry="ema", stripped=["module."])
    from repvgg_cli import __version__
    assert meta == {
        "tool": "repvgg_cli", "version": __version__, "mode": "key tree",
        "source": {"name": "a.pt", "sha256": "ab", "entry": "ema", "stripped_prefixes": ["module."]},
        "options": {"bn_eps": 1e-3, "fold_post_bn": True, "no_identity": ["x*"], "avg_branch": ["y*"],
                    "fuse_conv_bn": True, "rtol": 1e-4, "atol": 1e-6, "seed": 5},
        "blocks": [], "dropped_keys": ["aux.w"],
        "model_check": {"input_shape": [1, 3, 8, 8], "dtype": "float64", "max_abs_err": 0.5, "rel_err": 0.25},
    }
    assert "model_check" not in build_metadata(mode="m", options=options, blocks=[], dropped=[], model_check=None,
                                              source_name="a", source_sha256="", entry=None, stripped=[])


def test_metadata_reserve_exact() -> None:
    blocks = [SimpleNamespace(name="ab", branches=SimpleNamespace(out_channels=10)),
              SimpleNamespace(name="", branches=SimpleNamespace(out_channels=1))]
    # per block: 4 * ceil(8 * out / 3) (the base64 probe) + 1536 + 4 per letter of its name
    per_block = (4 * 27 + 1536 + 8) + (4 * 3 + 1536 + 0)
    per_key = (2 * 1 + 96) + (2 * 3 + 96)
    assert metadata_reserve(blocks, ["k", "key"], ["dd"]) == int(1.25 * (per_block + per_key + 6)) + 8192
    assert metadata_reserve([], [], []) == 8192
    assert metadata_reserve([], ["k"], []) == int(1.25 * 98) + 8192


# -- write -------------------------------------------------------------------------------------------

def _budget_plan(nbytes: int):
    state = {"w": torch.zeros(nbytes // 8, dtype=torch.float64)}
    return SimpleNamespace(source=SimpleNamespace(state=state), options=ConvertOptions())


def test_budget_uses_the_larger_of_file_and_data_bytes() -> None:
    loaded = SimpleNamespace(file_size=10, data_bytes=1000)
    write_stage._check_budget(_budget_plan(4000), File(Path("o.safetensors"), loaded))  # 4 x 1000: allowed
    with pytest.raises(InputError):
        write_stage._check_budget(_budget_plan(4008), File(Path("o.safetensors"), loaded))


def test_budget_refusal_message() -> None:
    loaded = SimpleNamespace(file_size=10, data_bytes=None)
    with pytest.raises(InputError) as caught:
        write_stage._check_budget(_budget_plan(48), File(Path("o.safetensors"), loaded))
    assert caught.value.message == ("the output would hold 48 bytes of tensors, more than the 40 allowed "
                                    "(4x the source's 10 bytes); the largest tensor is w (6 float64, 48 bytes)")
    assert caught.value.hint == ("if that is intended, pass --max-output-bytes with a larger limit, or write a .pt "
                                 "output, which keeps shared storage shared")
    with pytest.raises(InputError) as caught:
        write_stage._check_budget(_budget_plan(48), File(Path("o.pt"), loaded))
    assert caught.value.hint == "if that is intended, pass --max-output-bytes with a larger limit"


def test_in_memory_keeps_order_and_passes_through() -> None:
    state = plain_state()
    result = convert_state_dict(state, ConvertOptions(bn_eps=1e-5))
    assert list(result.state_dict) == ["features.0.weight", "features.0.bias", "features.2.weight",
                                       "features.2.bias", "head.weight", "head.bias"]
    assert result.passthrough_keys == 2 and result.dropped_keys == ()
    assert result.state_dict["head.weight"] is state["head.weight"]
    assert result.key_diff is not None
    t = result.key_diff.totals
    assert (t["removed"], t["added"], t["unchanged"], t["source_keys"], t["output_keys"]) == (29, 4, 2, 31, 6)
    assert result.key_diff.balanced and result.key_diff.proof == "bytes"


class _Saved:
    def __init__(self) -> None:
        self.calls: list = []

    def model(self, output, model, loaded, metadata, fsync):
        self.calls.append(("model", output, fsync))

    def state(self, output, state, metadata, container, entry, fsync):
        self.calls.append(("state", output, container, entry, fsync))


@pytest.mark.parametrize(("model", "entry", "suffix", "call"), [
    (None, None, ".pt", ("state", None, None)),
    (None, "ema", ".pt", ("state", "RAW", "ema")),
    (None, "ema", ".safetensors", ("state", None, "ema")),
    ("M", None, ".pt", ("model",)),
    ("M", None, ".safetensors", ("state", None, None)),
])
@pytest.mark.parametrize("fsync", [True, False])
def test_save_hands_on_container_entry_and_fsync(monkeypatch, model, entry, suffix, call, fsync) -> None:
    saved = _Saved()
    monkeypatch.setattr(write_stage.io_write, "save_model", saved.model)
    monkeypatch.setattr(write_stage.io_write, "save_state_dict", saved.state)
    monkeypatch.setattr(write_stage, "metadata_of", lambda written, loaded: {})
    loaded = SimpleNamespace(model=model, entry=entry, raw="RAW")
    written = SimpleNamespace(state_dict=OrderedDict(w=torch.zeros(1)), model="DEPLOY")
    output = Path("out" + suffix)
    write_stage._save(written, File(output, loaded, fsync=fsync))
    assert len(saved.calls) == 1
    got = saved.calls[0]
    assert got[0] == call[0] and got[1] == output and got[-1] is fsync
    assert got[2:-1] == call[1:]


# -- report ------------------------------------------------------------------------------------------

def test_block_notes() -> None:
    def r(name, *notes):
        return SimpleNamespace(block=SimpleNamespace(name=name, notes=notes))
    results = [r("", "n1"), r("a", "n1", "n2"), r("b"), *(r(f"c{i}", "n3") for i in range(5))]
    assert block_notes(results) == ("n1 (<root>, a)", "n2 (a)", "n3 (c0, c1, c2, c3 …)")
    assert block_notes([]) == ()


def test_checked_stage_results_in_order() -> None:
    checked = check(fuse(_plan()))
    names = [(item.block.name, result.check.ok) for item, result in checked.results()]
    assert names == [("features.0", True), ("features.2", True)]
    assert checked.model_check is None


# -- read: --model MODULE:CALLABLE -----------------------------------------------------------------

def _not_a_module():
    return 3


def _raises():
    raise ValueError("no")


def test_load_factory() -> None:
    from repvgg_cli.pipeline.read import load_factory
    from tests import zoo
    assert load_factory("tests.zoo:PlainNet") is zoo.PlainNet
    assert load_factory("tests.zoo:PlainNet.forward") is zoo.PlainNet.forward  # dotted attributes
    for spec, message in [
        ("tests.zoo", "--model 'tests.zoo': expected MODULE:CALLABLE, e.g. mypkg.models:build_model"),
        (":f", "--model ':f': expected MODULE:CALLABLE, e.g. mypkg.models:build_model"),
        ("tests.zoo:", "--model 'tests.zoo:': expected MODULE:CALLABLE, e.g. mypkg.models:build_model"),
        ("tests.zoo:nothing", "--model 'tests.zoo:nothing': tests.zoo has no attribute nothing"),
        ("tests.zoo:PlainNet.nothing", "--model 'tests.zoo:PlainNet.nothing': tests.zoo has no attribute "
                                       "PlainNet.nothing"),
        ("math:pi", "--model 'math:pi': pi is not callable"),
    ]:
        with pytest.raises(InputError) as caught:
            load_factory(spec)
        assert caught.value.message == message
    with pytest.raises(InputError) as caught:
        load_factory("tests.no_such_module_here:f")
    assert caught.value.message.startswith("--model 'tests.no_such_module_here:f': cannot import "
                                           "tests.no_such_module_here: No module named")


def test_build_model() -> None:
    from repvgg_cli.pipeline.read import build_model
    state = plain_state()
    model = build_model(f"{__name__}:_tiny_plain", OrderedDict((k, v.float()) for k, v in state.items()))
    assert type(model).__name__ == "PlainNet"
    assert torch.equal(model.state_dict()["head.weight"], state["head.weight"].float())
    with pytest.raises(InputError) as caught:
        build_model(f"{__name__}:_not_a_module", state)
    assert caught.value.message == f"--model '{__name__}:_not_a_module' returned a int, not an nn.Module"
    with pytest.raises(InputError) as caught:
        build_model(f"{__name__}:_raises", state)
    assert caught.value.message == f"--model '{__name__}:_raises': calling it failed: no"


def test_build_model_says_what_does_not_load() -> None:
    from repvgg_cli.pipeline.read import build_model
    torch.manual_seed(0)
    state = OrderedDict(nn.Sequential(nn.Conv2d(1, 1, 1)).state_dict())
    with pytest.raises(InputError) as caught:
        build_model(f"{__name__}:_one_conv", OrderedDict(state))
    assert caught.value.message.startswith("the checkpoint does not load into --model")
    state.pop("0.bias")
    state["0.extra"] = torch.zeros(1)
    with pytest.raises(InputError) as caught:
        build_model(f"{__name__}:_two_convs", state)  # two lines of torch's error, joined by one space
    assert caught.value.message == (f"the checkpoint does not load into --model {__name__}:_two_convs: "
                                    'Missing key(s) in state_dict: "0.bias", "1.weight", "1.bias". '
                                    'Unexpected key(s) in state_dict: "0.extra".')


def _tiny_plain():
    return PlainNet((3, 4, 4), (1, 1), num_classes=2)


def _one_conv():
    return nn.Conv2d(1, 1, 1)


def _two_convs():
    return nn.Sequential(nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1))


# -- report: keys outside blocks sorted by what comparing them proved -----------------------------------

def test_cast_keys_reported_as_casts() -> None:
    result = convert_state_dict(plain_state(), ConvertOptions(bn_eps=1e-5, dtype="float16"))
    report = result.key_diff
    assert [c.key for c in report.cast] == ["head.weight", "head.bias"]
    assert [(c.dtype_a, c.dtype_b) for c in report.cast] == [("float64", "float16")] * 2
    assert report.diff.changed == () and report.diff.unchanged == ()
    assert all(c.max_abs is not None and c.max_abs > 0 for c in report.cast)


def test_sort_compared() -> None:
    from repvgg_cli.diff.compare import compare_tensors
    from repvgg_cli.pipeline.report import _Kept
    source = torch.tensor([1.0, 1 / 3], dtype=torch.float64)
    kept = _Kept()
    half = ConvertOptions(dtype="float16")
    kept.sort_compared(compare_tensors("a", source, source.half()), source, source.half(), half)
    assert [c.key for c in kept.cast] == ["a"] and kept.changed == []
    assert kept.cast[0] == compare_tensors("a", source, source.half())
    other = source.half() + 1
    kept.sort_compared(compare_tensors("b", source, other), source, other, half)
    # the same dtype (no cast asked): a change even if the bytes are the source's
    kept.sort_compared(compare_tensors("c", source, source), source, source.clone(), ConvertOptions())
    assert [c.key for c in kept.changed] == ["b", "c"] and len(kept.cast) == 1


def test_digest_mismatch() -> None:
    from repvgg_cli.pipeline.report import _digest_mismatch
    c = _digest_mismatch("k", torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.float16))
    assert (c.key, c.shape_a, c.shape_b, c.dtype_a, c.dtype_b, c.bit_identical, c.max_abs, c.max_rel, c.within,
            c.problem) == ("k", (2, 3), (3, 2), "float32", "float16", False, None, None, False,
                           "the sha256 of the tensor written differs from the source tensor's")


def test_lightened_keeps_no_data() -> None:
    from repvgg_cli.pipeline.fuse import lightened
    item = next(fuse(_plan()).blocks(reuse_buffers=True))
    assert item.slot is not None
    light = lightened(item)
    assert (light.fused64, light.probe, light.slot) == (None, None, None)
    assert light.shipped.weight.is_meta and light.shipped.bias.is_meta
    assert light.shipped.weight.shape == item.shipped.weight.shape
    tensors = [c.weight for c in light.block.branches.convs]
    assert tensors and all(t.is_meta for t in tensors)
    assert light.params_before == item.params_before and light.block.name == item.block.name


# -- write: a file, streamed (.safetensors) or saved (.pt) -------------------------------------------

def _source_file(tmp_path: Path) -> tuple[Path, OrderedDict]:
    state = plain_state()
    path = tmp_path / "train.pt"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_file_output_is_the_in_memory_conversion(tmp_path: Path, suffix: str) -> None:
    from repvgg_cli.api import convert_file
    from repvgg_cli.io.metadata import tensor_sha256
    from repvgg_cli.io.read import load_checkpoint
    source, state = _source_file(tmp_path)
    memory = convert_state_dict(state, ConvertOptions(bn_eps=1e-5))
    calls: list = []

    def progress(total: int):
        calls.append(total)
        return None, calls.append

    out = tmp_path / ("deploy" + suffix)
    outcome = convert_file(source, out, ConvertOptions(bn_eps=1e-5), progress=progress)
    assert outcome.written and outcome.result.written and outcome.result.ok
    assert calls == [2, "features.0", "features.2"]
    loaded = load_checkpoint(out)
    assert sorted(loaded.state_dict) == sorted(memory.state_dict)
    for key, tensor in memory.state_dict.items():
        assert loaded.state_dict[key].dtype == tensor.dtype and torch.equal(loaded.state_dict[key], tensor), key
    meta = loaded.metadata
    assert meta["mode"] == "key tree" and meta["dropped_keys"] == []
    assert meta["source"] == {"name": "train.pt", "sha256": outcome.loaded.sha256, "entry": None,
                              "stripped_prefixes": []}
    assert [b["name"] for b in meta["blocks"]] == ["features.0", "features.2"]
    records = [block_record(r, 0) for r in memory.blocks]
    for got, want in zip(meta["blocks"], records):
        assert {k: v for k, v in got.items() if k != "probe"} == {k: v for k, v in want.items() if k != "probe"}
        assert got["probe"]["seed"] == want["probe"]["seed"] and got["probe"]["shape"] == want["probe"]["shape"]
    assert meta["tensors"] == {k: tensor_sha256(t) for k, t in memory.state_dict.items()}
    report = outcome.result.key_diff
    assert report.diff.unchanged == ("head.weight", "head.bias") and report.cast == ()
    assert report.proof == ("sha256" if suffix == ".safetensors" else "bytes")
    assert report.unverified_reason is None and report.balanced
    t = report.totals
    assert (t["removed"], t["added"], t["unchanged"], t["source_keys"], t["output_keys"]) == (29, 4, 2, 31, 6)
    removed = {b.name: [e.key for e in b.removed] for b in report.diff.blocks}
    assert removed["features.2"][:3] == ["features.2.conv3x3.weight", "features.2.bn3x3.weight",
                                         "features.2.bn3x3.bias"]  # in the source's order
    assert outcome.result.passthrough_keys == 2
    assert outcome.result.options == ConvertOptions(bn_eps=1e-5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_failed_check_writes_nothing(tmp_path: Path, suffix: str) -> None:
    from repvgg_cli.api import convert_file
    source, _ = _source_file(tmp_path)
    out = tmp_path / ("deploy" + suffix)
    outcome = convert_file(source, out, ConvertOptions(bn_eps=1e-5, tolerance=Tolerance(rtol=0.0, atol=0.0)))
    assert not outcome.written and not outcome.result.ok and not out.exists()
    assert [r.block.name for r in outcome.result.failures] == ["features.0", "features.2"]
    assert list(tmp_path.iterdir()) == [source]
    report = outcome.result.key_diff
    if suffix == ".safetensors":  # nothing was written: the streamed keys have no data to compare
        assert report.diff.unverified == ("head.weight", "head.bias")
        assert report.unverified_reason == "the output holds no data to compare (it was not written)"


def test_streamed_cast_proven_by_digest(tmp_path: Path) -> None:
    from repvgg_cli.api import convert_file
    from repvgg_cli.io.read import load_checkpoint
    source, state = _source_file(tmp_path)
    out = tmp_path / "deploy.safetensors"
    outcome = convert_file(source, out, ConvertOptions(bn_eps=1e-5, dtype="float16"))
    report = outcome.result.key_diff
    assert report.proof == "sha256" and [c.key for c in report.cast] == ["head.weight", "head.bias"]
    assert report.diff.changed == () and report.diff.unchanged == ()
    loaded = load_checkpoint(out)
    assert {t.dtype for t in loaded.state_dict.values()} == {torch.float16}
    assert torch.equal(loaded.state_dict["head.weight"], state["head.weight"].half())


def test_output_budget_through_the_api(tmp_path: Path) -> None:
    from repvgg_cli.api import convert_file
    source, _ = _source_file(tmp_path)
    with pytest.raises(InputError) as caught:
        convert_file(source, tmp_path / "o.safetensors", ConvertOptions(bn_eps=1e-5, max_output_bytes=100))
    assert caught.value.message.startswith(f"{source}: the output would hold 3,000 bytes of tensors, more than the "
                                           "100 allowed (max_output_bytes=...); the largest tensor is ")
    assert caught.value.hint == ("if that is intended, pass max_output_bytes=... with a larger limit, or write a .pt "
                                 "output, which keeps shared storage shared")
    assert not (tmp_path / "o.safetensors").exists()


# -- fuse: one block, its chunks, its buffer -------------------------------------------------------

def test_in_block() -> None:
    from repvgg_cli.pipeline.fuse import in_block
    error = in_block(UnsupportedError("bad", "a hint"), "s.0")
    assert type(error) is UnsupportedError and (error.message, error.hint) == ("block s.0: bad", "a hint")
    assert in_block(InputError("x"), "").message == "block <root>: x"
    assert in_block(InputError("block a: x"), "b").message == "block a: x"


def test_params_of() -> None:
    from repvgg_cli.pipeline.fuse import params_of
    state = plain_state()
    plan = _plan(OrderedDict(state))
    # features.2: 3x3 conv 144 + 1x1 conv 16 + three BNs' weight and bias 24; BN statistics are not parameters
    assert [params_of(b, state) for b in plan.blocks] == [3 * 4 * 9 + 3 * 4 + 16, 184]
    assert [params_of(b, None) for b in plan.blocks] == [3 * 4 * 9 + 3 * 4 + 16, 184]


def test_fuse_one_hands_chunks_to_the_sink() -> None:
    from concurrent.futures import Future
    from repvgg_cli.pipeline.fuse import fuse_one
    block = _plan().blocks[1]
    rows: list = []

    def sink(start, stop, chunk):
        rows.append((start, stop, chunk.clone()))
        future = Future()
        future.set_result(None)
        return future

    busy: list = []
    shipped, fused64, probe = fuse_one(block, 0, sink=sink, busy=busy)
    assert fused64 is None and probe is not None
    assert rows and rows[0][0] == 0 and rows[-1][1] == 4 and len(busy) == len(rows)
    assert torch.equal(torch.cat([r[2] for r in rows]), shipped.weight)
    plain, _, _ = fuse_one(block, 0)
    assert torch.equal(plain.weight, shipped.weight) and torch.equal(plain.bias, shipped.bias)
    half = replace(block, dtype=torch.float16)
    rows.clear()
    busy.clear()
    shipped16, fused64, probe = fuse_one(half, 0, sink=sink, busy=busy)
    assert probe is None and fused64.weight.dtype == torch.float64 and shipped16.weight.dtype == torch.float16
    assert torch.equal(shipped16.weight, fused64.weight.half()) and torch.equal(fused64.weight, plain.weight)
    assert [(a, b) for a, b, _ in rows] == [(0, 4)] and len(busy) == 1
    assert torch.equal(rows[0][2], shipped16.weight)
    # a composite block gets no probe: its whole weight goes to the sink once fused
    composite = replace(block, branches=replace(block.branches, composite=True))
    rows.clear()
    busy.clear()
    shipped_c, fused64, probe = fuse_one(composite, 0, sink=sink, busy=busy)
    assert probe is None and fused64 is None and torch.equal(shipped_c.weight, plain.weight)
    assert [(a, b) for a, b, _ in rows] == [(0, 4)] and len(busy) == 1 and torch.equal(rows[0][2], plain.weight)
    rows.clear()
    fuse_one(composite, 0, sink=sink)  # no list to hand the futures to
    assert [(a, b) for a, b, _ in rows] == [(0, 4)]


def test_slot_take_waits_for_its_writes() -> None:
    from concurrent.futures import Future
    from repvgg_cli.pipeline.fuse import Slot
    slot = Slot(torch.arange(10.0))
    done = Future()
    done.set_result(1)
    slot.busy.append(done)
    view = slot.take((2, 3))
    assert slot.busy == [] and view.shape == (2, 3) and torch.equal(view.flatten(), torch.arange(6.0))
    assert view.data_ptr() == slot.tensor.data_ptr()


def test_key_tree_owned_source_frees_block_keys() -> None:
    plan = _plan()
    plan.source.owned = True
    state = plan.source.state
    items = list(fuse(plan).blocks())
    assert [i.block.name for i in items] == ["features.0", "features.2"] and plan.blocks == []
    assert list(state) == ["head.weight", "head.bias"]
    assert [i.slot for i in items] == [None, None]
    kept = _plan()
    list(fuse(kept).blocks())
    assert len(kept.source.state) == 31  # not owned: the caller's tensors stay


def test_half_blocks_get_no_buffer() -> None:
    plan = _plan(dtype="float16")
    items = list(fuse(plan).blocks(reuse_buffers=True))
    assert [i.slot for i in items] == [None, None]
    assert [i.shipped.weight.dtype for i in items] == [torch.float16] * 2


# -- module tree --------------------------------------------------------------------------------------

class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))

    def forward_fuse(self, x):
        return self.conv(x)


def test_conv_bn_pairs_folded_in_the_module_tree() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(OrderedDict(stem=nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)),
                                      block=PlainNet((4, 4), (1,), num_classes=2).features[0], head=_Head()))
    randomize_bn(model)
    model = model.double().eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    result = reparameterize(model, ConvertOptions(fuse_conv_bn=True, input_shape=(1, 3, 6, 6)))
    assert [(r.block.name, r.block.family) for r in result.blocks] == [
        ("block", "plain"), ("stem.0", "conv+bn"), ("head.conv", "conv+bn")]
    deploy = result.model
    assert isinstance(deploy.stem[1], nn.Identity) and not hasattr(deploy.head, "bn")
    assert deploy.head.forward == deploy.head.forward_fuse
    with torch.no_grad():
        got = deploy(x)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)
    assert result.model_check.ok and result.model_check.outputs == 1
    assert [r.params_before for r in result.blocks][1:] == [3 * 4 * 9 + 4 + 8, 16 + 4 + 8]
    assert [r.params_after for r in result.blocks][1:] == [3 * 4 * 9 + 4, 16 + 4]
    plain = reparameterize(model)
    assert [r.block.name for r in plain.blocks] == ["block"]


def test_module_tree_half_cast_last() -> None:
    torch.manual_seed(6)
    model = randomize_bn(PlainNet((3, 4, 4), (1, 1), num_classes=2)).eval()
    result = reparameterize(model, ConvertOptions(dtype="float16", input_shape=(1, 3, 6, 6)))
    assert {p.dtype for p in result.model.parameters()} == {torch.float16}
    assert [r.fused.weight.dtype for r in result.blocks] == [torch.float32, torch.float32]
    assert {v.dtype for v in result.state_dict.values()} == {torch.float16}


# -- find: the plan of a state dict, and its refusals ---------------------------------------------

def _repvgg_state() -> OrderedDict:
    from tests import zoo
    torch.manual_seed(7)
    return OrderedDict(zoo.randomize_bn(zoo.repvgg("tiny")).state_dict())


def _refusal(state, options=None, source=None):
    with pytest.raises((InputError, UnsupportedError)) as caught:
        find(source or read_state(state), options or ConvertOptions())
    return type(caught.value).__name__, caught.value.message, caught.value.hint


def test_plan_of_a_state_dict() -> None:
    state = _repvgg_state()
    state["stage1_aux.0.weight"] = torch.zeros(2)  # a RepVGGplus aux head: training only
    state["linear.extra"] = torch.zeros(1)
    plan = find(read_state(state), ConvertOptions(dtype="float16"))
    assert plan.keys == list(state) and plan.mode == "key tree"
    assert plan.dropped == ("stage1_aux.0.weight",)
    assert plan.passthrough == ["linear.weight", "linear.bias", "linear.extra"]
    assert [b.name for b in plan.blocks][:3] == ["stage0", "stage1.0", "stage2.0"] and len(plan.blocks) == 7
    assert {b.dtype for b in plan.blocks} == {torch.float16}
    assert plan.unrecognised == () and plan.modules == [] and plan.pairs == []
    assert {b.dtype for b in find(read_state(state), ConvertOptions()).blocks} == {torch.float32}


def test_half_converted_checkpoint_refused() -> None:
    for suffix in ("weight", "bias"):
        state = _repvgg_state()
        state[f"stage1.0.rbr_reparam.{suffix}"] = torch.zeros(1)
        assert _refusal(state) == ("UnsupportedError", f"block stage1.0: the file already has the deploy key "
                                   f"stage1.0.rbr_reparam.{suffix} next to the train-form branches "
                                   "(a half-converted checkpoint?)", None)
    root = OrderedDict((k.removeprefix("stage0."), v) for k, v in _repvgg_state().items() if k.startswith("stage0."))
    root["rbr_reparam.weight"] = torch.zeros(1)
    assert _refusal(root)[1] == ("block <root>: the file already has the deploy key rbr_reparam.weight next to the "
                                 "train-form branches (a half-converted checkpoint?)")


def test_nothing_to_fuse() -> None:
    from tests import zoo
    deploy = zoo.repvgg("tiny", deploy=True).state_dict()
    assert _refusal(deploy) == (
        "InputError", "no train-form block found: the checkpoint is already in deploy form (14 deploy-form block(s) "
        "of official, orepa_repvgg, e.g. stage0); there is nothing to fuse",
        "`repvgg families` lists the blocks that can be fused")
    assert _refusal({"a.weight": torch.zeros(2), "b": torch.zeros(1)}) == (
        "InputError", "no re-parameterizable block found among its 2 keys: no family knows these layers",
        "`repvgg families` lists the blocks that can be fused")
    written = SimpleNamespace(metadata={"blocks": []})
    from repvgg_cli.pipeline.read import Source
    assert _refusal(None, source=Source(state=OrderedDict(deploy), loaded=written)) == (
        "InputError", "no train-form block found: the file carries repvgg_cli deploy metadata, it is a deploy "
        "checkpoint repvgg convert wrote; there is nothing to fuse", "check it with `repvgg verify`")
    other = Source(state=OrderedDict(a=torch.zeros(1)), loaded=SimpleNamespace(metadata={"blocks": None}))
    assert _refusal(None, source=other)[1] == ("no re-parameterizable block found among its 1 keys: no family "
                                               "knows these layers")


def test_unclaimed_branches_refused_or_passed_through() -> None:
    state = _repvgg_state()
    for i in range(5):
        state[f"x{i}.rbr_dense.conv.weight"] = torch.zeros(2, 2, 3, 3)
    kind, message, hint = _refusal(state)
    assert (kind, message) == ("InputError", "5 group(s) of keys look like re-parameterization branches that no "
                               "family claims: x0 (branch-like keys rbr_dense); x1 (branch-like keys rbr_dense); "
                               "x2 (branch-like keys rbr_dense) and 2 more; they would pass through unfused")
    assert hint == ("if they are meant to stay as they are, pass --passthrough 'x0*' (repeatable); "
                    "`repvgg families` lists what can be fused")
    three = OrderedDict((k, v) for k, v in state.items() if not k.startswith(("x3", "x4")))
    assert _refusal(three)[1].endswith("x2 (branch-like keys rbr_dense); they would pass through unfused")
    plan = find(read_state(state), ConvertOptions(passthrough=("x*",)))
    assert plan.passthrough[-5:] == [f"x{i}.rbr_dense.conv.weight" for i in range(5)]


def test_a_model_with_nothing_to_fuse() -> None:
    from repvgg_cli.pipeline.read import read_model
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))
    kind, message, hint = _refusal(None, source=read_model(model))
    assert (kind, message) == ("InputError", "the model (Sequential) has no block any family knows: nothing to fuse")
    assert hint == ("`repvgg families` lists the blocks that can be fused; with --fuse-conv-bn, conv→BN pairs are "
                    "folded too")
    plan = find(read_model(model), ConvertOptions(fuse_conv_bn=True))
    assert [p.name for p in plan.pairs] == ["0"] and plan.modules == [] and plan.mode == "module tree"


# -- the API: verify_file, argument checks, whose words --------------------------------------------

def _deploy_file(tmp_path: Path, suffix: str = ".safetensors", **options) -> tuple[Path, Path]:
    from repvgg_cli.api import convert_file
    source, _ = _source_file(tmp_path)
    out = tmp_path / ("deploy" + suffix)
    assert convert_file(source, out, ConvertOptions(bn_eps=1e-5, **options)).written
    return source, out


def test_verify_file_on_its_own_and_against_the_source(tmp_path: Path) -> None:
    from repvgg_cli.api import verify_file
    source, out = _deploy_file(tmp_path)
    alone = verify_file(out)
    assert alone.ok and alone.against is None and alone.model_check is None and alone.notes == ()
    assert [b.name for b in alone.blocks] == ["features.0", "features.2"]
    against = verify_file(out, against=source, bn_eps=1e-5)
    assert against.ok and against.against == str(source) and against.model_check is None and against.notes == ()
    assert [b.name for b in against.blocks] == ["features.0", "features.2"]
    other = verify_file(out, against=source, bn_eps=1e-3)  # eps from the caller, not from the file
    assert not other.ok and [b.name for b in other.failures] == ["features.0", "features.2"]
    assert other.notes == ("the file says it was converted with --bn-eps 1e-05" + NOTE_TAIL,)
    loose = verify_file(out, against=source, bn_eps=1e-3, tolerance=Tolerance(rtol=1.0, atol=1.0))
    assert loose.ok  # the tolerance given is the one used
    via_options = verify_file(out, against=source, options=ConvertOptions(bn_eps=1e-3))
    assert not via_options.ok
    assert verify_file(out, against=source, options=ConvertOptions(bn_eps=1e-3), bn_eps=1e-5).ok  # bn_eps wins


def test_verify_file_without_metadata(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from repvgg_cli.api import verify_file
    from repvgg_cli.io.metadata import METADATA_KEY
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    with pytest.raises(InputError) as caught:
        verify_file(bare)
    assert caught.value.message == f"{bare} has no repvgg_cli metadata, so it cannot be checked on its own"
    assert caught.value.hint == "pass against=TRAIN to recompute from the train-form source"
    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad), metadata={METADATA_KEY: '{"blocks": [], "dropped_keys": 3}'})
    with pytest.raises(InputError) as caught:
        verify_file(bad)
    assert caught.value.message == f"{bad}: its repvgg_cli metadata is malformed: dropped_keys is a int 3, not a list of strings"
    assert caught.value.hint == ("the file was changed after repvgg convert wrote it; convert the train-form source "
                                 "again")


def test_verify_file_compares_pickled_models(tmp_path: Path) -> None:
    from repvgg_cli.api import convert_file, verify_file
    torch.manual_seed(8)
    model = randomize_bn(PlainNet((3, 4, 4), (1, 1), num_classes=2)).eval()
    source = tmp_path / "model.pt"
    torch.save(model, source)
    out = tmp_path / "deploy.pt"
    assert convert_file(source, out, ConvertOptions(input_shape=(1, 3, 6, 6)), allow_pickle=True).written
    report = verify_file(out, against=source, allow_pickle=True, input_shape=(1, 3, 5, 5))
    assert report.ok and report.model_check is not None
    check_ = report.model_check
    assert (check_.input_shape, check_.dtype, check_.outputs, check_.problem) == ((1, 3, 5, 5), "float64", 1, None)
    inferred = verify_file(out, against=source, allow_pickle=True).model_check
    assert inferred.input_shape == (2, 3, 64, 64)


def test_options_and_eps_checked() -> None:
    from repvgg_cli.api import verify_file
    with pytest.raises(InputError) as caught:
        convert_state_dict(plain_state(), {"bn_eps": 1e-5})  # type: ignore[arg-type]
    assert caught.value.message == "options must be a ConvertOptions, not a dict"
    assert api._checked_options(None) == ConvertOptions()
    given = ConvertOptions(seed=3)
    assert api._checked_options(given) is given
    for eps in (0, 0.0, 1e-5, 2):
        api._checked_eps(eps)  # zero and ints are fine
    api._checked_eps(None)
    for eps in (-1e-9, float("nan"), float("-inf"), False, "0.1", None.__class__):
        with pytest.raises(InputError) as caught:
            api._checked_eps(eps)
        assert caught.value.message == f"--bn-eps {eps!r}: BatchNorm eps must be a finite number >= 0"
        assert caught.value.hint == "leave it out to use the family's default (1e-5; YOLO families 1e-3)"
    with pytest.raises(InputError) as caught:
        verify_file("nowhere.safetensors", bn_eps=-2.0)
    assert caught.value.message == "bn_eps=-2.0: BatchNorm eps must be a finite number >= 0"
    assert caught.value.hint == "leave it out to use the family's default (1e-5; YOLO families 1e-3)"


def test_whose_words() -> None:
    assert api._called_from_repvgg_cli(SimpleNamespace(f_globals={"__name__": "repvgg_cli"}))
    assert api._called_from_repvgg_cli(SimpleNamespace(f_globals={"__name__": "repvgg_cli.cli.convert"}))
    assert not api._called_from_repvgg_cli(SimpleNamespace(f_globals={"__name__": "repvgg_cli_extra"}))
    assert not api._called_from_repvgg_cli(SimpleNamespace(f_globals={"__name__": None}))
    assert not api._called_from_repvgg_cli(object())
    caller = {"__name__": "repvgg_cli.batch", "convert_state_dict": convert_state_dict,
              "ConvertOptions": ConvertOptions, "state": plain_state()}
    with pytest.raises(InputError) as caught:
        exec("convert_state_dict(state, ConvertOptions(bn_eps=-1.0))", caller)
    assert caught.value.message == "--bn-eps -1.0: BatchNorm eps must be a finite number >= 0"
    assert caught.value.args == (caught.value.message,) or caught.value.args[0] == caught.value.message
    with pytest.raises(InputError) as caught:
        convert_state_dict(plain_state(), ConvertOptions(bn_eps=-1.0))
    assert caught.value.args[0] == "bn_eps=-1.0: BatchNorm eps must be a finite number >= 0"
    assert str(caught.value).startswith("bn_eps=-1.0: BatchNorm eps")


def test_errors_name_the_file_once() -> None:
    with pytest.raises(InputError) as caught:
        with api.errors_name(Path("a/b.pt")):
            raise InputError("bad block", "a hint")
    assert (caught.value.message, caught.value.hint) == ("a/b.pt: bad block", "a hint")
    with pytest.raises(UnsupportedError) as caught:
        with api.errors_name(Path("a/b.pt")):
            raise UnsupportedError("in a/b.pt: bad")
    assert caught.value.message == "in a/b.pt: bad"
    with api.errors_name(Path("x")):
        pass


# -- check: eps sensitivity; report: the module tree's key diff --------------------------------------

def test_eps_sensitivity_only_where_nobody_decided_eps() -> None:
    from repvgg_cli.checks.probe import eps_sensitivity
    result = convert_state_dict(plain_state(), ConvertOptions(seed=3))
    plan = find(read_state(plain_state()), ConvertOptions())
    want = [eps_sensitivity(b.name, b.branches, 3, None) for b in plan.blocks]
    got = [r.eps_sensitivity for r in result.blocks]
    assert [r.block.eps_source for r in result.blocks] == ["default", "default"]
    assert got == pytest.approx(want, rel=1e-9) and all(g > 1e-4 for g in got)
    assert got != pytest.approx([eps_sensitivity(b.name, b.branches, 0, None) for b in plan.blocks], rel=1e-6)
    assert result.eps_sensitive == tuple((r.block.name, r.eps_sensitivity) for r in result.blocks)
    decided = convert_state_dict(plain_state(), ConvertOptions(bn_eps=1e-5, seed=3))
    assert [r.eps_sensitivity for r in decided.blocks] == [None, None] and decided.eps_sensitive == ()
    loose = convert_state_dict(plain_state(), ConvertOptions(seed=3, tolerance=Tolerance(rtol=1e-3)))
    assert [name for name, _ in loose.eps_sensitive] == ["features.2"]  # only beyond the block's rtol


def test_module_tree_key_diff_with_conv_bn_pairs() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(OrderedDict(stem=nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                                                         nn.Conv2d(4, 4, 1)),
                                      block=PlainNet((4, 4), (1,), num_classes=2).features[0], head=_Head()))
    model = randomize_bn(model).double().eval()
    options = ConvertOptions(fuse_conv_bn=True, input_shape=(1, 3, 6, 6))
    calls: list = []
    entered: list = []

    class Bar:
        def __enter__(self):
            entered.append("in")

        def __exit__(self, *exc):
            entered.append("out")

    def progress(total: int):
        calls.append(total)
        return Bar(), calls.append

    result = reparameterize(model, options, progress=progress)
    assert calls == [3, "block", "stem.0", "head.conv"] and entered == ["in", "out"]  # blocks, then pairs
    assert result.options is options
    report = result.key_diff
    assert report.diff.unchanged == ("stem.2.weight", "stem.2.bias")  # the owner's other child is not the pair's
    blocks = {b.name: ([e.key for e in b.removed], [e.key for e in b.added]) for b in report.diff.blocks}
    stats = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert blocks["stem.0"] == (["stem.0.weight", "stem.0.bias"] + [f"stem.1.{s}" for s in stats],
                                ["stem.0.weight", "stem.0.bias"])
    assert blocks["head.conv"] == (["head.conv.weight", "head.conv.bias"] + [f"head.bn.{s}" for s in stats],
                                   ["head.conv.weight", "head.conv.bias"])
    assert blocks["block"][1] == ["block.weight", "block.bias"] and len(blocks["block"][0]) == 17
    t = report.totals
    assert (t["removed"], t["added"], t["unchanged"], t["dropped"], t["source_keys"], t["output_keys"]) == (
        31, 6, 2, 0, 33, 8)
    assert report.balanced and result.passthrough_keys == 0 and result.mode == "module tree"
    assert result.unrecognised == ()


def test_module_tree_keeps_keys_outside_blocks() -> None:
    torch.manual_seed(9)
    model = randomize_bn(PlainNet((3, 4, 4), (1, 1), num_classes=2)).double().eval()
    result = reparameterize(model, ConvertOptions(input_shape=(1, 3, 6, 6)))
    report = result.key_diff
    assert report.diff.unchanged == ("head.weight", "head.bias") and report.proof == "bytes"
    assert list(result.state_dict) == ["features.0.weight", "features.0.bias", "features.2.weight",
                                       "features.2.bias", "head.weight", "head.bias"]
    assert torch.equal(result.state_dict["head.weight"], model.head.weight)
    assert [r.block.name for r in result.blocks] == ["features.0", "features.2"]
    assert [(r.params_before, r.params_after) for r in result.blocks] == [(3 * 4 * 9 + 12 + 16, 3 * 4 * 9 + 4),
                                                                          (184, 148)]


def test_conversion_result_defaults() -> None:
    from repvgg_cli.pipeline.report import ConversionResult
    r = ConversionResult("key tree", OrderedDict(), ())
    assert (r.model, r.dropped_keys, r.passthrough_keys, r.model_check, r.notes, r.unrecognised, r.written,
            r.key_diff) == (None, (), 0, None, (), (), False, None)
    assert r.options == ConvertOptions() and r.written is False
    assert r.ok and r.failures == () and r.params_before == 0 and r.params_after == 0


def test_module_tree_block_records_know_stride_and_groups() -> None:
    torch.manual_seed(10)
    model = randomize_bn(PlainNet((3, 4, 4), (2, 1), num_classes=2)).double().eval()
    result = reparameterize(model, ConvertOptions(input_shape=(1, 3, 6, 6)))
    records = [block_record(r, 0) for r in result.blocks]
    assert [(r["stride"], r["groups"], r["in_channels"]) for r in records] == [([2, 2], 1, 3), ([1, 1], 1, 4)]
    assert [r["eps_source"] for r in records] == [result.blocks[0].block.eps_source] * 2


def test_streamed_reshaped_weights_are_written_before_their_buffer_is_refilled(tmp_path: Path, monkeypatch) -> None:
    """A block whose deploy weight is a reshape of the fused one is not streamed row by row: it is put
    whole from the reused buffer, and that write must be waited for before the buffer is refilled."""
    from repvgg_cli.io.read import load_checkpoint
    from repvgg_cli.io.safetensors_file import SafetensorsStream
    from repvgg_cli.pipeline import fuse as fuse_stage
    torch.manual_seed(11)
    state = OrderedDict(randomize_bn(PlainNet((3, 4, 4, 4), (1, 1, 1), num_classes=2)).double().state_dict())
    plan = find(read_state(state), ConvertOptions(bn_eps=1e-5))
    plan.blocks = [replace(b, weight_shape=(4, b.branches.convs[0].weight[0].numel())) for b in plan.blocks]
    puts: dict = {}
    real_put = SafetensorsStream.put

    def put(self, key, tensor):
        puts[key] = real_put(self, key, tensor)
        return puts[key]

    waited: list = []
    real_take = fuse_stage.Slot.take

    def take(self, shape):
        waited.append(list(self.busy))
        return real_take(self, shape)

    monkeypatch.setattr(SafetensorsStream, "put", put)
    monkeypatch.setattr(fuse_stage.Slot, "take", take)
    loaded = SimpleNamespace(path=Path("train.pt"), sha256="00", entry=None, stripped_prefixes=(), file_size=10**6,
                             data_bytes=None)
    out = tmp_path / "deploy.safetensors"
    written = write_stage.write(check(fuse(plan)), File(out, loaded))
    assert written.written
    assert len(waited) == 3 and waited[0] == [] and waited[1] == []
    assert puts["features.0.weight"] in waited[2]  # the first block's buffer, refilled for the third
    saved = load_checkpoint(out).state_dict
    assert saved["features.0.weight"].shape == (4, 27) and saved["features.4.weight"].shape == (4, 36)


def test_no_conv_to_infer_an_input_shape_from() -> None:
    model = nn.Sequential(nn.Linear(2, 2)).double()
    message = "the model has no Conv2d to infer an input shape from; pass --input-shape N,C,H,W"
    with pytest.raises(InputError) as caught:
        api._compare_models(model, model, None, Tolerance())
    assert caught.value.message == message and caught.value.hint is None
    with pytest.raises(InputError) as caught:
        Checked._train_outputs(model, ConvertOptions())
    assert caught.value.message == message and caught.value.hint is None
    assert api._compare_models(model, model, (3, 2), Tolerance()).input_shape == (3, 2)


def test_compare_models_reports_other_output_shapes() -> None:
    torch.manual_seed(12)
    train = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1)).double()
    deploy = nn.Sequential(nn.Conv2d(2, 3, 3)).double()
    result = api._compare_models(train, deploy, (1, 2, 5, 5), Tolerance())
    assert result.max_abs_err == float("inf") and result.scale == 0.0 and not result.ok
    assert result.problem.startswith("the deploy model's outputs differ in shape: ")
    x, shape, reference = Checked._train_outputs(train, ConvertOptions(input_shape=(1, 2, 5, 5)))
    staged = Checked._compare_models(deploy, (x, shape, reference), ConvertOptions())
    assert staged.max_abs_err == float("inf") and staged.scale == 0.0 and not staged.ok
    assert staged.problem == result.problem
    same = Checked._compare_models(train, (x, shape, reference), ConvertOptions())
    assert same.ok and same.max_abs_err == 0.0 and same.scale > 0
    int_only = nn.Sequential(nn.Identity())
    assert api._compare_models(int_only, int_only, (1, 2), Tolerance()).rtol == Tolerance().rtol_for(torch.float32)


def test_half_model_blocks_measure_the_cast_apart() -> None:
    """A float16 model's blocks are fused in float64 and cast: the check tells the cast's error apart
    from the fusion's (a float64 fusion of the same block is what the cast is measured against)."""
    torch.manual_seed(13)
    model = randomize_bn(PlainNet((3, 4, 4), (1, 1), num_classes=2)).half().eval()
    result = reparameterize(model, check_model=False)
    assert [r.fused.weight.dtype for r in result.blocks] == [torch.float16] * 2
    for r in result.blocks:
        assert r.check.cast_abs_err != r.check.max_abs_err
        assert r.check.cast_abs_err == pytest.approx(r.check.max_abs_err, rel=1e-6)
    assert result.model_check is None


def test_eps_sensitivity_of_half_blocks_from_their_own_seeded_probe() -> None:
    """float16 blocks have no centre probe: their eps sensitivity runs the block on its own seeded input."""
    from repvgg_cli.checks.probe import eps_sensitivity
    result = convert_state_dict(plain_state(), ConvertOptions(dtype="float16", seed=3))
    plan = find(read_state(plain_state()), ConvertOptions(dtype="float16"))
    want = [eps_sensitivity(b.name, b.branches, 3, None) for b in plan.blocks]
    assert [r.eps_sensitivity for r in result.blocks] == pytest.approx(want, rel=1e-12)
    assert want[0] != pytest.approx(eps_sensitivity("other", plan.blocks[0].branches, 3, None), rel=1e-6)


def test_streamed_write_leaves_a_core_to_the_writer_and_restores_threads(tmp_path: Path) -> None:
    from repvgg_cli.api import convert_file
    source, _ = _source_file(tmp_path)
    seen: list = []

    def progress(total: int):
        return None, lambda name: seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert convert_file(source, tmp_path / "d.safetensors", ConvertOptions(bn_eps=1e-5), progress=progress).written
        assert seen == [2, 2] and torch.get_num_threads() == 3
        failed = convert_file(source, tmp_path / "e.safetensors",
                              ConvertOptions(bn_eps=1e-5, tolerance=Tolerance(rtol=0.0, atol=0.0)))
        assert not failed.written and torch.get_num_threads() == 3
        seen.clear()
        assert convert_file(source, tmp_path / "d.pt", ConvertOptions(bn_eps=1e-5), progress=progress).written
        assert seen == [3, 3]  # a .pt output is built in memory: no writer thread to leave a core to
    finally:
        torch.set_num_threads(before)


def test_sort_by_digest() -> None:
    from repvgg_cli.diff.compare import compare_tensors
    from repvgg_cli.io.metadata import tensor_sha256
    from repvgg_cli.pipeline.report import _digest_mismatch, _Kept
    source = torch.tensor([1.0, 1 / 3], dtype=torch.float64)
    out = source.to("meta")
    keep, half = ConvertOptions(), ConvertOptions(dtype="float16")
    kept = _Kept()
    kept.sort_by_digest("meta", source.to("meta"), out, tensor_sha256(source), keep)
    kept.sort_by_digest("none", source, out, None, keep)
    assert kept.unverified == ["meta", "none"] and not kept.by_digest
    kept.sort_by_digest("same", source, out, tensor_sha256(source), keep)
    assert kept.unchanged == ["same"] and kept.by_digest
    kept.sort_by_digest("other", source, out, tensor_sha256(source + 1), keep)
    kept.sort_by_digest("shape", source, torch.empty(1, 2, dtype=torch.float64, device="meta"),
                        tensor_sha256(source), keep)
    kept.sort_by_digest("dtype", source, out, tensor_sha256(source), half)  # the digest of the uncast tensor
    assert [c.key for c in kept.changed] == ["other", "shape", "dtype"]
    assert kept.changed[0] == _digest_mismatch("other", source, out)
    kept.sort_by_digest("cast", source, source.half().to("meta"), tensor_sha256(source.half()), half)
    assert [c.key for c in kept.cast] == ["cast"] and kept.cast[0] == compare_tensors("cast", source, source.half())
    assert kept.unchanged == ["same"] and kept.unverified == ["meta", "none"]


def test_forget_raw_weights() -> None:
    from repvgg_cli.pipeline.read import _forget_raw_weights
    state = {"w": torch.zeros(1)}
    _forget_raw_weights(SimpleNamespace(raw=state, entry=None, state_dict=state))
    assert list(state) == ["w"]  # the raw object is the state dict itself: kept
    inner = {"w": torch.zeros(1)}
    raw = {"ema": inner, "epoch": 3}
    _forget_raw_weights(SimpleNamespace(raw=raw, entry="ema", state_dict={"w": inner["w"]}))
    assert inner == {} and raw == {"ema": {}, "epoch": 3}  # the entry's own references dropped, others kept
    whole = {"w": torch.zeros(1), "epoch": 3}
    _forget_raw_weights(SimpleNamespace(raw=whole, entry=None, state_dict={"w": whole["w"]}))
    assert whole == {}
    listed = [1, 2]
    _forget_raw_weights(SimpleNamespace(raw=listed, entry=None, state_dict={}))
    assert listed == [1, 2]  # not a dict: left alone
    odd = {"ema": [1, 2]}
    _forget_raw_weights(SimpleNamespace(raw=odd, entry="ema", state_dict={}))
    assert odd == {"ema": [1, 2]}


def test_model_spec_source_keeps_its_file(tmp_path: Path) -> None:
    from repvgg_cli.api import convert_file
    source, _ = _source_file(tmp_path)
    outcome = convert_file(source, tmp_path / "d.pt", ConvertOptions(input_shape=(1, 3, 6, 6)),
                           model_spec=f"{__name__}:_tiny_plain")
    assert outcome.written and outcome.result.mode == "module tree"
    assert outcome.loaded is not None and outcome.loaded.path == source
    from repvgg_cli.io.read import load_checkpoint
    meta = load_checkpoint(tmp_path / "d.pt").metadata
    assert meta["source"]["name"] == "train.pt" and meta["source"]["sha256"] == outcome.loaded.sha256


def test_params_before_counts_the_state_tensors_of_the_source_keys() -> None:
    plan = _plan()
    plan.blocks = [replace(b, source_keys=b.source_keys + ("head.weight",)) for b in plan.blocks]
    items = list(fuse(plan).blocks())
    assert [i.params_before for i in items] == [3 * 4 * 9 + 12 + 16 + 8, 184 + 8]  # head.weight is 2x4


def test_streamed_keys_without_a_recorded_digest(tmp_path: Path) -> None:
    from repvgg_cli.pipeline.report import key_report
    plan = _plan()
    loaded = SimpleNamespace(path=Path("train.pt"), sha256="00", entry=None, stripped_prefixes=(), file_size=10**6,
                             data_bytes=None)
    written = write_stage.write(check(fuse(plan)), File(tmp_path / "d.safetensors", loaded))
    assert written.written and set(written.digests) == set(written.state_dict)
    assert key_report(written).diff.unchanged == ("head.weight", "head.bias")
    written.digests.clear()
    report = key_report(written)
    assert report.diff.unverified == ("head.weight", "head.bias")
    assert report.unverified_reason == "no tensor digest was recorded for them"


def test_two_buffers_per_shipped_dtype(monkeypatch) -> None:
    from repvgg_cli.pipeline import fuse as fuse_stage
    made: list = []
    real = fuse_stage.Slot

    def counted(tensor):
        made.append((tensor.dtype, tensor.numel()))
        return real(tensor)

    monkeypatch.setattr(fuse_stage, "Slot", counted)
    items = list(fuse(_plan()).blocks(reuse_buffers=True))
    assert made == [(torch.float64, 4 * 4 * 9)] * 2  # as large as the largest block's weight
    assert items[0].slot is not items[1].slot


def test_dropped_keys_reported() -> None:
    state = _repvgg_state()
    state["stage1_aux.0.weight"] = torch.zeros(2)
    result = convert_state_dict(state, ConvertOptions(bn_eps=1e-5))
    assert result.dropped_keys == ("stage1_aux.0.weight",) and "stage1_aux.0.weight" not in result.state_dict
    assert [e.key for e in result.key_diff.diff.dropped] == ["stage1_aux.0.weight"]
