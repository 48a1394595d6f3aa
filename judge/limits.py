"""The one limit checker: measured values against ``max`` / ``min`` limits, with one rule for missing values.

Every gate and judgement in the pack (the H1–H5 hypotheses, the quality gate,
``passes_quality``, the H3 reuse bounds, the CI gate test) asks this module,
so that a value cannot pass one of them and fail another.

A :class:`Limit` names a metric, its bound and whether the value must stay at
or below it (``"max"``) or reach it (``"min"``).  A value exactly at the bound
passes.  ``margin`` (a fraction of the bound, like thresholds.yaml's
``warn_margin``) turns a near miss into ``WARN`` instead of ``FAIL``.

The rule for a missing value: a metric that is absent, ``None`` or not finite
(NaN, ±inf) was not measured, and is **never a pass**.  Its verdict is
``MISSING``; a gate counts it as a failure, and the hypotheses report it as
MISSING (which makes a run INVALID).  A caller that knows it cannot measure a
metric (no LPIPS weights, a prompt the analyzer cannot read) drops that limit
and says so, rather than letting the gate skip a hole in the data.

A measured value that is not a number at all (a string, a bool) is a bug
upstream, not a missing measurement: it raises :class:`FragmentError`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..errors import FragmentError

KINDS = ("max", "min")
STATUSES = ("PASS", "WARN", "FAIL", "MISSING")


@dataclass(frozen=True)
class Limit:
    """``metric`` must stay ``<= bound`` (``kind="max"``) or reach ``>= bound`` (``kind="min"``).

    >>> Limit("lpips_mean", 0.035, "max")
    Limit(metric='lpips_mean', bound=0.035, kind='max', margin=0.0)
    >>> Limit("ssim_mean", 0.9, "above")
    Traceback (most recent call last):
    ...
    prompt_fragments.errors.FragmentError: limit 'ssim_mean': expected kind 'max' or 'min', found 'above'
    """

    metric: str
    bound: float
    kind: str
    margin: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FragmentError(f"limit {self.metric!r}: expected kind 'max' or 'min', found {self.kind!r}")
        for name in ("bound", "margin"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(float(value)):
                raise FragmentError(f"limit {self.metric!r}: expected a finite number for {name}, found {value!r}")
            # frozen: normalise ints (and numpy scalars) to float so verdicts compare and print alike
            object.__setattr__(self, name, float(value))
        if self.margin < 0:
            raise FragmentError(f"limit {self.metric!r}: expected a margin >= 0, found {self.margin!r}")

    @property
    def symbol(self) -> str:
        """The comparison a value breaks this limit with: ``">"`` for a max, ``"<"`` for a min."""
        return ">" if self.kind == "max" else "<"


@dataclass(frozen=True)
class Verdict:
    """One limit's outcome: ``status`` is PASS, WARN (missed by at most the margin), FAIL or MISSING.

    ``value`` is the measured value as a float, or ``None`` when it is missing;
    ``found`` is what the measurements held (to say what was there instead).
    """

    limit: Limit
    status: str
    value: float | None
    found: Any = None

    @property
    def passed(self) -> bool:
        """Only PASS passes a gate: WARN, FAIL and MISSING all fail it."""
        return self.status == "PASS"

    def message(self) -> str:
        """The gate's reason line, e.g. ``"ssim_mean 0.85 < 0.9"`` or ``"lpips_mean missing"``.

        >>> judge(0.85, Limit("ssim_mean", 0.9, "min")).message(), judge(None, Limit("lpips_mean", 0.03, "max")).message()
        ('ssim_mean 0.85 < 0.9', 'lpips_mean missing')
        >>> judge(float("nan"), Limit("lpips_mean", 0.03, "max")).message()
        'lpips_mean missing (found nan)'
        """
        name = self.limit.metric
        if self.status == "MISSING":
            return f"{name} missing" if self.found is None else f"{name} missing (found {self.found!r})"
        if self.passed:
            return f"{name} {self.value:.4g} within {self.limit.bound:.4g}"
        return f"{name} {self.value:.4g} {self.limit.symbol} {self.limit.bound:.4g}"


def _is_number(value: Any) -> bool:
    # bool is an int to Python, but True is never a measurement of a bounded metric
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def measured_value(value: Any, where: str = "value") -> float | None:
    """``value`` as a float, or ``None`` when it was not measured (``None``, NaN or ±inf).

    >>> measured_value(0.5), measured_value(None), measured_value(float("nan")), measured_value(float("inf"))
    (0.5, None, None, None)
    >>> measured_value("0.5", "lpips_mean")
    Traceback (most recent call last):
    ...
    prompt_fragments.errors.FragmentError: lpips_mean: expected a number or None, found '0.5'
    """
    if value is None:
        return None
    if not _is_number(value):
        raise FragmentError(f"{where}: expected a number or None, found {value!r}")
    value = float(value)
    # an infinite speed-up or distance is a division by a zero that was never timed or scored: not a measurement
    return value if math.isfinite(value) else None


def judge(value: Any, limit: Limit) -> Verdict:
    """The verdict of one measured ``value`` against ``limit`` (the rule for missing values is the module's).

    >>> lim = Limit("ssim_mean", 0.9, "min", margin=0.1)
    >>> [judge(v, lim).status for v in (0.95, 0.9, 0.85, 0.5, None, float("nan"))]
    ['PASS', 'PASS', 'WARN', 'FAIL', 'MISSING', 'MISSING']
    """
    number = measured_value(value, limit.metric)
    if number is None:
        return Verdict(limit, "MISSING", None, value)
    bound, margin = limit.bound, limit.margin
    if limit.kind == "min":
        status = "PASS" if number >= bound else "WARN" if number >= bound * (1 - margin) else "FAIL"
    else:
        status = "PASS" if number <= bound else "WARN" if number <= bound * (1 + margin) else "FAIL"
    return Verdict(limit, status, number, value)


def check_limits(measured: Mapping[str, Any], limits: Iterable[Limit]) -> list[Verdict]:
    """One verdict per limit, in order; a metric absent from ``measured`` is MISSING.

    >>> vs = check_limits({"lpips_mean": 0.02}, [Limit("lpips_mean", 0.03, "max"), Limit("ssim_mean", 0.9, "min")])
    >>> [(v.limit.metric, v.status) for v in vs]
    [('lpips_mean', 'PASS'), ('ssim_mean', 'MISSING')]
    """
    return [judge(measured.get(limit.metric), limit) for limit in limits]


def failures(measured: Mapping[str, Any], limits: Iterable[Limit]) -> list[str]:
    """The gate: a reason line for every limit ``measured`` does not pass (empty: it passes; missing fails).

    >>> failures({"ssim_mean": 0.85}, [Limit("ssim_mean", 0.9, "min"), Limit("lpips_mean", 0.03, "max")])
    ['ssim_mean 0.85 < 0.9', 'lpips_mean missing']
    """
    return [v.message() for v in check_limits(measured, limits) if not v.passed]


def slack(measured: Mapping[str, Any], limits: Iterable[Limit]) -> float | None:
    """The smallest relative distance to a bound: > 0 inside every limit, < 0 outside one, ``None`` if one is missing.

    The calibration moves along its ladder by this figure (how far inside or outside the gate a try landed).

    >>> slack({"ssim_mean": 0.95, "lpips_mean": 0.03}, [Limit("ssim_mean", 0.9, "min"), Limit("lpips_mean", 0.04, "max")])
    0.0556
    >>> slack({"ssim_mean": 0.95}, [Limit("lpips_mean", 0.04, "max")]) is None
    True
    """
    out: float | None = None
    for verdict in check_limits(measured, limits):
        if verdict.value is None:
            return None
        bound = verdict.limit.bound
        # an absolute distance where the bound is 0 (an adherence drop of at most 0 %), else a fraction of it
        scale = abs(bound) if bound else 1.0
        room = (bound - verdict.value if verdict.limit.kind == "max" else verdict.value - bound) / scale
        out = room if out is None else min(out, room)
    return None if out is None else round(out, 4)
