"""The whole extraction as one call: evidence in, a saved (and indexed) fragment and the line the user reads out.

FragmentExtractor parses its inputs and calls :func:`make_fragment`; this is
the one place that decides between the two paths and the one place that saves:

* fixed settings (no judge): score, select, build (``extract.extract_fragment``);
* calibrated (a judge is given): ``extract.calibrated_fragment`` picks the
  strongest candidate that passes the judge on the calibration and held-out
  seeds; when none does, the stored fragment is the full model (no levers)
  marked ``fallback_full_model``, so it claims no quality it lacks.

Then the fragment is saved once, and indexed for FragmentLoader's ``(auto)``
mode when the prompt's embedding is given (never the no-lever fallback: auto
would pick the full model).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ..profiling.evidence import ProfileEvidence
from .calibration import Budget, Calibration, Candidate, Judgement
from .extract import calibrated_fragment, candidate_fragment, extract_fragment, record_calibration
from .format.manifest import Fragment
from .format.measurements import record_measurements
from .format.store import check_free, save_fragment
from .library.index import register
from .library.prior import PriorPlace
from .settings import ExtractionSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Judging:
    """How the calibration judges: the judge, its seeds, its budget and what the user is told about it.

    ``judge(fragment, seeds)`` renders ``seeds`` with the fragment and compares them with the full model's;
    ``space`` says what it compares ("judged on decoded images"); ``reference_images`` is what ``prepare``
    renders to check the reference (counted in the cost, not a judged try).

    >>> Judging(lambda f, s: Judgement(True), name="toy", seeds=[1], holdout_seeds=[2]).budget.images
    16
    """

    judge: Callable[[Fragment, Sequence[int]], Judgement]
    name: str
    seeds: Sequence[int]
    holdout_seeds: Sequence[int]
    goal: str = "both"
    budget: Budget = field(default_factory=lambda: Budget(images=16))
    images_per_seed: int = 1
    space: str = ""
    reference_images: int = 0
    prepare: Callable[[], None] | None = None  # run before judging, e.g. the host's check of its reference render
    # where the model configuration's prior lives: the search starts warm from it and records its tries into it
    prior: PriorPlace | None = None
    # after ``prepare``: the seconds of one stock image the host measured (None: not measured), so the tries'
    # cost is counted in measured u (``Budget.unit_s``)
    unit_s: Callable[[], float | None] | None = None
    # the host's cost model (``metrics.costs.calibration_costs``, which the core cannot import): the status's
    # "spent ... u, pays back from image ..." line and the record kept in ``performance.calibration.ledger``
    costs: Callable[[Calibration], tuple[str | None, dict[str, Any]]] | None = None
    # the sampler settings every render is judged with (``fragment.compat.SAMPLER_SETTINGS``), kept as the manifest's
    # ``quality.sampler`` so a batch with other settings can say its quality was not measured
    sampler: Mapping[str, Any] | None = None
    # no judged try: the pick is confirmed by the running audit of the user's batch (``calibrate``'s status
    # "in_batch"), which its host must then run (BatchGenerator does when the manifest says so)
    confirm_in_batch: bool = False


@dataclass(frozen=True)
class Made:
    """What :func:`make_fragment` made: the fragment, where it was saved, the status line, the calibration
    (``None`` on the fixed-settings path) and the library key (``None`` when not indexed)."""

    fragment: Fragment
    path: Path
    status: str
    calibration: Calibration | None = None
    key: str | None = None


def make_fragment(
    evidence: ProfileEvidence,
    model: nn.Module,
    *,
    base: Mapping[str, Any],
    name: str,
    directory: str | os.PathLike,
    settings: ExtractionSettings = ExtractionSettings(),
    judging: Judging | None = None,
    overwrite: bool = False,
    embedding: torch.Tensor | None = None,
    unjudged_reason: str = "no judge given",
) -> Made:
    """Build the fragment (judged when ``judging`` is given), save it in ``directory`` and index it.

    >>> made = make_fragment(evidence, unet, base=base, name="dog", directory="models/fragments",  # doctest: +SKIP
    ...                      settings=ExtractionSettings(), embedding=pooled)
    >>> made.status  # doctest: +SKIP
    'fixed settings, not judged (no judge given): heads 30%'
    """
    check_free(directory, name, overwrite=overwrite)  # before minutes of judging, not after
    cal = None
    if judging is None:
        fragment, _ = extract_fragment(evidence, model, base=base, name=name, settings=settings)
        status = f"fixed settings, not judged ({unjudged_reason}): {settings.label}"
        params = {"strategy": settings.strategy, "ratio": settings.amount("heads"), "scope": settings.scope}
    else:
        if judging.prepare is not None:
            judging.prepare()
        unit_s = judging.unit_s() if judging.unit_s is not None else None
        if unit_s is not None and judging.budget.unit_s is None:
            judging = dataclasses.replace(judging, budget=dataclasses.replace(judging.budget, unit_s=unit_s))
        fragment, cal = judged_fragment(evidence, model, judging, base=base, name=name, settings=settings)
        line = None
        if judging.costs is not None:
            line, ledger = judging.costs(cal)
            calibration = {**dict(fragment.manifest.get("performance", {}).get("calibration", {})), "ledger": ledger}
            fragment = Fragment(manifest=record_measurements(fragment.manifest, performance={"calibration": calibration}),
                                tensors=fragment.tensors)
        status = calibration_status(cal, judging, line)
        params = {"strategy": "ratio", "ratio": cal.chosen.amount("heads") if cal.chosen else 0.0, "scope": settings.scope,
                  "calibration": cal.status, "levers": cal.chosen.label if cal.chosen else "full model"}
    path = save_fragment(fragment, directory, overwrite=overwrite)
    key = None
    if embedding is not None and (cal is None or cal.chosen is not None):
        key = register(directory, path, embedding=embedding, prompt=name, params=params)
    log.info("fragment %s: %s", name, status)
    return Made(fragment, path, status, cal, key)


def judged_fragment(evidence: ProfileEvidence, model: nn.Module, judging: Judging, *, base: Mapping[str, Any],
                    name: str, settings: ExtractionSettings) -> tuple[Fragment, Calibration]:
    """The calibrated fragment, or the full model (no levers) marked ``fallback_full_model``; its cost in
    the manifest's ``performance.calibration``.

    >>> frag, cal = judged_fragment(evidence, unet, judging, base=base, name="dog",  # doctest: +SKIP
    ...                             settings=ExtractionSettings())
    """
    fragment, cal = calibrated_fragment(
        evidence, model, judging.judge, base=base, name=name, calibration_seeds=list(judging.seeds),
        holdout_seeds=list(judging.holdout_seeds), goal=judging.goal, budget=judging.budget, judge_name=judging.name,
        settings=settings, images_per_seed=judging.images_per_seed, prior=judging.prior,
        confirm_in_batch=judging.confirm_in_batch)
    if fragment is None:
        fragment = record_calibration(candidate_fragment(evidence, model, Candidate(), base=base, name=name,
                                                         settings=settings), cal)
    # The reference check is counted apart: it is not a judged try, but it is what the user paid.
    cost = {"images": cal.images, "seconds": round(cal.seconds, 3), "tries": len(cal.tries),
            "budget_images": judging.budget.images, "reference_check_images": judging.reference_images,
            # in u (one stock image) when the budget was sized for a batch: what judging spent, what it may spend
            "units": round(cal.units, 4), "delivered": cal.delivered, "budget_units": judging.budget.units,
            "unit_s": judging.budget.unit_s, "start": cal.record()["start"]}
    quality = {"sampler": dict(judging.sampler)} if judging.sampler else None
    return Fragment(manifest=record_measurements(fragment.manifest, performance={"calibration": cost}, quality=quality),
                    tensors=fragment.tensors), cal


def calibration_status(cal: Calibration, judging: Judging, cost_line: str | None = None) -> str:
    """The line the user reads: the chosen levers, the held-out figures, the cost and the judge (on a fallback: why).

    With a batch-sized budget (``Budget.for_batch``) the cost says what judging spent in u of what the batch
    repays; ``cost_line`` (``metrics.costs.cost_line`` of the caller's ledger, which the core cannot import)
    is appended as written.

    >>> cal = Calibration("both", None, "fallback_full_model", [1], [2], Budget(4), "toy", reason="nothing passed")
    >>> calibration_status(cal, Judging(None, "toy", [1], [2], space="judged in latent space"))  # doctest: +ELLIPSIS
    'FULL MODEL used: no lever combination passed the quality gate (nothing passed); ...; judged in latent space; judge: toy'
    >>> cal = Calibration("speed", None, "fallback_full_model", [1], [2], Budget.for_batch(32, 2.0, delivered=2), "toy",
    ...                   units=3.0)
    >>> calibration_status(cal, Judging(None, "toy", [1], [2]), "spent 4.0 u (2.0 s), ...").split("; ")[2:4]
    ['0 tries, 0 images, 0.0 s, 3.0 u of the 15.0 u a batch of 32 repays at 2.00x raw (estimated)', 'spent 4.0 u (2.0 s), ...']
    >>> from prompt_fragments.fragment.calibration import Candidate
    >>> c = Candidate({"step_reuse": 0.3}, level=0.3)
    >>> cal = Calibration("speed", c, "in_batch", [1], [2], Budget(4), "toy", in_batch=True,
    ...                   tries=[{"phase": "pick", "passed": True, "candidate": c.to_dict()}])
    >>> calibration_status(cal, Judging(None, "toy", [1], [2])).split("; ")[0]
    'picked (speed): step reuse 30%, passed on the profiled seeds'
    """
    cost = f"{len(cal.tries)} tries, {cal.images} images, {cal.seconds:.1f} s"
    start = start_clause(cal)
    if start:
        cost = f"{start}; {cost}"
    if cal.budget.units is not None:
        cost += (f", {cal.units:.1f} u of the {cal.budget.units + cal.budget.spent_u:.1f} u a batch of {cal.budget.batch} "
                 f"repays at {cal.budget.raw_ratio:.2f}x raw (estimated)")
    if cost_line:
        cost += f"; {cost_line}"
    warned = "".join(f"; WARNING: {w}" for w in cal.warnings)
    if cal.chosen is None:
        last = next((t for t in reversed(cal.tries) if t["reasons"]), None)
        why = f"; last failures ({last['candidate']['label']}): {'; '.join(last['reasons'])}" if last else ""
        return (f"FULL MODEL used: no lever combination passed the quality gate ({cal.reason}){why}; the stored "
                f"fragment has no levers (quality_gate fallback_full_model); {cost}; {judging.space}; "
                f"judge: {judging.name}{warned}")
    metrics = (cal.confirmed or {}).get("metrics", {})
    figures = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("ssim_mean", "lpips_mean", "latent_rel_error")
                        if isinstance(metrics.get(k), (int, float)))
    if cal.untried:
        return (f"picked ({cal.goal}), untried: {cal.chosen.label}; the batch's running audit confirms it (its first "
                f"images are audited); {cost}; judge: {judging.name}{warned}")
    if cal.status == "in_batch":  # judged once on the profiled seeds (``judge_pick``), no held-out seed
        return (f"picked ({cal.goal}): {cal.chosen.label}, passed on the profiled seeds; the batch's running audit "
                f"confirms it; {cost}; judge: {judging.name}{warned}")
    return (f"calibrated ({cal.goal}): {cal.chosen.label}; held-out seeds {cal.holdout_seeds}: {figures}; {cost}; "
            f"{judging.space}; judge: {judging.name}{warned}")


def start_clause(cal: Calibration) -> str:
    """Cold or warm, when a prior was consulted (``""`` when none was).

    >>> cal = Calibration("speed", None, "passed", [1], [2], Budget(4), "toy", prior="k", prior_prompts=2, warm_start=3)
    >>> start_clause(cal)
    'warm start (the prior of 2 earlier prompts on this model configuration)'
    >>> start_clause(dataclasses.replace(cal, warm_start=None, prior_prompts=0))
    'cold start (no prior for this model configuration yet)'
    """
    if cal.prior is None:
        return ""
    plural = "s" if cal.prior_prompts != 1 else ""
    if cal.warm_start is not None:
        return f"warm start (the prior of {cal.prior_prompts} earlier prompt{plural} on this model configuration)"
    if cal.warnings and not cal.prior_prompts:
        return "cold start (the prior could not be used: see the warning)"
    if cal.prior_prompts:
        return (f"cold start (the prior of {cal.prior_prompts} earlier prompt{plural} on this model configuration "
                "predicts no rung)")
    return "cold start (no prior for this model configuration yet)"
