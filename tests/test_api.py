"""The Python API (issue 13): a copy by default, the CLI's prefix stripping, errors in the API's
words, docstring examples that run, and a whole-model check that still proves the deploy model.

Models are tiny (zoo ``repvgg("tiny")``, 7 blocks) with randomised BN statistics and affine
parameters; the whole-model check runs them in float64.
"""

from __future__ import annotations

import copy
import doctest
import inspect
import re
import shutil
import tokenize
import typing
from pathlib import Path

import pytest
import torch
from torch import nn

import repvgg_cli
from repvgg_cli import api
from repvgg_cli.api import API_WORDS, ConvertOptions, api_words, convert_file, convert_state_dict, reparameterize, verify_file
from repvgg_cli.checks import model as model_checks
from repvgg_cli.checks.model import copy_model, leave_a_core, model_outputs
from repvgg_cli.errors import InputError, OutputExistsError, PickleRefusedError
from repvgg_cli.families import FAMILIES
from tests import zoo
from tests.helpers import ROOT, SAMPLES, error_lines, invoke

F64 = torch.float64
PUBLIC = ("convert_state_dict", "reparameterize", "convert_file", "verify_file")


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.randomize_bn(zoo.repvgg("tiny"), seed=seed + 1).eval()


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# -- reparameterize: a copy by default, the model itself with inplace=True -------------------------------


def test_reparameterize_converts_a_copy_and_leaves_the_model_as_it_was() -> None:
    model = tiny().train()  # as a training script leaves it
    before = state_of(model)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=F64)
    with torch.no_grad():
        want = copy.deepcopy(model).eval().to(F64)(x)
    result = reparameterize(model)
    assert result.ok and len(result.blocks) == 7
    assert result.model is not model
    assert model.training  # its mode too
    assert same_state(state_of(model), before)
    assert all(hasattr(model.get_submodule(r.block.name), "rbr_dense") for r in result.blocks)
    assert not any(hasattr(m, "rbr_dense") for m in result.model.modules())
    assert not any(p is q for p in result.model.parameters() for q in model.parameters())
    with torch.no_grad():
        got = copy.deepcopy(result.model).to(F64)(x)
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())


def test_reparameterize_inplace_switches_the_model_itself_to_the_same_deploy_form() -> None:
    model = tiny()
    copied = reparameterize(model)
    switched = reparameterize(model, inplace=True)
    assert switched.ok and switched.model is model
    assert not any(hasattr(m, "rbr_dense") for m in model.modules())
    assert model.stage0.rbr_reparam.weight.dtype == torch.float32
    assert same_state(state_of(copied.model), state_of(model))
    assert [r.check.max_abs_err for r in copied.blocks] == [r.check.max_abs_err for r in switched.blocks]
    assert copied.model_check.max_abs_err == switched.model_check.max_abs_err


def test_a_model_that_is_one_block_comes_back_as_its_deploy_module() -> None:
    block = zoo.randomize_bn(zoo.PlainBlock(4, 4), seed=2).eval()
    result = reparameterize(block, ConvertOptions(input_shape=(1, 4, 8, 8)), inplace=True)
    assert result.ok and isinstance(result.model, nn.Conv2d)


def test_reparameterize_refuses_what_is_not_a_module() -> None:
    with pytest.raises(InputError, match="^model must be an nn.Module, not a dict$"):
        reparameterize({"a": torch.zeros(1)})  # type: ignore[arg-type]


# -- convert_state_dict strips module. and _orig_mod. like the CLI -----------------------------------------


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_convert_state_dict_strips_training_prefixes_and_leaves_the_input_alone(prefix: str) -> None:
    plain = state_of(tiny())
    prefixed = {prefix + k: v for k, v in plain.items()}
    keys = list(prefixed)
    result = convert_state_dict(prefixed)
    reference = convert_state_dict(plain)
    assert list(prefixed) == keys  # not changed
    assert result.ok and same_state(dict(result.state_dict), dict(reference.state_dict))
    stripped = [p + "." for p in prefix.split(".") if p]
    assert [n for n in result.notes if n.startswith("stripped")] == [f"stripped key prefix {p!r}" for p in stripped]
    zoo.repvgg("tiny", deploy=True).load_state_dict(result.state_dict, strict=True)


