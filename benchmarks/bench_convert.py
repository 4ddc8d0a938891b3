"""Measure `repvgg convert` against its I/O floor, as whole processes, side by side.

The I/O floor of a checkpoint is a Python process that loads it with
``torch.load(weights_only=True)`` and saves the tensors with safetensors; `repvgg convert` does
that plus fusing and verifying every block. For each model (official RepVGG layout, train form,
BN statistics randomised) the script writes a bare state dict, then times both processes
(median of ``--repeat`` runs, the two processes taking turns after a warm-up round; the
ratio is the median of each round's convert/floor ratio) and reads their peak resident memory.

    python benchmarks/bench_convert.py                 # A0, B1, B3 (B3: ~470 MiB on disk)
    python benchmarks/bench_convert.py --models A0 --repeat 1
    python benchmarks/bench_convert.py --markdown      # the README's table

Also times `repvgg --help` and `repvgg --version` (torch must not be imported for them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.zoo: the clone's reference RepVGG

MEASURE = r"""
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode
elapsed = time.perf_counter() - start
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(f"{elapsed} {peak_kib} {code}")
"""

FLOOR = r"""
import sys, torch
from safetensors.torch import save_file
state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
save_file({k: v.contiguous() for k, v in state.items()}, sys.argv[2])
"""


def measure(command: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one process running ``command``."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, check=True)
    seconds, peak_kib, code = out.stdout.split()
    if code != "0":
        raise SystemExit(f"command failed ({code}): {' '.join(command)}")
    return float(seconds), int(peak_kib) / 1024


def make_checkpoint(name: str, folder: Path) -> tuple[Path, int]:
    import torch

    from tests import zoo

    torch.manual_seed(0)
    model = zoo.randomize_bn(zoo.repvgg(name), seed=0)
    path = folder / f"RepVGG-{name}-train.pt"
    torch.save(model.state_dict(), path)
    params = sum(p.numel() for p in model.parameters())
    del model
    return path, params


def side_by_side(commands: list[tuple[list[str], Path]], repeat: int) -> list[tuple[float, float, list[float]]]:
    """``(median seconds, max peak MiB, every time)`` per command, the commands run in turn
    ``repeat`` times after one unmeasured warm-up round, so that both see the same machine (page
    cache, other load) and drift hits them alike."""
    times: list[list[float]] = [[] for _ in commands]
    peaks: list[list[float]] = [[] for _ in commands]
    for round_ in range(repeat + 1):
        for index, (command, output) in enumerate(commands):
            output.unlink(missing_ok=True)
            seconds, peak = measure(command)
            if round_:
                times[index].append(seconds)
                peaks[index].append(peak)
    return [(statistics.median(t), max(p), t) for t, p in zip(times, peaks)]


def repvgg_command() -> list[str]:
    exe = shutil.which("repvgg")
    return [exe] if exe else [sys.executable, "-m", "repvgg_cli"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["A0", "B1", "B3"])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="repvgg-bench-") as tmp:
        folder = Path(tmp)
        for name in args.models:
            source, params = make_checkpoint(name, folder)
            size_mib = source.stat().st_size / 2**20
            floor_out = folder / "floor.safetensors"
            deploy_out = folder / "deploy.safetensors"
            (floor_s, floor_mib, floor_runs), (conv_s, conv_mib, conv_runs) = side_by_side([
                ([sys.executable, "-c", FLOOR, str(source), str(floor_out)], floor_out),
                ([*repvgg_command(), "convert", str(source), str(deploy_out)], deploy_out),
            ], args.repeat)
            round_ratios = [c / f for f, c in zip(floor_runs, conv_runs)]
            rows.append({
                "model": f"RepVGG-{name}", "params_m": params / 1e6, "file_mib": size_mib,
                "floor_s": floor_s, "convert_s": conv_s,
                # each round runs both back to back: the median of the rounds' ratios is robust
                # to the machine drifting between rounds (which the ratio of medians is not)
                "time_ratio": statistics.median(round_ratios),
                "floor_peak_mib": floor_mib, "convert_peak_mib": conv_mib,
                "extra_peak_vs_file": (conv_mib - floor_mib) / size_mib,
                "floor_runs_s": floor_runs, "convert_runs_s": conv_runs,
                "round_ratios": round_ratios,
            })
            source.unlink()
        help_s = statistics.median(measure([*repvgg_command(), "--help"])[0] for _ in range(5))
        version_s = statistics.median(measure([*repvgg_command(), "--version"])[0] for _ in range(5))

    if args.json:
        print(json.dumps({"rows": rows, "help_s": help_s, "version_s": version_s}, indent=2))
        return
    header = ("| model | params | file | I/O floor | convert | ratio | ratio per round | floor peak RSS | "
              "convert peak RSS | extra peak / file size |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params_m']:.1f} M | {r['file_mib']:.0f} MiB | {r['floor_s']:.2f} s | "
            f"{r['convert_s']:.2f} s | {r['time_ratio']:.2f}× | "
            f"{min(r['round_ratios']):.2f}–{max(r['round_ratios']):.2f}× | {r['floor_peak_mib']:.0f} MiB | "
            f"{r['convert_peak_mib']:.0f} MiB | {r['extra_peak_vs_file']:.2f}× |"
        )
    lines.append("")
    lines.append(f"I/O floor and convert: medians of {args.repeat} rounds; ratio: the median of the rounds' "
                 "convert/floor ratios.  ")
    lines.append(f"`repvgg --help`: {help_s:.2f} s, `repvgg --version`: {version_s:.2f} s "
                 f"(median of 5; {os.cpu_count()} CPUs)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
