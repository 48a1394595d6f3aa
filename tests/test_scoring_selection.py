"""Composite scores, rank stability and head selection on plain data with known answers."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from prompt_fragments.errors import PruningError
from prompt_fragments.fragment.surgery.selection import select_heads, validate_plan
from prompt_fragments.profiling.dataset import ModuleStats, ProfileData
from prompt_fragments.profiling.discovery import AttentionSite
from prompt_fragments.profiling.scoring import ScoreWeights, rank_stability, score_heads, unstable_heads


def _stats(path: str, per_sample: list[list[float]], entropy: list[float] | None = None) -> ModuleStats:
    heads = len(per_sample[0])
    site = AttentionSite(path, "self", heads, 2, 4, 4, 4)
    stats = ModuleStats.empty(site, buckets=1)
    for sample, energies in enumerate(per_sample):
        # Two tokens per sample with the same energy: mean = energies, zero spread within a sample.
        stats.add_energy(0, sample, torch.tensor([energies, energies]))
    if entropy is not None:
        stats.add_entropy(0, torch.tensor([entropy]))
    return stats


def _profile(*stats: ModuleStats) -> ProfileData:
    return ProfileData(modules={s.site.path: s for s in stats}, buckets=1)


def test_energy_only_score_is_energy_relative_to_module_mean() -> None:
    data = _profile(_stats("a", [[1.0, 3.0]]))
    score = score_heads(data, ScoreWeights(energy=1.0, spread=0.0, focus=0.0))["a"]
    assert_close(score, torch.tensor([0.5, 1.5]))


def test_focus_raises_the_score_of_low_entropy_heads() -> None:
    data = _profile(_stats("a", [[2.0, 2.0]], entropy=[0.9, 0.1]))
    score = score_heads(data, ScoreWeights(energy=1.0, spread=0.0, focus=1.0))["a"]
    assert score[1] > score[0]


def test_rank_stability_known_answers() -> None:
    stable = _stats("stable", [[1.0, 2.0, 3.0], [1.5, 2.5, 3.5]])
    flipping = _stats("flip", [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    result = rank_stability(_profile(stable, flipping))
    assert result["stable"]["spearman"] == pytest.approx(1.0)
    assert_close(result["stable"]["rank_std"], torch.zeros(3))
    # pooled energies are equal for "flip": its heads swap ends from one seed to the next
    assert_close(result["flip"]["rank_std"], torch.tensor([0.5, 0.0, 0.5]))
    assert unstable_heads(result, 0.25) == {"stable": [], "flip": [0, 2]}


def test_global_ratio_min_keep_and_determinism() -> None:
    scores = {"a": torch.tensor([0.1, 0.2, 0.3]), "b": torch.tensor([5.0, 6.0])}
    sel = select_heads(scores, ratio=0.8)  # asks for 4 of 5: min_keep=1 per module stops at 3
    assert sel.kept == {"a": [2], "b": [1]}
    assert sel.removed_heads == 3 and sel.removed("a") == [0, 1]
    assert select_heads(scores, ratio=0.8).kept == sel.kept


def test_per_layer_ratio_treats_modules_alike() -> None:
    scores = {"a": torch.tensor([0.1, 0.2, 0.3, 0.4]), "b": torch.tensor([50.0, 60.0, 70.0, 80.0])}
    assert select_heads(scores, ratio=0.5, scope="global").kept == {"a": [3], "b": [1, 2, 3]}
    assert select_heads(scores, ratio=0.5, scope="per_layer").kept == {"a": [2, 3], "b": [2, 3]}


def test_percentile_safety_margin_and_protection() -> None:
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])}
    assert select_heads(scores, percentile=50).kept == {"a": [2, 3, 4]}  # strictly below the median
    assert select_heads(scores, percentile=50, safety_margin_heads=1).kept == {"a": [1, 2, 3, 4]}
    assert select_heads(scores, percentile=50, protected={"a": [0]}).kept == {"a": [0, 2, 3, 4]}
    assert select_heads(scores, ratio=0.0).kept == {"a": [0, 1, 2, 3, 4]}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of ratio or percentile"),
        ({"ratio": 0.3, "percentile": 30}, "exactly one of ratio or percentile"),
        ({"ratio": 1.5}, r"expected ratio in \[0, 1.0\], found 1.5"),
        ({"ratio": 0.3, "scope": "layer"}, "expected scope 'global' or 'per_layer'"),
        ({"ratio": 0.3, "min_keep": 0}, "expected min_keep >= 1"),
    ],
)
def test_bad_selection_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(PruningError, match=message):
        select_heads({"a": torch.ones(2)}, **kwargs)


@pytest.mark.parametrize(
    "plan, message",
    [
        ({"m": [0, 9]}, r"m: expected head indices in \[0, 3\], found \[9\]"),
        ({"m": [1, 1]}, r"m: duplicate head indices \[1\]"),
        ({"m": []}, "m: expected at least 1 kept head"),
        ({"zz": [0]}, "zz: module not found"),
    ],
)
def test_validate_plan_names_module_and_values(plan: dict, message: str) -> None:
    with pytest.raises(PruningError, match=message):
        validate_plan(plan, {"m": 4})