def test_a_prefix_not_on_every_key_is_a_key_name_and_stays() -> None:
    state = state_of(tiny())
    state["module.extra"] = torch.zeros(3)
    result = convert_state_dict(state)
    assert "module.extra" in result.state_dict and not any(n.startswith("stripped") for n in result.notes)


# -- errors name the API's arguments, the CLI keeps its flags --------------------------------------------


def _text(error: InputError) -> str:
    return f"{error.message} | {error.hint}"


def test_existing_output_names_force_true(tmp_path: Path) -> None:
    output = tmp_path / "deploy.safetensors"
    output.write_bytes(b"keep")
    with pytest.raises(OutputExistsError) as caught:
        convert_file(SAMPLES / "repvgg_tiny.pt", output)
    assert caught.value.hint == "pass force=True to replace it"
    assert "--" not in _text(caught.value) and str(caught.value) == caught.value.message
    assert output.read_bytes() == b"keep"
    result = invoke("convert", SAMPLES / "repvgg_tiny.pt", output)
    assert result.exit_code == 2 and "Hint: pass --force to replace it" in result.stderr


def test_pickle_refused_names_allow_pickle_true(tmp_path: Path) -> None:
    source = tmp_path / "whole.pt"
    torch.save(tiny(), source)
    with pytest.raises(PickleRefusedError) as caught:
        convert_file(source, tmp_path / "deploy.safetensors")
    assert "pass allow_pickle=True" in caught.value.hint and "--" not in _text(caught.value)
    result = invoke("convert", source, tmp_path / "deploy.safetensors")
    assert result.exit_code == 2 and "pass --allow-pickle" in result.stderr
    assert convert_file(source, tmp_path / "deploy.safetensors", allow_pickle=True).written


@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf"), "1e-3", True])
def test_a_bad_eps_names_bn_eps(tmp_path: Path, eps: object) -> None:
    written = f"bn_eps={eps!r}: BatchNorm eps must be a finite number >= 0"
    with pytest.raises(InputError) as caught:
        convert_state_dict(state_of(tiny()), ConvertOptions(bn_eps=eps))  # type: ignore[arg-type]
    assert caught.value.message == written and "--" not in _text(caught.value)
    with pytest.raises(InputError) as caught:
        convert_file(SAMPLES / "repvgg_tiny.pt", tmp_path / "d.safetensors", ConvertOptions(bn_eps=eps))  # type: ignore[arg-type]
    assert caught.value.message == written
    with pytest.raises(InputError) as caught:
        verify_file(SAMPLES / "repvgg_tiny.safetensors", against=SAMPLES / "repvgg_tiny.pt", bn_eps=eps)  # type: ignore[arg-type]
    assert caught.value.message == written
    assert not (tmp_path / "d.safetensors").exists()


def test_a_bad_eps_on_the_cli_names_the_flag(tmp_path: Path) -> None:
    result = invoke("convert", SAMPLES / "repvgg_tiny.pt", tmp_path / "d.safetensors", "--bn-eps", "-1")
    assert result.exit_code == 2
    assert error_lines(result) == ["Error: --bn-eps -1.0: BatchNorm eps must be a finite number >= 0"]


