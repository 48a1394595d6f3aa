"""Every worked example in the core's docstrings runs and prints what it says."""
from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "prompt_fragments.fragment.batching",
    "prompt_fragments.fragment.bench",
    "prompt_fragments.fragment.ff_pruning",
    "prompt_fragments.fragment.kv_fold",
    "prompt_fragments.fragment.levers",
    "prompt_fragments.fragment.precision",
    "prompt_fragments.profiling.ff_profiler",
    "prompt_fragments.fragment.compat",
    "prompt_fragments.fragment.errors",
    "prompt_fragments.fragment.hashing",
    "prompt_fragments.fragment.lowrank",
    "prompt_fragments.fragment.manifest",
    "prompt_fragments.fragment.masking",
    "prompt_fragments.fragment.pruning",
    "prompt_fragments.fragment.selection",
    "prompt_fragments.fragment.store",
    "prompt_fragments.fragment.fingerprint",
    "prompt_fragments.fragment.untrusted",
    "prompt_fragments.fragment.library",
    "prompt_fragments.fragment.auto_mode",
    "prompt_fragments.fragment.union",
    "prompt_fragments.fragment.sharing",
    "prompt_fragments.metrics.reuse",
    "prompt_fragments.profiling.discovery",
    "prompt_fragments.profiling.profiler",
    "prompt_fragments.profiling.scoring",
    "prompt_fragments.profiling.heatmap",
    "prompt_fragments.profiling.hooks",
    "prompt_fragments.profiling.anatomy",
    "prompt_fragments.fragment.refine",
    "prompt_fragments.fragment.measurements",
    "prompt_fragments.metrics.performance",
    "prompt_fragments.metrics.memory",
    "prompt_fragments.metrics.lpips_weights",
    "prompt_fragments.metrics.image_similarity",
    "prompt_fragments.metrics.clip_score",
    "prompt_fragments.metrics.quality",
    "prompt_fragments.metrics.hypotheses",
    "prompt_fragments.metrics.limits",
    "prompt_fragments.metrics.regression",
    "prompt_fragments.metrics.plots",
    "prompt_fragments.metrics.report",
    "prompt_fragments.reference.shapes",
    "prompt_fragments.reference.captions",
    "prompt_fragments.reference.analyzer",
    "prompt_fragments.reference.evaluation",
    "prompt_fragments.reference.model",
    "prompt_fragments.reference.sampling",
    "prompt_fragments.reference.measure",
    "prompt_fragments.reference.training",
    "prompt_fragments.reference.lever_curves",
    "prompt_fragments.fragment.schedule",
    "prompt_fragments.fragment.step_reuse",
    "prompt_fragments.fragment.timestep_heads",
    "prompt_fragments.fragment.speed",
    "prompt_fragments.fragment.extract",
    "prompt_fragments.fragment.batch_bench",
    "prompt_fragments.fragment.random_sd_target",
    "prompt_fragments.profiling.step_change",
    "prompt_fragments.profiling.session",
    "prompt_fragments.reference.bench_target",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
