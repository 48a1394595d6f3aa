"""The one limit checker (issue #14): bounds, margins, and one rule for a missing value everywhere.

Rule under test (``judge.limits``): a value that is absent, ``None``, NaN or
±inf was not measured; it is MISSING, never a pass.  Every former checker
(hypotheses ``check`` / ``gate_failures``, ``passes_quality``, reuse
``within_bounds``, the CI gate test) must agree on it.
"""
from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from prompt_fragments.errors import FragmentError
from prompt_fragments.judge import gate as quality_gate, limits as lim, thresholds
from prompt_fragments.judge.limits import Limit, check_limits, failures, judge
from prompt_fragments.metrics import hypotheses, quality, reuse

ROOT = Path(__file__).resolve().parent.parent
NOT_MEASURED = [None, math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("kind, value, status", [
    ("max", 0.02, "PASS"), ("max", 0.03, "PASS"), ("max", 0.031, "FAIL"),
    ("min", 0.95, "PASS"), ("min", 0.9, "PASS"), ("min", 0.899, "FAIL"),
])
def test_below_at_and_above_the_bound(kind: str, value: float, status: str) -> None:
    bound = 0.03 if kind == "max" else 0.9
    verdict = judge(value, Limit("m", bound, kind))
    assert verdict.status == status and verdict.passed == (status == "PASS") and verdict.value == value


def test_margin_turns_a_near_miss_into_warn_and_a_gate_still_fails_it() -> None:
    cap, floor = Limit("m", 10.0, "max", margin=0.1), Limit("m", 10.0, "min", margin=0.1)
    assert [judge(v, cap).status for v in (10.0, 10.5, 11.0, 11.01)] == ["PASS", "WARN", "WARN", "FAIL"]
    assert [judge(v, floor).status for v in (10.0, 9.5, 9.0, 8.99)] == ["PASS", "WARN", "WARN", "FAIL"]
    assert failures({"m": 10.5}, [cap]) == ["m 10.5 > 10"]  # only PASS passes a gate


@pytest.mark.parametrize("value", NOT_MEASURED)
@pytest.mark.parametrize("kind", ["max", "min"])
def test_missing_or_non_finite_is_missing_never_a_pass(value: float | None, kind: str) -> None:
    # +inf would "pass" a min and -inf a max if compared; neither is a measurement
    verdict = judge(value, Limit("m", 1.0, kind, margin=0.5))
    assert verdict.status == "MISSING" and not verdict.passed and verdict.value is None


def test_absent_key_is_missing_and_messages_say_what_was_found() -> None:
    vs = check_limits({"nan_metric": math.nan}, [Limit("absent", 1, "max"), Limit("nan_metric", 1, "max")])
    assert [v.status for v in vs] == ["MISSING", "MISSING"]
    assert [v.message() for v in vs] == ["absent missing", "nan_metric missing (found nan)"]


def test_bad_limits_and_non_numbers_are_errors_not_verdicts() -> None:
    with pytest.raises(FragmentError, match=r"limit 'm': expected kind 'max' or 'min', found 'above'"):
        Limit("m", 1, "above")
    with pytest.raises(FragmentError, match=r"limit 'm': expected a finite number for bound, found nan"):
        Limit("m", math.nan, "max")
    with pytest.raises(FragmentError, match=r"limit 'm': expected a margin >= 0"):
        Limit("m", 1, "max", margin=-0.1)
    for bad in ("0.5", True):
        with pytest.raises(FragmentError, match=r"m: expected a number or None, found"):
            judge(bad, Limit("m", 1, "max"))


def test_present_values_keep_every_callers_messages() -> None:
    assert quality_gate.gate_failures({"adherence_delta": 0.05, "ssim_mean": 0.85, "lpips_mean": 0.01},
                                    {"adherence_drop_max": 0.02, "ssim_min": 0.9, "lpips_max": 0.035}) == [
        "adherence_delta 0.05 > 0.02", "ssim_mean 0.85 < 0.9"]
    assert quality.passes_quality({"clip_drop_rel": 0.03, "lpips_mean": 0.01, "ssim_mean": 0.8}, ssim_min=0.9) == (
        False, ["clip_drop_rel 0.03 > 0.02", "ssim_mean 0.8 < 0.9"])
    assert reuse.within_bounds({"lpips_mean": 0.04, "ssim_mean": 0.95}, reuse.H2_BOUNDS) == [
        "lpips_mean: expected <= 0.035, found 0.04"]
    assert [hypotheses.check(v, 0.30, "min", 0.1) for v in (0.31, 0.30, 0.28, 0.2)] == ["PASS", "PASS", "WARN", "FAIL"]


def _ci_gate_failures() -> ast.FunctionDef:
    """The CI gate test's own ``failures`` check, read from its source: it must be the product's gate."""
    tree = ast.parse((ROOT / "tests" / "test_quality_gate.py").read_text())
    funcs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "failures"]
    assert len(funcs) == 1
    return funcs[0]


