"""Mutation testing of the core (fusion, verify, the io layer, the pipeline), run by hand.

mutmut 3 (the ``mutation`` extra: ``pip install -e ".[test,mutation]"``) makes small changes to the
code, one at a time, and runs the tests that call the changed function against each: a change no
test notices ("survived")
is a test missing, or an equivalent mutant (one no test could ever tell from the original),
which is then documented once in ``scripts/mutation_equivalents.txt`` with its reason and left
out of the score from then on.

Each target (a few modules) runs in its own snapshot under ``build/mutation/<target>/`` with only
the test files mapped to it in :data:`TARGETS` (mutmut then narrows each mutant to the tests that
call its function). The script prints mutmut's summary per target and in total, every mutant not
killed that is not a documented equivalent (its diff and fingerprint), and the score
``(killed + timeout) / (all - skipped - not checked - documented equivalents)``; it exits 1 when
the score is under ``--fail-under``. Not for CI: the whole core takes hours on two cores.

Usage::

    python scripts/mutate.py --list                  # targets, their files and tests
    python scripts/mutate.py io/containers           # one target
    python scripts/mutate.py io verify               # every io/* target, and verify
    python scripts/mutate.py                         # the whole core
    python scripts/mutate.py --report                # the last run's results again, no run
    python scripts/mutate.py --sample 200 fusion     # a seeded sample of 200 mutants: an estimate

Tool: mutmut (github.com/boxed/mutmut), configured through a ``setup.cfg`` this script writes
into each snapshot (its ``[mutmut]`` section; the repository's own files are not touched).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import select
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# -- what is mutated, and which tests cover it ---------------------------------------------------
# One row per target: the files mutated (globs relative to the repository root) and the test files
# that exercise them. Change this table when modules move (issue 11's pipeline package: put its
# globs in the "pipeline" row). A glob that matches nothing is skipped; a core file that no row
# mutates is reported by --list and by every run.

ROWS_TEST = "tests/test_mutation_rows.py"
# Rows that name a tests/test_mutation_<target>.py map only fast unit tests: every survivor runs all
# the mapped tests that call its function, and the end-to-end files (test_checkpoint, test_writes:
# conversions, subprocesses, batches) made that about a minute per survivor on 2 shared cores.
# Fewer tests can only kill fewer mutants, so the score such a row gets is a lower bound.
IO_READ_TESTS = ("tests/test_checkpoint.py", "tests/test_hostile.py", ROWS_TEST)
STATS_ENV = "tests/mutation_stats_env.py"  # lets the stats run pass with tests that start subprocesses
IO_WRITE_TESTS = (STATS_ENV, "tests/test_checkpoint.py", "tests/test_writes.py", ROWS_TEST)
CHECK_TESTS = ("tests/test_fusion.py", "tests/test_exactness.py", "tests/test_verify_corruption.py",
               "tests/test_family_contract.py", ROWS_TEST)
PIPELINE_TESTS = ("tests/test_checkpoint.py", "tests/test_patterns.py", "tests/test_bn_variants.py",
                  "tests/test_devices.py", "tests/test_exactness.py", "tests/test_family_contract.py",
                  "tests/test_verify_corruption.py", ROWS_TEST)

TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fusion": (("repvgg_cli/fusion/*.py", "repvgg_cli/algebra/*.py"),
               ("tests/test_mutation_fusion.py", "tests/test_algebra.py", "tests/test_fusion.py", "tests/test_exactness.py", "tests/test_bn_variants.py",
                "tests/test_family_mm_acnet.py", "tests/test_family_dbb_orepa.py", "tests/test_family_contract.py",
                ROWS_TEST)),
    "verify": (("repvgg_cli/verify.py",), ("tests/test_mutation_verify.py", ROWS_TEST)),
    "checks": (("repvgg_cli/checks/*.py",), ("tests/test_mutation_checks_tolerance.py", "tests/test_mutation_checks.py",
                                             *CHECK_TESTS)),
    "io/containers": (("repvgg_cli/io/containers.py",), ("tests/test_mutation_io_containers.py", ROWS_TEST)),
    "io/read": (("repvgg_cli/io/read.py",), ("tests/test_mutation_io_read.py", ROWS_TEST)),
    "io/unpickle": (("repvgg_cli/io/unpickle.py",), ("tests/test_mutation_io_unpickle.py", ROWS_TEST)),
    "io/contents": (("repvgg_cli/io/contents.py",), ("tests/test_mutation_io_contents.py", "tests/test_io_hostile_tensors.py",
                                                   ROWS_TEST)),
    "io/ziprecords": (("repvgg_cli/io/ziprecords.py",), ("tests/test_mutation_io_ziprecords.py", "tests/test_io_zip_records.py",
                                                       ROWS_TEST)),
    "io/mapguard": (("repvgg_cli/io/mapguard.py",), (STATS_ENV, "tests/test_mutation_io_mapguard.py",
                                                   "tests/test_io_source_changes.py")),
    "io/metadata": (("repvgg_cli/io/metadata.py",), ("tests/test_mutation_io_metadata.py", ROWS_TEST)),
    "io/digest": (("repvgg_cli/io/digest.py",), ("tests/test_mutation_io_digest.py", ROWS_TEST)),
    "io/write": (("repvgg_cli/io/write.py",), ("tests/test_mutation_io_write.py", ROWS_TEST)),
    "io/atomic": (("repvgg_cli/io/atomic.py",), (STATS_ENV, "tests/test_mutation_io_atomic.py", ROWS_TEST)),
    "io/limits": (("repvgg_cli/io/limits.py",), ("tests/test_mutation_io_limits.py", "tests/test_io_limits.py", ROWS_TEST)),
    "io/safetensors_file": (("repvgg_cli/io/safetensors_file.py",), ("tests/test_mutation_io_safetensors_file.py", ROWS_TEST)),
    "pipeline": (("repvgg_cli/pipeline/*.py", "repvgg_cli/api.py"), ("tests/test_mutation_pipeline_options.py",
                                                                     "tests/test_mutation_pipeline.py", "tests/test_api.py",
                                                                     "tests/test_trust.py", "tests/test_dry_run.py",
                                                                     *PIPELINE_TESTS)),
}

CORE = ("repvgg_cli/fusion/*.py", "repvgg_cli/algebra/*.py", "repvgg_cli/verify.py", "repvgg_cli/checks/*.py",
        "repvgg_cli/io/*.py", "repvgg_cli/pipeline/*.py", "repvgg_cli/api.py")
"""Every file the mutation score is about (``__init__.py`` files excepted)."""

SNAPSHOT = ("repvgg_cli", "tests", "sample_checkpoints", "scripts", "README.md")
"""What each target's snapshot holds: the package and what its tests read."""

