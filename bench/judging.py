"""``bench judging``: what the cheap judge saves and how far it can be trusted, on the reference model.

Two measurements of issue #26 item 2, on one profile of one prompt:

* **agreement**: every candidate of the calibration's ladder (all goals) is
  rendered on the profile seeds; the latent judge (``latent_rel_error`` on the
  raw sampler output) is set against the decoded gate (SSIM, LPIPS, adherence
  of ``thresholds.yaml``) by ``judge.agreement.latent_agreement``;
* **savings**: one calibration with branching from the recorded trajectory and
  the sequential stop, against one with neither, on the same profile: images,
  seconds and the chosen candidate of each.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import torch

from ..fragment.build import describe_base
from ..fragment.calibration import Budget, candidate_ladder, profile_predictors
from ..fragment.extract import calibrated_fragment, candidate_fragment
from ..judge.agreement import format_agreement, latent_agreement
from ..judge.fragment_judge import fragment_branch, fragment_judge, render
from ..judge.reference_target import ReferenceTarget
from ..profiling.evidence import ProfileEvidence
from ..profiling.ff_profiler import FFProfiler
from ..profiling.profiler import HeadProfiler
from ..profiling.step_change import StepChangeProbe
from ..reference.sampling import to_uint8



def bench_judging(target: ReferenceTarget, *, profile_seeds: int = 8, holdout_seeds: int = 4, goal: str = "speed",
                  budget_images: int = 48, agreement_goals: tuple[str, ...] = ("speed", "memory"),
                  max_candidates: int = 12, savings: bool = True) -> dict[str, Any]:
    """The agreement and savings report (plain JSON data) for ``target``'s prompt.

    >>> report = bench_judging(ReferenceTarget(DEFAULT_PROMPT, limits=gate), profile_seeds=4)  # doctest: +SKIP
    >>> print(format_judging(report))  # doctest: +SKIP
    """
    unet = target.unet
    seeds = list(range(profile_seeds))
    holdout = list(range(500, 500 + holdout_seeds))
    target.watch(seeds + holdout)
    with HeadProfiler(unet, buckets=4) as prof, FFProfiler(unet) as ff, StepChangeProbe(unet) as probe, torch.no_grad():
        prof.begin_sample("profile")
        full_raw = target.run(unet, seeds, raw=True)
    reference = to_uint8(full_raw)
    evidence = ProfileEvidence(prof.result(), ff_scores=ff.scores(), step_changes=probe.changes(),
                               step_timesteps=probe.timesteps())
    base = describe_base(unet, target.name, sha256="0" * 64, hash_kind="none")
    report: dict[str, Any] = {"prompt": target.prompt, "steps": target.steps, "profile_seeds": profile_seeds}

    ladder = []
    for g in agreement_goals:
        ladder += candidate_ladder(profile_predictors(evidence, unet, goal=g), g)
    ladder = ladder[:: max(1, len(ladder) // max_candidates)][:max_candidates]
    raws: dict[str, torch.Tensor] = {}
    branches = {}
    raw_run = lambda *a, **kw: target.run(*a, raw=True, **kw)  # noqa: E731
    for candidate in ladder:
        fragment = candidate_fragment(evidence, unet, candidate, base=base, name="agreement")
        step = fragment_branch(unet, fragment, target.timesteps)
        raws[candidate.label], _ = render(unet, fragment, seeds, raw_run, branch=(step, target.trajectory))
        branches[candidate.label] = step
    agreement = latent_agreement(full_raw, raws, gate=target.judge, to_images=to_uint8, lpips=target.lpips,
                                 latent_limit=target.limits.get("latent_rel_error_max"))
    for row in agreement["per_candidate"]:
        row["branch_step"] = branches[row["label"]]
    report["agreement"] = agreement

    if savings:
        runs = {}
        for name, judge in (("plain", fragment_judge(unet, target.run, target.judge, seeds, reference)),
                            ("branch+stop", target.fragment_judge(seeds, reference))):
            started = time.perf_counter()
            _, cal = calibrated_fragment(evidence, unet, judge, base=base, name="judging", calibration_seeds=seeds,
                                         holdout_seeds=holdout, goal=goal, budget=Budget(images=budget_images))
            seconds = time.perf_counter() - started
            rendered = sum(t["metrics"].get("seeds_judged", len(t["seeds"])) for t in cal.tries)
            runs[name] = {"seconds": round(seconds, 3), "tries": len(cal.tries), "images_counted": cal.images,
                          "candidate_images_rendered": rendered,
                          "stopped_tries": sum(1 for t in cal.tries if t["metrics"].get("sequential_stop")),
                          "branched_tries": sum(1 for t in cal.tries if t["metrics"].get("branch_step", 0) > 0),
                          "chosen": cal.chosen.label if cal.chosen else None}
        report["savings"] = runs
    return report


def format_judging(report: Mapping[str, Any]) -> str:
    """The bench's lines: the agreement, one line per candidate, and the savings.

    >>> print(format_judging({"prompt": "p", "agreement": {"candidates": 0, "images": 0, "per_candidate": [],
    ...     "spearman_latent_vs_1_minus_ssim": None, "spearman_latent_vs_lpips": None, "gate_passes": 0,
    ...     "latent_limit": 0.1, "agreement_at_latent_limit": None, "fitted_latent_limit": None,
    ...     "agreement_at_fitted_limit": None}}))
    prompt: 'p'
    latent judge vs decoded gate (0 candidates, 0 images): Spearman vs 1-SSIM n/a, vs LPIPS n/a; gate passed 0/0; pass/fail agreement n/a at latent limit 0.1, n/a at fitted None
    """
    lines = [f"prompt: {report['prompt']!r}", format_agreement(report["agreement"])]
    for row in report["agreement"]["per_candidate"]:
        lines.append(f"  {row['label']:<48} latent {row['latent_rel_error']:.4f}  SSIM {row['ssim_mean']}  "
                     f"LPIPS {row['lpips_mean']}  gate {'pass' if row['gate_passed'] else 'FAIL'}  branch {row.get('branch_step')}")
    for name, run in (report.get("savings") or {}).items():
        lines.append(f"calibration {name}: {run['seconds']:.1f} s, {run['tries']} tries, {run['candidate_images_rendered']} "
                     f"candidate images rendered ({run['images_counted']} counted), {run['stopped_tries']} stopped, "
                     f"{run['branched_tries']} branched; chose {run['chosen'] or 'the full model'}")
    return "\n".join(lines)
