"""Extraction: profile in, fragment on disk out (score, then select, then build, then record)."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from ..profiling.dataset import ProfileData
from ..profiling.scoring import ScoreWeights, rank_stability, score_heads, unstable_heads
from ..profiling.ff_profiler import weight_norm_scores
from ..profiling.step_change import reuse_steps_for_count
from .errors import FragmentError
from .ff_pruning import select_ff_channels
from .schedule import Schedule
from .selection import select_heads
from .speed import with_schedule
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
    # Issue #7 levers, each off by default.
    kv_fold: bool = False  # fold attn2 K/V for the context given to extract_fragment
    kv_fold_keep_weights: bool = False  # keep to_k/to_v to recompute for other contexts (no bytes saved)
    ff_ratio: float = 0.0  # fraction of feed-forward hidden channels to remove (per block)
    precision: str = "none"  # "none", "fp8" or "int8"
    precision_ratio: float = 1.0  # share of retained Linear parameters stored in that precision
    # Issue #8: share of the profiled steps on which the deep blocks replay their last output (0: off).
    step_reuse: float = 0.0

    def lever_kwargs(self) -> dict[str, Any]:
        """Checked keyword arguments for the levers beyond heads."""
        if not 0.0 <= self.ff_ratio < 1.0:
            raise FragmentError(f"ff_ratio: expected a fraction in [0, 1), found {self.ff_ratio}")
        if self.precision not in ("none", "fp8", "int8"):
            raise FragmentError(f"precision: expected 'none', 'fp8' or 'int8', found {self.precision!r}")
        if not 0.0 <= self.precision_ratio <= 1.0:
            raise FragmentError(f"precision_ratio: expected a fraction in [0, 1], found {self.precision_ratio}")
        return {"precision": None if self.precision == "none" else self.precision, "precision_ratio": self.precision_ratio,
                "kv_keep_weights": self.kv_fold_keep_weights}

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
    kv_context: torch.Tensor | None = None,
    ff_scores: Mapping[str, torch.Tensor] | None = None,
    step_changes: Sequence[float | None] | None = None,
    step_timesteps: Sequence[float] | None = None,
) -> tuple[Fragment, Path | None]:
    """Score the profiled heads, select, build the fragment and (when ``directory`` is given) save it.

    ``kv_context`` (``[B, T, C]``: the cond and uncond rows the sampler will
    pass) is required when ``settings.kv_fold``.  ``ff_scores`` come from
    ``FFProfiler.scores()``; without them a feed-forward cut ranks channels by
    weight norms, and the manifest says so.  ``step_changes`` come from
    ``StepChangeProbe.changes()``; ``settings.step_reuse`` > 0 stores a reuse
    schedule for that share of the profiled steps, the steps where the deep
    features changed least (``profiling.step_change.reuse_steps_for_count``),
    matched at run time by ``step_timesteps`` (``StepChangeProbe.timesteps()``).

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
    levers = settings.lever_kwargs()
    if settings.kv_fold and kv_context is None:
        raise FragmentError(f"fragment {name!r}: kv_fold needs the conditioning context (cond and uncond) to fold, found none")
    ff_selection, ff_info = None, None
    if settings.ff_ratio > 0:
        ff_info = {"method": "activation_energy" if ff_scores is not None else "weight_norm"}
        ff_selection = select_ff_channels(ff_scores if ff_scores is not None else weight_norm_scores(model), ratio=settings.ff_ratio)
    fragment = build_fragment(model, selection, base=base, name=name, profiling=profiling, low_rank=dict(settings.low_rank),
                              kv_context=kv_context if settings.kv_fold else None, ff_selection=ff_selection, ff_info=ff_info,
                              **levers)
    if settings.step_reuse > 0:
        fragment = with_schedule(fragment, reuse_schedule(name, step_changes, settings.step_reuse, timesteps=step_timesteps))
    path = save_fragment(fragment, directory, overwrite=overwrite) if directory is not None else None
    log.info("fragment %s: %d of %d heads removed", name, selection.removed_heads, selection.total_heads)
    return fragment, path


def reuse_schedule(name: str, changes: Sequence[float | None] | None, share: float, shallow: int = 1,
                   timesteps: Sequence[float] | None = None) -> Schedule:
    """A step-reuse schedule for ``share`` of the steps, from the profiled per-step changes.

    ``timesteps`` (the profiled run's, one per step) let the loaded schedule
    follow the noise level when the sampler runs another step count.  This
    path has no quality judge (ComfyUI has no analyzer for arbitrary prompts):
    the manifest says the schedule is ungated; ``prompt-fragments bench batch``
    gates it on the reference model.

    >>> reuse_schedule("dog", [None, 0.5, 0.1, 0.1, 0.1, 0.05], 0.34).reuse_steps
    (2, 3)
    """
    if not 0.0 < share < 1.0:
        raise FragmentError(f"fragment {name!r}: step_reuse: expected a share of steps in (0, 1), found {share}")
    if not changes or len(changes) < 3:
        raise FragmentError(f"fragment {name!r}: step_reuse needs per-step changes of at least 3 profiled steps, "
                            f"found {len(changes or [])}; profile a full sampler run first")
    if timesteps is not None and len(timesteps) != len(changes):
        raise FragmentError(f"fragment {name!r}: step_reuse: expected one timestep per profiled step ({len(changes)}), "
                            f"found {len(timesteps)}")
    steps, budget = reuse_steps_for_count(list(changes), int(share * len(changes)))
    return Schedule(total_steps=len(changes), reuse_steps=tuple(steps), shallow=shallow,
                    step_timesteps=tuple(float(t) for t in timesteps or ()),
                    calibration={"method": "drift_budget", "share": share, "budget": round(budget, 5),
                                 "quality_gate": "not run: no judge in this path (see prompt-fragments bench batch)",
                                 "change_per_step": [None if c is None else round(c, 5) for c in changes]})
