"""Every worked example in the package's docstrings runs and prints what it says."""
from __future__ import annotations

import doctest
import importlib
import pkgutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import prompt_fragments

# Which modules: every module and package found on disk under the package, so a
# module added (or moved into a new subpackage) is covered without editing this file.
# Skipped, by name, before anything is imported:
# - ``nodes`` (top level): its ``__init__`` imports ComfyUI's ``comfy`` and ``folder_paths``,
#   so no module under it imports without ComfyUI; test_node_docstring_examples runs
#   those examples inside a booted ComfyUI instead.
# - ``judge.comfy``: the judge inside ComfyUI imports ``comfy``; test_node_docstring_examples
#   runs its examples in the booted ComfyUI with the node modules.
# - ``__main__`` (any level): an entry point that runs the command line when imported.
# - ``tests``, ``tools``, ``scripts``: not part of the package (scripts run by path);
#   they have no ``__init__.py``, so the walk would not enter them anyway, but naming
#   them keeps them out if one ever gains one.
# Any other module that fails to import fails its test: an import error is never a skip.
SKIP_TOP_LEVEL = frozenset({"nodes", "tests", "tools", "scripts"})
SKIP_ANY_LEVEL = frozenset({"__main__"})
NEEDS_COMFYUI = ("judge.comfy",)  # module paths under the package, besides ``nodes``

# Modules that are not expected to move while fragment/ and profiling/ are reorganised.
SENTINELS = ("prompt_fragments.cli", "prompt_fragments.metrics.quality")
MIN_MODULES = 50


def _walk(folder: Path, prefix: str, top_level: bool) -> Iterator[str]:
    # pkgutil.walk_packages would import each subpackage to recurse into it (and so
    # import ``nodes``); listing the folders with iter_modules imports nothing.
    for info in sorted(pkgutil.iter_modules([str(folder)]), key=lambda i: i.name):
        if info.name in SKIP_ANY_LEVEL or (top_level and info.name in SKIP_TOP_LEVEL):
            continue
        name = prefix + info.name
        if name.split(".", 1)[-1] in NEEDS_COMFYUI:
            continue
        yield name
        if info.ispkg:
            yield from _walk(folder / info.name, name + ".", top_level=False)


def discover_modules() -> list[str]:
    """The package itself and every module under it that the rule above does not skip."""
    root = Path(prompt_fragments.__file__).resolve().parent
    return [prompt_fragments.__name__, *_walk(root, prompt_fragments.__name__ + ".", top_level=True)]


MODULES = discover_modules()


def test_the_walk_finds_the_package() -> None:
    # Guards against a walk that silently finds nothing (wrong folder, a broken rule),
    # which would leave every parametrized case below uncollected and the suite green.
    assert len(MODULES) >= MIN_MODULES, f"only {len(MODULES)} modules found: {MODULES}"
    assert set(SENTINELS) <= set(MODULES), f"missing {set(SENTINELS) - set(MODULES)}"
    # By its last name only, so it holds wherever the fragment/ reorganisation puts it.
    assert any(m.rsplit(".", 1)[-1] == "patching" for m in MODULES), "no *.patching module found"
    assert not any(m == "prompt_fragments.nodes" or m.startswith("prompt_fragments.nodes.") for m in MODULES)
    assert "prompt_fragments.judge.comfy" not in MODULES and "prompt_fragments.judge.gate" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_node_docstring_examples(comfyui_pack: ModuleType) -> None:
    # The same walk over ``nodes``, imported as ComfyUI imported the pack (under its
    # custom_nodes folder name), so the node modules are not loaded a second time.
    package = comfyui_pack.nodes
    names = list(_walk(Path(package.__file__).parent, package.__name__ + ".", top_level=False))
    assert f"{package.__name__}.profiler_loader" in names
    names += [f"{comfyui_pack.__name__}.{name}" for name in NEEDS_COMFYUI]
    failed = {}
    for name in names:
        result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
        if result.failed:
            failed[name] = result.failed
    assert not failed, f"docstring example(s) failed: {failed}"