def test_the_ci_gate_test_uses_the_products_gate_not_a_copy() -> None:
    body = _ci_gate_failures().body
    calls = [n.func.id for n in ast.walk(body[-1]) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    assert calls == ["gate_failures"]  # no comparisons of its own, so it cannot skip or pass a missing value
    assert not any(isinstance(n, ast.Compare) for stmt in body for n in ast.walk(stmt))


@pytest.mark.parametrize("value", NOT_MEASURED)
def test_every_former_checker_agrees_a_missing_value_fails(value: float | None) -> None:
    gate = {"adherence_drop_max": 0.02, "ssim_min": 0.9, "lpips_max": 0.035}
    good = {"adherence_delta": 0.0, "ssim_mean": 0.95, "lpips_mean": 0.01, "clip_drop_rel": 0.0}
    bad = {**good, "lpips_mean": value}

    # hypotheses: the H2 record reports MISSING and the run is INVALID
    t = thresholds.validate_thresholds({"hypotheses": {"H2": {"lpips_max": 0.035, "ssim_min": 0.9}}})
    h = hypotheses.evaluate_hypotheses(bad, t)
    assert hypotheses.check(value, 0.035, "max", 0.1) == "MISSING"
    assert h["H2"]["checks"]["lpips_mean"]["status"] == "MISSING" and hypotheses.run_status(h) == "INVALID"
    assert hypotheses.missing_metrics(h) == ["H2.lpips_mean"]

    # every gate: fails, and names the metric; the same inputs pass when the value is there
    gate_reasons = quality_gate.gate_failures(bad, gate)
    ok, quality_reasons = quality.passes_quality(bad, lpips_max=0.035, ssim_min=0.9)
    reuse_reasons = reuse.within_bounds(bad, reuse.H2_BOUNDS)
    for reasons in (gate_reasons, quality_reasons, reuse_reasons):
        assert len(reasons) == 1 and reasons[0].startswith("lpips_mean")
    assert not ok and reuse_reasons == [f"lpips_mean: expected a measured value, found {value!r}"]
    assert gate_reasons == quality_reasons == lim.failures(bad, [Limit("lpips_mean", 0.035, "max")])
    assert quality_gate.gate_failures(good, gate) == [] and quality.passes_quality(good, lpips_max=0.035)[0]
    assert reuse.within_bounds(good, reuse.H2_BOUNDS) == []


def test_gate_failures_no_longer_passes_an_unmeasured_value() -> None:
    # before issue #14 gate_failures skipped None ("unmeasured values are not judged") and NaN slipped
    # through both comparisons, so a run without LPIPS scores passed the quality gate on LPIPS
    gate = {"ssim_min": 0.9, "lpips_max": 0.035}
    assert quality_gate.gate_failures({"ssim_mean": 0.95, "lpips_mean": None}, gate) == ["lpips_mean missing"]
    assert quality_gate.gate_failures({"ssim_mean": 0.95}, gate) == ["lpips_mean missing"]
    assert quality_gate.gate_failures({"ssim_mean": math.nan, "lpips_mean": 0.01}, gate) == ["ssim_mean missing (found nan)"]
    # passes_quality already failed None, but passed NaN
    assert quality.passes_quality({"clip_drop_rel": 0.0, "lpips_mean": math.nan}) == (False, ["lpips_mean missing (found nan)"])


def test_a_caller_that_cannot_measure_a_metric_drops_its_limit_by_name() -> None:
    gate = {"variants": 16, "adherence_drop_max": 0.02, "ssim_min": 0.9, "lpips_max": 0.035}
    no_lpips = quality_gate.measurable_limits(gate, ["lpips_mean"])
    assert no_lpips == {"variants": 16, "adherence_drop_max": 0.02, "ssim_min": 0.9}
    assert quality_gate.gate_failures({"adherence_delta": 0.0, "ssim_mean": 0.95, "lpips_mean": None}, no_lpips) == []
    assert quality_gate.measurable_limits(gate, []) == gate


def test_reuse_bounds_reject_an_unknown_kind_before_judging() -> None:
    with pytest.raises(FragmentError, match=r"bounds\['ssim_mean'\]: expected 'max' or 'min', found 'above'"):
        reuse.within_bounds({}, {"ssim_mean": ("above", 0.9)})