EQUIVALENTS = ROOT / "scripts" / "mutation_equivalents.txt"
TIMEOUT_MULTIPLIER = 3.0
WORKDIR = ROOT / "build" / "mutation"

# mutmut 3's exit codes per mutant (mutmut/stats.py), by the names its summary uses
STATUS_BY_CODE = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 2: "interrupted", None: "not checked",
                  33: "no tests", 34: "skipped", 35: "suspicious", 36: "timeout", 37: "caught by type check",
                  -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", -11: "segfault", -9: "segfault"}
KILLED = ("killed", "timeout", "caught by type check")
NOT_SCORED = ("skipped", "not checked", "interrupted")
SUMMARY_ORDER = ("killed", "survived", "timeout", "no tests", "suspicious", "segfault", "skipped",
                 "caught by type check", "not checked", "interrupted")


# -- equivalents -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Equivalent:
    fingerprint: str
    mutant: str
    reason: str
    line: int


def read_equivalents(path: Path) -> dict[str, Equivalent]:
    """``{fingerprint: entry}`` from the equivalents file; a line without a reason is an error."""
    entries: dict[str, Equivalent] = {}
    if not path.exists():
        return entries
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        head, sep, reason = line.partition(" -- ")
        parts = head.split()
        if not sep or len(parts) != 2 or not reason.strip() or len(parts[0]) != 12:
            raise SystemExit(f"{path}:{number}: expected 'FINGERPRINT MUTANT -- reason', got: {raw!r}")
        entries[parts[0]] = Equivalent(parts[0], parts[1], reason.strip(), number)
    return entries


