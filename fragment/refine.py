"""Quality gate with refinement: prune less until the fragment passes, or fall back to the full model.

The extractor asks for a pruning ratio (fraction of heads removed).  If the
fragment built at that ratio fails the quality gate, a smaller ratio is
tried, by bisection between the largest ratio known to pass (initially 0:
the full model, which passes by definition) and the smallest known to fail.
Quality usually falls monotonically with the ratio, so bisection finds the
largest passing ratio within ``tolerance`` in a few builds.  If no ratio
above ``min_ratio`` passes, the answer is the full model.

Every try (ratio, metrics, verdict, reasons) is kept, in order, for the
manifest's ``quality.refinement`` block: the user can see what was tried.

The build-and-measure step is a callable, so this module needs no model:
``evaluate(ratio) -> metrics`` and ``passes(metrics) -> (ok, reasons)``.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Sequence

from ..errors import FragmentError

log = logging.getLogger(__name__)

Evaluate = Callable[[float], Mapping[str, Any]]
Passes = Callable[[Mapping[str, Any]], "tuple[bool, Sequence[str]]"]


def _check(name: str, value: float, low: float, high: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
        raise FragmentError(f"refinement option {name}: expected a number in [{low}, {high}], found {value!r}")


def refine_ratio(
    evaluate: Evaluate,
    passes: Passes,
    *,
    start: float,
    min_ratio: float = 0.0,
    tolerance: float = 0.02,
    max_tries: int = 8,
) -> dict[str, Any]:
    """Find the largest ratio ≤ ``start`` whose fragment passes; record every try.

    Returns ``{"status": "passed" | "refined" | "fallback_full_model", "ratio", "requested_ratio",
    "tries": [{"ratio", "metrics", "passed", "reasons"}, ...], "accepted": metrics or None}``.

    >>> quality = lambda r: {"lpips": r / 10}                      # worse with more pruning
    >>> gate = lambda m: (m["lpips"] <= 0.03, [] if m["lpips"] <= 0.03 else ["lpips"])
    >>> out = refine_ratio(quality, gate, start=0.5, tolerance=0.05)
    >>> out["status"], out["ratio"], [t["ratio"] for t in out["tries"]]
    ('refined', 0.28125, [0.5, 0.25, 0.375, 0.3125, 0.28125])
    >>> refine_ratio(quality, lambda m: (False, ["never"]), start=0.5, tolerance=0.2)["status"]
    'fallback_full_model'
    """
    _check("start", start, 0.0, 1.0)
    _check("min_ratio", min_ratio, 0.0, start)
    _check("tolerance", tolerance, 1e-6, 1.0)
    if max_tries < 1:
        raise FragmentError(f"refinement option max_tries: expected >= 1, found {max_tries}")
    tries: list[dict[str, Any]] = []

    def attempt(ratio: float) -> bool:
        metrics = dict(evaluate(ratio))
        ok, reasons = passes(metrics)
        tries.append({"ratio": ratio, "metrics": metrics, "passed": bool(ok), "reasons": list(reasons)})
        log.info("refinement try %d: ratio %.4f %s%s", len(tries), ratio, "passes" if ok else "fails",
                 "" if ok else f" ({'; '.join(reasons)})")
        return bool(ok)

    if attempt(start):
        return _result("passed", start, start, tries)
    lo, hi, best = min_ratio, start, None  # lo: largest ratio not known to fail; hi: smallest known to fail
    while len(tries) < max_tries and hi - lo > tolerance:
        mid = (lo + hi) / 2
        if attempt(mid):
            lo, best = mid, mid
        else:
            hi = mid
    if best is None and min_ratio > 0 and len(tries) < max_tries and attempt(min_ratio):
        best = min_ratio
    if best is None:
        return _result("fallback_full_model", 0.0, start, tries)
    return _result("refined", best, start, tries)


def _result(status: str, ratio: float, requested: float, tries: list[dict[str, Any]]) -> dict[str, Any]:
    accepted = next((t["metrics"] for t in reversed(tries) if t["passed"] and t["ratio"] == ratio), None)
    return {"status": status, "ratio": ratio, "requested_ratio": requested, "tries": tries, "accepted": accepted}


def refinement_record(result: Mapping[str, Any], gate: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest ``quality.refinement`` block: the gate, every try and the outcome (plain JSON data).

    >>> rec = refinement_record({"status": "passed", "ratio": 0.3, "requested_ratio": 0.3,
    ...                          "tries": [{"ratio": 0.3, "metrics": {}, "passed": True, "reasons": []}]}, {"lpips_max": 0.03})
    >>> rec["status"], rec["final_ratio"], len(rec["tries"])
    ('passed', 0.3, 1)
    """
    return {
        "gate": dict(gate),
        "status": result["status"],
        "requested_ratio": result["requested_ratio"],
        "final_ratio": result["ratio"],
        "fallback_full_model": result["status"] == "fallback_full_model",
        "tries": [{"ratio": t["ratio"], "passed": t["passed"], "reasons": list(t["reasons"]), "metrics": dict(t["metrics"])}
                  for t in result["tries"]],
    }
