"""Measure the module tree (a pickled model, a live model) against the paths it is compared with.

Two comparisons, each in paired rounds (both sides run back to back in every round, their order
alternating, after one unmeasured warm-up round); a ratio is the median of the rounds' ratios,
shown with their range, which is robust to a shared machine drifting between rounds:

* **cli** (whole processes): ``repvgg convert --allow-pickle`` of official RepVGG-A0 pickled
  whole (``torch.save(model)``, module tree) against ``repvgg convert`` of its state dict (key
  tree), the same weights (BN statistics randomised), both into ``.safetensors``;
* **api** (in one process): :func:`repvgg_cli.reparameterize` (a converted copy, every check
  included: per block and whole model) against timm's ``reparameterize_model`` (a converted copy,
  no check) on timm's ``repvgg_a0``, ``mobileone_s0`` and ``fastvit_t8`` (random weights, BN
  statistics randomised). ``reparameterize(check_model=False)`` is timed too, to show what the
  whole-model check costs.

    python benchmarks/bench_module_tree.py                     # both, 9 cli rounds, 15 api rounds
    python benchmarks/bench_module_tree.py --part api --repeat 5
    python benchmarks/bench_module_tree.py --part parts --threads 1   # each step of reparameterize()
    python benchmarks/bench_module_tree.py --markdown          # the README's tables
    python benchmarks/bench_module_tree.py --json

The whole-process timing (one process measuring another, peak RSS from ``getrusage``) is
``benchmarks/bench_convert.py``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))  # tests.zoo, the reference RepVGG (the clone's tests package)
from bench_convert import measure, repvgg_command  # noqa: E402

API_MODELS = ("repvgg_a0", "mobileone_s0", "fastvit_t8")


def paired(sides: list[Callable[[], float]], repeat: int) -> list[list[float]]:
    """Every side's time per measured round: the sides run back to back in each round, in turn
    first (round r starts with side r mod n), after one unmeasured warm-up round."""
    times: list[list[float]] = [[] for _ in sides]
    for round_ in range(repeat + 1):
        order = [(round_ + i) % len(sides) for i in range(len(sides))]
        for index in order:
            seconds = sides[index]()
            if round_:
                times[index].append(seconds)
    return times


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs_s": times}


def ratios(numerator: list[float], denominator: list[float]) -> dict:
    per_round = [n / d for n, d in zip(numerator, denominator)]
    return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round),
            "per_round": per_round}


# -- cli: pickled model vs state dict, whole processes -------------------------------------------


def cli_rows(repeat: int) -> list[dict]:
    import torch

    from tests import zoo

    rows = []
    with tempfile.TemporaryDirectory(prefix="repvgg-bench-tree-") as tmp:
        folder = Path(tmp)
        torch.manual_seed(0)
        model = zoo.randomize_bn(zoo.repvgg("A0"), seed=0).eval()
        state_path, model_path = folder / "RepVGG-A0-state.pt", folder / "RepVGG-A0-model.pt"
        torch.save(model.state_dict(), state_path)
        torch.save(model, model_path)
        del model
        # the pickled model's class is tests.zoo.RepVGG: the convert processes must find the clone's tests
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
        outputs = {"state": folder / "state.safetensors", "model": folder / "model.safetensors"}
        commands = {
            "state": [*repvgg_command(), "convert", str(state_path), str(outputs["state"])],
            "model": [*repvgg_command(), "convert", "--allow-pickle", str(model_path), str(outputs["model"])],
        }
        peaks: dict[str, list[float]] = {"state": [], "model": []}

        def side(name: str) -> Callable[[], float]:
            def run() -> float:
                outputs[name].unlink(missing_ok=True)
                seconds, peak = measure(commands[name])
                peaks[name].append(peak)
                return seconds
            return run

        state_times, model_times = paired([side("state"), side("model")], repeat)
        rows.append({
            "model": "RepVGG-A0 (official layout)",
            "state_dict": summary(state_times), "pickled": summary(model_times),
            "ratio": ratios(model_times, state_times),
            "state_peak_mib": max(peaks["state"]), "pickled_peak_mib": max(peaks["model"]),
            "commands": {k: " ".join(Path(c[0]).name if i == 0 else c for i, c in enumerate(v))
                         for k, v in commands.items()},
        })
    return rows


# -- api: reparameterize vs timm's reparameterize_model, in process -----------------------------------


def api_rows(models: list[str], repeat: int) -> list[dict]:
    import timm
    import torch
    from timm.utils import reparameterize_model

    from repvgg_cli import reparameterize
    from tests import zoo

    def timed(call: Callable[[], object], check: Callable[[object], None] | None = None) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            value = call()
            seconds = time.perf_counter() - start
            if check is not None:
                check(value)
            return seconds
        return run

    def passed(result) -> None:
        if not result.ok or not result.blocks:
            raise SystemExit(f"reparameterize failed: ok={result.ok}, {len(result.blocks)} block(s)")

    rows = []
    for name in models:
        torch.manual_seed(0)
        model = zoo.randomize_bn(timm.create_model(name, pretrained=False), seed=0).eval()
        sides = [
            timed(lambda: reparameterize_model(model)),
            timed(lambda: reparameterize(model, inplace=False), passed),
            timed(lambda: reparameterize(model, inplace=False, check_model=False), passed),
        ]
        timm_times, ours, unchecked = paired(sides, repeat)
        result = reparameterize(model, inplace=False)
        check = result.model_check
        rows.append({
            "model": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "blocks": len(result.blocks), "input_shape": list(check.input_shape), "check_dtype": check.dtype,
            "timm": summary(timm_times), "reparameterize": summary(ours), "no_model_check": summary(unchecked),
            "ratio": ratios(ours, timm_times), "ratio_no_model_check": ratios(unchecked, timm_times),
        })
        model = result = None  # dropped before the next model is built (not del: the timed lambdas name it)
    return rows


# -- parts: where reparameterize's time goes ---------------------------------------------------------


def parts_rows(models: list[str], repeat: int) -> list[dict]:
    """Median time of each step of ``reparameterize(model)`` on its own (one process, in turn)."""
    import copy

    import timm
    import torch
    from timm.utils import reparameterize_model

    from repvgg_cli import reparameterize
    from repvgg_cli.checks.model import copy_model, infer_input_shape, model_outputs
    from repvgg_cli.pipeline.find import find_module_blocks
    from tests import zoo

    rows = []
    for name in models:
        torch.manual_seed(0)
        model = zoo.randomize_bn(timm.create_model(name, pretrained=False), seed=0).eval()
        deploy = reparameterize(model).model
        x = torch.randn(*infer_input_shape(model), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        steps = {
            "timm reparameterize_model": lambda: reparameterize_model(model),
            "copy.deepcopy(model)": lambda: copy.deepcopy(model),
            "copy_model(model)": lambda: copy_model(model),
            "find the blocks": lambda: find_module_blocks(model),
            "train form: float64 copy + forward": lambda: model_outputs(model, x),
            "deploy form: float64 copy + forward": lambda: model_outputs(deploy, x),
            "reparameterize(check_model=False)": lambda: reparameterize(model, check_model=False),
            "reparameterize()": lambda: reparameterize(model),
        }
        times = paired([_timer(step) for step in steps.values()], repeat)
        rows.append({"model": name, "steps_ms": {k: statistics.median(t) * 1e3 for k, t in zip(steps, times)}})
    return rows


def _timer(step: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start
    return run


# -- output -----------------------------------------------------------------------------------------


def _range(r: dict) -> str:
    return f"{r['min']:.2f}–{r['max']:.2f}×"


def markdown(document: dict) -> str:
    lines: list[str] = []
    if document.get("cli"):
        lines += ["| model | state dict (key tree) | pickled whole (module tree) | ratio | ratio per round | "
                  "peak RSS state / pickled |", "|---|---|---|---|---|---|"]
        for r in document["cli"]:
            lines.append(f"| {r['model']} | {r['state_dict']['median_s']:.2f} s | {r['pickled']['median_s']:.2f} s | "
                         f"{r['ratio']['median']:.2f}× | {_range(r['ratio'])} | "
                         f"{r['state_peak_mib']:.0f} / {r['pickled_peak_mib']:.0f} MiB |")
        lines += ["", f"Medians of {document['repeat_cli']} paired rounds (`repvgg convert` into .safetensors, "
                      "whole processes).", ""]
    if document.get("api"):
        lines += ["| model | blocks | timm `reparameterize_model` | `reparameterize()` | ratio | ratio per round | "
                  "without the whole-model check | ratio |", "|---|---|---|---|---|---|---|---|"]
        for r in document["api"]:
            lines.append(f"| {r['model']} | {r['blocks']} | {r['timm']['median_s'] * 1e3:.0f} ms | "
                         f"{r['reparameterize']['median_s'] * 1e3:.0f} ms | {r['ratio']['median']:.2f}× | "
                         f"{_range(r['ratio'])} | {r['no_model_check']['median_s'] * 1e3:.0f} ms | "
                         f"{r['ratio_no_model_check']['median']:.2f}× |")
        shape = document["api"][0]["input_shape"]
        lines += ["", f"Medians of {document['repeat_api']} paired rounds in one process, torch on "
                      f"{document['torch_threads']} thread(s); whole-model check on a seeded "
                      f"{'x'.join(map(str, shape))} input in {document['api'][0]['check_dtype']}."]
    if document.get("parts"):
        rows = document["parts"]
        lines += ["| step | " + " | ".join(r["model"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
        for step in rows[0]["steps_ms"]:
            lines.append(f"| {step} | " + " | ".join(f"{r['steps_ms'][step]:.0f} ms" for r in rows) + " |")
        lines += ["", f"Each step on its own, medians of {document['repeat_parts']} rounds, torch on "
                      f"{document['torch_threads']} thread(s)."]
    lines.append(f"{os.cpu_count()} CPUs; torch {document['torch']}, timm {document.get('timm', '-')}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["cli", "api", "both", "parts"], default="both",
                        help="parts: time each step of reparameterize() on its own")
    parser.add_argument("--models", nargs="+", default=list(API_MODELS), help="timm models for the api part")
    parser.add_argument("--repeat", type=int, default=None, help="measured rounds (default: cli 9, api 15)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the api part (default: torch's)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown (the default)")
    parser.add_argument("--json", action="store_true", help="print every number as JSON")
    args = parser.parse_args()

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    document: dict = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if args.part in ("cli", "both"):
        document["repeat_cli"] = args.repeat or 9
        document["cli"] = cli_rows(document["repeat_cli"])
    if args.part in ("api", "both"):
        import timm

        document["timm"] = timm.__version__
        document["repeat_api"] = args.repeat or 15
        document["api"] = api_rows(args.models, document["repeat_api"])
    if args.part == "parts":
        import timm

        document["timm"] = timm.__version__
        document["repeat_parts"] = args.repeat or 9
        document["parts"] = parts_rows(args.models, document["repeat_parts"])
    print(json.dumps(document, indent=2) if args.json else markdown(document))


if __name__ == "__main__":
    main()
