"""How well a prior from other prompts predicts a new prompt's pass/fail, and what a warm start saves (issue #26, 3).

On the reference model, for each prompt:

1. profile ``seeds`` seeds with the full model (the calibration's references, as ``bench batch`` does);
2. build the prompt's ladder (``candidate_ladder``) and judge **every** rung on those seeds: the truth;
3. calibrate cold (``calibrate``, no start) on the same seeds, held-out seeds confirming, no CFG cut-off
   (the cut-off is tried the same way cold or warm, so it is left out of both);
4. record the profile and the cold calibration's tries into a prior (``update_prior``, a temporary library).

Then leave-one-out: for each prompt, the prior *without that prompt's tries* predicts each rung of its
ladder (``Prior.predict(exclude=...)``), compared with the judged truth; and a warm calibration starts at
``Prior.suggest`` with ``confirm_only``.  Every judged render is cached by (candidate, seeds), so the
truth, the cold and the warm calibrations share renders; each calibration still counts its own images.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..fragment.build import describe_base
from ..fragment.calibration import Budget, Candidate, Judgement, calibrate, candidate_ladder, profile_predictors
from ..fragment.extract import candidate_fragment
from ..fragment.library.prior import PriorKey, load_prior, prompt_digest, update_prior
from ..judge.fragment_judge import fragment_judge
from ..profiling.activation_stats import ActivationStats
from ..profiling.dataset import ProfileData
from ..profiling.evidence import ProfileEvidence
from ..profiling.ff_profiler import FFProfiler
from ..profiling.profiler import HeadProfiler
from ..profiling.step_change import ReuseDepth, StepChangeProbe

log = logging.getLogger(__name__)

# The demo's prompt, bench.peers.EXTRA_PROMPTS, and two more of the reference grammar (reference/captions.py).
PRIOR_PROMPTS = ("a red circle in the top left and a blue triangle in the bottom right on a white background",
                 "a green square in the center on a black background",
                 "a yellow triangle in the top right on a gray background",
                 "a purple circle in the bottom left and an orange square in the top right on a black background",
                 "a red circle in the top left",
                 "a small orange circle in the center on a gray background")


@dataclass(frozen=True)
class PriorBenchConfig:
    seeds: int = 4  # profiled = calibration seeds = the seeds every rung is judged on
    holdout: int = 2
    goal: str = "speed"
    budget_images: int = 48
    first_holdout_seed: int = 20_000


def bench_prior(targets: Sequence[Any], key: PriorKey, config: PriorBenchConfig = PriorBenchConfig(),
                folder: str | None = None, records: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Leave-one-out prediction of pass/fail over ``targets`` (one ``ReferenceTarget`` per prompt, same model),
    plus ``records`` already judged (``prompt_record``, e.g. by other processes).

    >>> report = bench_prior([ReferenceTarget(p, limits=limits) for p in PRIOR_PROMPTS], key)  # doctest: +SKIP
    >>> report["summary"]["false_pass"]  # doctest: +SKIP
    0
    """
    return replay_prior([*records, *(prompt_record(t, config) for t in targets)], key, config, folder)


def prompt_record(target: Any, config: PriorBenchConfig = PriorBenchConfig()) -> dict[str, Any]:
    """Profile ``target``'s prompt, build its ladder, and judge every rung on the calibration and the held-out
    seeds: plain JSON data, so prompts can be judged in separate processes and replayed together."""
    seeds, holdout = _seeds(config)
    ladder, judge, evidence = _prompt_run(target, seeds, config.goal)
    rungs = []
    for c in ladder:
        verdicts = {phase: judge(c, on) for phase, on in (("calibration", seeds), ("holdout", holdout))}
        rungs.append({"candidate": c.to_dict(), **{p: {"passed": v.passed, "slack": v.slack, "reasons": list(v.reasons)}
                                                  for p, v in verdicts.items()}})
    log.info("prior bench: %s: %d rungs judged", target.prompt, len(ladder))
    depths = {str(k): {"skips": d.skips, "cache_point": d.cache_point, "changes": list(d.changes), "cost": d.cost}
              for k, d in (evidence.reuse_depths or {}).items()}
    return {"prompt": target.prompt, "steps": target.steps, "rungs": rungs,
            "step_changes": list(evidence.step_changes or []), "reuse_depths": depths}


def _seeds(config: PriorBenchConfig) -> tuple[list[int], list[int]]:
    return (list(range(config.seeds)),
            list(range(config.first_holdout_seed, config.first_holdout_seed + config.holdout)))


