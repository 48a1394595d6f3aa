"""Extraction: profile in, fragment on disk out.

The pipeline is plain functions over plain data: ``score_profile`` (score),
``plan_levers`` (select), ``build.build_fragment`` (build), then the caller's judge
(``refine``, the bench's quality gate) and ``save_fragment`` (record).
``extract_fragment`` runs score, select, build and record; the node and the demo call it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ..errors import FragmentError
from ..profiling.dataset import ProfileData
from ..profiling.discovery import block_layout
from ..profiling.ff_profiler import weight_norm_scores
from ..profiling.scoring import rank_stability, score_heads, unstable_heads
from ..profiling.step_change import ReuseDepth, reuse_steps_for_count
from .build import build_fragment
from .calibration import (
    Budget, Calibration, Candidate, Judgement, Predictors, calibrate, candidate_ladder, goal_levers, low_bit_errors,
    precision_errors,
)
from .format.manifest import Fragment
from .format.measurements import record_measurements
from .format.store import save_fragment
from .schedule.apply import fragment_schedule, with_schedule
from .schedule.state import Schedule
from .settings import ExtractionSettings
from .surgery.feed_forward import FeedForwardLever
from .surgery.heads import HeadLever
from .surgery.kv_fold import KVFoldLever
from .surgery.lever import Lever
from .surgery.low_bit import LowBitLever
from .surgery.lowrank import LowRankLever
from .surgery.precision import PrecisionLever, retained_linears

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scores:
    """The score step's output: per-head scores, the rank stability behind them, and the heads it protects."""

    heads: dict[str, torch.Tensor]
    stability: dict[str, dict[str, Any]]
    protected: dict[str, list[int]]


def score_profile(profile: ProfileData, settings: ExtractionSettings = ExtractionSettings()) -> Scores:
    """The score step: per-head scores; heads whose rank moves across seeds are protected (when the settings say so).

    >>> scores = score_profile(profile)  # doctest: +SKIP
    >>> sorted(scores.heads)[:1]  # doctest: +SKIP
    ['down_blocks.1.attentions.0.transformer_blocks.0.attn1']
    """
    stability = rank_stability(profile)
    protected = unstable_heads(stability, settings.max_rank_std) if settings.keep_unstable_heads else {}
    return Scores(score_heads(profile, settings.weights), stability, protected)


