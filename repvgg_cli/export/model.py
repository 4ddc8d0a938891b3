"""The deploy-form model an ONNX export starts from: a pickled model (fused here when it is in
train form) or a state dict loaded into a ``MODULE:CALLABLE`` factory's model (train form, fused
here; or deploy form, loaded into the factory's model switched to its deploy structure).
"""

from __future__ import annotations

from torch import nn

from ..api import ConversionResult, ConvertOptions, reparameterize
from ..errors import InputError
from ..io.read import LoadedCheckpoint
from ..pipeline.find import find_module_blocks
from ..pipeline.read import build_model, load_factory


def deploy_model_from(
    loaded: LoadedCheckpoint,
    model_spec: str | None,
    options: ConvertOptions,
) -> tuple[nn.Module, str, ConversionResult | None]:
    """The deploy-form model of a loaded checkpoint (see the module docstring).

    Returns:
        ``(deploy model, source form, conversion or None)``.
    """
    if loaded.model is not None:
        model = loaded.model.eval()
        if not find_module_blocks(model):
            return model, "pickled deploy model", None
        result = reparameterize(model, options)
        return result.model, "pickled train model", result
    if model_spec is None:
        raise InputError(
            f"{loaded.path} holds a state dict, not a model: an ONNX export needs the model's code",
            hint="pass --model MODULE:CALLABLE that builds the train-form model, or a pickled model with --allow-pickle",
        )
    factory_model = _call_factory(model_spec)
    if set(loaded.state_dict) == set(factory_model.state_dict()):
        model = build_model(model_spec, loaded.state_dict)
        result = reparameterize(model, options)
        return result.model, "train state dict", result
    # A deploy state dict: switch a freshly built model to its deploy structure, then load strictly.
    if not find_module_blocks(factory_model):
        raise InputError(f"--model {model_spec}: the factory's model has no train-form block and the checkpoint "
                         "does not load into it")
    structure = reparameterize(factory_model.eval(), options, check_model=False).model
    assert structure is not None
    try:
        structure.load_state_dict(loaded.state_dict, strict=True)
    except RuntimeError as error:
        lines = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in lines[1:3]) if len(lines) > 1 else lines[0]
        raise InputError(
            f"{loaded.path} loads neither into --model {model_spec} (train form) nor into its deploy form: "
            f"{detail[:300]}"
        ) from None
    return structure.eval(), "deploy state dict", None


def _call_factory(spec: str) -> nn.Module:
    factory = load_factory(spec)
    try:
        model = factory()
    except Exception as error:  # noqa: BLE001 - the user's factory may raise anything
        raise InputError(f"--model {spec!r}: calling it failed: {error}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"--model {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model
