"""Time `repvgg convert` on a checkpoint of very many tiny tensors (issue 10: bounded work).

A checkpoint of ``N`` tiny tensors beside a few RepVGG blocks (a real one once held 1.4 M and
took 11 min and 8 GB, and produced a safetensors header over the format's 100 MB limit). The
script writes the file, then times, as whole processes (each run in a fresh interpreter):

* the floors: ``torch.load(weights_only=True)`` of the same file, nothing else, and that load
  followed by a ``torch.save`` of what it returned (the least a ``.pt`` output costs);
* ``repvgg convert`` into ``.safetensors`` and into ``.pt``.

    python benchmarks/bench_many_tensors.py                    # 100k tensors (the issue's bar: under 30 s)
    python benchmarks/bench_many_tensors.py --tensors 1400000  # refused before any work (header limit)
    python benchmarks/bench_many_tensors.py --json

Not a test: times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAKE = r"""
import sys, torch
n, path = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
state = {}
for b in range(2):  # a few real blocks, so there is something to fuse
    for branch, k in (("rbr_dense", 3), ("rbr_1x1", 1)):
        state[f"block{b}.{branch}.conv.weight"] = torch.randn(8, 8, k, k)
        for part, value in (("weight", 1.0), ("bias", 0.1), ("running_mean", 0.2), ("running_var", 1.5)):
            state[f"block{b}.{branch}.bn.{part}"] = torch.full((8,), value) + 0.01 * torch.randn(8)
        state[f"block{b}.{branch}.bn.num_batches_tracked"] = torch.tensor(5)
for i in range(n):
    state[f"extra.t{i}"] = torch.full((2,), float(i))
torch.save(state, path)
"""

LOAD = "import sys, torch; torch.load(sys.argv[1], weights_only=True, map_location='cpu')"
LOAD_SAVE = ("import sys, torch; torch.save(torch.load(sys.argv[1], weights_only=True, map_location='cpu'), "
             "sys.argv[2])")


WRAP = r"""
import json, resource, subprocess, sys
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=False).returncode
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"code": code, "cpu": usage.ru_utime + usage.ru_stime, "max_rss_kib": usage.ru_maxrss}))
"""


def timed(command: list[str]) -> dict:
    """One run of ``command`` in a fresh process: wall seconds, CPU seconds (user + system: on a
    loaded machine the wall time waits for other processes, the CPU time does not), peak resident
    memory (MiB), exit code and the first stderr line (the error)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAP, *command], check=False, capture_output=True, text=True)
    wall = time.perf_counter() - start
    usage = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = proc.stderr.strip().splitlines()
    return {"wall_s": round(wall, 2), "cpu_s": round(usage["cpu"], 2), "max_rss_mib": usage["max_rss_kib"] // 1024,
            "exit": usage["code"], "error": lines[0] if usage["code"] and lines else ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=100_000, help="tiny tensors in the checkpoint (default 100000)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    repvgg = [sys.executable, "-m", "repvgg_cli"]
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "many.pt"
        subprocess.run([sys.executable, "-c", MAKE, str(args.tensors), str(source)], check=True)
        rows = {"tensors": args.tensors, "file_bytes": source.stat().st_size}
        runs = {
            "torch.load alone": [sys.executable, "-c", LOAD, str(source)],
            "torch.load + torch.save": [sys.executable, "-c", LOAD_SAVE, str(source), str(Path(folder) / "re.pt")],
        }
        for ext in (".safetensors", ".pt"):
            runs[f"repvgg convert -> {ext}"] = [*repvgg, "convert", str(source), str(Path(folder) / f"out{ext}"),
                                                "--bn-eps", "1e-5", "--quiet"]
        rows["runs"] = {name: timed(command) for name, command in runs.items()}
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{rows['tensors']:,} tiny tensors, {rows['file_bytes'] / 2**20:.1f} MiB")
        for name, run in rows["runs"].items():
            note = f"  exit {run['exit']}: {run['error']}" if run["exit"] else ""
            print(f"  {name:<32} {run['wall_s']:6.1f} s wall {run['cpu_s']:6.1f} s CPU "
                  f"{run['max_rss_mib']:6,} MiB peak{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