def fingerprint(mutant: str, diff: str) -> str:
    """12 hex digits of the mutant's function and the lines it changes (not its number, which
    shifts when other mutants of the function come or go)."""
    function = mutant.partition("__mutmut_")[0]
    changed = [line[0] + line[1:].strip() for line in diff.splitlines()
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    return hashlib.sha256("\n".join([function, *changed]).encode("utf-8")).hexdigest()[:12]


# -- targets ----------------------------------------------------------------------------------------


def files_of(globs: tuple[str, ...], base: Path = ROOT) -> list[str]:
    found = {p.relative_to(base).as_posix() for g in globs for p in base.glob(g) if p.is_file()}
    return sorted(f for f in found if not f.endswith("__init__.py"))


def uncovered_core_files() -> list[str]:
    covered = {f for globs, _ in TARGETS.values() for f in files_of(globs)}
    return [f for f in files_of(CORE) if f not in covered]


def select_targets(names: list[str]) -> list[str]:
    if not names or names == ["all"]:
        return list(TARGETS)
    chosen: list[str] = []
    for name in names:
        matches = [t for t in TARGETS if t == name or t.startswith(name.rstrip("/") + "/")]
        if not matches:
            raise SystemExit(f"no target {name!r}; targets: {', '.join(TARGETS)}")
        chosen += [t for t in matches if t not in chosen]
    return chosen


def slug(target: str) -> str:
    return target.replace("/", "-")


# -- one target ---------------------------------------------------------------------------------------


@dataclass
class TargetResult:
    target: str
    files: list[str]
    tests: list[str]
    statuses: dict[str, str] = field(default_factory=dict)
    diffs: dict[str, str] = field(default_factory=dict)
    tool_summary: dict[str, int] = field(default_factory=dict)
    seconds: float | None = None
    sample: dict | None = None


def write_config(directory: Path, files: list[str], tests: list[str]) -> None:
    """The snapshot's mutmut configuration (``setup.cfg``) and pytest's (``pytest.ini``, so no
    configuration above the snapshot applies)."""
    def listing(values: list[str]) -> str:
        return "\n" + "\n".join(f"    {v}" for v in values)

    also_copy = [p for p in SNAPSHOT if p not in ("repvgg_cli", "tests")] + ["pytest.ini"]
    (directory / "setup.cfg").write_text(
        "# written by scripts/mutate.py for this snapshot; edit TARGETS there instead\n"
        "[mutmut]\n"
        "source_paths = repvgg_cli\n"
        f"only_mutate = {listing(files)}\n"
        f"also_copy = {listing(also_copy)}\n"
        f"pytest_add_cli_args_test_selection = {listing(tests)}\n"
        "pytest_add_cli_args = \n    -p\n    no:cacheprovider\n"
        "process_isolation = forkserver\n"  # torch is not fork-safe once it has started threads
        # a mutant gets 2 * 3 * (its tests' time + 1 s) of CPU before it counts as a timeout (an
        # endless loop); mutmut's default multiplier of 15 stalls a run for minutes per such mutant
        f"timeout_multiplier = {TIMEOUT_MULTIPLIER}\n"
        "use_git_change_detection = false\n",
        encoding="utf-8",
    )
    (directory / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n", encoding="utf-8")


def snapshot(directory: Path, rev: str | None) -> None:
    """Copy what the tests need into ``directory``: from the working tree, or from commit ``rev``
    (``git archive``: what is committed, whatever is being edited meanwhile)."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    if rev is not None:
        paths = [p for p in SNAPSHOT
                 if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{rev}:{p}"], check=False,
                                   capture_output=True).returncode == 0]
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "--", *paths],
                                 capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(directory, filter="data")
            else:  # Python without extraction filters (before 3.10.12 / 3.11.4)
                tar.extractall(directory)
        return
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache")
    for name in SNAPSHOT:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, directory / name, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, directory / name)


def mutmut_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mutmut", *args]


def run_mutmut(directory: Path, jobs: int, heartbeat: float = 60.0, names: list[str] | None = None) -> int:
    """``mutmut run`` in the snapshot, its output kept in ``mutmut.log``; its progress line is
    echoed every ``heartbeat`` seconds."""
    log_path = directory / "mutmut.log"
    # the algebra's laws (tests/test_algebra.py) with 60 random expressions each instead of 1000
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", REPVGG_ALGEBRA_EXAMPLES="60")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(mutmut_command("run", "--max-children", str(jobs), *(names or ())), cwd=directory,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert process.stdout is not None
        last_echo, progress, echoed = time.monotonic(), b"", b""
        while True:
            ready, _, _ = select.select([process.stdout], [], [], 5.0)
            chunk = os.read(process.stdout.fileno(), 65536) if ready else b""
            if ready and not chunk:
                break
            log.write(chunk)
            if chunk:
                progress = (progress + chunk).replace(b"\n", b"\r").split(b"\r")[-1][-200:] or progress
            quiet = time.monotonic() - last_echo
            if progress and progress != echoed and quiet > heartbeat or quiet > 5 * heartbeat:
                print(f"    ... {progress.decode('utf-8', 'replace').strip()}", flush=True)
                last_echo, echoed = time.monotonic(), progress
        return process.wait()


GENERATE_HELPER = """
import os, sys
from mutmut import __main__ as m
# The first phase of ``mutmut run`` only (mutmut 3.8): copy the sources, write every mutant and its
# .meta file (every name, not yet tested). Run in the snapshot.
m.set_mutant_under_test("mutant_generation")
os.makedirs("mutants", exist_ok=True)
m.copy_src_dir()
m.copy_also_copy_files()
m.setup_source_paths()
m.store_lines_covered_by_tests()
m.create_mutants(int(sys.argv[1]))
"""


def mutant_names(directory: Path) -> list[str]:
    """Every mutant's name in a snapshot whose mutants are generated (from mutmut's ``.meta`` files)."""
    names: list[str] = []
    for meta in sorted((directory / "mutants").rglob("*.py.meta")):
        names.extend(json.loads(meta.read_text(encoding="utf-8")).get("exit_code_by_key", {}))
    return sorted(names)


def draw_sample(names: list[str], size: int, seed: int) -> list[str]:
    """``size`` names drawn without replacement, the same ones for the same names and seed."""
    import random

    return sorted(random.Random(seed).sample(sorted(names), min(size, len(names))))


def run_sample(directory: Path, jobs: int, size: int, seed: int) -> int:
    """Generate every mutant, then test a seeded random sample of ``size`` of them (the rest stay
    "not checked", which the score leaves out); the draw is kept in ``sample.json``."""
    generated = subprocess.run([sys.executable, "-c", GENERATE_HELPER, str(jobs)], cwd=directory,
                               capture_output=True, text=True, check=False)
    names = mutant_names(directory)
    if generated.returncode != 0 or not names:
        print(f"   generating the mutants failed (mutmut's internals changed?): {generated.stderr[-400:]}")
        return 2
    chosen = draw_sample(names, size, seed)
    (directory / "sample.json").write_text(json.dumps({"seed": seed, "size": len(chosen), "of": len(names)}) + "\n")
    print(f"   sample: {len(chosen)} of {len(names)} mutants (seed {seed})", flush=True)
    return run_mutmut(directory, jobs, names=chosen)


def wilson_interval(killed: int, scored: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion, in percent: what a sampled score says about the
    score of every mutant."""
    if not scored:
        return 0.0, 100.0
    p = killed / scored
    centre = (p + z * z / (2 * scored)) / (1 + z * z / scored)
    half = z * ((p * (1 - p) / scored + z * z / (4 * scored * scored)) ** 0.5) / (1 + z * z / scored)
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def read_log(directory: Path) -> str:
    path = directory / "mutmut.log"
    return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""


DIFF_HELPER = """
import json, sys
from pathlib import Path
names = json.loads(sys.stdin.read())
diffs = {}
try:
    from mutmut.mutation.diff_apply import get_diff_for_mutant
except ImportError:
    get_diff_for_mutant = None
for name in names:
    if get_diff_for_mutant is not None:
        try:
            diffs[name] = get_diff_for_mutant(name)
            continue
        except Exception:
            pass
    import subprocess
    out = subprocess.run([sys.executable, "-m", "mutmut", "show", name], capture_output=True, text=True).stdout
    diffs[name] = "\\n".join(out.splitlines()[1:])
print(json.dumps(diffs))
"""


def read_results(directory: Path, result: TargetResult) -> None:
    """Every mutant's status from mutmut's ``.meta`` files, the diffs of those not killed, and
    mutmut's own summary (``mutmut export-cicd-stats``)."""
    mutants = directory / "mutants"
    for meta in sorted(mutants.rglob("*.py.meta")):
        codes = json.loads(meta.read_text(encoding="utf-8")).get("exit_code_by_key", {})
        for name, code in codes.items():
            result.statuses[name] = STATUS_BY_CODE.get(code, "suspicious")
    wanted = sorted(n for n, s in result.statuses.items() if s not in KILLED)
    if wanted:
        out = subprocess.run([sys.executable, "-c", DIFF_HELPER], cwd=directory, input=json.dumps(wanted),
                             capture_output=True, text=True, check=True).stdout
        result.diffs = json.loads(out.strip().splitlines()[-1])
    exported = subprocess.run(mutmut_command("export-cicd-stats"), cwd=directory, capture_output=True, text=True,
                              check=False)
    stats = mutants / "mutmut-cicd-stats.json"
    if exported.returncode == 0 and stats.exists():
        result.tool_summary = json.loads(stats.read_text(encoding="utf-8"))


# -- report ---------------------------------------------------------------------------------------------


@dataclass
class Score:
    counts: dict[str, int]
    equivalent: int
    killed: int
    scored: int

    @property
    def percent(self) -> float:
        return 100.0 * self.killed / self.scored if self.scored else 100.0


def score(statuses: dict[str, str], equivalent_names: set[str]) -> Score:
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    equivalent = len(equivalent_names)
    killed = sum(counts.get(s, 0) for s in KILLED)
    scored = len(statuses) - sum(counts.get(s, 0) for s in NOT_SCORED) - equivalent
    return Score(counts, equivalent, killed, scored)


def summary_line(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    parts = [f"{counts[s]} {s}" for s in SUMMARY_ORDER if counts.get(s)]
    return f"{total} mutants: " + ", ".join(parts)


def report(results: list[TargetResult], equivalents: dict[str, Equivalent]) -> Score:
    all_statuses: dict[str, str] = {}
    all_equivalent: set[str] = set()
    estimated_killed = estimated_scored = 0.0  # sampled targets scaled up to all their mutants
    matched: set[str] = set()
    mutated_modules: set[str] = set()
    for result in results:
        equivalent_names: set[str] = set()
        open_mutants: list[tuple[str, str, str]] = []
        for name, status in sorted(result.statuses.items()):
            if status in NOT_SCORED:
                continue
            mutated_modules.add(name.partition("__mutmut_")[0].rpartition(".")[0])
            if status in KILLED:
                continue
            diff = result.diffs.get(name, "")
            fp = fingerprint(name, diff)
            if fp in equivalents:
                equivalent_names.add(name)
                matched.add(fp)
            else:
                open_mutants.append((name, status, fp))
        s = score(result.statuses, equivalent_names)
        took = f", {result.seconds / 60:.1f} min" if result.seconds is not None else ""
        print(f"\n== {result.target}: {', '.join(result.files)} (tests: {' '.join(result.tests)}{took})")
        if result.tool_summary:
            tool = {k: v for k, v in result.tool_summary.items() if v}
            print(f"   mutmut: {json.dumps(tool)}")
        print(f"   {summary_line(s.counts)}")
        print(f"   score: {s.killed}/{s.scored} = {s.percent:.1f}% "
              f"({s.equivalent} documented equivalent(s) left out)")
        if result.sample:
            low, high = wilson_interval(s.killed, s.scored)
            print(f"   sampled: {result.sample['size']} of {result.sample['of']} mutants (seed {result.sample['seed']}); "
                  f"the whole target's score is {low:.1f}-{high:.1f}% (95% Wilson interval)")
        for name, status, fp in open_mutants:
            print(f"   {status:<10} {fp}  {name}")
            for line in result.diffs.get(name, "").splitlines():
                if line[:1] in "+-" and not line.startswith(("+++", "---")):
                    print(f"                 {line}")
        all_statuses.update(result.statuses)
        all_equivalent |= equivalent_names
        scale = result.sample["of"] / result.sample["size"] if result.sample else 1.0
        estimated_killed += s.killed * scale
        estimated_scored += s.scored * scale
    total = score(all_statuses, all_equivalent)
    print(f"\n== total over {len(results)} target(s): {summary_line(total.counts)}")
    print(f"   score: {total.killed}/{total.scored} = {total.percent:.1f}% "
          f"({total.equivalent} documented equivalent(s) left out)")
    if any(r.sample for r in results) and estimated_scored:
        print(f"   with each sampled target weighted by its size: about {100 * estimated_killed / estimated_scored:.1f}% "
              f"of about {estimated_scored:.0f} scored mutants (an estimate: see each sample's interval)")
    stale = [e for fp, e in equivalents.items() if fp not in matched
             and e.mutant.partition("__mutmut_")[0].rpartition(".")[0] in mutated_modules
             and all_statuses.get(e.mutant) not in NOT_SCORED]  # a sample may have left it untested
    for entry in stale:
        print(f"   note: {EQUIVALENTS.name}:{entry.line} ({entry.fingerprint} {entry.mutant}) matched no surviving "
              "mutant: the code changed, or a test kills it now; remove the line")
    return total


# -- main ------------------------------------------------------------------------------------------------


def list_targets() -> None:
    for target, (globs, tests) in TARGETS.items():
        files = files_of(globs)
        missing = [t for t in tests if not (ROOT / t).exists()]
        print(f"{target:<22} {' '.join(files) or '(no files: skipped)'}")
        print(f"{'':<22} tests: {' '.join(tests)}" + (f"  (missing: {' '.join(missing)})" if missing else ""))
    uncovered = uncovered_core_files()
    if uncovered:
        print(f"\ncore files no target mutates: {' '.join(uncovered)}")


def main(argv: list[str] | None = None) -> int:
    head, _, usage = __doc__.partition("Usage::")
    parser = argparse.ArgumentParser(description=head.split("\n\n")[0], epilog="examples:\n" + usage.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", help="targets or groups (io = every io/* target); default: all")
    parser.add_argument("--list", action="store_true", help="show the targets, their files and tests")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutants tested at once")
    parser.add_argument("--report", action="store_true", help="print the last run's results, run nothing")
    parser.add_argument("--rev", help="mutate this commit (git archive) instead of the working tree")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in its snapshot (mutants already tested keep their result)")
    parser.add_argument("--sample", type=int, metavar="N",
                        help="test a seeded random sample of N mutants per target instead of all (an estimate "
                             "with its interval, for targets whose full run takes hours)")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed")
    parser.add_argument("--fail-under", type=float, default=95.0, help="exit 1 below this score (percent)")
    parser.add_argument("--workdir", type=Path, default=WORKDIR, help="where the snapshots go")
    parser.add_argument("--equivalents", type=Path, default=EQUIVALENTS, help="the documented equivalents")
    args = parser.parse_args(argv)

    if args.list:
        list_targets()
        return 0
    equivalents = read_equivalents(args.equivalents)
    if not args.report:
        try:
            import mutmut  # noqa: F401
        except ImportError:
            print('mutmut is not installed: pip install -e ".[test,mutation]"', file=sys.stderr)
            return 2
    uncovered = uncovered_core_files()
    if uncovered:
        print(f"warning: core files no target mutates: {' '.join(uncovered)} (add them to TARGETS)")
    results: list[TargetResult] = []
    started = time.monotonic()
    for target in select_targets(args.targets):
        globs, tests = TARGETS[target]
        directory = args.workdir / slug(target)
        fresh = not args.report and not (args.resume and (directory / "mutants").exists())
        if fresh:
            snapshot(directory, args.rev)
        elif not directory.exists():
            print(f"-- {target}: no results in {directory}")
            continue
        files = files_of(globs, directory)
        present = [t for t in tests if (directory / t).exists()]
        if not files:
            print(f"-- {target}: no files match {' '.join(globs)}: skipped")
            shutil.rmtree(directory)
            continue
        if len(present) < len(tests):
            print(f"-- {target}: test files not found, left out: {' '.join(t for t in tests if t not in present)}")
        result = TargetResult(target, files, present)
        if fresh:
            write_config(directory, files, present)
        if not args.report:
            print(f"-- {target}: mutmut run in {directory} (log: {directory / 'mutmut.log'})", flush=True)
            begin = time.monotonic()
            if args.sample:
                code = run_sample(directory, args.jobs, args.sample, args.seed)
            else:
                (directory / "sample.json").unlink(missing_ok=True)
                code = run_mutmut(directory, args.jobs)
            result.seconds = time.monotonic() - begin
            (directory / "seconds").write_text(f"{result.seconds:.1f}\n")
            if code != 0:
                print(f"-- {target}: mutmut run exited {code}; see {directory / 'mutmut.log'}")
                if "failed to collect stats" in read_log(directory) or "Failed to run clean test" in read_log(directory):
                    print(f"   the mapped tests fail with no mutant applied: run them first "
                          f"(cd {directory} && python -m pytest -x {' '.join(present)})")
        elif (directory / "seconds").exists():
            result.seconds = float((directory / "seconds").read_text())
        if (directory / "sample.json").exists():
            result.sample = json.loads((directory / "sample.json").read_text())
        if not (directory / "mutants").exists():
            print(f"-- {target}: no results in {directory}")
            continue
        read_results(directory, result)
        results.append(result)
    if not results:
        return 2
    total = report(results, equivalents)
    if not args.report:
        print(f"   wall time: {(time.monotonic() - started) / 60:.1f} min with --jobs {args.jobs}")
    summary = {r.target: {"files": r.files, "tests": r.tests, "counts": score(r.statuses, set()).counts,
                          "mutmut": r.tool_summary, "seconds": r.seconds, "sample": r.sample} for r in results}
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "summary.json").write_text(json.dumps(
        {"targets": summary, "score_percent": total.percent, "killed": total.killed, "scored": total.scored,
         "equivalents_left_out": total.equivalent}, indent=2) + "\n")
    sampled = {r.target for r in results if r.sample}
    incomplete = sum(1 for r in results if r.target not in sampled
                     for status in r.statuses.values() if status in ("not checked", "interrupted"))
    if incomplete:
        print(f"   {incomplete} mutant(s) not checked: the run is incomplete (--resume continues it)")
    return 0 if total.percent >= args.fail_under and not incomplete else 1


if __name__ == "__main__":
    sys.exit(main())
