"""Every worked example in the core's docstrings runs and prints what it says."""
from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "prompt_fragments.fragment.batching",
    "prompt_fragments.fragment.compat",
    "prompt_fragments.fragment.errors",
    "prompt_fragments.fragment.hashing",
    "prompt_fragments.fragment.lowrank",
    "prompt_fragments.fragment.manifest",
    "prompt_fragments.fragment.masking",
    "prompt_fragments.fragment.pruning",
    "prompt_fragments.fragment.selection",
    "prompt_fragments.fragment.store",
    "prompt_fragments.profiling.discovery",
    "prompt_fragments.profiling.profiler",
    "prompt_fragments.profiling.scoring",
    "prompt_fragments.profiling.heatmap",
    "prompt_fragments.profiling.anatomy",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
