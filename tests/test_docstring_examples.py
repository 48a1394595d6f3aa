"""Every worked example in the core's docstrings runs and prints what it says."""
from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "prompt_fragments.fragment.batching",
    "prompt_fragments.bench.weights",
    "prompt_fragments.fragment.surgery.feed_forward",
    "prompt_fragments.fragment.surgery.kv_fold",
    "prompt_fragments.fragment.surgery.levers",
    "prompt_fragments.fragment.surgery.precision",
    "prompt_fragments.profiling.ff_profiler",
    "prompt_fragments.fragment.compat",
    "prompt_fragments.errors",
    "prompt_fragments.fragment.format.hashing",
    "prompt_fragments.fragment.surgery.lowrank",
    "prompt_fragments.fragment.format.manifest",
    "prompt_fragments.fragment.surgery.masking",
    "prompt_fragments.fragment.surgery.heads",
    "prompt_fragments.fragment.surgery.selection",
    "prompt_fragments.fragment.format.store",
    "prompt_fragments.fragment.library.fingerprint",
    "prompt_fragments.fragment.format.untrusted",
    "prompt_fragments.fragment.library.index",
    "prompt_fragments.fragment.library.auto_mode",
    "prompt_fragments.fragment.library.union",
    "prompt_fragments.fragment.library.sharing",
    "prompt_fragments.metrics.reuse",
    "prompt_fragments.profiling.discovery",
    "prompt_fragments.profiling.profiler",
    "prompt_fragments.profiling.scoring",
    "prompt_fragments.profiling.heatmap",
    "prompt_fragments.profiling.hooks",
    "prompt_fragments.profiling.anatomy",
    "prompt_fragments.fragment.refine",
    "prompt_fragments.fragment.format.measurements",
    "prompt_fragments.metrics.performance",
    "prompt_fragments.metrics.memory",
    "prompt_fragments.metrics.lpips_weights",
    "prompt_fragments.metrics.image_similarity",
    "prompt_fragments.metrics.clip_score",
    "prompt_fragments.metrics.quality",
    "prompt_fragments.metrics.hypotheses",
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
    "prompt_fragments.fragment.schedule.state",
    "prompt_fragments.fragment.schedule.step_reuse",
    "prompt_fragments.fragment.schedule.timestep_heads",
    "prompt_fragments.fragment.schedule.apply",
    "prompt_fragments.fragment.extract",
    "prompt_fragments.bench.batch",
    "prompt_fragments.bench.random_target",
    "prompt_fragments.profiling.step_change",
    "prompt_fragments.profiling.session",
    "prompt_fragments.bench.reference_target",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