def test_model_spec_entry_and_against_are_named_as_arguments(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^model_spec='nocolon': expected MODULE:CALLABLE"):
        convert_file(SAMPLES / "repvgg_tiny.pt", tmp_path / "d.safetensors", model_spec="nocolon")
    container = tmp_path / "container.pt"
    torch.save({"epoch": 3, "note": "no weights here"}, container)
    with pytest.raises(InputError) as caught:
        convert_file(container, tmp_path / "d.safetensors")
    assert caught.value.hint == "pass entry=NAME to pick the entry that holds the weights"
    with pytest.raises(InputError) as caught:
        verify_file(SAMPLES / "repvgg_tiny.pt")
    assert caught.value.hint == "pass against=TRAIN to recompute from the train-form source"


@pytest.mark.parametrize(("cli", "python"), [
    ("pass --force to replace it", "pass force=True to replace it"),
    ("if you trust this file, pass --allow-pickle (see README: Safety)",
     "if you trust this file, pass allow_pickle=True (see README: Safety)"),
    ("--bn-eps -1.0: BatchNorm eps", "bn_eps=-1.0: BatchNorm eps"),
    ("pass --input-shape N,C,H,W", "pass input_shape=(N, C, H, W)"),
    ("pass --entry NAME to pick", "pass entry=NAME to pick"),
    ("pick it with --entry model)", "pick it with entry='model')"),
    ("--model 'a:b': cannot import a", "model_spec='a:b': cannot import a"),
    ("does not load into --model pkg.models:build: x", "does not load into model_spec='pkg.models:build': x"),
    ("say which: --qa-variant v1 or --avg-branch GLOB", "say which: qa_variant='v1' or avg_branch=(GLOB,)"),
    ("--rtol and --atol must not be negative", "Tolerance(rtol=...) and Tolerance(atol=...) must not be negative"),
    ("convert without --fold-post-bn (the bn is then kept)", "convert without fold_post_bn=True (the bn is then kept)"),
    ("pass --passthrough 'head.*' if", "pass passthrough=('head.*',) if"),
    ("a --debug flag and a--force word stay", "a --debug flag and a--force word stay"),
])
def test_api_words_rewrites_each_flag_as_its_argument(cli: str, python: str) -> None:
    assert api_words(cli) == python


LIBRARY = ["io", "pipeline", "families", "checks", "fusion", "algebra", "verify.py", "api.py"]
CLI_ONLY = {
    "--report": "a convert report file; convert_file returns the result instead",
}


def test_every_flag_the_library_names_has_an_api_word_or_a_reason() -> None:
    """A hint naming a new flag needs its argument in API_WORDS (or a reason here to have none)."""
    package = Path(repvgg_cli.__file__).parent
    named: dict[str, str] = {}
    for entry in LIBRARY:
        for path in [package / entry] if entry.endswith(".py") else sorted((package / entry).rglob("*.py")):
            with path.open("rb") as file:
                for token in tokenize.tokenize(file.readline):
                    if token.type == tokenize.STRING or token.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
                        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", token.string):
                            named.setdefault(flag, f"{path.relative_to(package)}:{token.start[0]}")
    missing = {flag: where for flag, where in named.items() if flag not in API_WORDS and flag not in CLI_ONLY}
    assert not missing, missing
    assert {"--force", "--allow-pickle", "--bn-eps", "--entry", "--model"} <= set(named)


def test_every_api_word_is_a_real_flag_and_argument() -> None:
    help_text = "".join(invoke(command, "--help").stdout for command in ("convert", "verify"))
    fields = set(ConvertOptions.__dataclass_fields__)
    arguments = {name for f in PUBLIC for name in inspect.signature(getattr(api, f)).parameters}
    for flag, (template, _) in API_WORDS.items():
        name = re.match(r"(?:Tolerance\()?(\w+)=", template).group(1)
        if flag in ("--rtol", "--atol"):
            assert name in ("rtol", "atol") and "tolerance" in arguments | fields
        else:
            assert name in fields | arguments, (flag, template)
        if name in fields and flag not in help_text:
            pytest.skip(f"{flag} is not a CLI flag yet")  # options other helpers are adding
        assert flag in help_text, flag


# -- typed, documented, examples that run -----------------------------------------------------------------


@pytest.mark.parametrize("name", PUBLIC)
def test_public_functions_are_typed_documented_and_exported(name: str) -> None:
    function = getattr(api, name)
    assert getattr(repvgg_cli, name) is function
    hints = typing.get_type_hints(function)
    assert set(inspect.signature(function).parameters) | {"return"} == set(hints)
    doc = inspect.getdoc(function)
    for section in ("Args:", "Returns:", "Raises:", "Example:", ">>> "):
        assert section in doc, section
    assert (Path(repvgg_cli.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize("name", PUBLIC)
def test_docstring_examples_run(name: str, tmp_path: Path, monkeypatch) -> None:
    shutil.copytree(SAMPLES, tmp_path / "sample_checkpoints")
    monkeypatch.chdir(tmp_path)
    tests = doctest.DocTestFinder().find(getattr(api, name), name, globs={})
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test)
    outcome = runner.summarize(verbose=False)
    assert outcome.attempted >= 4 and outcome.failed == 0


# -- the whole-model check still proves the deploy model -------------------------------------------------


def _break_after_fusion(monkeypatch) -> list[nn.Module]:
    """After fusion, the deploy conv of the block put in the returned list gets one weight off by
    1e-3 of the largest: the fused conv the per-block check sees is right, the live model is not."""
    family = next(f for f in FAMILIES if f.name == "official")
    real = family.to_deploy_module
    targets: list[nn.Module] = []

    def broken(module: nn.Module, fused):
        deployed = real(module, fused)
        if targets and module is targets[0]:
            with torch.no_grad():
                conv = next(m for m in deployed.modules() if isinstance(m, nn.Conv2d) and m.weight.shape == fused.weight.shape)
                conv.weight[0, 0, 1, 1] += 1e-3 * float(conv.weight.abs().max())
        return deployed

    monkeypatch.setattr(family, "to_deploy_module", broken)
    return targets


def test_the_whole_model_check_catches_a_block_broken_after_fusion(monkeypatch) -> None:
    model = tiny()
    targets = _break_after_fusion(monkeypatch)
    good = reparameterize(model)  # the target is not in this copy yet: nothing is broken
    assert good.ok
    copied = copy.deepcopy(model)
    targets.append(copied.stage2[1])
    result = reparameterize(copied, inplace=True)
    assert all(r.check.ok for r in result.blocks)  # every fused conv is right ...
    check = result.model_check
    assert check.dtype == "float64" and not check.ok and not result.ok  # ... the model is not
    assert check.rel_err > 10 * check.rtol and check.rel_err < 1
    assert good.model_check.rel_err < 1e-6


def test_a_block_broken_after_fusion_is_exit_1_and_nothing_written(monkeypatch, tmp_path: Path) -> None:
    source = tmp_path / "whole.pt"
    torch.save(tiny(), source)
    family = next(f for f in FAMILIES if f.name == "official")
    real = family.to_deploy_module
    calls: list[int] = []

    def broken(module: nn.Module, fused):
        deployed = real(module, fused)
        calls.append(1)
        if len(calls) == 4:  # stage2.1
            with torch.no_grad():
                deployed.rbr_reparam.weight[0, 0, 1, 1] += 1e-3 * float(deployed.rbr_reparam.weight.abs().max())
        return deployed

    monkeypatch.setattr(family, "to_deploy_module", broken)
    output = tmp_path / "deploy.safetensors"
    result = invoke("convert", "--allow-pickle", source, output)
    assert result.exit_code == 1 and not output.exists()
    assert error_lines(result) == ["Error: not equivalent: the whole-model check failed; nothing was written"]


def test_the_model_itself_never_runs_and_keeps_its_threads(monkeypatch) -> None:
    """Forwards run on float64 copies, on one thread fewer than the process has."""
    calls: list[tuple[torch.dtype, int]] = []

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = zoo.repvgg("tiny")

        def forward(self, x):
            calls.append((x.dtype, torch.get_num_threads()))
            return self.body(x)

    model = zoo.randomize_bn(Counting(), seed=4).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = reparameterize(model, inplace=True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert result.ok and result.model is model
    assert calls == [(F64, 1), (F64, 1)]  # the train form, the deploy form: copies, in float64
    assert model.body.stage0.rbr_reparam.weight.dtype == torch.float32


def test_copy_model_with_a_dtype_is_deepcopy_then_cast_in_one_pass() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
            self.b.weight = self.a.weight
            self.register_buffer("steps", torch.tensor(5))
            self.plain = torch.ones(2)  # not registered: copied as it is, as deepcopy + .to leave it

        def forward(self, x):
            return self.b(self.a(x))

    class OwnCopy(nn.Linear):
        def __deepcopy__(self, memo):
            clone = nn.Linear(self.in_features, self.out_features)
            clone.load_state_dict(self.state_dict())
            clone.copied_its_own_way = True
            return clone

    model = Tied()
    model.a.register_forward_hook(lambda module, args, out: out * 2)
    model.own = OwnCopy(3, 3)
    with torch.no_grad():
        model.a.bias.uniform_(-1, 1)
    clone = copy_model(model, F64)
    assert clone.a.weight is clone.b.weight and clone.a.weight is not model.a.weight
    assert clone.a.weight.dtype == F64 and model.a.weight.dtype == torch.float32
    assert clone.steps.dtype == torch.int64 and int(clone.steps) == 5 and clone.steps is not model.steps
    assert clone.plain.dtype == torch.float32 and clone.plain is not model.plain
    assert len(clone.a._forward_hooks) == 1 and clone.a._forward_hooks is not model.a._forward_hooks
    assert clone.own.copied_its_own_way and clone.own.weight.dtype == F64
    x = torch.randn(2, 3, dtype=F64)
    with torch.no_grad():
        assert torch.equal(clone(x), copy.deepcopy(model).to(F64)(x))
    assert isinstance(clone.a.weight, nn.Parameter) and clone.a.weight.requires_grad


def test_model_outputs_falls_back_to_float32_and_leaves_the_model(monkeypatch) -> None:
    class Float32Only(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            if x.dtype != torch.float32:
                raise RuntimeError("float32 only")
            return self.conv(x)

    model = Float32Only().eval()
    before = state_of(model)
    outputs, dtype = model_outputs(model, torch.randn(1, 2, 5, 5, dtype=F64))
    assert dtype == "float32" and outputs[0].dtype == F64
    assert same_state(state_of(model), before)


def test_leave_a_core_nests_and_restores() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with leave_a_core() as outer:
            with leave_a_core() as inner:
                assert outer == inner == torch.get_num_threads() == 2
        assert torch.get_num_threads() == 3 and not model_checks._threads_left
    finally:
        torch.set_num_threads(threads)


def test_readme_python_api_says_what_the_code_does(tmp_path: Path) -> None:
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Python API", 1)[1].split("\n## ", 1)[0]
    output = tmp_path / "deploy.safetensors"
    output.write_bytes(b"")
    with pytest.raises(OutputExistsError) as exists:
        convert_file(SAMPLES / "repvgg_tiny.pt", output)
    with pytest.raises(InputError) as eps:
        convert_state_dict(state_of(tiny()), ConvertOptions(bn_eps=-1.0))
    for said in (f"`{exists.value.hint}`",
                 f"`{eps.value.message}`", "`allow_pickle=True`", "inplace=True", "`_orig_mod.`", "`py.typed`"):
        assert said in " ".join(section.split()), said


def test_copy_model_without_a_dtype_is_a_deepcopy() -> None:
    model = tiny()
    model.stage0.rbr_dense.conv.weight.marked = "kept"  # an attribute on a parameter
    model.register_buffer("view", model.stage0.rbr_1x1.bn.running_mean[:2])  # shares storage
    model.stage0.rbr_dense.conv.weight.grad = torch.ones_like(model.stage0.rbr_dense.conv.weight)
    clone, reference = copy_model(model), copy.deepcopy(model)
    assert same_state(state_of(clone), state_of(reference)) and same_state(state_of(clone), state_of(model))
    weight = clone.stage0.rbr_dense.conv.weight
    assert isinstance(weight, nn.Parameter) and weight is not model.stage0.rbr_dense.conv.weight
    expected = reference.stage0.rbr_dense.conv.weight  # whatever deepcopy keeps of a parameter, this keeps
    assert getattr(weight, "marked", None) == getattr(expected, "marked", None)
    assert (weight.grad is None) == (expected.grad is None) and weight.requires_grad == expected.requires_grad
    assert clone.view.untyped_storage().data_ptr() == clone.stage0.rbr_1x1.bn.running_mean.untyped_storage().data_ptr()
    assert clone.view.untyped_storage().data_ptr() != model.view.untyped_storage().data_ptr()
    assert [type(m) for m in clone.modules()] == [type(m) for m in model.modules()]
    assert clone.training == model.training and not any(a is b for a, b in zip(clone.modules(), model.modules()))
