"""Tier 1: the cost model in u (metrics/costs.py) and the calibration's budget from what the batch can repay."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings, strategies as st

from prompt_fragments.errors import FragmentError
from prompt_fragments.fragment.audit import planned_audits
from prompt_fragments.fragment.calibration import Budget, Candidate, Judgement, calibrate
from prompt_fragments.metrics.costs import (BatchTimes, CostLedger, amortized_ratio, batch_costs, break_even_images,
                                            calibration_costs, cost_line, extraction_costs, repayable_units)


def test_ledger_counts_kept_full_model_images_as_output_not_overhead():
    # stock image = 0.4 s. Profile run of 8 seeds took 4.0 s: 8 * 0.4 = 3.2 s are the user's images, 0.8 s hooks.
    ledger = CostLedger(unit_s=0.4)
    ledger.add("profile_hooks", 4.0, images=8, delivered=8)
    ledger.add("judged", 1.2, images=8)  # 8 candidate images: all overhead
    ledger.add("reference", 1.6, images=4, delivered=4)  # 4 held-out references, kept: no overhead
    ledger.add("build", 0.2)
    assert ledger.overhead_s == pytest.approx(0.8 + 1.2 + 0.0 + 0.2)
    assert ledger.overhead_u == pytest.approx(2.2 / 0.4)
    assert ledger.delivered == 12
    record = ledger.record(raw_ratio=2.0, n=32)
    assert record["by_kind"]["profile_hooks"]["overhead_u"] == pytest.approx(2.0)
    assert record["by_kind"]["reference"]["overhead_s"] == 0.0
    # 5.5 u over a saving of 0.5 u per fragment image, after the 12 kept images: 12 + 11 = 23
    assert record["break_even_images"] == 23
    # 32 stock u against 5.5 + 12 + 20 / 2 = 27.5 u
    assert record["amortized_ratio"] == pytest.approx(32 / 27.5)


def test_repayable_break_even_and_amortized_by_hand():
    assert repayable_units(32, 2.0) == 16.0
    assert repayable_units(32, 4.0, delivered=12) == 15.0  # 20 images saving 3/4 u each
    assert repayable_units(32, 1.0) == 0.0 and repayable_units(8, 2.0, delivered=12) == 0.0
    assert break_even_images(2.8, 2.0) == 6  # 2.8 / 0.5 = 5.6 -> image 6
    assert break_even_images(3.0, 4.0, delivered=8) == 12  # 8 + 3 / 0.75
    assert break_even_images(0.5, 0.9) is None
    assert break_even_images(0.0, 0.9, delivered=3) == 3
    assert amortized_ratio(2.8, 2.0, 32) == pytest.approx(32 / 18.8)
    # the repayable overhead is exactly what leaves the batch at break-even
    assert break_even_images(repayable_units(32, 2.0, 8), 2.0, 8) == 32
    assert amortized_ratio(repayable_units(32, 2.0, 8), 2.0, 32, 8) == pytest.approx(1.0)
    # the calibration's budget (core, which cannot import metrics) does the same arithmetic
    for n, r, d in ((32, 2.0, 8), (32, 1.3, 0), (8, 3.0, 12), (16, 0.8, 0)):
        assert Budget.for_batch(n, r, delivered=d).units == pytest.approx(repayable_units(n, r, d))


def test_cost_line_says_spent_and_pay_back():
    ledger = CostLedger(0.5)
    ledger.add("judged", 1.5, images=4)
    assert cost_line(ledger, 2.0, 32) == ("spent 3.0 u (1.5 s), pays back from image 6 at 2.00x raw; "
                                          "amortized 1.68x at N=32")
    assert "never pays back" in cost_line(ledger, 1.0, 32)


@pytest.mark.parametrize("call, where", [
    (lambda: CostLedger(0.0), "unit_s"),
    (lambda: CostLedger(1.0).add("lunch", 1.0), "kind"),
    (lambda: CostLedger(1.0).add("judged", -1.0), "judged seconds"),
    (lambda: CostLedger(1.0).add("reference", 1.0, images=2, delivered=3), r"delivered \(3\) exceeds"),
    (lambda: repayable_units(32, float("nan")), "raw_ratio"),
    (lambda: Budget.for_batch(0, 2.0), "budget batch"),
    (lambda: Budget(raw_ratio=-1.0), "budget raw_ratio"),
])
def test_bad_cost_inputs_say_where(call, where):
    with pytest.raises(FragmentError, match=where):
        call()


def _ladder(n: int = 10) -> list[Candidate]:
    return [Candidate({"heads": round(0.5 * (n - i) / n, 3)}, level=0.5 * (n - i) / n) for i in range(n)]


def _costed_judge(limit: float, per_image_s: float, stop_after: int | None = None):
    """Passes heads <= limit; reports the images it rendered (a sequential stop renders fewer) and their seconds."""
    def judge(candidate: Candidate, seeds):
        images = len(seeds) if stop_after is None or candidate.amount("heads") <= limit else min(stop_after, len(seeds))
        heads = candidate.amount("heads")
        return Judgement(heads <= limit, slack=(limit - heads) / limit if limit else None, images=images,
                         seconds=images * per_image_s)
    return judge


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 96), raw=st.floats(1.05, 4.0), held=st.integers(1, 4), spent=st.floats(0.0, 6.0),
       per_image_u=st.floats(0.2, 1.0), limit=st.floats(0.0, 0.5), stop=st.sampled_from([None, 1, 2]))
def test_calibration_never_spends_more_than_the_batch_can_repay(n, raw, held, spent, per_image_u, limit, stop):
    unit_s = 0.5
    seeds, holdout = list(range(4)), list(range(100, 100 + held))
    budget = Budget.for_batch(n, raw, delivered=len(seeds) + held, spent_u=spent, unit_s=unit_s, images=200)
    cal = calibrate(_ladder(), _costed_judge(limit, per_image_u * unit_s, stop), calibration_seeds=seeds,
                    holdout_seeds=holdout, budget=budget, goal="speed", cfg_cutoffs=(500.0, 200.0))
    assert cal.units <= budget.units + 1e-9
    assert cal.units == pytest.approx(sum(t["units"] for t in cal.tries), abs=1e-3)  # tries keep 4 decimals


def test_calibration_stops_when_the_next_try_cannot_pay_back_and_counts_judge_costs():
    # 32 images at 2x, 12 delivered: (32 - 12) * 0.5 = 10 u. Each 4-seed try costs 4 images * 0.75 u = 3 u,
    # so three tries fit (9 u) and a fourth (12 u) does not.
    budget = Budget.for_batch(32, 2.0, delivered=12, unit_s=0.5, images=500)
    cal = calibrate(_ladder(20), _costed_judge(0.0, 0.375), calibration_seeds=[0, 1, 2, 3], holdout_seeds=[9],
                    budget=budget, goal="memory")  # 20 rungs, all failing: a search of 4 tries
    assert budget.units == 10.0
    assert [t["units"] for t in cal.tries] == [3.0, 3.0, 3.0]
    assert cal.units == 9.0 and cal.chosen is None
    assert "repays 10.0 u" in cal.reason
    # with a tiny batch nothing is tried at all: the full model is the answer
    small = calibrate(_ladder(), _costed_judge(0.5, 0.375), calibration_seeds=[0, 1, 2, 3], holdout_seeds=[9],
                      budget=Budget.for_batch(8, 2.0, delivered=5, unit_s=0.5), goal="memory")
    assert small.tries == [] and small.chosen is None and small.reason.startswith("budget spent before the first try")


def test_calibration_counts_the_images_the_judge_rendered_and_delivers_references():
    # a sequential stop renders 1 of 4 seeds on a failing candidate; held-out references are delivered, not overhead
    cal = calibrate(_ladder(), _costed_judge(0.2, 0.25, stop_after=1), calibration_seeds=[0, 1, 2, 3],
                    holdout_seeds=[7, 8], budget=Budget(images=100, unit_s=0.5), goal="memory")
    assert cal.chosen is not None and cal.chosen.amount("heads") == 0.2
    failing = [t for t in cal.tries if not t["passed"]]
    assert failing and all(t["images"] == 1 for t in failing)
    holdout = next(t for t in cal.tries if t["phase"] == "holdout")
    assert holdout["images"] == 2 + 2 and cal.delivered == 2
    # the judge's seconds (2 images * 0.25 s) less the 2 delivered references' 2 * 0.5 s: no overhead left
    assert holdout["units"] == 0.0
    assert cal.images == sum(t["images"] for t in cal.tries)
    # with no unit measured, a judged image costs image_u
    unitless = calibrate(_ladder(), _costed_judge(0.2, 0.25), calibration_seeds=[0, 1], holdout_seeds=[7],
                         budget=Budget(images=100, image_u=0.5), goal="memory")
    assert unitless.units == pytest.approx(0.5 * sum(t["images"] - (1 if t["phase"] == "holdout" else 0)
                                                     for t in unitless.tries))


def test_the_batch_audit_a_pick_will_get_counts_in_its_cost_line() -> None:
    cal = SimpleNamespace(seconds=0.0, images=0, delivered=0, chosen="heads 10%")
    audits = planned_audits(2.0, 31, lead=3)
    _, without = calibration_costs(cal, unit_s=1.0, n=32, raw_ratio=2.0)
    line, with_audit = calibration_costs(cal, unit_s=1.0, n=32, raw_ratio=2.0, planned_audits=audits)
    # each audit: a full-model image the user keeps (delivered) and a fragment render thrown away (1/2 u)
    assert with_audit["overhead_u"] - without["overhead_u"] == pytest.approx(audits / 2.0)
    assert with_audit["delivered"] - without["delivered"] == audits == 3
    assert with_audit["amortized_ratio"] < without["amortized_ratio"] and "3 planned audits" in with_audit["audit"]
    kept = SimpleNamespace(seconds=0.0, images=0, delivered=0, chosen=None)  # the full model: nothing to audit
    assert calibration_costs(kept, unit_s=1.0, n=32, raw_ratio=2.0, planned_audits=3)[1]["audit"] == "none planned"


def _extraction(**kinds: dict) -> dict:
    """A manifest ``performance`` block as the extractor writes it (``calibration_costs``' record)."""
    return {"calibration": {"start": "cold", "ledger": {"unit_s": 0.5, "overhead_u": 99.0, "by_kind": kinds}}}


def test_batch_costs_measure_u_and_the_raw_ratio_in_the_batch_and_count_the_audits_by_hand() -> None:
    # 32 images: 32 fragment renders in 8.0 s (0.25 s each), 3 of them audited (their full-model renders, 1.5 s,
    # are the images the user keeps); 1.0 s of the wall is the audits' comparisons.
    times = BatchTimes(images=32, wall_s=10.5, fragment_s=8.0, fragment_images=32, kept=29, full_s=1.5, full_images=3)
    line, record = batch_costs(times)
    assert record["unit_s"] == pytest.approx(0.5) and record["raw_ratio"] == pytest.approx(2.0)
    # overhead: 3 wasted fragment renders (0.75 s) + 1.0 s rest; the full renders are delivered (3 u of output)
    batch = record["batch"]
    assert batch["overhead_s"] == pytest.approx(1.75) and batch["delivered"] == 3
    assert batch["amortized_ratio"] == pytest.approx(32 / (3.5 + 3 + 29 / 2.0))
    # the amortized figure is the batch's own wall clock against 32 stock images (the model is exact here)
    assert batch["amortized_ratio"] == pytest.approx(32 * 0.5 / 10.5)
    assert "fragment 2.00x raw" in line and "1.52x of stock for 32 images" in line
    assert "with_extraction" not in record


def test_batch_costs_follow_their_inputs() -> None:
    # the printed figures are computed: a slower fragment, a dearer audit, each moves them
    base = dict(images=32, wall_s=10.5, fragment_s=8.0, fragment_images=32, kept=29, full_s=1.5, full_images=3)
    ratios = {batch_costs(BatchTimes(**{**base, **change}))[1]["raw_ratio"]
              for change in ({}, {"fragment_s": 12.0, "wall_s": 14.5}, {"full_s": 3.0, "wall_s": 12.0})}
    assert len(ratios) == 3
    slow = batch_costs(BatchTimes(**{**base, "fragment_s": 16.0, "wall_s": 18.5}))[0]
    assert "fragment 1.00x raw" in slow


def test_batch_costs_add_the_extraction_and_move_its_given_rows_into_the_batch() -> None:
    times = BatchTimes(images=32, wall_s=8.0, fragment_s=8.0, fragment_images=31, kept=31, given=1)
    perf = _extraction(reference={"seconds": 0.5, "images": 1, "delivered": 0, "overhead_s": 0.5},
                       judged={"seconds": 3.0, "images": 6, "delivered": 2, "overhead_s": 2.0},
                       profile_hooks={"seconds": 0.5, "images": 1, "delivered": 1, "overhead_s": 0.0},
                       audit={"seconds": 2.25, "images": 6, "delivered": 3, "overhead_s": 0.75})
    extraction = extraction_costs(perf)
    assert extraction is not None and "audit" not in extraction["by_kind"]  # the estimate: the batch times its own
    line, record = batch_costs(times, extraction)
    # no audit: u is the extractor's (0.5 s); raw = 0.5 / (8.0 / 31)
    assert record["unit_s"] == 0.5 and record["raw_ratio"] == pytest.approx(0.5 / (8.0 / 31))
    assert "timed by the extractor" in line
    whole = record["with_extraction"]
    # the reference check's image is the batch's given row (delivered, not overhead); the judged tries' 3.0 s are
    # all overhead here, since their 2 held-out references are not rows of this batch; the profiled image is outside
    # the batch and its hooks were not measured (0 s)
    assert whole["overhead_s"] == pytest.approx(0.0 + 3.0 + 0.0)
    assert whole["delivered"] == 1 and whole["start"] == "cold"
    assert whole["amortized_ratio"] == pytest.approx(32 / (6.0 + 1 + 31 / record["raw_ratio"]))
    assert "with the extraction (cold): spent 6.0 u" in line


def test_batch_costs_without_a_timed_full_model_image_print_no_line() -> None:
    times = BatchTimes(images=8, wall_s=2.0, fragment_s=2.0, fragment_images=8, kept=8)
    assert batch_costs(times) == (None, {"unit_s": None,
                                         "note": "no full-model image of these settings was timed: no cost in u"})
    # the extractor timed other sampler settings than this batch's: its u does not stand in
    extraction = extraction_costs(_extraction(reference={"seconds": 0.5, "images": 1, "delivered": 0}))
    assert batch_costs(times, extraction, extraction_unit=False)[0] is None
    assert "timed by the extractor" in batch_costs(times, extraction)[0]
    # no fragment image at all (every row given or full-model): no raw ratio, no line
    assert batch_costs(BatchTimes(images=3, wall_s=1.0, full_s=1.0, full_images=3))[0] is None


@pytest.mark.parametrize("performance", [
    None, "x", {}, {"calibration": {"ledger": {"unit_s": 0.5, "by_kind": {"mystery": {}}}}},
    {"calibration": {"ledger": {"unit_s": 0, "by_kind": {}}}},
    {"calibration": {"ledger": {"unit_s": 0.5, "by_kind": {"judged": {"seconds": -1, "images": 1, "delivered": 0}}}}},
    {"calibration": {"ledger": {"unit_s": 0.5, "by_kind": {"judged": {"seconds": 1, "images": 1, "delivered": 2}}}}},
    {"calibration": {"ledger": {"unit_s": 0.5, "by_kind": {"judged": {"seconds": float("inf"), "images": 1,
                                                                       "delivered": 0}}}}},
    {"calibration": {"ledger": {"unit_s": True, "by_kind": {}}}},
    # JSON keeps huge integers, and finite floats can still overflow the arithmetic after them
    {"calibration": {"ledger": {"unit_s": 10 ** 400, "by_kind": {}}}},
    {"calibration": {"ledger": {"unit_s": 1e308, "by_kind": {}}}},
    {"calibration": {"ledger": {"unit_s": 0.5, "by_kind": {"judged": {"seconds": 1e308, "images": 1, "delivered": 0}}}}},
    {"calibration": {"ledger": {"unit_s": 0.5, "by_kind": {"judged": {"seconds": 1, "images": 10 ** 400,
                                                                       "delivered": 0}}}}},
])
def test_a_hostile_or_missing_extraction_ledger_is_no_extraction(performance) -> None:
    assert extraction_costs(performance) is None
