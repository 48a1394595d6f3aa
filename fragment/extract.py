"""Extraction: profile in, fragment on disk out (score, then select, then build, then record)."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch.nn as nn

from ..profiling.dataset import ProfileData
from ..profiling.scoring import ScoreWeights, rank_stability, score_heads, unstable_heads
from .errors import FragmentError
from .selection import select_heads
from .store import Fragment, build_fragment, save_fragment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractionSettings:
    """How to turn a profile into a fragment; every field is recorded in the manifest."""

    strategy: str = "ratio"  # "ratio" (fraction of heads removed) or "percentile" (score cut-off)
    amount: float = 0.3
    scope: str = "global"
    min_keep: int = 1
    safety_margin_heads: int = 0
    keep_unstable_heads: bool = True
    max_rank_std: float = 0.25
    weights: ScoreWeights = field(default_factory=ScoreWeights)
    low_rank: Mapping[str, float] = field(default_factory=dict)  # layer path -> energy to keep

    def selection_kwargs(self) -> dict[str, Any]:
        if self.strategy == "ratio":
            return {"ratio": self.amount}
        if self.strategy == "percentile":
            return {"percentile": self.amount}
        raise FragmentError(f"strategy: expected 'ratio' or 'percentile', found {self.strategy!r}")


def extract_fragment(
    profile: ProfileData,
    model: nn.Module,
    *,
    base: Mapping[str, Any],
    name: str,
    settings: ExtractionSettings = ExtractionSettings(),
    directory: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> tuple[Fragment, Path | None]:
    """Score the profiled heads, select, build the fragment and (when ``directory`` is given) save it.

    >>> frag, path = extract_fragment(profile, unet, base=describe_base(unet, "sd15"), name="dog",  # doctest: +SKIP
    ...                               settings=ExtractionSettings(amount=0.3), directory="models/fragments")
    """
    if profile.total_calls == 0:
        raise FragmentError(
            f"fragment {name!r}: the profile is empty (no model calls were recorded); run a sampler with the "
            "profiled MODEL before extracting"
        )
    stability = rank_stability(profile)
    protected = unstable_heads(stability, settings.max_rank_std) if settings.keep_unstable_heads else {}
    selection = select_heads(
        score_heads(profile, settings.weights),
        scope=settings.scope,
        min_keep=settings.min_keep,
        safety_margin_heads=settings.safety_margin_heads,
        protected=protected,
        **settings.selection_kwargs(),
    )
    spearman = [entry["spearman"] for entry in stability.values()]
    profiling = {
        **{k: v for k, v in profile.info.items() if isinstance(v, (str, int, float, bool, list, type(None)))},
        "samples": list(profile.samples),
        "seeds": [s for s in profile.samples if isinstance(s, int)],
        "steps_profiled": profile.total_calls,
        "calls_per_bucket": list(profile.calls_per_bucket),
        "timestep_buckets": profile.buckets,
        "method": "composite_score",
        "score_weights": settings.weights.to_dict(),
        "rank_stability_mean_spearman": sum(spearman) / len(spearman) if spearman else None,
        "unstable_heads_kept": sum(len(v) for v in protected.values()),
        "timestamp": int(time.time()),
    }
    fragment = build_fragment(model, selection, base=base, name=name, profiling=profiling, low_rank=dict(settings.low_rank))
    path = save_fragment(fragment, directory, overwrite=overwrite) if directory is not None else None
    log.info("fragment %s: %d of %d heads removed", name, selection.removed_heads, selection.total_heads)
    return fragment, path