def _candidate(d: Mapping[str, Any]) -> Candidate:
    levers = {k: v for k, v in d.items() if k not in ("reuse_skips", "level", "label") and v}
    return Candidate(levers, reuse_skips=d["reuse_skips"], level=d["level"])


def replay_prior(records: Sequence[Mapping[str, Any]], key: PriorKey, config: PriorBenchConfig = PriorBenchConfig(),
                 folder: str | None = None) -> dict[str, Any]:
    """The leave-one-out measurement over judged ``records``: no rendering, every verdict replayed.

    Each prompt is calibrated cold (no CFG cut-off: it is tried the same way cold or warm) and its profile and
    tries recorded into one prior (``update_prior``, in ``folder``); then each prompt's rungs are predicted by
    the prior without its own tries, and a warm calibration starts at ``suggest`` and only confirms.
    """
    seeds, holdout = _seeds(config)
    folder = folder or tempfile.mkdtemp(prefix="prior-bench-")
    runs = []
    for record in records:
        ladder = [_candidate(r["candidate"]) for r in record["rungs"]]
        verdicts = {(r["candidate"]["label"], phase): Judgement(r[phase]["passed"], {}, r[phase]["reasons"], r[phase]["slack"])
                    for r in record["rungs"] for phase in ("calibration", "holdout")}

        def judge(candidate: Candidate, on: Sequence[int], verdicts=verdicts) -> Judgement:
            return verdicts[(candidate.label, "calibration" if list(on) == seeds else "holdout")]

        cold = calibrate(ladder, judge, calibration_seeds=seeds, holdout_seeds=holdout, goal=config.goal,
                         budget=Budget(images=config.budget_images), cfg_cutoffs=(), judge_name="quality gate")
        depths = {int(k): ReuseDepth(d["skips"], d["cache_point"], tuple(d["changes"]), d["cost"])
                  for k, d in record["reuse_depths"].items()}
        evidence = ProfileEvidence(ProfileData({}, len(seeds)), step_changes=record["step_changes"], reuse_depths=depths)
        update_prior(folder, key, evidence=evidence, calibration=cold, prompt=record["prompt"])
        runs.append((record, ladder, judge, cold))
    prior = load_prior(folder, key)
    rows = []
    for record, ladder, judge, cold in runs:
        digest = prompt_digest(record["prompt"])
        predicted = prior.predict(ladder, exclude=digest)
        start = prior.suggest(ladder, exclude=digest)
        warm = calibrate(ladder, judge, calibration_seeds=seeds, holdout_seeds=holdout, goal=config.goal,
                         budget=Budget(images=config.budget_images), cfg_cutoffs=(), judge_name="quality gate",
                         start=start, confirm_only=True)
        rows.append({
            "prompt": record["prompt"],
            "rungs": [{"label": c.label, "level": c.level, "judged_pass": r["calibration"]["passed"],
                       "slack": r["calibration"]["slack"], "holdout_pass": r["holdout"]["passed"], "predicted": p}
                      for c, r, p in zip(ladder, record["rungs"], predicted)],
            "start": start, "start_label": ladder[start].label if start is not None else None,
            "cold": _cal_row(cold), "warm": _cal_row(warm),
            "strongest_judged_pass": next((c.label for c, r in zip(ladder, record["rungs"]) if r["calibration"]["passed"]), None),
        })
    return {"config": {"seeds": config.seeds, "holdout": config.holdout, "goal": config.goal,
                       "budget_images": config.budget_images, "steps": records[0]["steps"] if records else None},
            "key": key.name, "rows": rows, "summary": summarize(rows)}


def _prompt_run(target: Any, seeds: list[int], goal: str) -> tuple[list[Candidate], Callable[..., Judgement], ProfileEvidence]:
    """Profile ``target`` on ``seeds``; its ladder, a render-caching judge, and the evidence."""
    unet = target.unet
    with HeadProfiler(unet, buckets=4) as prof, FFProfiler(unet) as ff_prof, \
            StepChangeProbe(unet, 1) as probe, ActivationStats(unet) as acts:
        prof.begin_sample("profile")
        with torch.no_grad():
            reference = target.run(unet, seeds)
    evidence = ProfileEvidence.from_probes(prof.result(), [ff_prof, probe, acts])
    base = describe_base(unet, target.name, sha256="0" * 64, hash_kind="none")
    ladder = candidate_ladder(profile_predictors(evidence, unet, goal=goal), goal)
    judge_fragment = fragment_judge(unet, target.run, target.judge, seeds, reference)
    cache: dict[tuple[str, tuple[int, ...]], Judgement] = {}

    def judge(candidate: Candidate, on: Sequence[int]) -> Judgement:
        key = (candidate.label, tuple(on))
        if key not in cache:
            cache[key] = judge_fragment(candidate_fragment(evidence, unet, candidate, base=base, name="prior-bench"), on)
        return cache[key]

    return ladder, judge, evidence