def plan_levers(
    settings: ExtractionSettings,
    head_scores: Mapping[str, torch.Tensor],
    *,
    model: nn.Module,
    protected: Mapping[str, Sequence[int]] | None = None,
    ff_scores: Mapping[str, torch.Tensor] | None = None,
    kv_context: torch.Tensor | None = None,
    name: str = "fragment",
    activation_stats: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> list[Lever]:
    """The select step: every lever the settings turn on, planned from its scores (the head lever first, always).

    Without ``ff_scores`` (``FFProfiler.scores()``) a feed-forward cut ranks channels by weight norms,
    and the manifest says so.  ``kv_context`` (``[B, T, C]``: cond and uncond rows) is needed for the
    K/V fold.  ``activation_stats`` (``ActivationStats.stats()``) make low-bit weights activation-aware;
    without them they are plain round to nearest, and the manifest says so.

    >>> toy = nn.Linear(2, 2)
    >>> [lv.kind for lv in plan_levers(ExtractionSettings(amount=0.0, precision_ratio=0.5), {}, model=toy)]
    ['heads', 'quantization']
    """
    levers: list[Lever] = [HeadLever.plan(
        head_scores, scope=settings.scope, min_keep=settings.min_keep, safety_margin_heads=settings.safety_margin_heads,
        protected=protected or {}, **settings.selection_kwargs(),
    )]
    if settings.kv_fold:
        if kv_context is None:
            raise FragmentError(f"fragment {name!r}: kv_fold needs the conditioning context (cond and uncond) to fold, found none")
        levers.append(KVFoldLever(kv_context, keep_weights=settings.kv_fold_keep_weights))
    if settings.ff_ratio > 0:
        info = {"method": "activation_energy" if ff_scores is not None else "weight_norm"}
        levers.append(FeedForwardLever.plan(ff_scores if ff_scores is not None else weight_norm_scores(model),
                                            ratio=settings.ff_ratio, info=info))
    if settings.low_rank:
        levers.append(LowRankLever(dict(settings.low_rank)))
    if settings.low_bit_on:
        levers.append(LowBitLever(ratio=settings.low_bit_ratio, bits=settings.low_bit_bits, group=settings.low_bit_group,
                                  stats=activation_stats))
    if settings.precision_on:
        levers.append(PrecisionLever(settings.precision, ratio=settings.precision_ratio))
    return levers


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
    activation_stats: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    reuse_depths: Mapping[int, ReuseDepth] | None = None,
) -> tuple[Fragment, Path | None]:
    """Score the profiled heads, plan the levers, build the fragment and (when ``directory`` is given) save it.

    ``kv_context`` (``[B, T, C]``: the cond and uncond rows the sampler will
    pass) is required when ``settings.kv_fold``.  ``ff_scores`` come from
    ``FFProfiler.scores()``; without them a feed-forward cut ranks channels by
    weight norms, and the manifest says so.  ``step_changes`` come from
    ``StepChangeProbe.changes()``; ``settings.step_reuse`` > 0 stores a reuse
    schedule for that share of the profiled steps, the steps where the deep
    features changed least (``profiling.step_change.reuse_steps_for_count``),
    matched at run time by ``step_timesteps`` (``StepChangeProbe.timesteps()``).
    With ``settings.reuse_skips`` the schedule cuts at that many skip connections and
    takes its changes from ``reuse_depths`` (``StepChangeProbe.depths()``).
    ``activation_stats`` come from ``ActivationStats.stats()``, for activation-aware low-bit weights.

    >>> frag, path = extract_fragment(profile, unet, base=describe_base(unet, "sd15"), name="dog",  # doctest: +SKIP
    ...                               settings=ExtractionSettings(amount=0.3), directory="models/fragments")
    """
    if profile.total_calls == 0:
        raise FragmentError(
            f"fragment {name!r}: the profile is empty (no model calls were recorded); run a sampler with the "
            "profiled MODEL before extracting"
        )
    scores = score_profile(profile, settings)
    levers = plan_levers(settings, scores.heads, model=model, protected=scores.protected, ff_scores=ff_scores,
                         kv_context=kv_context, name=name, activation_stats=activation_stats)
    selection = levers[0].selection
    spearman = [entry["spearman"] for entry in scores.stability.values()]
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
        "unstable_heads_kept": sum(len(v) for v in scores.protected.values()),
        "timestamp": int(time.time()),
    }
    fragment = build_fragment(model, levers, base=base, name=name, profiling=profiling)
    if settings.step_reuse > 0:
        skips = settings.reuse_skips
        if skips is not None and (not reuse_depths or skips not in reuse_depths):
            raise FragmentError(f"fragment {name!r}: step_reuse below skip {skips}: the profile has no per-step changes "
                                f"at that depth (profiled: {sorted(reuse_depths or {})}); profile with "
                                f"StepChangeProbe(..., skips=[{skips}]) or leave reuse_skips unset")
        changes = step_changes if skips is None else reuse_depths[skips].changes
        if skips is None:  # the block depth, stored as the same cut in skips: one meaning on every host
            skips = _block_depth_in_skips(model)
        fragment = with_schedule(fragment, reuse_schedule(name, changes, settings.step_reuse, timesteps=step_timesteps,
                                                          skips=skips))
    path = save_fragment(fragment, directory, overwrite=overwrite) if directory is not None else None
    log.info("fragment %s: %d of %d heads removed", name, selection.removed_heads, selection.total_heads)
    return fragment, path


def _block_depth_in_skips(model: nn.Module) -> int | None:
    try:
        return block_layout(model).skips_for_shallow(1)
    except FragmentError:  # no known block layout: the schedule keeps the block depth alone
        return None


