"""Tier 1: the confirmation moved into the batch (issue #26: judging inside the batch, a warm start that only
confirms, the audit's verdict kept by the prior).

``calibrate(..., confirm_in_batch=True)`` makes no held-out try and no CFG try; a warm start makes no try at all;
the running audit leads the batch with the rule's fewest audits, and its verdict goes into the prior, which moves
the next prompt's start.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from prompt_fragments.errors import FragmentError
from prompt_fragments.fragment.audit import FULL, AuditedBatch, AuditRecord, AuditRule, run_audited
from prompt_fragments.fragment.calibration import Budget, Candidate, Judgement, calibrate
from prompt_fragments.fragment.library.prior import (PriorKey, PriorPlace, audit_tries, calibrate_with_prior,
                                                      load_prior, priors_dir, prompt_digest, record_audit)

KEY = PriorKey("cd" * 32, "ddim", "trailing", 25, 64, 3.0)
LEVELS = (0.6, 0.45, 0.35, 0.27, 0.2, 0.15, 0.11, 0.08)
LADDER = [Candidate({"step_reuse": level}, level=level) for level in LEVELS]
JUDGE = "toy gate"


def counting_judge(limit: float):
    """Passes a candidate whose level is at most ``limit``; records every (label, seeds) it judged."""
    calls: list[tuple[str, list[int]]] = []

    def judge(candidate: Candidate, seeds) -> Judgement:
        calls.append((candidate.label, list(seeds)))
        return Judgement(candidate.level <= limit, slack=(limit - candidate.level) / limit)
    return judge, calls


def test_a_warm_start_confirmed_in_the_batch_makes_no_try_and_carries_the_weakest_cut_off() -> None:
    judge, calls = counting_judge(0.3)
    cal = calibrate(LADDER, judge, calibration_seeds=[0, 1], holdout_seeds=[9], goal="speed", start=2,
                    confirm_only=True, confirm_in_batch=True, cfg_cutoffs=(500.0, 350.0, 200.0))
    assert calls == [] and cal.tries == [] and cal.units == 0.0 and cal.delivered == 0
    assert cal.status == "in_batch" and cal.warm_start == 2
    assert cal.chosen.level == 0.35 and cal.chosen.levers["cfg_cutoff"] == 200.0
    assert "the running audit confirms it in the batch" in cal.reason
    assert cal.record()["start"] == "warm (prior)" and cal.record()["chosen"]["cfg_cutoff"] == 200.0


def test_a_cold_start_in_batch_picks_the_search_start_untried_whatever_the_budget() -> None:
    judge, calls = counting_judge(0.3)
    for budget in (Budget.for_batch(32, 2.0, spent_u=15.0), Budget(images=48)):
        cal = calibrate(LADDER, judge, calibration_seeds=[0, 1], holdout_seeds=[9], goal="memory", budget=budget,
                        confirm_in_batch=True)
        assert calls == [] and cal.tries == [] and cal.status == "in_batch" and cal.warm_start is None
        assert cal.chosen == LADDER[4] and "untried" in cal.reason
    # a caller's start (below earlier prompts' failures) is where a cold pick lands
    cal = calibrate(LADDER, judge, calibration_seeds=[0], holdout_seeds=[9], goal="memory", start=6,
                    confirm_in_batch=True)
    assert cal.chosen == LADDER[6] and cal.warm_start is None and "below the earlier prompts' failures" in cal.reason
    # the judged path, on the tight budget, keeps the full model
    judged = calibrate(LADDER, judge, calibration_seeds=[0, 1], holdout_seeds=[9], goal="memory",
                       budget=Budget.for_batch(32, 2.0, spent_u=15.0))
    assert judged.chosen is None and judged.reason.startswith("budget spent before the first try")


def test_no_ladder_in_batch_is_the_cut_off_on_the_full_model_or_nothing() -> None:
    judge, _ = counting_judge(0.3)
    cal = calibrate([], judge, calibration_seeds=[0], holdout_seeds=[9], goal="speed", confirm_in_batch=True,
                    cfg_cutoffs=(500.0, 200.0))
    assert cal.status == "in_batch" and cal.chosen.levers == {"cfg_cutoff": 200.0}
    none = calibrate([], judge, calibration_seeds=[0], holdout_seeds=[9], goal="memory", confirm_in_batch=True)
    assert none.chosen is None and none.status == "fallback_full_model" and none.reason.startswith("no lever candidate")


def batch_of(label: str, verdicts: list[bool], switched: bool, slacks: list[float] | None = None) -> AuditedBatch:
    records = [AuditRecord(100 + i, i, label, ok, {"ssim": 0.9} if slacks is None else {"gate_slack": slacks[i]})
               for i, ok in enumerate(verdicts)]
    switches = [(len(verdicts) - 1, label, FULL)] if switched else []
    return AuditedBatch(list(range(100, 132)), [None] * 32, [label] * 32, records, switches)


def test_the_audit_verdict_is_a_judged_try_that_moves_the_next_prompts_start(tmp_path) -> None:
    chosen = LADDER[2].with_levers(cfg_cutoff=350.0)
    place = PriorPlace(tmp_path, KEY, "a red circle")
    # a failed audit (switched to the full model) is a failing try at the rung's level, cut-off included
    prior = record_audit(place, chosen, batch_of("frag", [False] * 3, switched=True), JUDGE)
    assert prior is not None and len(prior.tries) == 1
    (t,) = prior.tries
    assert (t["phase"], t["passed"], t["level"], t["cfg"], t["seeds"], t["prompt"]) == \
        ("audit", False, 0.35, True, 3, prompt_digest("a red circle"))
    assert t["levers"]["cfg_cutoff"] == 350.0 and t["judge"] == JUDGE
    # read back from disk: the audit phase is a valid try of the prior's schema
    again = load_prior(tmp_path, KEY)
    assert again.tries == prior.tries
    # the next prompt starts below the failed level, cold, and without the failed cut-off
    start, warm = again.start(LADDER, judge=JUDGE)
    assert not warm and LADDER[start].level < 0.35
    # the cut-off that failed, and every later one, is out of the plan; an earlier one nobody failed stays
    assert again.cfg_plan((500.0, 350.0, 200.0), judge=JUDGE) == (200.0,)
    # a second prompt passes its audit at 0.2: the first prompt, which only failed at 0.35, says nothing about 0.2
    # (the prior never extrapolates), so the start stays cold there
    record_audit(PriorPlace(tmp_path, KEY, "a blue square"), LADDER[4].with_levers(cfg_cutoff=200.0),
                 batch_of("frag", [True, True, True], switched=False), JUDGE)
    after = load_prior(tmp_path, KEY)
    assert after.start(LADDER, judge=JUDGE) == (4, False)
    assert after.cfg_plan((500.0, 350.0, 200.0), judge=JUDGE) == (200.0,)
    # another judge's audits say nothing to this one
    assert after.start(LADDER, judge="decoded SSIM") == (None, False)


def test_a_passed_audit_keeps_its_slack_and_a_thin_one_starts_one_rung_weaker(tmp_path) -> None:
    # the audit's per-image gate slack, averaged: a pass inside the prior's margin (0.05) is not a warm start at its
    # own level, only at the next weaker rung
    place = PriorPlace(tmp_path, KEY, "a red circle")
    prior = record_audit(place, LADDER[2], batch_of("frag", [True] * 3, False, slacks=[0.01, 0.02, 0.03]), JUDGE)
    assert prior.tries[0]["slack"] == pytest.approx(0.02)
    assert prior.start(LADDER, judge=JUDGE) == (3, True)
    other = tmp_path / "other"
    prior = record_audit(PriorPlace(other, KEY, "a red circle"), LADDER[2],
                         batch_of("frag", [True] * 3, False, slacks=[0.1, 0.2, 0.3]), JUDGE)
    assert prior.tries[0]["slack"] == pytest.approx(0.2) and prior.start(LADDER, judge=JUDGE) == (2, True)


def test_when_earlier_prompts_failed_every_rung_the_pick_is_the_cut_off_alone_or_the_full_model(tmp_path) -> None:
    for i, level in enumerate((0.2, 0.08)):  # the weakest rung failed too (prompt 2)
        record_audit(PriorPlace(tmp_path, KEY, f"prompt {i}"), Candidate({"step_reuse": level}, level=level),
                     batch_of("frag", [False] * 3, switched=True), JUDGE)
    prior = load_prior(tmp_path, KEY)
    assert prior.start(LADDER, judge=JUDGE) == (len(LADDER), False)
    judge, calls = counting_judge(0.3)
    run = dict(directory=tmp_path, key=KEY, calibration_seeds=[0], holdout_seeds=[9], judge_name=JUDGE,
               confirm_in_batch=True)
    cut = calibrate_with_prior(LADDER, judge, prompt="p", goal="speed", cfg_cutoffs=(350.0, 200.0), **run)
    assert cut.status == "in_batch" and cut.chosen.levers == {"cfg_cutoff": 200.0}
    assert "the cut-off alone (earlier prompts failed every rung)" in cut.reason
    full = calibrate_with_prior(LADDER, judge, prompt="q", goal="memory", **run)
    assert full.chosen is None and "failed every rung and every cut-off" in full.reason and calls == []


def test_no_audit_records_no_try_and_a_hostile_try_is_refused(tmp_path) -> None:
    place = PriorPlace(tmp_path, KEY, "a red circle")
    assert audit_tries(LADDER[0], None, "ab" * 8, JUDGE) == []
    assert record_audit(place, LADDER[0], AuditedBatch([1], [None], ["x"]), JUDGE) is None
    # one failed audit could not have switched: no verdict either way
    assert record_audit(place, LADDER[0], batch_of("frag", [False], switched=False), JUDGE) is None
    assert not priors_dir(tmp_path).exists()
    record_audit(place, LADDER[0], batch_of("frag", [True] * 3, switched=False), JUDGE)
    path = priors_dir(tmp_path) / KEY.file_name
    data = json.loads(path.read_text())
    data["tries"][0]["phase"] = "guess"
    path.write_text(json.dumps(data))
    with pytest.raises(FragmentError, match=r"tries\[0\]\.phase: expected 'calibration', 'holdout', 'audit' or 'pick'"):
        load_prior(tmp_path, KEY)


def test_calibrate_with_prior_in_batch_goes_warm_after_a_passed_audit(tmp_path) -> None:
    judge, calls = counting_judge(0.3)
    run = dict(directory=tmp_path, key=KEY, calibration_seeds=[0, 1], holdout_seeds=[9], goal="speed",
               judge_name=JUDGE, confirm_in_batch=True, cfg_cutoffs=(500.0, 200.0))
    first = calibrate_with_prior(LADDER, judge, prompt="a red circle", **run)
    assert first.warm_start is None and first.chosen.level == 0.2 and first.chosen.levers["cfg_cutoff"] == 200.0
    assert calls == [] and first.tries == []
    record_audit(PriorPlace(tmp_path, KEY, "a red circle"), first.chosen,
                 batch_of("frag", [True] * 3, switched=False), JUDGE)
    second = calibrate_with_prior(LADDER, judge, prompt="a blue square", **run)
    assert calls == [] and second.tries == []
    assert second.status == "in_batch" and second.warm_start == 4 and second.record()["start"] == "warm (prior)"
    assert second.chosen.level == 0.2 and second.chosen.levers["cfg_cutoff"] == 200.0


def full_image(seed: int) -> torch.Tensor:
    return torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_the_lead_audits_the_first_images_and_switches_before_the_batch_is_made_of_a_bad_setting() -> None:
    seeds = list(range(200, 224))
    fragment_renders: list[list[int]] = []

    def render_fragment(setting: str, group):
        fragment_renders.append(list(group))
        return torch.stack([full_image(s) + (1.0 if setting == "bad" else 0.0) for s in group])

    def render_full(group):
        return torch.stack([full_image(s) for s in group])

    def compare(full, frag):
        error = float((full - frag).abs().mean())
        return error < 0.5, {"error": error}

    batch = run_audited(seeds, render_fragment, render_full, compare, AuditRule(), [], setting="bad", every=len(seeds),
                        lead=AuditRule().min_audits, block=8)
    assert [r.index for r in batch.records] == [0, 1, 2] and batch.switched_at == 2
    assert batch.setting == [FULL] * len(seeds)  # past the last fallback: the full model renders the rest
    assert_close(torch.stack(batch.images), render_full(seeds))
    # the bad setting rendered the lead alone, judged before the rest of the batch
    assert fragment_renders == [seeds[:3]]
    good = run_audited(seeds, lambda s, g: render_full(g), render_full, compare, AuditRule(), [], setting="ok",
                       every=10, lead=3, block=8)
    # the lead (0, 1, 2), then every 10th after its last: 12, 22
    assert [r.index for r in good.records] == [0, 1, 2, 12, 22] and good.switched_at is None
    with pytest.raises(FragmentError, match="lead >= 0"):
        run_audited(seeds, render_fragment, render_full, compare, setting="bad", every=2, lead=-1)


@pytest.mark.parametrize("images, allowance, extra", [(125, 6.0, 9), (61, 2.5, 2), (32, 1.5, 0), (24, 100.0, 10)])
def test_the_interval_after_a_lead_audits_what_the_allowance_pays_for(images, allowance, extra) -> None:
    from prompt_fragments.fragment.audit import lead_interval

    # at 2x raw an audit wastes 0.5 u: the lead's 3 take 1.5 u, the rest pays for `extra` more (at most every 2nd)
    every = lead_interval(2.0, images, 3, allowance)
    def full(group):
        return torch.stack([full_image(s) for s in group])

    batch = run_audited(range(images), lambda setting, group: full(group), full, lambda a, b: (True, {}), setting="ok",
                        every=every, lead=3)
    indices = [r.index for r in batch.records]
    assert indices[:3] == [0, 1, 2] and len(indices) == 3 + extra


def test_a_judged_pick_is_tried_on_the_profiled_seeds_and_steps_one_rung_weaker_on_a_failure() -> None:
    """``judge_pick``: the pick is judged on the calibration (profiled) seeds only, no held-out seed is rendered, a
    failure moves one rung weaker, and the audit needs no lead once a try passed (``Calibration.untried``)."""
    judge, calls = counting_judge(0.3)
    cal = calibrate(LADDER, judge, calibration_seeds=[0, 1], holdout_seeds=[9], goal="memory",
                    confirm_in_batch=True, judge_pick=True)
    assert calls == [(LADDER[4].label, [0, 1])] and cal.chosen == LADDER[4]  # the cold start's rung, passed
    assert cal.status == "in_batch" and not cal.untried and cal.delivered == 0 and cal.images == 2
    assert cal.record()["method"] == "predicted rung, judged on the profiled seeds, confirmed by the running audit of the batch"
    assert "passed on the profiled seeds" in cal.reason and cal.record()["untried"] is False
    judge, calls = counting_judge(0.3)
    cal = calibrate(LADDER, judge, calibration_seeds=[0, 1], holdout_seeds=[9], goal="memory", start=1,
                    confirm_in_batch=True, judge_pick=True)
    assert [label for label, _ in calls] == [c.label for c in LADDER[1:4]] and cal.chosen == LADDER[3]
    assert [t["passed"] for t in cal.tries] == [False, False, True] and {t["phase"] for t in cal.tries} == {"pick"}
    assert not cal.untried and f"failed on the profiled seeds; {LADDER[3].label}, 2 rung(s) weaker, passed them" in cal.reason


def test_a_judged_pick_gives_up_to_the_full_model_and_a_refused_try_leaves_the_pick_untried() -> None:
    from prompt_fragments.fragment.calibration import PICK_TRIES

    judge, calls = counting_judge(0.01)
    cal = calibrate(LADDER, judge, calibration_seeds=[0], holdout_seeds=[9], goal="memory", start=0,
                    confirm_in_batch=True, judge_pick=True)
    assert len(calls) == PICK_TRIES and cal.chosen is None and cal.status == "fallback_full_model"
    assert f"{PICK_TRIES} rungs failed" in cal.reason and not cal.untried
    assert cal.record()["method"] == "predicted rung, judged on the profiled seeds: none passed"
    judge, calls = counting_judge(0.01)  # the weakest rung fails: nothing weaker to try
    cal = calibrate(LADDER, judge, calibration_seeds=[0], holdout_seeds=[9], goal="memory", start=len(LADDER) - 1,
                    confirm_in_batch=True, judge_pick=True)
    assert len(calls) == 1 and cal.chosen is None and cal.reason == "no rung passed its try on the profiled seeds"
    # a budget that cannot pay for the try: the pick stays, untried, and the audit must lead
    judge, calls = counting_judge(0.3)
    cal = calibrate(LADDER, judge, calibration_seeds=[0, 1], holdout_seeds=[9], goal="memory",
                    budget=Budget(images=1), confirm_in_batch=True, judge_pick=True)
    assert calls == [] and cal.chosen == LADDER[4] and cal.untried and "budget refused" in cal.reason
    # a failed try then a refused one: the weaker rung is kept untried, and says so
    judge, calls = counting_judge(0.3)
    cal = calibrate(LADDER, judge, calibration_seeds=[0, 1], holdout_seeds=[9], goal="memory", start=2,
                    budget=Budget(images=3), confirm_in_batch=True, judge_pick=True)
    assert len(calls) == 1 and cal.chosen == LADDER[3] and cal.untried and "budget refused" in cal.reason
    assert cal.record()["method"] == "predicted rung, untried, confirmed by the running audit of the batch"
    assert cal.record()["untried"] is True


def test_a_failed_pick_moves_the_next_prompt_weaker_and_keeps_the_cut_off_it_passed_with(tmp_path) -> None:
    """A judged pick's tries carry the cut-off (goal speed): its failure is held against its rung (``predict``), and
    the same prompt's pass with that cut-off one rung weaker keeps the cut-off in the next prompt's plan."""
    judge, calls = counting_judge(0.15)
    run = dict(directory=tmp_path, key=KEY, calibration_seeds=[0, 1], holdout_seeds=[9], goal="speed",
               confirm_in_batch=True, judge_pick=True, cfg_cutoffs=(500.0, 350.0), judge_name=JUDGE)
    first = calibrate_with_prior(LADDER, judge, prompt="a red circle", **run)
    assert [t["phase"] for t in first.tries] == ["pick", "pick"] and first.chosen.level == 0.15
    assert all(t["candidate"]["cfg_cutoff"] == 350.0 for t in first.tries)
    prior = load_prior(tmp_path, KEY)
    assert prior.cfg_plan((500.0, 350.0), judge=JUDGE) == (500.0, 350.0)  # the failure was the rung's
    assert prior.predict(LADDER, judge=JUDGE)[4] is False  # 0.2 failed with the cut-off on top: held against it
    second = calibrate_with_prior(LADDER, counting_judge(0.15)[0], prompt="a blue square", **run)
    assert second.chosen.level < 0.2 and second.chosen.levers["cfg_cutoff"] == 350.0
    # without the pass, the failure vetoes the cut-off too (the safe side, as a failed audit does)
    other = tmp_path / "other"
    calibrate_with_prior(LADDER, counting_judge(0.01)[0], prompt="a red circle", **{**run, "directory": other})
    assert load_prior(other, KEY).cfg_plan((500.0, 350.0), judge=JUDGE) == ()
