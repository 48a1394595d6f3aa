"""The package's layout rules (issues #14 and #25), read from the source's import statements.

* no import circle between modules (lazy imports inside functions count: they
  hide a circle, they do not remove it);
* ``errors`` imports nothing of ours; ``profiling`` imports nothing from
  ``fragment``; no core package (``profiling``, ``fragment``, ``errors``)
  imports ``judge``, ``defaults``, ``metrics``, ``reference``, ``bench``,
  ``nodes``, the demo or the command line;
* the outer folders (the demo, ``bench``, ``nodes``, the command line) import
  the core and the judge, never one another, except the command line, which
  runs the demo and the benches;
* ``judge`` imports none of the outer folders, and only ``nodes`` imports
  ``judge.comfy`` (the judge inside ComfyUI, which imports ComfyUI);
* the default prompt and the ``thresholds.yaml`` path are defined only in
  ``defaults.py``;
* no private name (``_x``) is imported from another module.

Each rule is a function over the parsed import graph (or the parsed
definitions) that returns its violations, one line each naming the importer
and the imported, so the tests below can run it on the tree and on a tree
with a planted violation.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = "prompt_fragments"
SKIP = {"tests", "tools", "scripts", ".venv", "build", "workflows", "outputs"}
CORE = ("errors", "profiling", "fragment")
# What the core must never import: everything above it.
ABOVE_CORE = ("judge", "defaults", "metrics", "reference", "bench", "nodes", "demo", "cli", "cli_library", "__main__")
# The outer folders, by the top-level name of their modules (the command line is three root modules;
# ``cli_options`` is a leaf of option types that any of them may use, like ``errors``).
OUTER = {"demo": "demo", "bench": "bench", "nodes": "nodes", "cli": "cli", "cli_library": "cli", "__main__": "cli"}
ALLOWED_OUTER = {("cli", "demo"), ("cli", "bench")}  # the command line runs the demo and the benches
DEFAULTS_MODULE = f"{PKG}.defaults"
DEFAULT_NAMES = ("DEFAULT_PROMPT", "DEFAULT_THRESHOLDS")
THRESHOLDS_FILE = "thresholds.yaml"
COMFY_JUDGE = f"{PKG}.judge.comfy"

Graph = dict[str, list[tuple[str, list[str]]]]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PKG, *parts])


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SKIP or any(p.startswith(".") or p.endswith(".egg-info") for p in rel.parts):
            continue
        found[_module_name(path)] = path
    return found


def _imports(name: str, path: Path, modules: set[str]) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) for every ``from``/``import`` of ours in ``path``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith(PKG):
                continue
            names = [a.name for a in node.names]
            for n in names:  # 'from pkg import module' imports the module
                if f"{target}.{n}" in modules:
                    out.append((f"{target}.{n}", []))
            out.append((target, [n for n in names if f"{target}.{n}" not in modules]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names if a.name.startswith(PKG + "."))
    return out


def _defined_defaults(path: Path) -> list[str]:
    """What ``path`` defines of the pack's defaults: an assignment to a default's name, or the thresholds file's name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        found += [f"assigns {t.id} (line {node.lineno})" for t in targets if isinstance(t, ast.Name) and t.id in DEFAULT_NAMES]
        if isinstance(node, ast.Constant) and node.value == THRESHOLDS_FILE:
            found.append(f"spells {THRESHOLDS_FILE!r} (line {node.lineno})")
    return found


@pytest.fixture(scope="module")
def graph() -> Graph:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


@pytest.fixture(scope="module")
def definitions() -> dict[str, list[str]]:
    return {name: _defined_defaults(path) for name, path in _modules().items()}


def _edges(graph: Graph) -> dict[str, set[str]]:
    # Importing a.b.c runs a/__init__ and a/b/__init__ too, but those are docstring-only here; the
    # edge that matters is to the module itself (a package __init__ that imports is kept as a node).
    return {m: {t for t, _ in imps if t in graph and t != m} for m, imps in graph.items()}


