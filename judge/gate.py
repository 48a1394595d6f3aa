"""The quality gate: a fragment's images (or latents) against the full model's, within ``thresholds.yaml``'s limits.

``quality_gate`` in ``thresholds.yaml`` names its limits (``ssim_min``,
``lpips_max``, ``adherence_drop_max``, ``latent_rel_error_max``, and the optional
tail limit ``lpips_p90_max``); every judge
(the reference target, the ComfyUI judge, the CI gate test) checks them here,
through ``limits``, so that a value cannot pass one judge and fail another.
A judge that cannot measure a metric drops its limit by name
(:func:`measurable_limits`) rather than letting the gate skip a hole.

Two rules beyond the bare comparison (docs/hypotheses-and-thresholds.md gives the reasons):

- **Adherence is counted.** Adherence is a share of judged attributes (6 per
  image for a two-object prompt: 48 on 8 images), so a drop moves in steps of
  one attribute.  When the measurements say how many attributes were judged
  (``adherence_attributes``), the drop may reach the limit's share of them
  rounded up to a whole attribute (:func:`adherence_allowance`): one wrong
  attribute of 48 (2.08 points) passes a 2-point limit, two (4.17) do not,
  and the extra room (under one attribute) shrinks as the sample grows.
- **Tails are reported, and gated only where a thresholds file asks.** Every
  image judge reports :func:`image_tails` next to the means; ``lpips_p90_max``
  bounds ``lpips_p90`` when present, and is dropped with ``lpips_mean`` where
  LPIPS is not measured.  The shipped file leaves it out.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .limits import Limit, failures, slack

GATE_CHECKS = (("adherence_delta", "adherence_drop_max", "max"), ("ssim_mean", "ssim_min", "min"),
               ("lpips_mean", "lpips_max", "max"), ("latent_rel_error", "latent_rel_error_max", "max"),
               ("lpips_p90", "lpips_p90_max", "max"))
# a tail is measured exactly where its mean is: a judge that cannot measure the mean cannot measure the tail
TAIL_OF = {"lpips_p90": "lpips_mean", "ssim_p10": "ssim_mean"}
TAIL_KEYS = ("ssim_p10", "lpips_p90", "lpips_max", "ssim_below_limit")
# a drop computed as a difference of two float shares (1 - 47/48) may land a rounding error above k/n
COUNT_TOLERANCE = 1e-9


def image_tails(ssim_scores: Sequence[float] | None, lpips_scores: Sequence[float] | None,
                ssim_limit: float | None) -> dict[str, Any]:
    """The per-image tails reported beside the means: ``ssim_p10`` (10th percentile), ``lpips_p90`` (90th),
    ``lpips_max`` and ``ssim_below_limit`` (images under ``ssim_limit``, the gate's ``ssim_min``).

    Percentiles interpolate linearly between ordered images (numpy's default): on 8 images the p90 lies
    between the worst and the second worst.  What was not measured is ``None``.

    >>> image_tails([1.0, 0.95, 0.85, 0.92], [0.01, 0.02, 0.1, 0.03], 0.9)
    {'ssim_p10': 0.871, 'lpips_p90': 0.079, 'lpips_max': 0.1, 'ssim_below_limit': 1}
    >>> image_tails([0.99], None, None)
    {'ssim_p10': 0.99, 'lpips_p90': None, 'lpips_max': None, 'ssim_below_limit': None}
    """
    out: dict[str, Any] = dict.fromkeys(TAIL_KEYS)
    if ssim_scores is not None and len(ssim_scores):
        out["ssim_p10"] = round(float(np.percentile(np.asarray(ssim_scores, float), 10)), 6)
        if ssim_limit is not None:
            out["ssim_below_limit"] = int(sum(v < ssim_limit for v in ssim_scores))
    if lpips_scores is not None and len(lpips_scores):
        d = np.asarray(lpips_scores, float)
        out["lpips_p90"], out["lpips_max"] = round(float(np.percentile(d, 90)), 6), float(d.max())
    return out


def adherence_allowance(limit: float, attributes: int) -> float:
    """The largest adherence drop that passes ``limit`` on ``attributes`` judged attributes: the limit's share of
    them rounded up to a whole attribute, as a share (always less than one attribute above the limit).

    >>> adherence_allowance(0.02, 48), adherence_allowance(0.02, 24), adherence_allowance(0.02, 4800)
    (0.020833333333333332, 0.041666666666666664, 0.02)
    >>> adherence_allowance(0.0, 48)
    0.0
    """
    if attributes <= 0:
        return float(limit)
    allowed = math.ceil(limit * attributes - COUNT_TOLERANCE)  # 0.02 * 50 is 1.0000000000000002, not two attributes
    return max(float(limit), allowed / attributes)


def gate_limits(limits: Mapping[str, float], measured: Mapping[str, Any] | None = None) -> list[Limit]:
    """The ``quality_gate`` limits as ``Limit`` objects, for the gated metrics ``limits`` names (no margin: a gate has no WARN).

    With ``measured`` holding ``adherence_attributes`` (how many attributes were judged), the adherence
    limit is counted in whole attributes (:func:`adherence_allowance`).

    >>> gate_limits({"variants": 16, "ssim_min": 0.9})
    [Limit(metric='ssim_mean', bound=0.9, kind='min', margin=0.0)]
    >>> gate_limits({"adherence_drop_max": 0.02}, {"adherence_attributes": 48})[0].bound > 1 / 48
    True
    """
    out = [Limit(key, limits[name], kind) for key, name, kind in GATE_CHECKS if name in limits]
    n = (measured or {}).get("adherence_attributes")
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        # the bound sits a rounding error above the allowed k/n, so a drop of exactly k attributes passes
        out = [Limit(lim.metric, adherence_allowance(lim.bound, n) + COUNT_TOLERANCE, lim.kind)
               if lim.metric == "adherence_delta" else lim for lim in out]
    return out


def measurable_limits(limits: Mapping[str, float], unmeasured: Iterable[str]) -> dict[str, float]:
    """``limits`` less the gate limits of metrics this run cannot measure at all (``unmeasured`` metric names).

    The gate fails a missing value; a caller without an LPIPS scorer, or with a
    prompt the analyzer cannot read, drops those limits here, by name, instead.

    A tail limit goes with its mean (``lpips_p90_max`` with ``lpips_mean``).

    >>> measurable_limits({"variants": 16, "ssim_min": 0.9, "lpips_max": 0.035, "lpips_p90_max": 0.07}, ["lpips_mean"])
    {'variants': 16, 'ssim_min': 0.9}
    """
    gone = set(unmeasured)
    dropped = {name for key, name, _ in GATE_CHECKS if key in gone or TAIL_OF.get(key) in gone}
    return {k: v for k, v in limits.items() if k not in dropped}


def gate_failures(measured: Mapping[str, Any], limits: Mapping[str, float]) -> list[str]:
    """Why ``measured`` fails the ``quality_gate`` ``limits`` (empty: it passes; an unmeasured gated value fails).

    A caller that cannot measure a metric (no LPIPS weights) leaves its limit
    out of ``limits``; a gated value that is simply absent is never a pass.

    >>> gate_failures({"adherence_delta": 0.01, "ssim_mean": 0.85}, {"adherence_drop_max": 0.02, "ssim_min": 0.9})
    ['ssim_mean 0.85 < 0.9']
    >>> gate_failures({"ssim_mean": 0.95, "lpips_mean": None}, {"ssim_min": 0.9, "lpips_max": 0.035})
    ['lpips_mean missing']
    >>> gate_failures({"adherence_delta": 1 / 48, "adherence_attributes": 48}, {"adherence_drop_max": 0.02})
    []
    """
    return failures(measured, gate_limits(limits, measured))


def gate_slack(measured: Mapping[str, Any], limits: Mapping[str, float]) -> float | None:
    """How far inside (> 0) or outside (< 0) the ``quality_gate`` ``limits`` ``measured`` lies (``limits.slack``).

    >>> gate_slack({"ssim_mean": 0.99, "lpips_mean": 0.07}, {"ssim_min": 0.9, "lpips_max": 0.035})
    -1.0
    """
    return slack(measured, gate_limits(limits, measured))
