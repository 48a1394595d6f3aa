"""The one calibration (fragment/calibration.py): held-out confirmation, budget, records, fallback, and its cost.

Tier 1: toy judges whose answers are known pin the search's contract; the
reference model with the real quality gate shows the pipeline end to end.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prompt_fragments.errors import FragmentError
from prompt_fragments.fragment.calibration import (
    Budget, Candidate, Judgement, Predictors, calibrate, candidate_ladder, goal_levers,
)
from prompt_fragments.judge.limits import Limit, slack
from prompt_fragments.metrics.performance import amortized_costs
from prompt_fragments.fragment.schedule.reuse_lever import ReuseEvidence
from prompt_fragments.profiling.step_change import ReuseDepth

LADDER = [Candidate({"heads": round(0.05 * i, 2)}, level=0.05 * i) for i in range(12, 0, -1)]  # 60 % .. 5 %, strongest first


class CountingJudge:
    """Passes ``heads <= limit[phase]``; counts its calls and the images it was asked for."""

    def __init__(self, calibration_limit: float, holdout_limit: float, holdout: set[int]) -> None:
        self.limits, self.holdout = (calibration_limit, holdout_limit), holdout
        self.calls: list[tuple[str, list[int]]] = []

    def __call__(self, candidate: Candidate, seeds: list[int]) -> Judgement:
        held_out = bool(set(seeds) & self.holdout)
        limit = self.limits[held_out]
        self.calls.append((candidate.label, list(seeds)))
        room = (limit - candidate.amount("heads")) / max(limit, 1e-9)
        return Judgement(candidate.amount("heads") <= limit + 1e-9, {"heads": candidate.amount("heads")}, [] if room >= 0 else ["too many heads"],
                         slack=room)


def test_the_choice_passes_the_held_out_seeds_not_only_the_calibration_seeds() -> None:
    # 40 % passes the calibration seeds but only 25 % passes fresh ones: the overfit the CI gate once showed
    judge = CountingJudge(0.4, 0.25, holdout={100, 101})
    cal = calibrate(LADDER, judge, calibration_seeds=[0, 1, 2], holdout_seeds=[100, 101], goal="memory",
                    budget=Budget(images=200))
    assert cal.status == "passed" and cal.chosen.amount("heads") == pytest.approx(0.25)
    holdout = [t for t in cal.tries if t["phase"] == "holdout"]
    assert holdout[-1]["passed"] and holdout[-1]["candidate"]["heads"] == pytest.approx(0.25)
    assert all(not t["passed"] for t in holdout[:-1]) and len(holdout) >= 2  # the stronger calibration pass was refused
    assert cal.confirmed["candidate"]["label"] == cal.chosen.label


@pytest.mark.parametrize("images", [3, 7, 12, 20, 33])
def test_the_calibration_never_exceeds_its_budget_and_records_every_try(images: int) -> None:
    judge = CountingJudge(0.3, 0.2, holdout={50, 51})
    cal = calibrate(LADDER, judge, calibration_seeds=[0, 1, 2], holdout_seeds=[50, 51], budget=Budget(images=images),
                    goal="memory")
    assert cal.images <= images
    # every judge call is one recorded try, in order, with its seeds and its cost
    assert [(t["candidate"]["label"], t["seeds"]) for t in cal.tries] == judge.calls
    spent = sum(len(seeds) for _, seeds in judge.calls) + (2 if any(t["phase"] == "holdout" for t in cal.tries) else 0)
    assert cal.images == sum(t["images"] for t in cal.tries) == spent
    assert all({"phase", "candidate", "seeds", "passed", "reasons", "metrics", "seconds", "images"} <= set(t) for t in cal.tries)
    record = cal.record()
    assert record["cost"]["images"] == cal.images and len(record["tries"]) == len(cal.tries)
    if cal.chosen is None:
        assert record["fallback_full_model"] and record["reason"]


def test_a_judge_that_fails_everything_yields_the_full_model() -> None:
    cal = calibrate(LADDER, lambda c, s: Judgement(False, {}, ["never"], slack=-1.0), calibration_seeds=[0, 1],
                    holdout_seeds=[9], budget=Budget(images=100))
    assert cal.chosen is None and cal.status == "fallback_full_model"
    assert cal.record()["chosen"] is None and cal.tries and all(not t["passed"] for t in cal.tries)
    assert all(t["phase"] == "calibration" for t in cal.tries)  # nothing to confirm: no held-out images spent


def test_the_slack_moves_the_search_faster_than_halving() -> None:
    # slack is linear in the level: the fit lands on the answer's rung instead of walking to it one halving at a time
    with_slack = CountingJudge(0.15, 0.15, holdout={9})
    without = lambda c, s: Judgement(c.amount("heads") <= 0.15 + 1e-9)  # noqa: E731 - a judge with no slack
    cal_a = calibrate(LADDER, with_slack, calibration_seeds=[0], holdout_seeds=[9], goal="memory", budget=Budget(100))
    calls: list[str] = []

    def counting(c: Candidate, s: list[int]) -> Judgement:
        calls.append(c.label)
        return without(c, s)

    cal_b = calibrate(LADDER, counting, calibration_seeds=[0], holdout_seeds=[9], goal="memory", budget=Budget(100))
    assert cal_a.chosen.amount("heads") == cal_b.chosen.amount("heads") == pytest.approx(0.15)
    assert len(cal_a.tries) <= len(cal_b.tries)


def test_cfg_cutoff_is_tried_only_for_time_goals_and_must_pass_both_sets() -> None:
    def judge(c: Candidate, seeds: list[int]) -> Judgement:
        ok = c.amount("heads") <= 0.2 + 1e-9 and (c.amount("cfg_cutoff") is None or c.amount("cfg_cutoff") <= 350 or 9 not in seeds)
        return Judgement(ok, slack=0.1 if ok else -0.1)

    speed = calibrate(LADDER, judge, calibration_seeds=[0], holdout_seeds=[9], goal="speed", budget=Budget(100))
    assert speed.chosen.amount("cfg_cutoff") == 350.0  # 500 passed the calibration seed and failed the held-out one
    memory = calibrate(LADDER, judge, calibration_seeds=[0], holdout_seeds=[9], goal="memory", budget=Budget(100))
    assert memory.chosen.amount("cfg_cutoff") is None


def test_cfg_cutoff_is_not_tried_when_the_budget_cannot_also_confirm_it() -> None:
    def judge(c: Candidate, seeds: list[int]) -> Judgement:
        return Judgement(c.amount("heads") <= 0.2 + 1e-9, slack=0.1 if c.amount("heads") <= 0.2 + 1e-9 else -0.1)

    roomy = calibrate(LADDER, judge, calibration_seeds=[0], holdout_seeds=[9], goal="speed", budget=Budget(100))
    spent = roomy.images - 2  # what the levers and their confirmation cost, before the first cut-off's two tries
    assert roomy.chosen.amount("cfg_cutoff") == 500.0
    for room, tried in ((spent + 1, False), (spent + 2, True)):
        cal = calibrate(LADDER, judge, calibration_seeds=[0], holdout_seeds=[9], goal="speed", budget=Budget(room))
        cut_tries = [t for t in cal.tries if t["candidate"]["cfg_cutoff"] is not None]
        assert bool(cut_tries) == tried and cal.chosen.amount("heads") == roomy.chosen.amount("heads")
        assert (cal.chosen.amount("cfg_cutoff") == 500.0) == tried


def test_with_no_lever_chosen_the_cutoff_is_tried_on_the_full_model() -> None:
    def judge(c: Candidate, seeds: list[int]) -> Judgement:  # no lever passes; only a late CFG cut-off does
        ok = not c.amount("heads") and c.amount("cfg_cutoff") is not None and c.amount("cfg_cutoff") <= 350
        return Judgement(ok, reasons=() if ok else ("too far",), slack=0.1 if ok else -0.1)

    for ladder in (LADDER, []):  # every lever fails, or none was offered at all
        cal = calibrate(ladder, judge, calibration_seeds=[0], holdout_seeds=[9], goal="speed", budget=Budget(100))
        assert cal.status == "passed" and cal.chosen == Candidate({"cfg_cutoff": 350.0}) and not cal.reason
        assert cal.record()["fallback_full_model"] is False
        assert [t["candidate"]["cfg_cutoff"] for t in cal.tries if not t["candidate"]["heads"]] == [500.0, 350.0, 350.0]
        assert cal.confirmed is not None and cal.confirmed["candidate"]["label"] == "CFG off below t=350"
    memory = calibrate([], judge, calibration_seeds=[0], holdout_seeds=[9], goal="memory", budget=Budget(100))
    assert memory.chosen is None and not memory.tries and "none saves enough" in memory.reason
    failing = calibrate([], lambda c, s: Judgement(False, reasons=("no",)), calibration_seeds=[0], holdout_seeds=[9],
                        goal="speed", budget=Budget(100))
    assert failing.chosen is None and failing.status == "fallback_full_model" and len(failing.tries) == 3


def test_a_share_that_reuses_no_step_is_never_a_candidate() -> None:
    few = [None, 0.1, 0.1, 0.1]  # 4 steps: 5-20 % of them rounds to no step
    for predictors in (Predictors({"step_reuse": ReuseEvidence(few)}),
                       Predictors({"step_reuse": ReuseEvidence(reuse_depths={1: ReuseDepth(1, "up.2", tuple(few), cost=0.2)})})):
        ladder = candidate_ladder(predictors, "speed")
        assert ladder and all(int(c.amount("step_reuse") * len(few)) >= 1 for c in ladder), [c.label for c in ladder]
    drifting = [None, 5.0, 6.0, 7.0, 8.0]  # every step moves the features by more than any level: nothing fits
    assert candidate_ladder(Predictors({"step_reuse": ReuseEvidence(drifting)}), "speed") == []
    assert candidate_ladder(Predictors({"step_reuse": ReuseEvidence(reuse_depths={1: ReuseDepth(1, "up.2", tuple(drifting), cost=0.2)})}), "speed") == []
    assert Predictors({"step_reuse": ReuseEvidence(few)}).damage("step_reuse", 0.2) == math.inf  # 0.8 of a step: none reused
    assert Predictors({"step_reuse": ReuseEvidence(few)}).damage("step_reuse", 0.25) == pytest.approx(0.1)


def test_bad_calibration_inputs_say_what_was_expected() -> None:
    with pytest.raises(FragmentError, match="held-out seeds must differ"):
        calibrate(LADDER, lambda c, s: Judgement(True), calibration_seeds=[0, 1], holdout_seeds=[1])
    with pytest.raises(FragmentError, match="calibration goal: expected one of memory, speed, both, found 'fast'"):
        goal_levers("fast")
    with pytest.raises(FragmentError, match="budget images: expected an integer >= 1"):
        Budget(images=0)


def test_the_ladder_follows_the_profile_scores() -> None:
    # heads whose scores carry little mass go first; FF channels likewise; a lever without data is not offered
    predictors = Predictors({"heads": {"a": torch.tensor([0.01, 0.01, 1.0, 1.0])},
                             "ff": {"f": torch.tensor([5.0, 5.0, 5.0, 5.0])}})
    ladder = candidate_ladder(predictors, "memory", levels=(0.2, 0.1))
    assert ladder[0].amount("heads") == pytest.approx(0.5) and ladder[0].amount("step_reuse") == 0.0 and ladder[0].amount("precision") == 0.0
    assert candidate_ladder(predictors, "speed") == []  # speed moves step reuse, which these predictors lack
    assert predictors.damage("heads", 0.5) == pytest.approx(math.sqrt(0.02 / 2.02))
    assert predictors.damage("ff", 0.25) == pytest.approx(0.5)  # uniform channels: a quarter of the energy
    assert all(c.amount("ff") == 0.0 for c in ladder)
    damages = [predictors.damage("heads", c.amount("heads")) for c in ladder]
    assert damages == sorted(damages, reverse=True)


def test_slack_is_the_smallest_relative_room() -> None:
    limits = [Limit("ssim_mean", 0.9, "min"), Limit("lpips_mean", 0.04, "max")]
    assert slack({"ssim_mean": 0.99, "lpips_mean": 0.02}, limits) == pytest.approx(0.1)
    assert slack({"ssim_mean": 0.81, "lpips_mean": 0.02}, limits) == pytest.approx(-0.1)
    assert slack({"ssim_mean": 0.81}, limits) is None


def test_amortized_costs_count_the_profiled_images_as_output() -> None:
    s, f, setup, p = 1.0, 0.25, 16.0, 8
    costs = amortized_costs(stock_s_per_image=s, fragment_s_per_image=f, profile_s=12.0, profiled_images=p,
                            build_s=1.0, calibrate_s=3.0)
    assert [r["n"] for r in costs["rows"]] == [8, 16, 32, 64, 128]
    for row in costs["rows"]:
        assert row["pack_s"] == pytest.approx(setup + f * max(row["n"] - p, 0))
        assert row["amortized_ratio"] == pytest.approx(s * row["n"] / row["pack_s"])
    brute = next(n for n in range(p, 10_000) if setup + f * (n - p) <= s * n)
    assert costs["break_even_images"] == brute
    never = amortized_costs(stock_s_per_image=1.0, fragment_s_per_image=1.5, profile_s=12.0, profiled_images=8,
                            build_s=0.0, calibrate_s=0.0)
    assert never["break_even_images"] is None and never["verdict"].startswith("never")
    with pytest.raises(FragmentError, match="profile_s: expected a finite number >= 0, found nan"):
        amortized_costs(stock_s_per_image=1.0, fragment_s_per_image=0.5, profile_s=float("nan"), profiled_images=1,
                        build_s=0.0, calibrate_s=0.0)


def test_the_calibrated_reference_fragment_passes_fresh_seeds_and_records_its_judge() -> None:
    pytest.importorskip("diffusers")
    from prompt_fragments.defaults import DEFAULT_PROMPT, DEFAULT_THRESHOLDS
    from prompt_fragments.fragment.build import describe_base
    from prompt_fragments.fragment.extract import calibrated_fragment
    from prompt_fragments.judge.fragment_judge import fragment_judge, render
    from prompt_fragments.judge.reference_target import ReferenceTarget
    from prompt_fragments.judge.thresholds import load_thresholds
    from prompt_fragments.profiling.evidence import ProfileEvidence
    from prompt_fragments.profiling.ff_profiler import FFProfiler
    from prompt_fragments.profiling.profiler import HeadProfiler
    from prompt_fragments.profiling.step_change import StepChangeProbe

    limits = load_thresholds(DEFAULT_THRESHOLDS)["quality_gate"]
    target = ReferenceTarget(DEFAULT_PROMPT, limits=limits, steps=8)
    unet, seeds = target.unet, [0, 1, 2, 3]
    with HeadProfiler(unet) as prof, FFProfiler(unet) as ff, StepChangeProbe(unet) as probe, torch.no_grad():
        full = target.run(unet, seeds)
    judge = fragment_judge(unet, target.run, target.judge, seeds, full)
    fragment, cal = calibrated_fragment(
        ProfileEvidence(prof.result(), ff_scores=ff.scores(), step_changes=probe.changes(),
                        step_timesteps=probe.timesteps()), unet, judge, base=describe_base(unet, "reference"),
        name="cal", calibration_seeds=seeds, holdout_seeds=[40, 41], goal="both", budget=Budget(images=30),
        judge_name="quality gate")
    assert cal.images <= 30 and cal.tries
    refinement = fragment.manifest["quality"]["refinement"] if fragment is not None else cal.record()
    assert refinement["judge"] == "quality gate" and refinement["holdout_seeds"] == [40, 41]
    assert refinement["calibration_seeds"] == seeds
    if fragment is None:
        assert cal.status == "fallback_full_model"
        return
    assert fragment.manifest["quality"]["quality_gate"] == "passed"
    confirmed = cal.confirmed
    assert confirmed["seeds"] == [40, 41] and confirmed["passed"]
    # the judged figures are the fragment's: rendering again on the held-out seeds gives the recorded SSIM
    images, _ = render(unet, fragment, [40, 41], target.run)
    again = target.judge(target.run(unet, [40, 41]), images)[1]
    assert again["ssim_mean"] == pytest.approx(confirmed["metrics"]["ssim_mean"], abs=1e-6)
    assert np.isfinite(again["ssim_mean"]) and again["ssim_mean"] >= limits["ssim_min"]