def _top(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


# --------------------------------------------------------------------------- the rules


def import_circles(graph: Graph) -> list[str]:
    """The first import circle found, as ``a -> b -> a`` (empty: none)."""
    edges = _edges(graph)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return ["import circle: " + " -> ".join(cycle)]
    return []


def core_imports_upward(graph: Graph) -> list[str]:
    """The core imports nothing above it; ``profiling`` not ``fragment``; ``errors`` nothing of ours."""
    bad = []
    for m, imps in graph.items():
        top = _top(m)
        for target, _ in imps:
            other = _top(target)
            if top in CORE and other in ABOVE_CORE:
                bad.append(f"{m} imports {target} (the core imports nothing above it)")
            if top == "profiling" and other == "fragment":
                bad.append(f"{m} imports {target} (profiling imports nothing from fragment)")
            if top == "errors" and target != m:
                bad.append(f"{m} imports {target} (errors imports nothing of ours)")
    return bad


def outer_cross_imports(graph: Graph) -> list[str]:
    """The demo, ``bench``, ``nodes`` and the command line import one another only where ``ALLOWED_OUTER`` says."""
    bad = []
    for m, imps in graph.items():
        mine = OUTER.get(_top(m))
        for target, _ in imps:
            theirs = OUTER.get(_top(target))
            if mine and theirs and mine != theirs and (mine, theirs) not in ALLOWED_OUTER:
                bad.append(f"{m} imports {target} ({mine} and {theirs} import the core and the judge, "
                           "never each other; only the command line runs the demo and the benches)")
    return bad


def judge_imports_outward(graph: Graph) -> list[str]:
    """The judge, used by the demo, ``bench`` and ``nodes``, imports none of them (nor the command line)."""
    return [f"{m} imports {target} (the judge imports no {OUTER[_top(target)]})" for m, imps in graph.items()
            if _top(m) == "judge" for target, _ in imps if _top(target) in OUTER]


def comfy_judge_outside_nodes(graph: Graph) -> list[str]:
    """Only ``nodes`` imports the judge inside ComfyUI (``judge.comfy`` imports ComfyUI; nothing else may need it)."""
    return [f"{m} imports {target} (only nodes import the ComfyUI judge)" for m, imps in graph.items()
            if _top(m) != "nodes" and m != COMFY_JUDGE for target, _ in imps if target == COMFY_JUDGE]


def private_names_across_modules(graph: Graph) -> list[str]:
    """No ``_private`` name is imported from another module."""
    return [f"{m} imports {n} from {t}" for m, imps in graph.items() for t, names in imps for n in names
            if n.startswith("_") and not n.startswith("__")]


def defaults_defined_elsewhere(definitions: dict[str, list[str]]) -> list[str]:
    """The default prompt and the thresholds path are defined in ``defaults.py`` and nowhere else."""
    return [f"{m} {what}: the defaults live in {DEFAULTS_MODULE}; import them from there"
            for m, found in sorted(definitions.items()) if m != DEFAULTS_MODULE for what in found]


GRAPH_RULES: dict[str, Callable[[Graph], list[str]]] = {
    "import_circles": import_circles,
    "core_imports_upward": core_imports_upward,
    "outer_cross_imports": outer_cross_imports,
    "judge_imports_outward": judge_imports_outward,
    "comfy_judge_outside_nodes": comfy_judge_outside_nodes,
    "private_names_across_modules": private_names_across_modules,
}


# --------------------------------------------------------------------------- the tree keeps them


def test_the_walk_sees_the_package(graph, definitions) -> None:
    assert f"{PKG}.fragment.build" in graph and f"{PKG}.errors" in graph and len(graph) > 60
    assert {f"{PKG}.judge.gate", f"{PKG}.judge.comfy", f"{PKG}.demo", f"{PKG}.cli", f"{PKG}.nodes.fragment_extractor",
            f"{PKG}.bench.batch"} <= set(graph)
    # the defaults themselves are seen where they are defined: the rule below has something to find
    assert sorted(d.split(" (")[0] for d in definitions[DEFAULTS_MODULE]) == [
        "assigns DEFAULT_PROMPT", "assigns DEFAULT_THRESHOLDS", f"spells {THRESHOLDS_FILE!r}"]


@pytest.mark.parametrize("rule", sorted(GRAPH_RULES))
def test_the_tree_keeps_the_rule(graph, rule: str) -> None:
    bad = GRAPH_RULES[rule](graph)
    assert not bad, "\n".join(bad)


def test_the_defaults_are_defined_once(definitions) -> None:
    bad = defaults_defined_elsewhere(definitions)
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------- each rule fires on a planted violation


def _plant(graph: Graph, tmp_path: Path, name: str, source: str) -> Graph:
    """``graph`` with one more module, ``name``, whose source is ``source`` (parsed as the walk parses the tree)."""
    path = tmp_path / (name.rpartition(".")[2] + ".py")
    path.write_text(source)
    return {**graph, name: _imports(name, path, set(graph) | {name})}


# rule -> (planted module, its source, what the rule must report it importing); lazy imports count too
PLANTED = {
    "core_imports_upward": ("fragment.planted", "from ..judge.gate import gate_failures\nimport prompt_fragments.cli\n"
                            "def f():\n    from ..defaults import DEFAULT_PROMPT\n", ["judge.gate", "cli", "defaults"]),
    "outer_cross_imports": ("bench.planted", "from .. import demo\ndef f():\n    from ..nodes.fragment_loader import x\n",
                            ["demo", "nodes.fragment_loader"]),
    "judge_imports_outward": ("judge.planted", "from ..nodes.fragment_loader import x\ndef f():\n    from ..bench import y\n"
                              "    from ..demo import run_demo\n", ["nodes.fragment_loader", "bench", "demo"]),
    "comfy_judge_outside_nodes": ("demo", "def f():\n    from .judge.comfy import ComfyJudge\n", ["judge.comfy"]),
}


@pytest.mark.parametrize("rule", sorted(PLANTED))
def test_each_rule_fires_on_a_planted_import(graph, tmp_path: Path, rule: str) -> None:
    name, source, imported = PLANTED[rule]
    bad = GRAPH_RULES[rule](_plant(graph, tmp_path, f"{PKG}.{name}", source))
    # every planted import, and nothing else (the tree itself keeps the rule), named importer first
    assert sorted(line.split(" (")[0] for line in bad) == sorted(f"{PKG}.{name} imports {PKG}.{t}" for t in imported)


def test_the_command_line_may_run_the_demo_and_the_benches(graph, tmp_path: Path) -> None:
    # the one allowed crossing, and the walk really sees it in the tree
    assert f"{PKG}.demo" in {t for t, _ in graph[f"{PKG}.cli"]}
    planted = _plant(graph, tmp_path, f"{PKG}.cli", "from .demo import run_demo\nfrom .bench.batch import bench_batch\n")
    assert outer_cross_imports(planted) == []
    planted = _plant(graph, tmp_path, f"{PKG}.demo", "from .bench.batch import bench_batch\n")
    assert outer_cross_imports(planted) == [
        f"{PKG}.demo imports {PKG}.bench.batch (demo and bench import the core and the judge, never each other; "
        "only the command line runs the demo and the benches)"]
    planted = _plant(graph, tmp_path, f"{PKG}.cli_library", "from .nodes.fragment_loader import x\n")  # but not the nodes
    assert [line.split(" (")[0] for line in outer_cross_imports(planted)] == [
        f"{PKG}.cli_library imports {PKG}.nodes.fragment_loader"]


def test_an_import_circle_and_a_private_name_are_caught(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import _y\n")
    modules = {f"{PKG}.fragment.a", f"{PKG}.fragment.b"}
    fake = {
        f"{PKG}.fragment.a": _imports(f"{PKG}.fragment.a", tmp_path / "a.py", modules),
        f"{PKG}.fragment.b": _imports(f"{PKG}.fragment.b", tmp_path / "b.py", modules),
    }
    assert _edges(fake) == {f"{PKG}.fragment.a": {f"{PKG}.fragment.b"}, f"{PKG}.fragment.b": {f"{PKG}.fragment.a"}}
    assert import_circles(fake) == [f"import circle: {PKG}.fragment.a -> {PKG}.fragment.b -> {PKG}.fragment.a"]
    assert private_names_across_modules(fake) == [f"{PKG}.fragment.b imports _y from {PKG}.fragment.a"]
    (tmp_path / "c.py").write_text("from ..metrics.quality import ssim\n")
    up = {f"{PKG}.profiling.c": _imports(f"{PKG}.profiling.c", tmp_path / "c.py", set())}
    assert core_imports_upward(up) == [f"{PKG}.profiling.c imports {PKG}.metrics.quality (the core imports nothing above it)"]


@pytest.mark.parametrize("source, expected", [
    ('DEFAULT_PROMPT = "a cat"\n', "assigns DEFAULT_PROMPT (line 1)"),
    ('from pathlib import Path\n\nDEFAULT_THRESHOLDS: Path = Path("x")\n', "assigns DEFAULT_THRESHOLDS (line 3)"),
    ('from pathlib import Path\nLIMITS = Path(__file__).parent / "thresholds.yaml"\n', "spells 'thresholds.yaml' (line 2)"),
    ('def gate(path="thresholds.yaml"):\n    """Reads thresholds.yaml (a docstring may name it)."""\n', "spells 'thresholds.yaml' (line 1)"),
])
def test_a_default_defined_outside_defaults_is_caught(definitions, tmp_path: Path, source: str, expected: str) -> None:
    path = tmp_path / "planted.py"
    path.write_text(source)
    planted = {**definitions, f"{PKG}.bench.planted": _defined_defaults(path)}
    assert defaults_defined_elsewhere(planted) == [
        f"{PKG}.bench.planted {expected}: the defaults live in {DEFAULTS_MODULE}; import them from there"]
    # the same source inside defaults.py is where it belongs
    assert defaults_defined_elsewhere({DEFAULTS_MODULE: _defined_defaults(path)}) == []
