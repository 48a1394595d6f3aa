"""Extraction: profile in, fragment on disk out.

The pipeline is plain functions over one object, the profile's evidence
(``ProfileEvidence``): ``score_profile`` (score, kept by the evidence),
``plan_levers`` (select: each registered lever plans itself), ``build.build_fragment``
(build), then the caller's judge (``calibrated_fragment``) and ``save_fragment`` (record).
``extract_fragment`` runs score, select, build and record; the node and the demo call it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch.nn as nn

from ..errors import FragmentError
from ..profiling.dataset import ProfileData
from ..profiling.evidence import ProfileEvidence, Scores
from .build import build_fragment
from .calibration import (Budget, Calibration, Candidate, Judgement, calibrate, candidate_ladder, estimated_raw_ratio,
                          profile_predictors)
from .format.manifest import Fragment
from .format.measurements import record_measurements
from .format.store import save_fragment
from .library.prior import PriorPlace, calibrate_with_prior
from .levers import stage
from .schedule.state import fragment_schedule, with_schedule
from .settings import ExtractionSettings
from .surgery.lever import Lever

log = logging.getLogger(__name__)

__all__ = ["Scores", "calibrated_fragment", "candidate_fragment", "extract_fragment", "plan_levers", "record_calibration",
           "score_profile"]


def score_profile(profile: ProfileData | ProfileEvidence, settings: ExtractionSettings = ExtractionSettings()) -> Scores:
    """The score step: per-head scores; heads whose rank moves across seeds are protected (when the settings say
    so).  A thin wrapper over ``ProfileEvidence.scores``.

    >>> scores = score_profile(profile)  # doctest: +SKIP
    >>> sorted(scores.heads)[:1]  # doctest: +SKIP
    ['down_blocks.1.attentions.0.transformer_blocks.0.attn1']
    """
    # by what it does, not its class: ComfyUI may load this package a second time under the pack's folder name
    evidence = profile if hasattr(profile, "scores") else ProfileEvidence(profile)
    return evidence.scores(settings.weights, max_rank_std=settings.max_rank_std,
                           keep_unstable_heads=settings.keep_unstable_heads)


def plan_levers(evidence: ProfileEvidence, settings: ExtractionSettings, *, model: nn.Module,
                name: str = "fragment") -> list[Lever]:
    """The select step: every weight lever the settings turn on, each planned by its own class from the evidence,
    in registry order (the head lever first, always).

    >>> toy = nn.Linear(2, 2)
    >>> evidence = ProfileEvidence.from_scores({})
    >>> [lv.name for lv in plan_levers(evidence, ExtractionSettings(levers={"precision": 0.5}), model=toy)]
    ['heads', 'precision']
    """
    planned = (cls.plan(evidence, settings, model, name) for cls in stage("weights"))
    return [lever for lever in planned if lever is not None]


def extract_fragment(
    evidence: ProfileEvidence,
    model: nn.Module,
    *,
    base: Mapping[str, Any],
    name: str,
    settings: ExtractionSettings = ExtractionSettings(),
    directory: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> tuple[Fragment, Path | None]:
    """Score the profiled heads, plan the levers, build the fragment and (when ``directory`` is given) save it.

    ``evidence`` (``ProfileSession.evidence()`` or ``ProfileEvidence.from_probes``) is what every lever
    plans from: its ``kv_context`` is required when the K/V fold is on; without ``ff_scores`` a
    feed-forward cut ranks channels by weight norms, and the manifest says so; step reuse stores a
    schedule for its share of the profiled steps where the deep features changed least
    (``step_changes``, matched at run time by ``step_timesteps``; with ``settings.reuse_skips`` the
    changes of that depth, from ``reuse_depths``); ``activation_stats`` make low-bit weights
    activation-aware.  The schedule levers (step reuse, CFG cut-off) come after the weights.

    >>> frag, path = extract_fragment(evidence, unet, base=describe_base(unet, "sd15"), name="dog",  # doctest: +SKIP
    ...                               settings=ExtractionSettings(levers={"heads": 0.3}), directory="models/fragments")
    """
    profile = evidence.profile
    # a prior's means hold no head profile: fine for levers that read none (``Prior.evidence``); heads then stay
    if profile.total_calls == 0 and (evidence.source != "prior" or settings.amount("heads")):
        raise FragmentError(
            f"fragment {name!r}: the profile is empty (no model calls were recorded"
            + ("; a prior's curves hold no head profile, and the heads lever needs one" if evidence.source == "prior"
               else "") + "); run a sampler with the profiled MODEL before extracting"
        )
    scores = score_profile(evidence, settings)
    levers = plan_levers(evidence, settings, model=model, name=name)
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
    timed = [lever for lever in (cls.plan(evidence, settings, model, name) for cls in stage("schedule")) if lever is not None]
    if timed:
        schedule = fragment_schedule(fragment)
        for lever in timed:
            schedule = lever.extend(schedule)
        fragment = with_schedule(fragment, schedule)
    path = save_fragment(fragment, directory, overwrite=overwrite) if directory is not None else None
    log.info("fragment %s: %d of %d heads removed", name, selection.removed_heads, selection.total_heads)
    return fragment, path


def candidate_fragment(
    evidence: ProfileEvidence,
    model: nn.Module,
    candidate: Candidate,
    *,
    base: Mapping[str, Any],
    name: str,
    settings: ExtractionSettings = ExtractionSettings(),
) -> Fragment:
    """The (unsaved) fragment of one calibration candidate: its levers, its step reuse and its CFG cut-off.

    >>> frag = candidate_fragment(evidence, unet, Candidate({"heads": 0.2}), base=base, name="dog")  # doctest: +SKIP
    """
    return extract_fragment(evidence, model, base=base, name=name, settings=candidate.settings(settings))[0]


def calibrated_fragment(
    evidence: ProfileEvidence,
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
    holdout_reference_images: int | None = None,
    images_per_seed: int = 1,
    prior: PriorPlace | None = None,
    confirm_in_batch: bool = False,
    judge_pick: bool = False,
) -> tuple[Fragment | None, Calibration]:
    """Score, predict, and judge candidates until the strongest that passes both seed sets is found.

    ``judge_fragment(fragment, seeds)`` renders ``seeds`` with the fragment and compares them with
    the full model's images of the same seeds (the caller keeps those: the profiled run's for the
    calibration seeds).  Returns the chosen fragment with the calibration recorded in its manifest
    (``quality.refinement``), or ``None`` when nothing passed: the full model is then the answer.
    The head scores are computed once (``evidence`` keeps them), however many candidates are built.
    With ``prior`` (``fragment.library.prior.PriorPlace``) the search starts where earlier prompts on the same
    model configuration predict a pass and only confirms it (warm; cold when the prior has nothing), and the
    profile and the judged tries are recorded into that prior.  With ``confirm_in_batch`` the running audit of the
    user's batch confirms the choice (``calibrate``'s status ``"in_batch"``): the caller must audit the batch;
    with ``judge_pick`` as well the pick is first judged on ``calibration_seeds`` (``Calibration.untried`` says
    whether the audit must lead).  ``evidence`` may be a prior's (``fragment.library.prior.prior_evidence``: no
    profile of this prompt), for a pick the batch confirms; it is then not recorded into the prior again.

    >>> frag, cal = calibrated_fragment(evidence, unet, judge, base=base, name="dog",  # doctest: +SKIP
    ...                                 calibration_seeds=range(8), holdout_seeds=[100, 101], goal="speed")
    """
    if evidence.source == "prior" and (not confirm_in_batch or judge_pick):
        raise FragmentError(f"fragment {name!r}: the evidence is a prior's means, with no profiled images to judge a "
                            f"try against: expected confirm_in_batch=True without judge_pick (the running audit "
                            f"confirms the pick), found confirm_in_batch={confirm_in_batch}, judge_pick={judge_pick}")
    predictors = profile_predictors(evidence, model, settings, goal)
    ladder = [dataclasses.replace(c, how=settings)  # labelled in the settings' formats (int8, int3...)
              for c in candidate_ladder(predictors, goal)]
    # a batch-sized budget with no raw ratio yet: what the ladder predicts, before any fragment exists
    cutoffs = predictors.cfg_cutoffs()  # predicted from the profiled cond/uncond gap, latest first
    budget = budget.with_raw_ratio(estimated_raw_ratio(ladder, predictors, goal, cutoffs) if budget.batch else None)

    def build(candidate: Candidate) -> Fragment:
        return candidate_fragment(evidence, model, candidate, base=base, name=name, settings=settings)

    passed: dict[Candidate, Fragment] = {}  # what the judge passed: the chosen fragment is among them, built once

    def judge(candidate: Candidate, seeds: Sequence[int]) -> Judgement:
        fragment = passed.get(candidate) or build(candidate)
        verdict = judge_fragment(fragment, seeds)
        if verdict.passed:
            passed[candidate] = fragment
        return verdict

    run = dict(calibration_seeds=calibration_seeds, holdout_seeds=holdout_seeds, budget=budget, goal=goal,
               judge_name=judge_name, holdout_reference_images=holdout_reference_images, images_per_seed=images_per_seed,
               cfg_cutoffs=cutoffs, confirm_in_batch=confirm_in_batch, cross_attn_gate=predictors.cross_attn_gate(),
               judge_pick=judge_pick)
    if prior is None:
        cal = calibrate(ladder, judge, **run)
    else:
        # evidence read from the prior is that prior's own means: recorded again, it would count twice
        cal = calibrate_with_prior(ladder, judge, directory=prior.directory, key=prior.key, prompt=prior.prompt,
                                   evidence=evidence if evidence.source != "prior" else None, **run)
    if cal.chosen is None:
        return None, cal
    # an in-batch pick may be untried: built here, once (a judged pass was built by its try)
    return record_calibration(passed.get(cal.chosen) or build(cal.chosen), cal), cal


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