def _cal_row(cal: Any) -> dict[str, Any]:
    return {"tries": len(cal.tries), "images": cal.images, "chosen": cal.chosen.label if cal.chosen else None,
            "chosen_level": cal.chosen.level if cal.chosen else None}


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy over the rungs the prior predicted, false passes (predicted pass, judged fail), and the tries
    and images a warm start spent against a cold one.

    >>> rung = lambda judged, predicted: {"judged_pass": judged, "predicted": predicted}
    >>> s = summarize([{"rungs": [rung(True, True), rung(False, True), rung(False, False), rung(True, None)],
    ...                 "cold": {"tries": 5, "images": 24}, "warm": {"tries": 2, "images": 12}}])
    >>> s["accuracy"], s["false_pass"], s["unknown"], s["images_saved"]
    (0.6667, 1, 1, 12)
    """
    rungs = [r for row in rows for r in row["rungs"]]
    told = [r for r in rungs if r["predicted"] is not None]
    correct = sum(r["predicted"] == r["judged_pass"] for r in told)
    cold_images, warm_images = sum(r["cold"]["images"] for r in rows), sum(r["warm"]["images"] for r in rows)
    return {"prompts": len(rows), "rungs": len(rungs), "predicted": len(told), "unknown": len(rungs) - len(told),
            "correct": correct, "accuracy": round(correct / len(told), 4) if told else None,
            "false_pass": sum(r["predicted"] and not r["judged_pass"] for r in told),
            "false_fail": sum(not r["predicted"] and r["judged_pass"] for r in told),
            "cold_tries": sum(r["cold"]["tries"] for r in rows), "warm_tries": sum(r["warm"]["tries"] for r in rows),
            "cold_images": cold_images, "warm_images": warm_images, "images_saved": cold_images - warm_images}


def format_prior_report(report: Mapping[str, Any]) -> str:
    """One row per prompt, then the totals.

    >>> row = {"prompt": "p", "rungs": [{"judged_pass": True, "predicted": True}], "start_label": "step reuse 30%",
    ...        "cold": {"tries": 4, "images": 20, "chosen": "step reuse 30%"},
    ...        "warm": {"tries": 2, "images": 12, "chosen": "step reuse 30%"}, "strongest_judged_pass": "step reuse 30%"}
    >>> print(format_prior_report({"key": "k", "config": {"seeds": 4, "holdout": 2, "goal": "speed", "steps": 25},
    ...                            "rows": [row], "summary": summarize([row])}).splitlines()[-1])
    warm start: 2 tries / 12 images against cold 4 tries / 20 images (8 images saved)
    """
    c = report["config"]
    lines = [f"prior bench: {report['key']}; {c['seeds']} seeds judged per rung, {c['holdout']} held out, goal {c['goal']}, "
             f"{c['steps']} steps; leave-one-out (each prompt predicted from the others' judged tries)",
             f"{'prompt':<60}{'rungs':>6}{'right':>6}{'F-pass':>7}{'?':>3}  {'warm start':<22}{'cold tries/img':>15}"
             f"{'warm tries/img':>15}  chosen cold -> warm (strongest judged pass)"]
    for row in report["rows"]:
        s = summarize([row])
        lines.append(f"{row['prompt'][:59]:<60}{s['rungs']:>6}{s['correct']:>6}{s['false_pass']:>7}{s['unknown']:>3}  "
                     f"{str(row['start_label'] or 'cold (none)')[:21]:<22}"
                     f"{row['cold']['tries']:>8}/{row['cold']['images']:<6}{row['warm']['tries']:>8}/{row['warm']['images']:<6}  "
                     f"{row['cold']['chosen']} -> {row['warm']['chosen']} ({row['strongest_judged_pass']})")
    s = report["summary"]
    accuracy = "n/a" if s["accuracy"] is None else f"{s['accuracy']:.1%}"
    lines.append(f"predicted {s['predicted']} of {s['rungs']} rungs ({s['unknown']} unknown): accuracy {accuracy}, "
                 f"false passes {s['false_pass']} (predicted pass, judged fail), false fails {s['false_fail']}")
    lines.append(f"warm start: {s['warm_tries']} tries / {s['warm_images']} images against cold {s['cold_tries']} tries / "
                 f"{s['cold_images']} images ({s['images_saved']} images saved)")
    return "\n".join(lines)