def reuse_schedule(name: str, changes: Sequence[float | None] | None, share: float, shallow: int = 1,
                   timesteps: Sequence[float] | None = None, skips: int | None = None) -> Schedule:
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
    return Schedule(total_steps=len(changes), reuse_steps=tuple(steps), shallow=shallow, skips=skips,
                    step_timesteps=tuple(float(t) for t in timesteps or ()),
                    calibration={"method": "drift_budget", "share": share, "budget": round(budget, 5),
                                 "quality_gate": "not run: no judge in this path (see prompt-fragments bench batch)",
                                 "change_per_step": [None if c is None else round(c, 5) for c in changes]})


def candidate_fragment(
    profile: ProfileData,
    model: nn.Module,
    candidate: Candidate,
    *,
    base: Mapping[str, Any],
    name: str,
    settings: ExtractionSettings = ExtractionSettings(),
    kv_context: torch.Tensor | None = None,
    ff_scores: Mapping[str, torch.Tensor] | None = None,
    step_changes: Sequence[float | None] | None = None,
    step_timesteps: Sequence[float] | None = None,
    activation_stats: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    reuse_depths: Mapping[int, ReuseDepth] | None = None,
) -> Fragment:
    """The (unsaved) fragment of one calibration candidate: its levers, its step reuse and its CFG cut-off.

    >>> frag = candidate_fragment(profile, unet, Candidate(heads=0.2), base=base, name="dog")  # doctest: +SKIP
    """
    fragment, _ = extract_fragment(profile, model, base=base, name=name, settings=candidate.settings(settings),
                                   kv_context=kv_context if candidate.kv_fold else None, ff_scores=ff_scores,
                                   step_changes=step_changes, step_timesteps=step_timesteps,
                                   activation_stats=activation_stats, reuse_depths=reuse_depths)
    if candidate.cfg_cutoff is not None:
        fragment = with_schedule(fragment, dataclasses.replace(fragment_schedule(fragment), cfg_cutoff=candidate.cfg_cutoff))
    return fragment


def profile_predictors(
    scores: Scores,
    model: nn.Module,
    *,
    settings: ExtractionSettings = ExtractionSettings(),
    ff_scores: Mapping[str, torch.Tensor] | None = None,
    step_changes: Sequence[float | None] | None = None,
    kv_context: torch.Tensor | None = None,
    precision: bool = True,
    low_bit: bool = True,
    activation_stats: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    reuse_depths: Mapping[int, ReuseDepth] | None = None,
) -> Predictors:
    """What the calibration predicts from: the profile's scores, and the precision format's and the low-bit
    weights' error on ``model`` (the latter on the sampled layer inputs of ``activation_stats`` when given).

    Protected (rank-unstable) heads score as the most important, since the head lever never removes them.

    >>> p = profile_predictors(score_profile(profile), unet, ff_scores=ff.scores())  # doctest: +SKIP
    """
    top = max((float(v.max()) for v in scores.heads.values() if v.numel()), default=1.0)
    heads = {}
    for path, values in scores.heads.items():
        values = values.clone().float()
        values[list(scores.protected.get(path, ()))] = top  # never removed, so ranked with the most important
        heads[path] = values
    return Predictors(head_scores=heads, ff_scores=ff_scores, step_changes=step_changes,
                      precision_errors=precision_errors(retained_linears(model), settings.precision) if precision else None,
                      kv_fold=kv_context is not None, reuse_depths=reuse_depths,
                      low_bit_errors=low_bit_errors(model, activation_stats, bits=settings.low_bit_bits,
                                                    group=settings.low_bit_group) if low_bit else None)


