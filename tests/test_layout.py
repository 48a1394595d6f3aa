"""The package's layout rules (issue #14), read from the source's import statements.

* no import circle between modules (lazy imports inside functions count: they
  hide a circle, they do not remove it);
* ``errors`` imports nothing of ours; ``profiling`` imports nothing from
  ``fragment``; no core package (``profiling``, ``fragment``, ``errors``)
  imports ``metrics``, ``reference`` or ``bench``;
* no private name (``_x``) is imported from another module.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = "prompt_fragments"
SKIP = {"tests", "tools", "scripts", ".venv", "build", "workflows", "outputs"}
CORE = ("errors", "profiling", "fragment")


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


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, list[str]]]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _edges(graph: dict[str, list[tuple[str, list[str]]]]) -> dict[str, set[str]]:
    # Importing a.b.c runs a/__init__ and a/b/__init__ too, but those are docstring-only here; the
    # edge that matters is to the module itself (a package __init__ that imports is kept as a node).
    return {m: {t for t, _ in imps if t in graph and t != m} for m, imps in graph.items()}


def test_the_walk_sees_the_package(graph) -> None:
    assert f"{PKG}.fragment.build" in graph and f"{PKG}.errors" in graph and len(graph) > 60


def test_no_import_circle(graph) -> None:
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
            pytest.fail("import circle: " + " -> ".join(cycle))


def test_core_never_imports_upward(graph) -> None:
    bad = []
    for m, imps in graph.items():
        top = m.split(".")[1] if "." in m else ""
        for target, _ in imps:
            other = target.split(".")[1] if "." in target else ""
            if top in CORE and other in ("metrics", "reference", "bench", "nodes", "demo", "cli", "cli_library"):
                bad.append(f"{m} imports {target}")
            if top == "profiling" and other == "fragment":
                bad.append(f"{m} imports {target}")
            if top == "errors" and target != m:
                bad.append(f"{m} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_private_name_crosses_modules(graph) -> None:
    bad = [f"{m} imports {n} from {t}" for m, imps in graph.items() for t, names in imps for n in names
           if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_the_rules_catch_what_they_name(tmp_path: Path) -> None:
    # The checks above pass on a clean tree; show that they see a circle and an upward import when one exists.
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import _y\n")
    modules = {f"{PKG}.fragment.a", f"{PKG}.fragment.b"}
    fake = {
        f"{PKG}.fragment.a": _imports(f"{PKG}.fragment.a", tmp_path / "a.py", modules),
        f"{PKG}.fragment.b": _imports(f"{PKG}.fragment.b", tmp_path / "b.py", modules),
    }
    assert _edges(fake) == {f"{PKG}.fragment.a": {f"{PKG}.fragment.b"}, f"{PKG}.fragment.b": {f"{PKG}.fragment.a"}}
    with pytest.raises(pytest.fail.Exception, match="import circle"):
        test_no_import_circle(fake)
    with pytest.raises(AssertionError, match="imports _y"):
        test_no_private_name_crosses_modules(fake)
    (tmp_path / "c.py").write_text("from ..metrics.quality import ssim\n")
    up = {f"{PKG}.profiling.c": _imports(f"{PKG}.profiling.c", tmp_path / "c.py", set())}
    with pytest.raises(AssertionError, match="imports prompt_fragments.metrics.quality"):
        test_core_never_imports_upward(up)
