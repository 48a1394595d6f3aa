"""The quality gate: a fragment's images (or latents) against the full model's, within ``thresholds.yaml``'s limits.

``quality_gate`` in ``thresholds.yaml`` names its limits (``ssim_min``,
``lpips_max``, ``adherence_drop_max``, ``latent_rel_error_max``); every judge
(the reference target, the ComfyUI judge, the CI gate test) checks them here,
through ``limits``, so that a value cannot pass one judge and fail another.
A judge that cannot measure a metric drops its limit by name
(:func:`measurable_limits`) rather than letting the gate skip a hole.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from .limits import Limit, failures, slack

GATE_CHECKS = (("adherence_delta", "adherence_drop_max", "max"), ("ssim_mean", "ssim_min", "min"),
               ("lpips_mean", "lpips_max", "max"), ("latent_rel_error", "latent_rel_error_max", "max"))


def gate_limits(limits: Mapping[str, float]) -> list[Limit]:
    """The ``quality_gate`` limits as ``Limit`` objects, for the gated metrics ``limits`` names (no margin: a gate has no WARN).

    >>> gate_limits({"variants": 16, "ssim_min": 0.9})
    [Limit(metric='ssim_mean', bound=0.9, kind='min', margin=0.0)]
    """
    return [Limit(key, limits[name], kind) for key, name, kind in GATE_CHECKS if name in limits]


def measurable_limits(limits: Mapping[str, float], unmeasured: Iterable[str]) -> dict[str, float]:
    """``limits`` less the gate limits of metrics this run cannot measure at all (``unmeasured`` metric names).

    The gate fails a missing value; a caller without an LPIPS scorer, or with a
    prompt the analyzer cannot read, drops those limits here, by name, instead.

    >>> measurable_limits({"variants": 16, "ssim_min": 0.9, "lpips_max": 0.035}, ["lpips_mean"])
    {'variants': 16, 'ssim_min': 0.9}
    """
    dropped = {name for key, name, _ in GATE_CHECKS if key in set(unmeasured)}
    return {k: v for k, v in limits.items() if k not in dropped}


def gate_failures(measured: Mapping[str, Any], limits: Mapping[str, float]) -> list[str]:
    """Why ``measured`` fails the ``quality_gate`` ``limits`` (empty: it passes; an unmeasured gated value fails).

    A caller that cannot measure a metric (no LPIPS weights) leaves its limit
    out of ``limits``; a gated value that is simply absent is never a pass.

    >>> gate_failures({"adherence_delta": 0.01, "ssim_mean": 0.85}, {"adherence_drop_max": 0.02, "ssim_min": 0.9})
    ['ssim_mean 0.85 < 0.9']
    >>> gate_failures({"ssim_mean": 0.95, "lpips_mean": None}, {"ssim_min": 0.9, "lpips_max": 0.035})
    ['lpips_mean missing']
    """
    return failures(measured, gate_limits(limits))


def gate_slack(measured: Mapping[str, Any], limits: Mapping[str, float]) -> float | None:
    """How far inside (> 0) or outside (< 0) the ``quality_gate`` ``limits`` ``measured`` lies (``limits.slack``).

    >>> gate_slack({"ssim_mean": 0.99, "lpips_mean": 0.07}, {"ssim_min": 0.9, "lpips_max": 0.035})
    -1.0
    """
    return slack(measured, gate_limits(limits))
