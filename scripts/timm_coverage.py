"""How many of timm's re-parameterization sites repvgg_cli fuses from a state dict alone.

Runs by hand (not part of the test suite)::

    python scripts/timm_coverage.py                      # every representative model, a table
    python scripts/timm_coverage.py --models repvgg_a0,levit_128s --json coverage.json

The reference is timm's own deploy form: ``timm.utils.reparameterize_model`` (installed source:
``timm/models/_manipulate.py``, ``reparameterize_model``) walks ``named_children()`` recursively
and, per child, replaces it with ``child.fuse()`` if it has ``fuse``, else calls
``child.reparameterize()``, else ``child.switch_to_deploy()``; it then recurses into the *old*
child (so calls below a replaced child act on a discarded module). The model files that define
these methods in timm 1.0.31: byobnet, fastvit, ghostnet, repghost, lcnetv2, repvit, levit,
efficientvit_msra, tiny_vit, shvit, iformer, efficientvim, nextvit
(huggingface/pytorch-image-models, ``timm/models/<file>.py``).

A *site* is one call of that walk that changes the model's state dict: its *train-only keys*
are the keys the call removed, its *deploy keys* the keys it added or whose value or shape it
changed (each measured by snapshotting the child's state dict around the call, on a mirror of
the walk whose result is checked equal to timm's). Calls that change nothing (e.g. a stride-1
``GhostBottleneckV3``, shvit's ``Residual`` around a non-conv block, which returns itself, or a
``ConvLayer2d`` without BN) are counted apart as no-op calls; calls on discarded modules are
not counted.

A site is *fused* when every deploy key exists in ``convert_state_dict``'s output with the same
shape and a relative error (L2 norm of the difference over the reference's) of at most 1e-5 in
float32, and none of its train-only keys remain. Whole model: the output is loaded with
``strict=True`` into timm's reparameterized model and its output compared with the train
model's on one seeded input.

Every BN's running statistics and affine parameters, and every parameter that starts constant
(layer scales, zero-initialised biases, LayerNorm weights, ...), are randomised with a fixed seed
before anything is measured: with fresh statistics wrong fusion code still passes.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

METHODS = ("fuse", "reparameterize", "switch_to_deploy")
VALUE_RTOL = 1e-5
SEED = 0


@dataclass(frozen=True)
class Representative:
    """One model standing for an architecture: what to build and what to feed it."""

    architecture: str
    model: str
    kwargs: dict = field(default_factory=dict)
    input_size: int = 64
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.model


# The smallest registered variant of each architecture (pretrained=False). Extra rows cover a
# key layout the smallest variant lacks: repvit_m1 is the legacy RepVggDw (conv1 is a ConvNorm,
# no outer BN); fastvit_mci0 has RepConditionalPosEnc, which fastvit_t8 lacks; fastvit_mci3
# (MobileCLIP2) builds its stem without the 1x1 scale branch - it is 125M parameters, so it is
# built here with its own structure but shrunk depths and widths; iformer_m_distilled's
# RepVitClassifier averages two heads (head, head_dist), iformer_t's has one. LeViT and
# EfficientViT-MSRA size their attention biases for the image size, so they are built for the
# small probe input (img_size=64). The whole list takes about 35 s on 2 cores.
REPRESENTATIVES: tuple[Representative, ...] = (
    Representative("repvgg (byobnet)", "repvgg_a0"),
    Representative("mobileone (byobnet)", "mobileone_s0"),
    Representative("fastvit", "fastvit_t8"),
    Representative("fastvit (MobileCLIP mci0-2)", "fastvit_mci0"),
    Representative("fastvit (MobileCLIP2 mci3/4)", "fastvit_mci3",
                   dict(layers=(1, 1, 1, 1, 1), embed_dims=(16, 32, 64, 128, 256)), label="fastvit_mci3-shrunk"),
    Representative("repvit", "repvit_m0_9"),
    Representative("repvit (legacy)", "repvit_m1"),
    Representative("repghost", "repghostnet_050"),
    Representative("ghostnetv3", "ghostnetv3_050"),
    Representative("lcnetv2", "lcnetv2_small"),
    Representative("levit", "levit_128s", dict(img_size=64)),
    Representative("levit_conv", "levit_conv_128s", dict(img_size=64)),
    Representative("efficientvit_msra", "efficientvit_m0", dict(img_size=64)),
    Representative("tiny_vit", "tiny_vit_5m_224"),
    Representative("shvit", "shvit_s1"),
    Representative("iformer", "iformer_t"),
    Representative("iformer (distilled head)", "iformer_m_distilled"),
    Representative("efficientvim", "efficientvim_m1", input_size=128),
    Representative("nextvit", "nextvit_small"),
)


@dataclass
class Site:
    """One call of timm's walk that changed the state dict."""

    path: str
    cls: str
    file: str
    method: str
    replaced_by: str | None
    train_only_keys: list[str]
    deploy_keys: list[str]
    fused: bool = False
    reason: str = ""