def calibrated_fragment(
    profile: ProfileData,
    model: nn.Module,
    judge_fragment: Callable[[Fragment, Sequence[int]], Judgement],
    *,
    base: Mapping[str, Any],
    name: str,
    calibration_seeds: Sequence[int],
    holdout_seeds: Sequence[int],
    goal: str = "both",
    budget: Budget = Budget(),
    judge_name: str = "judge",
    settings: ExtractionSettings = ExtractionSettings(),
    kv_context: torch.Tensor | None = None,
    ff_scores: Mapping[str, torch.Tensor] | None = None,
    step_changes: Sequence[float | None] | None = None,
    step_timesteps: Sequence[float] | None = None,
    holdout_reference_images: int | None = None,
    images_per_seed: int = 1,
    activation_stats: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    reuse_depths: Mapping[int, ReuseDepth] | None = None,
) -> tuple[Fragment | None, Calibration]:
    """Score, predict, and judge candidates until the strongest that passes both seed sets is found.

    ``judge_fragment(fragment, seeds)`` renders ``seeds`` with the fragment and compares them with
    the full model's images of the same seeds (the caller keeps those: the profiled run's for the
    calibration seeds).  Returns the chosen fragment with the calibration recorded in its manifest
    (``quality.refinement``), or ``None`` when nothing passed: the full model is then the answer.

    >>> frag, cal = calibrated_fragment(profile, unet, judge, base=base, name="dog",  # doctest: +SKIP
    ...                                 calibration_seeds=range(8), holdout_seeds=[100, 101], goal="speed")
    """
    scores = score_profile(profile, settings)
    # the precision and low-bit predictors quantize every layer once: only worth it when the goal moves them
    predictors = profile_predictors(scores, model, settings=settings, ff_scores=ff_scores, step_changes=step_changes,
                                    kv_context=kv_context, precision="precision_ratio" in goal_levers(goal),
                                    low_bit="low_bit_ratio" in goal_levers(goal), activation_stats=activation_stats,
                                    reuse_depths=reuse_depths)
    ladder = candidate_ladder(predictors, goal)

    def build(candidate: Candidate) -> Fragment:
        return candidate_fragment(profile, model, candidate, base=base, name=name, settings=settings, kv_context=kv_context,
                                  ff_scores=ff_scores, step_changes=step_changes, step_timesteps=step_timesteps,
                                  activation_stats=activation_stats, reuse_depths=reuse_depths)

    passed: dict[Candidate, Fragment] = {}  # what the judge passed: the chosen fragment is among them, built once

    def judge(candidate: Candidate, seeds: Sequence[int]) -> Judgement:
        fragment = passed.get(candidate) or build(candidate)
        verdict = judge_fragment(fragment, seeds)
        if verdict.passed:
            passed[candidate] = fragment
        return verdict

    cal = calibrate(ladder, judge,
                    calibration_seeds=calibration_seeds, holdout_seeds=holdout_seeds, budget=budget, goal=goal,
                    judge_name=judge_name, holdout_reference_images=holdout_reference_images,
                    images_per_seed=images_per_seed)
    if cal.chosen is None:
        return None, cal
    return record_calibration(passed[cal.chosen], cal), cal


def record_calibration(fragment: Fragment, cal: Calibration) -> Fragment:
    """``fragment`` with the calibration in its manifest: ``quality.refinement``, the held-out figures, the gate verdict.

    >>> frag = record_calibration(frag, cal)  # doctest: +SKIP
    >>> frag.manifest["quality"]["refinement"]["status"]  # doctest: +SKIP
    'passed'
    """
    confirmed = cal.confirmed
    quality = {"refinement": cal.record(), "quality_gate": cal.status, "judge": cal.judge,
               "holdout": dict(confirmed["metrics"]) if confirmed else None}
    manifest = dict(fragment.manifest)
    schedule = manifest.get("schedule")
    if isinstance(schedule, Mapping) and schedule:
        # the schedule was chosen by the judge, not by a drift budget alone: say so where the schedule lives
        calibration = {**dict(schedule.get("calibration") or {}), "quality_gate": f"{cal.status} (see quality.refinement)"}
        manifest["schedule"] = {**schedule, "calibration": calibration}
    return Fragment(manifest=record_measurements(manifest, quality=quality), tensors=fragment.tensors)
