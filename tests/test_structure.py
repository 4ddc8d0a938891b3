"""The shape of the package (issue 11): no import circle, no module over 500 lines, the layers.

Every module of ``repvgg_cli`` is parsed (not imported) and each ``import`` / ``from ... import``
it holds counts, wherever it stands: at the top, inside a function (a lazy import), under
``if TYPE_CHECKING:``. A module imports:

* the module an import names: ``from .x import y`` imports ``x.y`` where that is a module, else
  ``x`` (whose body must define ``y``: ``from . import NAME`` in a package's submodule imports the
  package's ``__init__``);
* the packages above that module, which its import runs first (``from ..pipeline.read import
  Source`` runs ``pipeline/__init__.py``), unless the importer is inside that package already (its
  ``__init__`` is then under way, or done).

Imports through ``importlib`` with a computed name (the lazy public names of
``repvgg_cli/__init__.py``) are not seen; the package root's own ``__init__`` imports nothing else.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "repvgg_cli"
MAX_LINES = 500


def modules_of(package: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's ``__init__``), for every ``.py`` file under ``package``."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = (path, is_package)
    return found


def _known(name: str, modules: dict) -> str | None:
    """The longest prefix of ``name`` that is a module (``a.b.func`` -> ``a.b``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imported(node: ast.AST, module: str, is_package: bool, modules: dict) -> list[str]:
    """The modules of the package that one import statement imports (see the module docstring)."""
    if isinstance(node, ast.Import):
        return [found for alias in node.names if (found := _known(alias.name, modules))]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    owner = _known(target, modules)
    if owner is None:
        return []
    return [f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else owner for alias in node.names]


def import_graph(package: Path) -> dict[str, dict[str, int]]:
    """Module -> {module it imports: the line of the first such import}, within ``package``."""
    modules = modules_of(package)
    root = package.name
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for module, (path, is_package) in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for target in _imported(node, module, is_package, modules):
                if target == module:
                    continue
                graph[module].setdefault(target, node.lineno)
                parent = target.rpartition(".")[0]
                while parent and parent != root and not (module == parent or module.startswith(parent + ".")):
                    graph[module].setdefault(parent, node.lineno)
                    parent = parent.rpartition(".")[0]
    return graph


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
    return groups


def describe(group: list[str], graph: dict[str, dict[str, int]], modules: dict) -> str:
    members = set(group)
    lines = [f"import circle: {', '.join(group)}"]
    for module in group:
        path = modules[module][0].relative_to(PACKAGE.parent)
        lines.extend(f"  {path}:{line} imports {target}" for target, line in sorted(graph[module].items())
                     if target in members)
    return "\n".join(lines)


def test_no_import_circle() -> None:
    graph = import_graph(PACKAGE)
    modules = modules_of(PACKAGE)
    assert len(graph) > 50 and graph["repvgg_cli.api"], "the package was not read"
    cycles = import_cycles(graph)
    assert not cycles, "\n".join(describe(group, graph, modules) for group in cycles)


def test_no_module_over_500_lines() -> None:
    long = {str(path.relative_to(PACKAGE.parent)): n for path, _ in modules_of(PACKAGE).values()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them along their seams): {long}"


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "pkg"


@pytest.mark.parametrize(("files", "expected"), [
    ({"pkg/__init__.py": "", "pkg/a.py": "from .b import f\n", "pkg/b.py": "def f():\n    from .a import g\n"},
     [["pkg.a", "pkg.b"]]),  # a lazy import closes the circle
    ({"pkg/__init__.py": "", "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
      "pkg/b.py": "import pkg.a\n"}, [["pkg.a", "pkg.b"]]),
    ({"pkg/__init__.py": "", "pkg/sub/__init__.py": "from .x import X\n", "pkg/sub/x.py": "from ..y import Y\n",
      "pkg/y.py": "from .sub.z import Z\n", "pkg/sub/z.py": ""},
     [["pkg.sub", "pkg.sub.x", "pkg.y"]]),  # importing pkg.sub.z runs pkg/sub/__init__.py first
    ({"pkg/__init__.py": "", "pkg/sub/__init__.py": "from .x import X\n", "pkg/sub/x.py": "from . import z\n",
      "pkg/sub/z.py": "", "pkg/a.py": "from .sub import x\n"}, []),  # inside its own package: no circle
    ({"pkg/__init__.py": "", "pkg/sub/__init__.py": "from .x import X\nREGISTRY = ()\n",
      "pkg/sub/x.py": "def f():\n    from . import REGISTRY\n"}, [["pkg.sub", "pkg.sub.x"]]),  # a name of __init__
    ({"pkg/__init__.py": "", "pkg/a.py": "import os\nfrom torch import nn\n"}, []),  # outside the package
])
def test_the_circle_finder_sees_lazy_and_package_imports(tmp_path: Path, files: dict, expected: list) -> None:
    assert import_cycles(import_graph(_write(tmp_path, files))) == expected


# -- layers -------------------------------------------------------------------------------------

FORBIDDEN: dict[str, tuple[str, ...]] = {
    # the math: pure tensor math, below everything (DESIGN.md: no modules walked, no IO)
    "fusion": ("algebra", "semantics", "families", "checks", "io", "pipeline", "api", "cli", "verify",
               "inspection", "diff", "render", "batch", "bench", "export", "html_report"),
    "algebra": ("semantics", "families", "checks", "io", "pipeline", "api", "cli", "verify", "inspection",
                "diff", "render", "batch", "bench", "export", "html_report"),
    "semantics": ("families", "checks", "io", "pipeline", "api", "cli", "verify", "inspection", "diff",
                  "render", "batch", "bench", "export", "html_report"),
    # reading and writing files knows nothing of what is in them
    "io": ("fusion", "algebra", "semantics", "families", "checks", "pipeline", "api", "cli", "verify",
           "inspection", "diff", "render", "batch", "bench", "export", "html_report"),
    # the stages never call up into the faces over them
    "pipeline": ("api", "cli", "render", "html_report", "batch", "bench", "export", "diff.files"),
    # the CLI is a face over the API: no stage, no family, no math of its own
    "cli": ("pipeline", "families", "fusion", "algebra", "semantics"),
}
"""Layer (a module or package under ``repvgg_cli``) -> what no module of it may import, wherever the
import stands (module level, lazy, ``TYPE_CHECKING``): the math (fusion, algebra, semantics)
imports only itself and ``errors``; ``io`` no content, stage, API or CLI; ``pipeline`` no face
over it (API, CLI, renderers, batch/bench/export, ``diff.files`` which calls the API); the CLI
goes through the API (no ``pipeline``, ``families`` or math module; it builds ``Tolerance``, a
value of ``checks.tolerance``, from its flags)."""


def _inside(module: str, layer: str, root: str) -> bool:
    name = f"{root}.{layer}"
    return module == name or module.startswith(name + ".")


def layer_violations(graph: dict[str, dict[str, int]], forbidden: dict[str, tuple[str, ...]],
                     root: str) -> list[str]:
    """``module:line imports target`` for every import a layer must not make."""
    found = []
    for module, targets in sorted(graph.items()):
        for layer, banned in forbidden.items():
            if not _inside(module, layer, root):
                continue
            for target, line in sorted(targets.items()):
                if any(_inside(target, other, root) for other in banned):
                    found.append(f"{module}:{line} imports {target} (layer {layer} must not import {', '.join(banned)})")
    return found


def test_layers() -> None:
    graph = import_graph(PACKAGE)
    for layer in FORBIDDEN:
        assert any(_inside(m, layer, "repvgg_cli") for m in graph), f"no module of layer {layer}: update FORBIDDEN"
    violations = layer_violations(graph, FORBIDDEN, "repvgg_cli")
    assert not violations, "\n".join(violations)


def test_a_layer_violation_is_reported(tmp_path: Path) -> None:
    graph = import_graph(_write(tmp_path, {
        "pkg/__init__.py": "", "pkg/io/__init__.py": "", "pkg/pipeline/__init__.py": "",
        "pkg/io/read.py": "def f():\n    from ..pipeline import run\n",
    }))
    assert layer_violations(graph, {"io": ("pipeline",)}, "pkg") == [
        "pkg.io.read:2 imports pkg.pipeline (layer io must not import pipeline)"]
    assert layer_violations(graph, {"pipeline": ("io",)}, "pkg") == []


def test_no_reference_networks_and_no_conversion_shim_in_the_package() -> None:
    """The reference networks live in tests/zoo.py; the pipeline and the API replaced convert.py."""
    assert not (PACKAGE / "zoo.py").exists() and not (PACKAGE / "convert.py").exists()
    root = PACKAGE.parent
    gone = [f"{PACKAGE.name}.{name}" for name in ("zoo", "convert")]  # built here, so this file does not match
    files = [*root.glob("*.md"), *(p for d in ("repvgg_cli", "tests", "scripts", "benchmarks")
                                   for p in (root / d).rglob("*.py"))]
    mentions = [f"{path.relative_to(root)}: {name}" for path in files for name in gone
                if re.search(rf"\b{re.escape(name)}\b(?!_)", path.read_text(encoding="utf-8"))]
    assert not mentions, mentions