@dataclass
class ModelReport:
    architecture: str
    model: str
    sites: int = 0
    fused: int = 0
    by_class: dict = field(default_factory=dict)
    noop_calls: dict = field(default_factory=dict)
    strict_load_ok: bool | None = None
    strict_load_error: str = ""
    output_rel_err: float | None = None
    timm_output_rel_err: float | None = None
    blocks_found: int | None = None
    unrecognised: list[str] = field(default_factory=list)
    convert_ok: bool | None = None
    error: str = ""
    mirror_matches_timm: bool | None = None
    other_keys_ok: bool | None = None
    other_keys_bad: list[str] = field(default_factory=list)
    seconds: float = 0.0
    site_list: list[dict] = field(default_factory=list)


def randomise(model: nn.Module, seed: int) -> None:
    """Random BN statistics and affine parameters, and random values for constant parameters."""
    gen = torch.Generator().manual_seed(seed)

    def rand(shape, low, high):
        return torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low

    done: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if module.running_mean is not None:
                    shape = module.running_mean.shape
                    module.running_mean.copy_(torch.randn(shape, generator=gen) * 0.5)
                    module.running_var.copy_(rand(shape, 0.5, 2.0))
                if module.weight is not None:
                    module.weight.copy_(rand(module.weight.shape, 0.5, 1.5))
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.3)
                    done.update((id(module.weight), id(module.bias)))
        for param in model.parameters():
            if id(param) in done or param.numel() == 0 or not param.is_floating_point():
                continue
            flat = param.detach().flatten()
            if not bool((flat == flat[0]).all()):
                continue
            value = float(flat[0])
            if value == 0.0:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif abs(value) < 1e-2:  # layer scales (1e-5, 1e-6), gates (1e-4)
                param.copy_(rand(param.shape, 0.1, 0.5) * math.copysign(1.0, value))
            else:
                param.copy_(value * rand(param.shape, 0.5, 1.5))


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: Tensor, after: Tensor) -> bool:
    return before.shape != after.shape or before.dtype != after.dtype or not torch.equal(before, after)


def record_sites(model: nn.Module) -> tuple[list[Site], Counter]:
    """Run timm's walk on ``model`` (in place), recording each call's effect on the state dict."""
    sites: list[Site] = []
    noops: Counter = Counter()

    def walk(parent: nn.Module, prefix: str, live: bool) -> None:
        for name, child in parent.named_children():
            path = prefix + name
            method = next((m for m in METHODS if hasattr(child, m)), None)
            if method is None:
                walk(child, path + ".", live)
                continue
            before = _snapshot(child) if live else {}
            if method == "fuse":
                new = child.fuse()
                setattr(parent, name, new)
            else:
                getattr(child, method)()
                new = child
            if live:
                after = new.state_dict()
                removed = sorted(k for k in before if k not in after)
                produced = sorted(k for k, v in after.items() if k not in before or _changed(before[k], v))
                if removed or produced:
                    sites.append(Site(
                        path=path,
                        cls=type(child).__name__,
                        file=type(child).__module__.rsplit(".", 1)[-1],
                        method=method,
                        replaced_by=type(new).__name__ if new is not child else None,
                        train_only_keys=[f"{path}.{k}" for k in removed],
                        deploy_keys=[f"{path}.{k}" for k in produced],
                    ))
                else:
                    noops[f"{type(child).__name__}.{method}"] += 1
            # as timm does: recurse into the child the call was made on, even when replaced
            walk(child, path + ".", live and new is child)

    walk(model, "", True)
    return sites, noops


def _attribute_keys(sites: list[Site], deploy: dict[str, Tensor]) -> None:
    """A key produced by several calls belongs to the last; keys gone from the final model are dropped."""
    owner: dict[str, int] = {}
    for i, site in enumerate(sites):
        for key in site.deploy_keys:
            owner[key] = i
    for i, site in enumerate(sites):
        site.deploy_keys = [k for k in site.deploy_keys if owner.get(k) == i and k in deploy]
        site.train_only_keys = [k for k in site.train_only_keys if k not in deploy]


def _rel_err(ours: Tensor, ref: Tensor) -> float:
    ours, ref = ours.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    diff = (ours - ref).norm().item()
    return diff / denom if denom > 0 else diff


def _output(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        y = model(x)
    if isinstance(y, (tuple, list)):
        y = torch.cat([t.flatten() for t in y])
    return y


def _key_problem(key: str, ours: dict[str, Tensor], ref: dict[str, Tensor]) -> str:
    if key not in ours:
        return f"missing {key}"
    if tuple(ours[key].shape) != tuple(ref[key].shape):
        return f"shape {key} {tuple(ours[key].shape)} != {tuple(ref[key].shape)}"
    if ours[key].is_floating_point() or ref[key].is_floating_point():
        err = _rel_err(ours[key], ref[key])
        if not err <= VALUE_RTOL:
            return f"value {key} rel {err:.2e}"
    elif not torch.equal(ours[key], ref[key]):
        return f"value {key}"
    return ""


def measure(rep: Representative) -> ModelReport:
    """Build, randomise, reparameterize (timm and repvgg_cli) and compare one model."""
    import timm
    from timm.utils import reparameterize_model

    from repvgg_cli import ConvertOptions, RepvggError, convert_state_dict

    report = ModelReport(rep.architecture, rep.name)
    start = time.perf_counter()
    torch.manual_seed(SEED)
    model = timm.create_model(rep.model, pretrained=False, **rep.kwargs)
    randomise(model, SEED)
    model.eval()
    train_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

    reference = reparameterize_model(copy.deepcopy(model))
    reference.eval()
    deploy = reference.state_dict()

    mirror = copy.deepcopy(model)
    sites, noops = record_sites(mirror)
    mirror_sd = mirror.state_dict()
    report.mirror_matches_timm = set(mirror_sd) == set(deploy) and all(
        not _changed(mirror_sd[k], deploy[k]) for k in deploy)
    _attribute_keys(sites, deploy)
    report.noop_calls = dict(noops)

    ours: dict[str, Tensor] = {}
    try:
        result = convert_state_dict(dict(train_sd), ConvertOptions())
        ours = dict(result.state_dict)
        report.blocks_found = len(result.blocks)
        report.unrecognised = [prefix for prefix, _ in result.unrecognised]
        report.convert_ok = bool(result.ok)
    except RepvggError as exc:
        report.error = f"{type(exc).__name__}: {exc.message}"
    except Exception as exc:  # noqa: BLE001 - a bug in repvgg_cli; record it, keep measuring
        report.error = f"BUG {type(exc).__name__}: {exc}"

    counts: dict[str, dict[str, int]] = {}
    for site in sites:
        problems = [p for p in (_key_problem(k, ours, deploy) for k in site.deploy_keys) if p]
        problems += [f"left {k}" for k in site.train_only_keys if k in ours]
        site.fused = bool(ours) and not problems
        site.reason = "no output" if not ours else "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else "")
        entry = counts.setdefault(f"{site.file}.{site.cls}", {"sites": 0, "fused": 0})
        entry["sites"] += 1
        entry["fused"] += int(site.fused)
    report.by_class = counts
    report.sites = len(sites)
    report.fused = sum(s.fused for s in sites)
    report.site_list = [asdict(s) for s in sites]

    site_keys = {k for s in sites for k in s.deploy_keys}
    if ours:
        bad = [p for p in (_key_problem(k, ours, deploy) for k in deploy if k not in site_keys) if p]
        report.other_keys_ok = not bad
        report.other_keys_bad = bad[:10]

    x = torch.randn(1, 3, rep.input_size, rep.input_size, generator=torch.Generator().manual_seed(SEED))
    y_train = _output(model, x)
    report.timm_output_rel_err = _rel_err(_output(reference, x), y_train)
    if ours:
        loaded = copy.deepcopy(reference)
        try:
            loaded.load_state_dict(ours, strict=True)
            report.strict_load_ok = True
        except RuntimeError as exc:
            report.strict_load_ok = False
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            report.strict_load_error = " ".join(lines[:2])[:300]
        if report.strict_load_ok:
            report.output_rel_err = _rel_err(_output(loaded, x), y_train)
    report.seconds = time.perf_counter() - start
    return report


def _fmt_err(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def print_table(reports: list[ModelReport]) -> None:
    rows = [("architecture", "model", "sites", "fused", "strict-load", "out rel err", "timm rel err", "error")]
    for r in reports:
        strict = "-" if r.strict_load_ok is None else ("ok" if r.strict_load_ok else "FAIL")
        rows.append((r.architecture, r.model, str(r.sites), str(r.fused), strict, _fmt_err(r.output_rel_err),
                     _fmt_err(r.timm_output_rel_err), (r.error or r.strict_load_error)[:90]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    total = sum(r.sites for r in reports)
    fused = sum(r.fused for r in reports)
    share = 100.0 * fused / total if total else 0.0
    print(f"\noverall: {fused}/{total} sites fused ({share:.1f}%)")
    print("\nsites per class (fused/sites), no-op calls:")
    for r in reports:
        classes = ", ".join(f"{c} {v['fused']}/{v['sites']}" for c, v in r.by_class.items())
        noops = ", ".join(f"{c} x{n}" for c, n in r.noop_calls.items())
        print(f"  {r.model}: {classes}" + (f"  [no-op: {noops}]" if noops else ""))
        if r.mirror_matches_timm is False:
            print("    WARNING: the recording walk's result differs from timm's reparameterize_model")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated model names (or labels) to run; default all")
    parser.add_argument("--json", metavar="PATH", help="also write the reports as JSON")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = REPRESENTATIVES
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        known = {r.name: r for r in REPRESENTATIVES} | {r.model: r for r in REPRESENTATIVES}
        unknown = [m for m in wanted if m not in known]
        if unknown:
            parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(r.name for r in REPRESENTATIVES)}")
        chosen = tuple({known[m].name: known[m] for m in wanted}.values())
    reports = []
    for rep in chosen:
        print(f"measuring {rep.name} ...", file=sys.stderr, flush=True)
        try:
            reports.append(measure(rep))
        except Exception as exc:  # noqa: BLE001 - building or running the timm model failed
            reports.append(ModelReport(rep.architecture, rep.name, error=f"SCRIPT {type(exc).__name__}: {exc}"))
    print_table(reports)
    if args.json:
        total = sum(r.sites for r in reports)
        fused = sum(r.fused for r in reports)
        payload = {
            "timm_version": __import__("timm").__version__,
            "value_rtol": VALUE_RTOL,
            "sites": total,
            "fused": fused,
            "share_fused": fused / total if total else 0.0,
            "models": [asdict(r) for r in reports],
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
